//! The `slotq` command line.

mod args;
mod cmd;
mod json;
mod output;

use std::process::ExitCode;

use clap::Parser;
use slotq::{Cluster, ClusterConfig};

use args::{Cli, Command};

// The binary moves millions of small buffers per second; mimalloc handles that far better
// than the system allocator. (The library leaves the allocator to its users.) It is built
// without transparent huge pages (the `no_thp` feature: mimalloc disables them for this
// process, which child processes of `consume --exec` inherit): with them, mimalloc's fresh
// pages were 2 MiB faults zeroed in the allocating thread, stalling the runtime for 5-25 ms
// at a time (p99 latency at 270,000 msgs/s: 2.9-8.6 ms with, 0.50 ms without; see
// docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for a failure of the operation itself (server error, bad state).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or invalid input (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when Redis could not be reached or answered with a retryable error.
pub const EXIT_UNAVAILABLE: u8 = 3;

/// Exit code when the named queue does not exist.
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit code when standard output could not be written (a full disk, an I/O error). A
/// closed pipe (`slotq pop Q -n 1000 | head -1`) is not an error: the reader is done, and
/// the command stops quietly with 0 after giving back what it did not write.
pub const EXIT_OUTPUT: u8 = 5;
/// Not enqueued: a message with the same dedup id was sent within its window.
pub const EXIT_DUPLICATE: u8 = 6;

