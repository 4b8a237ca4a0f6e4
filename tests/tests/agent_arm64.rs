//! The edge agent as ARM boards run it: the aarch64 `tunnel-agent` (cross-built by
//! `cargo xtask dist`, no eBPF toolchain) under qemu-user in an edge namespace, against the
//! x86_64 redirector and tunnel server. A redirected connection reaches that node's service and
//! its half-close travels end to end. Root only.
use std::{
    io::{Read, Write},
    path::PathBuf,
    process::Command,
};

use redirector_tests::{LoggedProc, World, pki::TestPki, spawn, tunnel_procs};

/// `target/dist/<platform>/<bin>`, as `cargo xtask dist` leaves it (`cargo xtask test` builds
/// it before the tests run).
fn dist_bin(platform: &str, bin: &str) -> PathBuf {
    let target = spawn::workspace_bin("probe")
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory")
        .to_owned();
    let p = target.join("dist").join(platform).join(bin);
    assert!(
        p.exists(),
        "{} not built: run `cargo xtask dist --platform {platform}`",
        p.display()
    );
    p
}

/// The ELF header's machine field: what the binary runs on.
fn elf_machine(bin: &std::path::Path) -> u16 {
    let mut h = [0u8; 20];
    std::fs::File::open(bin)
        .and_then(|mut f| f.read_exact(&mut h))
        .expect("ELF header");
    assert_eq!(&h[..4], b"\x7fELF", "{} is not an ELF file", bin.display());
    u16::from_le_bytes([h[18], h[19]])
}

const EM_AARCH64: u16 = 183;

#[test]
fn the_aarch64_agent_under_qemu_serves_a_redirected_connection_with_half_close() {
    let agent = dist_bin("linux-arm64", "tunnel-agent");
    assert_eq!(elf_machine(&agent), EM_AARCH64, "{}", agent.display());
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &["--ports", "10250,10251"]);

    // edge-a's service on its localhost: answers only once the client's half-close arrived.
    let service = {
        let _in_edge = w.edge.enter();
        std::net::TcpListener::bind("127.0.0.1:10251").expect("edge service")
    };
    let served = std::thread::spawn(move || {
        let (mut c, _) = service.accept().expect("accept");
        let mut got = String::new();
        c.read_to_string(&mut got).expect("read to EOF");
        write!(
            c,
            "aarch64 agent relayed {} bytes then EOF: {got}",
            got.len()
        )
        .expect("reply");
        got
    });

    let args = tunnel_procs::agent_args(
        &pki,
        "edge-a",
        &st.agents_at.to_string(),
        "10250,10251",
        "127.0.0.1",
        "127.0.0.1:0",
    );
    let mut cmd = Command::new("qemu-aarch64-static");
    cmd.args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(&agent)
        .args(&args);
    spawn::place(&mut cmd, None, Some(&w.edge));
    let _agent = LoggedProc::start(&w.dir, "agent-aarch64", cmd);
    st.server.wait_log(&["agent session up", "node=edge-a"]);

    let v = w.probe(
        true,
        None,
        &["half-close", "198.51.100.10:10251", "hello from the master"],
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["reply"], "aarch64 agent relayed 21 bytes then EOF: hello from the master",
        "{v}"
    );
    assert_eq!(served.join().unwrap(), "hello from the master");
}
