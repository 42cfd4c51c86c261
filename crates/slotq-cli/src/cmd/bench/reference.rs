//! What slotq's figures are compared with: the machine's anchor (redis-benchmark, run by
//! a script) and the usual way of running a Redis queue on a cluster (one plain list
//! through the redis crate's cluster client).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use slotq::Cluster;

use super::{Phase, bar, nanos_since, payload};
use crate::CliError;
use crate::args::BenchArgs;

/// The usual way: one LPUSH per message and one RPOP per message on a single list, through
/// the redis crate's cluster client, with as many calls in flight as slotq's tasks have.
pub(super) async fn baseline(
    url: &str,
    args: &BenchArgs,
    show: bool,
) -> Result<Vec<Phase>, CliError> {
    use redis::AsyncCommands;
    let client = redis::cluster::ClusterClient::new(vec![url])
        .map_err(|e| CliError::Other(e.to_string()))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| CliError::Other(format!("baseline: {e}")))?;
    let key = "slotq-bench-baseline:{list}";
    let in_flight = 64;
    let start = Instant::now();
    let mut phases = Vec::new();
    for (name, tasks) in [
        ("plain list push", args.producers),
        ("plain list pop", args.consumers),
    ] {
        let pb = bar(args.messages, name, show);
        let t0 = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..tasks * in_flight {
            let mut conn = conn.clone();
            let next = next.clone();
            let pb = pb.clone();
            let (total, size, push) = (args.messages, args.size, name.ends_with("push"));
            handles.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, redis::RedisError>(());
                    }
                    if push {
                        let _: i64 = conn
                            .lpush(key, payload(i as u64, nanos_since(start), size))
                            .await?;
                    } else {
                        let _: Option<Vec<u8>> = conn.rpop(key, None).await?;
                    }
                    pb.inc(1);
                }
            }));
        }
        for h in handles {
            h.await
                .map_err(|e| CliError::Other(e.to_string()))?
                .map_err(|e| CliError::Other(format!("baseline: {e}")))?;
        }
        pb.finish();
        phases.push(Phase {
            name,
            messages: args.messages,
            secs: t0.elapsed().as_secs_f64(),
            latency_us: None,
            shares: None,
            offered: None,
            schedule: None,
            warm_up: None,
            load: None,
        });
    }
    let mut conn = conn;
    let _: Result<i64, _> = conn.del(key).await;
    Ok(phases)
}

/// The anchor's figures.
#[derive(Debug, Clone, Copy)]
pub(super) struct Anchor {
    pub(super) push: f64,
    pub(super) pop: f64,
    /// Messages a second through lists pushed and popped at once (see [`concurrent`]):
    /// what a push+pop phase does, at the machine's limit.
    pub(super) both: Option<f64>,
}

impl Anchor {
    /// A push+pop phase against the concurrent anchor.
    pub(super) fn ratio_both(&self, p: &Phase) -> Option<f64> {
        (p.name == "push+pop")
            .then_some(self.both)
            .flatten()
            .map(|b| p.rate() / b)
    }

    /// Pops compare with the anchor's pops; pushes and end-to-end runs with its pushes.
    pub(super) fn ratio(&self, p: &Phase) -> f64 {
        let base = if p.name.ends_with("pop") && !p.name.contains('+') {
            self.pop
        } else {
            self.push
        };
        p.rate() / base
    }
}

/// Values per command the anchor is run with; for each op the better figure counts, since
/// slotq itself sends up to 1000 values per `RPUSH` (batch 100 alone would flatter it).
const ANCHOR_BATCHES: [(usize, usize); 2] = [(100, 20_000), (1000, 2_000)];

/// Runs the anchor script at each of [`ANCHOR_BATCHES`] (the same number of messages per
/// master) and keeps, for push and for pop, the better rate.
pub(super) async fn run_anchor(
    script: &std::path::Path,
    cluster: &Cluster,
    size: usize,
    show: bool,
) -> Result<Anchor, CliError> {
    let mut best: Option<Anchor> = None;
    for (batch, commands) in ANCHOR_BATCHES {
        let mut a = run_anchor_once(script, cluster, size, batch, commands, show).await?;
        a.both = Some(concurrent(cluster, size, batch, commands, show).await?);
        best = Some(match best {
            None => a,
            Some(b) => Anchor {
                push: b.push.max(a.push),
                pop: b.pop.max(a.pop),
                both: match (b.both, a.both) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                },
            },
        });
    }
    best.ok_or_else(|| CliError::Other("the anchor did not run".into()))
}

