//! Slot maps and moving slots: who owns what (as one node or each node sees it), waiting
//! until every node agrees, and migrations (step by step, whole ranges, or with
//! `redis-cli --cluster reshard` as an operator does).

use std::collections::HashMap;
use std::time::Duration;

use crate::cluster::TestCluster;
use crate::{Result, TestkitError, wait_for};

/// Bound on the wait for every node to agree on the slot map. Longer than the others:
/// after thousands of slots moved one by one on a machine loaded by the rest of the
/// suite, agreement took over 30 s in two of three full runs of the suite (each failure names
/// what still disagreed).
pub const STABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Claims of moved slots sent while the cluster does not agree (see `settle_moved`).
const CLAIMS: usize = 3;

/// A slot held mid-migration (MIGRATING on the source, IMPORTING on the target).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The slot.
    pub slot: u16,
    /// Source node index.
    pub from: usize,
    /// Target node index.
    pub to: usize,
}

impl TestCluster {
    /// The index of the master owning `slot` (as a running node sees it).
    pub fn owner_of(&self, slot: u16) -> Option<usize> {
        self.slot_owners()
            .iter()
            .find(|(range, _)| range.0 <= slot && slot <= range.1)
            .map(|(_, &i)| i)
    }

    /// Slot ranges `(start, end)` to master index, from `CLUSTER SLOTS` of a running node.
    pub fn slot_owners(&self) -> HashMap<(u16, u16), usize> {
        (0..self.nodes.len())
            .find_map(|i| self.slot_owners_seen_by(i))
            .unwrap_or_default()
    }

