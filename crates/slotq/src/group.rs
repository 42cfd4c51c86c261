//! Consumer groups: which member of a group owns which shard.
//!
//! Members of a group renew a membership lease in Redis (a heartbeat, `lua/group_beat.lua`)
//! in the queue's registry slot. Each heartbeat also drops members that stopped renewing
//! and recomputes the assignment, atomically: the script is the coordinator, so there is no
//! coordinator process and members never disagree. The assignment gives every shard one
//! owner among the live members, balanced by shard count and sticky (a member keeps its
//! shards unless it has more than its share). A consumer sweeps and blocks only on the
//! shards it owns; idle members of an unordered group steal from shards their owners report
//! deep.
//!
//! Ordered groups hand a shard over in two steps: the old owner is told to release it,
//! stops popping it, gives back what it buffered, and confirms (it leaves the shard out of
//! the shards it reports holding) once every message it handed out from the shard is
//! settled; only then does the new owner start. A member that dies holds its shards until
//! its membership expires, and its successor waits a further lease length, so that the
//! dead member's leases are reaped (their messages back at the head of the shard) before
//! anything newer is taken.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::script::Script;

/// The group consumers join when none is named.
pub const DEFAULT_GROUP: &str = "default";
/// How long a member that stopped renewing stays a member.
pub const DEFAULT_MEMBER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest group name.
pub const MAX_GROUP_NAME_LEN: usize = 64;

/// Checks a group name: 1 to 64 bytes of `[A-Za-z0-9_.:-]`.
pub fn validate_group_name(name: &str) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidGroupName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty".into());
    }
    if name.len() > MAX_GROUP_NAME_LEN {
        return bad(format!("longer than {MAX_GROUP_NAME_LEN} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return bad(format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 _ . : -)"
        ));
    }
    Ok(())
}

/// The key of a group: one hash in the queue's registry slot.
pub(crate) fn group_key(queue: &Queue, group: &str) -> String {
    format!("{}:{{{}}}:group:{group}", queue.prefix(), queue.name())
}

/// How a member takes part.
#[derive(Debug, Clone)]
pub(crate) struct GroupConfig {
    pub(crate) name: String,
    pub(crate) ordered: bool,
    pub(crate) timeout: Duration,
}

/// What the group gave this member at its last heartbeat (shard tags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) generation: i64,
    /// Shards to sweep and block on.
    pub(crate) owned: BTreeSet<String>,
    /// The epoch of this member's grant of each owned shard: ordered members present it to
    /// the shard's fence with every pop, and the server refuses an older one.
    pub(crate) epochs: std::collections::BTreeMap<String, u64>,
    /// Ordered groups: shards to stop taking and confirm released.
    pub(crate) released: BTreeSet<String>,
    /// Assigned, not yet free (the old owner has not let go).
    pub(crate) waiting: BTreeSet<String>,
    /// Other members' shards reported deep: unordered members steal from them when idle.
    pub(crate) deep: BTreeSet<String>,
    pub(crate) members: i64,
    /// At least one heartbeat went through.
    pub(crate) joined: bool,
}

/// What this member tells the group at its next heartbeat (shard tags).
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Shards it still pops or holds unsettled work of.
    pub(crate) held: BTreeSet<String>,
    /// When the consumer last swept each shard.
    pub(crate) swept: std::collections::HashMap<String, std::time::Instant>,
    /// The consumer waits, blocked on its (then empty) shards.
    pub(crate) idle: bool,
    /// Since when the consumer's sweeps found nothing at all, its own shards nor others'.
    pub(crate) hungry_since: Option<std::time::Instant>,
    /// Ordered: shards whose fence refused this member's grant, with the fence it found
    /// (sent once with the next heartbeat, which grants them anew above it).
    pub(crate) refused: std::collections::BTreeMap<String, u64>,
    /// Leaving: only the shards it still holds unsettled work of (owned ones included
    /// otherwise, since a member may pop its shards until the beat that takes them).
    pub(crate) leaving_held: Option<BTreeSet<String>>,
}

