//! The entry point: a connected router plus the queue API on top of it.

use crate::cluster::Cluster;
use crate::config::ClusterConfig;
use crate::error::Result;
use crate::queue::QueueBuilder;

/// A connection to a cluster (or standalone server) from which queues are opened.
#[derive(Clone, Debug)]
pub struct Client {
    cluster: Cluster,
}

impl Client {
    /// Connects with the given settings.
    pub async fn connect(config: ClusterConfig) -> Result<Client> {
        Ok(Client {
            cluster: Cluster::connect(config).await?,
        })
    }

    /// Connects to `url` with default settings.
    pub async fn open(url: &str) -> Result<Client> {
        Self::connect(ClusterConfig::from_url(url)?).await
    }

    /// Wraps an existing router.
    pub fn from_cluster(cluster: Cluster) -> Client {
        Client { cluster }
    }

    /// The router underneath.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Starts opening the queue `name` (validated when opened).
    pub fn queue(&self, name: &str) -> QueueBuilder {
        QueueBuilder::new(self.cluster.clone(), name)
    }
}
