//! Accepting connections without spinning. When the process runs out of descriptors or
//! memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), `accept()` fails at once and keeps failing while
//! the backlog is full; a loop that retries at once burns a core and writes a log line per
//! try (4.4 CPU-seconds in 5 s and millions of lines, seen under `ulimit -n 64`). Here a
//! resource error pauses the loop, growing to a second, and its warnings are aggregated.
use std::{io, net::SocketAddr, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};

use crate::warn_every::WarnEvery;

/// The longest pause after a resource error; a freed descriptor is used within this.
const MAX_PAUSE: Duration = Duration::from_secs(1);
const FIRST_PAUSE: Duration = Duration::from_millis(5);

/// Whether `e` means the process (or the host) is out of a resource, not that one connection
/// went wrong.
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// One listener's accept loop state: what it is called in logs, its error counter, its
/// aggregated warnings.
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    errors: Counter,
    warn: WarnEvery,
}

impl Acceptor {
    /// `errors` counts every failed accept (register it as the caller's metric).
    pub fn new(listener: TcpListener, what: &'static str, errors: Counter) -> Self {
        Acceptor {
            listener,
            what,
            errors,
            warn: WarnEvery::new(Duration::from_secs(10)),
        }
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// The next connection. Errors are counted and warned about (aggregated); resource errors
    /// pause the loop, a connection aborted before its accept does not.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let mut pause = FIRST_PAUSE;
        loop {
            match self.listener.accept().await {
                Ok(x) => return x,
                Err(e) => {
                    self.errors.inc();
                    let what = self.what;
                    if is_resource_error(&e) {
                        self.warn.warn(|more| {
                            tracing::warn!("{what}: accept failed: {e}; pausing up to {MAX_PAUSE:?} between tries (raise the open-file limit, or find what holds the descriptors){more}")
                        });
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                    } else {
                        self.warn
                            .warn(|more| tracing::warn!("{what}: accept failed: {e}{more}"));
                    }
                }
            }
        }
    }
}