/// Errors of the CLI, each with an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid arguments.
    #[error("{0}")]
    Usage(String),
    /// An error from the library.
    #[error("{0}")]
    Slotq(#[from] slotq::Error),
    /// An error from the testkit (local clusters).
    #[error("{0}")]
    Testkit(#[from] slotq_testkit::TestkitError),
    /// Standard output could not be written; `given_back` messages went back to the queue.
    #[error("writing output: {error}{}", given_back_note(*.given_back))]
    Output {
        /// What the write returned.
        error: std::io::Error,
        /// Messages popped but not written, given back (plain queues: to the head of their
        /// shard; at-least-once: released from their leases).
        given_back: usize,
    },
    /// Something asked for by name is not there (exit code 4); the text says what was
    /// done with the rest.
    #[error("{0}")]
    NotFound(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn given_back_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} message(s) not written went back to the queue)")
    }
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::InvalidUrl { .. } | slotq::Error::Config(_)) => {
                EXIT_USAGE
            }
            CliError::Slotq(
                slotq::Error::InvalidQueueName { .. }
                | slotq::Error::InvalidGroupName { .. }
                | slotq::Error::GroupModeMismatch { .. }
                | slotq::Error::InvalidPayload(_),
            ) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::QueueNotFound(_)) => EXIT_NOT_FOUND,
            CliError::NotFound(_) => EXIT_NOT_FOUND,
            CliError::Slotq(slotq::Error::InvalidDedupId(_)) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::InvalidMessageId(_)) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::InvalidSchedule(_)) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::InvalidHeader(_)) => EXIT_USAGE,
            CliError::Slotq(slotq::Error::InvalidPriority(_) | slotq::Error::Priorities(_)) => {
                EXIT_USAGE
            }
            CliError::Slotq(slotq::Error::Duplicate { .. }) => EXIT_DUPLICATE,
            CliError::Slotq(slotq::Error::NotReliable(_)) => EXIT_USAGE,
            CliError::Slotq(e) if e.is_retryable() => EXIT_UNAVAILABLE,
            CliError::Output { error, .. } if output::is_closed_pipe(error) => EXIT_OK,
            CliError::Output { .. } => EXIT_OUTPUT,
            _ => EXIT_FAILURE,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLOTQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match run(&cli).await {
        Ok(out) => output::RawOut::stdout()
            .and_then(|mut o| o.write_all(out.as_bytes()))
            .map_err(|error| CliError::Output {
                error,
                given_back: 0,
            }),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            // A closed pipe is the reader's choice, not a failure worth a message.
            if !matches!(&e, CliError::Output { error, .. } if output::is_closed_pipe(error)) {
                eprintln!("slotq: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: &Cli) -> Result<String, CliError> {
    match &cli.command {
        Command::Keyslot { keys } => Ok(cmd::keyslot::run(keys, cli.json)),
        Command::Slots { queue } => {
            let cluster = connect(cli).await?;
            cmd::slots::run(&cluster, queue.as_deref(), cli.json).await
        }
        Command::Push {
            queue,
            messages,
            null,
            key,
            reliable,
            max_attempts,
            no_durability,
            dedup_id,
            delay,
            at,
            headers,
            ttl,
            priority,
        } => {
            let cluster = connect(cli).await?;
            let opts = cmd::push::Options {
                schedule: delay
                    .map(cmd::push::Schedule::Delay)
                    .or(at.map(cmd::push::Schedule::At)),
                options: {
                    let mut o = slotq::SendOptions::new();
                    for (k, v) in headers {
                        o = o.header(k, v);
                    }
                    if let Some(t) = ttl {
                        o = o.ttl(*t);
                    }
                    if let Some(p) = priority {
                        o = o.priority(*p);
                    }
                    o
                },
                no_durability: *no_durability,
                dedup_id: dedup_id.clone(),
                key: key.clone(),
                reliable: reliable.then_some(*max_attempts),
                null: *null,
                json: cli.json,
            };
            cmd::push::run(&cluster, queue, messages, opts).await
        }
        Command::Exporter { listen, queues } => {
            let cluster = connect(cli).await?;
            cmd::exporter::run(&cluster, *listen, queues).await
        }
        Command::Dashboard {
            listen,
            queues,
            allow_writes,
            token,
        } => {
            let cluster = connect(cli).await?;
            let opts = cmd::dashboard::Options {
                listen: *listen,
                queues: queues.clone(),
                allow_writes: *allow_writes,
                token: token.clone(),
            };
            cmd::dashboard::run(&cluster, opts).await
        }
        Command::Cancel { queue, ids } => {
            let cluster = connect(cli).await?;
            cmd::dead::cancel(&cluster, queue, ids, cli.json).await
        }
        Command::Pop {
            queue,
            count,
            wait,
            ack,
            null,
        } => {
            let cluster = connect(cli).await?;
            let format = cmd::queue::OutputFormat {
                null: *null,
                json: cli.json,
            };
            cmd::queue::pop(&cluster, queue, *count, *wait, *ack, format).await
        }
        Command::Consume {
            queue,
            ack,
            metrics,
            count,
            group,
            ordered,
            null,
            lease,
            unconfirmed_pops,
            exec,
        } => {
            // The recorder goes in before the router exists, so that nothing is missed.
            let handle = match metrics {
                Some(addr) => Some((*addr, cmd::consume::install_recorder()?)),
                None => None,
            };
            let cluster = connect(cli).await?;
            let opts = cmd::consume::Options {
                ack: *ack,
                metrics: handle,
                count: *count,
                group: group.clone(),
                ordered: *ordered,
                null: *null,
                lease: *lease,
                unconfirmed_pops: *unconfirmed_pops,
                exec: exec.exec.as_ref().map(|command| cmd::exec::Settings {
                    queue: queue.clone(),
                    command: command.clone(),
                    concurrency: usize::from(exec.concurrency),
                    timeout: exec.timeout,
                    backoff: exec.backoff,
                    backoff_max: exec.backoff_max,
                    grace: exec.grace,
                    lease: lease.unwrap_or(slotq::lease::DEFAULT_LEASE),
                    count: *count,
                    ordered: *ordered,
                }),
            };
            cmd::consume::run(&cluster, queue, opts).await
        }
        Command::Group { queue, group } => {
            let cluster = connect(cli).await?;
            cmd::group::run(&cluster, queue, group, cli.json).await
        }
        Command::Dead {
            queue,
            action,
            count,
            ids,
        } => {
            let cluster = connect(cli).await?;
            cmd::dead::run(&cluster, queue, *action, *count, ids, cli.json).await
        }
        Command::Stats {
            queue, watch: None, ..
        } => {
            let cluster = connect(cli).await?;
            cmd::queue::stats(&cluster, queue, cli.json).await
        }
        Command::Stats {
            queue,
            watch: Some(every),
            count,
        } => {
            let cluster = connect(cli).await?;
            cmd::queue::watch(&cluster, queue, *every, *count, cli.json).await
        }
        Command::Plan {
            queue,
            shards_per_master,
            simulate: Some(masters),
            reshard,
        } => {
            slotq::placement::validate_queue_name(queue)?;
            cmd::rebalance::simulate(*masters, *shards_per_master, *reshard, cli.json)
        }
        Command::Plan {
            queue,
            shards_per_master,
            simulate: None,
            ..
        } => {
            let cluster = connect(cli).await?;
            cmd::queue::plan(&cluster, queue, *shards_per_master, cli.json).await
        }
        Command::Rebalance {
            queue,
            dry_run,
            watch,
            wait,
        } => {
            let cluster = connect(cli).await?;
            let opts = cmd::rebalance::Options {
                dry_run: *dry_run,
                watch: *watch,
                wait: *wait,
                json: cli.json,
            };
            cmd::rebalance::run(&cluster, queue, opts).await
        }
        Command::Delete { queue, yes } => {
            let cluster = connect(cli).await?;
            cmd::inspect::delete(&cluster, queue, *yes, cli.json).await
        }
        Command::Pause { queue } => {
            let cluster = connect(cli).await?;
            cmd::queue::set_paused(&cluster, queue, true, cli.json).await
        }
        Command::Resume { queue } => {
            let cluster = connect(cli).await?;
            cmd::queue::set_paused(&cluster, queue, false, cli.json).await
        }
        Command::Queues => {
            let cluster = connect(cli).await?;
            cmd::inspect::queues(&cluster, cli.json).await
        }
        Command::Peek { queue, count, null } => {
            let cluster = connect(cli).await?;
            cmd::inspect::peek(&cluster, queue, *count, *null, cli.json).await
        }
        Command::Expand { queue } => {
            let cluster = connect(cli).await?;
            cmd::queue::expand(&cluster, queue, cli.json).await
        }
        Command::Bench(args) => {
            let cluster = connect(cli).await?;
            cmd::bench::run(&cluster, &cli.url, args, cli.json).await
        }
        Command::DevCluster { action } => {
            tokio::task::block_in_place(|| cmd::dev_cluster::run(action, cli.json))
        }
        Command::Demo(args) => cmd::demo::run(args).await,
    }
}

async fn connect(cli: &Cli) -> Result<Cluster, CliError> {
    let mut cfg = ClusterConfig::from_url(&cli.url)?;
    if let Some(path) = &cli.tls_ca {
        let pem = std::fs::read(path).map_err(|e| {
            CliError::Usage(format!("cannot read --tls-ca {}: {e}", path.display()))
        })?;
        cfg = cfg.tls_root_cert(pem);
    }
    Ok(Cluster::connect(cfg).await?)
}
