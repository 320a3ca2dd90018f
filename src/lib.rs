//! portrelay: a kernel-assisted TCP relay for SSH on multi-instance hosts.
//!
//! - [`cli`]: command line (clap).
//! - [`admin`]: the admin socket (`portrelay sessions`, `portrelay kill`): server and client.
//! - [`control`]: the control file: parse with line:col errors, validate into [`control::Config`].
//! - [`limits`]: per-source limits: one table of client sources shared by the loops.
//! - [`addr`]: address newtypes, so a signature says which end it means.
//! - [`logging`]: log lines to stderr, batched per turn on the event loops.
//! - [`metrics`]: metric names, handles, the registry (series follow the mappings), the
//!   `/metrics` endpoint.
//! - [`proxy_protocol`]: PROXY v1/v2 headers: incremental, capped parser.
//! - [`tls`]: the TLS entry: certificates, SNI routing.
//! - [`websocket`]: SSH over WebSocket: the upgrade handshake, frames, token files (pure).
//! - [`relay`]: event loops, the connection state machine, the io backends (uring, epoll), pipes.
//! - [`sys`]: the syscall wrappers the standard library lacks (splice, pipes, eventfd, peek).
#![deny(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod cli;
pub mod control;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod relay;
pub mod sys;
pub mod tls;
pub mod upgrade;
pub mod websocket;
