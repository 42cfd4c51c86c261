//! What the dashboard shows, read once a second by one task for every viewer: the cluster
//! map, every queue's shards (where they sit, depth, in flight, dead), its groups, and
//! messages in and out per second from the queues' flow totals.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;
use slotq::Cluster;
use slotq::topology::{Health, Role};

use crate::cmd::queue_reads::{Opened, QueueRead};

/// How much rate history is kept (one point a poll).
pub const HISTORY: Duration = Duration::from_secs(600);
/// Rates are differences over this window: clients write their counts once a second at
/// their own moments, so a one-second difference jitters.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// One whole picture, sent as JSON.
#[derive(Serialize, Default, Clone)]
pub struct Snapshot {
    /// When it was read, ms since the Unix epoch.
    pub at_ms: u64,
    /// The URL the CLI was given (no password: it is shown on the page).
    pub cluster_url: String,
    /// Whether the page may replay, purge, pause and resume.
    pub writes: bool,
    pub masters: Vec<Master>,
    /// Slot ranges no master serves.
    pub uncovered: String,
    pub queues: Vec<QueueView>,
    /// Queues that could not be read this time, with why.
    pub errors: Vec<String>,
    /// How long reading took.
    pub read_seconds: f64,
}

#[derive(Serialize, Clone)]
pub struct Master {
    pub addr: String,
    pub id: String,
    pub health: &'static str,
    pub slots: usize,
    pub ranges: String,
    pub replicas: Vec<Replica>,
}

#[derive(Serialize, Clone)]
pub struct Replica {
    pub addr: String,
    pub health: &'static str,
}

#[derive(Serialize, Clone)]
pub struct QueueView {
    pub name: String,
    /// `at-most-once` or `at-least-once`.
    pub mode: &'static str,
    pub paused: bool,
    pub version: u64,
    pub shards: Vec<ShardView>,
    pub groups: Vec<GroupView>,
    /// Totals of messages stored and taken since the queue was created.
    pub in_total: u64,
    pub out_total: u64,
    /// Messages per second, over the last few seconds (absent until two reads).
    pub in_rate: Option<f64>,
    pub out_rate: Option<f64>,
    /// `[ms since epoch, in per second, out per second]`, oldest first.
    pub history: Vec<(u64, f64, f64)>,
}

#[derive(Serialize, Clone)]
pub struct ShardView {
    pub tag: String,
    pub slot: u16,
    pub node: String,
    pub state: String,
    pub depth: u64,
    pub in_flight: Option<u64>,
    pub delayed: Option<u64>,
    pub dead: Option<u64>,
    pub scheduled: u64,
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct GroupView {
    pub name: String,
    pub mode: String,
    pub lag: u64,
    pub members: Vec<MemberView>,
}

#[derive(Serialize, Clone)]
pub struct MemberView {
    pub id: String,
    pub shards: Vec<String>,
    pub lag: u64,
    /// Milliseconds until the member's heartbeat lapses.
    pub expires_in_ms: i64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Online => "online",
        Health::Failed => "failed",
        Health::Loading => "loading",
    }
}

/// Flow totals seen, per queue, for rates and their history.
#[derive(Default)]
pub struct Rates {
    samples: HashMap<String, VecDeque<(Instant, u64, u64, u64)>>,
    history: HashMap<String, VecDeque<(u64, f64, f64)>>,
}

impl Rates {
    /// Records totals read at `at` (`at_ms` on the wall clock); the queue's rates now.
    fn record(
        &mut self,
        queue: &str,
        at: Instant,
        at_ms: u64,
        totals: (u64, u64),
    ) -> Option<(f64, f64)> {
        let samples = self.samples.entry(queue.to_string()).or_default();
        samples.push_back((at, at_ms, totals.0, totals.1));
        while samples
            .front()
            .is_some_and(|s| at.duration_since(s.0) > RATE_WINDOW)
        {
            samples.pop_front();
        }
        let first = samples.front()?;
        let dt = at.duration_since(first.0).as_secs_f64();
        if dt < 0.5 {
            return None;
        }
        // Totals only grow; a queue deleted and created again starts over (clamped).
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / dt;
        let r = (rate(totals.0, first.2), rate(totals.1, first.3));
        let history = self.history.entry(queue.to_string()).or_default();
        history.push_back((at_ms, r.0, r.1));
        while history
            .front()
            .is_some_and(|h| at_ms.saturating_sub(h.0) > HISTORY.as_millis() as u64)
        {
            history.pop_front();
        }
        Some(r)
    }

