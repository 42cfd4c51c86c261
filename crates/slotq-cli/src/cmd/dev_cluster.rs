//! `slotq dev-cluster up|down|status`

use slotq_testkit::dev::{DevCluster, default_dir};

use crate::CliError;
use crate::args::{DevAction, DevUpArgs};

/// Runs one dev-cluster action and returns what to print.
pub fn run(action: &DevAction, as_json: bool) -> Result<String, CliError> {
    match action {
        DevAction::Up(DevUpArgs {
            masters,
            replicas,
            port,
        }) => {
            if *masters == 0 {
                return Err(CliError::Usage("--masters must be at least 1".into()));
            }
            let dev = DevCluster::up(*port, *masters, *replicas, &default_dir(*port))?;
            Ok(if as_json {
                crate::json::line(&crate::json::DevCluster {
                    url: dev.url(),
                    dir: &dev.dir,
                    nodes: dev
                        .nodes
                        .iter()
                        .map(|(port, pid)| crate::json::DevNode {
                            port: *port,
                            pid: *pid,
                            running: None,
                        })
                        .collect(),
                })
            } else {
                format!(
                    "dev cluster up: {masters} masters, {replicas} replica(s) each, ports {}\nfiles: {}\n\nuse it:   export SLOTQ_URL={}\nstop it:  slotq dev-cluster down --port {port}\n",
                    dev.ports(),
                    dev.dir.display(),
                    dev.url()
                )
            })
        }
        DevAction::Down(p) => {
            let dev = DevCluster::load(&default_dir(p.port))?;
            let n = dev.down()?;
            Ok(if as_json {
                crate::json::line(&crate::json::Stopped { stopped: n })
            } else {
                format!("dev cluster on port {} stopped ({n} processes)\n", p.port)
            })
        }
        DevAction::Status(p) => {
            let dev = DevCluster::load(&default_dir(p.port))?;
            let nodes: Vec<(u16, u32, bool)> = dev
                .nodes
                .iter()
                .map(|(port, pid)| (*port, *pid, DevCluster::is_alive(*pid)))
                .collect();
            Ok(if as_json {
                crate::json::line(&crate::json::DevCluster {
                    url: dev.url(),
                    dir: &dev.dir,
                    nodes: nodes
                        .iter()
                        .map(|(port, pid, up)| crate::json::DevNode {
                            port: *port,
                            pid: *pid,
                            running: Some(*up),
                        })
                        .collect(),
                })
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|(p, pid, up)| {
                        vec![
                            p.to_string(),
                            pid.to_string(),
                            if *up { "running" } else { "stopped" }.into(),
                        ]
                    })
                    .collect();
                format!(
                    "dev cluster {} ({} of {} running)\n\n{}",
                    dev.url(),
                    dev.running(),
                    nodes.len(),
                    crate::output::table(&["PORT", "PID", "STATE"], &rows)
                )
            })
        }
    }
}
