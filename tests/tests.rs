//! The one integration-test binary. Every test starts the real `portrelay` binary (through
//! `tests/util`) with a temporary control file on free ports of 127.0.0.1, and talks to it
//! with real peers (OpenSSH's ssh, scp, sftp and sshd) and in-process upstreams.
//!
//! - `harness`: the harness checked on its own, without a relay (sshd, upstreams, clients).
//! - `ssh`: ssh, scp, sftp and `ssh -L` through the relay.
//! - `relay`: the data path with raw TCP: half-close, many connections, upstream failures,
//!   `allow`, port ranges, SIGTERM.
//! - `reload`: live reload of the control file while connections run.
//! - `proxied`: PROXY v1/v2 through real HAProxy, SSH over TLS through `openssl s_client`.
//! - `ops`: sd_notify as systemd sees it; exact counters through a real scrape.
//! - `hardening`: fault drills: broken control files, dying loops, admission against
//!   reloads and floods, resets seen late, dead peers.
//! - `relay` also: resets passed on, the pipe pool (a pipe with bytes is never reused; the
//!   pool running dry), splice shown, the `auto` backend's fallback under seccomp.
//! - `control`: `portrelay check` and `run` on invalid and valid control files.
//! - `package`: `check --format json`, `--version`, the man page and completions build.rs
//!   makes (the .deb itself: scripts/check-package).
//! - `booting`: `hold` and `wake` for instances that are still booting (real sshd, late).
//! - `websocket`: SSH over WebSocket: websocat as ssh's ProxyCommand on `ws://` and
//!   `wss://`, tokens and refusals, a raw client for the frame protocol, half-close,
//!   metrics.
//! - `admin`: the admin socket: `portrelay sessions` and `portrelay kill` with real ssh and
//!   sshd's own log, `--map` and `--client`, a PROXY header's client, bad admin clients.
//! - `limits`: per-source limits: one cap over all loops, real ssh past the cap, the PROXY
//!   header's client (IPv6 per /64) and the WebSocket client as the source, the rate
//!   bucket, exempt CIDRs, reloads, held connections, the log summary, `check` errors.
//! - `transparent`: `source = "client"` in network namespaces the test makes: sshd sees the
//!   client's address (ssh, scp), the fallbacks by reason, `scripts/transparent-routing`.
//! - `copy_path`: the copy buffers of small messages: every one back after 10,000
//!   connections that end every way, exact byte counts, a pool run dry, order kept across
//!   switches to splice and back.
//! - `upgrade`: live upgrades (`portrelay upgrade`, SIGUSR2) under scp, interactive ssh,
//!   half-closed, held, WebSocket, TLS-entry and 2,000 idle connections; rollbacks, across
//!   backends, counters that continue.
//!
//! A data-path test is written once, as `fn NAME(backend: Backend)`, and `data_path_test!(NAME)`
//! runs it on both backends as the tests `NAME::uring` and `NAME::epoll`. On a machine
//! that lacks io_uring the `::uring` tests fail, unless `PORTRELAY_TEST_ALLOW_SKIP=1`
//! (refused when `CI` is set) makes them a printed skip. The harness's relays run 4 event
//! loops (`--threads 4`), so paths between loops run on any machine.

mod util;

// The test modules live in tests/cases/: Cargo would build each file directly under tests/
// as a test binary of its own.
#[path = "cases/admin.rs"]
mod admin;
#[path = "cases/booting.rs"]
mod booting;
#[path = "cases/control.rs"]
mod control;
#[path = "cases/copy_path.rs"]
mod copy_path;
#[path = "cases/hardening.rs"]
mod hardening;
#[path = "cases/harness.rs"]
mod harness;
#[path = "cases/limits.rs"]
mod limits;
#[path = "cases/metrics.rs"]
mod metrics;
#[path = "cases/ops.rs"]
mod ops;
#[path = "cases/package.rs"]
mod package;
#[path = "cases/proxied.rs"]
mod proxied;
#[path = "cases/relay.rs"]
mod relay;
#[path = "cases/reload/mod.rs"]
mod reload;
#[path = "cases/ssh.rs"]
mod ssh;
#[path = "cases/transparent.rs"]
mod transparent;
#[path = "cases/upgrade.rs"]
mod upgrade;
#[path = "cases/websocket.rs"]
mod websocket;
