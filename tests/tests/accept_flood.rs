//! The internet-facing agent port under a descriptor flood: with the open-file limit at 64 and
//! 200 connections that never say ClientHello, `accept()` fails with EMFILE. The server must
//! pause instead of spinning (before: 4.4 CPU-seconds in 5 s and millions of log lines), keep
//! its log to a line or two, count the failures, and serve again once descriptors are free.
//! Root only.
use std::{os::unix::process::CommandExt, thread, time::Duration};

use redirector_tests::{LoggedProc, RedirectorProc, World, free_addr, pki::TestPki, tunnel_procs};

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn an_emfile_flood_pauses_the_accept_loop_instead_of_spinning_and_logs_a_line_or_two() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let (ingress, ingress6, agents_at, metrics_at) = {
        let _m = w.master.enter();
        (
            free_addr("127.0.0.1"),
            free_addr("[::1]"),
            free_addr("198.51.100.1"),
            free_addr("127.0.0.1"),
        )
    };
    let _redirector = RedirectorProc::start_with_ingresses(&w, ingress, ingress6, &[]);
    let args = tunnel_procs::server_args(
        &pki,
        ingress,
        agents_at,
        metrics_at,
        &w.node_table,
        &w.pin_dir,
    );
    let mut cmd = tunnel_procs::server_command(&w, &args);
    // SAFETY: setrlimit is async-signal-safe; the hard limit too, so the server cannot lift it.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = LoggedProc::start(&w.dir, "tunnel-server", cmd);
    server.wait_log(&["tunnel server ready"]);
    let pid = server.child.id();

    // 200 connections that never speak: the kernel completes them into the backlog, the
    // server accepts until it has no descriptor left.
    let flood: Vec<std::net::TcpStream> = {
        let _m = w.master.enter();
        (0..200)
            .map(|_| std::net::TcpStream::connect(agents_at).unwrap())
            .collect()
    };
    thread::sleep(Duration::from_millis(500));
    let (cpu0, lines0) = (cpu_seconds(pid), server.log().lines().count());
    thread::sleep(Duration::from_secs(5));
    let (cpu, lines) = (
        cpu_seconds(pid) - cpu0,
        server.log().lines().count() - lines0,
    );
    let log = server.log();
    assert!(
        log.contains("agent listener: accept failed") && log.contains("Too many open files"),
        "the flood is reported:\n{log}"
    );
    assert!(cpu < 1.0, "the server spun: {cpu:.2} CPU-seconds in 5 s");
    assert!(lines <= 10, "{lines} log lines in 5 s:\n{log}");
    eprintln!("EMFILE flood: {cpu:.3} CPU-seconds and {lines} log lines in 5 s");

    // Descriptors come back (the silent connections close): the server serves again, and the
    // failures were counted.
    drop(flood);
    let mut metrics = String::new();
    for _ in 0..100 {
        thread::sleep(Duration::from_millis(100));
        let _m = w.master.enter();
        if let Ok(mut s) = std::net::TcpStream::connect(metrics_at) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: t\r\n\r\n");
            metrics.clear();
            if s.read_to_string(&mut metrics).is_ok()
                && metrics.contains("tunnel_server_accept_errors_total")
            {
                break;
            }
        }
    }
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tunnel_server_accept_errors_total{listener=\"agents\"} "))
        .map_or(0, |v| v.trim().parse().unwrap());
    assert!(errors > 0, "accept errors counted:\n{metrics}");
}
