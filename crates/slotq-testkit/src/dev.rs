//! A dev cluster that outlives the process that started it: its processes are detached
//! and a state file in its directory lists them, so a later process can stop them.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{ClusterBuilder, Result, TestkitError};

/// Name of the state file inside a dev cluster's directory.
pub const STATE_FILE: &str = "dev-cluster.state";

/// The default directory of the dev cluster whose first node listens on `port`.
pub fn default_dir(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("slotq-dev-cluster-{port}"))
}

/// What a detached dev cluster consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCluster {
    /// The directory holding the nodes' files and the state file.
    pub dir: PathBuf,
    /// `(port, pid)` of every node.
    pub nodes: Vec<(u16, u32)>,
}

impl DevCluster {
    /// Starts a cluster on ports `port..`, detaches it and writes its state file.
    pub fn up(port: u16, masters: usize, replicas: usize, dir: &Path) -> Result<DevCluster> {
        if dir.join(STATE_FILE).exists() {
            if let Ok(old) = DevCluster::load(dir)
                && old.running() > 0
            {
                return Err(TestkitError::Setup(format!(
                    "a dev cluster is already running from {} (ports {}); stop it with `slotq dev-cluster down --port {port}`",
                    dir.display(),
                    old.ports()
                )));
            }
            std::fs::remove_dir_all(dir)?;
        }
        let total = masters * (1 + replicas);
        for p in port..port + total as u16 {
            if !crate::ports::bindable(p) || !crate::ports::bindable(p + 10000) {
                return Err(TestkitError::Setup(format!(
                    "port {p} (or its cluster bus port {}) is in use; choose another --port",
                    p + 10000
                )));
            }
        }
        let cluster = ClusterBuilder::new()
            .masters(masters)
            .replicas(replicas)
            .base_port(port)
            .dir(dir)
            .own_process_group()
            .start()?;
        let dev = DevCluster {
            dir: dir.to_path_buf(),
            nodes: cluster.detach(),
        };
        dev.save()?;
        Ok(dev)
    }

    /// Reads the state file in `dir`.
    pub fn load(dir: &Path) -> Result<DevCluster> {
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| {
            TestkitError::Setup(format!("no dev cluster state in {} ({e})", dir.display()))
        })?;
        let nodes = text
            .lines()
            .filter_map(|l| {
                let (port, pid) = l.split_once(' ')?;
                Some((port.parse().ok()?, pid.parse().ok()?))
            })
            .collect();
        Ok(DevCluster {
            dir: dir.to_path_buf(),
            nodes,
        })
    }

    fn save(&self) -> Result<()> {
        let text: String = self
            .nodes
            .iter()
            .map(|(port, pid)| format!("{port} {pid}\n"))
            .collect();
        std::fs::write(self.dir.join(STATE_FILE), text)?;
        Ok(())
    }

    /// The URL of the first node.
    pub fn url(&self) -> String {
        format!(
            "redis://127.0.0.1:{}",
            self.nodes.first().map_or(0, |n| n.0)
        )
    }

    /// How many of its processes still run.
    pub fn running(&self) -> usize {
        self.nodes.iter().filter(|(_, pid)| alive(*pid)).count()
    }

    /// The ports as `a-b` text.
    pub fn ports(&self) -> String {
        match (self.nodes.first(), self.nodes.last()) {
            (Some(a), Some(b)) => format!("{}-{}", a.0, b.0),
            _ => String::new(),
        }
    }

    /// Whether node `(port, pid)` still runs.
    pub fn is_alive(pid: u32) -> bool {
        alive(pid)
    }

    /// Stops every process (SIGKILL) and deletes the directory.
    pub fn down(self) -> Result<usize> {
        let mut stopped = 0;
        for (_, pid) in &self.nodes {
            if alive(*pid) && kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).is_ok() {
                stopped += 1;
            }
        }
        // Give the kernel a moment to release the ports before the directory goes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.nodes.iter().any(|(_, p)| alive(*p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::remove_dir_all(&self.dir)?;
        Ok(stopped)
    }
}

fn alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie (exited, not reaped) counts as gone.
    let exists = kill(Pid::from_raw(pid as i32), None).is_ok();
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}
