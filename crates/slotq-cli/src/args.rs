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
    /// Example: slotq --url redis://127.0.0.1:7000 slots
    Slots,
    /// Start, stop or inspect a local throwaway cluster of redis-server processes.
    #[command(name = "dev-cluster")]
    DevCluster {
        /// What to do.
        #[command(subcommand)]
        action: DevAction,
    },
    /// Start a throwaway local cluster, show how slotq routes over it, and clean up.
    Demo(DemoArgs),
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
}
