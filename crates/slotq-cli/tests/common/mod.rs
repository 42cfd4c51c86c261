//! Helpers of the CLI's tests: running the `slotq` binary as a user would.

use std::process::{Command, Output};

/// Runs `slotq` with `args` (no `SLOTQ_URL` from the environment) and waits for it.
pub fn slotq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slotq"))
        .args(args)
        .env_remove("SLOTQ_URL")
        .output()
        .expect("slotq runs")
}

/// Output bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
