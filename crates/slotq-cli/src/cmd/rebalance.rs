//! `slotq rebalance`: bring a queue to exactly its shards per master on the cluster as it
//! is now (and keep it there with `--watch`); `slotq plan --simulate`: placement at any
//! size without servers.

use std::time::{Duration, Instant};

use serde::Serialize;
use slotq::Cluster;
use slotq::rebalance::{Plan, RebalanceReport};

use crate::CliError;
use crate::output::table;

/// How `slotq rebalance` runs.
pub struct Options {
    /// Print the plan only.
    pub dry_run: bool,
    /// Keep following the cluster, a step every this often.
    pub watch: Option<Duration>,
    /// Without --watch: stop stepping after this long even if shards still drain.
    pub wait: Duration,
    /// JSON output.
    pub json: bool,
}

/// The totals of a rebalance run, as printed with `--json`.
#[derive(Debug, Default, Serialize)]
struct Totals {
    queue: String,
    version: u64,
    added: Vec<String>,
    reactivated: Vec<String>,
    drained: Vec<String>,
    retired: Vec<String>,
    moved: u64,
    waiting: Vec<String>,
    settled: bool,
}

impl Totals {
    fn add(&mut self, r: RebalanceReport) {
        self.version = r.version;
        self.added.extend(r.added);
        self.reactivated.extend(r.reactivated);
        self.drained.extend(r.drained);
        self.retired.extend(r.retired);
        self.moved += r.moved;
        self.settled = r.waiting.is_empty();
        self.waiting = r.waiting;
    }
}

/// One line per step that changed something.
fn describe(r: &RebalanceReport) -> Option<String> {
    let mut parts = Vec::new();
    for (what, list) in [
        ("added", &r.added),
        ("reactivated", &r.reactivated),
        ("draining", &r.drained),
        ("retired", &r.retired),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what} {}", list.join(" ")));
        }
    }
    if r.moved > 0 {
        parts.push(format!("moved {} message(s) off retired shards", r.moved));
    }
    (!parts.is_empty()).then(|| format!("registry version {}: {}", r.version, parts.join("; ")))
}

