//! Local throwaway Redis: real `redis-server` processes on free 127.0.0.1 ports, in
//! temporary directories, stopped when dropped (even when a test panics).
//!
//! - [`Server`]: one process (standalone or cluster node): kill -9, SIGSTOP/SIGCONT,
//!   restart.
//! - [`TestCluster`]: masters + replicas wired into a cluster, waited on until
//!   `cluster_state:ok`; failover, slot migration step by step, resharding, adding and
//!   removing masters.
//! - [`Security`]: TLS (a generated CA) and ACL users.
//!
//! Nothing here talks to any address but 127.0.0.1.

mod cluster;
pub mod dev;
mod ports;
mod server;
mod slots;
mod tls;

pub use cluster::{ClusterBuilder, TestCluster};
pub use server::{Server, ServerBuilder};
pub use slots::Migration;
pub use tls::TlsFiles;

use std::time::Duration;

/// Errors of the testkit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// `redis-server` is not on the PATH.
    #[error(
        "redis-server was not found on PATH; install it (Debian/Ubuntu: `sudo apt-get install -y redis-server redis-tools`, macOS: `brew install redis`)"
    )]
    RedisServerMissing,
    /// A file or process operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A Redis command failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Something did not happen within its deadline.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The cluster could not be set up as asked.
    #[error("{0}")]
    Setup(String),
}

/// Result alias of the testkit.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Credentials and TLS of the servers a builder starts.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// `(username, password)`: an ACL user with all permissions; the default user is off.
    pub user: Option<(String, String)>,
    /// Serve TLS only (generated CA and certificate for 127.0.0.1/localhost).
    pub tls: bool,
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if std::time::Instant::now() >= deadline {
            return Err(TestkitError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `redis-server` can be run.
pub fn redis_server_available() -> bool {
    std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The hash slot of a key (CRC16/XMODEM with hash tags), for choosing keys in tests.
pub fn key_slot(key: &[u8]) -> u16 {
    let k = match key.iter().position(|&b| b == b'{') {
        Some(o) => match key[o + 1..].iter().position(|&b| b == b'}') {
            Some(c) if c > 0 => &key[o + 1..o + 1 + c],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(k) % 16384
}
