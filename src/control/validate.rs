//! Spanned tree → [`Config`]: every key and value checked, every problem collected with the
//! byte offset of what is at fault (the value; the key for an unknown key; the `[[map]]` or
//! `[[tls]]` header for a missing key).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::spanned::{Item, Key, LineIndex, Table, Value};
use super::{
    code, Config, Mapping, RelaySettings, RemovedMapping, Source, SourceRate, TlsEntry, WsEntry,
};
use crate::addr::UpstreamAddr;

/// One problem, at a byte offset of the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Problem {
    pub offset: usize,
    /// One of [`code`]'s names: what kind of problem, for programs.
    pub code: &'static str,
    pub message: String,
}

/// `admin_socket`: `""` is none; otherwise an absolute path that fits a unix socket
/// address (108 bytes with its terminating NUL). Whether its directory exists is seen at
/// start, where the relay binds it (`check` may run where that directory is not made yet).
fn admin_socket_path(s: &str) -> Result<Option<PathBuf>, String> {
    const MAX: usize = 107;
    if s.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!(
            "\"admin_socket\" must be an absolute path (or \"\" for none), got {s:?}"
        ));
    }
    if s.len() > MAX || path.file_name().is_none() || s.contains('\0') {
        return Err(format!(
            "\"admin_socket\" must name a file, in at most {MAX} bytes, got {s:?}"
        ));
    }
    Ok(Some(path))
}

/// The longest duration a key may hold: every deadline the relay computes from one stays
/// far from `Instant`'s limits (humantime accepts values past them).
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

pub(super) const RELAY_KEYS: &[&str] = &[
    "bind",
    "trusted_proxies",
    "metrics",
    "connect_timeout",
    "proxy_header_timeout",
    "idle_timeout",
    "tcp_keepalive",
    "shutdown_grace",
    "max_connections",
    "removed_mapping",
    "watch",
    "max_pipes",
    "pipe_size",
    "max_pending_admissions",
    "hold",
    "admin_socket",
    "per_source_max_connections",
    "per_source_rate",
    "per_source_exempt",
];
pub(super) const MAP_KEYS: &[&str] = &[
    "port",
    "to",
    "name",
    "allow",
    "max_connections",
    "hold",
    "wake",
    "per_source_max_connections",
    "source",
];
pub(super) const TLS_KEYS: &[&str] = &["listen", "cert", "key", "sni_suffix"];
pub(super) const WS_KEYS: &[&str] = &["listen", "path", "tokens", "ping_interval"];

const PORT_TYPE: &str = "\"port\" must be an integer or a \"FIRST-LAST\" string";
const TO_FORMS: &str = "\"IP:PORT\", \"[IPv6]:PORT\" or \"HOST:PORT\"";

/// Validates the root table of a control file. `base_dir` is the control file's directory,
/// against which relative cert/key paths are taken.
pub(super) fn validate(
    root: &Table,
    text: &str,
    lines: &LineIndex<'_>,
    base_dir: &Path,
    dns: Dns,
) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        text,
        lines,
        base_dir,
        problems: Vec::new(),
        resolved: HashMap::new(),
        dns,
    };
    let mut relay = RelaySettings::default();
    let mut maps = Vec::new();
    let mut tls = Vec::new();
    let mut ws = Vec::new();
    for (key, item) in root {
        let key_at = key.start(0);
        let at = item.start(key_at);
        match key.name.as_str() {
            "relay" => match &item.value {
                Value::Table(table) => v.relay(table, &mut relay),
                _ => v.err(
                    at,
                    code::WRONG_TYPE,
                    "\"relay\" must be a table, written [relay]",
                ),
            },
            "map" => {
                for (table, at) in v.array_of_tables(item, at, "map") {
                    maps.push(v.map(table, at));
                }
            }
            "tls" => {
                for (table, at) in v.array_of_tables(item, at, "tls") {
                    tls.push(v.tls(table, at));
                }
            }
            "ws" => {
                for (table, at) in v.array_of_tables(item, at, "ws") {
                    ws.push(v.ws(table, at));
                }
            }
            _ => v.unknown_top_level(key, item, key_at),
        }
    }
    v.check_overlaps(&maps);
    let listeners: Vec<(&str, Option<(SocketAddr, usize)>)> = tls
        .iter()
        .map(|t| ("[[tls]]", t.listen))
        .chain(ws.iter().map(|w| ("[[ws]]", w.listen)))
        .collect();
    v.check_listeners(&listeners, &maps, &relay.bind);
    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let mappings = maps.into_iter().filter_map(MapDraft::build).collect();
    let tls = tls.into_iter().filter_map(TlsDraft::build).collect();
    let ws = ws.into_iter().filter_map(WsDraft::build).collect();
    Ok(Config {
        relay,
        mappings,
        tls,
        ws,
    })
}

