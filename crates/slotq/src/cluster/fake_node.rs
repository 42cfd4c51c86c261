//! A scripted fake cluster node for router tests: it listens on 127.0.0.1:0, reads
//! commands with the project's own RESP parser, logs them, and answers what its script
//! says — a reply, an error, silence, or a connection closed mid-reply — so that exact
//! redirect, retry and timeout sequences can be tested under a paused clock.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::resp;
use crate::topology::NodeAddr;

/// What the node does with one command.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// Writes these bytes (one or more RESP replies).
    Reply(Vec<u8>),
    /// Never answers (the connection stays open).
    Silent,
    /// Closes the connection without answering.
    Close,
    /// Writes the first part of a reply, then closes the connection.
    CloseMidReply(Vec<u8>),
}

/// The script: the command's words and how many commands this node saw before it.
pub(crate) type Script = Arc<dyn Fn(&[String], usize) -> Act + Send + Sync>;

/// A node of a fake cluster.
pub(crate) struct FakeNode {
    log: Arc<Mutex<Vec<Vec<String>>>>,
    /// The first word of each command, grouped by the read that brought it.
    reads: Arc<Mutex<Vec<Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `+OK`-style simple string reply.
pub(crate) fn simple(s: &str) -> Act {
    Act::Reply(format!("+{s}\r\n").into_bytes())
}

/// An error reply (`-CODE message`).
pub(crate) fn error(e: &str) -> Act {
    Act::Reply(format!("-{e}\r\n").into_bytes())
}

/// A bulk string reply.
pub(crate) fn bulk(s: &str) -> Act {
    Act::Reply(format!("${}\r\n{s}\r\n", s.len()).into_bytes())
}

/// A `CLUSTER SLOTS` reply for masters owning the given ranges.
pub(crate) fn cluster_slots(ranges: &[(u16, u16, &NodeAddr)]) -> Act {
    let mut out = format!("*{}\r\n", ranges.len());
    for (a, b, node) in ranges {
        out += &format!(
            "*3\r\n:{a}\r\n:{b}\r\n*3\r\n${}\r\n{}\r\n:{}\r\n$4\r\nid{:02}\r\n",
            node.host.len(),
            node.host,
            node.port,
            node.port % 100
        );
    }
    Act::Reply(out.into_bytes())
}

impl FakeNode {
    /// Binds a listener now (so the address is known before the script is).
    pub(crate) async fn bind() -> (TcpListener, NodeAddr) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        (l, NodeAddr::new("127.0.0.1", port))
    }

    /// Serves `script` on `listener`. `PING` is answered `PONG`, `CLUSTER SHARDS` with
    /// "unknown subcommand" (so the router asks `CLUSTER SLOTS`) and `CLUSTER INFO` with a
    /// cluster that is up, unless the script answers them first; the script sees every
    /// command, those included.
    pub(crate) fn serve(listener: TcpListener, script: Script) -> FakeNode {
        let log: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let reads: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let task = {
            let (log, reads) = (log.clone(), reads.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(connection(sock, script.clone(), log.clone(), reads.clone()));
                }
            })
        };
        FakeNode { log, reads, task }
    }

    /// Every command received so far, in arrival order (all connections).
    pub(crate) fn log(&self) -> Vec<Vec<String>> {
        self.log.lock().unwrap().clone()
    }

    /// The first words of the commands of each read, in order.
    pub(crate) fn reads(&self) -> Vec<Vec<String>> {
        self.reads.lock().unwrap().clone()
    }

    /// How many received commands start with `word`.
    pub(crate) fn count(&self, word: &str) -> usize {
        self.log()
            .iter()
            .filter(|c| c.first().is_some_and(|w| w.eq_ignore_ascii_case(word)))
            .count()
    }
}

async fn connection(
    mut sock: TcpStream,
    script: Script,
    log: Arc<Mutex<Vec<Vec<String>>>>,
    reads: Arc<Mutex<Vec<Vec<String>>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Ok(n) = sock.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        // One entry per read, filled as its commands are parsed.
        let read = {
            let mut r = reads.lock().unwrap();
            r.push(Vec::new());
            r.len() - 1
        };
        while let Ok(Some((value, used))) = resp::parse(&buf) {
            buf.drain(..used);
            let words = words(value);
            reads.lock().unwrap()[read].push(words.first().cloned().unwrap_or_default());
            let seen = {
                let mut l = log.lock().unwrap();
                l.push(words.clone());
                l.len() - 1
            };
            let act = script(&words, seen);
            let act = match (&act, words.first().map(|w| w.to_ascii_uppercase())) {
                (Act::Reply(r), Some(w)) if r.is_empty() && w == "PING" => simple("PONG"),
                (Act::Reply(r), Some(w))
                    if r.is_empty()
                        && w == "CLUSTER"
                        && words
                            .get(1)
                            .is_some_and(|s| s.eq_ignore_ascii_case("SHARDS")) =>
                {
                    error("ERR unknown subcommand 'SHARDS'")
                }
                (Act::Reply(r), Some(w))
                    if r.is_empty()
                        && w == "CLUSTER"
                        && words.get(1).is_some_and(|s| s.eq_ignore_ascii_case("INFO")) =>
                {
                    bulk("cluster_state:ok\r\ncluster_current_epoch:0\r\n")
                }
                _ => act,
            };
            match act {
                Act::Reply(r) => out.extend_from_slice(&r),
                Act::Silent => {
                    let _ = sock.write_all(&out).await;
                    std::future::pending::<()>().await;
                }
                Act::Close => {
                    let _ = sock.write_all(&out).await;
                    return;
                }
                Act::CloseMidReply(part) => {
                    out.extend_from_slice(&part);
                    let _ = sock.write_all(&out).await;
                    return;
                }
            }
        }
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn words(v: redis::Value) -> Vec<String> {
    match v {
        redis::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect(),
        other => vec![format!("{other:?}")],
    }
}

/// No scripted answer: the defaults (PING, CLUSTER SHARDS) or an empty reply marker.
pub(crate) fn default() -> Act {
    Act::Reply(Vec::new())
}
