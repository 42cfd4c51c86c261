//! Learning the slot map: fetching it from some node, and the background refresh that
//! coalesces many requests into one fetch at a time, at most one per interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

use super::Inner;
use super::node::Node;
use crate::error::{Error, Result};
use crate::topology::{Health, NodeAddr, Role, Topology};

/// Single-flight bookkeeping of the background refresh.
#[derive(Default)]
pub(crate) struct RefreshState {
    running: bool,
    again: bool,
    last: Option<Instant>,
}

impl Inner {
    /// Schedules a refresh: starts one unless one is running (then it runs once more when
    /// done); never more often than the configured interval.
    pub(crate) fn request_refresh(self: &Arc<Self>) {
        {
            let mut st = self.refresh.lock().unwrap();
            if st.running {
                st.again = true;
                return;
            }
            st.running = true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.refresh.lock().unwrap().running = false;
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                let wait = {
                    let Some(inner) = weak.upgrade() else { return };
                    let st = inner.refresh.lock().unwrap();
                    st.last
                        .map(|l| {
                            (l + inner.config.refresh_interval)
                                .saturating_duration_since(Instant::now())
                        })
                        .unwrap_or_default()
                };
                tokio::time::sleep(wait).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.refresh_topology().await {
                    tracing::warn!(cause = %e, "slot map refresh failed");
                }
                let mut st = inner.refresh.lock().unwrap();
                st.last = Some(Instant::now());
                if st.again {
                    st.again = false;
                } else {
                    st.running = false;
                    return;
                }
            }
        });
    }

    /// Fetches the slot map from the first node that answers and installs it.
    pub(crate) async fn refresh_topology(&self) -> Result<Arc<Topology>> {
        let current = self.topology();
        // Masters first (they know their own slots best), then replicas, then the seeds.
        // Masters that serve slots first: a master without slots may be on its way out.
        let mut candidates: Vec<NodeAddr> = current
            .masters()
            .into_iter()
            .filter(|n| n.health == Health::Online)
            .map(|n| n.addr.clone())
            .collect();
        candidates.extend(
            current
                .nodes()
                .iter()
                .filter(|n| n.role == Role::Replica && n.health == Health::Online)
                .map(|n| n.addr.clone()),
        );
        candidates.extend(current.nodes().iter().map(|n| n.addr.clone()));
        candidates.extend(self.config.seed_addrs());
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|a| seen.insert(a.clone()));
        let t = self.fetch_topology(&candidates).await?;
        self.install(t);
        self.counters.refreshes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::REFRESHES).increment(1);
        Ok(self.topology())
    }

    /// Asks the candidates in order (nodes in their down backoff last) for the slot map.
    pub(crate) async fn fetch_topology(&self, candidates: &[NodeAddr]) -> Result<Topology> {
        let (down, up): (Vec<&NodeAddr>, Vec<&NodeAddr>) = candidates
            .iter()
            .partition(|a| self.pool.existing(a).is_some_and(|n| n.is_down()));
        let mut last_err = None;
        for addr in up.into_iter().chain(down) {
            let node = self.pool.get(addr);
            match self.fetch_from(&node).await {
                Ok(t) => return Ok(t),
                // Credentials or TLS are wrong for every node alike: say so at once.
                Err(e @ (Error::Auth { .. } | Error::Tls { .. })) => return Err(e),
                Err(e) => {
                    tracing::debug!(node = %addr, cause = %e, "no slot map from node");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Config("no seed node to connect to".into())))
    }

    async fn fetch_from(&self, node: &Node) -> Result<Topology> {
        let timeout = self.config.request_timeout;
        let shards =
            super::route::send_raw(node, &redis::cmd("CLUSTER").arg("SHARDS").clone(), timeout)
                .await?;
        match shards {
            Ok(v) => Topology::from_cluster_shards(&v, self.config.is_tls(), &node.addr),
            Err(e) if mentions(&e, "cluster support disabled") => {
                Ok(Topology::standalone(node.addr.clone()))
            }
            Err(e) if mentions(&e, "unknown subcommand") => {
                let slots = super::route::send_raw(
                    node,
                    &redis::cmd("CLUSTER").arg("SLOTS").clone(),
                    timeout,
                )
                .await?;
                match slots {
                    Ok(v) => Topology::from_cluster_slots(&v, &node.addr),
                    Err(e) => Err(server_error(&node.addr, &e)),
                }
            }
            Err(e) => Err(server_error(&node.addr, &e)),
        }
    }
}

fn mentions(e: &redis::RedisError, what: &str) -> bool {
    e.to_string().to_ascii_lowercase().contains(what)
}

fn server_error(node: &NodeAddr, e: &redis::RedisError) -> Error {
    match super::reply::classify(node, Err(e.clone())) {
        super::reply::Outcome::Failed(err) => err,
        _ => {
            let code = e.code().unwrap_or("ERR");
            Error::Server {
                node: node.clone(),
                kind: crate::server_error::ServerErrorKind::parse(code),
                code: code.to_string(),
                message: e.to_string(),
            }
        }
    }
}