struct Validator<'a> {
    text: &'a str,
    lines: &'a LineIndex<'a>,
    base_dir: &'a Path,
    problems: Vec<Problem>,
    /// Host name → first address (or why not), so that a name used by many mappings is
    /// looked up once.
    resolved: HashMap<String, Result<IpAddr, String>>,
    dns: Dns,
}

/// Whether host-name upstreams are looked up (loading a file) or refused (fuzzing, which
/// must not send queries anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dns {
    Resolve,
    Offline,
}

/// A `[[map]]` entry as far as it is valid; complete when the file has no problem.
struct MapDraft {
    /// With the offset of the `port` value.
    ports: Option<(RangeInclusive<u16>, usize)>,
    upstream: Option<SocketAddr>,
    name: Option<String>,
    allow: Option<Vec<IpNet>>,
    max_connections: Option<u32>,
    hold: Option<Duration>,
    wake: Option<Vec<String>>,
    per_source_max_connections: Option<u32>,
    source: Option<Source>,
}

impl MapDraft {
    fn build(self) -> Option<Mapping> {
        let (ports, _) = self.ports?;
        Some(Mapping {
            name: self.name.unwrap_or_else(|| ports.start().to_string()),
            upstream: UpstreamAddr(self.upstream?),
            ports,
            allow: self.allow.unwrap_or_else(|| {
                vec![
                    IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("/0 is valid"),
                    IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("/0 is valid"),
                ]
            }),
            max_connections: self.max_connections,
            hold: self.hold,
            wake: self.wake.unwrap_or_default(),
            per_source_max_connections: self.per_source_max_connections,
            source: self.source.unwrap_or_default(),
        })
    }
}

/// A `[[tls]]` entry as far as it is valid.
struct TlsDraft {
    /// With the offset of the `listen` value.
    listen: Option<(SocketAddr, usize)>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    sni_suffix: Option<String>,
}

impl TlsDraft {
    fn build(self) -> Option<TlsEntry> {
        Some(TlsEntry {
            listen: self.listen?.0,
            cert: self.cert?,
            key: self.key?,
            sni_suffix: self.sni_suffix?,
        })
    }
}

/// A `[[ws]]` entry as far as it is valid.
struct WsDraft {
    /// With the offset of the `listen` value.
    listen: Option<(SocketAddr, usize)>,
    path: Option<String>,
    tokens: Option<Option<PathBuf>>,
    ping_interval: Option<Option<Duration>>,
}

impl WsDraft {
    fn build(self) -> Option<WsEntry> {
        Some(WsEntry {
            listen: self.listen?.0,
            path: self.path.unwrap_or_else(|| "/ssh/{name}".to_owned()),
            tokens: self.tokens.unwrap_or(None),
            ping_interval: self.ping_interval.unwrap_or(Some(Duration::from_secs(30))),
        })
    }
}

