//! `slotq demo`: a throwaway cluster, shown and cleaned up.

use slotq::{Cluster, ClusterConfig, redis};
use slotq_testkit::ClusterBuilder;

use crate::CliError;
use crate::args::DemoArgs;

/// Starts a cluster, prints its slot map and where sample keys route, then stops it.
pub async fn run(args: &DemoArgs) -> Result<String, CliError> {
    let (masters, replicas) = (args.masters, args.replicas);
    eprintln!("starting a local cluster: {masters} masters, {replicas} replica(s) each ...");
    let cluster = tokio::task::spawn_blocking(move || {
        ClusterBuilder::new()
            .masters(masters)
            .replicas(replicas)
            .start()
    })
    .await
    .map_err(|e| CliError::Other(e.to_string()))??;
    let router = Cluster::connect(ClusterConfig::from_url(&cluster.url())?).await?;
    let mut out = super::slots::run(&router, None, false).await?;
    out.push_str("\nwhere keys land (computed client-side, written through the router):\n");
    let mut rows = Vec::new();
    for i in 0..6 {
        let key = format!("demo:{{orders#{i}}}:ready");
        let slot = slotq::slot::key_slot(&key);
        let _: i64 = router
            .query(slot, redis::cmd("RPUSH").arg(&key).arg("hello"))
            .await?;
        let owner = router
            .topology()
            .owner(slot)
            .map(|a| a.to_string())
            .unwrap_or_default();
        rows.push(vec![key, slot.to_string(), owner]);
    }
    out.push_str(&crate::output::table(&["KEY", "SLOT", "MASTER"], &rows));
    out.push_str("\nthe cluster is stopped and its files deleted.\n");
    drop(cluster);
    Ok(out)
}
