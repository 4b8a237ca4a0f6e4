//! The agent's side of resumable streams (see `tunnel_proto::resume`): a stream the server
//! opened resumable keeps its connection to the local service when its session is lost, and
//! waits up to the resume window for the server to name it on a later session. Only the
//! server that opened a stream knows its 128-bit random ID, and it names it only on sessions
//! of this node (it routes by the certificate's identity), so nobody else can take it over.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use tokio::{net::TcpStream, time::Instant};

use tunnel_proto::{
    relay::{self, End, Leg, Outcome, Up},
    resume::{
        Budget, FlowId, GaugeHeld, Progress, RECEIVED_HEADER, RESUME_HEADER, Received, Resend,
        Retained, keep_for,
    },
    wire::{Refusal, refusal_response},
};

use crate::{AgentConfig, AgentMetrics};

/// A later stream that continues a parked one: its answer still to give, its body, and what
/// the server delivered of this end's bytes.
pub struct Resumed {
    pub respond: SendResponse<Bytes>,
    pub body: RecvStream,
    pub theirs: Received,
    /// The budget of the session it arrived on, which keeps the stream's bytes from now on.
    pub budget: Arc<Budget>,
    /// The stream counted in that session's load while it runs there.
    pub(crate) counted: crate::session::Counted,
}

/// Where a stream's next resume waits for it: one slot (a channel would allocate a block of
/// slots per stream, several KiB for every idle stream).
#[derive(Default)]
pub struct Slot {
    resumed: Mutex<Option<Resumed>>,
    ready: tokio::sync::Notify,
}

impl Slot {
    /// The next resume handed to this stream.
    async fn recv(&self) -> Resumed {
        loop {
            if let Some(r) = self
                .resumed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return r;
            }
            self.ready.notified().await;
        }
    }
}

/// Every resumable stream this agent serves, by ID: where a resume is handed to.
#[derive(Default)]
pub struct Flows(Mutex<HashMap<FlowId, Arc<Slot>>>);

/// A stream's entry in [`Flows`], removed when the stream is done.
struct Registered<'a> {
    flows: &'a Flows,
    id: FlowId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.flows.lock().remove(&self.id);
    }
}

