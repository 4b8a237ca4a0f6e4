//! Helpers shared by the benchmark binaries: statistics, the iptables DNAT baseline laid out as
//! the iptables-based tunnels do it, and the JSON report.
use std::{
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::Netns;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Filler node addresses from 240.0.0.0/4 (reserved, never routed): map keys and rules only;
/// no packet is ever sent to them.
pub fn filler(i: usize) -> Ipv4Addr {
    let i = i as u32;
    Ipv4Addr::new(240, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// The DNAT layout of yurt-tunnel: one chain per port, a RETURN per node address that must not
/// be tunnelled, then DNAT of everything else to the local tunnel server.
pub fn dnat_rules(n: usize, port: u16) -> String {
    let mut r = String::with_capacity(n * 48 + 512);
    r.push_str("*nat\n:TUNNEL-PORT - [0:0]\n:TUNNEL-PORT-10250 - [0:0]\n");
    r.push_str("-A OUTPUT -p tcp -j TUNNEL-PORT\n-A TUNNEL-PORT -p tcp --dport 10250 -j TUNNEL-PORT-10250\n");
    for i in 1..=n {
        r.push_str(&format!(
            "-A TUNNEL-PORT-10250 -d {}/32 -j RETURN\n",
            filler(i)
        ));
    }
    r.push_str(&format!(
        "-A TUNNEL-PORT-10250 -p tcp -j DNAT --to-destination 127.0.0.1:{port}\nCOMMIT\n"
    ));
    r
}

/// `iptables-<flavour>-restore` of `rules` in `ns`; returns how long it took.
pub fn iptables_restore(ns: &Netns, flavour: &str, rules: &str) -> Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            &format!("iptables-{flavour}-restore"),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("iptables-{flavour}-restore"))?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let st = child.wait()?;
    ensure!(st.success(), "iptables-{flavour}-restore failed");
    Ok(t.elapsed())
}

/// Writes a benchmark's JSON report, creating the directory.
pub fn write_report(out: &Path, report: &serde_json::Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Resident set size of process `pid`, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Removes a benchmark's pins on exit, also on error.
pub struct PinCleanup(pub std::path::PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if let Err(e) = redirector::uninstall::uninstall(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Sends `bytes` on `s` to a discard-and-count service, half-closes, and returns the count
/// the service answers with (8 bytes, big-endian).
pub fn upload_counted(s: &mut std::net::TcpStream, bytes: u64) -> Result<u64> {
    use std::io::{Read, Write};
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut c = [0u8; 8];
    s.read_exact(&mut c)?;
    Ok(u64::from_be_bytes(c))
}
