//! `slotq push`: the arguments, or standard input streamed as it arrives.
//!
//! Standard input is read as bytes on a thread of its own, one message per line (or per
//! NUL with `-0`); a message never has to be valid UTF-8. Messages go out in batches as
//! they come: a batch is sent when it holds 1,000 messages or when the input pauses (no
//! more bytes ready right now), so `tail -F app.log | slotq push logs` sends each line
//! within a round trip. At most a few batches are read ahead, so memory stays bounded
//! however large the input. A bad message (empty, or larger than a payload may be) stops
//! the push: it is reported with its line number, and the messages before it stay sent.
//! On a terminal, an input that lasts more than a second shows a progress line on
//! standard error (messages, bytes, rate), redrawn in place and cleared at the end.

use std::io::BufRead;

use slotq::{Client, Cluster};
use tokio::sync::mpsc;

use crate::CliError;

/// Messages per batch handed to the producer.
const BATCH: usize = 1000;
/// Batches read ahead of the sending.
const READ_AHEAD: usize = 8;

/// When scheduled messages become ready.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    /// This long after each is sent.
    Delay(std::time::Duration),
    /// At this time.
    At(std::time::SystemTime),
}

impl Schedule {
    fn at(self) -> std::time::SystemTime {
        match self {
            Schedule::Delay(d) => std::time::SystemTime::now() + d,
            Schedule::At(t) => t,
        }
    }
}

/// What was sent so far: a count, and the ids of scheduled messages.
#[derive(Default)]
struct Sent {
    count: u64,
    ids: Vec<String>,
}

/// How `slotq push` runs.
pub struct Options {
    /// Headers and time to live of every message.
    pub options: slotq::SendOptions,
    /// Scheduled sends.
    pub schedule: Option<Schedule>,
    /// A dedup id for the one message given.
    pub dedup_id: Option<String>,
    /// At-least-once queues: push without waiting for a replica.
    pub no_durability: bool,
    /// Send keyed.
    pub key: Option<String>,
    /// Create a missing queue in at-least-once mode with this many attempts.
    pub reliable: Option<u32>,
    /// NUL-separated input.
    pub null: bool,
    /// JSON summary.
    pub json: bool,
}

/// What the reader thread hands over: a batch with the line number of its first message,
/// or the read error that ended the input.
enum Read {
    Batch(u64, Vec<Vec<u8>>),
    Failed(std::io::Error),
}

/// Pushes the arguments, or standard input.
pub async fn run(
    cluster: &Cluster,
    queue: &str,
    messages: &[String],
    opts: Options,
) -> Result<String, CliError> {
    // Options are checked before the queue is opened (or created).
    opts.options.check()?;
    let mut builder = Client::from_cluster(cluster.clone()).queue(queue);
    if let Some(max_attempts) = opts.reliable {
        builder = builder.max_attempts(max_attempts);
    }
    if opts.options.level() != slotq::Priority::Normal {
        // Only when it is created: an existing queue keeps what it was created with.
        builder = builder.priorities();
    }
    let q = builder.open().await?;
    let mut producer = q.producer();
    if opts.no_durability {
        producer = producer.no_durability();
    }
    let producer = producer.build()?;
    let mut sent = Sent::default();
    if let Some(id) = &opts.dedup_id {
        let [message] = messages else {
            return Err(CliError::Usage(
                "--dedup-id takes exactly one message argument".into(),
            ));
        };
        producer.send_dedup(id, message.as_bytes()).await?;
        sent.count = 1;
    }
    if !opts.options.is_empty() && opts.key.is_some() && opts.schedule.is_some() {
        return Err(CliError::Usage(
            "--header, --ttl and --priority do not go with --key and --delay/--at together".into(),
        ));
    }
    let how = How {
        key: opts.key.as_deref(),
        schedule: opts.schedule,
        options: (!opts.options.is_empty()).then_some(&opts.options),
    };
    let result = if opts.dedup_id.is_some() {
        Ok(())
    } else if messages.is_empty() {
        stream_stdin(&producer, how, opts.null, &mut sent).await
    } else {
        let batch: Vec<Vec<u8>> = messages.iter().map(|m| m.clone().into_bytes()).collect();
        send(&producer, how, 1, batch, &mut sent).await
    };
    // Counted messages reach the queue's totals before the process exits.
    let _ = q.flush_flow().await;
    if let Err(e) = result {
        if sent.count > 0 {
            eprintln!(
                "pushed {} message(s) to {queue} before stopping",
                sent.count
            );
            // The ids of what was scheduled before the stop, so it can be cancelled.
            if !opts.json && !sent.ids.is_empty() {
                let _ = crate::output::RawOut::stdout()
                    .and_then(|mut o| o.write_all(ids_text(&sent.ids).as_bytes()));
            }
        }
        return Err(e);
    }
    Ok(if opts.json {
        crate::json::line(&crate::json::Pushed {
            queue,
            pushed: sent.count,
            ids: sent.ids,
        })
    } else if opts.schedule.is_some() {
        eprintln!("scheduled {} message(s) for {queue}", sent.count);
        ids_text(&sent.ids)
    } else {
        eprintln!("pushed {} message(s) to {queue}", sent.count);
        String::new()
    })
}

fn ids_text(ids: &[String]) -> String {
    ids.iter().map(|id| format!("{id}\n")).collect()
}

/// How each batch is sent.
#[derive(Clone, Copy)]
struct How<'a> {
    key: Option<&'a str>,
    schedule: Option<Schedule>,
    options: Option<&'a slotq::SendOptions>,
}