impl Flows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FlowId, Arc<Slot>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` if the ID is taken (never by chance: a server reusing one is not trusted with it).
    fn register(&self, id: FlowId) -> Option<(Registered<'_>, Arc<Slot>)> {
        let mut flows = self.lock();
        if flows.contains_key(&id) {
            return None;
        }
        let slot = Arc::new(Slot::default());
        flows.insert(id, slot.clone());
        Some((Registered { flows: self, id }, slot))
    }

    /// Hands `r` to the stream `id`; gives it back if there is no such stream.
    pub fn hand(&self, id: FlowId, r: Resumed) -> Result<(), Resumed> {
        let Some(slot) = self.lock().get(&id).cloned() else {
            return Err(r);
        };
        let mut resumed = slot.resumed.lock().unwrap_or_else(|p| p.into_inner());
        // One resume at a time: a second before the stream took the first is refused.
        if resumed.is_some() {
            return Err(r);
        }
        *resumed = Some(r);
        drop(resumed);
        slot.ready.notify_one();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a resume's two headers; `None` if either is missing or malformed.
pub fn resume_of(req: &http::Request<RecvStream>) -> Option<(FlowId, Received)> {
    let h = req.headers();
    let id = FlowId::from_header(h, tunnel_proto::resume::RESUME_OF_HEADER)?;
    Some((id, Received::from_headers(h)?))
}

/// The ID a new stream asks to be resumable under, if it does.
pub fn asked(req: &http::Request<RecvStream>) -> Option<FlowId> {
    FlowId::from_header(req.headers(), RESUME_HEADER)
}

/// Serves one stream the server asked to keep resumable under `id`: answers 200 echoing the
/// ID, relays, and when the session is lost waits for the stream's resume (up to the window),
/// then carries on from the server's figure.
pub async fn serve(
    cfg: &AgentConfig,
    stats: &AgentMetrics,
    tcp: TcpStream,
    respond: SendResponse<Bytes>,
    body: RecvStream,
    id: FlowId,
    budget: Arc<Budget>,
) -> Outcome {
    let answer_within = crate::session::ANSWER_WITHIN;
    let Some((registered, next)) = cfg.flows.register(id) else {
        tracing::warn!(stream = %id, "a new stream reuses a resume ID in use: served without resumption");
        let up = Up::Answer {
            respond,
            by: answer_within,
            ok: relay::ok_response(),
        };
        return relay::relay(tcp, up, body).await;
    };
    let p = Progress::new(Some(Retained::new(keep_for(cfg.stream_window), budget)));
    let mut ok = relay::ok_response();
    ok.headers_mut().insert(RESUME_HEADER, id.value());
    let up = Up::Answer {
        respond,
        by: answer_within,
        ok,
    };
    Flow::new(id, tcp, p, (registered, next))
        .run(cfg, stats, Some((up, body)))
        .await
}

/// Takes over a stream another agent process served (see [`crate::handoff`]): parked at once,
/// as if its session had just been lost here.
pub async fn adopt(
    cfg: &AgentConfig,
    stats: &AgentMetrics,
    tcp: TcpStream,
    id: FlowId,
    p: Progress,
) -> Outcome {
    let Some((registered, next)) = cfg.flows.register(id) else {
        tracing::warn!(stream = %id, "a handed-over stream's ID is in use here: reset");
        return reset(&tcp, &p);
    };
    Flow::new(id, tcp, p, (registered, next))
        .run(cfg, stats, None)
        .await
}

/// One resumable connection to a local service, across the streams (legs) it runs on.
struct Flow<'a> {
    id: FlowId,
    tcp: TcpStream,
    p: Progress,
    next: Arc<Slot>,
    _registered: Registered<'a>,
    counted: Option<crate::session::Counted>,
}

impl<'a> Flow<'a> {
    /// The stream `id`, registered in [`Flows`] as `registration`.
    fn new(
        id: FlowId,
        tcp: TcpStream,
        p: Progress,
        (registered, next): (Registered<'a>, Arc<Slot>),
    ) -> Self {
        Flow {
            id,
            tcp,
            p,
            next,
            _registered: registered,
            counted: None,
        }
    }

    /// Runs `first` (none: the stream starts parked), then every resumed leg, until done.
    async fn run(
        mut self,
        cfg: &AgentConfig,
        stats: &AgentMetrics,
        first: Option<(Up, RecvStream)>,
    ) -> Outcome {
        let id = self.id;
        let (mut leg_of, mut resend) = (first, Resend::default());
        loop {
            let pending = match leg_of.take() {
                None => None,
                Some((up, rx)) => {
                    let ended = {
                        let leg = relay::leg(
                            &mut self.tcp,
                            up,
                            async move { Some(rx) },
                            &mut self.p,
                            resend,
                        );
                        tokio::select! {
                            l = leg => Ok(l),
                            // The server saw this stream's session lost before this end did:
                            // the newer stream wins, the old leg is dropped (it is cancel-safe).
                            r = self.next.recv() => Err(Some(r)),
                        }
                    };
                    match ended {
                        Ok(Leg::Done(end)) => return relay::outcome(&self.p, end),
                        Ok(Leg::Lost) if !self.p.resumable() => {
                            stats.resume.fail("unresumable");
                            tracing::warn!(stream = %id, why = ?self.p.sending.unresumable, "session lost; the stream kept too much to resume (--resume-buffer-per-session): reset");
                            return reset(&self.tcp, &self.p);
                        }
                        Ok(Leg::Lost) => {
                            // Stopping for an upgrade: the newer agent on this node takes it.
                            if let Some(to) = cfg.handoff.successor() {
                                return crate::handoff::hand(to, id, self.tcp, self.p, stats);
                            }
                            None
                        }
                        Err(r) => r,
                    }
                }
            };
            // Boxed: its state exists only while parked, not in every running stream's task.
            let parked = Box::pin(park(cfg, stats, id, &mut self.p, &self.next, pending));
            let (tx, rx, rs, counted) = match parked.await {
                Some(x) => x,
                None => return reset(&self.tcp, &self.p),
            };
            (leg_of, resend) = (Some((Up::Open(tx), rx)), rs);
            // Counted in the load of the session it runs on now (its keepalive pings faster).
            self.counted = Some(counted);
        }
    }
}

fn reset(tcp: &TcpStream, p: &Progress) -> Outcome {
    relay::abort(tcp);
    relay::outcome(p, End::Reset)
}

/// Waits for the stream's resume (or takes `first`, one that has arrived), answers it with
/// this end's figure, and gives the new leg's halves and what to send again; `None` once the
/// window passed or the resume cannot be served.
async fn park(
    cfg: &AgentConfig,
    stats: &AgentMetrics,
    id: FlowId,
    p: &mut Progress,
    next: &Slot,
    mut first: Option<Resumed>,
) -> Option<(
    h2::SendStream<Bytes>,
    RecvStream,
    Resend,
    crate::session::Counted,
)> {
    let _parked = GaugeHeld::new(&stats.resume.parked);
    let deadline = Instant::now() + cfg.resume.window;
    tracing::debug!(stream = %id, "session lost; stream parked");
    loop {
        let r = match first.take() {
            Some(r) => r,
            None => match tokio::time::timeout_at(deadline, next.recv()).await {
                Ok(r) => r,
                _ => {
                    stats.resume.fail("window_expired");
                    tracing::warn!(stream = %id, window = ?cfg.resume.window, "no session resumed the stream within --resume-window: reset");
                    return None;
                }
            },
        };
        let Resumed {
            mut respond,
            body,
            theirs,
            budget,
            counted,
        } = r;
        let Some(rs) = p.resend(theirs) else {
            stats.resume.fail("offset");
            tracing::warn!(stream = %id, ?theirs, read = p.sending.read, "the server asked to resume from bytes this end no longer keeps: reset");
            let _ = respond.send_response(refusal_response(Refusal::StreamGone), true);
            return None;
        };
        p.sending.rebind(budget);
        let mut ok = relay::ok_response();
        ok.headers_mut()
            .insert(RECEIVED_HEADER, p.received().value());
        match respond.send_response(ok, false) {
            Ok(tx) => {
                stats.resume.resumed.inc();
                tracing::debug!(stream = %id, ?theirs, "stream resumed");
                return Some((tx, body, rs, counted));
            }
            // That session went too: wait for the next one, within the same window.
            Err(e) => tracing::debug!(stream = %id, "answering the resume failed: {e}"),
        }
    }
}

/// How long a resume may wait for its stream to arrive from an older agent handing it over.
const HANDOFF_ARRIVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers a resume: hands it to its parked stream, or refuses it as gone.
pub(crate) async fn hand_over(
    cfg: &AgentConfig,
    stats: &AgentMetrics,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    budget: Arc<Budget>,
    counted: crate::session::Counted,
) {
    let Some((id, theirs)) = resume_of(&req) else {
        tracing::warn!(headers = ?req.headers(), "a resume without a valid stream ID and figure: refused");
        return crate::session::reject(stats, respond, Refusal::StreamGone);
    };
    let r = Resumed {
        respond,
        body: req.into_body(),
        theirs,
        budget,
        counted,
    };
    let (mut r, deadline) = (r, Instant::now() + HANDOFF_ARRIVAL);
    loop {
        match cfg.flows.hand(id, r) {
            Ok(()) => return,
            Err(back) => r = back,
        }
        // The server may resume before the older agent's hand-over of the stream arrived.
        if !cfg.handoff.receiving() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tracing::info!(stream = %id, "a resume names a stream this agent does not have (its window passed, or the agent restarted): refused");
    crate::session::reject(stats, r.respond, Refusal::StreamGone);
}
