//! Lua scripts run by SHA (EVALSHA), loaded on first use per node (EVAL on NOSCRIPT).

use redis::Value;

use crate::cluster::{Cluster, Command, RequestOpts};
use crate::error::{Error, Result};
use crate::server_error::RetryMethod;
use crate::slot::Slot;

/// A Lua script and its SHA1.
pub(crate) struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    pub(crate) fn new(source: &'static str) -> Self {
        Script {
            source,
            sha: redis::Script::new(source).get_hash().to_string(),
        }
    }

    /// Builds `EVALSHA sha n keys... args...` (or `EVAL` when `load`).
    pub(crate) fn cmd(&self, keys: &[&str], args: &[&[u8]], load: bool) -> redis::Cmd {
        let mut c = if load {
            let mut c = redis::cmd("EVAL");
            c.arg(self.source);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        };
        c.arg(keys.len());
        for k in keys {
            c.arg(*k);
        }
        for a in args {
            c.arg(*a);
        }
        c
    }

    /// `EVAL source n keys... args...` followed by `body_args` more arguments already
    /// written as RESP bulk strings in `body` (see [`Command::with_body`]). The source goes
    /// with every call: no NOSCRIPT to recover from.
    pub(crate) fn with_body(
        &self,
        keys: &[&str],
        args: &[&[u8]],
        body_args: usize,
        body: Vec<bytes::Bytes>,
    ) -> Command {
        let n = keys.len().to_string();
        let mut head: Vec<&[u8]> = vec![b"EVAL", self.source.as_bytes(), n.as_bytes()];
        head.extend(keys.iter().map(|k| k.as_bytes()));
        head.extend_from_slice(args);
        Command::with_body(&head, body_args, body)
    }

    /// Runs the script in `slot` (all `keys` must hash there).
    pub(crate) async fn run(
        &self,
        cluster: &Cluster,
        slot: Slot,
        keys: &[&str],
        args: &[&[u8]],
        opts: RequestOpts,
    ) -> Result<Value> {
        match cluster
            .query_with(slot, &self.cmd(keys, args, false), opts)
            .await
        {
            Err(Error::Server { kind, .. }) if kind.retry_method() == RetryMethod::ReloadScript => {
                cluster
                    .query_with(slot, &self.cmd(keys, args, true), opts)
                    .await
            }
            other => other,
        }
    }
}

/// One script call for [`run_batch`].
pub(crate) struct Call<'a> {
    pub(crate) slot: Slot,
    pub(crate) script: &'a Script,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
}

impl Call<'_> {
    pub(crate) fn cmd(&self, load: bool) -> redis::Cmd {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        let args: Vec<&[u8]> = self.args.iter().map(Vec::as_slice).collect();
        self.script.cmd(&keys, &args, load)
    }
}

/// Runs many script calls, one pipeline per node; calls that met a node without the
/// script (NOSCRIPT) are sent again with the script's source.
pub(crate) async fn run_batch(
    cluster: &Cluster,
    calls: &[Call<'_>],
    opts: RequestOpts,
) -> Vec<Result<Value>> {
    let cmds = calls.iter().map(|c| (c.slot, c.cmd(false))).collect();
    let mut results = cluster.batch(cmds, opts).await;
    let missing: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            matches!(r, Err(Error::Server { kind, .. }) if kind.retry_method() == RetryMethod::ReloadScript)
        })
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        let cmds = missing
            .iter()
            .map(|&i| (calls[i].slot, calls[i].cmd(true)))
            .collect();
        for (i, r) in missing.into_iter().zip(cluster.batch(cmds, opts).await) {
            results[i] = r;
        }
    }
    results
}
