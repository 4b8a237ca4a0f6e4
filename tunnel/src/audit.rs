//! The per-stream audit trail (`tunnel server --audit-log FILE`, `-` for stdout; off by
//! default): one JSON line per redirected connection once it ends, naming who connected
//! (recorded by the redirector's connect program with `--record-callers`), where to, through
//! which node and replica, the bytes each way, how long, and how it ended.
//!
//! It never holds up the data path: lines go through a bounded queue to a writer thread, and
//! when the sink is slower than the connections (a full disk, a stalled pipe) the lines that do
//! not fit are dropped and counted (`tunnel_server_audit_dropped_total`), never waited for.
use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;
use redirector_common::sockopt::CallerAnswer;
use serde_json::json;

/// Lines waiting for the writer: past this, a slow sink costs lines, not latency.
pub const QUEUE: usize = 1024;

/// Where audit lines go; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<String>,
    replica: std::sync::Arc<str>,
    pub written: Counter,
    pub dropped: Counter,
}

/// One connection's line.
pub struct Record<'a> {
    pub started: SystemTime,
    pub duration: Duration,
    pub caller: Option<CallerAnswer>,
    pub client: SocketAddr,
    pub from_pod: bool,
    pub destination: Option<SocketAddr>,
    pub node: Option<&'a str>,
    /// `closed`, `reset` or `refused`.
    pub outcome: &'static str,
    /// The refusal's label (`no_session`, ...) when refused.
    pub reason: Option<&'static str>,
    pub bytes_to_node: u64,
    pub bytes_from_node: u64,
}

impl Audit {
    /// Opens `target` (a file, appended to, or `-` for stdout) and starts its writer.
    pub fn open(target: &Path, replica: String) -> std::io::Result<Self> {
        let sink: Box<dyn Write + Send> = if target == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(OpenOptions::new().create(true).append(true).open(target)?)
        };
        let (tx, rx) = sync_channel(QUEUE);
        let (written, dropped) = (Counter::default(), Counter::default());
        let (w, d, name) = (
            written.clone(),
            dropped.clone(),
            target.display().to_string(),
        );
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_lines(rx, sink, w, d, name))?;
        Ok(Self {
            tx,
            replica: replica.into(),
            written,
            dropped,
        })
    }

    /// Queues `r`'s line, or counts it dropped if the queue is full.
    pub fn record(&self, r: &Record<'_>) {
        let line = self.line(r);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }

    fn line(&self, r: &Record<'_>) -> String {
        let caller = r.caller.map(|c| {
            let end = c.comm.iter().position(|&b| b == 0).unwrap_or(c.comm.len());
            json!({
                "pid": c.pid,
                "comm": String::from_utf8_lossy(&c.comm[..end]),
                "cgroup_id": c.cgroup_id,
                "netns_cookie": c.netns_cookie,
            })
        });
        let mut line = json!({
            "time": rfc3339(r.started),
            "caller": caller,
            "client": r.client.to_string(),
            "from_pod": r.from_pod,
            "destination": r.destination.map(|d| d.to_string()),
            "node": r.node,
            "port": r.destination.map(|d| d.port()),
            "replica": &*self.replica,
            "bytes_to_node": r.bytes_to_node,
            "bytes_from_node": r.bytes_from_node,
            "duration_ms": (r.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "outcome": r.outcome,
            "reason": r.reason,
        })
        .to_string();
        line.push('\n');
        line
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is empty.
fn write_lines(
    rx: Receiver<String>,
    sink: Box<dyn Write + Send>,
    written: Counter,
    dropped: Counter,
    name: String,
) {
    let mut out = BufWriter::new(sink);
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            match out.write_all(line.as_bytes()) {
                Ok(()) => {
                    written.inc();
                }
                Err(e) => {
                    dropped.inc();
                    if !warned {
                        tracing::warn!(sink = %name, "audit lines cannot be written ({e}); they are dropped and counted (tunnel_server_audit_dropped_total) until the sink takes them again");
                        warned = true;
                    }
                }
            };
            next = rx.try_recv().ok();
        }
        if out.flush().is_ok() {
            warned = false;
        }
    }
}

/// `t` as RFC 3339 UTC with milliseconds (`2026-12-02T10:23:21.123Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day) 12:34:56.789
        assert_eq!(rfc3339(at(951_827_696, 789)), "2000-02-29T12:34:56.789Z");
        // 2026-12-02T10:23:21Z
        assert_eq!(rfc3339(at(1_796_207_001, 5)), "2026-12-02T10:23:21.005Z");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, _rx) = sync_channel(2);
        let a = Audit {
            tx,
            replica: "r".into(),
            written: Counter::default(),
            dropped: Counter::default(),
        };
        let r = Record {
            started: UNIX_EPOCH,
            duration: Duration::from_millis(3),
            caller: None,
            client: "127.0.0.1:5000".parse().unwrap(),
            from_pod: false,
            destination: Some("198.51.100.10:10250".parse().unwrap()),
            node: Some("edge-a"),
            outcome: "closed",
            reason: None,
            bytes_to_node: 1,
            bytes_from_node: 2,
        };
        for _ in 0..5 {
            a.record(&r);
        }
        assert_eq!(a.dropped.get(), 3);
        let line: serde_json::Value = serde_json::from_str(&a.line(&r)).unwrap();
        assert_eq!(line["node"], "edge-a");
        assert_eq!(line["port"], 10250);
        assert_eq!(line["caller"], serde_json::Value::Null);
        assert_eq!(line["duration_ms"], 3.0);
    }
}
