//! When a session last heard from its peer: a transport wrapper that stamps every read. The
//! server's keepalive ([`crate::keepalive::run_listening`]) uses it to stay quiet while the
//! agent's own PINGs (or anything else) keep arriving, so an idle session carries one PING
//! exchange per interval instead of two. The server's [`crate::silence::SilenceWatch`] reads
//! the stamps of all its sessions and wakes a keepalive once its session has gone silent.
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
    /// Rung by the silence watch: the session has been silent for its threshold.
    woken: tokio::sync::Notify,
}

impl LastHeard {
    /// Watched stamps come from [`crate::silence::SilenceWatch::watch`], which shares its
    /// `base` with all of them so that one clock reading serves a whole scan.
    pub(crate) fn new(base: Instant) -> Arc<Self> {
        Arc::new(Self {
            base,
            at: AtomicU64::new(base.elapsed().as_nanos() as u64),
            woken: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn stamp(&self) {
        self.at
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Time since the peer last sent anything (since creation, if never).
    pub fn silent_for(&self) -> Duration {
        self.silent_at(self.base.elapsed())
    }

    /// Silence at `since_base` after the stamp's base.
    pub(crate) fn silent_at(&self, since_base: Duration) -> Duration {
        since_base.saturating_sub(Duration::from_nanos(self.at.load(Ordering::Relaxed)))
    }

    /// Returns once the peer has been silent for `quiet`. Only a [`SilenceWatch`] ringing
    /// this stamp ends the wait, so the stamp must come from its `watch` and `quiet` be no
    /// shorter than the watch's threshold.
    ///
    /// [`SilenceWatch`]: crate::silence::SilenceWatch
    pub async fn until_silent(&self, quiet: Duration) {
        // A ring stored while the session was busy (pinging) finds it no longer silent: the
        // loop waits again.
        while self.silent_for() < quiet {
            self.woken.notified().await;
        }
    }

    pub(crate) fn wake(&self) {
        self.woken.notify_one();
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