impl Validator<'_> {
    fn err(&mut self, offset: usize, code: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            offset,
            code,
            message: message.into(),
        });
    }

    /// The text of an item, for telling `[a]` from `a = {…}`.
    fn source(&self, item: &Item) -> &str {
        item.span
            .as_ref()
            .and_then(|s| self.text.get(s.clone()))
            .unwrap_or("")
    }

    fn unknown_top_level(&mut self, key: &Key, item: &Item, key_at: usize) {
        let source = self.source(item);
        let shown = table_name(&key.name);
        let (code, message) = match &item.value {
            Value::Table(_) if !source.starts_with('{') => {
                (code::UNKNOWN_TABLE, format!("unknown table [{shown}]"))
            }
            Value::Array(entries)
                if source.starts_with("[[")
                    && !entries.is_empty()
                    && entries.iter().all(|e| matches!(e.value, Value::Table(_))) =>
            {
                (code::UNKNOWN_TABLE, format!("unknown table [[{shown}]]"))
            }
            _ => {
                let name = key.name.as_str();
                let hint = if RELAY_KEYS.contains(&name) {
                    " (it belongs in [relay])"
                } else if MAP_KEYS.contains(&name) {
                    " (it belongs in a [[map]])"
                } else if TLS_KEYS.contains(&name) {
                    " (it belongs in a [[tls]])"
                } else if WS_KEYS.contains(&name) {
                    " (it belongs in a [[ws]])"
                } else {
                    ""
                };
                let message = format!("unknown key {name:?} at top level{hint}");
                (code::UNKNOWN_KEY, message)
            }
        };
        self.err(key_at, code, message);
    }

    /// The entries of `[[name]]` (or of an inline array of tables), each with its offset.
    fn array_of_tables<'i>(
        &mut self,
        item: &'i Item,
        at: usize,
        name: &str,
    ) -> Vec<(&'i Table, usize)> {
        let message = format!("\"{name}\" must be an array of tables, written [[{name}]]");
        let Value::Array(entries) = &item.value else {
            self.err(at, code::WRONG_TYPE, message);
            return Vec::new();
        };
        let mut tables = Vec::with_capacity(entries.len());
        for entry in entries {
            match &entry.value {
                Value::Table(table) => tables.push((table, entry.start(at))),
                _ => self.err(entry.start(at), code::WRONG_TYPE, message.clone()),
            }
        }
        tables
    }

    fn relay(&mut self, table: &Table, r: &mut RelaySettings) {
        for (key, item) in table {
            let key_at = key.start(0);
            let at = item.start(key_at);
            let name = key.name.as_str();
            match name {
                "bind" => {
                    if let Some(bind) = self.bind(item, at) {
                        r.bind = bind;
                    }
                }
                "trusted_proxies" => {
                    if let Some(nets) = self.cidrs(item, at, name) {
                        r.trusted_proxies = nets;
                    }
                }
                "metrics" => match &item.value {
                    Value::String(s) if s.is_empty() => r.metrics = None,
                    Value::String(s) => {
                        if let Some(addr) = self.socket_addr(s, at, name) {
                            r.metrics = Some(addr);
                        }
                    }
                    _ => self.err(
                        at,
                        code::WRONG_TYPE,
                        "\"metrics\" must be a string \"IP:PORT\", or \"\" to disable",
                    ),
                },
                "connect_timeout" | "proxy_header_timeout" => {
                    if let Some(d) = self.duration(item, at, name) {
                        if d.is_zero() {
                            self.err(
                                at,
                                code::OUT_OF_RANGE,
                                format!("\"{name}\" must be greater than 0s"),
                            );
                        } else if name == "connect_timeout" {
                            r.connect_timeout = d;
                        } else {
                            r.proxy_header_timeout = d;
                        }
                    }
                }
                "idle_timeout" => {
                    if let Some(d) = self.duration(item, at, name) {
                        r.idle_timeout = (!d.is_zero()).then_some(d);
                    }
                }
                "tcp_keepalive" => {
                    if let Some(d) = self.duration(item, at, name) {
                        if !d.is_zero() && d < Duration::from_secs(1) {
                            self.err(
                                at,
                                code::OUT_OF_RANGE,
                                "\"tcp_keepalive\" must be 0s (off) or at least 1s",
                            );
                        } else {
                            r.tcp_keepalive = (!d.is_zero()).then_some(d);
                        }
                    }
                }
                "shutdown_grace" => {
                    if let Some(d) = self.duration(item, at, name) {
                        r.shutdown_grace = d;
                    }
                }
                "max_connections" => {
                    if let Some(n) = self.u32_at_least(item, at, name, 1) {
                        r.max_connections = n;
                    }
                }
                "max_pipes" => {
                    if let Some(n) = self.u32_at_least(item, at, name, 0) {
                        r.max_pipes = n;
                    }
                }
                "max_pending_admissions" => {
                    if let Some(n) = self.u32_at_least(item, at, name, 1) {
                        r.max_pending_admissions = n;
                    }
                }
                "pipe_size" => {
                    if let Some(n) = self.u32_at_least(item, at, name, 4096) {
                        if n > 1 << 20 {
                            self.err(
                                at, code::OUT_OF_RANGE,
                                format!("\"pipe_size\" must be at most 1048576 (the kernel's default pipe-max-size), got {n}"),
                            );
                        } else {
                            r.pipe_size = n;
                        }
                    }
                }
                "removed_mapping" => match &item.value {
                    Value::String(s) if s == "close" => r.removed_mapping = RemovedMapping::Close,
                    Value::String(s) if s == "keep" => r.removed_mapping = RemovedMapping::Keep,
                    Value::String(s) => self.err(
                        at,
                        code::BAD_VALUE,
                        format!("\"removed_mapping\" must be \"close\" or \"keep\", got {s:?}"),
                    ),
                    _ => self.err(
                        at,
                        code::WRONG_TYPE,
                        "\"removed_mapping\" must be \"close\" or \"keep\"",
                    ),
                },
                "watch" => match item.value {
                    Value::Boolean(b) => r.watch = b,
                    _ => self.err(at, code::WRONG_TYPE, "\"watch\" must be true or false"),
                },
                "hold" => {
                    if let Some(d) = self.duration(item, at, name) {
                        r.hold = d;
                    }
                }
                "admin_socket" => match &item.value {
                    Value::String(s) => match admin_socket_path(s) {
                        Ok(path) => r.admin_socket = path,
                        Err(why) => self.err(at, code::BAD_VALUE, why),
                    },
                    _ => self.err(
                        at,
                        code::WRONG_TYPE,
                        "\"admin_socket\" must be a string: an absolute path, or \"\" for none",
                    ),
                },
                "per_source_max_connections" => {
                    if let Some(n) = self.u32_at_least(item, at, name, 0) {
                        r.per_source_max_connections = n;
                    }
                }
                "per_source_rate" => {
                    if let Some(rate) = self.source_rate(item, at) {
                        r.per_source_rate = rate;
                    }
                }
                "per_source_exempt" => {
                    if let Some(nets) = self.cidrs(item, at, name) {
                        r.per_source_exempt = nets;
                    }
                }
                _ => self.err(
                    key_at,
                    code::UNKNOWN_KEY,
                    format!("unknown key {name:?} in [relay]"),
                ),
            }
        }
    }

    fn map(&mut self, table: &Table, at: usize) -> MapDraft {
        let mut d = MapDraft {
            ports: None,
            upstream: None,
            name: None,
            allow: None,
            max_connections: None,
            hold: None,
            wake: None,
            per_source_max_connections: None,
            source: None,
        };
        let (mut has_port, mut has_to, mut to_at) = (false, false, at);
        for (key, item) in table {
            let key_at = key.start(at);
            let value_at = item.start(key_at);
            let name = key.name.as_str();
            match name {
                "port" => {
                    has_port = true;
                    d.ports = self.ports(item, value_at).map(|p| (p, value_at));
                }
                "to" => {
                    has_to = true;
                    to_at = value_at;
                    d.upstream = match &item.value {
                        Value::String(s) => self.upstream(s, value_at),
                        _ => {
                            self.err(
                                value_at,
                                code::WRONG_TYPE,
                                format!("\"to\" must be a string {TO_FORMS}"),
                            );
                            None
                        }
                    };
                }
                "name" => d.name = self.non_empty_string(item, value_at, name),
                "allow" => d.allow = self.cidrs(item, value_at, name),
                "max_connections" => d.max_connections = self.u32_at_least(item, value_at, name, 1),
                "hold" => d.hold = self.duration(item, value_at, name),
                "wake" => d.wake = self.wake(item, value_at),
                "per_source_max_connections" => {
                    d.per_source_max_connections = self.u32_at_least(item, value_at, name, 0)
                }
                "source" => d.source = self.source_key(item, value_at),
                _ => self.err(
                    key_at,
                    code::UNKNOWN_KEY,
                    format!("unknown key {name:?} in [[map]]"),
                ),
            }
        }
        if !has_port {
            self.err(at, code::MISSING_KEY, "[[map]] needs \"port\"");
        }
        if !has_to {
            self.err(at, code::MISSING_KEY, "[[map]] needs \"to\"");
        }
        if let (Some((ports, _)), Some(up)) = (&d.ports, &d.upstream) {
            let first = u32::from(up.port());
            let last = first + u32::from(ports.end() - ports.start());
            if last > u32::from(u16::MAX) {
                self.err(
                    to_at,
                    code::UPSTREAM_PORT_OVERFLOW,
                    format!("upstream ports {first}-{last} would pass 65535"),
                );
            }
        }
        d
    }

    /// `port`: an integer, `"FIRST-LAST"` or `"PORT"`.
    fn ports(&mut self, item: &Item, at: usize) -> Option<RangeInclusive<u16>> {
        match &item.value {
            Value::Integer(n) => {
                let p = self.port_number(&n.to_string(), Some(*n), at)?;
                Some(p..=p)
            }
            Value::String(s) => {
                let (first, last) = s.split_once('-').unwrap_or((s, s));
                let (first, last) = (first.trim(), last.trim());
                let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
                if !digits(first) || !digits(last) {
                    self.err(
                        at, code::BAD_PORT,
                        format!(
                            "invalid port range {s:?}: expected \"FIRST-LAST\" such as \"40000-40009\""
                        ),
                    );
                    return None;
                }
                let first = self.port_number(first, first.parse().ok(), at)?;
                let last = self.port_number(last, last.parse().ok(), at)?;
                if first > last {
                    self.err(
                        at,
                        code::BAD_PORT,
                        format!("invalid port range {s:?}: {first} is greater than {last}"),
                    );
                    return None;
                }
                Some(first..=last)
            }
            _ => {
                self.err(at, code::WRONG_TYPE, PORT_TYPE);
                None
            }
        }
    }

    fn port_number(&mut self, text: &str, value: Option<i64>, at: usize) -> Option<u16> {
        match value
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&p| p != 0)
        {
            Some(p) => Some(p),
            None => {
                self.err(
                    at,
                    code::BAD_PORT,
                    format!("port {text} is out of range 1-65535"),
                );
                None
            }
        }
    }

    /// `to`: `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT` resolved now (first address wins).
    fn upstream(&mut self, s: &str, at: usize) -> Option<SocketAddr> {
        let invalid = |why: &str| format!("invalid upstream {s:?}: {why}");
        let addr = if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.ip().is_unspecified() {
                self.err(
                    at,
                    code::BAD_UPSTREAM,
                    invalid("the unspecified address is not an upstream"),
                );
                return None;
            }
            addr
        } else {
            let expected = format!("expected {TO_FORMS}");
            let Some((host, port)) = s.rsplit_once(':') else {
                self.err(at, code::BAD_UPSTREAM, invalid(&expected));
                return None;
            };
            if host.contains(':') && !host.starts_with('[') && host.parse::<Ipv6Addr>().is_ok() {
                let hint = format!("write an IPv6 address in brackets, as \"[{host}]:{port}\"");
                self.err(at, code::BAD_UPSTREAM, invalid(&hint));
                return None;
            }
            let host_ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            let port_ok = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            if !host_ok || !port_ok {
                self.err(at, code::BAD_UPSTREAM, invalid(&expected));
                return None;
            }
            let Ok(port) = port.parse::<u16>() else {
                self.err(at, code::BAD_UPSTREAM, invalid("port must be 1-65535"));
                return None;
            };
            match self.resolve(host) {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(why) => {
                    self.err(
                        at,
                        code::UNRESOLVABLE_UPSTREAM,
                        format!("cannot resolve upstream {s:?}: {why}"),
                    );
                    return None;
                }
            }
        };
        if addr.port() == 0 {
            self.err(at, code::BAD_UPSTREAM, invalid("port must be 1-65535"));
            return None;
        }
        Some(addr)
    }

    fn resolve(&mut self, host: &str) -> Result<IpAddr, String> {
        if let Some(done) = self.resolved.get(host) {
            return done.clone();
        }
        if self.dns == Dns::Offline {
            return Err("host names are not looked up here".to_owned());
        }
        let result = match (host, 0u16).to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(|a| a.ip())
                .ok_or_else(|| "no addresses".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        self.resolved.insert(host.to_owned(), result.clone());
        result
    }

    fn tls(&mut self, table: &Table, at: usize) -> TlsDraft {
        let mut d = TlsDraft {
            listen: None,
            cert: None,
            key: None,
            sni_suffix: None,
        };
        let mut seen = [false; 4];
        for (key, item) in table {
            let key_at = key.start(at);
            let value_at = item.start(key_at);
            let name = key.name.as_str();
            if let Some(i) = TLS_KEYS.iter().position(|k| *k == name) {
                seen[i] = true;
            }
            match name {
                "listen" => match &item.value {
                    Value::String(s) => {
                        d.listen = self.socket_addr(s, value_at, name).map(|a| (a, value_at))
                    }
                    _ => self.err(
                        value_at,
                        code::WRONG_TYPE,
                        "\"listen\" must be a string \"IP:PORT\"",
                    ),
                },
                "cert" | "key" => {
                    let path = self.readable_file(item, value_at, name);
                    if name == "cert" {
                        d.cert = path;
                    } else {
                        d.key = path;
                    }
                }
                "sni_suffix" => {
                    d.sni_suffix = match &item.value {
                        Value::String(s) if !s.trim_start_matches('.').is_empty() => {
                            Some(s.trim_start_matches('.').to_owned())
                        }
                        Value::String(_) => {
                            self.err(
                                value_at,
                                code::EMPTY_VALUE,
                                "\"sni_suffix\" must not be empty",
                            );
                            None
                        }
                        _ => {
                            self.err(
                                value_at,
                                code::WRONG_TYPE,
                                "\"sni_suffix\" must be a string",
                            );
                            None
                        }
                    }
                }
                _ => self.err(
                    key_at,
                    code::UNKNOWN_KEY,
                    format!("unknown key {name:?} in [[tls]]"),
                ),
            }
        }
        for (i, key) in TLS_KEYS.iter().enumerate() {
            if !seen[i] {
                self.err(at, code::MISSING_KEY, format!("[[tls]] needs \"{key}\""));
            }
        }
        d
    }

    fn ws(&mut self, table: &Table, at: usize) -> WsDraft {
        let mut d = WsDraft {
            listen: None,
            path: None,
            tokens: None,
            ping_interval: None,
        };
        for (key, item) in table {
            let key_at = key.start(at);
            let value_at = item.start(key_at);
            let name = key.name.as_str();
            match name {
                "listen" => match &item.value {
                    Value::String(s) => {
                        d.listen = self.socket_addr(s, value_at, name).map(|a| (a, value_at))
                    }
                    _ => self.err(
                        value_at,
                        code::WRONG_TYPE,
                        "\"listen\" must be a string \"IP:PORT\"",
                    ),
                },
                "path" => match &item.value {
                    Value::String(s) => match crate::websocket::handshake::validate_template(s) {
                        Ok(()) => d.path = Some(s.clone()),
                        Err(e) => self.err(
                            value_at,
                            code::BAD_VALUE,
                            format!("invalid \"path\" {s:?}: {e}"),
                        ),
                    },
                    _ => self.err(
                        value_at,
                        code::WRONG_TYPE,
                        "\"path\" must be a string such as \"/ssh/{name}\"",
                    ),
                },
                "tokens" => {
                    d.tokens = match &item.value {
                        Value::String(s) if s.is_empty() => Some(None),
                        _ => self.token_file(item, value_at).map(Some),
                    }
                }
                "ping_interval" => {
                    if let Some(t) = self.duration(item, value_at, name) {
                        d.ping_interval = Some((!t.is_zero()).then_some(t));
                    }
                }
                _ => self.err(
                    key_at,
                    code::UNKNOWN_KEY,
                    format!("unknown key {name:?} in [[ws]]"),
                ),
            }
        }
        if d.listen.is_none() && !table.iter().any(|(k, _)| k.name == "listen") {
            self.err(at, code::MISSING_KEY, "[[ws]] needs \"listen\"");
        }
        d
    }

    /// `tokens`: a readable token file whose every line is `<mapping name> <token>`.
    fn token_file(&mut self, item: &Item, at: usize) -> Option<PathBuf> {
        let path = self.readable_file(item, at, "tokens")?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.err(
                    at,
                    code::UNREADABLE_PATH,
                    format!("cannot read tokens file {path:?}: {e}"),
                );
                return None;
            }
        };
        match crate::websocket::tokens::parse(&text) {
            Ok(_) => Some(path),
            Err(e) => {
                self.err(
                    at,
                    code::BAD_TOKENS_FILE,
                    format!("tokens file {path:?}: {e}"),
                );
                None
            }
        }
    }

    /// `cert`/`key`/`tokens`: a path, relative to the control file's directory, to a readable file.
    fn readable_file(&mut self, item: &Item, at: usize, name: &str) -> Option<PathBuf> {
        let given = self.non_empty_string(item, at, name)?;
        let path = self.base_dir.join(given);
        let why = match std::fs::metadata(&path) {
            Err(e) => e.to_string(),
            Ok(m) if m.is_dir() => "it is a directory".to_owned(),
            Ok(m) if !m.is_file() => "it is not a regular file".to_owned(),
            Ok(_) => match std::fs::File::open(&path) {
                Ok(_) => return Some(path),
                Err(e) => e.to_string(),
            },
        };
        self.err(
            at,
            code::UNREADABLE_PATH,
            format!("cannot read {name} file {path:?}: {why}"),
        );
        None
    }

    /// Ports must not overlap: sort by first port and sweep, remembering the range that
    /// reaches furthest. Each entry is reported at most once, at the later in the file.
    fn check_overlaps(&mut self, maps: &[MapDraft]) {
        let mut ranges: Vec<(u16, u16, usize)> = maps
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.ports.as_ref().map(|(r, _)| (*r.start(), *r.end(), i)))
            .collect();
        ranges.sort_unstable();
        let mut clash: Vec<Option<usize>> = vec![None; maps.len()];
        let mut furthest: Option<(u16, usize)> = None;
        for &(start, end, i) in &ranges {
            if let Some((reach, owner)) = furthest {
                if start <= reach {
                    let (later, earlier) = if i > owner { (i, owner) } else { (owner, i) };
                    clash[later].get_or_insert(earlier);
                }
            }
            if furthest.map_or(true, |(reach, _)| end > reach) {
                furthest = Some((end, i));
            }
        }
        for (later, earlier) in clash.iter().enumerate() {
            let Some(earlier) = *earlier else { continue };
            let (Some((mine, at)), Some((theirs, their_at))) =
                (&maps[later].ports, &maps[earlier].ports)
            else {
                continue;
            };
            let line = self.lines.line(*their_at);
            let (code, message) = if mine.start() == mine.end() {
                let message = format!("port {} is already mapped at line {line}", mine.start());
                (code::DUPLICATE_PORT, message)
            } else {
                let message = format!(
                    "ports {} overlap {} mapped at line {line}",
                    range_text(mine),
                    ports_text(theirs)
                );
                (code::OVERLAPPING_PORTS, message)
            };
            self.err(*at, code, message);
        }
    }

    /// No two `[[tls]]`/`[[ws]]` listeners on one address, and none on a port that a
    /// mapping opens on an address that would clash.
    fn check_listeners(
        &mut self,
        listeners: &[(&str, Option<(SocketAddr, usize)>)],
        maps: &[MapDraft],
        bind: &[IpAddr],
    ) {
        let mut seen: HashMap<SocketAddr, (&str, usize)> = HashMap::new();
        for &(kind, listen) in listeners {
            let Some((listen, at)) = listen else {
                continue;
            };
            if let Some(&(first, first_at)) = seen.get(&listen) {
                let line = self.lines.line(first_at);
                self.err(
                    at,
                    code::DUPLICATE_ADDRESS,
                    format!("address {listen} is already used by {first} at line {line}"),
                );
                continue;
            }
            seen.insert(listen, (kind, at));
            let clashes = listen.ip().is_unspecified()
                || bind.iter().any(|b| b.is_unspecified() || *b == listen.ip());
            if !clashes {
                continue;
            }
            let mapped = maps.iter().find_map(|m| {
                m.ports
                    .as_ref()
                    .filter(|(r, _)| r.contains(&listen.port()))
                    .map(|&(_, port_at)| port_at)
            });
            if let Some(port_at) = mapped {
                let line = self.lines.line(port_at);
                self.err(
                    at,
                    code::DUPLICATE_PORT,
                    format!(
                        "\"listen\" port {} is already mapped at line {line}",
                        listen.port()
                    ),
                );
            }
        }
    }

    fn bind(&mut self, item: &Item, at: usize) -> Option<Vec<IpAddr>> {
        let message = "\"bind\" must be an array of IP address strings";
        let Value::Array(entries) = &item.value else {
            self.err(at, code::WRONG_TYPE, message);
            return None;
        };
        let mut ips: Vec<IpAddr> = Vec::with_capacity(entries.len());
        let mut ok = true;
        for entry in entries {
            let entry_at = entry.start(at);
            let Value::String(s) = &entry.value else {
                self.err(entry_at, code::WRONG_TYPE, message);
                ok = false;
                continue;
            };
            match s.parse::<IpAddr>() {
                Ok(ip) if ips.contains(&ip) => {
                    self.err(
                        entry_at,
                        code::DUPLICATE_ADDRESS,
                        format!("duplicate address {s:?} in \"bind\""),
                    );
                    ok = false;
                }
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    self.err(
                        entry_at,
                        code::BAD_ADDRESS,
                        format!("invalid IP address {s:?} in \"bind\""),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(ips)
    }

    /// An array of CIDRs; a bare IP counts as a /32 or /128.
    fn cidrs(&mut self, item: &Item, at: usize, name: &str) -> Option<Vec<IpNet>> {
        let message = format!("\"{name}\" must be an array of CIDR strings");
        let Value::Array(entries) = &item.value else {
            self.err(at, code::WRONG_TYPE, message);
            return None;
        };
        let mut nets = Vec::with_capacity(entries.len());
        let mut ok = true;
        for entry in entries {
            let entry_at = entry.start(at);
            let Value::String(s) = &entry.value else {
                self.err(entry_at, code::WRONG_TYPE, message.clone());
                ok = false;
                continue;
            };
            match parse_cidr(s) {
                Ok(net) => nets.push(net),
                Err(why) => {
                    self.err(
                        entry_at,
                        code::BAD_CIDR,
                        format!("invalid CIDR {s:?} in \"{name}\": {why}"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(nets)
    }

    fn socket_addr(&mut self, s: &str, at: usize, name: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                self.err(
                    at,
                    code::BAD_ADDRESS,
                    format!("invalid address {s:?} for \"{name}\": port must be 1-65535"),
                );
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                let disable = if name == "metrics" {
                    ", or \"\" to disable"
                } else {
                    ""
                };
                self.err(
                    at, code::BAD_ADDRESS,
                    format!(
                        "invalid address {s:?} for \"{name}\": expected \"IP:PORT\" or \"[IPv6]:PORT\"{disable}"
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, item: &Item, at: usize, name: &str) -> Option<Duration> {
        let Value::String(s) = &item.value else {
            self.err(
                at,
                code::WRONG_TYPE,
                format!("\"{name}\" must be a duration string such as \"5s\""),
            );
            return None;
        };
        if s.trim() == "0" {
            return Some(Duration::ZERO);
        }
        match humantime::parse_duration(s) {
            Ok(d) if d > MAX_DURATION => {
                self.err(
                    at,
                    code::OUT_OF_RANGE,
                    format!("duration {s:?} for \"{name}\" is longer than 10 years"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.err(
                    at,
                    code::BAD_DURATION,
                    format!("invalid duration {s:?} for \"{name}\": {e}"),
                );
                None
            }
        }
    }

    /// `per_source_rate`: `""` (off) or `"BURST/PERIOD"`, BURST 1-1000000, PERIOD a
    /// duration greater than zero.
    fn source_rate(&mut self, item: &Item, at: usize) -> Option<Option<SourceRate>> {
        const FORM: &str = "\"per_source_rate\" must be \"BURST/PERIOD\" (such as \"30/10s\"), or \"\" for no limit";
        let Value::String(s) = &item.value else {
            self.err(at, code::WRONG_TYPE, FORM);
            return None;
        };
        if s.trim().is_empty() {
            return Some(None);
        }
        let Some((burst, period)) = s.split_once('/') else {
            self.err(at, code::BAD_VALUE, format!("{FORM}, got {s:?}"));
            return None;
        };
        let Ok(burst) = burst.trim().parse::<u64>() else {
            self.err(
                at,
                code::BAD_VALUE,
                format!("{FORM}: BURST {burst:?} is not a whole number"),
            );
            return None;
        };
        if !(1..=1_000_000).contains(&burst) {
            self.err(
                at,
                code::OUT_OF_RANGE,
                format!("BURST of \"per_source_rate\" must be between 1 and 1000000, got {burst}"),
            );
            return None;
        }
        let period = match humantime::parse_duration(period.trim()) {
            Ok(d) if d.is_zero() => {
                self.err(
                    at,
                    code::OUT_OF_RANGE,
                    "PERIOD of \"per_source_rate\" must be greater than 0s",
                );
                return None;
            }
            Ok(d) if d > MAX_DURATION => {
                self.err(
                    at,
                    code::OUT_OF_RANGE,
                    format!("PERIOD {period:?} of \"per_source_rate\" is longer than 10 years"),
                );
                return None;
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    at,
                    code::BAD_DURATION,
                    format!("invalid PERIOD {period:?} in \"per_source_rate\": {e}"),
                );
                return None;
            }
        };
        Some(Some(SourceRate {
            burst: burst as u32,
            period,
        }))
    }

    fn u32_at_least(&mut self, item: &Item, at: usize, name: &str, min: u32) -> Option<u32> {
        let Value::Integer(n) = item.value else {
            self.err(
                at,
                code::WRONG_TYPE,
                format!("\"{name}\" must be an integer"),
            );
            return None;
        };
        match u32::try_from(n).ok().filter(|&n| n >= min) {
            Some(n) => Some(n),
            None => {
                self.err(
                    at,
                    code::OUT_OF_RANGE,
                    format!("\"{name}\" must be between {min} and {}, got {n}", u32::MAX),
                );
                None
            }
        }
    }

    /// `source`: `"relay"` or `"client"`.
    fn source_key(&mut self, item: &Item, at: usize) -> Option<Source> {
        const FORMS: &str = "\"source\" must be \"relay\" or \"client\"";
        match &item.value {
            Value::String(s) if s == "relay" => Some(Source::Relay),
            Value::String(s) if s == "client" => Some(Source::Client),
            Value::String(s) => {
                self.err(at, code::BAD_VALUE, format!("{FORMS}, got {s:?}"));
                None
            }
            _ => {
                self.err(at, code::WRONG_TYPE, FORMS);
                None
            }
        }
    }

    /// `wake`: an argv, a non-empty program first; `{name}`, `{port}` and `{upstream}` are
    /// the only placeholders.
    fn wake(&mut self, item: &Item, at: usize) -> Option<Vec<String>> {
        const FORM: &str = "\"wake\" must be an array of strings, the program first";
        let Value::Array(items) = &item.value else {
            self.err(at, code::WRONG_TYPE, FORM);
            return None;
        };
        let mut argv = Vec::new();
        for it in items {
            let Value::String(s) = &it.value else {
                self.err(it.start(at), code::WRONG_TYPE, FORM);
                return None;
            };
            if let Some(bad) = unknown_placeholder(s) {
                self.err(
                    it.start(at),
                    code::BAD_VALUE,
                    format!("unknown placeholder {bad} in \"wake\": use {{name}}, {{port}} or {{upstream}}"),
                );
                return None;
            }
            argv.push(s.clone());
        }
        if argv.first().map_or(true, |p| p.is_empty()) {
            self.err(at, code::EMPTY_VALUE, FORM);
            return None;
        }
        Some(argv)
    }

    fn non_empty_string(&mut self, item: &Item, at: usize, name: &str) -> Option<String> {
        match &item.value {
            Value::String(s) if s.is_empty() => {
                self.err(
                    at,
                    code::EMPTY_VALUE,
                    format!("\"{name}\" must not be empty"),
                );
                None
            }
            Value::String(s) => Some(s.clone()),
            _ => {
                self.err(at, code::WRONG_TYPE, format!("\"{name}\" must be a string"));
                None
            }
        }
    }
}

/// The first `{...}` in a `wake` argument that is not `{name}`, `{port}` or `{upstream}`.
fn unknown_placeholder(s: &str) -> Option<&str> {
    let mut rest = s;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        let end = tail.find('}').map_or(tail.len(), |j| j + 1);
        let p = &tail[..end];
        if !matches!(p, "{name}" | "{port}" | "{upstream}") {
            return Some(p);
        }
        rest = &tail[end..];
    }
    None
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    if let Some((addr, _)) = s.split_once('/') {
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            return Err(format!("prefix length must be 0-{max}"));
        }
    }
    Err("expected ADDRESS/PREFIX or an IP address".to_owned())
}

/// `A-B`, or `A` for a single port.
fn range_text(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}-{}", r.start(), r.end())
    }
}

/// `port A` or `ports A-B`.
fn ports_text(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        format!("port {}", r.start())
    } else {
        format!("ports {}-{}", r.start(), r.end())
    }
}

/// A table name as written in a header: bare when it can be, quoted otherwise.
fn table_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}