    /// Slot ranges `(start, end)` to master index as node `i` sees them (`None` if it is not
    /// running or does not answer).
    fn slot_owners_seen_by(&self, i: usize) -> Option<HashMap<(u16, u16), usize>> {
        let n = &self.nodes[i];
        n.pid()?;
        let v = n
            .cmd::<Vec<redis::Value>>(redis::cmd("CLUSTER").arg("SLOTS"))
            .ok()?;
        let mut map = HashMap::new();
        for e in v {
            let redis::Value::Array(parts) = e else {
                continue;
            };
            let (
                Some(redis::Value::Int(a)),
                Some(redis::Value::Int(b)),
                Some(redis::Value::Array(m)),
            ) = (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let Some(redis::Value::Int(port)) = m.get(1) else {
                continue;
            };
            if let Some(i) = self.index_of_port(*port as u16) {
                map.insert((*a as u16, *b as u16), i);
            }
        }
        Some(map)
    }

    /// Tells node `i` that `slot` belongs to master `to` (`CLUSTER SETSLOT slot NODE id`).
    fn assign(&self, i: usize, slot: u16, to: usize) -> Result<()> {
        self.setslot(i, slot, "NODE", to)
    }

    /// `CLUSTER SETSLOT slot STATE id-of-node` on node `i` (NODE, IMPORTING, MIGRATING).
    fn setslot(&self, i: usize, slot: u16, state: &str, node: usize) -> Result<()> {
        self.nodes[i].cmd::<()>(
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(&self.ids[node]),
        )
    }

    /// After `slots` moved to node `to`: claims them there and waits until the cluster
    /// agrees, claiming again while it does not. Under the suite's load the receiving node
    /// was once seen, a minute after its claim, holding one moved slot in the source's name
    /// in its own view (older gossip won), and the cluster never agreed on its own.
    fn settle_moved(&self, slots: &[u16], to: usize) -> Result<()> {
        let mut last = Ok(());
        for _ in 0..CLAIMS {
            self.claim(slots, to)?;
            last = self.wait_stable_for(STABLE_TIMEOUT / CLAIMS as u32);
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Makes node `to` hold `slots` in its own view (assigning again any it does not), then
    /// bumps its config epoch, so that its claim wins over older gossip. Under load, the
    /// node a thousand slots had just moved to was seen holding only the first few in its
    /// own view a minute later, while the other nodes agreed it held them all.
    fn claim(&self, slots: &[u16], to: usize) -> Result<()> {
        let view = self.slot_owners_seen_by(to).unwrap_or_default();
        let owner = |s: u16| {
            view.iter()
                .find(|((a, b), _)| (*a..=*b).contains(&s))
                .map(|(_, i)| *i)
        };
        for &s in slots {
            if owner(s) != Some(to) {
                self.assign(to, s, to)?;
            }
        }
        self.nodes[to].cmd::<String>(redis::cmd("CLUSTER").arg("BUMPEPOCH"))?;
        Ok(())
    }

    /// Waits until every running node reports `cluster_state:ok`, knows every running node,
    /// and all running nodes agree on the slot map.
    pub fn wait_stable(&self) -> Result<()> {
        self.wait_stable_for(STABLE_TIMEOUT)
    }

    /// [`wait_stable`](Self::wait_stable), waiting at most `timeout`.
    fn wait_stable_for(&self, timeout: Duration) -> Result<()> {
        // What kept the cluster from agreeing at the last look: the timeout names it.
        let mut last = String::new();
        let agreed = wait_for(
            "cluster_state:ok and one slot map on every node",
            timeout,
            || match self.disagreement() {
                None => Some(()),
                Some(why) => {
                    last = why;
                    None
                }
            },
        );
        agreed.map_err(|e| match e {
            TestkitError::Timeout(what) => TestkitError::Timeout(format!("{what}: {last}")),
            other => other,
        })
    }

    /// Why the running nodes do not agree yet (`None` once every one reports
    /// `cluster_state:ok` and all report the same slot map).
    fn disagreement(&self) -> Option<String> {
        // The first node's port and its map: (first slot, last slot, master port) ranges.
        type Ranges = Vec<(i64, i64, i64)>;
        let mut first: Option<(u16, Ranges)> = None;
        for n in &self.nodes {
            if n.pid().is_none() {
                continue;
            }
            let info: String = match n.cmd(redis::cmd("CLUSTER").arg("INFO")) {
                Ok(i) => i,
                Err(e) => return Some(format!("node {}: CLUSTER INFO: {e}", n.port())),
            };
            if !info.contains("cluster_state:ok") {
                return Some(format!("node {}: not cluster_state:ok", n.port()));
            }
            let v: Vec<redis::Value> = match n.cmd(redis::cmd("CLUSTER").arg("SLOTS")) {
                Ok(v) => v,
                Err(e) => return Some(format!("node {}: CLUSTER SLOTS: {e}", n.port())),
            };
            let mut map: Vec<(i64, i64, i64)> = v
                .iter()
                .filter_map(|e| match e {
                    redis::Value::Array(p) => match (p.first(), p.get(1), p.get(2)) {
                        (
                            Some(redis::Value::Int(a)),
                            Some(redis::Value::Int(b)),
                            Some(redis::Value::Array(m)),
                        ) => match m.get(1) {
                            Some(redis::Value::Int(port)) => Some((*a, *b, *port)),
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            map.sort();
            match &first {
                None => first = Some((n.port(), map)),
                Some((_, f)) if *f == map => {}
                Some((port, f)) => {
                    return Some(format!(
                        "nodes {port} and {} see different slot maps (first slot, last slot, \
                         master port): {f:?} against {map:?}",
                        n.port()
                    ));
                }
            }
        }
        None
    }

    /// Sets `slot` MIGRATING on its owner and IMPORTING on node `to`.
    pub fn begin_migration(&self, slot: u16, to: usize) -> Result<Migration> {
        let from = self
            .owner_of(slot)
            .ok_or_else(|| TestkitError::Setup(format!("slot {slot} has no owner")))?;
        if from == to {
            return Err(TestkitError::Setup(format!(
                "slot {slot} is already on node {to}"
            )));
        }
        self.setslot(to, slot, "IMPORTING", from)?;
        self.setslot(from, slot, "MIGRATING", to)?;
        Ok(Migration { slot, from, to })
    }

    /// Moves up to `count` keys of the migrating slot to the target (MIGRATE); returns how
    /// many were moved.
    pub fn migrate_keys(&self, m: &Migration, count: usize) -> Result<usize> {
        let keys: Vec<Vec<u8>> = self.nodes[m.from].cmd(
            redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(m.slot)
                .arg(count),
        )?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut c = redis::cmd("MIGRATE");
        c.arg(self.nodes[m.to].host())
            .arg(self.nodes[m.to].port())
            .arg("")
            .arg(0)
            .arg(5000);
        if let Some((u, p)) = &self.builder.security.user {
            c.arg("AUTH2").arg(u).arg(p);
        }
        c.arg("KEYS");
        for k in &keys {
            c.arg(k.as_slice());
        }
        self.nodes[m.from].cmd::<()>(&c)?;
        Ok(keys.len())
    }

    /// Moves every remaining key and assigns the slot to the target on every master.
    pub fn finish_migration(&self, m: &Migration) -> Result<()> {
        while self.migrate_keys(m, 1000)? > 0 {}
        let assign = |i: usize| self.assign(i, m.slot, m.to);
        assign(m.to)?;
        assign(m.from)?;
        for i in self.masters() {
            if i != m.to && i != m.from {
                let _ = assign(i);
            }
        }
        Ok(())
    }

    /// Moves one slot with its keys to node `to`.
    pub fn migrate_slot(&self, slot: u16, to: usize) -> Result<()> {
        let m = self.begin_migration(slot, to)?;
        self.finish_migration(&m)
    }

    /// Moves `count` slots (the lowest ones) from master `from` to node `to`, step by step,
    /// then waits until the cluster agrees.
    pub fn reshard(&self, count: usize, from: usize, to: usize) -> Result<()> {
        let slots: Vec<u16> = {
            let owners = self.slot_owners();
            let mut v: Vec<u16> = owners
                .iter()
                .filter(|(_, i)| **i == from)
                .flat_map(|((a, b), _)| *a..=*b)
                .collect();
            v.sort();
            v.truncate(count);
            v
        };
        for &s in &slots {
            self.migrate_slot(s, to)?;
        }
        self.settle_moved(&slots, to)
    }

    /// Moves the given slots (with their keys) to node `to`, one by one, then waits until
    /// the cluster agrees.
    pub fn migrate_slots(&self, slots: &[u16], to: usize) -> Result<()> {
        for &s in slots {
            if self.owner_of(s) != Some(to) {
                self.migrate_slot(s, to)?;
            }
        }
        self.settle_moved(slots, to)
    }

    /// Every slot master `m` owns, ascending.
    pub fn slots_of(&self, m: usize) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .slot_owners()
            .iter()
            .filter(|(_, i)| **i == m)
            .flat_map(|((a, b), _)| *a..=*b)
            .collect();
        v.sort();
        v
    }

    /// Moves `count` slots from master `from` to master `to` with
    /// `redis-cli --cluster reshard` (as an operator would), then waits until the cluster
    /// agrees, claiming the moved slots for `to` again while it does not (see
    /// `settle_moved`: under the suite's load, the receiving node once held the first slot
    /// it had received in the source's name a minute after the reshard).
    pub fn redis_cli_reshard(&self, from: usize, to: usize, count: usize) -> Result<()> {
        // redis-cli moves a single source's slots in ascending order.
        let moved: Vec<u16> = self.slots_of(from).into_iter().take(count).collect();
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["--cluster", "reshard", &self.nodes[to].addr()])
            .args(["--cluster-from", &self.ids[from]])
            .args(["--cluster-to", &self.ids[to]])
            .args(["--cluster-slots", &count.to_string()])
            .arg("--cluster-yes");
        if let Some((u, p)) = &self.builder.security.user {
            cmd.args(["--user", u, "--pass", p]);
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| {
                TestkitError::Setup(format!("redis-cli: {e} (apt-get install redis-tools)"))
            })?;
        if !out.status.success() {
            return Err(TestkitError::Setup(format!(
                "redis-cli --cluster reshard failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        self.settle_moved(&moved, to)
    }
}
