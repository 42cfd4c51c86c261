//! Headers and time to live against a real 3-master cluster, in both queue modes: headers
//! arrive as sent, through redelivery, dead-lettering, replay and scheduling; an expired
//! message is never handed out (dropped, or dead-lettered with reason `expired`); payloads
//! that look like an extension arrive byte for byte; bad headers change nothing.

use std::time::{Duration, SystemTime};

use slotq::{Client, DeadReason, Error, Message, Queue, SendOptions};
use slotq_testkit::TestCluster;

async fn client(url: &str) -> Client {
    Client::from_cluster(slotq_tests::router(url).await)
}

async fn receive(q: &Queue, n: usize, within: Duration) -> Vec<Message> {
    let mut c = q.consumer().build().unwrap();
    let mut got = Vec::new();
    let end = std::time::Instant::now() + within;
    while got.len() < n {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = c.recv_batch_timeout(100, left).await.unwrap();
        if batch.iter().any(|m| m.id.is_some()) {
            c.ack_all(&batch).await.unwrap();
        }
        got.extend(batch);
    }
    c.close().await;
    got
}

fn opts() -> SendOptions {
    SendOptions::new()
        .header("content-type", "application/json")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tenant", "ünïcode välue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_deadlines_travel_with_messages_and_expired_ones_are_never_delivered() {
    let c = TestCluster::start(3, 0).unwrap();
    let client = client(&c.url()).await;
    for reliable in [false, true] {
        let name = if reliable { "meta-alo" } else { "meta-amo" };
        let mut b = client.queue(name);
        if reliable {
            b = b.max_attempts(3);
        }
        let q = b.open().await.unwrap();
        let p = q.producer().build().unwrap();
        p.send_with("with-headers", &opts()).await.unwrap();
        p.send_keyed_with("k", "keyed", &opts().ttl(Duration::from_secs(60)))
            .await
            .unwrap();
        p.send_at_with("scheduled", SystemTime::now(), &opts())
            .await
            .unwrap();
        // Plain payloads that begin like an extension or an envelope arrive as sent.
        let tricky: Vec<Vec<u8>> = vec![
            vec![0xA5],
            vec![0xA5, 0x07, 0, 0, 0],
            vec![0xA5, 0x06, 1, 2, 3],
            b"\xa5\x07plain".to_vec(),
        ];
        p.send_batch(&tricky).await.unwrap();
        p.send("plain").await.unwrap();
        let got = receive(&q, 8, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 8, "{name}: {got:?}");
        for m in &got {
            match &m.payload[..] {
                b"with-headers" | b"keyed" | b"scheduled" => {
                    assert_eq!(m.headers(), opts().headers(), "{name}");
                    assert_eq!(m.header("tenant"), Some("ünïcode välue"));
                }
                other => {
                    assert!(
                        m.headers().is_empty() && m.expires_ms().is_none(),
                        "{other:?}"
                    );
                }
            }
        }
        let keyed = got.iter().find(|m| &m.payload[..] == b"keyed").unwrap();
        assert!(keyed.expires_ms().is_some());
        let mut payloads: Vec<Vec<u8>> = got.iter().map(|m| m.payload.to_vec()).collect();
        for t in &tricky {
            assert!(payloads.contains(t), "{name}: {t:?} arrived as sent");
        }
        payloads.retain(|p| !tricky.contains(p));
        assert_eq!(payloads.len(), 4);
        if reliable {
            let mut cons = q.consumer().build().unwrap();
            // Redelivered (nack), dead-lettered, replayed: the headers stay.
            p.send_with("kept", &opts()).await.unwrap();
            let m = cons.recv().await.unwrap();
            m.nack(None).await.unwrap();
            let m = cons.recv().await.unwrap();
            assert_eq!((m.attempt, m.headers()), (2, opts().headers()));
            m.dead_letter().await.unwrap();
            let dead = q.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].headers, opts().headers());
            assert_eq!(q.replay_dead(10).await.unwrap(), 1);
            let m = cons.recv().await.unwrap();
            assert_eq!(
                (&m.payload[..], m.headers()),
                (&b"kept"[..], opts().headers())
            );
            m.ack().await.unwrap();
            cons.close().await;
        }

        // Expired: never handed out.
        let short = SendOptions::new().ttl(Duration::from_millis(200));
        p.send_batch_with(["e1", "e2", "e3"], &short).await.unwrap();
        p.send_with("fresh", &SendOptions::new().ttl(Duration::from_secs(60)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let got = receive(&q, 2, Duration::from_secs(2)).await;
        let payloads: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(payloads, [b"fresh".as_slice()], "{name}");
        if reliable {
            let dead = q.dead_letters(10).await.unwrap();
            let expired: Vec<_> = dead
                .iter()
                .filter(|d| d.reason == DeadReason::Expired)
                .collect();
            assert_eq!(expired.len(), 3, "{dead:?}");
            q.purge_dead().await.unwrap();
        }
        let s = q.stats().await.unwrap();
        assert_eq!(s.iter().map(|s| s.depth).sum::<u64>(), 0, "{name}");
        assert_eq!(
            s.iter().map(|s| s.in_flight.unwrap_or(0)).sum::<u64>(),
            0,
            "{name}: nothing left leased"
        );

        // Bad headers or time to live: refused, nothing stored.
        let long = "v".repeat(slotq::meta::MAX_HEADERS_BYTES);
        for bad in [
            SendOptions::new().header("", "x"),
            SendOptions::new().header("a=b", "x"),
            SendOptions::new().header("k", long.as_str()),
            SendOptions::new().ttl(Duration::ZERO),
        ] {
            assert!(matches!(
                p.send_with("x", &bad).await,
                Err(Error::InvalidHeader(_))
            ));
        }
        let s = q.stats().await.unwrap();
        assert_eq!(s.iter().map(|s| s.depth).sum::<u64>(), 0);
    }

    // At-least-once, created to drop expired messages: acknowledged, not dead-lettered.
    let q = client
        .queue("meta-drop")
        .reliable()
        .drop_expired()
        .open()
        .await
        .unwrap();
    let p = q.producer().build().unwrap();
    p.send_batch_with(
        ["x", "y"],
        &SendOptions::new().ttl(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receive(&q, 1, Duration::from_millis(800)).await.is_empty());
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    let s = q.stats().await.unwrap();
    assert_eq!(
        s.iter()
            .map(|s| s.depth + s.in_flight.unwrap() + s.dead.unwrap())
            .sum::<u64>(),
        0
    );
}
