//! What an error reply from Redis means, parsed once from its code.
//!
//! Every error reply starts with a code (`MOVED`, `TRYAGAIN`, `ERR`, ...). The router
//! (`cluster/reply.rs`) turns the code into a [`ServerErrorKind`] as the reply arrives, and
//! every decision after that — follow, refresh the slot map, wait, reload a script, give
//! up — matches on the kind and its [`RetryMethod`], never on the text again.
//!
//! What the kinds mean for slotq's own commands:
//!
//! | kind | a push | a pop / lease | retry |
//! |---|---|---|---|
//! | `Moved`, `Ask` | followed | followed | [`RetryMethod::Redirect`] |
//! | `TryAgain`, `Loading`, `Busy` | resent after a pause, within the retry budget | same | [`RetryMethod::WaitAndRetry`] |
//! | `ClusterDown`, `MasterDown`, `ReadOnly`, `Unblocked` | slot map refreshed, resent within the budget | same | [`RetryMethod::RefreshAndRetry`] |
//! | `NoScript` | script source sent | same | [`RetryMethod::ReloadScript`] |
//! | `OutOfMemory` | refused, nothing stored; an unkeyed batch goes to another shard | refused (a lease pop writes) | [`RetryMethod::NoRetry`] |
//! | `NoAuth`, `WrongPass`, `NoPerm` | `Error::Auth` | same | [`RetryMethod::NoRetry`] |
//! | `Fenced` | - | an ordered member's grant is stale: the shard is dropped until the group grants it again | [`RetryMethod::NoRetry`] |
//! | others | `Error::Server` | same | [`RetryMethod::NoRetry`] |
//!
//! An error reply means the server did not run the command (a script that fails midway is
//! the exception: Redis keeps what it wrote before the error; slotq's scripts check
//! everything before they write).

/// The kind of an error reply, from its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerErrorKind {
    /// `MOVED slot host:port`: the slot lives on another master now.
    Moved,
    /// `ASK slot host:port`: the key is being migrated; ask the target once.
    Ask,
    /// `TRYAGAIN`: a multi-key command in a slot being migrated, keys split for now.
    TryAgain,
    /// `CLUSTERDOWN`: the cluster (or this slot) is not served right now.
    ClusterDown,
    /// `LOADING`: the node is loading its dataset.
    Loading,
    /// `MASTERDOWN`: a replica lost its master (reads refused).
    MasterDown,
    /// `READONLY`: a write reached a replica (a failover turned the master into one).
    ReadOnly,
    /// `UNBLOCKED`: a blocking command was ended because its key moved or its node changed role.
    Unblocked,
    /// `NOSCRIPT`: the script cache does not hold the script (after a restart or failover).
    NoScript,
    /// `BUSY`: a script has run past `busy-reply-threshold`; nothing else runs meanwhile.
    Busy,
    /// `OOM`: `maxmemory` reached; writes are refused.
    OutOfMemory,
    /// `NOAUTH`: authentication required.
    NoAuth,
    /// `WRONGPASS`: the user or password is wrong.
    WrongPass,
    /// `NOPERM`: the user's ACL does not allow the command or key.
    NoPerm,
    /// `WRONGTYPE`: a key holds another type than the command needs.
    WrongType,
    /// `EXECABORT`: a transaction was discarded.
    ExecAbort,
    /// `FENCED fence epoch`: slotq's own: a member of an ordered group presented an older
    /// grant of a shard than the shard's fence holds (another member owns it now).
    Fenced,
    /// Any other code (`ERR` and what Redis may add).
    Other,
}

/// What to do about an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryMethod {
    /// Final: the same command would get the same answer.
    NoRetry,
    /// Follow the redirect (`MOVED`: fix the slot map; `ASK`: once, after `ASKING`).
    Redirect,
    /// The cluster changed shape: learn the slot map again, then resend.
    RefreshAndRetry,
    /// Momentary: pause, then resend to the same place.
    WaitAndRetry,
    /// Send the script's source (`EVAL`) instead of its hash.
    ReloadScript,
}