/// Messages waiting in a shard that make it worth stealing from however busy its owner.
pub const DEEP_BACKLOG: u64 = 1000;
/// How long a member without shards of its own that found nothing beats ten times as
/// often, to hear of deep shards to steal from within a tenth of a beat. Bounded, so that
/// an idle group goes back to one beat per member per interval.
pub const HUNGRY_WINDOW: Duration = Duration::from_secs(3);

/// Members a group lets beat ten times a beat interval at once: beyond that the fast pause
/// grows with the group, so that the fast beats of a whole group stay about 80 a second
/// (each beat runs the group script on the registry's master, which reads the whole group:
/// 256 hungry members beating ten times a second kept that master at 100% CPU, see
/// docs/benchmarks.md, *The consumer curve*).
const FAST_MEMBERS: i64 = 8;

/// The pause of a fast beat (a tenth of a beat) in a group of `members`, never more than a
/// beat.
fn fast_beat(every: Duration, members: i64) -> Duration {
    let scale = (members / FAST_MEMBERS).max(1) as u32;
    (every / 10 * scale).min(every)
}

/// A running membership: a task that beats every third of the timeout.
pub(crate) struct Membership {
    pub(crate) view: watch::Receiver<Arc<View>>,
    /// Until when this member is sure it is still a member (see [`Membership::valid`]).
    pub(crate) valid: watch::Receiver<std::time::Instant>,
    pub(crate) report: Arc<Mutex<Report>>,
    /// Wakes the heartbeat early (a shard of this member just went deep).
    pub(crate) poke: Arc<tokio::sync::Notify>,
    leave: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Membership {
    /// Joins (the first heartbeat goes out before this returns) and keeps beating.
    pub(crate) async fn join(
        queue: Queue,
        cfg: GroupConfig,
        script: Arc<Script>,
        lease: Duration,
    ) -> Result<Membership> {
        let id = format!("p{}-{:08x}", std::process::id(), rand::random::<u32>());
        let report = Arc::new(Mutex::new(Report::default()));
        let beat = Beat {
            queue,
            cfg,
            script,
            id,
            lease,
            report: report.clone(),
        };
        let sent = std::time::Instant::now();
        let first = beat.send(false, &BTreeSet::new()).await?;
        let first_owned = !first.owned.is_empty();
        let (tx, view) = watch::channel(Arc::new(first));
        let margin = beat.cfg.timeout / 5;
        let (valid_tx, valid) = watch::channel(sent + beat.cfg.timeout - margin);
        let (leave, mut left) = oneshot::channel::<()>();
        let poke = Arc::new(tokio::sync::Notify::new());
        let poked = poke.clone();
        let every = beat.cfg.timeout / 3;
        // Shards just gained are measured by the next beat, almost at once (a hundredth of
        // a beat): until their owner reports them deep, no member steals from them.
        let mut pause = if first_owned { every / 100 } else { every / 10 };
        let task = tokio::spawn(async move {
            // While the assignment moves (members joining or leaving), beat ten times as
            // often, so that shards change hands in about a tenth of a beat, not a beat.
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(last + pause) => {}
                    // A poke beats at once, but at most ten beats per beat interval
                    // however often it comes: a tenth of a beat after the last one.
                    _ = async {
                        poked.notified().await;
                        tokio::time::sleep_until(last + every / 10).await;
                    } => {}
                    _ = &mut left => {
                        let _ = beat.send(true, &BTreeSet::new()).await;
                        return;
                    }
                }
                let owned = tx.borrow().owned.clone();
                last = tokio::time::Instant::now();
                let sent = std::time::Instant::now();
                match beat.send(false, &owned).await {
                    Ok(v) => {
                        let old = tx.borrow().generation;
                        let hungry = beat
                            .report
                            .lock()
                            .unwrap()
                            .hungry_since
                            .is_some_and(|t| t.elapsed() < HUNGRY_WINDOW);
                        pause = if !v.owned.is_subset(&owned) {
                            every / 100
                        } else if v.generation != old || !v.waiting.is_empty() || hungry {
                            fast_beat(every, v.members)
                        } else {
                            every
                        };
                        if v.generation != old {
                            metrics::counter!(crate::telemetry::GROUP_REBALANCES, "group" => beat.cfg.name.clone()).increment(1);
                        }
                        metrics::gauge!(crate::telemetry::GROUP_OWNED_SHARDS, "group" => beat.cfg.name.clone())
                            .set(v.owned.len() as f64);
                        tx.send_if_modified(|cur| {
                            if **cur == v {
                                false
                            } else {
                                *cur = Arc::new(v);
                                true
                            }
                        });
                        // After the view, so that a consumer woken by this sees the view
                        // it renews. The server's deadline for this membership is at least
                        // the send time plus the timeout (its clock is read later); the
                        // member counts itself a member a fifth of the timeout less.
                        valid_tx.send_replace(sent + beat.cfg.timeout - margin);
                    }
                    Err(e) => {
                        tracing::warn!(group = %beat.cfg.name, cause = %e, "group heartbeat failed");
                    }
                }
                if tx.is_closed() {
                    let _ = beat.send(true, &BTreeSet::new()).await;
                    return;
                }
            }
        });
        Ok(Membership {
            view,
            valid,
            report,
            poke,
            leave: Some(leave),
            task,
        })
    }

    /// Leaves the group (a last heartbeat) and waits until it went out.
    pub(crate) async fn leave(mut self) {
        if let Some(l) = self.leave.take() {
            let _ = l.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Dropped without `leave`: the task sends the last heartbeat on its own.
        if let Some(l) = self.leave.take() {
            let _ = l.send(());
        }
    }
}

