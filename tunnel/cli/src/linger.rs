//! Closing a connection without losing the last answer. A server that answers before reading
//! the whole request (a 413 for a body too large, hyper's own 431 for headers too large) and
//! then closes has unread bytes in its receive queue, and the kernel turns that close into a
//! reset, which can destroy the answer before the client has read it. A lingering close sends
//! FIN instead, then reads and discards what the client still sends for a bounded time.
use std::{
    os::fd::{AsRawFd, FromRawFd},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A second descriptor on a connection, kept so the close can linger after the protocol
/// stack that owned the first descriptor has dropped it.
pub struct Linger(tokio::net::TcpStream);

impl Linger {
    /// Duplicates `tcp`'s descriptor (the socket stays open until both are closed).
    pub fn dup(tcp: &tokio::net::TcpStream) -> std::io::Result<Self> {
        // SAFETY: dup of a descriptor we hold; the new one is owned by the std stream below.
        let fd = unsafe { libc::dup(tcp.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor of a connected TCP socket, owned from here on.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        Ok(Self(tokio::net::TcpStream::from_std(std)?))
    }

    /// Sends FIN, then discards what arrives until the peer closes, `within` passes or
    /// `max_bytes` have been read; only then is the socket closed.
    pub async fn close(mut self, within: Duration, max_bytes: usize) {
        let _ = self.0.shutdown().await;
        let drain = async {
            let mut buf = [0u8; 4096];
            let mut read = 0;
            while read < max_bytes {
                match self.0.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    }
}