/// Sends a batch (first message on line `first`); a bad message stops it: the messages
/// before it are sent, then the error is returned.
async fn send(
    producer: &slotq::Producer,
    how: How<'_>,
    first: u64,
    mut batch: Vec<Vec<u8>>,
    sent: &mut Sent,
) -> Result<(), CliError> {
    let bad = batch.iter().enumerate().find_map(|(i, p)| {
        slotq::producer::check_payload(
            p.len(),
            slotq::producer::DEFAULT_MAX_PAYLOAD,
            slotq::EmptyPayloads::Reject,
        )
        .err()
        .map(|e| CliError::Usage(format!("message {}: {e}", first + i as u64)))
        .map(|e| (i, e))
    });
    if let Some((i, _)) = &bad {
        batch.truncate(*i);
    }
    let n = batch.len() as u64;
    if let Some(o) = how.options {
        match (how.key, how.schedule) {
            (_, Some(when)) => {
                let at = when.at();
                for p in batch {
                    let id = producer.send_at_with(p, at, o).await?;
                    sent.ids.push(id.to_string());
                    sent.count += 1;
                }
            }
            (Some(k), None) => {
                for p in batch {
                    producer.send_keyed_with(k, p, o).await?;
                    sent.count += 1;
                }
            }
            (None, None) if n > 0 => {
                producer.send_batch_with(batch, o).await?;
                sent.count += n;
            }
            (None, None) => {}
        }
        return bad.map_or(Ok(()), |(_, e)| Err(e));
    }
    match (how.key, how.schedule) {
        (Some(k), Some(when)) => {
            let at = when.at();
            for p in batch {
                let id = producer.send_keyed_at(k, p, at).await?;
                sent.ids.push(id.to_string());
                sent.count += 1;
            }
            return bad.map_or(Ok(()), |(_, e)| Err(e));
        }
        (None, Some(when)) if n > 0 => {
            let ids = producer.send_batch_at(batch, when.at()).await?;
            sent.ids.extend(ids.iter().map(|id| id.to_string()));
        }
        (Some(k), None) => {
            producer
                .send_keyed_batch(batch.into_iter().map(|p| (k, p)))
                .await?
        }
        (None, None) if n > 0 => producer.send_batch(batch).await?,
        (None, _) => {}
    }
    sent.count += n;
    bad.map_or(Ok(()), |(_, e)| Err(e))
}

async fn stream_stdin(
    producer: &slotq::Producer,
    how: How<'_>,
    null: bool,
    sent: &mut Sent,
) -> Result<(), CliError> {
    let (tx, mut rx) = mpsc::channel::<Read>(READ_AHEAD);
    let sep = if null { 0 } else { b'\n' };
    std::thread::spawn(move || read_stdin(sep, &tx));
    let mut progress = Progress::new();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let result = loop {
        let read = tokio::select! {
            read = rx.recv() => read,
            _ = tick.tick() => {
                progress.draw(sent.count);
                continue;
            }
        };
        match read {
            None => break Ok(()),
            Some(Read::Batch(first, batch)) => {
                let bytes: usize = batch.iter().map(Vec::len).sum();
                if let Err(e) = send(producer, how, first, batch, sent).await {
                    break Err(e);
                }
                progress.bytes += bytes as u64;
            }
            Some(Read::Failed(e)) => {
                break Err(CliError::Other(format!("reading standard input: {e}")));
            }
        }
    };
    progress.clear();
    result
}

/// How often the progress line is redrawn.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// Inputs shorter than this show no progress line.
const PROGRESS_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The progress line on standard error, drawn in place when it is a terminal and the input
/// lasts longer than [`PROGRESS_AFTER`]; cleared before the summary.
struct Progress {
    terminal: bool,
    started: std::time::Instant,
    drawn: bool,
    bytes: u64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            started: std::time::Instant::now(),
            drawn: false,
            bytes: 0,
        }
    }

    fn draw(&mut self, sent: u64) {
        let elapsed = self.started.elapsed();
        if !self.terminal || elapsed < PROGRESS_AFTER {
            return;
        }
        let rate = sent as f64 / elapsed.as_secs_f64();
        eprint!(
            "\r\x1b[2Kpushed {sent} message(s), {:.1} MB, {rate:.0} msg/s, {:.0} s",
            self.bytes as f64 / 1e6,
            elapsed.as_secs_f64()
        );
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

/// The reader thread: splits standard input at `sep` and hands over a batch when it is
/// full or when no more input is ready.
fn read_stdin(sep: u8, tx: &mpsc::Sender<Read>) {
    let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin());
    let mut batch = Vec::new();
    let mut line = 0u64;
    let mut first = 1u64;
    let mut item = Vec::new();
    loop {
        item.clear();
        match input.read_until(sep, &mut item) {
            Ok(0) => break,
            Ok(_) => {
                if item.last() == Some(&sep) {
                    item.pop();
                }
                line += 1;
                if batch.is_empty() {
                    first = line;
                }
                batch.push(std::mem::take(&mut item));
                // Send when full, or when nothing more is buffered (the input paused).
                if batch.len() >= BATCH || input.buffer().is_empty() {
                    let full = std::mem::take(&mut batch);
                    if tx.blocking_send(Read::Batch(first, full)).is_err() {
                        return;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Read::Failed(e));
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Read::Batch(first, batch));
    }
}
