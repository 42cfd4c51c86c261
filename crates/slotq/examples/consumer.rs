//! Receives from the queue `orders` as a stream until it has been idle for 3 seconds.
//!
//! `cargo run --release -p slotq --example consumer [redis://127.0.0.1:7000]`

use std::time::Duration;

use futures::StreamExt;

#[tokio::main]
async fn main() -> slotq::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:7000".into());
    let client = slotq::Client::open(&url).await?;
    let queue = client.queue("orders").open().await?;
    let mut stream = queue.consumer().build()?.into_stream();
    let mut per_shard = std::collections::BTreeMap::<String, u64>::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), stream.next()).await {
        let msg = msg?;
        *per_shard.entry(msg.shard.to_string()).or_default() += 1;
    }
    println!("received per shard: {per_shard:?}");
    Ok(())
}
