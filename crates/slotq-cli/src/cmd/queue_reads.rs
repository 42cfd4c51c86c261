//! Reading many queues at once, for the exporter and the dashboard: handles kept open
//! between reads (opening a queue reads its registry and more), every queue's shards in one
//! round per master ([`slotq::queue::stats_many`]), flows and groups read concurrently.

use std::collections::HashMap;

use futures::StreamExt;
use slotq::group::GroupStatus;
use slotq::{Client, Cluster, FlowTotals, Queue, ShardStats};

/// A queue's flow totals and its groups' status.
type FlowAndGroups = (FlowTotals, Vec<(String, GroupStatus)>);

/// Queue reads in flight at once (flows, groups).
const CONCURRENT: usize = 32;

/// What was read of one queue.
pub struct QueueRead {
    pub queue: Queue,
    pub stats: Vec<ShardStats>,
    pub flow: FlowTotals,
    /// Each group and its status.
    pub groups: Vec<(String, GroupStatus)>,
}

/// Queue handles, kept between reads.
pub struct Opened {
    cluster: Cluster,
    handles: HashMap<String, Queue>,
}

impl Opened {
    pub fn new(cluster: &Cluster) -> Opened {
        Opened {
            cluster: cluster.clone(),
            handles: HashMap::new(),
        }
    }

    /// Reads `names`, in order. A queue that cannot be read gets its error; handles of
    /// queues no longer named, or found gone, are dropped.
    pub async fn read_all(
        &mut self,
        names: &[String],
    ) -> Vec<(String, Result<QueueRead, slotq::Error>)> {
        self.handles.retain(|n, _| names.contains(n));
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !self.handles.contains_key(*n))
            .cloned()
            .collect();
        let client = Client::from_cluster(self.cluster.clone());
        let opened: Vec<(String, Result<Queue, slotq::Error>)> = futures::stream::iter(missing)
            .map(move |n| {
                let client = client.clone();
                async move {
                    let q = client.queue(&n).must_exist().open().await;
                    (n, q)
                }
            })
            .buffered(CONCURRENT)
            .collect()
            .await;
        let mut errors: HashMap<String, slotq::Error> = HashMap::new();
        for (n, q) in opened {
            match q {
                Ok(q) => {
                    self.handles.insert(n, q);
                }
                Err(e) => {
                    errors.insert(n, e);
                }
            }
        }
        let open: Vec<Queue> = names
            .iter()
            .filter_map(|n| self.handles.get(n).cloned())
            .collect();
        let stats = slotq::queue::stats_many(&open).await;
        let jobs: Vec<(Queue, bool)> = open
            .iter()
            .cloned()
            .zip(stats.iter().map(Result::is_ok))
            .collect();
        let rest: Vec<Result<FlowAndGroups, slotq::Error>> = futures::stream::iter(jobs)
            .map(|(q, ok)| async move {
                if !ok {
                    return Ok((FlowTotals::default(), Vec::new()));
                }
                let flow = q.flow().await?;
                let mut groups = Vec::new();
                for g in q.groups().await? {
                    let status = q.group_status(&g).await?;
                    groups.push((g, status));
                }
                Ok((flow, groups))
            })
            .buffered(CONCURRENT)
            .collect()
            .await;
        let mut read: HashMap<String, Result<QueueRead, slotq::Error>> = HashMap::new();
        for ((q, st), more) in open.into_iter().zip(stats).zip(rest) {
            let name = q.name().to_string();
            let r = st.and_then(|stats| {
                more.map(|(flow, groups)| QueueRead {
                    queue: q,
                    stats,
                    flow,
                    groups,
                })
            });
            if matches!(r, Err(slotq::Error::QueueNotFound(_))) {
                self.handles.remove(&name);
            }
            read.insert(name, r);
        }
        names
            .iter()
            .map(|n| {
                let r = match errors.remove(n) {
                    Some(e) => Err(e),
                    None => read
                        .remove(n)
                        .unwrap_or_else(|| Err(slotq::Error::QueueNotFound(n.clone()))),
                };
                (n.clone(), r)
            })
            .collect()
    }
}
