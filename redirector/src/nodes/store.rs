//! Where tunnel address allocations persist, and the compare-and-swap loop that lets several
//! allocators (redirector replicas on every master) share one pool without handing out an
//! address twice: read the allocations with their version, plan, write only if the version is
//! unchanged, and on a conflict read again and replan.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use rand::Rng;

use super::{
    error::{Result, SyncError},
    pool::{Allocations, Plan, Pool, plan},
};
pub use super::{file_store::FileStore, kube_store::KubeStore};

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// Written; the stored version is now this one.
    Yes(String),
    /// Someone else wrote since our read: read again.
    Conflict,
}

/// Persisted allocations with an opaque version for compare-and-swap.
pub trait AllocationStore {
    /// The allocations and their version ("" when none were ever stored).
    fn load(&self) -> impl Future<Output = Result<(Allocations, String)>> + Send;
    /// Writes `allocations` if the stored version is still `version`.
    fn save(
        &self,
        allocations: &Allocations,
        version: &str,
    ) -> impl Future<Output = Result<Saved>> + Send;

    /// Adds one node's address to `allocations` (what version `version` holds) if the stored
    /// version is still `version`: the new version, or None on a conflict. A store that can
    /// append does so without writing the rest; this one writes everything.
    fn append(
        &self,
        allocations: &Allocations,
        node: &str,
        ip: IpAddr,
        version: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send
    where
        Self: Sync,
    {
        async move {
            let mut after = allocations.clone();
            after.insert(node.to_owned(), ip);
            Ok(match self.save(&after, version).await? {
                Saved::Yes(v) => Some(v),
                Saved::Conflict => None,
            })
        }
    }
}

/// How many conflicts in a row before giving up (each retry rereads; with a handful of
/// replicas a conflict streak this long means something else is rewriting the object).
const MAX_ATTEMPTS: u32 = 32;

/// Reconciles the stored allocations with `wanted` and persists the result; returns the plan
/// and the version stored. `hold`: see [`plan`].
pub async fn allocate<S: AllocationStore>(
    store: &S,
    pool: &Pool,
    wanted: &BTreeSet<String>,
    hold: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(Plan, String)> {
    for attempt in 1..=MAX_ATTEMPTS {
        let (current, version) = store.load().await?;
        let p = plan(&current, wanted, hold, pool);
        if p.allocations == current {
            return Ok((p, version));
        }
        match store.save(&p.allocations, &version).await? {
            Saved::Yes(v) => return Ok((p, v)),
            Saved::Conflict => {
                tracing::debug!(attempt, "tunnel address allocation conflict; rereading");
                // Jitter: racing replicas do not retry in lockstep.
                let ms = rand::rng().random_range(1..=(5 * attempt.min(10)) as u64);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
    Err(SyncError::Contention(MAX_ATTEMPTS))
}

/// The allocations as text ([`edge_model::allocations`]).
pub fn render(a: &Allocations) -> String {
    edge_model::allocations::render(a)
}

/// The inverse of [`render`]; `what` names the source in errors.
pub fn parse(text: &str, what: &str) -> Result<Allocations> {
    edge_model::allocations::parse(text, what).map_err(SyncError::Invalid)
}
