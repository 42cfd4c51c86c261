//! `slotq consume --exec CMD`: slotq as the worker for a handler written in any language.
//!
//! Each message runs `sh -c CMD` once: the payload on the handler's standard input (then
//! end of file), `SLOTQ_QUEUE`, `SLOTQ_SHARD`, `SLOTQ_MESSAGE_ID` (empty on at-most-once
//! queues), `SLOTQ_ATTEMPT` and `SLOTQ_HEADERS` (the message's headers as a JSON object,
//! `{}` for none) in its environment, its standard output that of slotq, its
//! standard error passed through to slotq's (the last 512 bytes kept: a message
//! dead-lettered after a failure records the exit status and that tail, reason `failed`). Up to `--concurrency` handlers run at once; the consumer pops only as many
//! messages as there are free handler slots, so nothing waits leased in a local buffer.
//!
//! Settling, on an at-least-once queue: exit status 0 acknowledges the message; any other
//! status, a signal, a handler that could not start, or one that ran past `--timeout`
//! negatively acknowledges it with a delay of `backoff * 2^(attempt-1)` (capped at
//! `--backoff-max`), so the queue delivers it again, or dead-letters it once it used its
//! attempts. While a handler runs, its message's lease is extended every fifth of the
//! lease, so a slow handler keeps its message. On an at-most-once queue a message left
//! Redis when it was popped: a failed run is reported on standard error, not retried.
//!
//! With `--ordered` (see `exec_order`), at most one handler per shard runs at a time, a
//! shard's messages run in their order, and a failed message is retried in place, after
//! the same backoff and with its lease extended, before anything later of its shard runs;
//! once it used its attempts it is dead-lettered and the shard goes on.
//!
//! Stopping: on Ctrl-C or SIGTERM no new message is taken; running handlers get `--grace`
//! to finish and are settled as usual; handlers still running then are stopped and their
//! messages given back (released on at-least-once queues, not counted as an attempt;
//! pushed back to the head of their shard on at-most-once queues). Then slotq exits 0. A
//! second Ctrl-C or SIGTERM ends the grace at once. Handlers run in process groups of
//! their own, so a Ctrl-C typed at a terminal reaches slotq only, and slotq decides how
//! they stop: SIGTERM to the handler's group, SIGKILL two seconds later.

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use slotq::{Consumer, DeliveryMode, Message};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::exec_order::InOrder;
use crate::CliError;

/// How long a handler has between SIGTERM and SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(2);

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The queue's name (for the handlers' environment).
    pub queue: String,
    /// The shell command.
    pub command: String,
    /// Handlers at once.
    pub concurrency: usize,
    /// Longest run of one handler.
    pub timeout: Option<Duration>,
    /// First retry delay.
    pub backoff: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// How long a stop waits for running handlers.
    pub grace: Duration,
    /// The consumer's lease (at-least-once queues).
    pub lease: Duration,
    /// Stop after this many messages were handled.
    pub count: Option<u64>,
    /// Per-shard order in processing (`--ordered`): one handler per shard at a time,
    /// failures retried in place.
    pub ordered: bool,
}

impl Settings {
    /// The delay before delivery `attempt + 1`, after delivery `attempt` failed.
    pub fn backoff_for(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        self.backoff
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.backoff_max)
    }
}

/// How one handler run ended.
enum Run {
    Exited(ExitStatus),
    TimedOut,
    NotStarted(std::io::Error),
    /// Stopped because the grace of a shutdown ran out.
    Stopped,
}

/// What became of one message.
enum Outcome {
    Succeeded,
    /// The handler failed; `dead` when that was its last attempt.
    Failed {
        dead: bool,
    },
    /// Succeeded or failed, but its lease had expired, so it will be delivered again.
    LeaseLost,
    /// Stopped at shutdown: to be given back.
    Interrupted(Message),
}

/// What the run did, for the closing line.
#[derive(Debug, Default)]
struct Tally {
    succeeded: u64,
    failed: u64,
    dead_lettered: u64,
    lease_lost: u64,
    stopped: u64,
    given_back: u64,
}

