//! `slotq consume`: a long-running consumer that can serve metrics for Prometheus.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use slotq::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::CliError;

/// Installs the Prometheus recorder for the library's metrics.
pub fn install_recorder() -> Result<PrometheusHandle, CliError> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| CliError::Other(format!("metrics: {e}")))
}

/// Serves `GET /metrics` (any path) with the current metrics, one response per connection.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
            let body = handle.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

/// How `slotq consume` runs.
pub struct Options {
    /// Acknowledge every message once printed.
    pub ack: bool,
    /// Serve metrics at this address.
    pub metrics: Option<(SocketAddr, PrometheusHandle)>,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// The consumer group to join.
    pub group: String,
    /// Ordered mode.
    pub ordered: bool,
    /// NUL after each payload instead of a newline.
    pub null: bool,
    /// The consumer's lease (at-least-once queues).
    pub lease: Option<Duration>,
    /// At-most-once queues: hand out pops no replica confirmed.
    pub unconfirmed_pops: bool,
    /// Run a handler per message instead of printing (`slotq consume --exec`).
    pub exec: Option<super::exec::Settings>,
}

/// Consumes `queue` until Ctrl-C (or `count` messages), printing one message per line.
pub async fn run(cluster: &Cluster, queue: &str, opts: Options) -> Result<String, CliError> {
    let Options {
        ack,
        metrics,
        count,
        group,
        ordered,
        null,
        lease,
        unconfirmed_pops,
        exec,
    } = opts;
    slotq::group::validate_group_name(&group)?;
    let q = super::queue::open_existing(cluster, queue).await?;
    let reliable = q.mode() != slotq::DeliveryMode::AtMostOnce;
    if ack && !reliable {
        return Err(CliError::Usage(format!(
            "--ack needs an at-least-once queue; {queue} is at-most-once"
        )));
    }
    if let Some((addr, handle)) = metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Usage(format!("--metrics {addr}: {e}")))?;
        eprintln!(
            "serving metrics at http://{}/metrics",
            listener
                .local_addr()
                .map_err(|e| CliError::Other(e.to_string()))?
        );
        tokio::spawn(serve(listener, handle));
    }
    let mut builder = q.consumer().group(group);
    if ordered {
        builder = builder.ordered();
    }
    if let Some(lease) = lease {
        builder = builder.lease(lease);
    }
    if unconfirmed_pops {
        builder = builder.unconfirmed_pops();
    }
    if let Some(settings) = exec {
        // Pop no more than the handlers can take, so little waits leased in the buffer.
        builder = builder.pop_batch(settings.concurrency.min(slotq::consumer::DEFAULT_POP_BATCH));
        super::exec::run(builder.build()?, settings).await?;
        return Ok(String::new());
    }
    let mut consumer = builder.build()?;
    let mut out = crate::output::RawOut::stdout().map_err(|error| CliError::Output {
        error,
        given_back: 0,
    })?;
    // SIGTERM (systemd, docker, Kubernetes) stops it like Ctrl-C: what it took and did not
    // write goes back when the consumer closes.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Other(format!("SIGTERM handler: {e}")))?;
    let mut seen = 0u64;
    loop {
        let want = count.map_or(1000, |c| (c - seen).min(1000) as usize);
        let batch = tokio::select! {
            b = consumer.recv_batch(want) => b?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let n = batch.len() as u64;
        if let Err(e) = super::queue::write_batch(&mut out, &mut consumer, batch, null, ack).await {
            consumer.close().await;
            return Err(e);
        }
        seen += n;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    consumer.close().await;
    Ok(String::new())
}
