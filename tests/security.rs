//! TLS and ACL authentication, and their failures as typed errors.

use slotq::redis;
use slotq::{Cluster, ClusterConfig, Error};
use slotq_testkit::{ClusterBuilder, ServerBuilder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_standalone_with_ca() {
    let s = ServerBuilder::new().tls().start().unwrap();
    assert!(s.url().starts_with("rediss://"));
    let ca = s.tls_files().unwrap().ca_pem();
    let cfg = ClusterConfig::from_url(&s.url()).unwrap().tls_root_cert(ca);
    let r = Cluster::connect(cfg).await.unwrap();
    let n: i64 = r
        .query_key("t", redis::cmd("RPUSH").arg("t").arg("a"))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_trusted_ca_is_a_tls_error() {
    let s = ServerBuilder::new().tls().start().unwrap();
    let err = Cluster::connect(ClusterConfig::from_url(&s.url()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_server_is_a_clear_error() {
    let s = ServerBuilder::new().start().unwrap();
    let url = format!("rediss://127.0.0.1:{}", s.port());
    let err = Cluster::connect(ClusterConfig::from_url(&url).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Tls { .. } | Error::Connect { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_routes_across_masters() {
    let c = ClusterBuilder::new().masters(3).tls().start().unwrap();
    let ca = c.tls_files().unwrap().ca_pem();
    let cfg = ClusterConfig::from_url(&c.url())
        .unwrap()
        .tls_root_cert(ca)
        .require_cluster(true);
    let r = Cluster::connect(cfg).await.unwrap();
    assert_eq!(r.topology().masters().len(), 3);
    for i in 0..30 {
        let k = format!("tls:{i}");
        let _: () = r
            .query_key(&k, redis::cmd("SET").arg(&k).arg(i))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_works_and_wrong_password_is_an_auth_error() {
    let c = ClusterBuilder::new()
        .masters(2)
        .user("app", "s3cret")
        .start()
        .unwrap();
    let url = c.url();
    assert!(url.contains("app:s3cret@"));
    let r = Cluster::connect(ClusterConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let _: () = r
        .query_key("acl", redis::cmd("SET").arg("acl").arg(1))
        .await
        .unwrap();

    let wrong = url.replace("s3cret", "nope");
    let err = Cluster::connect(ClusterConfig::from_url(&wrong).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("nope"),
        "the password is not echoed: {err}"
    );

    let anonymous = format!("redis://127.0.0.1:{}", c.node(0).port());
    let err = Cluster::connect(ClusterConfig::from_url(&anonymous).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
}
