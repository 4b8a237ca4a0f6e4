//! `tunnel token ...` and `tunnel ca ...`: run on a master, against the server's --ca-dir.
use std::{path::PathBuf, time::Duration};

use clap::Subcommand;
use tunnel::pki::{ca::CaDir, token::TokenStore};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a single-use bootstrap token for one node; prints it (store it nowhere else).
    Create {
        /// The token store (the server's --tokens, by default <ca-dir>/tokens).
        #[arg(long, env = "TUNNEL_TOKENS")]
        tokens: PathBuf,
        /// The node this token may enroll.
        #[arg(long)]
        node: String,
        /// Minutes until the token expires.
        #[arg(long, default_value_t = 60)]
        ttl_minutes: u64,
    },
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create the CA in --ca-dir if there is none (the server also does this on start).
    Init {
        #[arg(long, env = "TUNNEL_CA_DIR")]
        ca_dir: PathBuf,
    },
    /// Start a rotation: a new CA signs new certificates; the old one stays trusted (and signs
    /// the servers' certificate) until `finish-rotation`. Servers reload within seconds;
    /// agents pick up the new bundle when they next renew.
    Rotate {
        #[arg(long, env = "TUNNEL_CA_DIR")]
        ca_dir: PathBuf,
    },
    /// End a rotation once every agent has renewed: the old CA is no longer trusted.
    FinishRotation {
        #[arg(long, env = "TUNNEL_CA_DIR")]
        ca_dir: PathBuf,
    },
}

pub fn token(cmd: TokenCmd) -> Result<(), String> {
    match cmd {
        TokenCmd::Create {
            tokens,
            node,
            ttl_minutes,
        } => {
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

pub fn ca(cmd: CaCmd) -> Result<(), String> {
    let result = match &cmd {
        CaCmd::Init { ca_dir } => CaDir::new(ca_dir).ensure().map(|created| {
            println!(
                "{} {}",
                if created { "created" } else { "already present:" },
                ca_dir.join("ca.crt").display()
            )
        }),
        CaCmd::Rotate { ca_dir } => CaDir::new(ca_dir).rotate().map(|()| {
            println!("rotation started: new CA in {}; the previous one stays trusted until `tunnel ca finish-rotation`", ca_dir.display())
        }),
        CaCmd::FinishRotation { ca_dir } => CaDir::new(ca_dir)
            .finish_rotation()
            .map(|()| println!("rotation finished: only {} is trusted", ca_dir.join("ca.crt").display())),
    };
    result.map_err(|e| e.to_string())
}
