//! A consumer process for the at-least-once tests, killed with SIGKILL by them.
//!
//! `slotq-test-consumer URL QUEUE LEASE_MS hold N`: leases N messages, prints
//! `LEASED <n>`, then never settles them (waits to be killed).
//! `slotq-test-consumer URL QUEUE LEASE_MS work [MS]`: forever: receive a batch, spend MS
//! milliseconds on it, print `DONE <payload>` for each message (flushed), then acknowledge.
//! `slotq-test-consumer URL QUEUE LEASE_MS group-work MS GROUP ORDERED`: a member of GROUP
//! (ordered when ORDERED is 1): forever: for each message, a random pause of 0..MS ms, then
//! `DONE <ns since the epoch> <payload>` (flushed), then its ack.
//! With `SLOTQ_TEST_SOURCE_IP` set, every connection is made from that address.

use std::io::Write;
use std::time::Duration;

use slotq::Client;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, queue, lease_ms, mode) = (
        &args[1],
        &args[2],
        args[3].parse::<u64>().unwrap(),
        &args[4],
    );
    // `SLOTQ_TEST_SOURCE_IP`: connect from that address (a partition test cuts it off).
    let client = match std::env::var("SLOTQ_TEST_SOURCE_IP") {
        Ok(ip) => {
            let config = slotq::ClusterConfig::from_url(url)
                .expect("valid url")
                .source_address(ip.parse().expect("an IP address"));
            Client::from_cluster(slotq::Cluster::connect(config).await.expect("connect"))
        }
        Err(_) => Client::open(url).await.expect("connect"),
    };
    let q = client
        .queue(queue)
        .must_exist()
        .open()
        .await
        .expect("queue exists");
    let mut builder = q.consumer();
    if mode == "group-work" {
        builder = builder.group(args[6].as_str());
        if args[7] == "1" {
            builder = builder.ordered();
        }
    }
    let mut consumer = builder
        .lease(Duration::from_millis(lease_ms))
        .pop_batch(50)
        .block_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut out = std::io::stdout();
    if mode == "hold" {
        let n: usize = args[5].parse().unwrap();
        let mut held = Vec::new();
        while held.len() < n {
            held.extend(consumer.recv_batch(n - held.len()).await.unwrap());
        }
        writeln!(out, "LEASED {}", held.len()).unwrap();
        out.flush().unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return;
    }
    let work_ms: u64 = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(0);
    if mode == "group-work" {
        loop {
            // A member that cannot renew its membership (its registry's master stalls) is
            // told so and tries again; so does one whose ack finds its node stalled.
            let batch = match consumer.recv_batch(10).await {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("recv: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for m in batch {
                let pause = rand::random_range(0..=work_ms);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                writeln!(out, "DONE {ns} {}", String::from_utf8_lossy(&m.payload)).unwrap();
                out.flush().unwrap();
                if let Err(e) = m.ack().await {
                    eprintln!("ack: {e}");
                }
            }
        }
    }
    let work = Duration::from_millis(work_ms);
    loop {
        let batch = consumer.recv_batch(100).await.unwrap();
        tokio::time::sleep(work).await;
        let mut text = String::new();
        for m in &batch {
            text.push_str("DONE ");
            text.push_str(&String::from_utf8_lossy(&m.payload));
            text.push('\n');
        }
        out.write_all(text.as_bytes()).unwrap();
        out.flush().unwrap();
        consumer.ack_all(&batch).await.unwrap();
    }
}
