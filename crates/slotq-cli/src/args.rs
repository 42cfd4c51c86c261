//! Raw command-line arguments (clap derive). Validation into settings happens in the
//! commands, so `--help` stays the single description of every flag.

use clap::{Args, Parser, Subcommand};

/// Default seed URL: the first node of `slotq dev-cluster up`.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:7000";
/// Default first port of a dev cluster.
pub const DEFAULT_DEV_PORT: u16 = 7000;

/// slotq: one logical queue spread over every master of a Redis Cluster.
#[derive(Debug, Parser)]
#[command(name = "slotq", version, about, long_about = None)]
pub struct Cli {
    /// Any node of the cluster (or a standalone server): `redis://[user:pass@]host:port`,
    /// `rediss://` for TLS.
    #[arg(long, global = true, env = "SLOTQ_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// PEM file of a CA to trust for rediss:// connections.
    #[arg(long, global = true, env = "SLOTQ_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the hash slot of each key (no server needed).
    ///
    /// Example: slotq keyslot 'orders' '{orders#0}:ready'
    Keyslot {
        /// Keys to hash.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show the cluster's masters, replicas, slot ranges and keys per node.
    ///
    /// Example: slotq --url redis://127.0.0.1:7000 slots --queue orders
    Slots {
        /// Also show where this queue's shards sit and how even the spread is.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Push messages: the arguments, or one message per line of standard input (bytes,
    /// sent as lines arrive; `-0` for NUL-separated messages).
    ///
    /// Example: seq 1 1000 | slotq push orders
    Push {
        /// Queue name (created if missing).
        queue: String,
        /// Messages; none means one per stdin line.
        messages: Vec<String>,
        /// Standard input holds NUL-separated messages (which may contain newlines).
        #[arg(short = '0', long)]
        null: bool,
        /// Send keyed: every message goes to the shard this key maps to (FIFO per key).
        #[arg(long)]
        key: Option<String>,
        /// Create a missing queue in at-least-once mode (leases, acks, dead letters).
        #[arg(long)]
        reliable: bool,
        /// With --reliable: deliveries before a message is dead-lettered.
        #[arg(long, default_value_t = slotq::placement::DEFAULT_MAX_ATTEMPTS)]
        max_attempts: u32,
        /// A dedup id for the one message given: not enqueued if a message with this id
        /// was sent to the queue within the last 10 minutes (exit code 6 then).
        #[arg(long, value_name = "ID", conflicts_with_all = ["key", "null"])]
        dedup_id: Option<String>,
        /// At-least-once queues: do not wait for a replica to confirm each push (by
        /// default a push to a master with a live replica waits for it, so that a failover
        /// loses no acknowledged message).
        #[arg(long)]
        no_durability: bool,
        /// Schedule: each message becomes ready this long after it is sent (`30s`, `5m`,
        /// `1h 30m`, `250ms`). Prints each message's id (for `slotq cancel`) on stdout.
        #[arg(long, value_name = "DURATION", value_parser = parse_delay, conflicts_with_all = ["at", "dedup_id"])]
        delay: Option<std::time::Duration>,
        /// Schedule: every message becomes ready at this time (RFC 3339, e.g.
        /// `2026-12-24T18:00:00Z`; compared with the Redis servers' clocks). Prints each
        /// message's id on stdout.
        #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "dedup_id")]
        at: Option<std::time::SystemTime>,
        /// A header for every message (repeatable): `content-type=application/json`,
        /// `traceparent=00-...`. Keys: visible ASCII without `=`; 4 KiB in all.
        #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header, conflicts_with = "dedup_id")]
        headers: Vec<(String, String)>,
        /// Every message expires this long after it is sent (`60s`, `1h`): never delivered
        /// after that (dropped, or dead-lettered with reason `expired` on at-least-once
        /// queues).
        #[arg(long, value_name = "DURATION", value_parser = parse_delay, conflicts_with = "dedup_id")]
        ttl: Option<std::time::Duration>,
        /// Priority of every message: high, normal (the default) or low; consumers take
        /// higher levels first. A missing queue is created with priorities (at-most-once
        /// queues only); an existing one must have been created with them.
        #[arg(long, value_name = "LEVEL", value_parser = parse_priority, conflicts_with = "dedup_id")]
        priority: Option<slotq::Priority>,
    },
    /// Serve the queues' gauges for Prometheus at http://ADDR/metrics (depth, in flight,
    /// delayed, dead, oldest age, scheduled per shard and node; members and lag per
    /// consumer group), read from the cluster at each scrape, until Ctrl-C or SIGTERM.
    ///
    /// Example: slotq exporter --listen 127.0.0.1:9465 --queue orders
    Exporter {
        /// Where to listen (localhost by default: the gauges name your queues).
        #[arg(long, default_value = "127.0.0.1:9465")]
        listen: std::net::SocketAddr,
        /// Only these queues (repeatable); without, every slotq queue on the cluster
        /// (looked for again every 30 s).
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
    },
    /// A live web page of the cluster and its queues: masters and slot ranges, each
    /// queue's shards per master (ready, in flight, dead), messages in and out per second,
    /// groups and their lag, dead letters. Read-only unless started with --allow-writes.
    ///
    /// Example: slotq dashboard --listen 127.0.0.1:8080
    Dashboard {
        /// Where to listen (localhost by default: the page shows your queues' contents).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Only these queues (repeatable); without, every slotq queue on the cluster
        /// (looked for again every 10 s).
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
        /// Let the page replay and purge dead letters, pause and resume queues.
        #[arg(long)]
        allow_writes: bool,
        /// Require this token on every request of the page (open it as
        /// http://HOST:PORT/#token=TOKEN).
        #[arg(long, env = "SLOTQ_DASHBOARD_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Cancel scheduled messages that are not due yet, by the ids `push --delay/--at`
    /// printed. Exit 4 if one of them was not waiting (due already, cancelled, unknown).
    ///
    /// Example: slotq cancel orders 5c1f0a9e3b7d4c21a8e6f0b2d4c6e8a0
    Cancel {
        /// Queue name.
        queue: String,
        /// Message ids (32 hex digits).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Pop messages and print one per line.
    ///
    /// Example: slotq pop orders -n 10 --wait 5
    Pop {
        /// Queue name.
        queue: String,
        /// Most messages to pop.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: usize,
        /// Seconds to wait for the first message when the queue is empty (0: don't wait).
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
        /// At-least-once queues: acknowledge what was printed. Without it, popped messages
        /// stay leased and come back when the lease expires.
        #[arg(long)]
        ack: bool,
        /// Write a NUL after each payload instead of a newline.
        #[arg(short = '0', long)]
        null: bool,
    },
    /// Run as a consumer: print messages as they arrive (one per line), or run a handler
    /// command per message (--exec), until Ctrl-C or SIGTERM; optionally serve metrics for
    /// Prometheus.
    ///
    /// Example: slotq consume orders --ack --metrics 127.0.0.1:9464
    ///
    /// Example: slotq consume orders --exec './handle.py' --concurrency 8 --timeout 60
    Consume {
        /// Queue name.
        queue: String,
        /// At-least-once queues: acknowledge every message once printed.
        #[arg(long)]
        ack: bool,
        /// Serve the library's metrics at http://ADDR/metrics (Prometheus text format).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// The consumer group to join (its members share the queue's shards).
        #[arg(long, default_value = slotq::group::DEFAULT_GROUP)]
        group: String,
        /// Ordered mode: exclusive shard ownership, no stealing; per-key order holds in
        /// processing.
        #[arg(long)]
        ordered: bool,
        /// Write a NUL after each payload instead of a newline.
        #[arg(short = '0', long, conflicts_with = "exec")]
        null: bool,
        /// At-least-once queues: how long a popped message stays leased before it is
        /// delivered again (with --exec, leases are extended while the handler runs).
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        lease: Option<std::time::Duration>,
        /// At-most-once queues: hand out pops no replica confirmed (faster; a failover may
        /// then deliver a message twice). By default a pop from a master with a live
        /// replica is confirmed first.
        #[arg(long)]
        unconfirmed_pops: bool,
        /// Run a handler per message instead of printing.
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// A consumer group: members, their shards and lag, last heartbeats.
    ///
    /// Example: slotq group orders --group billing
    Group {
        /// Queue name.
        queue: String,
        /// The group.
        #[arg(long, default_value = slotq::group::DEFAULT_GROUP)]
        group: String,
    },
    /// Dead letters of an at-least-once queue: list, replay into the queue, or purge.
    ///
    /// Each dead letter says why it died (REASON: attempts, failed, rejected, expired,
    /// unreadable) and when.
    ///
    /// Example: slotq dead orders list -n 20; slotq dead orders replay --id 0f3a...
    Dead {
        /// Queue name.
        queue: String,
        /// What to do.
        #[arg(value_enum)]
        action: DeadAction,
        /// Most messages per shard (list, replay).
        #[arg(short = 'n', long = "count", default_value_t = 100)]
        count: usize,
        /// replay: only the dead letter with this message id (32 hex digits, as `list`
        /// prints it); repeatable. Exit 4 if one of them is not among the dead letters.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
    },
    /// Per-shard depth, slot and node of a queue, with totals.
    ///
    /// Example: slotq stats orders --watch 1
    Stats {
        /// Queue name.
        queue: String,
        /// Refresh every SECS seconds, in place on a terminal (one JSON line per refresh
        /// with --json), until Ctrl-C.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch")]
        count: Option<u32>,
    },
    /// Dry run: where a queue's shards would be placed on this cluster; or, with
    /// --simulate N, on N masters with an even slot map (no server is asked).
    ///
    /// Example: slotq plan orders --shards-per-master 2
    ///
    /// Example: slotq plan orders --simulate 1000 --reshard 10
    Plan {
        /// Queue name.
        queue: String,
        /// Shards per master for a new queue.
        #[arg(long, default_value_t = slotq::placement::DEFAULT_SHARDS_PER_MASTER)]
        shards_per_master: u32,
        /// Lay the queue out on this many simulated masters instead of the cluster.
        #[arg(long, value_name = "MASTERS")]
        simulate: Option<usize>,
        /// With --simulate: move this share of every master's slots to the next master
        /// and show what a rebalance would do.
        #[arg(long, value_name = "PCT", requires = "simulate")]
        reshard: Option<f64>,
    },
    /// Bring a queue to exactly its shards per master on every master that owns slots:
    /// add shards, drain surplus ones (producers stop writing to them at once), retire
    /// drained ones (their keys deleted, anything left moved to a live shard).
    ///
    /// Example: slotq rebalance orders --dry-run
    ///
    /// Example: slotq rebalance orders --watch 5
    Rebalance {
        /// Queue name.
        queue: String,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep following the cluster: a step every SECS (masters added or removed, slots
        /// moved) until Ctrl-C or SIGTERM.
        #[arg(long, value_name = "SECS", value_parser = parse_secs, conflicts_with = "dry_run")]
        watch: Option<std::time::Duration>,
        /// Without --watch: how long to keep stepping while shards drain.
        #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_secs_or_zero)]
        wait: std::time::Duration,
    },
    /// Add shards on masters that have fewer than the queue's shards per master.
    ///
    /// Example: slotq expand orders
    Expand {
        /// Queue name.
        queue: String,
    },
    /// Delete a queue: every key of it on every node (messages, leases, dead letters,
    /// groups). Producers and consumers still using it fail with "does not exist".
    ///
    /// Example: slotq delete orders --yes
    Delete {
        /// Queue name.
        queue: String,
        /// Really delete (without it, nothing is deleted).
        #[arg(long)]
        yes: bool,
    },
    /// Pause a queue: every consumer stops taking new messages within a registry poll
    /// (work in hand finishes, leases are still settled); producers go on sending.
    ///
    /// Example: slotq pause orders
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Resume a paused queue.
    ///
    /// Example: slotq resume orders
    Resume {
        /// Queue name.
        queue: String,
    },
    /// Every slotq queue on the cluster: mode, shards, depth, in flight, dead letters.
    ///
    /// Example: slotq queues --json
    Queues,
    /// The head of each shard, nothing removed (at most N messages a shard).
    ///
    /// Example: slotq peek orders -n 5
    Peek {
        /// Queue name.
        queue: String,
        /// Most messages per shard.
        #[arg(short = 'n', long = "count", default_value_t = 10)]
        count: usize,
        /// Write a NUL after each payload instead of a newline.
        #[arg(short = '0', long)]
        null: bool,
    },
    /// Benchmark: push only, pop only, then push and pop together.
    ///
    /// Example: slotq bench --messages 1000000 --size 64 --producers 4 --consumers 4
    Bench(BenchArgs),
    /// Start, stop or inspect a local throwaway cluster of redis-server processes.
    #[command(name = "dev-cluster")]
    DevCluster {
        /// What to do.
        #[command(subcommand)]
        action: DevAction,
    },
    /// Start a throwaway local cluster, spread queues over it, run traffic, show where
    /// everything went, and clean up.
    ///
    /// Example: slotq demo            (or: slotq demo --on redis://127.0.0.1:7000)
    Demo(DemoArgs),
}

/// What `dead` does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeadAction {
    /// Print dead letters (oldest first).
    List,
    /// Move dead letters back into the queue (delivery counts reset).
    Replay,
    /// Delete every dead letter.
    Purge,
}

/// `dev-cluster` actions.
#[derive(Debug, Subcommand)]
pub enum DevAction {
    /// Start a cluster in the background and print its URL.
    ///
    /// Example: slotq dev-cluster up --masters 3 --replicas 1 --port 7000
    Up(DevUpArgs),
    /// Stop the cluster started with `up` and delete its files.
    Down(DevPortArgs),
    /// Show whether the cluster's processes run and its state.
    Status(DevPortArgs),
}

/// Options of `dev-cluster up`.
#[derive(Debug, Args)]
pub struct DevUpArgs {
    /// Number of masters.
    #[arg(long, default_value_t = 3)]
    pub masters: usize,
    /// Replicas per master.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// First port; nodes use consecutive ports (and port+10000 for the cluster bus).
    #[arg(long, default_value_t = DEFAULT_DEV_PORT)]
    pub port: u16,
}

/// Options naming a dev cluster.
#[derive(Debug, Args)]
pub struct DevPortArgs {
    /// First port of the cluster.
    #[arg(long, default_value_t = DEFAULT_DEV_PORT)]
    pub port: u16,
}

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of masters of the throwaway cluster.
    #[arg(long, default_value_t = 3)]
    pub masters: usize,
    /// Replicas per master.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Run against this existing cluster (any node) instead of starting one; the demo's
    /// queues are deleted afterwards.
    #[arg(long = "on", value_name = "URL")]
    pub on: Option<String>,
}

/// Options of `bench`.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Messages per phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Payload size in bytes (at least 16: the payload carries an id and a timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Concurrent producer tasks.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Concurrent consumer tasks.
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Keyed sends (1000 keys) instead of unkeyed.
    #[arg(long)]
    pub keyed: bool,
    /// Producers send each message on its own (`send` / `send_keyed`, a chunk's worth at
    /// once) instead of a chunk at a time (`send_batch` / `send_keyed_batch`).
    #[arg(long)]
    pub one_by_one: bool,
    /// At-least-once: consumers lease and acknowledge every message.
    #[arg(long)]
    pub reliable: bool,
    /// Nothing waits for a replica: producers of at-least-once queues send without `WAIT`,
    /// and consumers of at-most-once queues hand out pops no replica confirmed (both wait
    /// by default where masters have replicas): to compare with the plain kind.
    #[arg(long)]
    pub no_durability: bool,
    /// Also measure one plain list driven by the redis crate's cluster client.
    #[arg(long)]
    pub baseline: bool,
    /// Phases to run, comma-separated: push, pop, e2e (pop drains what push pushed).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![BenchPhase::Push, BenchPhase::Pop, BenchPhase::E2e])]
    pub phases: Vec<BenchPhase>,
    /// Run this anchor script (the machine's physical limit, e.g. shared/bench/anchor.sh)
    /// against the same cluster first, at batch 100 and at batch 1000 (the better of the two
    /// per op counts), and report every phase as a ratio to it.
    #[arg(long)]
    pub anchor: Option<std::path::PathBuf>,
    /// Runs the anchor (if given) and the phases this many times, one after the other, and
    /// reports each phase's median round and the median of its ratios, with every round's
    /// figure beside them. Not with --rate or --load.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Queue name (default: a fresh name per run).
    #[arg(long)]
    pub queue: Option<String>,
    /// Open loop: send this many messages a second in all (spread over the producers, on
    /// a schedule that does not slow down when the system does) while the consumers
    /// receive, and report latency from each message's intended send time. Runs instead
    /// of the other phases.
    #[arg(long, conflicts_with = "load")]
    pub rate: Option<f64>,
    /// Consumers outside any group: each sweeps and blocks on every shard (how every
    /// consumer worked before groups).
    #[arg(long)]
    pub without_group: bool,
    /// Consumers form an ordered group: exclusive shard ownership, every pop behind its
    /// shard's fence.
    #[arg(long, conflicts_with = "without_group")]
    pub ordered: bool,
    /// Consumers pop only inside a call, not ahead of the next one (see
    /// `ConsumerBuilder::prefetch`).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Open loop at fractions of this run's own maximum: first a push+pop phase of
    /// --messages measures the maximum, then one open-loop phase per fraction (`10%` or
    /// `0.1`, comma-separated, at most 100%) runs at that fraction of it for --duration
    /// seconds. On a machine whose speed drifts, the load levels stay true to the moment.
    #[arg(long, value_delimiter = ',', value_parser = parse_load, conflicts_with = "rate")]
    pub load: Option<Vec<f64>>,
    /// With --rate or --load: how long to send, in seconds; with --scheduled: the span of
    /// the due times.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Scheduled sends instead of the other phases: the idle cost of N messages waiting
    /// an hour ahead, then how late N messages due over --duration reach the (idle)
    /// consumers.
    #[arg(long, value_name = "N", conflicts_with_all = ["rate", "load"])]
    pub scheduled: Option<usize>,
    /// Priorities under load: N messages (10% high, 60% normal, 30% low) sent by
    /// --producers while --consumers take them; latency per level, messages taken while a
    /// higher one waited longer than 5 / 50 ms, and msgs/s against one level (same N, same
    /// run).
    #[arg(long, value_name = "N", conflicts_with_all = ["rate", "load", "scheduled", "reliable"])]
    pub priorities: Option<usize>,
    /// A consumer curve instead of one run: push, pop and push+pop phases with each of
    /// these consumer counts in turn (`1,4,16,64,256`), --rounds times each; reports msgs/s
    /// and the least and most one consumer took, per count.
    #[arg(long, value_delimiter = ',', value_name = "COUNTS", conflicts_with_all = ["rate", "load", "scheduled"])]
    pub curve: Option<Vec<usize>>,
    /// With --rate or --load: seconds of traffic at the phase's rate, on the same schedule,
    /// before --duration starts. Their latency is reported apart (the warm-up line and
    /// `warm_up` in --json), not in the phase's percentiles.
    #[arg(long, value_name = "SECS", default_value = "0.5", value_parser = parse_secs_or_zero)]
    pub warm_up: std::time::Duration,
}

/// A load level: `10%` or `0.1`, above 0 and at most 100%.
fn parse_load(s: &str) -> Result<f64, String> {
    let (number, scale) = match s.trim().strip_suffix('%') {
        Some(p) => (p, 100.0),
        None => (s.trim(), 1.0),
    };
    let f = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("not a load level: {s:?} (write 10% or 0.1)"))?
        / scale;
    if f.is_finite() && f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!(
            "a load level is above 0 and at most 100%, not {s:?}"
        ))
    }
}

