//! A consumer's side of its group: joining, the shards it may sweep and block on, and, in
//! ordered groups, letting go of a shard only once its work there is settled.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::Message;
use crate::error::Result;
use crate::group::{GroupConfig, Membership, View};
use crate::lease::Lease;
use crate::queue::Queue;

pub(super) struct Grouped {
    pub(super) cfg: GroupConfig,
    member: Option<Membership>,
    /// The join in progress: a task, so that a cancelled `recv` neither loses a membership
    /// that the server already counts (it would hold shards until it lapsed) nor joins
    /// twice; a consumer dropped while joining leaves as soon as the join ends.
    joining: Option<JoinHandle<Result<Membership>>>,
    view: Arc<View>,
    /// The shards this member may pop: the view's, less those whose fence refused the
    /// grant the view holds (until the group grants them anew).
    owned: BTreeSet<String>,
    /// Shards whose fence refused this member, by the epoch it presented.
    lost: HashMap<String, u64>,
    /// Ordered, at-least-once: leases handed out per shard, until settled or expired.
    handed: HashMap<Arc<str>, Vec<Arc<Lease>>>,
    /// Shards whose buffered messages are being given back.
    returning: HashMap<String, Vec<JoinHandle<()>>>,
}

impl Grouped {
    pub(super) fn new(cfg: GroupConfig) -> Grouped {
        Grouped {
            cfg,
            member: None,
            joining: None,
            view: Arc::new(View::default()),
            owned: BTreeSet::new(),
            lost: HashMap::new(),
            handed: HashMap::new(),
            returning: HashMap::new(),
        }
    }

    /// Joins on first use (one heartbeat, so the consumer knows its shards at once).
    pub(super) async fn ensure_joined(&mut self, queue: &Queue, lease: Duration) -> Result<()> {
        if self.member.is_some() {
            return Ok(());
        }
        let joining = self.joining.get_or_insert_with(|| {
            let (queue, cfg) = (queue.clone(), self.cfg.clone());
            let script = queue.group_script();
            tokio::spawn(async move { Membership::join(queue, cfg, script, lease).await })
        });
        let joined = joining.await;
        self.joining = None;
        let m = joined.map_err(|e| crate::error::Error::Protocol(format!("group join: {e}")))??;
        self.member = Some(m);
        Ok(())
    }

    /// Takes the latest view; returns it when it changed.
    pub(super) fn refresh(&mut self) -> Option<Arc<View>> {
        let m = self.member.as_mut()?;
        // Compared by pointer: `changed()` may already have marked the value seen.
        let v = m.view.borrow_and_update().clone();
        if Arc::ptr_eq(&v, &self.view) {
            return None;
        }
        self.view = v.clone();
        self.lost
            .retain(|tag, epoch| v.epochs.get(tag) == Some(epoch));
        self.owned = v
            .owned
            .iter()
            .filter(|t| !self.lost.contains_key(*t))
            .cloned()
            .collect();
        Some(v)
    }

    /// Whether a newer view arrived than the one in hand (taken by the next `refresh`).
    pub(super) fn view_pending(&self) -> bool {
        self.member
            .as_ref()
            .is_some_and(|m| !Arc::ptr_eq(&m.view.borrow(), &self.view))
    }

    /// Ordered: the epoch of this member's grant of a shard, to present to its fence.
    pub(super) fn epoch_of(&self, tag: &str) -> Option<u64> {
        if !self.cfg.ordered {
            return None;
        }
        self.view.epochs.get(tag).copied()
    }

    /// A pop of the shard was refused by its fence: another member was granted it later.
    /// The shard is dropped until the group grants it again; the next heartbeat says so,
    /// at once, with the fence found (see `group_beat.lua`).
    pub(super) fn fenced(&mut self, tag: &str, fence: u64) {
        if let Some(&epoch) = self.view.epochs.get(tag) {
            self.lost.insert(tag.to_string(), epoch);
        }
        self.owned.remove(tag);
        if let Some(m) = &self.member {
            m.report
                .lock()
                .unwrap()
                .refused
                .insert(tag.to_string(), fence);
            m.poke.notify_one();
        }
    }

    /// Ordered: whether a message was taken under the grant of its shard this member
    /// holds now (owned, same epoch).
    pub(super) fn holds(&self, m: &super::Message) -> bool {
        self.owned.contains(&*m.shard) && m.epoch == self.epoch_of(&m.shard)
    }

    /// Ordered: whether this member can still be sure it is a member: until a fifth of the
    /// member timeout before its membership could lapse on the server, counted from the
    /// send of its last successful heartbeat. A member that cannot renew (paused, cut off
    /// from the registry's master) stops handing out messages before another member can be
    /// given its shards.
    pub(super) fn valid(&self) -> bool {
        match &self.member {
            Some(m) => *m.valid.borrow() > Instant::now(),
            None => true,
        }
    }

