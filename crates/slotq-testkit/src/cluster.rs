//! A cluster of local `redis-server` processes, and the operations tests need on it.

use std::path::PathBuf;
use std::time::Duration;

use crate::server::{Server, ServerBuilder};
use crate::tls::TlsFiles;
use crate::{Result, Security, TestkitError, wait_for};

/// How long cluster-wide changes (meet, slot assignment, failover) may take.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings for a [`TestCluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    masters: usize,
    replicas: usize,
    node_timeout_ms: u64,
    pub(crate) security: Security,
    base_port: Option<u16>,
    dir: Option<PathBuf>,
    own_group: bool,
    /// Node i (from 0) binds 127.0.0.(first + i).
    own_addresses: Option<u8>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            masters: 3,
            replicas: 0,
            node_timeout_ms: 2000,
            security: Security::default(),
            base_port: None,
            dir: None,
            own_group: false,
            own_addresses: None,
        }
    }
}

impl ClusterBuilder {
    /// Three masters, no replicas, 2 s node timeout, free ports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of masters.
    pub fn masters(mut self, n: usize) -> Self {
        self.masters = n;
        self
    }

    /// Replicas per master.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// `cluster-node-timeout` in milliseconds (failure detection time).
    pub fn node_timeout_ms(mut self, ms: u64) -> Self {
        self.node_timeout_ms = ms;
        self
    }

    /// Require an ACL user on every node.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.security.user = Some((name.to_string(), password.to_string()));
        self
    }

    /// TLS on every node, client and bus.
    pub fn tls(mut self) -> Self {
        self.security.tls = true;
        self
    }

    /// Use ports `base, base+1, ...` instead of free random ones.
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = Some(port);
        self
    }

    /// Keep the nodes' files under `dir` (not deleted on drop).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Gives every node a loopback address of its own, 127.0.0.`first`, `first`+1, ...
    /// (bound, sent from and announced), so that a test can cut nodes apart with
    /// firewall rules by address; clients still come from 127.0.0.1.
    pub fn own_addresses(mut self, first: u8) -> Self {
        assert!(first >= 2, "127.0.0.1 is the clients' address");
        self.own_addresses = Some(first);
        self
    }

    /// Run every node in a process group of its own (for clusters that outlive the starter).
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Starts the nodes, assigns slots evenly to the masters, attaches the replicas, and
    /// waits until every node reports `cluster_state:ok` and agrees on the slot map.
    pub fn start(self) -> Result<TestCluster> {
        if self.masters == 0 {
            return Err(TestkitError::Setup(
                "a cluster needs at least one master".into(),
            ));
        }
        if !crate::redis_server_available() {
            return Err(TestkitError::RedisServerMissing);
        }
        let (root, tmp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("slotq-cluster-")
                    .tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let tls_files = if self.security.tls {
            Some(TlsFiles::generate(&root)?)
        } else {
            None
        };
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            ids: Vec::new(),
            builder: self.clone(),
            root,
            tls_files,
            _tmp: tmp,
        };
        let total = self.masters * (1 + self.replicas);
        for i in 0..total {
            cluster.spawn_node(i as u64 + 1)?;
        }
        // Slots: contiguous, even ranges per master.
        for m in 0..self.masters {
            let start = m * 16384 / self.masters;
            let end = (m + 1) * 16384 / self.masters - 1;
            cluster.nodes[m].cmd::<()>(
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(start)
                    .arg(end),
            )?;
        }
        for i in 1..total {
            cluster.meet(i)?;
        }
        cluster.wait_all_known()?;
        for r in 0..self.masters * self.replicas {
            let replica = self.masters + r;
            let master = r % self.masters;
            let id = cluster.ids[master].clone();
            wait_for(
                "replica to accept CLUSTER REPLICATE",
                CLUSTER_TIMEOUT,
                || {
                    cluster.nodes[replica]
                        .cmd::<()>(redis::cmd("CLUSTER").arg("REPLICATE").arg(&id))
                        .ok()
                },
            )?;
        }
        cluster.wait_stable()?;
        for r in self.masters..total {
            cluster.wait_replica_synced(r)?;
        }
        let replicas = self.masters * self.replicas;
        wait_for("every node to see every replica", CLUSTER_TIMEOUT, || {
            cluster
                .nodes
                .iter()
                .all(|n| {
                    n.cmd::<String>(redis::cmd("CLUSTER").arg("NODES"))
                        .map(|s| s.lines().filter(|l| l.contains("slave")).count() == replicas)
                        .unwrap_or(false)
                })
                .then_some(())
        })?;
        Ok(cluster)
    }
}

