//! slotq: one logical queue spread over every master of a Redis Cluster.
//!
//! Every widely used Redis queue keeps a whole queue in one hash slot, so one master does
//! all its work. slotq computes hash slots on the client, places a queue's shards (one
//! list per shard, each in its own slot) on different masters, and routes every command
//! itself, surviving MOVED/ASK redirects, slot migrations and node failures.
//!
//! # Layout
//!
//! Data flows one way: API → producer/consumer → placement → [`cluster`] → [`topology`] /
//! [`slot`].
//!
//! - [`client`]: the entry point; [`queue`]: a logical queue, its registry and stats.
//! - [`producer`]: batching sends, balanced over shards; [`consumer`]: balanced pops and
//!   server-side blocking when idle.
//! - [`group`]: consumer groups: which member owns which shard, heartbeats in Redis; grants
//!   carry epochs that the shards' fences check (ordered groups).
//! - [`lease`]: at-least-once delivery: envelope, leases, ack / nack, dead letters.
//! - [`placement`]: queue names, keys, which shard tags live on which master.
//! - [`slot`]: CRC16/XMODEM hash slots and hash tags; finding tags for given slots (pure).
//! - [`topology`]: the slot map from `CLUSTER SHARDS` / `CLUSTER SLOTS`, or one standalone
//!   node owning every slot; gaps kept visible (`topology/reply.rs` reads the replies).
//! - [`cluster`]: the router: one shared connection per node, routing by slot, redirects,
//!   retries within deadlines, node health, single-flight refresh.
//! - [`telemetry`]: metric names (the `metrics` facade).
//! - [`config`]: settings and their defaults as named constants.
//! - [`error`]: the one error type.
//!
//! # Example: a queue over the whole cluster
//!
//! ```no_run
//! # async fn example() -> slotq::Result<()> {
//! let client = slotq::Client::open("redis://127.0.0.1:7000").await?;
//! let queue = client.queue("orders").open().await?; // one shard per master
//! let producer = queue.producer().build()?;
//! producer.send("order 1").await?; // resolves once Redis stored it
//! producer.send_keyed("customer-7", "order 2").await?; // FIFO per key
//!
//! let mut consumer = queue.consumer().build()?;
//! let msg = consumer.recv().await?; // blocks server-side while the queue is empty
//! assert_eq!(msg.attempt, 1);
//! # Ok(())
//! # }
//! ```
//!
//! At-least-once queues (`client.queue("payments").reliable()`) hand out leased messages:
//! settle them with [`Message::ack`], [`Message::nack`] or [`Consumer::ack_all`].
//!
//! # Example: the router alone
//!
//! ```no_run
//! # async fn example() -> slotq::Result<()> {
//! use slotq::{Cluster, ClusterConfig, slot::key_slot};
//!
//! let cluster = Cluster::connect(ClusterConfig::from_url("redis://127.0.0.1:7000")?).await?;
//! let key = "slotq:{orders#0}:ready";
//! let len: i64 = cluster.query(key_slot(key), redis::cmd("LLEN").arg(key)).await?;
//! println!("{len} messages, slot map: {:?}", cluster.topology());
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod delete;
pub mod delete_fence;
pub mod error;
pub mod group;
pub mod lease;
pub mod meta;
pub mod node_addr;
pub mod placement;
pub mod priority;
pub mod producer;
pub mod queue;
pub mod rebalance;
mod script;
pub mod server_error;
pub mod slot;
pub mod telemetry;
pub mod topology;

pub use client::Client;
pub use cluster::{Cluster, RequestOpts, RouterStats};
pub use config::ClusterConfig;
pub use consumer::{Consumer, Message};
pub use error::{Cause, Error, Result};
pub use lease::{DeadReason, LeaseId, MessageId, SettleReport, Settled};
pub use meta::{Meta, SendOptions};
pub use placement::DeliveryMode;
pub use priority::Priority;
pub use producer::{EmptyPayloads, Producer};
pub use queue::{FlowTotals, Queue, ShardStats};
pub use server_error::{RetryMethod, ServerErrorKind};
pub use topology::{NodeAddr, Topology};

/// The `redis` crate this library speaks through (for building commands).
pub use redis;