/// `slotq consume --exec`: the worker runner.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Run CMD through `sh -c` once per message: the payload on its standard input,
    /// SLOTQ_QUEUE, SLOTQ_SHARD, SLOTQ_MESSAGE_ID and SLOTQ_ATTEMPT in its environment.
    /// On an at-least-once queue its exit status settles the message: 0 acknowledges,
    /// anything else (or a timeout) negatively acknowledges it with a backoff delay.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Handlers running at once.
    #[arg(long, default_value_t = 1, requires = "exec", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Stop a handler that runs longer than this (SIGTERM to its process group, SIGKILL
    /// 2 s later); the run counts as failed.
    #[arg(long, value_name = "SECS", requires = "exec", value_parser = parse_secs)]
    pub timeout: Option<std::time::Duration>,
    /// Delay before a failed message is delivered again: SECS after the first failure,
    /// doubling with each further attempt.
    #[arg(long, value_name = "SECS", default_value = "1", requires = "exec", value_parser = parse_secs_or_zero)]
    pub backoff: std::time::Duration,
    /// Largest backoff delay.
    #[arg(long, value_name = "SECS", default_value = "300", requires = "exec", value_parser = parse_secs_or_zero)]
    pub backoff_max: std::time::Duration,
    /// On Ctrl-C or SIGTERM: how long running handlers may take to finish before they are
    /// stopped (and their messages given back).
    #[arg(long, value_name = "SECS", default_value = "30", requires = "exec", value_parser = parse_secs_or_zero)]
    pub grace: std::time::Duration,
}

