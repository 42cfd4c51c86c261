//! `slotq group`: a consumer group's members, their shards, and each shard's lag.

use serde::Serialize;
use slotq::Cluster;

use crate::CliError;
use crate::output::table;

/// The `--json` shape of `slotq group`.
#[derive(Serialize)]
struct GroupJson<'a> {
    queue: &'a str,
    group: &'a str,
    mode: &'a str,
    generation: i64,
    members: Vec<MemberJson<'a>>,
    shards: Vec<ShardJson<'a>>,
    lag: u64,
}

#[derive(Serialize)]
struct MemberJson<'a> {
    id: &'a str,
    shards: &'a [String],
    lag: u64,
    expires_in_ms: i64,
}

#[derive(Serialize)]
struct ShardJson<'a> {
    shard: &'a str,
    owner: Option<&'a str>,
    next: Option<&'a str>,
    lag: u64,
}

/// Shows group `group` of `queue`.
pub async fn run(
    cluster: &Cluster,
    queue: &str,
    group: &str,
    as_json: bool,
) -> Result<String, CliError> {
    slotq::group::validate_group_name(group)?;
    let q = super::queue::open_existing(cluster, queue).await?;
    let st = q.group_status(group).await?;
    let lag_of = |tags: &[String]| -> u64 {
        st.shards
            .iter()
            .filter(|s| tags.contains(&s.tag))
            .map(|s| s.depth)
            .sum()
    };
    let total: u64 = st.shards.iter().map(|s| s.depth).sum();
    if as_json {
        let j = GroupJson {
            queue,
            group,
            mode: &st.mode,
            generation: st.generation,
            members: st
                .members
                .iter()
                .map(|m| MemberJson {
                    id: &m.id,
                    shards: &m.shards,
                    lag: lag_of(&m.shards),
                    expires_in_ms: m.expires_in_ms,
                })
                .collect(),
            shards: st
                .shards
                .iter()
                .map(|s| ShardJson {
                    shard: &s.tag,
                    owner: s.owner.as_deref(),
                    next: s.next.as_deref(),
                    lag: s.depth,
                })
                .collect(),
            lag: total,
        };
        return serde_json::to_string_pretty(&j).map_err(|e| CliError::Other(e.to_string()));
    }
    let mode = if st.mode.is_empty() {
        "no member yet"
    } else {
        &st.mode
    };
    let mut out = format!(
        "group {group} of {queue}: {} members, {mode}, generation {}\n\n",
        st.members.len(),
        st.generation
    );
    let rows: Vec<Vec<String>> = st
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.shards.len().to_string(),
                lag_of(&m.shards).to_string(),
                format!("{} ms", m.expires_in_ms),
            ]
        })
        .collect();
    out.push_str(&table(&["MEMBER", "SHARDS", "LAG", "EXPIRES IN"], &rows));
    out.push('\n');
    let rows: Vec<Vec<String>> = st
        .shards
        .iter()
        .map(|s| {
            let owner = match (&s.owner, &s.next) {
                (Some(a), Some(b)) => format!("{a} -> {b}"),
                (Some(a), None) => a.clone(),
                (None, _) => "-".into(),
            };
            vec![s.tag.clone(), owner, s.depth.to_string()]
        })
        .collect();
    out.push_str(&table(&["SHARD", "OWNER", "LAG"], &rows));
    out.push_str(&format!("total lag {total}\n"));
    Ok(out)
}