/// A step cut short by Ctrl-C or SIGTERM: the lock is released (the step's future is
/// dropped), and what it left is said: shards still draining or retiring (the next
/// rebalance goes on with them) and retired shards whose leftovers are not moved yet (the
/// next rebalance moves them first). `None` when the step left nothing half done (it was
/// cut before it changed anything, or after it finished): then the run ends as usual.
async fn cancelled(q: &slotq::Queue) -> Option<CliError> {
    let reverted = match q.rebalance_cancelled().await {
        Ok(tags) if !tags.is_empty() => format!("back to draining: {}; ", tags.join(" ")),
        Ok(_) => String::new(),
        Err(e) => format!("retiring shards not reverted ({e}); "),
    };
    let left = match q.reload().await {
        Ok(set) => {
            let mut parts = Vec::new();
            let of = |state| {
                set.shards
                    .iter()
                    .filter(|s| s.state == state)
                    .map(|s| s.tag.clone())
                    .collect::<Vec<_>>()
            };
            for (what, tags) in [
                ("draining", of(slotq::placement::ShardState::Draining)),
                ("retiring", of(slotq::placement::ShardState::Retiring)),
            ] {
                if !tags.is_empty() {
                    parts.push(format!("{what}: {}", tags.join(" ")));
                }
            }
            if !set.cleanup.is_empty() {
                parts.push(format!(
                    "retired, leftovers not moved yet: {}",
                    set.cleanup
                        .iter()
                        .map(|n| slotq::slot::shard_tag(q.name(), *n))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            // Draining shards are where a finished step may leave a queue too: only a
            // retirement under way (reverted above) or one cut short counts as half done.
            if set.cleanup.is_empty() && reverted.is_empty() {
                return None;
            }
            parts.join("; ")
        }
        Err(e) => format!("the registry could not be read: {e}"),
    };
    Some(CliError::Other(format!(
        "rebalance of {} cancelled mid-step at registry version {}; {reverted}left: {left}; run slotq rebalance again to finish it",
        q.name(),
        q.shards().version
    )))
}

/// `slotq rebalance QUEUE`.
pub async fn run(cluster: &Cluster, queue: &str, opts: Options) -> Result<String, CliError> {
    let q = super::queue::open_existing(cluster, queue).await?;
    if opts.dry_run {
        let plan = q.rebalance_plan().await?;
        return dry_run(&q, &plan, opts.json).await;
    }
    let mut totals = Totals {
        queue: queue.to_string(),
        ..Totals::default()
    };
    let started = Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Other(format!("SIGTERM handler: {e}")))?;
    loop {
        let report = tokio::select! {
            r = q.rebalance() => r?,
            _ = tokio::signal::ctrl_c() => match cancelled(&q).await {
                Some(e) => return Err(e),
                None => break,
            },
            _ = term.recv() => match cancelled(&q).await {
                Some(e) => return Err(e),
                None => break,
            },
        };
        if let Some(line) = describe(&report) {
            eprintln!("{line}");
        }
        let settled = report.settled();
        totals.add(report);
        let pause = match opts.watch {
            Some(every) => every,
            None if settled || started.elapsed() >= opts.wait => break,
            None => Duration::from_secs(1),
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    if opts.json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string(&totals).map_err(|e| CliError::Other(e.to_string()))?
        ));
    }
    let mut out = format!(
        "queue {queue}: registry version {}; {} added, {} reactivated, {} set to drain, {} retired, {} message(s) moved\n",
        totals.version,
        totals.added.len(),
        totals.reactivated.len(),
        totals.drained.len(),
        totals.retired.len(),
        totals.moved
    );
    if totals.settled {
        out += "balanced: every master that owns slots has its shards, nothing drains\n";
    } else {
        out += &format!(
            "still draining (run again, or --watch): {}\n",
            totals.waiting.join(" ")
        );
    }
    Ok(out)
}

#[derive(Serialize)]
struct DryRun<'a> {
    queue: &'a str,
    version: u64,
    add: Vec<ShardRow>,
    reactivate: Vec<ShardRow>,
    drain: Vec<ShardRow>,
    /// Shards draining or retiring now, which a rebalance retires once empty.
    draining: Vec<ShardRow>,
    /// Retired shards whose leftovers a step cut short did not move yet (the next
    /// rebalance moves them first).
    cleanup: Vec<ShardRow>,
}

#[derive(Serialize)]
struct ShardRow {
    tag: String,
    slot: u16,
    node: Option<String>,
    depth: Option<u64>,
}

async fn dry_run(q: &slotq::Queue, plan: &Plan, as_json: bool) -> Result<String, CliError> {
    let topology = q.cluster().topology();
    let stats = q.stats().await?;
    let set = q.shards();
    let row = |tag: String, slot: u16| ShardRow {
        node: topology.owner(slot).map(|n| n.to_string()),
        depth: stats.iter().find(|s| s.tag == tag).map(|s| s.depth),
        tag,
        slot,
    };
    let by_number = |numbers: &[u32]| -> Vec<ShardRow> {
        numbers
            .iter()
            .filter_map(|n| set.shard(*n))
            .map(|s| row(s.tag.clone(), s.slot))
            .collect()
    };
    let out = DryRun {
        queue: q.name(),
        version: set.version,
        add: plan
            .add
            .iter()
            .map(|s| row(s.tag.clone(), s.slot))
            .collect(),
        reactivate: by_number(&plan.reactivate),
        drain: by_number(&plan.drain),
        draining: set
            .shards
            .iter()
            .filter(|s| s.state != slotq::placement::ShardState::Active)
            .map(|s| row(s.tag.clone(), s.slot))
            .collect(),
        cleanup: set
            .cleanup
            .iter()
            .map(|n| {
                let s = slotq::placement::Shard::new(
                    q.name(),
                    *n,
                    slotq::placement::ShardState::Retiring,
                );
                ShardRow {
                    node: topology.owner(s.slot).map(|n| n.to_string()),
                    depth: None,
                    tag: s.tag,
                    slot: s.slot,
                }
            })
            .collect(),
    };
    if as_json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string(&out).map_err(|e| CliError::Other(e.to_string()))?
        ));
    }
    let mut rows = Vec::new();
    for (action, list) in [
        ("add", &out.add),
        ("reactivate", &out.reactivate),
        ("drain", &out.drain),
        ("retire when empty", &out.draining),
        ("move leftovers (retirement cut short)", &out.cleanup),
    ] {
        for r in list {
            rows.push(vec![
                action.to_string(),
                r.tag.clone(),
                r.slot.to_string(),
                r.node.clone().unwrap_or_else(|| "-".into()),
                r.depth.map_or("-".into(), |d| d.to_string()),
            ]);
        }
    }
    if rows.is_empty() {
        return Ok(format!(
            "queue {}: balanced (registry version {}): nothing to do\n",
            out.queue, out.version
        ));
    }
    Ok(format!(
        "queue {} (registry version {}): a rebalance would\n\n{}",
        out.queue,
        out.version,
        table(&["ACTION", "SHARD", "SLOT", "NODE", "DEPTH"], &rows)
    ))
}

