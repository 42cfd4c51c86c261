//! `slotq demo`: a throwaway cluster, a queue spread over it, traffic, and what it shows.

use std::time::Instant;

use slotq::{Client, ClusterConfig};
use slotq_testkit::ClusterBuilder;

use crate::CliError;
use crate::args::DemoArgs;

/// Messages the demo pushes and pops.
const DEMO_MESSAGES: usize = 300_000;

/// Starts a cluster, spreads a queue over it, pushes and pops, shows placement and
/// throughput, then stops the cluster.
pub async fn run(args: &DemoArgs) -> Result<String, CliError> {
    let (masters, replicas) = (args.masters, args.replicas);
    if masters == 0 {
        return Err(CliError::Usage("--masters must be at least 1".into()));
    }
    eprintln!("starting a local cluster: {masters} masters, {replicas} replica(s) each ...");
    let cluster = tokio::task::spawn_blocking(move || {
        ClusterBuilder::new()
            .masters(masters)
            .replicas(replicas)
            .start()
    })
    .await
    .map_err(|e| CliError::Other(e.to_string()))??;
    let client = Client::connect(ClusterConfig::from_url(&cluster.url())?).await?;
    let router = client.cluster();
    let mut out = super::slots::run(router, None, false).await?;

    let queue = client.queue("orders").open().await?;
    out.push_str(&format!(
        "\nqueue \"orders\": {} shards, one per master, each a list in a slot that master owns\n",
        queue.shards().shards.len()
    ));

    eprintln!("pushing {DEMO_MESSAGES} messages of 64 bytes from 4 producers ...");
    let producer = queue.producer().build()?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..4 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..DEMO_MESSAGES / 4 / 1000 {
                let batch =
                    (0..1000).map(|i| format!("{p:02}-{chunk:04}-{i:04}-{}", "x".repeat(50)));
                producer.send_batch(batch).await?;
            }
            Ok::<_, slotq::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| CliError::Other(e.to_string()))??;
    }
    let push_secs = t0.elapsed().as_secs_f64();
    out.push_str(&super::slots::queue_section(router, "orders").await?);

    eprintln!("draining with 4 consumers ...");
    let t0 = Instant::now();
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut consumer = queue.consumer().build()?;
        let got = got.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0usize;
            while got.load(std::sync::atomic::Ordering::Relaxed) < DEMO_MESSAGES {
                let batch = consumer
                    .recv_batch_timeout(1000, std::time::Duration::from_millis(200))
                    .await?;
                mine += batch.len();
                got.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
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
    out.push_str(&format!(
        "\nthroughput: pushed {DEMO_MESSAGES} in {push_secs:.2} s ({:.0} msgs/s), popped in {pop_secs:.2} s ({:.0} msgs/s)\nmessages per consumer: {}\n",
        DEMO_MESSAGES as f64 / push_secs,
        DEMO_MESSAGES as f64 / pop_secs,
        per_consumer.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    ));
    out.push_str("\nthe cluster is stopped and its files deleted.\n");
    drop(client);
    drop(cluster);
    Ok(out)
}