struct Beat {
    queue: Queue,
    cfg: GroupConfig,
    script: Arc<Script>,
    id: String,
    lease: Duration,
    report: Arc<Mutex<Report>>,
}

impl Beat {
    /// Owned shards others should steal from: a backlog of [`DEEP_BACKLOG`], or any
    /// backlog or expired lease the member has not swept since its last heartbeat (a busy
    /// or stuck application: its pops are what would return expired leases). The beat measures them itself, so a member that stopped calling
    /// `recv` still tells the group; an idle member's shards are empty.
    async fn deep(&self, owned: &BTreeSet<String>) -> BTreeSet<String> {
        let (idle, swept) = {
            let r = self.report.lock().unwrap();
            (r.idle, r.swept.clone())
        };
        if idle || owned.is_empty() {
            return BTreeSet::new();
        }
        let reliable = self.queue.mode() != crate::placement::DeliveryMode::AtMostOnce;
        let prefix = self.queue.prefix();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut cmds = Vec::with_capacity(owned.len() * 2);
        for tag in owned {
            let slot = crate::slot::tag_slot(tag);
            if reliable {
                let key = |kind| crate::placement::shard_key(prefix, tag, kind);
                cmds.push((slot, redis::cmd("GET").arg(key("count")).clone()));
                // Expired leases come back only when someone pops the shard.
                cmds.push((
                    slot,
                    redis::cmd("ZCOUNT")
                        .arg(key("leases"))
                        .arg("-inf")
                        .arg(now_ms)
                        .clone(),
                ));
            } else {
                let ready = crate::placement::ready_key(prefix, tag);
                cmds.push((slot, redis::cmd("LLEN").arg(ready).clone()));
            }
        }
        let cluster = self.queue.cluster();
        let opts = crate::cluster::RequestOpts {
            idempotent: true,
            retry_budget: Duration::ZERO,
            ..cluster.default_opts()
        };
        let number = |r: Option<Result<redis::Value>>| -> u64 {
            r.and_then(|r| r.ok())
                .and_then(|v| redis::from_redis_value::<Option<i64>>(v).ok().flatten())
                .unwrap_or(0)
                .max(0) as u64
        };
        let stale = self.cfg.timeout / 3;
        let mut replies = cluster.batch(cmds, opts).await.into_iter();
        let mut deep = BTreeSet::new();
        for tag in owned {
            let depth = number(replies.next());
            let expired = if reliable { number(replies.next()) } else { 0 };
            let behind = swept.get(tag).is_none_or(|t| t.elapsed() > stale);
            if depth >= DEEP_BACKLOG || ((depth > 0 || expired > 0) && behind) {
                deep.insert(tag.clone());
            }
        }
        deep
    }

