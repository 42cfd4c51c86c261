//! One module per subcommand.

pub mod bench;
pub mod consume;
pub mod dashboard;
pub mod dead;
pub mod demo;
pub mod dev_cluster;
pub mod exec;
pub mod exec_order;
pub mod exporter;
pub mod group;
pub mod http;
pub mod inspect;
pub mod keyslot;
pub mod push;
pub mod queue;
pub mod queue_reads;
pub mod rebalance;
pub mod slots;
pub mod stderr_tail;
