//! rathole 0.5 (TLS transport), the peer reverse tunnel the benchmarks compare with: its
//! server in the master namespace, its client in the edge namespace dialling the server's
//! control address, one service per local port, each exposed on its own visitor address.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{LoggedProc, Netns, World, spawn};

/// One service rathole carries: edge `local` exposed at master `visit`.
pub struct Service<'a> {
    pub name: &'a str,
    pub visit: SocketAddr,
    pub local: SocketAddr,
}

/// Starts server and client; returns once the first service (which must echo a byte) answers
/// through them.
pub fn start(
    w: &World,
    bin: &Path,
    ctl: SocketAddr,
    services: &[Service],
) -> Result<Vec<LoggedProc>> {
    // rathole's TLS is native-tls: the server needs a PKCS#12 identity.
    let dir = &w.dir;
    let key = dir.join("rh-key.pem");
    let crt = dir.join("rh-cert.pem");
    let pfx = dir.join("rh.pfx");
    let ok = |c: &mut Command| -> Result<()> {
        let o = c.output()?;
        if !o.status.success() {
            bail!("{c:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    ok(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rathole.test",
            "-addext",
            "subjectAltName=DNS:rathole.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt))?;
    ok(Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:bench"])
        .arg("-inkey")
        .arg(&key)
        .arg("-in")
        .arg(&crt)
        .arg("-out")
        .arg(&pfx))?;
    let mut server_toml = format!(
        "[server]\nbind_addr = \"{ctl}\"\n[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n",
        pfx.display()
    );
    let mut client_toml = format!(
        "[client]\nremote_addr = \"{ctl}\"\n[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"rathole.test\"\n",
        crt.display()
    );
    for s in services {
        server_toml.push_str(&format!(
            "[server.services.{}]\ntoken = \"bench-token\"\nbind_addr = \"{}\"\n",
            s.name, s.visit
        ));
        client_toml.push_str(&format!(
            "[client.services.{}]\ntoken = \"bench-token\"\nlocal_addr = \"{}\"\n",
            s.name, s.local
        ));
    }
    let (st, ct) = (
        dir.join("rathole-server.toml"),
        dir.join("rathole-client.toml"),
    );
    fs::write(&st, server_toml)?;
    fs::write(&ct, client_toml)?;
    let spawn_rh = |name: &str, ns: &Netns, cfg: &Path| -> LoggedProc {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg(cfg)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .env("RUST_LOG", "info");
        spawn::place(&mut cmd, None, Some(ns));
        LoggedProc {
            child: cmd.spawn().expect("rathole"),
            log_file: log,
        }
    };
    let server = spawn_rh("rathole-server", &w.master, &st);
    let client = spawn_rh("rathole-client", &w.edge, &ct);
    // Ready when every service's control channel is up: a visitor connection then works.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = {
            let _m = w.master.enter();
            TcpStream::connect(services[0].visit).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            })
        };
        if probe.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "rathole not ready in 20 s:\n{}\n{}",
                server.log(),
                client.log()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(vec![server, client])
}
