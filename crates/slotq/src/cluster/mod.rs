//! The router: one shared connection per node, commands routed by slot, redirects and
//! transient cluster errors handled, every wait bounded by a deadline.
//!
//! - MOVED: the slot's owner is fixed in the map at once, one rate-limited full refresh is
//!   scheduled (single flight), and the command is resent.
//! - ASK: `ASKING` and the command go pipelined on one connection; the map is unchanged.
//! - TRYAGAIN / CLUSTERDOWN / LOADING / MASTERDOWN: pause (doubling) and resend, within the
//!   call's retry budget.
//! - A node that times out or drops the connection is marked down for a backoff and the map
//!   is refreshed. Commands that may have run are not resent unless the caller says they
//!   are idempotent ([`RequestOpts::idempotent`]); commands that were never sent are.

mod command;
mod conn;
#[cfg(test)]
mod fake_node;
mod node;
mod refresh;
mod reply;
mod resp;
mod route;
#[cfg(test)]
mod router_tests;
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Value};
use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::error::{Error, Result};
use crate::slot::{Slot, key_slot};
use crate::topology::{NodeAddr, Topology};

pub(crate) use command::{Command, push_bulk, push_bulk_header};
pub(crate) use conn::Conn;
use conn::Dialer;
use node::NodePool;
use refresh::RefreshState;
pub(crate) use resp::Reply;
pub(crate) use route::Served;
#[cfg(test)]
pub(crate) use wire::Wire;

/// Deadlines and retry policy for one call.
#[derive(Debug, Clone, Copy)]
pub struct RequestOpts {
    /// Longest wait for the reply of one attempt.
    pub timeout: Duration,
    /// How long the call may keep retrying errors that are safe to retry; zero fails fast.
    pub retry_budget: Duration,
    /// The command may be resent after a timeout or a broken connection (it is harmless to
    /// apply twice).
    pub idempotent: bool,
    /// Send on the node's second connection, kept for commands that may hold a connection
    /// for a while (`WAIT`), so that they never delay the shared one. A timeout there does
    /// not mark the node down: waiting is what that connection is for.
    pub isolated: bool,
    /// The commands of the batch are one unit (all in one slot): they always go out
    /// together, in order, on one connection, and when one of them is redirected or must be
    /// retried, all of them are sent again. `WAIT` behind a write needs this: it counts the
    /// replicas that have that connection's writes, so it must run where the write ran.
    pub together: bool,
}

/// Counters of routing events since the router was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// MOVED replies followed.
    pub moved: u64,
    /// ASK replies followed.
    pub asked: u64,
    /// TRYAGAIN / CLUSTERDOWN / LOADING / MASTERDOWN replies retried.
    pub busy: u64,
    /// Full slot-map refreshes completed.
    pub refreshes: u64,
    /// Times a node was marked down.
    pub nodes_marked_down: u64,
}

#[derive(Default)]
struct Counters {
    moved: AtomicU64,
    asked: AtomicU64,
    busy: AtomicU64,
    refreshes: AtomicU64,
    nodes_marked_down: AtomicU64,
}

/// A clone-able handle to a cluster (or standalone server) router.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.inner.config.url())
            .field("topology", &self.topology())
            .finish()
    }
}

pub(crate) struct Inner {
    config: ClusterConfig,
    pool: NodePool,
    topology: RwLock<Arc<Topology>>,
    epoch: watch::Sender<u64>,
    refresh: Mutex<RefreshState>,
    counters: Counters,
}

