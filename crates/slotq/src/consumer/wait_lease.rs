//! A lease sent right behind a waiter's blocking wait, on the same connection: when
//! messages arrive, the wait returns and the lease runs at once, and the waiter hands the
//! leased messages to its consumer (one round trip from arrival to messages, where waking
//! the consumer to sweep took two).
//!
//! Invariants:
//! - A lease is made only for a consumer that is receiving: the waiter sends the wait only
//!   while its consumer waits, once a wait (see `waiter`), and when the lease comes back
//!   while the consumer is away (back from a call at the caller's deadline) or gone, the
//!   waiter releases it by name: no delivery is counted for messages nobody saw.
//! - A lease whose reply was lost (a timeout, a broken connection, a reply that is not the
//!   script's) may exist: it is released by name, as a round's lost lease is.
//! - Unordered groups and consumers without a group only: an ordered member must give back
//!   what it holds of a shard before letting the shard go, and tracks that per round.

use std::sync::Arc;
use std::time::Instant;

use super::Message;
use super::round::{self, Ask, Ctx};
use crate::cluster::Reply;
use crate::error::Error;
use crate::lease::{self, AfterWait, LeaseAsk, LeaseId, Leasing, ShardKeys};
use crate::server_error::ServerErrorKind;

/// The lease a waiter sends behind its wait.
pub(super) struct WaitLease {
    pub(super) ctx: Ctx,
    pub(super) keys: Arc<ShardKeys>,
    /// Messages asked.
    pub(super) count: usize,
    /// Send the script's source: the node did not have it last time.
    load: bool,
}

/// What to tell the consumer after a wait.
pub(super) enum Brought {
    /// Leased messages; `more`: the shard was not left empty (the consumer sweeps).
    Messages { messages: Vec<Message>, more: bool },
    /// Something may be there that this lease did not take: the consumer sweeps.
    Wake,
    /// Nothing to tell.
    Nothing,
}

impl WaitLease {
    pub(super) fn new(ctx: Ctx, keys: Arc<ShardKeys>, count: usize) -> WaitLease {
        WaitLease {
            ctx,
            keys,
            count,
            load: false,
        }
    }

    fn ask(&self, id: LeaseId) -> Ask {
        Ask {
            keys: self.keys.clone(),
            count: self.count,
            lease: Some(id),
            fence: None,
            upto: crate::priority::Priority::Low,
        }
    }

    /// The commands that follow the wait.
    pub(super) fn packed(&self, id: LeaseId) -> Vec<u8> {
        let ask = LeaseAsk {
            keys: &self.keys,
            count: self.count,
            id,
            fence: None,
        };
        let terms = lease::LeaseTerms {
            lease: self.ctx.lease,
            max_attempts: self.ctx.max_attempts.unwrap_or(u32::MAX),
            max_bytes: round::MAX_POP_BYTES,
        };
        lease::lease_packed(&self.ctx.scripts, &ask, terms, self.load)
    }

    /// Reads the lease's two replies. The lease's clock starts from the reply, less an
    /// eighth of its length: the script ran when messages arrived, somewhere between the
    /// send and the reply (a blocking wait may last seconds), and a reply reaches the
    /// client within a round trip of the script.
    pub(super) fn read(&mut self, id: LeaseId, script: Reply, list: Reply) -> Brought {
        match lease::read_packed(script, list) {
            AfterWait::Ran(Leasing::Nothing { drained }) => {
                self.load = false;
                if drained {
                    Brought::Nothing
                } else {
                    Brought::Wake
                }
            }
            AfterWait::Ran(Leasing::Leased {
                deadline_ms,
                count,
                items,
                in_list,
                drained,
            }) => {
                self.load = false;
                let since = Instant::now()
                    .checked_sub(self.ctx.lease / 8)
                    .unwrap_or_else(Instant::now);
                let max_attempts = self.ctx.max_attempts.unwrap_or(u32::MAX);
                let mut messages = Vec::with_capacity(count);
                let leased = (deadline_ms, count, items, in_list);
                match round::take_lease(
                    &self.ctx,
                    &self.ask(id),
                    &Arc::from(&*self.keys.tag),
                    leased,
                    max_attempts,
                    since,
                    &mut messages,
                ) {
                    Ok(_) => Brought::Messages {
                        messages,
                        more: !drained,
                    },
                    Err(e) => {
                        // As a round does: the lease is left to expire, and the reaper
                        // parks what cannot be read with the dead letters (a release
                        // would put it back at the head, to be leased and refused again).
                        tracing::warn!(shard = %self.keys.tag, cause = %e, "a lease behind a wait could not be read");
                        Brought::Wake
                    }
                }
            }
            AfterWait::Ran(Leasing::Unread(e)) | AfterWait::Unknown(e) => {
                self.release(id, &e);
                Brought::Wake
            }
            AfterWait::Refused(kind) => {
                if kind == ServerErrorKind::NoScript {
                    self.load = true;
                }
                // The consumer's sweep takes what is there (in place, in a migrating slot).
                Brought::Wake
            }
        }
    }

    /// Gives back a lease made for a consumer that is not receiving, or whose reply was
    /// lost, by name: no delivery counted. Keeps trying, as a round's lost lease does.
    pub(super) fn release(&self, id: LeaseId, why: &Error) {
        let _ = round::lost_reply(&self.ctx, &self.ask(id), why);
    }

    /// Releases the messages of a lease the consumer will not receive.
    pub(super) fn release_messages(&self, id: LeaseId) {
        self.release(
            id,
            &Error::Protocol("leased behind a wait while its consumer was away".into()),
        );
    }
}
