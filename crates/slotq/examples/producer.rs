//! Sends 100,000 messages to the queue `orders`, concurrently, and reports the rate.
//!
//! Run against a local cluster: `slotq dev-cluster up`, then
//! `cargo run --release -p slotq --example producer [redis://127.0.0.1:7000]`.

use std::time::Instant;

#[tokio::main]
async fn main() -> slotq::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:7000".into());
    let client = slotq::Client::open(&url).await?;
    let queue = client.queue("orders").open().await?;
    let producer = queue.producer().build()?;

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..4 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..25 {
                let batch = (0..1000).map(|i| format!("order {task}-{chunk}-{i}"));
                producer.send_batch(batch).await?;
            }
            Ok::<_, slotq::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("task")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "sent 100000 messages in {secs:.2} s ({:.0} msgs/s)",
        100_000.0 / secs
    );
    for s in queue.stats().await? {
        println!(
            "{:<10} slot {:>5} on {:<16} depth {}",
            s.tag,
            s.slot,
            s.node.map(|n| n.to_string()).unwrap_or_default(),
            s.depth
        );
    }
    Ok(())
}
