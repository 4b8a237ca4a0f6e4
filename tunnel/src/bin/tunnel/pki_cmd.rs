//! `tunnel token ...` and `tunnel ca ...`: run on a master, against the server's --ca-dir.
use std::{path::PathBuf, time::Duration};

use clap::Subcommand;
use tunnel::pki::{ca::CaDir, token::TokenStore};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a single-use bootstrap token for one node; prints it (store it nowhere else).
    #[command(group(clap::ArgGroup::new("store").required(true).args(["tokens", "ca_dir"])))]
    Create {
        /// The token store (the server's --tokens).
        #[arg(long, env = "TUNNEL_TOKENS")]
        tokens: Option<PathBuf>,
        /// The server's --ca-dir: its token store <ca-dir>/tokens, as the server uses it.
        #[arg(long, env = "TUNNEL_CA_DIR")]
        ca_dir: Option<PathBuf>,
        /// The node this token may enroll.
        #[arg(long)]
        node: String,
        /// Minutes until the token expires.
        #[arg(long, default_value_t = 60)]
        ttl_minutes: u64,
    },
}

/// Where the CA is: exactly one of a directory or a Secret.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["ca_dir", "secret"])))]
pub struct CaPlace {
    /// The server's --ca-dir (embedded mode).
    #[arg(long, env = "TUNNEL_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// The server's --ca-secret, `namespace/name` (cluster mode).
    #[arg(long, env = "TUNNEL_CA_SECRET")]
    secret: Option<String>,
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create the CA if there is none (the server also does this on start).
    Init(CaPlace),
    /// Start a rotation: a new CA signs new certificates; the old one stays trusted (and signs
    /// the servers' certificate) until `finish-rotation`. Servers reload on their own; agents
    /// pick up the new bundle when they next renew.
    Rotate(CaPlace),
    /// End a rotation once every agent has renewed: the old CA is no longer trusted.
    FinishRotation(CaPlace),
}

pub fn token(cmd: TokenCmd) -> Result<(), String> {
    match cmd {
        TokenCmd::Create {
            tokens,
            ca_dir,
            node,
            ttl_minutes,
        } => {
            let tokens = match (tokens, ca_dir) {
                (Some(t), _) => t,
                (None, Some(dir)) => dir.join("tokens"),
                (None, None) => unreachable!("clap requires one of --tokens and --ca-dir"),
            };
            if !tunnel::identity::valid_node_name(&node) {
                return Err(format!("{node:?} is not a valid node name"));
            }
            let t = TokenStore::new(&tokens)
                .create(&node, Duration::from_secs(ttl_minutes * 60))
                .map_err(|e| e.to_string())?;
            println!("{t}");
            Ok(())
        }
    }
}

pub async fn ca(cmd: CaCmd) -> Result<(), String> {
    let (place, op): (&CaPlace, fn(&CaDir) -> tunnel::Result<()>) = match &cmd {
        CaCmd::Init(p) => (p, |d| d.ensure().map(drop)),
        CaCmd::Rotate(p) => (p, CaDir::rotate),
        CaCmd::FinishRotation(p) => (p, CaDir::finish_rotation),
    };
    let done = match (&place.ca_dir, &place.secret) {
        (Some(dir), _) => op(&CaDir::new(dir)).map(|()| dir.display().to_string()),
        (None, Some(spec)) => {
            let s = tunnel::run::secret_ca("--secret", spec)
                .await
                .map_err(|e| e.to_string())?;
            if matches!(cmd, CaCmd::Init(_)) {
                s.ensure().await.map(drop)
            } else {
                s.update(op).await
            }
            .map(|()| format!("Secret {spec}"))
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let what = done.map_err(|e| e.to_string())?;
    println!(
        "{}: {what}",
        match cmd {
            CaCmd::Init(_) => "CA present",
            CaCmd::Rotate(_) =>
                "rotation started (the previous CA stays trusted until `tunnel ca finish-rotation`)",
            CaCmd::FinishRotation(_) => "rotation finished (only the current CA is trusted)",
        }
    );
    Ok(())
}