#[derive(Serialize)]
struct SimulationOut {
    masters: usize,
    shards_per_master: u32,
    shards: usize,
    shards_per_master_min: usize,
    shards_per_master_max: usize,
    search_steps: u64,
    registry_bytes: usize,
    plan_ms: f64,
    reshard: Option<ReshardOut>,
}

#[derive(Serialize)]
struct ReshardOut {
    percent: f64,
    slots_moved: usize,
    shards_moved: usize,
    add: usize,
    drain: usize,
    reactivate: usize,
    plan_ms: f64,
}

/// `slotq plan QUEUE --simulate N`: no server is asked.
pub fn simulate(
    masters: usize,
    k: u32,
    reshard: Option<f64>,
    as_json: bool,
) -> Result<String, CliError> {
    if !(1..=16384).contains(&masters) {
        return Err(CliError::Usage(
            "--simulate takes 1 to 16384 masters".into(),
        ));
    }
    if k == 0 {
        return Err(CliError::Usage(
            "--shards-per-master must be at least 1".into(),
        ));
    }
    if let Some(p) = reshard
        && !(0.0..=100.0).contains(&p)
    {
        return Err(CliError::Usage(
            "--reshard takes a percentage, 0 to 100".into(),
        ));
    }
    let sim = slotq::rebalance::simulate::run(masters, k, reshard);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let out = SimulationOut {
        masters: sim.masters,
        shards_per_master: sim.shards_per_master,
        shards: sim.shards,
        shards_per_master_min: sim.per_master.0,
        shards_per_master_max: sim.per_master.1,
        search_steps: sim.search_steps,
        registry_bytes: sim.registry_bytes,
        plan_ms: ms(sim.plan_time),
        reshard: sim.reshard.map(|r| ReshardOut {
            percent: r.percent,
            slots_moved: r.slots_moved,
            shards_moved: r.shards_moved,
            add: r.add,
            drain: r.drain,
            reactivate: r.reactivate,
            plan_ms: ms(r.plan_time),
        }),
    };
    if as_json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string(&out).map_err(|e| CliError::Other(e.to_string()))?
        ));
    }
    let mut s = format!(
        "simulated {} masters, even slot map, {} shard(s) per master:\n  {} shards, {}..{} per master, {} tags hashed, registry {} bytes, planned in {:.2} ms\n",
        out.masters,
        out.shards_per_master,
        out.shards,
        out.shards_per_master_min,
        out.shards_per_master_max,
        out.search_steps,
        out.registry_bytes,
        out.plan_ms
    );
    if let Some(r) = &out.reshard {
        s += &format!(
            "after {}% of every master's slots moved to the next master ({} slots, {} shards moved with them):\n  a rebalance would add {}, drain {}, reactivate {}; planned in {:.2} ms\n",
            r.percent, r.slots_moved, r.shards_moved, r.add, r.drain, r.reactivate, r.plan_ms
        );
    }
    Ok(s)
}
