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
