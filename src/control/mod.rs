//! The control file: TOML written by the host agent, parsed with every error's line and
//! column, validated into a [`Config`].
//!
//! - `parse`: [`load`] and [`parse_str`]: text → spanned tree (a TOML syntax error stops
//!   here) → validated [`Config`], every problem turned into a [`ConfigError`] at its
//!   line:column, in file order.
//! - `spanned`: the TOML document as a tree that keeps every key's and value's span.
//! - `validate`: spanned tree → [`Config`] (durations, CIDRs, ranges, duplicates, DNS,
//!   cert files), collecting every problem rather than stopping at the first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::addr::UpstreamAddr;

pub mod code;
pub mod diff;
mod parse;
mod spanned;
#[cfg(test)]
mod tests;
mod validate;
pub mod watch;

pub use parse::{load, parse_str, parse_str_with};
pub use validate::Dns;

/// A validated control file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub relay: RelaySettings,
    /// In file order; ports never overlap.
    pub mappings: Vec<Mapping>,
    /// `[[tls]]` listeners, in file order; no two share a `listen` address.
    pub tls: Vec<TlsEntry>,
    /// `[[ws]]` listeners (SSH over WebSocket), in file order; no two listeners of any kind
    /// share an address.
    pub ws: Vec<WsEntry>,
}

/// One `[[ws]]` entry: `ws://` on `listen`, routed by the request path to the mapping that
/// `path`'s `{name}` names. The first entry's `path`, `tokens` and `ping_interval` also
/// serve `wss://` on the `[[tls]]` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsEntry {
    pub listen: SocketAddr,
    /// A request path template with one `{name}`. Default `/ssh/{name}`.
    pub path: String,
    /// A token file (`<mapping name> <token>` lines): then every request must carry its
    /// mapping's token. Known readable and well-formed when the file was loaded; relative
    /// to the control file's directory.
    pub tokens: Option<PathBuf>,
    /// `None` when "0s". Default 30s.
    pub ping_interval: Option<Duration>,
}

/// One `[[tls]]` entry: SSH wrapped in TLS on one port for all mappings, routed by SNI
/// `<name>.<sni_suffix>` to the mapping of that name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsEntry {
    pub listen: SocketAddr,
    /// PEM chain; a relative path in the file is taken relative to the control file's
    /// directory. Known readable when the file was loaded.
    pub cert: PathBuf,
    /// PEM private key; same rules as `cert`.
    pub key: PathBuf,
    /// Non-empty, without a leading `.` (one given in the file is dropped).
    pub sni_suffix: String,
}

/// `[relay]`: every key has a default.
#[derive(Clone, Debug, PartialEq)]
pub struct RelaySettings {
    /// Addresses on which each mapped port is opened. Default `["0.0.0.0", "::"]`.
    pub bind: Vec<IpAddr>,
    /// Default empty.
    pub trusted_proxies: Vec<IpNet>,
    /// Prometheus endpoint; `None` when `""`. Default `127.0.0.1:9477`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Default 5s.
    pub connect_timeout: Duration,
    /// Default 3s.
    pub proxy_header_timeout: Duration,
    /// `None` when "0s" (the default): never.
    pub idle_timeout: Option<Duration>,
    /// `None` when "0s". Default 60s.
    pub tcp_keepalive: Option<Duration>,
    /// Default 10s.
    pub shutdown_grace: Duration,
    /// Whole relay. Default 100000.
    pub max_connections: u32,
    /// Default `Close`.
    pub removed_mapping: RemovedMapping,
    /// Default true.
    pub watch: bool,
    /// Pipes the relay may hold at once (2 fds each), shared out over the loops.
    /// Default 1024. Added key (not in the contract's list).
    pub max_pipes: u32,
    /// Bytes a pipe may hold (F_SETPIPE_SZ), 4096..=1048576. Default 1 MiB: a 1 MiB pipe
    /// moved bulk data with about 40% less relay CPU per GB than the kernel's 64 KiB here.
    /// Where the kernel refuses (an unprivileged user past `pipe-user-pages-soft`), pipes
    /// keep the kernel's default size. Added key.
    pub pipe_size: u32,
    /// Connections still in admission (awaiting a PROXY header or a TLS handshake) at
    /// once, over the whole relay; each also holds a place in `max_connections`. Bounds
    /// what a flood of silent connections can hold (an fd each, for up to the admission
    /// timeout), so that direct ports keep serving. Default 1024. Added key.
    pub max_pending_admissions: u32,
    /// How long a connection whose upstream refuses or times out is held and its connect
    /// retried, for mappings that set no `hold` of their own. Zero (the default): fail at
    /// once.
    pub hold: Duration,
    /// The admin socket (`portrelay sessions`, `portrelay kill`): an absolute path, at most
    /// 107 bytes; `None` when `""` (the default), so that several relays on one host never
    /// collide.
    pub admin_socket: Option<PathBuf>,
    /// Connections one client source (an IPv4 address, an IPv6 /64) may have open at once
    /// over the whole relay; 0 (the default): no cap.
    pub per_source_max_connections: u32,
    /// New connections per source: a bucket of `burst` refilled over `period`; `None`
    /// (the default, `""`): no limit.
    pub per_source_rate: Option<SourceRate>,
    /// Client CIDRs never limited per source. Default empty.
    pub per_source_exempt: Vec<IpNet>,
}