/// A duration in seconds (fractions allowed), more than zero.
fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_secs_or_zero(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// A duration in seconds (fractions allowed), zero or more.
fn parse_secs_or_zero(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= std::time::Duration::from_secs(365 * 24 * 3600))
        .ok_or_else(|| format!("{s:?} is not between 0 and a year"))
}

/// A phase of `slotq bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPhase {
    /// Producers push every message.
    Push,
    /// Consumers pop what the push phase left.
    Pop,
    /// Producers and consumers at once.
    E2e,
}

/// A delay: `30s`, `5m`, `1h 30m`, `250ms` (a bare number is seconds).
fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return std::time::Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a delay (seconds must be 0 or more)"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a delay ({e}); try 30s, 5m or 1h 30m"))
}

/// A point in time, RFC 3339 (`2026-12-24T18:00:00Z`, `2026-12-24T18:00:00.5+01:00`).
fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_rfc3339(s))
        .map_err(|e| format!("{s:?} is not a time ({e}); write it as 2026-12-24T18:00:00Z"))
}

/// A priority: `high`, `normal` or `low`.
fn parse_priority(s: &str) -> Result<slotq::Priority, String> {
    s.parse().map_err(|e: slotq::Error| e.to_string())
}

/// A header: `KEY=VALUE` (the value may hold `=`).
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    slotq::meta::check_header(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}