async fn run_anchor_once(
    script: &std::path::Path,
    cluster: &Cluster,
    size: usize,
    batch: usize,
    commands: usize,
    show: bool,
) -> Result<Anchor, CliError> {
    let seed = cluster
        .topology()
        .masters()
        .first()
        .map(|m| m.addr.to_string())
        .ok_or_else(|| CliError::Other("the cluster has no master".into()))?;
    if show {
        eprintln!(
            "running the anchor {} against {seed} (batch {batch}) ...",
            script.display()
        );
    }
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .arg(&seed)
        .arg(size.to_string())
        .arg(batch.to_string())
        .arg(commands.to_string())
        .output()
        .await
        .map_err(|e| CliError::Other(format!("cannot run the anchor {}: {e}", script.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = |op: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with("ANCHOR") && l.contains(&format!("op={op} ")))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("msgs_per_s="))?
            .parse()
            .ok()
    };
    match (rate("push"), rate("pop")) {
        (Some(push), Some(pop)) if push > 0.0 && pop > 0.0 => Ok(Anchor {
            push,
            pop,
            both: None,
        }),
        _ => Err(CliError::Other(format!(
            "the anchor printed no figures:\n{}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}

/// The concurrent anchor: on every master at once, `redis-benchmark` (the anchor script's
/// settings: 20 clients, pipeline 16) pushes `commands` `LPUSH`es of `batch` values to one
/// list while another pops `RPOP list batch` from it, the list filled beforehand with as
/// many as will be popped, so that pops never find it empty. Returns messages a second
/// through the lists: each counted once, as a push+pop phase counts them.
pub(super) async fn concurrent(
    cluster: &Cluster,
    size: usize,
    batch: usize,
    commands: usize,
    show: bool,
) -> Result<f64, CliError> {
    let topology = cluster.topology();
    let masters: Vec<slotq::NodeAddr> = topology.masters().iter().map(|m| m.addr.clone()).collect();
    if masters.is_empty() {
        return Err(CliError::Other("the cluster has no master".into()));
    }
    // A list per master, in a slot that master serves.
    let targets: Vec<(slotq::NodeAddr, String)> = masters
        .iter()
        .map(|m| {
            let key = (0..)
                .map(|n| format!("{{anchor-both{n}}}:list"))
                .find(|k| topology.owner(slotq::slot::key_slot(k)) == Some(m))
                .expect("some key lands on every master");
            (m.clone(), key)
        })
        .collect();
    if show {
        eprintln!("running the concurrent anchor (push and pop at once, batch {batch}) ...");
    }
    let value = "x".repeat(size);
    let bench = |node: &slotq::NodeAddr, args: Vec<String>| {
        let mut c = tokio::process::Command::new("redis-benchmark");
        c.args(["-h", &node.host, "-p", &node.port.to_string()])
            .args(["-n", &commands.to_string(), "-c", "20", "-P", "16", "-q"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let push_args = |key: &str| -> Vec<String> {
        let mut a = vec!["LPUSH".to_string(), key.to_string()];
        a.extend(std::iter::repeat_n(value.clone(), batch));
        a
    };
    let run_all = |cmds: Vec<tokio::process::Command>| async move {
        let mut children = Vec::new();
        for mut c in cmds {
            children.push(c.spawn().map_err(|e| {
                CliError::Other(format!(
                    "cannot run redis-benchmark (apt-get install redis-tools): {e}"
                ))
            })?);
        }
        for mut ch in children {
            ch.wait()
                .await
                .map_err(|e| CliError::Other(e.to_string()))?;
        }
        Ok::<(), CliError>(())
    };
    let clear = || async {
        for (node, key) in &targets {
            let _ = cluster
                .node_query::<redis::Value>(node, redis::cmd("DEL").arg(key))
                .await;
        }
    };
    clear().await;
    // Filled first, then pushed and popped at once.
    run_all(
        targets
            .iter()
            .map(|(n, k)| bench(n, push_args(k)))
            .collect(),
    )
    .await?;
    let t0 = Instant::now();
    let mut both = Vec::new();
    for (n, k) in &targets {
        both.push(bench(n, push_args(k)));
        both.push(bench(
            n,
            vec!["RPOP".to_string(), k.clone(), batch.to_string()],
        ));
    }
    run_all(both).await?;
    let secs = t0.elapsed().as_secs_f64();
    clear().await;
    Ok((targets.len() * commands * batch) as f64 / secs)
}