    /// Waits for the next successful heartbeat (pending forever before joining).
    pub(super) async fn renewed(&mut self) {
        match self.member.as_mut() {
            Some(m) => {
                if m.valid.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// Waits until the group's assignment changes (pending forever before joining).
    pub(super) async fn changed(&mut self) {
        match self.member.as_mut() {
            Some(m) => {
                if m.view.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// Shards to sweep: the owned ones, and (unordered, when `steal`) others' deep ones.
    pub(super) fn sweep_set(&self, steal: bool) -> BTreeSet<String> {
        let mut s = self.owned.clone();
        if steal && !self.cfg.ordered {
            s.extend(self.view.deep.iter().cloned());
        }
        s
    }

    /// Whether other members report deep shards this one may steal from.
    pub(super) fn may_steal(&self) -> bool {
        !self.cfg.ordered && self.view.deep.iter().any(|t| !self.owned.contains(t))
    }

    /// Shards to block on while idle.
    pub(super) fn owned(&self) -> &BTreeSet<String> {
        &self.owned
    }

    /// Ordered: shards to stop taking now.
    pub(super) fn released(&self) -> &BTreeSet<String> {
        &self.view.released
    }

    /// Ordered: remembers the give-back of a released shard's buffered messages.
    pub(super) fn returning(&mut self, tag: String, task: JoinHandle<()>) {
        self.returning.entry(tag).or_default().push(task);
    }

    /// Ordered: whether messages of the shard are still on their way back (nothing may be
    /// popped from it until they are at its head again).
    pub(super) fn is_returning(&self, tag: &str) -> bool {
        self.cfg.ordered
            && self
                .returning
                .get(tag)
                .is_some_and(|v| v.iter().any(|t| !t.is_finished()))
    }

    /// Ordered, at-least-once: notes the leases of messages handed to the application.
    pub(super) fn handed(&mut self, msgs: &[Message]) {
        if !self.cfg.ordered {
            return;
        }
        for m in msgs {
            if let Some(l) = &m.lease {
                let v = self.handed.entry(m.shard.clone()).or_default();
                if !v.last().is_some_and(|x| Arc::ptr_eq(x, &l.lease)) {
                    v.push(l.lease.clone());
                }
            }
        }
    }

    /// Notes the shards a round swept (their owner's heartbeat measures the rest).
    pub(super) fn swept<'a>(&self, tags: impl Iterator<Item = &'a str>) {
        if let Some(m) = &self.member {
            let now = Instant::now();
            let mut r = m.report.lock().unwrap();
            for t in tags {
                match r.swept.get_mut(t) {
                    Some(at) => *at = now,
                    None => {
                        r.swept.insert(t.to_string(), now);
                    }
                }
            }
        }
    }

    /// One of its shards just came back full: the group hears of it soon (idle members
    /// steal), not at the next regular heartbeat.
    pub(super) fn deep_now(&self) {
        if let Some(m) = &self.member {
            m.poke.notify_one();
        }
    }

    /// Whether the consumer's last sweep found nothing at all. A member that owns no shard
    /// (the group has more members than shards) lives on stealing: when it goes hungry it
    /// beats at once and then ten times as often for a while (see
    /// [`crate::group::HUNGRY_WINDOW`]), so it hears of deep shards soon. A member with
    /// shards of its own keeps its pace: it has work whenever its shards do, and a trickle
    /// that wakes it now and then must not cost ten beats a second.
    pub(super) fn hungry(&self, hungry: bool) {
        let hungry = hungry && self.owned.is_empty();
        if let Some(m) = &self.member {
            let mut r = m.report.lock().unwrap();
            match (hungry, r.hungry_since) {
                (true, None) => {
                    r.hungry_since = Some(Instant::now());
                    m.poke.notify_one();
                }
                (false, Some(_)) => r.hungry_since = None,
                _ => {}
            }
        }
    }

    /// Whether the consumer waits, blocked on its own shards.
    pub(super) fn idle(&self, idle: bool) {
        if let Some(m) = &self.member {
            m.report.lock().unwrap().idle = idle;
        }
    }

    /// Tells the group what this member holds: owned shards, and released ones whose work
    /// is not settled yet.
    pub(super) fn report(&mut self, in_flight: impl Iterator<Item = String>) {
        let now = Instant::now();
        for tasks in self.returning.values_mut() {
            tasks.retain(|t| !t.is_finished());
        }
        self.returning.retain(|_, v| !v.is_empty());
        for leases in self.handed.values_mut() {
            leases.retain(|l| !l.closed.load(Ordering::Relaxed) && l.local_deadline.get() > now);
        }
        self.handed.retain(|_, v| !v.is_empty());
        let Some(m) = &self.member else {
            return;
        };
        let mut held: BTreeSet<String> = self.owned.clone();
        held.extend(in_flight.filter(|t| self.view.released.contains(t)));
        for tag in &self.view.released {
            if self.returning.contains_key(tag) || self.handed.contains_key(tag.as_str()) {
                held.insert(tag.clone());
            }
        }
        m.report.lock().unwrap().held = held;
    }

    /// Leaves the group (after the consumer gave back what it held). The last heartbeat
    /// names only the shards with messages handed out and not settled yet: the others go
    /// to the remaining members at once.
    pub(super) async fn leave(&mut self) {
        for (_, tasks) in self.returning.drain() {
            for t in tasks {
                let _ = t.await;
            }
        }
        let now = Instant::now();
        for leases in self.handed.values_mut() {
            leases.retain(|l| !l.closed.load(Ordering::Relaxed) && l.local_deadline.get() > now);
        }
        self.handed.retain(|_, v| !v.is_empty());
        if let Some(m) = &self.member {
            m.report.lock().unwrap().leaving_held =
                Some(self.handed.keys().map(|t| t.to_string()).collect());
        }
        if let Some(m) = self.member.take() {
            m.leave().await;
        }
    }
}
