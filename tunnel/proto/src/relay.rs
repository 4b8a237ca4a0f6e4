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
//!
//! A connection may outlive the stream it started on (see [`crate::resume`]): it runs in
//! *legs*, one per stream, and a leg whose session was lost ends as [`Leg::Lost`] with
//! [`Progress`] saying exactly what was read and written, so the next leg (on another session)
//! carries on from there. Both directions are therefore cancel-safe: bytes are recorded when
//! read, before they are sent, and counted as delivered per `write`, not per message.
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

use crate::resume::{Progress, Receiving, Resend, Sending};

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

/// How one leg (one stream) of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The connection is done: both directions ended cleanly, or one side aborted.
    Done(End),
    /// The stream's session went away (an I/O error, the connection closed) with the
    /// connection still open: it may continue on another stream.
    Lost,
}

/// How one direction of one leg ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Closed,
    Reset,
    Lost,
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
        /// The 200 to send (with whatever headers the answer carries).
        ok: http::Response<()>,
    },
}

/// A plain 200, the answer to an opened stream.
pub fn ok_response() -> http::Response<()> {
    http::Response::builder()
        .status(200)
        .body(())
        .expect("static response")
}

/// Sends the agent's 200 once the service has something to say (or its EOF), or `by` passed;
/// `None` if the stream was reset meanwhile.
async fn answer(
    rd: &ReadHalf<'_>,
    mut respond: h2::server::SendResponse<Bytes>,
    by: std::time::Duration,
    ok: http::Response<()>,
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
    match respond.send_response(ok, false) {
        Ok(tx) => Some(tx),
        Err(e) => {
            tracing::debug!("could not answer the stream: {e}");
            None
        }
    }
}

/// An h2 error's meaning for the connection: the session went away (I/O, GOAWAY), or the
/// stream itself was aborted (RST_STREAM either way, a protocol error).
fn classify(e: &h2::Error) -> Dir {
    if e.is_io() || e.is_go_away() {
        Dir::Lost
    } else {
        Dir::Reset
    }
}

/// Why a stream no longer takes data: asked once its send side failed.
fn why_unsendable(tx: &mut SendStream<Bytes>) -> Dir {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match tx.poll_reset(&mut cx) {
        std::task::Poll::Ready(Err(e)) => classify(&e),
        // Reset by the peer, or (pending) still open but refusing data: a broken stream.
        _ => Dir::Reset,
    }
}

/// Sends `data` as the peer grants window.
async fn send_all(tx: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Dir> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                tracing::debug!("no send capacity: {e}");
                return Err(classify(&e));
            }
            // The stream was reset or the session is gone.
            None => return Err(why_unsendable(tx)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        if let Err(e) = tx.send_data(chunk, false) {
            tracing::debug!("send_data failed: {e}");
            return Err(why_unsendable(tx));
        }
    }
    Ok(())
}

fn send_end(tx: &mut SendStream<Bytes>) -> Dir {
    match tx.send_data(Bytes::new(), true) {
        Ok(()) => Dir::Closed,
        Err(e) => {
            tracing::debug!("could not send END_STREAM: {e}");
            why_unsendable(tx)
        }
    }
}

async fn tcp_to_stream(rd: &ReadHalf<'_>, up: Up, s: &mut Sending, resend: Resend) -> Dir {
    let mut tx = match up {
        Up::Open(tx) => tx,
        Up::Answer { respond, by, ok } => match answer(rd, respond, by, ok).await {
            Some(tx) => tx,
            None => return Dir::Reset,
        },
    };
    // A resumed leg first sends what the other end did not get.
    for b in resend.bytes {
        if let Err(d) = send_all(&mut tx, b).await {
            return d;
        }
    }
    if resend.done || resend.then_end {
        return send_end(&mut tx);
    }
    // No buffer until data arrives, then one that grows while reads fill it: an idle stream
    // costs no buffer memory, a busy one gets large reads (fewer, bigger DATA frames).
    let mut buf = BytesMut::new();
    let mut want = FIRST_READ;
    let mut first = s.read == 0;
    loop {
        tokio::select! {
            r = rd.readable() => {
                if let Err(e) = r {
                    tracing::debug!("TCP wait failed, resetting the stream: {e}");
                    tx.send_reset(Reason::CANCEL);
                    return Dir::Reset;
                }
            }
            // The peer aborted (or the session went) while this side had nothing to send.
            r = poll_fn(|cx| tx.poll_reset(cx)) => {
                tracing::debug!("stream reset by peer while idle: {r:?}");
                return match r {
                    Err(e) => classify(&e),
                    Ok(_) => Dir::Reset,
                };
            }
        }
        buf.reserve(want);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(0) => {
                // Half-close: the far side sees EOF and may still answer.
                s.read_end = true;
                return send_end(&mut tx);
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!("TCP read failed, resetting the stream: {e}");
                tx.send_reset(Reason::CANCEL);
                return Dir::Reset;
            }
        };
        if n >= want && want < CHUNK {
            want = (want * 2).min(CHUNK);
        }
        let data = buf.split().freeze();
        // Recorded before it is sent: if the leg is lost now, the next one knows it was read.
        s.read(&data);
        if std::mem::take(&mut first) {
            // The first read (at most FIRST_READ bytes) is queued without waiting for
            // capacity: h2 holds it until the window allows, and it leaves in the same write
            // as the stream's HEADERS instead of one wake-up later (a TLS ClientHello, an
            // HTTP request). Later reads wait for capacity, so buffering stays bounded.
            if let Err(e) = tx.send_data(data, false) {
                tracing::debug!("send_data failed: {e}");
                return why_unsendable(&mut tx);
            }
            continue;
        }
        if let Err(d) = send_all(&mut tx, data).await {
            return d;
        }
    }
}

