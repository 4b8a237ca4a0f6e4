//! When a session last heard from its peer: a transport wrapper that stamps every read. The
//! server's keepalive ([`crate::keepalive::run_listening`]) uses it to stay quiet while the
//! agent's own PINGs (or anything else) keep arriving, so an idle session carries one PING
//! exchange per interval instead of two.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the transport and the keepalive.
pub struct LastHeard {
    base: Instant,
    /// Nanoseconds after `base` of the last read that returned bytes.
    at: AtomicU64,
}

impl LastHeard {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            at: AtomicU64::new(0),
        })
    }

    fn stamp(&self) {
        self.at
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Time since the peer last sent anything (since creation, if never).
    pub fn silent_for(&self) -> Duration {
        let at = Duration::from_nanos(self.at.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(at)
    }
}

pub struct Heard<T> {
    inner: T,
    last: Arc<LastHeard>,
}

impl<T> Heard<T> {
    pub fn new(inner: T, last: Arc<LastHeard>) -> Self {
        Self { inner, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.stamp();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
