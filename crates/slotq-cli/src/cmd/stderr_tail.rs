//! A handler's standard error, passed through to slotq's while its last bytes are kept:
//! a message dead-lettered under `consume --exec` records them with its reason.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStderr;
use tokio::task::JoinHandle;

/// Bytes of a handler's stderr kept for its dead letter.
pub const TAIL: usize = 512;

/// How long the pass-through may run on after the handler exited (a process it started
/// in the background can hold the pipe open for good).
const DRAIN: Duration = Duration::from_millis(200);

/// A handler's stderr being passed through.
pub struct StderrTail {
    kept: Arc<Mutex<VecDeque<u8>>>,
    task: JoinHandle<()>,
}

/// Starts passing `stderr` through to slotq's standard error.
pub fn forward(mut stderr: ChildStderr) -> StderrTail {
    let kept = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL)));
    let keep = kept.clone();
    let task = tokio::spawn(async move {
        let mut out = tokio::io::stderr();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                k.extend(&buf[..n]);
                let over = k.len().saturating_sub(TAIL);
                k.drain(..over);
            }
            // slotq's own stderr gone (a closed terminal): keep reading, so the handler
            // never blocks on a full pipe.
            let _ = out.write_all(&buf[..n]).await;
        }
    });
    StderrTail { kept, task }
}

impl StderrTail {
    /// The last [`TAIL`] bytes (as text, invalid UTF-8 replaced, cut to whole characters),
    /// once the handler closed its stderr or [`DRAIN`] passed.
    pub async fn finish(mut self) -> String {
        if tokio::time::timeout(DRAIN, &mut self.task).await.is_err() {
            self.task.abort();
        }
        let k = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = k.iter().copied().collect();
        String::from_utf8_lossy(&bytes)
            .trim_start_matches('\u{FFFD}')
            .trim()
            .to_string()
    }
}
