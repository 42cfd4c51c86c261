//! Connection and routing settings, with every default a named constant.
//!
//! [`ClusterConfig::from_url`] checks the URL without contacting anything; the setters
//! take durations and counts, and [`ClusterConfig::validate`] (called by
//! [`crate::Cluster::connect`]) rejects values that cannot work.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::error::{Error, Result};
use crate::topology::NodeAddr;

/// How long to wait for a TCP (and TLS) connection and its handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long one attempt of a request may wait for its reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long one call may keep retrying after errors that are safe to retry (node down
/// before sending, CLUSTERDOWN, TRYAGAIN, LOADING, MASTERDOWN, uncovered slot).
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_millis(3000);
/// Most MOVED/ASK redirects followed for one call.
pub const DEFAULT_MAX_REDIRECTS: u32 = 16;
/// Least time between two full slot-map refreshes.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// How often the slot map is re-read even when nothing went wrong (new replicas, removed
/// nodes, moved slots nobody has touched yet).
pub const DEFAULT_PERIODIC_REFRESH: Duration = Duration::from_secs(10);
/// How long a node that failed is skipped before it is tried again.
pub const DEFAULT_DOWN_BACKOFF: Duration = Duration::from_millis(500);
/// First pause between retries; it doubles up to [`MAX_RETRY_PAUSE`].
pub const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between retries.
pub const MAX_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Settings for a [`crate::Cluster`].
#[derive(Clone)]
pub struct ClusterConfig {
    pub(crate) seeds: Vec<ConnectionInfo>,
    pub(crate) url_shown: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_budget: Duration,
    pub(crate) max_redirects: u32,
    pub(crate) refresh_interval: Duration,
    pub(crate) down_backoff: Duration,
    pub(crate) periodic_refresh: Option<Duration>,
    pub(crate) require_cluster: bool,
    pub(crate) tls_root_cert: Option<Vec<u8>>,
    pub(crate) source_address: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("url", &self.url_shown)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retry_budget", &self.retry_budget)
            .field("max_redirects", &self.max_redirects)
            .field("refresh_interval", &self.refresh_interval)
            .field("down_backoff", &self.down_backoff)
            .field("require_cluster", &self.require_cluster)
            .field("source_address", &self.source_address)
            .finish()
    }
}

impl ClusterConfig {
    /// Settings for the node (any node of the cluster, or a standalone server) at `url`:
    /// `redis://[user[:password]@]host:port` or `rediss://...` for TLS.
    pub fn from_url(url: &str) -> Result<Self> {
        let seed = parse_url(url)?;
        Ok(ClusterConfig {
            seeds: vec![seed],
            url_shown: mask_password(url),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            down_backoff: DEFAULT_DOWN_BACKOFF,
            periodic_refresh: Some(DEFAULT_PERIODIC_REFRESH),
            require_cluster: false,
            tls_root_cert: None,
            source_address: None,
        })
    }

    /// Adds another seed node, tried when the first cannot be reached.
    pub fn seed(mut self, url: &str) -> Result<Self> {
        self.seeds.push(parse_url(url)?);
        Ok(self)
    }

    /// The local address every connection to the cluster is made from (the system picks
    /// one by default): for a host with several addresses whose traffic must leave from
    /// a given one (firewall rules, a dedicated network).
    pub fn source_address(mut self, ip: std::net::IpAddr) -> Self {
        self.source_address = Some(ip);
        self
    }

    /// Deadline for connecting to a node.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Deadline for one attempt of a request.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// How long a call may retry errors that are safe to retry.
    pub fn retry_budget(mut self, d: Duration) -> Self {
        self.retry_budget = d;
        self
    }

    /// Most redirects followed for one call.
    pub fn max_redirects(mut self, n: u32) -> Self {
        self.max_redirects = n;
        self
    }

    /// Least time between two full slot-map refreshes.
    pub fn refresh_interval(mut self, d: Duration) -> Self {
        self.refresh_interval = d;
        self
    }

    /// How long a failing node is skipped before it is tried again.
    pub fn down_backoff(mut self, d: Duration) -> Self {
        self.down_backoff = d;
        self
    }

    /// Re-read the slot map this often even without errors; `None` turns it off.
    pub fn periodic_refresh(mut self, every: Option<Duration>) -> Self {
        self.periodic_refresh = every;
        self
    }

    /// Refuse standalone servers: [`crate::Cluster::connect`] fails with
    /// [`Error::NotACluster`].
    pub fn require_cluster(mut self, yes: bool) -> Self {
        self.require_cluster = yes;
        self
    }

    /// Trust this PEM root certificate for `rediss://` connections (in addition to none:
    /// without it the platform's roots are used).
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// The URL these settings were made from, password masked.
    pub fn url(&self) -> &str {
        &self.url_shown
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.seeds[0].addr(), ConnectionAddr::TcpTls { .. })
    }

    /// The request deadline per attempt.
    pub fn request_timeout_value(&self) -> Duration {
        self.request_timeout
    }

    /// The retry budget per call.
    pub fn retry_budget_value(&self) -> Duration {
        self.retry_budget
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
        }
        if self.max_redirects == 0 {
            return Err(Error::Config("max_redirects must be at least 1".into()));
        }
        Ok(())
    }

    pub(crate) fn seed_addrs(&self) -> Vec<NodeAddr> {
        self.seeds
            .iter()
            .filter_map(|s| addr_of(s.addr()))
            .collect()
    }
}

pub(crate) fn addr_of(a: &ConnectionAddr) -> Option<NodeAddr> {
    match a {
        ConnectionAddr::Tcp(h, p) => Some(NodeAddr::new(h.clone(), *p)),
        ConnectionAddr::TcpTls { host, port, .. } => Some(NodeAddr::new(host.clone(), *port)),
        _ => None,
    }
}

fn parse_url(url: &str) -> Result<ConnectionInfo> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: mask_password(url),
        reason: reason.to_string(),
    };
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis") | Some("rediss") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "scheme {other:?} is not supported; use redis:// or rediss:// (TLS)"
            )));
        }
        None => return Err(invalid("expected redis://host:port or rediss://host:port")),
    }
    let info = url
        .into_connection_info()
        .map_err(|e| invalid(&e.to_string()))?;
    match info.addr() {
        ConnectionAddr::Tcp(h, _) | ConnectionAddr::TcpTls { host: h, .. } if !h.is_empty() => {
            Ok(info)
        }
        _ => Err(invalid("no host")),
    }
}

/// Replaces the password of a URL with `***` for display.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((cred, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match cred.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_redis_urls() {
        let c = ClusterConfig::from_url("redis://127.0.0.1:7000").unwrap();
        assert!(!c.is_tls());
        assert_eq!(c.seed_addrs(), vec![NodeAddr::new("127.0.0.1", 7000)]);
        let t = ClusterConfig::from_url("rediss://u:secret@localhost:7100").unwrap();
        assert!(t.is_tls());
        assert_eq!(t.url(), "rediss://u:***@localhost:7100");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn rejects_non_redis_urls() {
        for url in [
            "http://127.0.0.1:7000",
            "127.0.0.1:7000",
            "redis://",
            "ftp://x:1",
        ] {
            let err = ClusterConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
        }
        let err = ClusterConfig::from_url("http://u:pw@h:1").unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn rejects_zero_timeouts() {
        let c = ClusterConfig::from_url("redis://h:1")
            .unwrap()
            .request_timeout(Duration::ZERO);
        assert!(matches!(c.validate(), Err(Error::Config(_))));
    }
}