async fn stream_to_tcp(mut rx: RecvStream, wr: &mut WriteHalf<'_>, r: &mut Receiving) -> Dir {
    while let Some(frame) = rx.data().await {
        let data = match frame {
            Ok(d) => d,
            Err(e) => {
                // RST_STREAM (the sender aborted), or a dead session.
                tracing::debug!("stream ended by peer: {e}");
                return classify(&e);
            }
        };
        if r.got_end && !data.is_empty() {
            tracing::debug!("data after END_STREAM on a resumed stream");
            return Dir::Reset;
        }
        // One write at a time, each counted: a leg dropped mid-message knows exactly what
        // reached TCP, and the next one has the rest sent again.
        let mut rest = &data[..];
        while !rest.is_empty() {
            match wr.write(rest).await {
                Ok(0) | Err(_) => {
                    tracing::debug!("TCP write failed");
                    return Dir::Reset;
                }
                Ok(n) => {
                    rest = &rest[n..];
                    r.delivered += n as u64;
                }
            }
        }
        // Only now grant the peer more window: a reader that never reads holds back only
        // its own stream.
        let _ = rx.flow_control().release_capacity(data.len());
    }
    // A data() of None after a reset is possible; distinguish it from a clean END_STREAM.
    if rx.is_end_stream() {
        if !r.got_end {
            let _ = wr.shutdown().await;
            r.got_end = true;
        }
        Dir::Closed
    } else {
        tracing::debug!("stream ended without END_STREAM");
        Dir::Lost
    }
}

/// Resets the TCP connection when it is closed (RST instead of FIN).
pub fn set_abortive_close(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Makes `tcp`'s close a reset: a connection that cannot go on must not look complete.
pub fn abort(tcp: &TcpStream) {
    set_abortive_close(std::os::fd::AsFd::as_fd(tcp));
}

/// Relays until both directions ended cleanly, or either side aborted. `tcp` should have
/// TCP_NODELAY set (each end sets it once: on its listener, or after connecting).
pub async fn relay(tcp: TcpStream, up: Up, rx: RecvStream) -> Outcome {
    relay_before_answer(tcp, up, async { Some(rx) }).await
}

/// Like [`relay`], but the stream's receive half arrives later (the peer's answer to the stream
/// open). Bytes the client sends meanwhile flow at once, which saves a round trip for
/// protocols where the client speaks first (a TLS ClientHello). `None` from `answer` (the peer
/// refused) aborts the connection with a reset. A lost session resets the connection too.
pub async fn relay_before_answer(
    mut tcp: TcpStream,
    up: Up,
    answer: impl std::future::Future<Output = Option<RecvStream>>,
) -> Outcome {
    let mut p = Progress::default();
    let end = match leg(&mut tcp, up, answer, &mut p, Resend::default()).await {
        Leg::Done(end) => end,
        Leg::Lost => {
            abort(&tcp);
            End::Reset
        }
    };
    outcome(&p, end)
}

/// What a connection moved, once done.
pub fn outcome(p: &Progress, end: End) -> Outcome {
    Outcome {
        tcp_to_stream: p.sending.read,
        stream_to_tcp: p.receiving.delivered,
        end,
    }
}

/// One leg of a connection: relays between `tcp` and one stream, starting with `resend`, until
/// the connection is done or the stream's session is lost. An abort leaves `tcp` set to
/// reset on close; a lost leg leaves it as it was. Dropping the future mid-leg is safe:
/// `p` is exact at every await.
pub async fn leg(
    tcp: &mut TcpStream,
    up: Up,
    answer: impl std::future::Future<Output = Option<RecvStream>>,
    p: &mut Progress,
    resend: Resend,
) -> Leg {
    let raw = tcp.as_raw_fd();
    // Borrowed halves: unlike owned ones, dropping the write half does not send a FIN, which
    // would turn an abort into a clean EOF before the reset.
    let (rd, mut wr) = tcp.split();
    let Progress { sending, receiving } = p;
    let up = tcp_to_stream(&rd, up, sending, resend);
    let down = async {
        match answer.await {
            Some(rx) => stream_to_tcp(rx, &mut wr, receiving).await,
            None => Dir::Reset,
        }
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let d = tokio::select! {
            d = &mut up, if !up_done => { up_done = true; d }
            d = &mut down, if !down_done => { down_done = true; d }
        };
        match d {
            // The other direction may be blocked on TCP, which the session's loss does not
            // wake; both are cancel-safe, so it is simply dropped.
            Dir::Lost => return Leg::Lost,
            Dir::Reset => {
                // SAFETY: `tcp` outlives this function, so the fd is open.
                set_abortive_close(unsafe { BorrowedFd::borrow_raw(raw) });
                // The other direction sees the abort too and ends promptly; let it, so its
                // byte count is final and a pending answer (the reason for a refusal) is read.
                if !up_done {
                    let _ = tokio::time::timeout(ABORT_GRACE, &mut up).await;
                }
                if !down_done {
                    let _ = tokio::time::timeout(ABORT_GRACE, &mut down).await;
                }
                return Leg::Done(End::Reset);
            }
            Dir::Closed if up_done && down_done => return Leg::Done(End::Closed),
            Dir::Closed => {}
        }
    }
}