impl ServerErrorKind {
    /// The kind of an error code (the first word of the reply).
    pub fn parse(code: &str) -> ServerErrorKind {
        match code {
            "MOVED" => ServerErrorKind::Moved,
            "ASK" => ServerErrorKind::Ask,
            "TRYAGAIN" => ServerErrorKind::TryAgain,
            "CLUSTERDOWN" => ServerErrorKind::ClusterDown,
            "LOADING" => ServerErrorKind::Loading,
            "MASTERDOWN" => ServerErrorKind::MasterDown,
            "READONLY" => ServerErrorKind::ReadOnly,
            "UNBLOCKED" => ServerErrorKind::Unblocked,
            "NOSCRIPT" => ServerErrorKind::NoScript,
            "BUSY" => ServerErrorKind::Busy,
            "OOM" => ServerErrorKind::OutOfMemory,
            "NOAUTH" => ServerErrorKind::NoAuth,
            "WRONGPASS" => ServerErrorKind::WrongPass,
            "NOPERM" => ServerErrorKind::NoPerm,
            "WRONGTYPE" => ServerErrorKind::WrongType,
            "EXECABORT" => ServerErrorKind::ExecAbort,
            "FENCED" => ServerErrorKind::Fenced,
            _ => ServerErrorKind::Other,
        }
    }

    /// What to do about it.
    pub fn retry_method(self) -> RetryMethod {
        match self {
            ServerErrorKind::Moved | ServerErrorKind::Ask => RetryMethod::Redirect,
            ServerErrorKind::TryAgain | ServerErrorKind::Loading | ServerErrorKind::Busy => {
                RetryMethod::WaitAndRetry
            }
            ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Unblocked => RetryMethod::RefreshAndRetry,
            ServerErrorKind::NoScript => RetryMethod::ReloadScript,
            _ => RetryMethod::NoRetry,
        }
    }

    /// Authentication or authorization refused the command.
    pub fn is_auth(self) -> bool {
        matches!(
            self,
            ServerErrorKind::NoAuth | ServerErrorKind::WrongPass | ServerErrorKind::NoPerm
        )
    }

    /// Whether the server may accept the command later without anything changing on the
    /// client's side (a pause or a fresh slot map).
    pub fn is_transient(self) -> bool {
        matches!(
            self.retry_method(),
            RetryMethod::WaitAndRetry | RetryMethod::RefreshAndRetry
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_has_its_kind_and_retry() {
        let table = [
            ("MOVED", RetryMethod::Redirect),
            ("ASK", RetryMethod::Redirect),
            ("TRYAGAIN", RetryMethod::WaitAndRetry),
            ("LOADING", RetryMethod::WaitAndRetry),
            ("BUSY", RetryMethod::WaitAndRetry),
            ("CLUSTERDOWN", RetryMethod::RefreshAndRetry),
            ("MASTERDOWN", RetryMethod::RefreshAndRetry),
            ("READONLY", RetryMethod::RefreshAndRetry),
            ("UNBLOCKED", RetryMethod::RefreshAndRetry),
            ("NOSCRIPT", RetryMethod::ReloadScript),
            ("OOM", RetryMethod::NoRetry),
            ("NOAUTH", RetryMethod::NoRetry),
            ("WRONGPASS", RetryMethod::NoRetry),
            ("NOPERM", RetryMethod::NoRetry),
            ("WRONGTYPE", RetryMethod::NoRetry),
            ("FENCED", RetryMethod::NoRetry),
            ("ERR", RetryMethod::NoRetry),
        ];
        for (code, retry) in table {
            let kind = ServerErrorKind::parse(code);
            assert_eq!(kind.retry_method(), retry, "{code}");
            assert_eq!(kind == ServerErrorKind::Other, code == "ERR", "{code}");
        }
        assert!(ServerErrorKind::parse("NOPERM").is_auth());
        assert!(!ServerErrorKind::parse("OOM").is_transient());
    }
}