/// `per_source_rate = "BURST/PERIOD"`: a bucket of `burst` new connections, refilled
/// evenly over `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRate {
    /// At least 1.
    pub burst: u32,
    /// Greater than zero.
    pub period: Duration,
}

impl Default for RelaySettings {
    /// The contract's defaults, as when the file has no `[relay]`.
    fn default() -> Self {
        RelaySettings {
            bind: vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            trusted_proxies: Vec::new(),
            metrics: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9477))),
            connect_timeout: Duration::from_secs(5),
            proxy_header_timeout: Duration::from_secs(3),
            idle_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 100_000,
            removed_mapping: RemovedMapping::Close,
            watch: true,
            max_pipes: 1024,
            pipe_size: 1 << 20,
            max_pending_admissions: 1024,
            hold: Duration::ZERO,
            admin_socket: None,
            per_source_max_connections: 0,
            per_source_rate: None,
            per_source_exempt: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovedMapping {
    Close,
    Keep,
}

/// One `[[map]]` entry: a host port or a range of them, forwarded to one instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    /// A single port is `p..=p`.
    pub ports: RangeInclusive<u16>,
    /// Upstream for the first port of `ports`; port `p` goes to `upstream.port() + (p - start)`.
    pub upstream: UpstreamAddr,
    /// Instance label; defaults to the first host port as text when the file gives none.
    pub name: String,
    /// Client CIDRs allowed. Default all (`0.0.0.0/0`, `::/0`).
    pub allow: Vec<IpNet>,
    /// Optional cap for this mapping (all its ports together).
    pub max_connections: Option<u32>,
    /// This mapping's own `hold`; `None`: the `[relay]` one.
    pub hold: Option<Duration>,
    /// A command (argv, `{name}`, `{port}`, `{upstream}` not yet substituted) run once per
    /// waiting spell: when a held connection's first connect fails. Empty: none.
    pub wake: Vec<String>,
    /// Connections one client source may have open at once to this mapping; `None` (or
    /// 0): no cap of its own.
    pub per_source_max_connections: Option<u32>,
    /// The address its upstream connects come from (`source`). Default [`Source::Relay`].
    pub source: Source,
}

/// Where a mapping's upstream connects come from (`source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// The relay's own address (a plain connect).
    #[default]
    Relay,
    /// The real client's address (`IP_TRANSPARENT`), where that can work.
    Client,
}

impl Mapping {
    /// A mapping known only by what a live connection records of it (its name, port and
    /// upstream): the one a connection adopted at an upgrade keeps when the control file no
    /// longer has its mapping and `removed_mapping = "keep"`.
    pub fn detached(name: &str, port: u16, upstream: SocketAddr) -> Mapping {
        Mapping {
            ports: port..=port,
            upstream: UpstreamAddr(upstream),
            name: name.to_string(),
            allow: vec![
                "0.0.0.0/0".parse().expect("a net"),
                "::/0".parse().expect("a net"),
            ],
            max_connections: None,
            hold: None,
            wake: Vec::new(),
            per_source_max_connections: None,
            source: Source::Relay,
        }
    }

    /// The upstream for host port `port`, which must be in `self.ports`.
    pub fn upstream_for(&self, port: u16) -> UpstreamAddr {
        debug_assert!(self.ports.contains(&port));
        let mut addr = self.upstream.0;
        addr.set_port(self.upstream.0.port() + (port - self.ports.start()));
        UpstreamAddr(addr)
    }
}

/// One problem in a control file, located in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    /// What kind of problem, as one of the names in [`code`]: stable, for programs
    /// (`check --format json`); the message is for people and may be reworded.
    pub code: &'static str,
    pub message: String,
}

/// Every problem found in a control file, in file order. Displays one per line as
/// `FILE:LINE:COL: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigErrors {
    /// The path as given, for messages.
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub fn render(&self) -> String {
        self.errors
            .iter()
            .map(|e| format!("{}:{}:{}: {}", self.file, e.line, e.col, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