    async fn send(&self, leaving: bool, owned: &BTreeSet<String>) -> Result<View> {
        let group = group_key(&self.queue, &self.cfg.name);
        let numbers = |tags: &BTreeSet<String>| {
            tags.iter()
                .filter_map(|t| t.rsplit_once('#').map(|(_, n)| n.to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let deep = if leaving {
            String::new()
        } else {
            numbers(&self.deep(owned).await)
        };
        let (held, refused) = {
            let mut r = self.report.lock().unwrap();
            let held = match (&r.leaving_held, leaving) {
                (Some(h), true) => numbers(h),
                _ => numbers(&r.held),
            };
            let refused = std::mem::take(&mut r.refused)
                .into_iter()
                .filter_map(|(t, f)| Some(format!("{}:{f}", t.rsplit_once('#')?.1)))
                .collect::<Vec<_>>()
                .join(" ");
            (held, refused)
        };
        let mode = if self.cfg.ordered {
            "ordered"
        } else {
            "unordered"
        };
        let args: Vec<Vec<u8>> = vec![
            self.id.clone().into_bytes(),
            (self.cfg.timeout.as_millis() as u64)
                .to_string()
                .into_bytes(),
            if leaving {
                b"leave".to_vec()
            } else {
                b"beat".to_vec()
            },
            mode.as_bytes().to_vec(),
            (self.lease.as_millis() as u64).to_string().into_bytes(),
            held.into_bytes(),
            deep.into_bytes(),
            refused.into_bytes(),
        ];
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let cluster = self.queue.cluster();
        let meta = self.queue.meta_key();
        let v = self
            .script
            .run(
                cluster,
                crate::slot::key_slot(meta),
                &[meta, &group],
                &args,
                cluster.default_opts(),
            )
            .await?;
        let Value::Array(items) = v else {
            return Err(Error::Protocol(format!("group heartbeat: {v:?}")));
        };
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        if let Some(Value::Int(-2)) = items.first() {
            return Err(Error::QueueNotFound(self.queue.name().to_string()));
        }
        if let Some(Value::Int(-1)) = items.first() {
            return Err(Error::GroupModeMismatch {
                group: self.cfg.name.clone(),
                mode: text(items.get(1)),
            });
        }
        let tags = |v: Option<&Value>| -> BTreeSet<String> {
            text(v)
                .split_whitespace()
                .map(|n| format!("{}#{n}", self.queue.name()))
                .collect()
        };
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => *n,
            _ => 0,
        };
        let mut epochs = std::collections::BTreeMap::new();
        let mut owned = BTreeSet::new();
        for word in text(items.get(1)).split_whitespace() {
            let (n, e) = word.split_once(':').unwrap_or((word, "0"));
            let tag = format!("{}#{n}", self.queue.name());
            epochs.insert(tag.clone(), e.parse().unwrap_or(0));
            owned.insert(tag);
        }
        Ok(View {
            generation: int(items.first()),
            owned,
            epochs,
            released: tags(items.get(2)),
            waiting: tags(items.get(3)),
            deep: tags(items.get(4)),
            members: int(items.get(5)),
            joined: true,
        })
    }
}

/// A member of a group, as `slotq group` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's id (`p<pid>-<random>`).
    pub id: String,
    /// Milliseconds until its membership lapses unless it beats again.
    pub expires_in_ms: i64,
    /// Shards it owns.
    pub shards: Vec<String>,
}

/// A shard of a group, as `slotq group` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOwner {
    /// The shard.
    pub tag: String,
    /// Its owner, if any.
    pub owner: Option<String>,
    /// Ordered groups: the member it is being handed to.
    pub next: Option<String>,
    /// Messages waiting in it (its lag).
    pub depth: u64,
}

