//! Network partitions for tests: nftables rules in a table of the test's own, deleted when
//! the value is dropped. Needs root and `nft` (`apt-get install nftables`, done by
//! `tests/run.sh`); without them a test fails loudly rather than skipping.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A table of drop rules; `Drop` deletes it (every rule with it).
pub struct Partition {
    table: String,
}

fn nft(args: &str) {
    let out = Command::new("nft")
        .args(args.split(' '))
        .output()
        .expect("nft runs (apt-get install nftables; tests need root)");
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Partition {
    /// An empty table with an output chain (loopback traffic passes it).
    pub fn new() -> Partition {
        let table = format!(
            "slotq_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        nft(&format!("add table inet {table}"));
        nft(&format!(
            "add chain inet {table} out {{ type filter hook output priority 0 ; }}"
        ));
        Partition { table }
    }

    /// Drops every TCP packet sent to `port` (clients to a node; its cluster bus, on
    /// port + 10000, still passes).
    pub fn cut_port(&self, port: u16) {
        nft(&format!(
            "add rule inet {} out tcp dport {port} drop",
            self.table
        ));
    }

    /// Cuts `ip` off from the node listening on `port` (both directions; its connections
    /// to other ports still pass).
    pub fn cut_ip_from_port(&self, ip: &str, port: u16) {
        nft(&format!(
            "add rule inet {} out ip saddr {ip} tcp dport {port} drop",
            self.table
        ));
        nft(&format!(
            "add rule inet {} out ip daddr {ip} tcp sport {port} drop",
            self.table
        ));
    }

    /// Deletes the rules: the network is whole again.
    pub fn heal(&self) {
        nft(&format!("flush chain inet {} out", self.table));
    }
}

impl Default for Partition {
    fn default() -> Self {
        Partition::new()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

impl Partition {
    /// Cuts `ip` off from each of `others` (both directions); traffic with any other
    /// address (clients on 127.0.0.1) still passes.
    pub fn isolate(&self, ip: &str, others: &[&str]) {
        for o in others {
            nft(&format!(
                "add rule inet {} out ip saddr {ip} ip daddr {o} drop",
                self.table
            ));
            nft(&format!(
                "add rule inet {} out ip saddr {o} ip daddr {ip} drop",
                self.table
            ));
        }
    }
}

impl Partition {
    /// Cuts node `m` of `c` off from every other node of `c` (clients still reach it).
    pub fn isolate_node(&self, c: &slotq_testkit::TestCluster, m: usize) {
        self.isolate_from_nodes(c.node(m).host(), c, m);
    }

    /// Cuts `ip` off from every node of `c` but node `except`.
    pub fn isolate_from_nodes(&self, ip: &str, c: &slotq_testkit::TestCluster, except: usize) {
        let others: Vec<String> = (0..c.len())
            .filter(|&i| i != except)
            .map(|i| c.node(i).host().to_string())
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        self.isolate(ip, &others);
    }
}
