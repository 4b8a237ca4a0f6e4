//! The server's side of resumable streams (see `tunnel_proto::resume`): a redirected
//! connection whose session was lost keeps its client and waits, up to the resume window, for
//! a session of the same node; there it opens a stream naming the parked one and what the
//! server delivered, and carries on from the agent's figure. Sessions are the node's by their
//! certificate, so a stream is only ever resumed by the node it belongs to.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::time::Instant;
use tunnel_proto::resume::{FlowId, GaugeHeld, Progress, Received, Resend};

use super::{Server, open_stream};
use crate::wire;

/// How often a parked stream looks for a session even without a wake-up (a session that came
/// up between its look and its wait, or a stale one still listed).
const RETRY: Duration = Duration::from_secs(1);

impl Server {
    /// Parks the connection of stream `id` (to `port` on `node`) until a session of the node
    /// takes its resume, then gives the new leg's halves and what to send again; `None` (the
    /// connection is to be reset) once the window passed or the agent no longer has it.
    pub(super) async fn resume(
        &self,
        node: &Arc<str>,
        port: u16,
        id: FlowId,
        p: &mut Progress,
    ) -> Option<(SendStream<Bytes>, RecvStream, Resend)> {
        let m = &self.0.stats.resume;
        let _parked = GaugeHeld::new(&m.parked);
        let window = self.0.cfg.resume.window;
        let deadline = Instant::now() + window;
        let wake = self.resume_wake(node);
        tracing::debug!(stream = %id, "session lost; stream parked");
        let r = loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            // Registered before looking: a session that comes up after the look still wakes it.
            notified.as_mut().enable();
            match self.try_resume(node, port, id, p).await {
                Ok(Some(x)) => break Some(x),
                Ok(None) => {}
                Err(why) => {
                    m.fail(why);
                    break None;
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(RETRY) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    m.fail("window_expired");
                    self.warn_aggregated("resume_window", |more| {
                        tracing::warn!(node = %node, port, stream = %id, ?window, "no session of the node came back within --resume-window: the client's connection is reset{more}")
                    });
                    break None;
                }
            }
        };
        self.resume_unwake(node, wake);
        r
    }

    /// One round over the node's sessions: `Ok(None)` if none took the resume (none is up
    /// yet), `Err(reason)` if the agent answered that it cannot.
    async fn try_resume(
        &self,
        node: &Arc<str>,
        port: u16,
        id: FlowId,
        p: &mut Progress,
    ) -> Result<Option<(SendStream<Bytes>, RecvStream, Resend)>, &'static str> {
        let open_timeout = self.0.cfg.open_timeout;
        // Refused by every live session of the node (a restarted agent): final. Refused by
        // one only: another agent of the node (a second pod) may be the one that has it.
        let mut refused = None;
        for candidate in self.candidates(node) {
            let req = wire::resume_request(node, port, id, p.received())
                .expect("a valid node name and port make a valid request");
            let opened =
                tokio::time::timeout(open_timeout, open_stream(vec![candidate], req, false));
            let Ok(Ok((resp, mut tx, budget))) = opened.await else {
                continue; // That session is gone too (the lost one, still listed).
            };
            let r = match tokio::time::timeout(open_timeout, resp).await {
                Ok(Ok(r)) => r,
                _ => continue,
            };
            if r.status() != http::StatusCode::OK {
                refused = Some(wire::refusal_of(&r));
                continue;
            }
            let theirs = Received::from_headers(r.headers());
            let Some(resend) = theirs.and_then(|t| p.resend(t)) else {
                tx.send_reset(Reason::CANCEL);
                self.warn_aggregated("resume_offset", |more| {
                    tracing::warn!(node = %node, port, stream = %id, ?theirs, read = p.sending.read, "the agent asked to resume from bytes this server no longer keeps: the client's connection is reset{more}")
                });
                return Err("offset");
            };
            p.sending.rebind(budget);
            self.0.stats.resume.resumed.inc();
            tracing::debug!(node = %node, stream = %id, ?theirs, "stream resumed");
            return Ok(Some((tx, r.into_body(), resend)));
        }
        if let Some((reason, detail)) = refused {
            self.warn_aggregated("resume_refused", |more| {
                tracing::warn!(node = %node, port, stream = %id, reason = reason.map_or("unknown", |r| r.label()), "the agent cannot resume the stream ({detail}): the client's connection is reset{more}")
            });
            return Err("stream_gone");
        }
        Ok(None)
    }
}
