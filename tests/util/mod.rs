//! The integration-test harness: the real `portrelay` binary with a temporary control file,
//! a real OpenSSH sshd, and in-process upstreams.
//!
//! - [`relay`]: [`Relay`] (spawn, wait for `ready`, read the JSON log), [`Backend`],
//!   [`ControlFile`] and `portrelay check`, and the [`data_path_test!`] macro.
//! - [`log`]: a small parser for the relay's one-object-a-line JSON log.
//! - [`metrics`]: the one `/metrics` scraper and exposition parser.
//! - [`sshd`]: [`Sshd`], a throwaway sshd on a free port, and `ssh`/`scp`/`sftp` commands for it.
//! - [`net`]: free ports, in-process upstreams (echo, fixed reply, digest, HTTP), a black
//!   hole, client helpers.
//! - [`files`]: random files, comparing files, SHA-256.
//! - [`process`]: run a command with a deadline.
//! - [`netns`]: network namespaces a test makes (deleted on drop), the transparent-source lab.
//! - [`upgrade`]: live upgrades of a relay (its pid changes: the test adopts the new
//!   process), binaries with another build tag and wrappers with test switches, `ss`, and
//!   traffic that runs across an upgrade.
//!
//! Nothing here sleeps to wait for readiness: every wait polls a condition with a short
//! interval under a deadline, and panics with what it saw when the deadline passes.

// A harness: some accessors (pid, logs, sshd log…) are for debugging and tests to come.
#![allow(dead_code)]

pub mod files;
pub mod haproxy;
pub mod log;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod process;
pub mod relay;
pub mod sshd;
pub mod tls;
pub mod upgrade;

use std::time::{Duration, Instant};

pub use relay::{Backend, ControlFile, Relay};
pub use sshd::Sshd;

/// Calls `probe` every `interval` until it returns `Some`, or gives up with `None` once
/// `timeout` has passed. The number of calls is bounded by `timeout / interval + 1`.
pub fn poll<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let max_calls = timeout.as_millis() / interval.as_millis().max(1) + 1;
    for _ in 0..max_calls {
        if let Some(value) = probe() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
    None
}
