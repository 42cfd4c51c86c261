//! One node: its shared multiplexed connection (made lazily, once) and its health mark.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo};

use crate::error::{Error, Result};
use crate::topology::NodeAddr;

/// A node and its connection. Many callers share the one multiplexed connection; their
/// commands are pipelined on it.
pub(crate) struct Node {
    pub(crate) addr: NodeAddr,
    info: ConnectionInfo,
    connect_timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Held while dialling so that concurrent callers wait for one connection attempt.
    dialling: tokio::sync::Mutex<()>,
    down_until: Mutex<Option<Instant>>,
}

impl Node {
    /// The shared connection, dialled on first use.
    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = self.conn.lock().unwrap().clone() {
            return Ok(c);
        }
        let _dialling = self.dialling.lock().await;
        if let Some(c) = self.conn.lock().unwrap().clone() {
            return Ok(c);
        }
        let c = self.dial().await?;
        *self.conn.lock().unwrap() = Some(c.clone());
        Ok(c)
    }

    /// A new connection of its own (for blocking commands), not shared with anyone.
    pub(crate) async fn dial(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.info.clone()).map_err(|e| Error::Connect {
            node: self.addr.clone(),
            reason: e.to_string(),
        })?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        let dial = client.get_multiplexed_async_connection_with_config(&cfg);
        match tokio::time::timeout(self.connect_timeout * 2, dial).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(connect_error(&self.addr, self.is_tls(), &e)),
            Err(_) => Err(Error::Connect {
                node: self.addr.clone(),
                reason: format!("no handshake within {:?}", self.connect_timeout * 2),
            }),
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    /// Drops the shared connection so that the next caller dials a fresh one.
    pub(crate) fn reset(&self) {
        self.conn.lock().unwrap().take();
    }

    /// Marks the node down for `backoff` and drops its connection.
    pub(crate) fn mark_down(&self, backoff: Duration) {
        *self.down_until.lock().unwrap() = Some(Instant::now() + backoff);
        self.reset();
    }

    /// Whether the node is inside its down backoff.
    pub(crate) fn is_down(&self) -> bool {
        matches!(*self.down_until.lock().unwrap(), Some(t) if Instant::now() < t)
    }
}

/// Maps a failure to connect (or to finish the handshake) to a typed error.
pub(crate) fn connect_error(node: &NodeAddr, tls: bool, e: &redis::RedisError) -> Error {
    let text = e.to_string();
    let code = e.code().unwrap_or_default();
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        return Error::Auth {
            node: node.clone(),
            reason: text,
        };
    }
    let lower = text.to_ascii_lowercase();
    if tls
        && !e.is_connection_refusal()
        && (lower.contains("tls")
            || lower.contains("certificate")
            || lower.contains("handshake")
            || lower.contains("corrupt message")
            || lower.contains("invalidcontenttype"))
    {
        return Error::Tls {
            node: node.clone(),
            reason: text,
        };
    }
    let reason = if e.kind() == redis::ErrorKind::Parse {
        format!("the server did not answer in the Redis protocol ({text})")
    } else {
        text
    };
    Error::Connect {
        node: node.clone(),
        reason,
    }
}

/// All nodes known to a router, by address.
pub(crate) struct NodePool {
    base: ConnectionInfo,
    connect_timeout: Duration,
    nodes: Mutex<HashMap<NodeAddr, Arc<Node>>>,
}

impl NodePool {
    /// A pool whose connections copy credentials and TLS settings from `base`.
    pub(crate) fn new(base: ConnectionInfo, connect_timeout: Duration) -> Self {
        NodePool {
            base,
            connect_timeout,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// The node at `addr`, created (not yet connected) on first use.
    pub(crate) fn get(&self, addr: &NodeAddr) -> Arc<Node> {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(n) = nodes.get(addr) {
            return n.clone();
        }
        let conn_addr = match self.base.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: addr.host.clone(),
                port: addr.port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(addr.host.clone(), addr.port),
        };
        let node = Arc::new(Node {
            addr: addr.clone(),
            info: self.base.clone().set_addr(conn_addr),
            connect_timeout: self.connect_timeout,
            conn: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
            down_until: Mutex::new(None),
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
