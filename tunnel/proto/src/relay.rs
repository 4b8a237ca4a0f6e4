//! Moving bytes between one TCP connection and one HTTP/2 stream, both ways, keeping the
//! semantics the applications above depend on:
//!
//! - **half-close**: TCP EOF becomes END_STREAM, END_STREAM becomes `shutdown(Write)`, and the
//!   other direction keeps flowing until it ends too (exec and port-forward need this);
//! - **abort**: a TCP reset becomes RST_STREAM(CANCEL), and a received RST_STREAM becomes a TCP
//!   reset (SO_LINGER 0), so a truncated response never looks complete;
//! - **flow control per stream**: data is sent only as the peer grants window, and received
//!   window is released only after the bytes were written to TCP, so a stalled reader stalls
//!   only its own stream.
use std::{
    future::poll_fn,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Largest read from TCP per DATA chunk. Big reads halve the per-byte CPU (measured in the
/// h2 prototype).
pub(crate) const CHUNK: usize = 256 * 1024;
/// How long the surviving direction of an aborted relay may take to notice.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// First read size; doubles while reads fill the buffer.
pub(crate) const FIRST_READ: usize = 8 * 1024;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Clean end: EOF / END_STREAM carried across.
    Closed,
    /// Abort: a reset on one side, carried across as a reset.
    Reset,
}

/// What a finished relay moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub tcp_to_stream: u64,
    pub stream_to_tcp: u64,
    pub end: End,
}

/// Where the TCP side's bytes go: a stream already open for sending (the server's side), or
/// the agent's answer still to give, which then leaves in the same write as the service's
/// first bytes: one TLS record, one packet and one wake-up of the server fewer per connection
/// for protocols where the client speaks first (TLS to a kubelet: the ServerHello rides with
/// the 200). Silence for `by` sends the answer alone: the server's open timeout never waits
/// on a quiet service.
pub enum Up {
    Open(SendStream<Bytes>),
    Answer {
        respond: h2::server::SendResponse<Bytes>,
        by: std::time::Duration,
    },
}

/// Sends the agent's 200 once the service has something to say (or its EOF), or `by` passed;
/// `None` if the stream was reset meanwhile.
async fn answer(
    rd: &ReadHalf<'_>,
    mut respond: h2::server::SendResponse<Bytes>,
    by: std::time::Duration,
) -> Option<SendStream<Bytes>> {
    tokio::select! {
        // Readable, EOF or error alike: the loop reading it next sorts them out.
        _ = rd.readable() => {}
        _ = tokio::time::sleep(by) => {}
        r = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!("stream reset by peer before the answer: {r:?}");
            return None;
        }
    }
    let ok = http::Response::builder()
        .status(200)
        .body(())
        .expect("static response");
    match respond.send_response(ok, false) {
        Ok(tx) => Some(tx),
        Err(e) => {
            tracing::debug!("could not answer the stream: {e}");
            None
        }
    }
}

async fn tcp_to_stream(rd: ReadHalf<'_>, up: Up, moved: &mut u64) -> End {
    let mut tx = match up {
        Up::Open(tx) => tx,
        Up::Answer { respond, by } => match answer(&rd, respond, by).await {
            Some(tx) => tx,
            None => return End::Reset,
        },
    };
    // No buffer until data arrives, then one that grows while reads fill it: an idle stream
    // costs no buffer memory, a busy one gets large reads (fewer, bigger DATA frames).
    let mut buf = BytesMut::new();
    let mut want = FIRST_READ;
    let mut first = true;
    loop {
        tokio::select! {
            r = rd.readable() => {
                if let Err(e) = r {
                    tracing::debug!("TCP wait failed, resetting the stream: {e}");
                    tx.send_reset(Reason::CANCEL);
                    return End::Reset;
                }
            }
            // The peer aborted while this side had nothing to send.
            r = poll_fn(|cx| tx.poll_reset(cx)) => {
                tracing::debug!("stream reset by peer while idle: {r:?}");
                return End::Reset;
            }
        }
        buf.reserve(want);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(0) => {
                // Half-close: the far side sees EOF and may still answer.
                return match tx.send_data(Bytes::new(), true) {
                    Ok(()) => End::Closed,
                    Err(e) => {
                        tracing::debug!("could not send END_STREAM: {e}");
                        End::Reset
                    }
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!("TCP read failed, resetting the stream: {e}");
                tx.send_reset(Reason::CANCEL);
                return End::Reset;
            }
        };
        if n >= want && want < CHUNK {
            want = (want * 2).min(CHUNK);
        }
        let mut data = buf.split().freeze();
        if std::mem::take(&mut first) {
            // The first read (at most FIRST_READ bytes) is queued without waiting for
            // capacity: h2 holds it until the window allows, and it leaves in the same write
            // as the stream's HEADERS instead of one wake-up later (a TLS ClientHello, an
            // HTTP request). Later reads wait for capacity, so buffering stays bounded.
            let len = data.len() as u64;
            if let Err(e) = tx.send_data(data, false) {
                tracing::debug!("send_data failed: {e}");
                return End::Reset;
            }
            *moved += len;
            continue;
        }
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(g)) => g,
                // The stream was reset or the session is gone.
                other => {
                    tracing::debug!("no send capacity: {other:?}");
                    return End::Reset;
                }
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            let len = chunk.len() as u64;
            if let Err(e) = tx.send_data(chunk, false) {
                tracing::debug!("send_data failed: {e}");
                return End::Reset;
            }
            *moved += len;
        }
    }
}

