//! Bad input gets typed, clear errors: not a Redis URL, not a Redis server, nobody
//! listening, a standalone server where a cluster is required.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use slotq::{Cluster, ClusterConfig, Error};
use slotq_testkit::Server;

#[tokio::test]
async fn url_that_is_not_redis() {
    for url in [
        "http://127.0.0.1:6379",
        "localhost:6379",
        "redis+unix:///tmp/x.sock",
    ] {
        let err = ClusterConfig::from_url(url).unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err:?}");
        assert!(err.to_string().contains("redis://"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_does_not_speak_redis() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten().take(4) {
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    let t0 = Instant::now();
    let err = Cluster::connect(ClusterConfig::from_url(&url).unwrap())
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, Error::Connect { .. } | Error::Protocol(_)),
        "{err:?}"
    );
    eprintln!("non-Redis server: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_listening() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err =
        Cluster::connect(ClusterConfig::from_url(&format!("redis://127.0.0.1:{port}")).unwrap())
            .await
            .unwrap_err();
    match &err {
        Error::Connect { node, cause, .. } => {
            assert_eq!(node.port, port);
            // The I/O error itself is kept, not only its text.
            let io = cause
                .as_ref()
                .and_then(|c| c.inner().downcast_ref::<std::io::Error>())
                .expect("the io::Error behind it");
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("{other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some());
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_where_a_cluster_is_required() {
    let s = Server::start().unwrap();
    let cfg = ClusterConfig::from_url(&s.url())
        .unwrap()
        .require_cluster(true);
    let err = Cluster::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::NotACluster { .. }), "{err:?}");
    assert!(err.to_string().contains("standalone"), "{err}");
}

#[tokio::test]
async fn zero_deadline_is_rejected_before_connecting() {
    let cfg = ClusterConfig::from_url("redis://127.0.0.1:1")
        .unwrap()
        .request_timeout(Duration::ZERO);
    let err = Cluster::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
