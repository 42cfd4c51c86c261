//! Learning the slot map: fetching it from some node, and the background refresh that
//! coalesces many requests into one fetch at a time, at most one per interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

use super::Inner;
use super::node::Node;
use crate::error::{Error, Result};
use crate::topology::{Health, NodeAddr, Role, Topology};

/// Nodes asked for the slot map at once (see [`Inner::fetch_topology`]).
const VIEWS_AT_ONCE: usize = 3;

/// What one node says: its slot map, whether it serves (`cluster_state:ok`), and the
/// highest config epoch it has seen (`cluster_current_epoch`).
struct View {
    topology: Topology,
    serving: bool,
    epoch: u64,
}

impl View {
    /// Serving beats not serving; then a higher epoch; a tie keeps the earlier answer.
    fn beats(&self, other: &View) -> bool {
        (self.serving, self.epoch) > (other.serving, other.epoch)
    }
}

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

    /// Fetches the slot map (see [`Inner::fetch_topology`]) and installs it.
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

    /// Asks the candidates for the slot map, [`VIEWS_AT_ONCE`] at a time (nodes in their
    /// down backoff last), and believes the majority: a node that says the cluster is down
    /// for it (`cluster_state:fail`: it lost sight of the majority of masters) counts only
    /// if no node says otherwise, and among the others the one that has seen the highest
    /// config epoch wins. The first node to answer is not trusted alone: a master cut off
    /// from the rest of the cluster serves its old map until it notices (a node timeout),
    /// and a replica promoted on the other side has a higher epoch.
    pub(crate) async fn fetch_topology(&self, candidates: &[NodeAddr]) -> Result<Topology> {
        let (down, up): (Vec<&NodeAddr>, Vec<&NodeAddr>) = candidates
            .iter()
            .partition(|a| self.pool.existing(a).is_some_and(|n| n.is_down()));
        let mut ordered: Vec<NodeAddr> = up.into_iter().chain(down).cloned().collect();
        let mut best: Option<View> = None;
        let mut last_err = None;
        let mut asked = 0;
        while asked < ordered.len() {
            let chunk: Vec<NodeAddr> =
                ordered[asked..(asked + VIEWS_AT_ONCE).min(ordered.len())].to_vec();
            asked += chunk.len();
            let views = futures::future::join_all(
                chunk
                    .iter()
                    .map(|a| async move { self.fetch_view(&self.pool.get(a)).await }),
            )
            .await;
            for (addr, view) in chunk.iter().zip(views) {
                match view {
                    Ok(v) => {
                        if best.as_ref().is_none_or(|b| v.beats(b)) {
                            best = Some(v);
                        }
                    }
                    // Credentials or TLS are wrong for every node alike: say so at once.
                    Err(e @ (Error::Auth { .. } | Error::Tls { .. })) => return Err(e),
                    Err(e) => {
                        tracing::debug!(node = %addr, cause = %e, "no slot map from node");
                        last_err = Some(e);
                    }
                }
            }
            match &best {
                Some(b) if b.serving => break,
                // Only nodes that say the cluster is down for them so far: ask the nodes
                // their maps name too (a seed cut off from the majority still names them).
                Some(b) => {
                    for n in b.topology.nodes() {
                        if !ordered.contains(&n.addr) {
                            ordered.push(n.addr.clone());
                        }
                    }
                }
                None => {}
            }
        }
        if let Some(b) = best {
            return Ok(b.topology);
        }
        Err(last_err.unwrap_or_else(|| Error::Config("no seed node to connect to".into())))
    }

    /// One node's slot map, with what it says of the cluster's state and epoch.
    async fn fetch_view(&self, node: &Node) -> Result<View> {
        let topology = self.fetch_from(node).await?;
        if topology.is_standalone() {
            return Ok(View {
                topology,
                serving: true,
                epoch: 0,
            });
        }
        let info = super::route::send_raw(
            node,
            &redis::cmd("CLUSTER").arg("INFO").clone(),
            self.config.request_timeout,
        )
        .await;
        // A node that does not say (an old server, an error): taken as serving, epoch 0.
        let text = match info {
            Ok(Ok(redis::Value::BulkString(b))) => String::from_utf8_lossy(&b).into_owned(),
            Ok(Ok(redis::Value::VerbatimString { text, .. })) => text,
            _ => String::new(),
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Ok(View {
            topology,
            serving: field("cluster_state") != Some("fail"),
            epoch: field("cluster_current_epoch")
                .and_then(|e| e.parse().ok())
                .unwrap_or(0),
        })
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