impl Cluster {
    /// Connects to the seed node(s), learns the slot map, and returns the router.
    ///
    /// Fails with [`Error::NotACluster`] on a standalone server when the config requires a
    /// cluster, and with the typed connection error of the last seed tried otherwise.
    pub async fn connect(config: ClusterConfig) -> Result<Cluster> {
        config.validate()?;
        let seed = &config.seeds[0];
        let tls = if config.is_tls() {
            Some(conn::tls_config(config.tls_root_cert.as_deref())?)
        } else {
            None
        };
        let dialer = Dialer {
            tls,
            username: seed.redis_settings().username().map(str::to_string),
            password: seed.redis_settings().password().map(str::to_string),
            connect_timeout: config.connect_timeout,
            source: config.source_address,
        };
        let seeds = config.seed_addrs();
        let placeholder = Topology::from_parts(Vec::new(), &[]);
        let inner = Arc::new(Inner {
            pool: NodePool::new(dialer),
            config,
            topology: RwLock::new(Arc::new(placeholder)),
            epoch: watch::Sender::new(0),
            refresh: Mutex::new(RefreshState::default()),
            counters: Counters::default(),
        });
        let topology = inner.fetch_topology(&seeds).await?;
        if inner.config.require_cluster && topology.is_standalone() {
            return Err(Error::NotACluster {
                node: topology.nodes()[0].addr.clone(),
            });
        }
        inner.install(topology);
        if let Some(every) = inner.config.periodic_refresh {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.request_refresh();
                }
            });
        }
        Ok(Cluster { inner })
    }

    /// The current slot map.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topology()
    }

    /// A receiver that changes whenever a new slot map is installed.
    pub fn topology_changes(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// The settings this router was made with.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Default per-call options from the config (not idempotent).
    pub fn default_opts(&self) -> RequestOpts {
        RequestOpts {
            timeout: self.inner.config.request_timeout,
            retry_budget: self.inner.config.retry_budget,
            idempotent: false,
            isolated: false,
            together: false,
        }
    }

    /// Runs `cmd` on the master serving `slot`, following redirects.
    pub async fn query<T: FromRedisValue>(&self, slot: Slot, cmd: &Cmd) -> Result<T> {
        self.query_with(slot, cmd, self.default_opts()).await
    }

    /// Runs `cmd` on the master serving the slot of `key`.
    pub async fn query_key<T: FromRedisValue>(
        &self,
        key: impl AsRef<[u8]>,
        cmd: &Cmd,
    ) -> Result<T> {
        self.query(key_slot(key), cmd).await
    }

    /// Runs `cmd` on the master serving `slot` with explicit options.
    pub async fn query_with<T: FromRedisValue>(
        &self,
        slot: Slot,
        cmd: &Cmd,
        opts: RequestOpts,
    ) -> Result<T> {
        self.query_owned(slot, cmd.clone(), opts).await
    }

    /// [`Cluster::query_with`], taking the command (a large one is not copied again).
    pub async fn query_owned<T: FromRedisValue>(
        &self,
        slot: Slot,
        cmd: Cmd,
        opts: RequestOpts,
    ) -> Result<T> {
        let mut out = self.batch(vec![(slot, cmd)], opts).await;
        convert(out.pop().expect("one reply per command")?)
    }

    /// Whether `other` is this same router (a clone of it), not merely one with the same
    /// address.
    pub fn same_router(&self, other: &Cluster) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Runs many commands, each on the master of its slot: one pipeline per node, all
    /// nodes at once. Each command gets its own result, in order; a command that was
    /// redirected is resent (to its new node) without disturbing the others.
    pub async fn batch(&self, cmds: Vec<(Slot, Cmd)>, opts: RequestOpts) -> Vec<Result<Value>> {
        let cmds = cmds.into_iter().map(|(s, c)| (s, c.into())).collect();
        self.batch_commands(cmds, opts).await
    }

    /// [`Cluster::batch`] of commands some of which are already RESP ([`Command::Resp`]).
    pub(crate) async fn batch_commands(
        &self,
        cmds: Vec<(Slot, Command)>,
        opts: RequestOpts,
    ) -> Vec<Result<Value>> {
        route::run_batch(&self.inner, cmds, opts, false)
            .await
            .into_iter()
            .map(|r| r.map(Reply::into_value))
            .collect()
    }

    /// [`Cluster::batch`], but replies that are arrays of bulk strings come back as
    /// [`Reply::Items`]: slices of the buffer they were read into, not copies (pops).
    pub(crate) async fn batch_items(
        &self,
        cmds: Vec<(Slot, Cmd)>,
        opts: RequestOpts,
    ) -> Vec<Result<Reply>> {
        let cmds = cmds.into_iter().map(|(s, c)| (s, c.into())).collect();
        route::run_batch(&self.inner, cmds, opts, true).await
    }

    /// [`Cluster::batch_items`] whose effects must survive a failover: each node's
    /// pipeline ends with `WAIT replicas timeout` where the slot map shows the node with
    /// a live replica, and each command that got an answer comes back with the node that
    /// gave it and whether that `WAIT` confirmed it (see `route::run_batch_confirmed`).
    /// Send it with `opts.isolated`: the `WAIT` holds its connection.
    pub(crate) async fn batch_items_confirmed(
        &self,
        cmds: Vec<(Slot, Cmd)>,
        opts: RequestOpts,
        confirm: (u32, Duration),
    ) -> Vec<(Result<Reply>, Option<Served>)> {
        let cmds = cmds.into_iter().map(|(s, c)| (s, c.into())).collect();
        route::run_batch_confirmed(&self.inner, cmds, opts, true, Some(confirm)).await
    }

    /// Runs `cmd` on one particular node, without routing (admin and inspection).
    pub async fn node_query<T: FromRedisValue>(&self, addr: &NodeAddr, cmd: &Cmd) -> Result<T> {
        let v =
            route::run_on_node(&self.inner, addr, cmd, self.inner.config.request_timeout).await?;
        convert(v)
    }

    /// A connection to `addr` of the caller's own (for blocking commands), not shared.
    pub(crate) async fn dedicated_connection(&self, addr: &NodeAddr) -> Result<Conn> {
        self.inner.pool.get(addr).dial().await
    }

    /// Fetches the slot map now and installs it.
    pub async fn refresh(&self) -> Result<Arc<Topology>> {
        self.inner.refresh_topology().await
    }

    /// Asks for a refresh in the background (rate-limited, single flight).
    pub fn request_refresh(&self) {
        self.inner.request_refresh();
    }

    /// Whether the router currently treats `addr` as down.
    pub fn is_node_down(&self, addr: &NodeAddr) -> bool {
        self.inner.is_down(addr)
    }

    /// Routing counters.
    pub fn stats(&self) -> RouterStats {
        let c = &self.inner.counters;
        RouterStats {
            moved: c.moved.load(Ordering::Relaxed),
            asked: c.asked.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            refreshes: c.refreshes.load(Ordering::Relaxed),
            nodes_marked_down: c.nodes_marked_down.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap().clone()
    }

    fn install(&self, t: Topology) {
        let keep: Vec<NodeAddr> = t
            .nodes()
            .iter()
            .map(|n| n.addr.clone())
            .chain(self.config.seed_addrs())
            .collect();
        *self.topology.write().unwrap() = Arc::new(t);
        self.pool.retain(|a| keep.contains(a));
        self.epoch.send_modify(|e| *e += 1);
    }

    /// After a MOVED: `slot` is now served by `to`.
    fn apply_moved(self: &Arc<Self>, slot: Slot, to: &NodeAddr) {
        self.counters.moved.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::REDIRECTS, "kind" => "moved").increment(1);
        {
            let mut guard = self.topology.write().unwrap();
            if guard.owner(slot) != Some(to) {
                *guard = Arc::new(guard.with_slot_owner(slot, to));
            }
        }
        self.epoch.send_modify(|e| *e += 1);
        self.request_refresh();
    }

    fn mark_down(self: &Arc<Self>, addr: &NodeAddr) {
        if let Some(n) = self.pool.existing(addr) {
            n.mark_down(self.config.down_backoff);
        }
        self.counters
            .nodes_marked_down
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::NODE_DOWN, "node" => addr.to_string()).increment(1);
        tracing::warn!(node = %addr, "node marked down");
        self.request_refresh();
    }

    /// Whether to skip `addr`: it failed here recently, or the cluster reports it failed
    /// and no probe is due (a node reported failed may still serve, so one request per
    /// backoff goes through to find out).
    fn is_down(&self, addr: &NodeAddr) -> bool {
        let node = self.pool.existing(addr);
        if node.as_ref().is_some_and(|n| n.is_down()) {
            return true;
        }
        let failed = self
            .topology()
            .node(addr)
            .is_some_and(|n| n.health == crate::topology::Health::Failed);
        failed && !node.is_some_and(|n| n.probe_due(self.config.down_backoff))
    }
}

fn convert<T: FromRedisValue>(v: Value) -> Result<T> {
    redis::from_redis_value(v).map_err(|e| Error::Protocol(e.to_string()))
}