/// The state of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group's name.
    pub name: String,
    /// `ordered` or `unordered` (empty before anyone joined).
    pub mode: String,
    /// Rebalances so far.
    pub generation: i64,
    /// Live members.
    pub members: Vec<MemberStatus>,
    /// Every shard and its owner.
    pub shards: Vec<ShardOwner>,
}

/// Reads a group's members and owners, and each shard's depth.
impl Queue {
    /// A consumer group's members, their shards, and each shard's lag.
    pub async fn group_status(&self, group: &str) -> Result<GroupStatus> {
        status(self, group).await
    }
}

async fn status(queue: &Queue, name: &str) -> Result<GroupStatus> {
    validate_group_name(name)?;
    let key = group_key(queue, name);
    let slot = crate::slot::key_slot(queue.meta_key());
    let cluster = queue.cluster();
    let opts = crate::cluster::RequestOpts {
        idempotent: true,
        ..cluster.default_opts()
    };
    let cmds = vec![
        (slot, redis::cmd("TIME").clone()),
        (slot, redis::cmd("HGETALL").arg(&key).clone()),
    ];
    let mut replies = cluster.batch(cmds, opts).await.into_iter();
    let time: Vec<String> = redis::from_redis_value(replies.next().expect("two replies")?)
        .map_err(|e| Error::Protocol(format!("TIME: {e}")))?;
    let now =
        time[0].parse::<i64>().unwrap_or(0) * 1000 + time[1].parse::<i64>().unwrap_or(0) / 1000;
    let owners: std::collections::BTreeMap<String, String> =
        redis::from_redis_value(replies.next().expect("two replies")?)
            .map_err(|e| Error::Protocol(format!("group {name}: {e}")))?;
    let members: std::collections::BTreeMap<String, i64> = owners
        .iter()
        .filter_map(|(f, v)| Some((f.strip_prefix("m:")?.to_string(), v.parse().ok()?)))
        .collect();
    let stats = queue.stats().await?;
    let mut shards = Vec::with_capacity(stats.len());
    for s in &stats {
        let number = s.tag.rsplit_once('#').map_or("", |(_, n)| n);
        let (owner, next) = match owners.get(&format!("o:{number}")) {
            Some(v) => match v.split_once(' ') {
                Some((a, b)) => (Some(a.to_string()), Some(b.to_string())),
                None => (Some(v.clone()), None),
            },
            None => (None, None),
        };
        shards.push(ShardOwner {
            tag: s.tag.clone(),
            owner: owner.filter(|o| members.get(o).is_some_and(|&d| d >= now)),
            next,
            depth: s.depth,
        });
    }
    let members = members
        .into_iter()
        .filter(|(_, d)| *d >= now)
        .map(|(id, d)| MemberStatus {
            shards: shards
                .iter()
                .filter(|s| s.owner.as_deref() == Some(id.as_str()))
                .map(|s| s.tag.clone())
                .collect(),
            expires_in_ms: d - now,
            id,
        })
        .collect();
    Ok(GroupStatus {
        name: name.to_string(),
        mode: owners.get("mode").cloned().unwrap_or_default(),
        generation: owners.get("gen").and_then(|g| g.parse().ok()).unwrap_or(0),
        members,
        shards,
    })
}
