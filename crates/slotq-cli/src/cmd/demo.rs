//! `slotq demo`: a throwaway cluster (or an existing one), queues spread over it, traffic
//! with live progress, and what it shows: placement, per-node depth, throughput, latency,
//! and the at-least-once mode at work.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use slotq::{Client, ClusterConfig};
use slotq_testkit::{ClusterBuilder, TestCluster};

use crate::CliError;
use crate::args::{BenchArgs, DemoArgs};

/// Messages the demo pushes and pops.
const DEMO_MESSAGES: usize = 300_000;

fn progress(total: usize, label: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Runs the demo and returns what it shows.
pub async fn run(args: &DemoArgs) -> Result<String, CliError> {
    let (masters, replicas) = (args.masters, args.replicas);
    if masters == 0 {
        return Err(CliError::Usage("--masters must be at least 1".into()));
    }
    let mut local: Option<TestCluster> = None;
    let url = match &args.on {
        Some(url) => url.clone(),
        None => {
            eprintln!(
                "starting a local cluster: {masters} masters, {replicas} replica(s) each ..."
            );
            let c = tokio::task::spawn_blocking(move || {
                ClusterBuilder::new()
                    .masters(masters)
                    .replicas(replicas)
                    .start()
            })
            .await
            .map_err(|e| CliError::Other(e.to_string()))??;
            let url = c.url();
            local = Some(c);
            url
        }
    };
    let client = Client::connect(ClusterConfig::from_url(&url)?).await?;
    let router = client.cluster();
    let mut out = super::slots::run(router, None, false).await?;

    // At-most-once: a queue spread over every master.
    // On someone else's cluster the demo's queue names must not collide with theirs.
    let suffix = if args.on.is_some() {
        format!("-slotq-demo-{}", std::process::id())
    } else {
        String::new()
    };
    let name = format!("orders{suffix}");
    let queue = client.queue(&name).open().await?;
    out.push_str(&format!(
        "\nqueue {name}: {} shards, one per master, each a list in a slot that master owns\n",
        queue.shards().shards.len()
    ));
    let producer = queue.producer().build()?;
    let pb = progress(DEMO_MESSAGES, "push");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..4 {
        let (producer, pb) = (producer.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            for chunk in 0..DEMO_MESSAGES / 4 / 1000 {
                let batch =
                    (0..1000).map(|i| format!("{p:02}-{chunk:04}-{i:04}-{}", "x".repeat(50)));
                producer.send_batch(batch).await?;
                pb.inc(1000);
            }
            Ok::<_, slotq::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| CliError::Other(e.to_string()))??;
    }
    let push_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    out.push_str(&super::slots::queue_section(router, &name).await?);

    let pb = progress(DEMO_MESSAGES, "pop");
    let t0 = Instant::now();
    let got = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut consumer = queue.consumer().build()?;
        let (got, pb) = (got.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0usize;
            while got.load(Ordering::Relaxed) < DEMO_MESSAGES {
                let batch = consumer
                    .recv_batch_timeout(1000, Duration::from_millis(200))
                    .await?;
                mine += batch.len();
                got.fetch_add(batch.len(), Ordering::Relaxed);
                pb.inc(batch.len() as u64);
            }
            consumer.close().await;
            Ok::<_, slotq::Error>(mine)
        }));
    }
    let mut per_consumer = Vec::new();
    for t in tasks {
        per_consumer.push(t.await.map_err(|e| CliError::Other(e.to_string()))??);
    }
    let pop_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    out.push_str(&format!(
        "\nthroughput: pushed {DEMO_MESSAGES} in {push_secs:.2} s ({:.0} msgs/s), popped in {pop_secs:.2} s ({:.0} msgs/s)\nmessages per consumer: {}\n",
        DEMO_MESSAGES as f64 / push_secs,
        DEMO_MESSAGES as f64 / pop_secs,
        per_consumer.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    ));

    // Latency under concurrent traffic (the bench's push+pop phase).
    eprintln!("measuring latency under concurrent push and pop ...");
    let bench = BenchArgs {
        messages: 200_000,
        size: 64,
        producers: 2,
        consumers: 2,
        keyed: false,
        one_by_one: false,
        baseline: false,
        reliable: false,
        no_durability: false,
        phases: vec![crate::args::BenchPhase::E2e],
        anchor: None,
        rounds: 1,
        queue: Some(format!("{name}-latency")),
        rate: None,
        load: None,
        duration: 5.0,
        scheduled: None,
        priorities: None,
        curve: None,
        warm_up: std::time::Duration::ZERO,
        without_group: false,
        ordered: false,
        no_prefetch: false,
    };
    let report = super::bench::run(router, &url, &bench, false).await?;
    if let Some(line) = report.lines().find(|l| l.starts_with("push+pop")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        out.push_str(&format!(
            "latency from send to receive while both run: p50 {} p99 {} p999 {} ({} msgs/s)\n",
            f.get(4).unwrap_or(&"?"),
            f.get(5).unwrap_or(&"?"),
            f.get(6).unwrap_or(&"?"),
            f.get(3).unwrap_or(&"?")
        ));
    }

    // At-least-once: leases, acks, a retry and a dead letter.
    let rname = format!("payments{suffix}");
    let reliable = client.queue(&rname).max_attempts(2).open().await?;
    reliable
        .producer()
        .build()?
        .send_batch((0..1000).map(|i| format!("payment {i}")))
        .await?;
    let mut consumer = reliable
        .consumer()
        .block_timeout(Duration::from_millis(200))
        .build()?;
    let mut acked = 0;
    let mut failed = 0;
    while let Ok(batch) = consumer
        .recv_batch_timeout(500, Duration::from_secs(1))
        .await
    {
        if batch.is_empty() {
            break;
        }
        // One payment keeps failing: it is delivered twice, then dead-lettered.
        let (bad, good): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|m| m.payload == b"payment 7"[..]);
        acked += consumer.ack_all(&good).await?.settled;
        if !bad.is_empty() {
            failed += consumer.nack_all(&bad, None).await?.settled;
        }
    }
    consumer.close().await;
    out.push_str(&format!(
        "\nat-least-once queue {rname}: {acked} acknowledged, {failed} failed deliveries, {} dead letter(s)\n",
        reliable.dead_letters(10).await?.len()
    ));
    out.push_str(&super::queue::stats(router, &rname, false).await?);

    // Clean up: on a cluster of the user's, every key of both queues (leases included);
    // a throwaway cluster goes away whole.
    if local.is_none() {
        let (a, b) = futures::join!(queue.delete(), reliable.delete());
        a?;
        b?;
    }
    drop(client);
    out.push_str(match local.take() {
        Some(c) => {
            drop(c);
            "\nthe cluster is stopped and its files deleted.\n"
        }
        None => "\nthe demo's queues are deleted; the cluster is left as it was.\n",
    });
    out.push_str(
        "to watch queues live in a browser: `slotq dev-cluster up`, push and consume, then \
         `slotq dashboard` and open http://127.0.0.1:8080/\n",
    );
    Ok(out)
}