    fn history(&self, queue: &str) -> Vec<(u64, f64, f64)> {
        self.history
            .get(queue)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets queues no longer there.
    fn keep_only(&mut self, names: &[String]) {
        self.samples.retain(|k, _| names.contains(k));
        self.history.retain(|k, _| names.contains(k));
    }
}

/// Reads the whole picture.
pub async fn read(
    cluster: &Cluster,
    opened: &mut Opened,
    names: &[String],
    rates: &mut Rates,
    writes: bool,
) -> Snapshot {
    let started = Instant::now();
    let at_ms = now_ms();
    // The map as the cluster sees it now: health changes show within a poll.
    let topology = match cluster.refresh().await {
        Ok(t) => t,
        Err(_) => cluster.topology(),
    };
    let masters = topology
        .masters()
        .iter()
        .map(|m| Master {
            addr: m.addr.to_string(),
            id: m.id.clone().unwrap_or_default(),
            health: health(m.health),
            slots: topology.slot_count(&m.addr),
            ranges: crate::output::ranges(&topology.slot_ranges(&m.addr)),
            replicas: topology
                .replicas_of(&m.addr)
                .iter()
                .filter(|r| r.role == Role::Replica)
                .map(|r| Replica {
                    addr: r.addr.to_string(),
                    health: health(r.health),
                })
                .collect(),
        })
        .collect();
    let mut snap = Snapshot {
        at_ms,
        cluster_url: cluster.config().url().to_string(),
        writes,
        masters,
        uncovered: crate::output::ranges(&topology.gaps()),
        ..Snapshot::default()
    };
    for (name, read) in opened.read_all(names).await {
        match read.map(view_of) {
            Ok(mut view) => {
                let r = rates.record(
                    &name,
                    Instant::now(),
                    at_ms,
                    (view.in_total, view.out_total),
                );
                view.in_rate = r.map(|r| r.0);
                view.out_rate = r.map(|r| r.1);
                view.history = rates.history(&name);
                snap.queues.push(view);
            }
            Err(e) => snap.errors.push(format!("{name}: {e}")),
        }
    }
    rates.keep_only(names);
    snap.read_seconds = started.elapsed().as_secs_f64();
    snap
}

fn view_of(read: QueueRead) -> QueueView {
    let q = &read.queue;
    let groups = read
        .groups
        .iter()
        .map(|(g, st)| {
            let lag_of = |shards: &[String]| -> u64 {
                st.shards
                    .iter()
                    .filter(|s| shards.contains(&s.tag))
                    .map(|s| s.depth)
                    .sum()
            };
            GroupView {
                name: g.clone(),
                mode: st.mode.clone(),
                lag: st.shards.iter().map(|s| s.depth).sum(),
                members: st
                    .members
                    .iter()
                    .map(|m| MemberView {
                        id: m.id.clone(),
                        lag: lag_of(&m.shards),
                        shards: m.shards.clone(),
                        expires_in_ms: m.expires_in_ms,
                    })
                    .collect(),
            }
        })
        .collect();
    QueueView {
        name: q.name().to_string(),
        mode: if q.mode() == slotq::DeliveryMode::AtMostOnce {
            "at-most-once"
        } else {
            "at-least-once"
        },
        paused: q.is_paused(),
        version: q.shards().version,
        shards: read
            .stats
            .iter()
            .map(|s| ShardView {
                tag: s.tag.clone(),
                slot: s.slot,
                node: s.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                state: format!("{:?}", s.state).to_lowercase(),
                depth: s.depth,
                in_flight: s.in_flight,
                delayed: s.delayed,
                dead: s.dead,
                scheduled: s.scheduled,
                oldest_age_seconds: s.oldest_age.map(|a| a.as_secs_f64()),
            })
            .collect(),
        groups,
        in_total: read.flow.pushed,
        out_total: read.flow.popped,
        in_rate: None,
        out_rate: None,
        history: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_the_window() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        assert_eq!(r.record("q", t0, 0, (0, 0)), None);
        let got = r.record("q", t0 + Duration::from_secs(2), 2000, (2000, 1000));
        assert_eq!(got, Some((1000.0, 500.0)));
        // Ten seconds on, the first sample left the window.
        let got = r.record("q", t0 + Duration::from_secs(10), 10_000, (4000, 3000));
        assert_eq!(got, None);
        let got = r.record("q", t0 + Duration::from_secs(12), 12_000, (4000, 5000));
        assert_eq!(got, Some((0.0, 1000.0)));
        assert_eq!(r.history("q").len(), 2);
        r.keep_only(&[]);
        assert!(r.history("q").is_empty());
    }
}