/// Runs the worker until the count is reached or a stop signal, then drains.
pub async fn run(mut consumer: Consumer, settings: Settings) -> Result<(), CliError> {
    let settings = Arc::new(settings);
    let max_attempts = match consumer.queue().mode() {
        DeliveryMode::AtMostOnce => None,
        DeliveryMode::AtLeastOnce { max_attempts } => Some(max_attempts),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Other(format!("SIGTERM handler: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut running: JoinSet<Outcome> = JoinSet::new();
    // The shard of each running handler (ordered: its next message starts when it ends).
    let mut shard_of: HashMap<tokio::task::Id, Arc<str>> = HashMap::new();
    let mut order = InOrder::default();
    let every = settings.lease / 5;
    let mut extend_waiting = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut tally = Tally::default();
    let mut interrupted = Vec::new();
    let mut started = 0u64;
    let mut failure = None;
    let spawn = |running: &mut JoinSet<Outcome>,
                 shard_of: &mut HashMap<tokio::task::Id, Arc<str>>,
                 msg: Message| {
        let shard = msg.shard.clone();
        let (s, stop) = (settings.clone(), stop_rx.clone());
        let task = running.spawn(handle(msg, s, max_attempts, stop));
        shard_of.insert(task.id(), shard);
    };
    loop {
        let free = settings
            .concurrency
            .saturating_sub(running.len() + order.len());
        let take = settings
            .count
            .map_or(free, |c| free.min((c - started) as usize));
        if take == 0 && running.is_empty() {
            break;
        }
        tokio::select! {
            got = consumer.recv_batch(take), if take > 0 => match got {
                Ok(batch) => {
                    started += batch.len() as u64;
                    let start = if settings.ordered { order.push(batch) } else { batch };
                    for msg in start {
                        spawn(&mut running, &mut shard_of, msg);
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            },
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                tally.add(done.map(|(_, o)| o), &mut interrupted);
                if let Some(shard) = shard_of.remove(&id)
                    && let Some(next) = order.done(&shard)
                {
                    spawn(&mut running, &mut shard_of, next);
                }
            }
            _ = extend_waiting.tick(), if max_attempts.is_some() && !order.is_empty() => {
                order.extend(settings.lease).await;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    // Messages waiting for their shard's turn never ran: they go back first (they are
    // newer than their shard's running one, which goes back after them if stopped).
    let waiting = order.drain();
    if !waiting.is_empty() {
        match consumer.release_all(&waiting).await {
            Ok(_) => tally.given_back += waiting.len() as u64,
            Err(e) => eprintln!(
                "slotq: giving back {} waiting message(s) failed: {e} (leased ones come back when their lease expires)",
                waiting.len()
            ),
        }
    }
    if !running.is_empty() {
        eprintln!(
            "slotq: stopping: waiting up to {:.1} s for {} running handler(s)",
            settings.grace.as_secs_f64(),
            running.len()
        );
        let grace = tokio::time::sleep(settings.grace);
        tokio::pin!(grace);
        while !running.is_empty() {
            tokio::select! {
                Some(done) = running.join_next() => tally.add(done, &mut interrupted),
                _ = &mut grace => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = stop_tx.send(true);
        while let Some(done) = running.join_next().await {
            tally.add(done, &mut interrupted);
        }
    }
    if !interrupted.is_empty() {
        match consumer.release_all(&interrupted).await {
            Ok(_) => tally.given_back += interrupted.len() as u64,
            Err(e) => eprintln!(
                "slotq: giving back {} interrupted message(s) failed: {e} (leased ones come back when their lease expires)",
                interrupted.len()
            ),
        }
    }
    consumer.close().await;
    eprintln!("slotq: {}", tally.summary(max_attempts.is_some()));
    failure.map_or(Ok(()), |e| Err(e.into()))
}

impl Tally {
    fn add(
        &mut self,
        done: Result<Outcome, tokio::task::JoinError>,
        interrupted: &mut Vec<Message>,
    ) {
        match done {
            Ok(Outcome::Succeeded) => self.succeeded += 1,
            Ok(Outcome::Failed { dead }) => {
                self.failed += 1;
                self.dead_lettered += u64::from(dead);
            }
            Ok(Outcome::LeaseLost) => self.lease_lost += 1,
            Ok(Outcome::Interrupted(m)) => {
                self.stopped += 1;
                interrupted.push(m);
            }
            Err(e) => eprintln!("slotq: a handler task failed: {e}"),
        }
    }

    fn summary(&self, reliable: bool) -> String {
        let mut s = format!(
            "ran {} handler(s): {} succeeded, {} failed",
            self.succeeded + self.failed + self.lease_lost + self.stopped,
            self.succeeded,
            self.failed
        );
        if reliable {
            s += &format!(
                " ({} dead-lettered), {} lease(s) lost",
                self.dead_lettered, self.lease_lost
            );
        }
        s + &format!(
            ", {} stopped at shutdown, {} given back",
            self.stopped, self.given_back
        )
    }
}

/// Runs the handler for one message and settles it.
async fn handle(
    msg: Message,
    settings: Arc<Settings>,
    max_attempts: Option<u32>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut attempt = msg.attempt;
    let what = describe(&msg);
    let mut why = String::new();
    let ok = loop {
        let (run, tail) = run_handler(
            &msg,
            &settings,
            attempt,
            max_attempts.is_some(),
            stop.clone(),
        )
        .await;
        let ok = match &run {
            Run::Stopped => return Outcome::Interrupted(msg),
            Run::Exited(status) => status.success(),
            Run::TimedOut | Run::NotStarted(_) => false,
        };
        if !ok {
            let failure = failure_text(&run, &settings);
            eprintln!("slotq: handler for {what} {failure}");
            why = if tail.is_empty() {
                format!("handler {failure}")
            } else {
                format!("handler {failure}; stderr: {tail}")
            };
        }
        // Ordered: retried here, before anything later of its shard, while it has
        // attempts left; its lease is kept meanwhile.
        match max_attempts {
            Some(max) if !ok && settings.ordered && attempt < max => {
                let delay = settings.backoff_for(attempt);
                eprintln!(
                    "slotq: retrying {what} in {:.1} s (ordered: its shard waits)",
                    delay.as_secs_f64()
                );
                if !hold(&msg, delay, settings.lease, &mut stop).await {
                    return Outcome::Interrupted(msg);
                }
                attempt += 1;
            }
            _ => break ok,
        }
    };
    let Some(max_attempts) = max_attempts else {
        if !ok {
            eprintln!("slotq: {what} is not retried (at-most-once queue)");
            return Outcome::Failed { dead: false };
        }
        return Outcome::Succeeded;
    };
    let dead = !ok && attempt >= max_attempts;
    let settled = if ok {
        msg.ack().await
    } else if settings.ordered {
        msg.dead_letter_as(slotq::DeadReason::Failed, &why).await
    } else {
        msg.nack_because(Some(settings.backoff_for(attempt)), &why)
            .await
    };
    match settled {
        Ok(slotq::Settled::Done | slotq::Settled::AlreadySettled) if ok => Outcome::Succeeded,
        Ok(slotq::Settled::Done | slotq::Settled::AlreadySettled) => {
            if dead {
                eprintln!("slotq: {what} dead-lettered after {max_attempts} attempt(s)");
            }
            Outcome::Failed { dead }
        }
        Ok(slotq::Settled::LeaseGone) => {
            eprintln!("slotq: the lease of {what} expired: it will be delivered again");
            Outcome::LeaseLost
        }
        Err(e) => {
            eprintln!(
                "slotq: settling {what} failed: {e} (it is delivered again when its lease expires)"
            );
            Outcome::LeaseLost
        }
    }
}

fn describe(msg: &Message) -> String {
    match msg.id {
        Some(id) => format!(
            "message {id} (shard {}, attempt {})",
            msg.shard, msg.attempt
        ),
        None => format!("a message of shard {}", msg.shard),
    }
}

fn failure_text(run: &Run, settings: &Settings) -> String {
    match run {
        Run::Exited(status) => match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => format!("was ended by a signal ({status})"),
        },
        Run::TimedOut => format!(
            "ran past --timeout {:.1} s and was stopped",
            settings.timeout.unwrap_or_default().as_secs_f64()
        ),
        Run::NotStarted(e) => format!("could not start: {e}"),
        Run::Stopped => "was stopped".into(),
    }
}

/// Runs `sh -c CMD` with the message on its standard input; extends the message's lease
/// while it runs; stops it on timeout or when `stop` turns true.
async fn run_handler(
    msg: &Message,
    settings: &Settings,
    attempt: u32,
    reliable: bool,
    stop: watch::Receiver<bool>,
) -> (Run, String) {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&settings.command)
        .env("SLOTQ_QUEUE", &settings.queue)
        .env("SLOTQ_SHARD", &*msg.shard)
        .env(
            "SLOTQ_MESSAGE_ID",
            msg.id.map(|id| id.to_string()).unwrap_or_default(),
        )
        .env("SLOTQ_ATTEMPT", attempt.to_string())
        .env(
            "SLOTQ_HEADERS",
            crate::json::Headers::of(msg.headers()).map_or_else(
                || "{}".to_string(),
                |h| crate::json::line(&h).trim_end().to_string(),
            ),
        )
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Run::NotStarted(e), String::new()),
    };
    let tail = child.stderr.take().map(super::stderr_tail::forward);
    let run = supervise(msg, settings, reliable, stop, &mut child).await;
    let tail = match tail {
        Some(t) => t.finish().await,
        None => String::new(),
    };
    (run, tail)
}

/// Feeds the handler its message, extends the lease while it runs, and waits for it (or
/// stops it on timeout or shutdown).
async fn supervise(
    msg: &Message,
    settings: &Settings,
    reliable: bool,
    mut stop: watch::Receiver<bool>,
    child: &mut tokio::process::Child,
) -> Run {
    // The payload goes in on a task of its own: a handler need not read it, and one that
    // reads slowly must not hold up the timeout or the lease extension.
    if let Some(mut stdin) = child.stdin.take() {
        let payload = msg.payload.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
        });
    }
    let every = settings.lease / 5;
    let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let timeout = tokio::time::sleep(settings.timeout.unwrap_or(Duration::MAX / 4));
    tokio::pin!(timeout);
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => Run::Exited(s),
                    Err(e) => Run::NotStarted(e),
                };
            }
            _ = extend.tick(), if reliable => {
                if let Ok(None) = msg.extend(settings.lease).await {
                    eprintln!(
                        "slotq: the lease of {} expired while its handler ran",
                        describe(msg)
                    );
                }
            }
            _ = &mut timeout, if settings.timeout.is_some() => {
                terminate(child).await;
                return Run::TimedOut;
            }
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                terminate(child).await;
                return Run::Stopped;
            }
        }
    }
}

/// Waits `delay` before an ordered retry, extending the message's lease meanwhile; false
/// when a stop came first.
async fn hold(
    msg: &Message,
    delay: Duration,
    lease: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let every = lease / 5;
    let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let until = tokio::time::sleep(delay);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return true,
            _ = extend.tick() => {
                let _ = msg.extend(lease).await;
            }
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return false,
        }
    }
}

/// SIGTERM to the handler's process group, SIGKILL if it is still there after
/// [`KILL_AFTER`]; waits for it either way.
async fn terminate(child: &mut tokio::process::Child) {
    let Some(pid) = child.id() else {
        return;
    };
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(KILL_AFTER, child.wait())
        .await
        .is_err()
    {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let s = Settings {
            queue: "q".into(),
            command: "true".into(),
            concurrency: 1,
            timeout: None,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(3),
            grace: Duration::ZERO,
            lease: Duration::from_secs(30),
            count: None,
            ordered: false,
        };
        let got: Vec<u128> = (1..=6).map(|a| s.backoff_for(a).as_millis()).collect();
        assert_eq!(got, [500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(s.backoff_for(u32::MAX), Duration::from_secs(3));
    }
}
