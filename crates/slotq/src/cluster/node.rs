//! One node: its shared connection (dialled lazily, once) and its health mark.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::conn::{Conn, Dialer};
use crate::error::Result;
use crate::topology::NodeAddr;

/// A node and its connection. Many callers share the one connection; their commands are
/// pipelined on it.
pub(crate) struct Node {
    pub(crate) addr: NodeAddr,
    dialer: Dialer,
    conn: Mutex<Option<Conn>>,
    /// The second shared connection, for commands that may wait (see `RequestOpts::isolated`).
    side: Mutex<Option<Conn>>,
    /// The connection attempt in flight, per connection (shared, side): concurrent
    /// callers all wait for this one attempt and all get its outcome, so K callers of a
    /// node that does not answer wait one connect timeout, not K of them.
    dialling: [Mutex<Option<Dial>>; 2],
    down_until: Mutex<Option<Instant>>,
    last_probe: Mutex<Option<Instant>>,
}

impl Node {
    /// The shared connection, dialled on first use (and again after it broke); `isolated`
    /// picks the second one.
    pub(crate) async fn connection(&self, isolated: bool) -> Result<Conn> {
        let slot = if isolated { &self.side } else { &self.conn };
        if let Some(c) = live(slot) {
            return Ok(c);
        }
        let dialling = &self.dialling[usize::from(isolated)];
        let attempt = {
            let mut d = dialling.lock().unwrap();
            if let Some(c) = live(slot) {
                return Ok(c);
            }
            match &*d {
                Some(a) => a.clone(),
                None => {
                    let (dialer, addr) = (self.dialer.clone(), self.addr.clone());
                    let a = async move { dialer.dial(&addr).await }.boxed().shared();
                    *d = Some(a.clone());
                    a
                }
            }
        };
        let outcome = attempt.clone().await;
        let mut d = dialling.lock().unwrap();
        if d.as_ref().is_some_and(|a| a.ptr_eq(&attempt)) {
            // The first caller back publishes the outcome; later callers dial anew.
            *d = None;
            if let Ok(c) = &outcome {
                *slot.lock().unwrap() = Some(c.clone());
            }
        }
        outcome
    }

    /// A new connection of its own (for blocking commands), not shared with anyone.
    pub(crate) async fn dial(&self) -> Result<Conn> {
        self.dialer.dial(&self.addr).await
    }

    /// Drops the shared connections so that the next caller dials a fresh one.
    pub(crate) fn reset(&self) {
        self.conn.lock().unwrap().take();
        self.side.lock().unwrap().take();
    }

    /// Marks the node down for `backoff` and drops its connection.
    pub(crate) fn mark_down(&self, backoff: Duration) {
        *self.down_until.lock().unwrap() = Some(Instant::now() + backoff);
        self.reset();
    }

    /// For a node the cluster reports failed: whether one request may go through now to see
    /// if it serves anyway (at most one per `every`).
    pub(crate) fn probe_due(&self, every: Duration) -> bool {
        let mut last = self.last_probe.lock().unwrap();
        match *last {
            Some(t) if t.elapsed() < every => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }

    /// Whether the node is inside its down backoff.
    pub(crate) fn is_down(&self) -> bool {
        matches!(*self.down_until.lock().unwrap(), Some(t) if Instant::now() < t)
    }
}

/// One connection attempt, awaited by every caller that needs the connection meanwhile.
type Dial = Shared<BoxFuture<'static, Result<Conn>>>;

fn live(slot: &Mutex<Option<Conn>>) -> Option<Conn> {
    slot.lock()
        .unwrap()
        .as_ref()
        .filter(|c| !c.is_closed())
        .cloned()
}

/// All nodes known to a router, by address.
pub(crate) struct NodePool {
    dialer: Dialer,
    nodes: Mutex<HashMap<NodeAddr, Arc<Node>>>,
}

impl NodePool {
    /// A pool whose connections use `dialer` (credentials, TLS, timeouts).
    pub(crate) fn new(dialer: Dialer) -> Self {
        NodePool {
            dialer,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// The node at `addr`, created (not yet connected) on first use.
    pub(crate) fn get(&self, addr: &NodeAddr) -> Arc<Node> {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(n) = nodes.get(addr) {
            return n.clone();
        }
        let node = Arc::new(Node {
            addr: addr.clone(),
            dialer: self.dialer.clone(),
            conn: Mutex::new(None),
            side: Mutex::new(None),
            dialling: [Mutex::new(None), Mutex::new(None)],
            down_until: Mutex::new(None),
            last_probe: Mutex::new(None),
        });
        nodes.insert(addr.clone(), node.clone());
        node
    }

    /// The node at `addr` if it was ever used.
    pub(crate) fn existing(&self, addr: &NodeAddr) -> Option<Arc<Node>> {
        self.nodes.lock().unwrap().get(addr).cloned()
    }

    /// Forgets every node not in `keep` (closing their connections).
    pub(crate) fn retain(&self, keep: impl Fn(&NodeAddr) -> bool) {
        self.nodes.lock().unwrap().retain(|a, _| keep(a));
    }
}
