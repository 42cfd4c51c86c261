//! At-least-once: lease, process, acknowledge; failures are retried and end in dead
//! letters after 3 deliveries.
//!
//! `cargo run --release -p slotq --example reliable [redis://127.0.0.1:7000]`

use std::time::Duration;

use slotq::Settled;

#[tokio::main]
async fn main() -> slotq::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:7000".into());
    let client = slotq::Client::open(&url).await?;
    let queue = client.queue("payments").max_attempts(3).open().await?;
    let producer = queue.producer().build()?;
    producer
        .send_batch((0..20).map(|i| format!("payment {i}")))
        .await?;

    // Idle consumers sweep once per block timeout; that sweep also releases delayed nacks.
    let mut consumer = queue
        .consumer()
        .lease(Duration::from_secs(10))
        .block_timeout(Duration::from_millis(200))
        .build()?;
    let (mut done, mut retried) = (0, 0);
    loop {
        let batch = consumer
            .recv_batch_timeout(100, Duration::from_secs(2))
            .await?;
        if batch.is_empty() {
            break;
        }
        for msg in batch {
            // Pretend every seventh payment fails: it is retried, then dead-lettered.
            if msg.payload.ends_with(b"7") {
                msg.nack(Some(Duration::from_millis(100))).await?;
                retried += 1;
            } else if msg.ack().await? == Settled::Done {
                done += 1;
            }
        }
    }
    let dead = queue.dead_letters(10).await?;
    println!(
        "acknowledged {done}, retried {retried} times, dead letters: {}",
        dead.len()
    );
    for d in dead {
        println!(
            "  {} after {} deliveries: {}",
            d.id,
            d.deliveries,
            String::from_utf8_lossy(&d.payload)
        );
    }
    Ok(())
}
