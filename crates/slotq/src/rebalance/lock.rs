//! The queue's rebalance lock: one rebalancer at a time. A key in the registry's slot
//! (`SET NX PX`) with a token of the holder's own; renewed while held, released only by
//! its holder (a lock that expired and was taken since is left alone), and released too
//! when the step holding it is dropped mid-way.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::queue::Queue;

/// How long the rebalance lock lasts unless renewed.
const LOCK_TTL: Duration = Duration::from_secs(60);

/// The rebalance lock while a step holds it: renewed every third of its TTL (a step that
/// waits on a slow retirement keeps it), and released when the step ends — also when the
/// step is cancelled (dropped mid-way: the release is sent from a task), so the next
/// rebalance does not wait for the TTL.
pub(super) struct HeldLock {
    queue: Queue,
    key: String,
    token: String,
    slot: crate::slot::Slot,
    renew: tokio::task::JoinHandle<()>,
    released: bool,
}

impl HeldLock {
    /// Takes the queue's rebalance lock, trying for up to `wait`; `Error::Busy` when
    /// another step holds it.
    pub(super) async fn take(q: &Queue, wait: Duration) -> Result<HeldLock> {
        let key = q.rebalance_lock_key();
        let token = crate::lease::LeaseId::random().to_string();
        let slot = crate::slot::key_slot(&key);
        let deadline = std::time::Instant::now() + wait;
        loop {
            let got: Option<String> = q
                .cluster()
                .query(
                    slot,
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(LOCK_TTL.as_millis() as u64),
                )
                .await?;
            if got.is_some() {
                return Ok(HeldLock::new(q.clone(), key, token, slot));
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "another rebalance of {:?} is running",
                    q.name()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn new(queue: Queue, key: String, token: String, slot: crate::slot::Slot) -> HeldLock {
        let renew = {
            let (queue, key, token) = (queue.clone(), key.clone(), token.clone());
            tokio::spawn(async move {
                let renew = redis::cmd("EVAL")
                    .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0")
                    .arg(1)
                    .arg(&key)
                    .arg(&token)
                    .arg(LOCK_TTL.as_millis() as u64)
                    .clone();
                loop {
                    tokio::time::sleep(LOCK_TTL / 3).await;
                    match queue.cluster().query::<i64>(slot, &renew).await {
                        Ok(1) => {}
                        Ok(_) => {
                            tracing::warn!(queue = %queue.name(), "the rebalance lock was lost (it expired and was taken)");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(queue = %queue.name(), cause = %e, "renewing the rebalance lock failed")
                        }
                    }
                }
            })
        };
        HeldLock {
            queue,
            key,
            token,
            slot,
            renew,
            released: false,
        }
    }

    fn release_cmd(&self) -> redis::Cmd {
        // Only our own lock goes (it may have expired and been taken since).
        redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .clone()
    }

    pub(super) async fn release(mut self) {
        self.renew.abort();
        let cmd = self.release_cmd();
        let _: Result<redis::Value> = self.queue.cluster().query(self.slot, &cmd).await;
        self.released = true;
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.renew.abort();
        if self.released {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (cluster, slot, cmd) = (self.queue.cluster().clone(), self.slot, self.release_cmd());
        rt.spawn(async move {
            let _: Result<redis::Value> = cluster.query(slot, &cmd).await;
        });
    }
}
