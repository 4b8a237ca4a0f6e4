//! Test client started inside the test cgroup (and a chosen network namespace) by the harness.
//!
//! `probe connect T...`: opens one connection per target, all at once (a barrier holds every
//! connection open until all are connected), then each sends its token line and reads the
//! server's one-line label. Prints a JSON array, one object per target.
//!
//! `probe halfclose T TEXT`: sends TEXT, shuts its sending side down (half-close), and reads
//! until the server closes; prints `{"ok", "reply"}`.
//!
//! `probe first-redirected T --within-ms D`: connects again and again until a connect
//! succeeds (before the kernel redirects T, it is unreachable from here), then reads what the
//! server answers; prints `{"connected", "attempts", "reply" or "error"}`.
//!
//! `probe timed T...`: one target after another, each connect + token line + reply line +
//! close timed; prints `{"us": [...], "replies": [...]}` in target order (failures reply "").
//!
//! `probe loop T --duration-ms D --max N --pause-ms P`: connects, exchanges and closes one
//! connection after another (P ms apart) until D ms or N connections; prints a JSON summary
//! with a count per label and the longest time between two answers (`max_gap_ms`).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Connect {
        targets: Vec<SocketAddr>,
    },
    /// Connects, prints `connected`, waits for a line on stdin, then exchanges its token and
    /// prints the reply (an in-flight connection across some event).
    Hold {
        target: SocketAddr,
    },
    HalfClose {
        target: SocketAddr,
        text: String,
    },
    Timed {
        targets: Vec<SocketAddr>,
    },
    FirstRedirected {
        target: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        within_ms: u64,
    },
    Loop {
        target: SocketAddr,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 100_000)]
        max: u64,
        /// Pause between connections (0: as fast as they go).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
}

/// Connects and returns the stream with its getpeername/getsockname.
fn open(target: SocketAddr) -> std::io::Result<(TcpStream, SocketAddr, SocketAddr)> {
    let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (peer, local) = (s.peer_addr()?, s.local_addr()?);
    Ok((s, peer, local))
}

fn exchange(s: &TcpStream, token: &str) -> std::io::Result<String> {
    (&*s).write_all(format!("{token}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a reply",
        ));
    }
    Ok(line.trim_end().to_owned())
}

fn connect_all(targets: Vec<SocketAddr>) -> serde_json::Value {
    let barrier = Arc::new(Barrier::new(targets.len()));
    let handles: Vec<_> = targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| {
            let barrier = barrier.clone();
            thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let opened = open(target);
                    barrier.wait();
                    let token = format!("t{i}");
                    match opened {
                        Ok((s, peer, local)) => match exchange(&s, &token) {
                            Ok(reply) => json!({"target": target.to_string(), "token": token, "ok": true, "reply": reply, "peer": peer.to_string(), "local": local.to_string()}),
                            Err(e) => json!({"target": target.to_string(), "token": token, "ok": false, "error": e.to_string(), "peer": peer.to_string()}),
                        },
                        Err(e) => json!({"target": target.to_string(), "token": token, "ok": false, "error": e.to_string()}),
                    }
                })
                .expect("spawn client thread")
        })
        .collect();
    serde_json::Value::Array(
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect(),
    )
}

fn run_loop(
    target: SocketAddr,
    duration: Duration,
    max: u64,
    pause: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    // From the start until the first answer counts as a gap too: a path down from the start
    // is the longest gap there is.
    let (mut last_answer, mut max_gap) = (start, Duration::ZERO);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut labels: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < duration && i < max {
        let result = open(target).and_then(|(s, _, _)| exchange(&s, &format!("l{i}")));
        match result {
            Ok(label) => {
                let now = Instant::now();
                max_gap = max_gap.max(now - last_answer);
                last_answer = now;
                ok += 1;
                *labels.entry(label).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("at {} ms: {e}", start.elapsed().as_millis()));
                }
            }
        }
        i += 1;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    max_gap = max_gap.max(last_answer.elapsed());
    json!({"ok": ok, "failed": failed, "labels": labels, "errors": errors,
        "elapsed_ms": start.elapsed().as_millis() as u64, "max_gap_ms": max_gap.as_millis() as u64})
}

fn timed(targets: Vec<SocketAddr>) -> serde_json::Value {
    let (mut us, mut replies) = (Vec::new(), Vec::new());
    for (i, t) in targets.iter().enumerate() {
        let started = Instant::now();
        let reply = open(*t)
            .and_then(|(s, _, _)| exchange(&s, &format!("t{i}")))
            .unwrap_or_default();
        us.push(started.elapsed().as_micros() as u64);
        replies.push(reply);
    }
    json!({"us": us, "replies": replies})
}

fn half_close(target: SocketAddr, text: &str) -> serde_json::Value {
    use std::io::Read;
    let r = open(target).and_then(|(mut s, _, _)| {
        s.write_all(text.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    });
    match r {
        Ok(reply) => json!({"ok": true, "reply": reply}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn first_redirected(target: SocketAddr, within: Duration) -> serde_json::Value {
    use std::io::Read;
    let start = Instant::now();
    let mut attempts = 0u64;
    let mut last = String::new();
    while start.elapsed() < within {
        attempts += 1;
        match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                return match s.read_to_end(&mut buf) {
                    Ok(_) => {
                        json!({"connected": true, "attempts": attempts, "reply": String::from_utf8_lossy(&buf)})
                    }
                    Err(e) => {
                        json!({"connected": true, "attempts": attempts, "error": e.to_string()})
                    }
                };
            }
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(1));
    }
    json!({"connected": false, "attempts": attempts, "error": last})
}

fn hold(target: SocketAddr) -> serde_json::Value {
    let r = open(target).and_then(|(s, _, _)| {
        println!("connected");
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        exchange(&s, "held")
    });
    match r {
        Ok(reply) => json!({"ok": true, "reply": reply}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn main() {
    let out = match Cli::parse().cmd {
        Cmd::Connect { targets } => connect_all(targets),
        Cmd::Loop {
            target,
            duration_ms,
            max,
            pause_ms,
        } => run_loop(
            target,
            Duration::from_millis(duration_ms),
            max,
            Duration::from_millis(pause_ms),
        ),
        Cmd::Hold { target } => hold(target),
        Cmd::HalfClose { target, text } => half_close(target, &text),
        Cmd::Timed { targets } => timed(targets),
        Cmd::FirstRedirected { target, within_ms } => {
            first_redirected(target, Duration::from_millis(within_ms))
        }
    };
    println!("{out}");
}
