//! Keyed sends: every customer's events stay in order, whichever shard they land on.
//!
//! `cargo run --release -p slotq --example keyed [redis://127.0.0.1:7000]`

use std::collections::HashMap;
use std::time::Duration;

#[tokio::main]
async fn main() -> slotq::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:7000".into());
    let client = slotq::Client::open(&url).await?;
    let queue = client.queue("customer-events").open().await?;
    let producer = queue.producer().build()?;
    let mut tasks = Vec::new();
    for customer in 0..10 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            for step in 0..100 {
                producer
                    .send_keyed(format!("customer-{customer}"), format!("{customer}:{step}"))
                    .await?;
            }
            Ok::<_, slotq::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("task")?;
    }
    // The next hundred steps of every customer in one call: grouped by shard into shared
    // pushes, in order per key.
    producer
        .send_keyed_batch((100..200).flat_map(|step| {
            (0..10).map(move |c| (format!("customer-{c}"), format!("{c}:{step}")))
        }))
        .await?;

    let mut consumer = queue.consumer().build()?;
    let mut last: HashMap<u32, i64> = HashMap::new();
    loop {
        let batch = consumer
            .recv_batch_timeout(1000, Duration::from_secs(1))
            .await?;
        if batch.is_empty() {
            break;
        }
        for m in batch {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let (c, s) = text.split_once(':').expect("customer:step");
            let (c, s): (u32, i64) = (c.parse().expect("number"), s.parse().expect("number"));
            let prev = last.insert(c, s).unwrap_or(-1);
            assert_eq!(s, prev + 1, "customer {c} out of order");
        }
    }
    println!("{} customers, every one in order", last.len());
    Ok(())
}