/// A running local cluster. Node indices are stable for the cluster's life: masters are
/// `0..masters` at start, then replicas; added nodes get the next indices.
#[derive(Debug)]
pub struct TestCluster {
    pub(crate) nodes: Vec<Server>,
    pub(crate) ids: Vec<String>,
    pub(crate) builder: ClusterBuilder,
    root: PathBuf,
    tls_files: Option<TlsFiles>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// Starts a cluster with `masters` masters and `replicas` replicas each.
    pub fn start(masters: usize, replicas: usize) -> Result<TestCluster> {
        ClusterBuilder::new()
            .masters(masters)
            .replicas(replicas)
            .start()
    }

    /// A URL of the first node that runs (any node works as a seed).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.pid().is_some())
            .unwrap_or(&self.nodes[0])
            .url()
    }

    /// The node with this index.
    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }

    /// The node with this index, mutably (to kill, restart).
    pub fn node_mut(&mut self, i: usize) -> &mut Server {
        &mut self.nodes[i]
    }

    /// Number of nodes (masters and replicas, including killed ones).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The cluster node id of node `i`.
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// The index of the node listening on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// The TLS files (TLS clusters only).
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls_files.as_ref()
    }

    /// The directory holding every node's files.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// `cluster-node-timeout` of the nodes.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.builder.node_timeout_ms)
    }

    /// Indices of running nodes that are masters owning slots (as the first running node
    /// sees it).
    pub fn masters(&self) -> Vec<usize> {
        self.slot_owners()
            .values()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The replicas of master `m` (indices).
    pub fn replicas_of(&self, m: usize) -> Vec<usize> {
        let Some(view) = self.any_nodes_view() else {
            return Vec::new();
        };
        view.iter()
            .filter(|l| l.master_id.as_deref() == Some(&self.ids[m]))
            .filter_map(|l| self.ids.iter().position(|id| id == &l.id))
            .collect()
    }

    /// Waits until replica `r` reports `master_link_status:up`.
    pub fn wait_replica_synced(&self, r: usize) -> Result<()> {
        wait_for("replica to sync with its master", CLUSTER_TIMEOUT, || {
            let info: String = self.nodes[r]
                .cmd(redis::cmd("INFO").arg("replication"))
                .ok()?;
            info.contains("master_link_status:up").then_some(())
        })
    }

    /// Kills (kill -9) node `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill()
    }

    /// Restarts node `i` with its old identity and waits until it answers.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart()
    }

    /// SIGSTOP node `i`.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.nodes[i].pause()
    }

    /// SIGCONT node `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.nodes[i].resume()
    }

    /// Waits until some replica of the (killed or paused) master `m` has taken over its
    /// slots; returns the new master's index.
    pub fn wait_for_promotion(&self, m: usize, timeout: Duration) -> Result<usize> {
        let candidates = self.replicas_of_known(m);
        wait_for("a replica to be promoted", timeout, || {
            let owners = self.slot_owners();
            if owners.is_empty() || owners.values().any(|&i| i == m) {
                return None;
            }
            owners.values().copied().find(|i| candidates.contains(i))
        })
    }

    fn replicas_of_known(&self, m: usize) -> Vec<usize> {
        // Replicas configured at start, plus any the cluster lists now.
        let masters = self.builder.masters;
        let mut r: Vec<usize> = (0..masters * self.builder.replicas)
            .filter(|x| m < masters && x % masters == m)
            .map(|x| masters + x)
            .collect();
        r.extend(self.replicas_of(m));
        r
    }

    /// Manual failover: replica `r` takes over from its master (CLUSTER FAILOVER); waits
    /// until `r` is a master and the cluster agrees.
    pub fn failover(&self, r: usize) -> Result<()> {
        self.nodes[r].cmd::<()>(redis::cmd("CLUSTER").arg("FAILOVER"))?;
        wait_for("manual failover", CLUSTER_TIMEOUT, || {
            let role: Vec<redis::Value> = self.nodes[r].cmd(&redis::cmd("ROLE")).ok()?;
            matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
                .then_some(())
        })?;
        self.wait_stable()
    }

    /// Starts a new empty node and joins it to the cluster as a master without slots.
    pub fn add_master(&mut self) -> Result<usize> {
        let epoch = self.highest_epoch() + 1;
        let i = self.spawn_node(epoch)?;
        self.meet(i)?;
        self.wait_all_known()?;
        Ok(i)
    }

    /// Starts a new node and attaches it as a replica of master `m`.
    pub fn add_replica(&mut self, m: usize) -> Result<usize> {
        let i = self.add_master()?;
        let id = self.ids[m].clone();
        wait_for("CLUSTER REPLICATE", CLUSTER_TIMEOUT, || {
            self.nodes[i]
                .cmd::<()>(redis::cmd("CLUSTER").arg("REPLICATE").arg(&id))
                .ok()
        })?;
        self.wait_stable()?;
        Ok(i)
    }

    /// Removes node `i` (which must own no slots): every other node forgets it, then it is
    /// stopped.
    pub fn remove_node(&mut self, i: usize) -> Result<()> {
        if self.slot_owners().values().any(|&o| o == i) {
            return Err(TestkitError::Setup(format!("node {i} still owns slots")));
        }
        let id = self.ids[i].clone();
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].pid().is_some() {
                let _ = self.nodes[j].cmd::<()>(redis::cmd("CLUSTER").arg("FORGET").arg(&id));
            }
        }
        self.nodes[i].kill()?;
        self.wait_stable()
    }

    /// Leaves every process running after this handle is dropped (for a dev cluster);
    /// returns `(port, pid)` per node.
    pub fn detach(mut self) -> Vec<(u16, u32)> {
        self._tmp.take().map(|t| t.keep());
        self.nodes
            .iter_mut()
            .filter_map(|n| {
                let port = n.port();
                n.detach().map(|pid| (port, pid))
            })
            .collect()
    }

    /// The highest `cluster_current_epoch` among the running nodes.
    fn highest_epoch(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .filter_map(|n| n.cmd::<String>(redis::cmd("CLUSTER").arg("INFO")).ok())
            .filter_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("cluster_current_epoch:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .max()
            .unwrap_or(0)
    }

    /// Starts a node that knows no other yet, with its own config epoch `epoch`.
    ///
    /// Every node gets an epoch no other node has (as `redis-cli --cluster create` does).
    /// Left to the cluster, nodes start at 0 and gossip settles collisions among masters
    /// only; a replica can keep the epoch of its own master, and when that is the highest
    /// one, `CLUSTER FAILOVER TAKEOVER` on it claims the slots without bumping it, so the
    /// other nodes never accept the claim (an equal epoch does not win) and the failover
    /// never completes.
    fn spawn_node(&mut self, epoch: u64) -> Result<usize> {
        let i = self.nodes.len();
        let mut b = ServerBuilder {
            cluster: true,
            node_timeout_ms: self.builder.node_timeout_ms,
            security: self.builder.security.clone(),
            tls_files: self.tls_files.clone(),
            own_group: self.builder.own_group,
            ..ServerBuilder::default()
        };
        if let Some(first) = self.builder.own_addresses {
            let last = first as usize + i;
            assert!(last < 255, "no loopback address left for node {i}");
            b = b.host(&format!("127.0.0.{last}"));
        }
        let dir = self.root.join(format!("node{i}"));
        if let Some(base) = self.builder.base_port {
            b = b.port(base + i as u16);
        }
        let server = b.dir(dir).start()?;
        let id: String = server.cmd(redis::cmd("CLUSTER").arg("MYID"))?;
        server.cmd::<()>(redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(epoch))?;
        self.nodes.push(server);
        self.ids.push(id);
        Ok(i)
    }

    fn meet(&self, i: usize) -> Result<()> {
        let (host, port) = (self.nodes[i].host(), self.nodes[i].port());
        // CLUSTER MEET takes the bus port as an optional third argument; the default is
        // port + 10000, which is what a TLS node's bus listens on too.
        self.nodes[0].cmd::<()>(redis::cmd("CLUSTER").arg("MEET").arg(host).arg(port))
    }

    fn wait_all_known(&self) -> Result<()> {
        let running: Vec<&Server> = self.nodes.iter().filter(|n| n.pid().is_some()).collect();
        wait_for("every node to know every other", CLUSTER_TIMEOUT, || {
            for n in &running {
                let nodes: String = n.cmd(redis::cmd("CLUSTER").arg("NODES")).ok()?;
                let known = nodes
                    .lines()
                    .filter(|l| !l.contains("handshake") && !l.contains("noaddr"))
                    .count();
                if known < running.len() {
                    return None;
                }
            }
            Some(())
        })
    }

    fn any_nodes_view(&self) -> Option<Vec<NodeLine>> {
        for n in &self.nodes {
            if n.pid().is_none() {
                continue;
            }
            if let Ok(s) = n.cmd::<String>(redis::cmd("CLUSTER").arg("NODES")) {
                return Some(s.lines().filter_map(NodeLine::parse).collect());
            }
        }
        None
    }
}

/// One line of `CLUSTER NODES`.
struct NodeLine {
    id: String,
    master_id: Option<String>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<NodeLine> {
        let f: Vec<&str> = line.split_whitespace().collect();
        Some(NodeLine {
            id: f.first()?.to_string(),
            master_id: f.get(3).filter(|m| **m != "-").map(|m| m.to_string()),
        })
    }
}