async fn stream_to_tcp(mut rx: RecvStream, mut wr: WriteHalf<'_>, moved: &mut u64) -> End {
    while let Some(frame) = rx.data().await {
        let data = match frame {
            Ok(d) => d,
            Err(e) => {
                // RST_STREAM (or a dead session): the sender aborted.
                tracing::debug!("stream aborted by peer: {e}");
                return End::Reset;
            }
        };
        if let Err(e) = wr.write_all(&data).await {
            tracing::debug!("TCP write failed: {e}");
            return End::Reset;
        }
        *moved += data.len() as u64;
        // Only now grant the peer more window: a reader that never reads holds back only
        // its own stream.
        let _ = rx.flow_control().release_capacity(data.len());
    }
    // A data() of None after a reset is possible; distinguish it from a clean END_STREAM.
    if rx.is_end_stream() {
        let _ = wr.shutdown().await;
        End::Closed
    } else {
        tracing::debug!("stream ended without END_STREAM");
        End::Reset
    }
}

/// Resets the TCP connection when it is closed (RST instead of FIN).
fn set_abortive_close(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays until both directions ended cleanly, or either side aborted. `tcp` should have
/// TCP_NODELAY set (each end sets it once: on its listener, or after connecting).
pub async fn relay(tcp: TcpStream, up: Up, rx: RecvStream) -> Outcome {
    relay_before_answer(tcp, up, async { Some(rx) }).await
}

/// Like [`relay`], but the stream's receive half arrives later (the peer's answer to the stream
/// open). Bytes the client sends meanwhile flow at once, which saves a round trip for
/// protocols where the client speaks first (a TLS ClientHello). `None` from `answer` (the peer
/// refused) aborts the connection with a reset.
pub async fn relay_before_answer(
    mut tcp: TcpStream,
    up: Up,
    answer: impl std::future::Future<Output = Option<RecvStream>>,
) -> Outcome {
    let raw = tcp.as_raw_fd();
    // Borrowed halves: unlike owned ones, dropping the write half does not send a FIN, which
    // would turn an abort into a clean EOF before the reset.
    let (rd, wr) = tcp.split();
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    let end = {
        let up = tcp_to_stream(rd, up, &mut up_bytes);
        let down = async {
            match answer.await {
                Some(rx) => stream_to_tcp(rx, wr, &mut down_bytes).await,
                None => End::Reset,
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let end = loop {
            let e = tokio::select! {
                e = &mut up, if !up_done => { up_done = true; e }
                e = &mut down, if !down_done => { down_done = true; e }
            };
            if e == End::Reset {
                // SAFETY: `tcp` outlives this block, so the fd is open.
                set_abortive_close(unsafe { BorrowedFd::borrow_raw(raw) });
                break End::Reset;
            }
            if up_done && down_done {
                break End::Closed;
            }
        };
        if end == End::Reset {
            // The other direction sees the abort too and ends promptly; let it, so its byte
            // count is final and a pending answer (the reason for a refusal) is read.
            if !up_done {
                let _ = tokio::time::timeout(ABORT_GRACE, &mut up).await;
            }
            if !down_done {
                let _ = tokio::time::timeout(ABORT_GRACE, &mut down).await;
            }
        }
        end
    };
    Outcome {
        tcp_to_stream: up_bytes,
        stream_to_tcp: down_bytes,
        end,
    }
}
