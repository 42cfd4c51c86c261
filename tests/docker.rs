//! No Docker engine runs here, so the container files are checked for what they must say:
//! six cluster nodes on distinct ports with health checks, a one-shot cluster creation that
//! waits for them, and a multi-stage build of the CLI onto a slim image.

use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_has_six_healthy_cluster_nodes_and_a_creator() {
    let docs =
        YamlLoader::load_from_str(&repo_file("docker/docker-compose.yml")).expect("valid YAML");
    let services = docs[0]["services"].as_hash().expect("services");
    let nodes: Vec<(&str, &Yaml)> = services
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str()?;
            name.starts_with("redis-").then_some((name, v))
        })
        .collect();
    assert_eq!(nodes.len(), 6, "six redis nodes");
    let mut ports = Vec::new();
    for (name, node) in &nodes {
        let image = node["image"].as_str().expect("image");
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "{name}: image pinned, got {image}"
        );
        let cmd = strings(&node["command"]);
        assert_eq!(
            cmd.first().map(String::as_str),
            Some("redis-server"),
            "{name}"
        );
        let flag = |f: &str| {
            cmd.iter()
                .position(|c| c == f)
                .and_then(|i| cmd.get(i + 1))
                .cloned()
        };
        assert_eq!(flag("--cluster-enabled").as_deref(), Some("yes"), "{name}");
        let port: u16 = flag("--port").expect("port").parse().expect("numeric port");
        ports.push(port);
        let check = strings(&node["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains("ping") && check.contains(&port.to_string()),
            "{name}: {check}"
        );
    }
    ports.sort();
    assert_eq!(ports, (7000..7006).collect::<Vec<u16>>());

    let creator = &docs[0]["services"]["cluster-create"];
    let cmd = strings(&creator["command"]).join(" ");
    assert!(cmd.contains("--cluster create"), "{cmd}");
    assert!(cmd.contains("--cluster-replicas 1"), "{cmd}");
    for p in 7000..7006 {
        assert!(cmd.contains(&format!("127.0.0.1:{p}")), "{cmd}");
    }
    let deps = creator["depends_on"].as_hash().expect("depends_on");
    assert_eq!(deps.len(), 6);
    for (_, d) in deps {
        assert_eq!(d["condition"].as_str(), Some("service_healthy"));
    }
    let slotq = &docs[0]["services"]["slotq"];
    assert_eq!(
        slotq["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    assert_eq!(
        slotq["depends_on"]["cluster-create"]["condition"].as_str(),
        Some("service_completed_successfully")
    );

    // Workers stop with SIGTERM: compose must wait longer than their grace before it kills.
    let worker = &docs[0]["services"]["worker"];
    let cmd = strings(&worker["command"]);
    assert_eq!(&cmd[..3], ["consume", "jobs", "--exec"], "{cmd:?}");
    let grace: u64 = cmd
        .iter()
        .position(|c| c == "--grace")
        .and_then(|i| cmd.get(i + 1))
        .and_then(|g| g.parse().ok())
        .expect("--grace SECS");
    let stop: u64 = worker["stop_grace_period"]
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .expect("stop_grace_period in seconds");
    assert!(
        stop > grace,
        "compose waits {stop} s, workers need {grace} s"
    );
    let handler = repo_file("docker/handler.sh");
    assert!(handler.starts_with("#!/bin/sh"), "{handler}");
}

#[test]
fn dockerfile_is_multi_stage_with_a_slim_runtime() {
    let text = repo_file("docker/Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(
        froms[0].contains("rust:") && froms[0].contains(" AS build"),
        "{froms:?}"
    );
    assert!(froms[1].contains("slim"), "slim runtime: {froms:?}");
    assert!(text.contains("cargo build --release --locked -p slotq-cli"));
    assert!(text.contains("COPY --from=build /src/target/release/slotq"));
    assert!(text.contains("ENTRYPOINT [\"slotq\"]"));
    assert!(text.contains("USER nobody"), "does not run as root");
}

/// The metric names `slotq exporter` serves, read from its source.
fn exported_names() -> Vec<String> {
    let src = repo_file("crates/slotq-cli/src/cmd/exporter.rs");
    let mut names: Vec<String> = src
        .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .filter(|w| w.starts_with("slotq_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_monitoring_profile_provisions_a_dashboard_of_exported_gauges() {
    let docs =
        YamlLoader::load_from_str(&repo_file("docker/docker-compose.yml")).expect("valid YAML");
    let services = &docs[0]["services"];
    for s in ["exporter", "prometheus", "grafana"] {
        assert_eq!(
            strings(&services[s]["profiles"]),
            ["monitoring"],
            "{s} runs in the monitoring profile"
        );
    }
    let exporter = strings(&services["exporter"]["command"]);
    assert_eq!(exporter[..2], ["exporter", "--listen"]);
    let listen = exporter[2].clone();
    // Prometheus scrapes exactly where the exporter listens.
    let prom = YamlLoader::load_from_str(&repo_file("docker/prometheus.yml")).expect("YAML");
    let targets = strings(&prom[0]["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, [listen]);
    // Grafana mounts the provisioning and the dashboards where the provider looks.
    let volumes = strings(&services["grafana"]["volumes"]);
    assert!(volumes.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro".to_string()));
    let provider = YamlLoader::load_from_str(&repo_file(
        "docker/grafana/provisioning/dashboards/slotq.yml",
    ))
    .expect("YAML");
    let path = provider[0]["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(
        volumes.iter().any(|v| v.ends_with(&format!(":{path}:ro"))),
        "{volumes:?} mounts {path}"
    );
    let datasource = YamlLoader::load_from_str(&repo_file(
        "docker/grafana/provisioning/datasources/prometheus.yml",
    ))
    .expect("YAML");
    let ds_uid = datasource[0]["datasources"][0]["uid"]
        .as_str()
        .unwrap()
        .to_string();

    // Every panel queries gauges the exporter serves, through the provisioned datasource.
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("docker/grafana/dashboards/slotq.json")).expect("JSON");
    let exported = exported_names();
    assert!(exported.len() >= 11, "{exported:?}");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut used = std::collections::BTreeSet::new();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], ds_uid.as_str(), "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("slotq_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(exported.iter().any(|e| e == n), "{n} is not exported");
                used.insert(n.to_string());
            }
        }
    }
    for needed in [
        "slotq_queue_depth",
        "slotq_queue_in_flight",
        "slotq_queue_dead",
        "slotq_queue_oldest_age_seconds",
        "slotq_group_lag",
        "slotq_group_members",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
}
