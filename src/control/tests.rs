//! Control-file tests: valid files into the exact [`Config`], and every kind of problem
//! with its exact `FILE:LINE:COL: message`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;

fn ok(text: &str) -> Config {
    parse_str("t.toml", text).unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn errors(text: &str) -> String {
    match parse_str("t.toml", text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(e) => e.render(),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn all_nets() -> Vec<IpNet> {
    vec![net("0.0.0.0/0"), net("::/0")]
}

/// A directory with readable `tls.crt` and `tls.key`.
fn tls_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::write(dir.path().join("tls.key"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
    std::fs::write(dir.path().join("ws.tokens"), "C.123456 s3cret\n").unwrap();
    dir
}

fn control_file(dir: &Path) -> String {
    dir.join("portrelay.toml").display().to_string()
}

#[test]
fn full_example_with_every_key() {
    let dir = tls_dir();
    let abs_key = dir.path().join("tls.key");
    let text = format!(
        r#"
[relay]
bind = ["10.0.0.1", "fd00::1"]
trusted_proxies = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
metrics = "[::1]:9100"
connect_timeout = "250ms"
proxy_header_timeout = "2s"
idle_timeout = "12h"
tcp_keepalive = "30s"
shutdown_grace = "1m"
max_connections = 5000
removed_mapping = "keep"
watch = false
max_pipes = 0
max_pending_admissions = 64

[[map]]
port = 20544
to = "172.17.0.5:22"
name = "C.123456"
allow = ["10.0.0.0/8", "fd00::/8", "192.0.2.9"]
max_connections = 64

[[map]]
port = "40000-40009"     # a range
to = "172.17.0.6:8000"

[[map]]
port = "30000"
to = "[fd00::5]:2222"
name = "v6"

[[tls]]
listen = "0.0.0.0:443"
cert = "tls.crt"
key = "{}"
sni_suffix = ".ssh.example.net"

[[ws]]
listen = "0.0.0.0:8080"
path = "/user/{{name}}/sshd/"
tokens = "ws.tokens"
ping_interval = "0s"

[[ws]]
listen = "127.0.0.1:8081"
"#,
        abs_key.display()
    );
    let config = parse_str(&control_file(dir.path()), &text).unwrap_or_else(|e| panic!("{e}"));
    let expected = Config {
        relay: RelaySettings {
            bind: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            trusted_proxies: vec![
                net("192.0.2.0/24"),
                net("2001:db8::/32"),
                net("198.51.100.7/32"),
            ],
            metrics: Some(sock("[::1]:9100")),
            connect_timeout: Duration::from_millis(250),
            proxy_header_timeout: Duration::from_secs(2),
            idle_timeout: Some(Duration::from_secs(12 * 3600)),
            tcp_keepalive: Some(Duration::from_secs(30)),
            shutdown_grace: Duration::from_secs(60),
            max_connections: 5000,
            removed_mapping: RemovedMapping::Keep,
            watch: false,
            max_pipes: 0,
            pipe_size: 1 << 20,
            max_pending_admissions: 64,
            hold: Duration::ZERO,
            admin_socket: None,
            per_source_max_connections: 0,
            per_source_rate: None,
            per_source_exempt: vec![],
        },
        mappings: vec![
            Mapping {
                ports: 20544..=20544,
                upstream: UpstreamAddr(sock("172.17.0.5:22")),
                name: "C.123456".into(),
                allow: vec![net("10.0.0.0/8"), net("fd00::/8"), net("192.0.2.9/32")],
                max_connections: Some(64),
                hold: None,
                wake: vec![],
                per_source_max_connections: None,
                source: Source::Relay,
            },
            Mapping {
                ports: 40000..=40009,
                upstream: UpstreamAddr(sock("172.17.0.6:8000")),
                name: "40000".into(),
                allow: all_nets(),
                max_connections: None,
                hold: None,
                wake: vec![],
                per_source_max_connections: None,
                source: Source::Relay,
            },
            Mapping {
                ports: 30000..=30000,
                upstream: UpstreamAddr(sock("[fd00::5]:2222")),
                name: "v6".into(),
                allow: all_nets(),
                max_connections: None,
                hold: None,
                wake: vec![],
                per_source_max_connections: None,
                source: Source::Relay,
            },
        ],
        tls: vec![TlsEntry {
            listen: sock("0.0.0.0:443"),
            cert: dir.path().join("tls.crt"),
            key: abs_key,
            sni_suffix: "ssh.example.net".into(),
        }],
        ws: vec![
            WsEntry {
                listen: sock("0.0.0.0:8080"),
                path: "/user/{name}/sshd/".into(),
                tokens: Some(dir.path().join("ws.tokens")),
                ping_interval: None,
            },
            WsEntry {
                listen: sock("127.0.0.1:8081"),
                path: "/ssh/{name}".into(),
                tokens: None,
                ping_interval: Some(Duration::from_secs(30)),
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn defaults_when_relay_is_absent() {
    let config = ok("[[map]]\nport = 20544\nto = \"172.17.0.5:22\"\n");
    let relay = RelaySettings {
        bind: vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ],
        trusted_proxies: vec![],
        metrics: Some(sock("127.0.0.1:9477")),
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
        per_source_exempt: vec![],
    };
    assert_eq!(config.relay, relay);
    assert_eq!(RelaySettings::default(), relay);
    assert_eq!(
        config.mappings,
        vec![Mapping {
            ports: 20544..=20544,
            upstream: UpstreamAddr(sock("172.17.0.5:22")),
            name: "20544".into(),
            allow: all_nets(),
            max_connections: None,
            hold: None,
            wake: vec![],
            per_source_max_connections: None,
            source: Source::Relay,
        }]
    );
    assert!(config.tls.is_empty());
    // `[relay]` alone: defaults, nothing mapped.
    let empty = ok("[relay]\n");
    assert_eq!(empty.relay, relay);
    assert!(empty.mappings.is_empty());
}

#[test]
fn hold_and_wake() {
    let config = ok(r#"
[relay]
hold = "10s"

[[map]]
port = 20544
to = "172.17.0.5:22"
name = "C.1"
hold = "20s"
wake = ["/usr/local/bin/start-instance", "{name}", "--port={port}", "{upstream}"]

[[map]]
port = 20545
to = "172.17.0.6:22"
"#);
    assert_eq!(config.relay.hold, Duration::from_secs(10));
    let [booting, plain] = &config.mappings[..] else {
        panic!("two mappings: {:?}", config.mappings)
    };
    assert_eq!(booting.hold, Some(Duration::from_secs(20)));
    assert_eq!(
        booting.wake,
        [
            "/usr/local/bin/start-instance",
            "{name}",
            "--port={port}",
            "{upstream}"
        ]
    );
    assert_eq!(plain.hold, None);
    assert!(plain.wake.is_empty());
    // "0s" on a mapping turns a relay-wide hold off for it.
    let off =
        ok("[relay]\nhold = \"5s\"\n[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nhold = \"0s\"\n");
    assert_eq!(off.mappings[0].hold, Some(Duration::ZERO));
}

#[test]
fn zero_durations_and_empty_metrics() {
    let config = ok("[relay]\nmetrics = \"\"\nidle_timeout = \"0s\"\ntcp_keepalive = \"0\"\nshutdown_grace = \"0s\"\n");
    assert_eq!(config.relay.metrics, None);
    assert_eq!(config.relay.idle_timeout, None);
    assert_eq!(config.relay.tcp_keepalive, None);
    assert_eq!(config.relay.shutdown_grace, Duration::ZERO);
    // Ten years is the longest a duration may be.
    let long = ok("[relay]\nidle_timeout = \"10y\"\n");
    assert_eq!(
        long.relay.idle_timeout,
        Some(Duration::from_secs(315_576_000))
    );
}

#[test]
fn range_mapping_and_upstream_for() {
    let config = ok(
        "[[map]]\nport = \"40000-40009\"\nto = \"172.17.0.5:8000\"\nname = \"C.1\"\n\n[[map]]\nport = \" 50000 - 50000 \"\nto = \"172.17.0.6:22\"\n",
    );
    let m = &config.mappings[0];
    assert_eq!(m.ports, 40000..=40009);
    let cases = [
        (40000, "172.17.0.5:8000"),
        (40001, "172.17.0.5:8001"),
        (40009, "172.17.0.5:8009"),
    ];
    for (port, upstream) in cases {
        assert_eq!(
            m.upstream_for(port),
            UpstreamAddr(sock(upstream)),
            "port {port}"
        );
    }
    assert_eq!(config.mappings[1].ports, 50000..=50000);
    // A range may end exactly at 65535 upstream.
    let edge = ok("[[map]]\nport = \"40000-40005\"\nto = \"10.0.0.5:65530\"\n");
    assert_eq!(edge.mappings[0].upstream_for(40005).0.port(), 65535);
}

#[test]
fn ipv6_and_host_name_upstreams() {
    let config = ok(
        "[[map]]\nport = \"10-11\"\nto = \"[fd00::5]:22\"\n[[map]]\nport = 2\nto = \"localhost:2222\"\n",
    );
    let v6 = &config.mappings[0];
    assert_eq!(v6.upstream, UpstreamAddr(sock("[fd00::5]:22")));
    assert_eq!(v6.upstream_for(11), UpstreamAddr(sock("[fd00::5]:23")));
    let local = config.mappings[1].upstream.0;
    assert!(local.ip().is_loopback(), "{local}");
    assert_eq!(local.port(), 2222);
}

#[test]
fn inline_tables_and_bare_ips_in_allow() {
    let config =
        ok("map = [{ port = 7, to = \"10.0.0.7:22\", allow = [\"10.1.2.3\", \"fd00::7\"] }]\n");
    assert_eq!(
        config.mappings[0].allow,
        vec![net("10.1.2.3/32"), net("fd00::7/128")]
    );
}

#[test]
fn duplicate_names_are_allowed() {
    let config = ok(
        "[[map]]\nport = 1\nto = \"10.0.0.1:22\"\nname = \"a\"\n[[map]]\nport = 2\nto = \"10.0.0.2:22\"\nname = \"a\"\n",
    );
    assert_eq!(config.mappings.len(), 2);
}

/// (what, file, the exact rendering of its errors)
const ERROR_CASES: &[(&str, &str, &str)] = &[
    (
        "toml syntax",
        "[relay]\nbind = [\"::\"\nwatch = true\n",
        "t.toml:3:1: TOML syntax error: missing comma between array elements, expected `,`",
    ),
    (
        "toml duplicate key",
        "[relay]\nwatch = true\nwatch = false\n",
        "t.toml:3:1: TOML syntax error: duplicate key",
    ),
    (
        "unknown key in relay",
        "[relay]\nbindd = [\"::\"]\n",
        r#"t.toml:2:1: unknown key "bindd" in [relay]"#,
    ),
    (
        "unknown key in map",
        "[[map]]\nport = 20544\nto = \"10.0.0.5:22\"\nfoo = 1\n",
        r#"t.toml:4:1: unknown key "foo" in [[map]]"#,
    ),
    (
        "unknown table",
        "[relays]\nbind = []\n",
        "t.toml:1:2: unknown table [relays]",
    ),
    (
        "unknown array of tables",
        "[[maps]]\nport = 1\n",
        "t.toml:1:3: unknown table [[maps]]",
    ),
    (
        "unknown dotted table",
        "[relay.extra]\nx = 1\n",
        r#"t.toml:1:8: unknown key "extra" in [relay]"#,
    ),
    (
        "unknown top-level key",
        "bind = [\"::\"]\n",
        r#"t.toml:1:1: unknown key "bind" at top level (it belongs in [relay])"#,
    ),
    (
        "relay not a table",
        "relay = 5\n",
        r#"t.toml:1:9: "relay" must be a table, written [relay]"#,
    ),
    (
        "map not an array of tables",
        "[map]\nport = 1\nto = \"10.0.0.5:22\"\n",
        r#"t.toml:1:1: "map" must be an array of tables, written [[map]]"#,
    ),
    (
        "port wrong type",
        "[[map]]\nport = 22.5\nto = \"10.0.0.5:22\"\n",
        r#"t.toml:2:8: "port" must be an integer or a "FIRST-LAST" string"#,
    ),
    (
        "port 0",
        "[[map]]\nport = 0\nto = \"10.0.0.5:22\"\n",
        "t.toml:2:8: port 0 is out of range 1-65535",
    ),
    (
        "port above 65535",
        "[[map]]\nport = 65536\nto = \"10.0.0.5:22\"\n",
        "t.toml:2:8: port 65536 is out of range 1-65535",
    ),
    (
        "range end above 65535",
        "[[map]]\nport = \"65530-70000\"\nto = \"10.0.0.5:22\"\n",
        "t.toml:2:8: port 70000 is out of range 1-65535",
    ),
    (
        "range first > last",
        "[[map]]\nport = \"40009-40000\"\nto = \"10.0.0.5:22\"\n",
        r#"t.toml:2:8: invalid port range "40009-40000": 40009 is greater than 40000"#,
    ),
    (
        "range malformed",
        "[[map]]\nport = \"40000..40009\"\nto = \"10.0.0.5:22\"\n",
        r#"t.toml:2:8: invalid port range "40000..40009": expected "FIRST-LAST" such as "40000-40009""#,
    ),
    (
        "bad duration",
        "[relay]\nconnect_timeout = \"5 parsecs\"\n",
        r#"t.toml:2:19: invalid duration "5 parsecs" for "connect_timeout": unknown time unit "parsecs", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)"#,
    ),
    (
        "duration not a string",
        "[relay]\nidle_timeout = 5\n",
        r#"t.toml:2:16: "idle_timeout" must be a duration string such as "5s""#,
    ),
    (
        "zero connect timeout",
        "[relay]\nconnect_timeout = \"0s\"\n",
        r#"t.toml:2:19: "connect_timeout" must be greater than 0s"#,
    ),
    (
        "sub-second keepalive",
        "[relay]\ntcp_keepalive = \"500ms\"\n",
        r#"t.toml:2:17: "tcp_keepalive" must be 0s (off) or at least 1s"#,
    ),
    (
        "bad CIDR prefix",
        "[relay]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
        r#"t.toml:2:20: invalid CIDR "10.0.0.0/33" in "trusted_proxies": prefix length must be 0-32"#,
    ),
    (
        "bad CIDR",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nallow = [\"::/0\", \"bogus\"]\n",
        r#"t.toml:4:18: invalid CIDR "bogus" in "allow": expected ADDRESS/PREFIX or an IP address"#,
    ),
    (
        "allow not an array",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nallow = \"::/0\"\n",
        r#"t.toml:4:9: "allow" must be an array of CIDR strings"#,
    ),
    (
        "bad IP in bind",
        "[relay]\nbind = [\"0.0.0.0\", \"1.2.3\"]\n",
        r#"t.toml:2:20: invalid IP address "1.2.3" in "bind""#,
    ),
    (
        "duplicate IP in bind",
        "[relay]\nbind = [\"::\", \"::\"]\n",
        r#"t.toml:2:15: duplicate address "::" in "bind""#,
    ),
    (
        "bad metrics address",
        "[relay]\nmetrics = \"localhost:9477\"\n",
        r#"t.toml:2:11: invalid address "localhost:9477" for "metrics": expected "IP:PORT" or "[IPv6]:PORT", or "" to disable"#,
    ),
    (
        "max_connections 0",
        "[relay]\nmax_connections = 0\n",
        r#"t.toml:2:19: "max_connections" must be between 1 and 4294967295, got 0"#,
    ),
    (
        "map max_connections 0",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nmax_connections = 0\n",
        r#"t.toml:4:19: "max_connections" must be between 1 and 4294967295, got 0"#,
    ),
    (
        "max_pipes negative",
        "[relay]\nmax_pipes = -1\n",
        r#"t.toml:2:13: "max_pipes" must be between 0 and 4294967295, got -1"#,
    ),
    (
        "pipe_size too big",
        "[relay]\npipe_size = 2097152\n",
        r#"t.toml:2:13: "pipe_size" must be at most 1048576 (the kernel's default pipe-max-size), got 2097152"#,
    ),
    (
        "max_connections wrong type",
        "[relay]\nmax_connections = \"many\"\n",
        r#"t.toml:2:19: "max_connections" must be an integer"#,
    ),
    (
        "removed_mapping",
        "[relay]\nremoved_mapping = \"drop\"\n",
        r#"t.toml:2:19: "removed_mapping" must be "close" or "keep", got "drop""#,
    ),
    (
        "admin_socket relative",
        "[relay]\nadmin_socket = \"run/admin.sock\"\n",
        r#"t.toml:2:16: "admin_socket" must be an absolute path (or "" for none), got "run/admin.sock""#,
    ),
    (
        "admin_socket too long for a unix socket address",
        "[relay]\nadmin_socket = \"/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
        r#"t.toml:2:16: "admin_socket" must name a file, in at most 107 bytes, got "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa""#,
    ),
    (
        "admin_socket wrong type",
        "[relay]\nadmin_socket = true\n",
        r#"t.toml:2:16: "admin_socket" must be a string: an absolute path, or "" for none"#,
    ),
    (
        "source not relay or client",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nsource = \"proxy\"\n",
        r#"t.toml:4:10: "source" must be "relay" or "client", got "proxy""#,
    ),
    (
        "source wrong type",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nsource = true\n",
        r#"t.toml:4:10: "source" must be "relay" or "client""#,
    ),
    (
        "watch wrong type (a datetime)",
        "[relay]\nwatch = 1979-05-27\n",
        r#"t.toml:2:9: "watch" must be true or false"#,
    ),
    (
        "duplicate port",
        "[[map]]\nport = 20544\nto = \"10.0.0.5:22\"\n\n[[map]]\nport = 20544\nto = \"10.0.0.6:22\"\n",
        "t.toml:6:8: port 20544 is already mapped at line 2",
    ),
    (
        "overlapping ranges",
        "[[map]]\nport = \"40000-40009\"\nto = \"10.0.0.5:22\"\n\n[[map]]\nport = \"40005-40010\"\nto = \"10.0.0.6:22\"\n",
        "t.toml:6:8: ports 40005-40010 overlap ports 40000-40009 mapped at line 2",
    ),
    (
        "overlapping ranges, later one starts first",
        "[[map]]\nport = \"40005-40010\"\nto = \"10.0.0.5:22\"\n\n[[map]]\nport = \"40000-40009\"\nto = \"10.0.0.6:22\"\n",
        "t.toml:6:8: ports 40000-40009 overlap ports 40005-40010 mapped at line 2",
    ),
    (
        "port inside a range",
        "[[map]]\nport = \"40000-40009\"\nto = \"10.0.0.5:22\"\n[[map]]\nport = 40009\nto = \"10.0.0.6:22\"\n",
        "t.toml:5:8: port 40009 is already mapped at line 2",
    ),
    (
        "range over a port",
        "[[map]]\nport = 40009\nto = \"10.0.0.5:22\"\n[[map]]\nport = \"40000-40009\"\nto = \"10.0.0.6:22\"\n",
        "t.toml:5:8: ports 40000-40009 overlap port 40009 mapped at line 2",
    ),
    (
        "upstream range past 65535",
        "[[map]]\nport = \"40000-40009\"\nto = \"10.0.0.5:65530\"\n",
        "t.toml:3:6: upstream ports 65530-65539 would pass 65535",
    ),
    (
        "missing to",
        "[[map]]\nport = 20544\n",
        r#"t.toml:1:1: [[map]] needs "to""#,
    ),
    (
        "missing port and to, indented header",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\n\n  [[map]]\n  name = \"x\"\n",
        "t.toml:5:3: [[map]] needs \"port\"\nt.toml:5:3: [[map]] needs \"to\"",
    ),
    (
        "upstream without port",
        "[[map]]\nport = 1\nto = \"10.0.0.5\"\n",
        r#"t.toml:3:6: invalid upstream "10.0.0.5": expected "IP:PORT", "[IPv6]:PORT" or "HOST:PORT""#,
    ),
    (
        "upstream IPv6 without brackets",
        "[[map]]\nport = 1\nto = \"fd00::5:22\"\n",
        r#"t.toml:3:6: invalid upstream "fd00::5:22": write an IPv6 address in brackets, as "[fd00::5]:22""#,
    ),
    (
        "upstream port 0",
        "[[map]]\nport = 1\nto = \"10.0.0.5:0\"\n",
        r#"t.toml:3:6: invalid upstream "10.0.0.5:0": port must be 1-65535"#,
    ),
    (
        "upstream port too large",
        "[[map]]\nport = 1\nto = \"example.com:70000\"\n",
        r#"t.toml:3:6: invalid upstream "example.com:70000": port must be 1-65535"#,
    ),
    (
        "upstream unspecified",
        "[[map]]\nport = 1\nto = \"0.0.0.0:22\"\n",
        r#"t.toml:3:6: invalid upstream "0.0.0.0:22": the unspecified address is not an upstream"#,
    ),
    (
        "upstream wrong type",
        "[[map]]\nport = 1\nto = 22\n",
        r#"t.toml:3:6: "to" must be a string "IP:PORT", "[IPv6]:PORT" or "HOST:PORT""#,
    ),
    ("zero-byte file", "", "t.toml:1:1: control file is empty"),
    (
        "ws without listen",
        "[[ws]]\npath = \"/ssh/{name}\"\n",
        r#"t.toml:1:1: [[ws]] needs "listen""#,
    ),
    (
        "ws path without {name}",
        "[[ws]]\nlisten = \"127.0.0.1:8080\"\npath = \"/ssh/\"\n",
        r#"t.toml:3:8: invalid "path" "/ssh/": path template "/ssh/" must hold {name} exactly once, found 0"#,
    ),
    (
        "ws unknown key",
        "[[ws]]\nlisten = \"127.0.0.1:8080\"\ntoken = \"x\"\n",
        r#"t.toml:3:1: unknown key "token" in [[ws]]"#,
    ),
    (
        "ws and tls on one address",
        "[[ws]]\nlisten = \"127.0.0.1:8080\"\n[[ws]]\nlisten = \"127.0.0.1:8080\"\n",
        "t.toml:4:10: address 127.0.0.1:8080 is already used by [[ws]] at line 2",
    ),
    (
        "ws tokens file missing",
        "[[ws]]\nlisten = \"127.0.0.1:8080\"\ntokens = \"/nonexistent/tokens\"\n",
        r#"t.toml:3:10: cannot read tokens file "/nonexistent/tokens": No such file or directory (os error 2)"#,
    ),
    (
        "whitespace-only file",
        "\n  \t\n\n",
        "t.toml:1:1: control file is empty",
    ),
    (
        "duration past 10 years",
        "[relay]\nidle_timeout = \"500000000000y\"\n",
        r#"t.toml:2:16: duration "500000000000y" for "idle_timeout" is longer than 10 years"#,
    ),
    (
        "duration just past 10 years",
        "[relay]\nconnect_timeout = \"11y\"\n",
        r#"t.toml:2:19: duration "11y" for "connect_timeout" is longer than 10 years"#,
    ),
    (
        "empty name",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nname = \"\"\n",
        r#"t.toml:4:8: "name" must not be empty"#,
    ),
    (
        "hold not a duration",
        "[relay]\nhold = 20\n",
        r#"t.toml:2:8: "hold" must be a duration string such as "5s""#,
    ),
    (
        "bad map hold",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nhold = \"soon\"\n",
        r#"t.toml:4:8: invalid duration "soon" for "hold": expected number at 0"#,
    ),
    (
        "wake not an array",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nwake = \"/bin/start {name}\"\n",
        r#"t.toml:4:8: "wake" must be an array of strings, the program first"#,
    ),
    (
        "empty wake",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nwake = []\n",
        r#"t.toml:4:8: "wake" must be an array of strings, the program first"#,
    ),
    (
        "wake with an empty program",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nwake = [\"\", \"x\"]\n",
        r#"t.toml:4:8: "wake" must be an array of strings, the program first"#,
    ),
    (
        "wake argument not a string",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nwake = [\"/bin/start\", 5]\n",
        r#"t.toml:4:23: "wake" must be an array of strings, the program first"#,
    ),
    (
        "wake unknown placeholder",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nwake = [\"/bin/start\", \"--id={id}\"]\n",
        r#"t.toml:4:23: unknown placeholder {id} in "wake": use {name}, {port} or {upstream}"#,
    ),
    (
        "per_source_rate without a slash",
        "[relay]\nper_source_rate = \"30\"\n",
        r#"t.toml:2:19: "per_source_rate" must be "BURST/PERIOD" (such as "30/10s"), or "" for no limit, got "30""#,
    ),
    (
        "per_source_rate burst not a number",
        "[relay]\nper_source_rate = \"many/10s\"\n",
        r#"t.toml:2:19: "per_source_rate" must be "BURST/PERIOD" (such as "30/10s"), or "" for no limit: BURST "many" is not a whole number"#,
    ),
    (
        "per_source_rate zero burst",
        "[relay]\nper_source_rate = \"0/10s\"\n",
        r#"t.toml:2:19: BURST of "per_source_rate" must be between 1 and 1000000, got 0"#,
    ),
    (
        "per_source_rate zero period",
        "[relay]\nper_source_rate = \"30/0s\"\n",
        r#"t.toml:2:19: PERIOD of "per_source_rate" must be greater than 0s"#,
    ),
    (
        "per_source_rate bad period",
        "[relay]\nper_source_rate = \"30/soon\"\n",
        r#"t.toml:2:19: invalid PERIOD "soon" in "per_source_rate": expected number at 0"#,
    ),
    (
        "per_source_rate period past 10 years",
        "[relay]\nper_source_rate = \"30/11y\"\n",
        r#"t.toml:2:19: PERIOD "11y" of "per_source_rate" is longer than 10 years"#,
    ),
    (
        "per_source_rate not a string",
        "[relay]\nper_source_rate = 30\n",
        r#"t.toml:2:19: "per_source_rate" must be "BURST/PERIOD" (such as "30/10s"), or "" for no limit"#,
    ),
    (
        "per_source_max_connections negative",
        "[relay]\nper_source_max_connections = -1\n",
        r#"t.toml:2:30: "per_source_max_connections" must be between 0 and 4294967295, got -1"#,
    ),
    (
        "map per_source_max_connections not a number",
        "[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nper_source_max_connections = \"8\"\n",
        r#"t.toml:4:30: "per_source_max_connections" must be an integer"#,
    ),
    (
        "per_source_exempt bad CIDR",
        "[relay]\nper_source_exempt = [\"10.0.0.0/8\", \"10.1.0.0/99\"]\n",
        r#"t.toml:2:36: invalid CIDR "10.1.0.0/99" in "per_source_exempt": prefix length must be 0-32"#,
    ),
];

#[test]
fn each_error_kind_exact_message() {
    let mut failures = Vec::new();
    for (what, text, expected) in ERROR_CASES {
        let got = errors(text);
        if got != *expected {
            failures.push(format!(
                "{what}:\n  expected: {expected}\n  got:      {got}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The code of each [`ERROR_CASES`] entry's errors, by the entry's name.
const ERROR_CODES: &[(&str, &[&str])] = &[
    ("toml syntax", &[code::SYNTAX]),
    ("toml duplicate key", &[code::SYNTAX]),
    ("unknown key in relay", &[code::UNKNOWN_KEY]),
    ("unknown key in map", &[code::UNKNOWN_KEY]),
    ("unknown table", &[code::UNKNOWN_TABLE]),
    ("unknown array of tables", &[code::UNKNOWN_TABLE]),
    ("unknown dotted table", &[code::UNKNOWN_KEY]),
    ("unknown top-level key", &[code::UNKNOWN_KEY]),
    ("relay not a table", &[code::WRONG_TYPE]),
    ("map not an array of tables", &[code::WRONG_TYPE]),
    ("port wrong type", &[code::WRONG_TYPE]),
    ("port 0", &[code::BAD_PORT]),
    ("port above 65535", &[code::BAD_PORT]),
    ("range end above 65535", &[code::BAD_PORT]),
    ("range first > last", &[code::BAD_PORT]),
    ("range malformed", &[code::BAD_PORT]),
    ("bad duration", &[code::BAD_DURATION]),
    ("duration not a string", &[code::WRONG_TYPE]),
    ("zero connect timeout", &[code::OUT_OF_RANGE]),
    ("sub-second keepalive", &[code::OUT_OF_RANGE]),
    ("bad CIDR prefix", &[code::BAD_CIDR]),
    ("bad CIDR", &[code::BAD_CIDR]),
    ("allow not an array", &[code::WRONG_TYPE]),
    ("bad IP in bind", &[code::BAD_ADDRESS]),
    ("duplicate IP in bind", &[code::DUPLICATE_ADDRESS]),
    ("bad metrics address", &[code::BAD_ADDRESS]),
    ("max_connections 0", &[code::OUT_OF_RANGE]),
    ("map max_connections 0", &[code::OUT_OF_RANGE]),
    ("max_pipes negative", &[code::OUT_OF_RANGE]),
    ("pipe_size too big", &[code::OUT_OF_RANGE]),
    ("max_connections wrong type", &[code::WRONG_TYPE]),
    ("removed_mapping", &[code::BAD_VALUE]),
    ("admin_socket relative", &[code::BAD_VALUE]),
    (
        "admin_socket too long for a unix socket address",
        &[code::BAD_VALUE],
    ),
    ("admin_socket wrong type", &[code::WRONG_TYPE]),
    ("source not relay or client", &[code::BAD_VALUE]),
    ("source wrong type", &[code::WRONG_TYPE]),
    ("watch wrong type (a datetime)", &[code::WRONG_TYPE]),
    ("duplicate port", &[code::DUPLICATE_PORT]),
    ("overlapping ranges", &[code::OVERLAPPING_PORTS]),
    (
        "overlapping ranges, later one starts first",
        &[code::OVERLAPPING_PORTS],
    ),
    ("port inside a range", &[code::DUPLICATE_PORT]),
    ("range over a port", &[code::OVERLAPPING_PORTS]),
    ("upstream range past 65535", &[code::UPSTREAM_PORT_OVERFLOW]),
    ("missing to", &[code::MISSING_KEY]),
    (
        "missing port and to, indented header",
        &[code::MISSING_KEY, code::MISSING_KEY],
    ),
    ("upstream without port", &[code::BAD_UPSTREAM]),
    ("upstream IPv6 without brackets", &[code::BAD_UPSTREAM]),
    ("upstream port 0", &[code::BAD_UPSTREAM]),
    ("upstream port too large", &[code::BAD_UPSTREAM]),
    ("upstream unspecified", &[code::BAD_UPSTREAM]),
    ("upstream wrong type", &[code::WRONG_TYPE]),
    ("zero-byte file", &[code::EMPTY_FILE]),
    ("whitespace-only file", &[code::EMPTY_FILE]),
    ("duration past 10 years", &[code::OUT_OF_RANGE]),
    ("duration just past 10 years", &[code::OUT_OF_RANGE]),
    ("empty name", &[code::EMPTY_VALUE]),
    ("ws without listen", &[code::MISSING_KEY]),
    ("ws path without {name}", &[code::BAD_VALUE]),
    ("ws unknown key", &[code::UNKNOWN_KEY]),
    ("ws and tls on one address", &[code::DUPLICATE_ADDRESS]),
    ("ws tokens file missing", &[code::UNREADABLE_PATH]),
    ("hold not a duration", &[code::WRONG_TYPE]),
    ("bad map hold", &[code::BAD_DURATION]),
    ("wake not an array", &[code::WRONG_TYPE]),
    ("empty wake", &[code::EMPTY_VALUE]),
    ("wake with an empty program", &[code::EMPTY_VALUE]),
    ("wake argument not a string", &[code::WRONG_TYPE]),
    ("wake unknown placeholder", &[code::BAD_VALUE]),
    ("per_source_rate without a slash", &[code::BAD_VALUE]),
    ("per_source_rate burst not a number", &[code::BAD_VALUE]),
    ("per_source_rate zero burst", &[code::OUT_OF_RANGE]),
    ("per_source_rate zero period", &[code::OUT_OF_RANGE]),
    ("per_source_rate bad period", &[code::BAD_DURATION]),
    (
        "per_source_rate period past 10 years",
        &[code::OUT_OF_RANGE],
    ),
    ("per_source_rate not a string", &[code::WRONG_TYPE]),
    ("per_source_max_connections negative", &[code::OUT_OF_RANGE]),
    (
        "map per_source_max_connections not a number",
        &[code::WRONG_TYPE],
    ),
    ("per_source_exempt bad CIDR", &[code::BAD_CIDR]),
];

fn codes(file: &str, text: &str) -> Vec<&'static str> {
    match parse_str(file, text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(e) => e.errors.iter().map(|e| e.code).collect(),
    }
}

#[test]
fn each_error_kind_has_its_code() {
    let mut failures = Vec::new();
    for (what, text, _) in ERROR_CASES {
        let Some((_, expected)) = ERROR_CODES.iter().find(|(name, _)| name == what) else {
            failures.push(format!("{what}: no entry in ERROR_CODES"));
            continue;
        };
        let got = codes("t.toml", text);
        if got != *expected {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert_eq!(
        ERROR_CODES.len(),
        ERROR_CASES.len(),
        "an ERROR_CODES entry per case"
    );

    // The kinds that need a file system or DNS.
    assert_eq!(
        codes("t.toml", "[[map]]\nport = 1\nto = \"nosuch.invalid:22\"\n"),
        [code::UNRESOLVABLE_UPSTREAM]
    );
    let dir = tls_dir();
    let tls = "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"missing.crt\"\nkey = \"\"\nsni_suffix = \"x\"\n[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"x\"\n";
    assert_eq!(
        codes(&control_file(dir.path()), tls),
        [
            code::UNREADABLE_PATH,
            code::EMPTY_VALUE,
            code::DUPLICATE_ADDRESS
        ]
    );
    let tls = "[[map]]\nport = 443\nto = \"10.0.0.5:22\"\n[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"x\"\n";
    assert_eq!(
        codes(&control_file(dir.path()), tls),
        [code::DUPLICATE_PORT]
    );
    std::fs::write(dir.path().join("bad.tokens"), "C.123456\n").unwrap();
    let ws = "[[ws]]\nlisten = \"127.0.0.1:8080\"\ntokens = \"bad.tokens\"\n";
    assert_eq!(
        codes(&control_file(dir.path()), ws),
        [code::BAD_TOKENS_FILE]
    );
    let missing = dir.path().join("nope.toml");
    let err = load(&missing).unwrap_err();
    assert_eq!(err.errors[0].code, code::UNREADABLE_FILE);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Every code is tested above, and named in code::ALL.
    let tested: Vec<&str> = ERROR_CODES
        .iter()
        .flat_map(|(_, codes)| codes.iter().copied())
        .chain([
            code::UNRESOLVABLE_UPSTREAM,
            code::UNREADABLE_PATH,
            code::DUPLICATE_ADDRESS,
            code::UNREADABLE_FILE,
            code::BAD_TOKENS_FILE,
        ])
        .collect();
    let untested: Vec<_> = code::ALL.iter().filter(|c| !tested.contains(c)).collect();
    assert!(untested.is_empty(), "codes without a test: {untested:?}");
    let unlisted: Vec<_> = tested.iter().filter(|c| !code::ALL.contains(c)).collect();
    assert!(
        unlisted.is_empty(),
        "codes missing from code::ALL: {unlisted:?}"
    );
}

#[test]
fn unresolvable_upstream_host() {
    let got = errors("[[map]]\nport = 1\nto = \"nosuch.invalid:22\"\n");
    let prefix = r#"t.toml:3:6: cannot resolve upstream "nosuch.invalid:22": "#;
    assert!(got.starts_with(prefix), "{got}");
    assert!(!got.contains('\n'), "{got}");
}

#[test]
fn three_errors_in_file_order() {
    // The walk meets [[map]] (both entries) before [relay], and finds the duplicate last;
    // the report is still in file order.
    let text = r#"[[map]]
port = 20544
to = "10.0.0.5:22"
allow = ["10.0.0.0/33"]
[relay]
bindd = []
[[map]]
port = 20544
to = "10.0.0.6:22"
"#;
    assert_eq!(
        errors(text),
        [
            r#"t.toml:4:10: invalid CIDR "10.0.0.0/33" in "allow": prefix length must be 0-32"#,
            r#"t.toml:6:1: unknown key "bindd" in [relay]"#,
            "t.toml:8:8: port 20544 is already mapped at line 2",
        ]
        .join("\n")
    );
}

#[test]
fn unknown_key_and_bad_cidr_both_reported() {
    let text = "[relay]\nbindd = [\"::\"]\ntrusted_proxies = [\"10.0.0.0/8\", \"300.0.0.0/8\"]\n";
    assert_eq!(
        errors(text),
        "t.toml:2:1: unknown key \"bindd\" in [relay]\nt.toml:3:34: invalid CIDR \"300.0.0.0/8\" in \"trusted_proxies\": expected ADDRESS/PREFIX or an IP address"
    );
}

#[test]
fn columns_count_characters() {
    // "é" is two bytes but one column.
    let text = "[[map]]\nname = \"é\"; port = 0\n";
    assert_eq!(
        errors(text),
        "t.toml:2:11: TOML syntax error: unexpected key or value, expected newline, `#`"
    );
    let text = "[[map]]\nname = \"é\"\nport = 1\nto = \"10.0.0.5:22\"\n\"é\" = 0\n";
    assert_eq!(errors(text), r#"t.toml:5:1: unknown key "é" in [[map]]"#);
    let text = "[[map]]\nallow = [\"é\", \"x\"]\nport = 1\nto = \"10.0.0.5:22\"\n";
    assert_eq!(
        errors(text),
        "t.toml:2:10: invalid CIDR \"é\" in \"allow\": expected ADDRESS/PREFIX or an IP address\nt.toml:2:15: invalid CIDR \"x\" in \"allow\": expected ADDRESS/PREFIX or an IP address"
    );
}

#[test]
fn tls_entries() {
    let dir = tls_dir();
    let file = control_file(dir.path());
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown key",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"x\"\nport = 1\n",
            r#"6:1: unknown key "port" in [[tls]]"#,
        ),
        (
            "unreadable cert",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"missing.crt\"\nkey = \"tls.key\"\nsni_suffix = \"x\"\n",
            "3:8: cannot read cert file \"DIR/missing.crt\": No such file or directory (os error 2)",
        ),
        (
            "key is a directory",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \".\"\nsni_suffix = \"x\"\n",
            "4:7: cannot read key file \"DIR/.\": it is a directory",
        ),
        (
            "bad listen",
            "[[tls]]\nlisten = \"443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"x\"\n",
            r#"2:10: invalid address "443" for "listen": expected "IP:PORT" or "[IPv6]:PORT""#,
        ),
        (
            "empty sni_suffix",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"\"\n",
            r#"5:14: "sni_suffix" must not be empty"#,
        ),
        (
            "missing keys",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\n",
            "1:1: [[tls]] needs \"cert\"\nFILE:1:1: [[tls]] needs \"key\"\nFILE:1:1: [[tls]] needs \"sni_suffix\"",
        ),
        (
            "duplicate listen",
            "[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"a\"\n[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"b\"\n",
            "7:10: address 0.0.0.0:443 is already used by [[tls]] at line 2",
        ),
        (
            "listen on a mapped port",
            "[[map]]\nport = \"400-500\"\nto = \"10.0.0.5:22\"\n[[tls]]\nlisten = \"0.0.0.0:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"a\"\n",
            r#"5:10: "listen" port 443 is already mapped at line 2"#,
        ),
    ];
    let dir_text = dir.path().display().to_string();
    let mut failures = Vec::new();
    for (what, text, expected) in cases {
        let expected = format!("FILE:{expected}")
            .replace("FILE", &file)
            .replace("DIR", &dir_text);
        let got = match parse_str(&file, text) {
            Ok(c) => format!("{c:?}"),
            Err(e) => e.render(),
        };
        if got != expected {
            failures.push(format!(
                "{what}:\n  expected: {expected}\n  got:      {got}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // A listen address on another IP than `bind` does not clash with a mapped port.
    let text = "[relay]\nbind = [\"10.0.0.1\"]\n[[map]]\nport = 443\nto = \"10.0.0.5:22\"\n[[tls]]\nlisten = \"10.0.0.2:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"a\"\n";
    let config = parse_str(&file, text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.tls[0].cert, PathBuf::from(&dir_text).join("tls.crt"));
}

#[test]
fn load_reads_the_file_and_names_it() {
    let dir = tls_dir();
    let path = dir.path().join("portrelay.toml");
    std::fs::write(
        &path,
        "[[tls]]\nlisten = \"[::]:443\"\ncert = \"tls.crt\"\nkey = \"tls.key\"\nsni_suffix = \"s\"\n",
    )
    .unwrap();
    let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.tls[0].key, dir.path().join("tls.key"));

    std::fs::write(&path, "[relay]\nwatch = 1\n").unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}:2:9: \"watch\" must be true or false", path.display())
    );

    let missing = dir.path().join("nope.toml");
    let err = load(&missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1:1: cannot read the control file: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

fn many_maps(n: u32) -> String {
    let mut text = String::from("[relay]\nbind = [\"0.0.0.0\"]\n");
    for i in 0..n {
        let port = 10000 + i * 5;
        let ports = if i % 10 == 0 {
            format!("\"{}-{}\"", port, port + 4)
        } else {
            port.to_string()
        };
        text.push_str(&format!(
            "\n[[map]]\nport = {ports}\nto = \"172.17.{}.{}:22\"\nname = \"C.{i}\"\n",
            i / 250,
            i % 250 + 1
        ));
    }
    text
}

#[test]
fn ten_thousand_maps() {
    let text = many_maps(10_000);
    let config = ok(&text);
    assert_eq!(config.mappings.len(), 10_000);
    assert_eq!(config.mappings[9_999].ports, 59995..=59995);

    // One clash at the very end, with the first entry: found, at the right lines.
    let clash = format!("{text}\n[[map]]\nport = 10002\nto = \"10.0.0.1:22\"\n");
    let last_line = clash.lines().count() - 1;
    assert_eq!(
        errors(&clash),
        format!("t.toml:{last_line}:8: port 10002 is already mapped at line 5")
    );
}

/// How long loading a file of 10,000 mappings may take, best of 7, in any build: a loose
/// bound (a debug build on a loaded 2-core machine takes about 0.1 s). The tight bound on
/// this module's own checks holds in release builds
/// (`cargo test --release --lib control::tests::ten_thousand_maps_timing -- --nocapture`).
const TEN_THOUSAND_MAPS_WITHIN: Duration = Duration::from_secs(2);

#[test]
fn ten_thousand_maps_timing() {
    let text = many_maps(10_000);
    let best_of = |f: &mut dyn FnMut()| {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let whole = best_of(&mut || assert_eq!(ok(&text).mappings.len(), 10_000));
    let toml_only = best_of(&mut || drop(spanned::parse(&text).unwrap()));
    let root = spanned::parse(&text).unwrap();
    let lines = spanned::LineIndex::new(&text);
    let checks_only = best_of(&mut || {
        let config =
            validate::validate(&root, &text, &lines, Path::new(""), validate::Dns::Resolve)
                .unwrap();
        assert_eq!(config.mappings.len(), 10_000);
    });
    println!(
        "10,000 [[map]] ({} bytes), best of 7: parse_str {whole:?} = TOML parsing {toml_only:?} + checks {checks_only:?}",
        text.len()
    );
    // Only the checks are this module's own: TOML parsing (toml 0.8) is most of the time
    // and depends on the machine (25-60 ms on a loaded 2-CPU box).
    assert!(
        whole < TEN_THOUSAND_MAPS_WITHIN,
        "10,000 mappings loaded in {whole:?} (TOML {toml_only:?}, checks {checks_only:?})"
    );
    assert!(
        checks_only < whole,
        "checks {checks_only:?} vs the whole load {whole:?}"
    );
    if !cfg!(debug_assertions) {
        assert!(checks_only < Duration::from_millis(10), "{checks_only:?}");
    }
}

#[test]
fn offline_parsing_never_looks_up_names() {
    let text = "[[map]]\nport = 2000\nto = \"instance.example:22\"\n";
    let errors = super::parse_str_with("t.toml", text, super::Dns::Offline).unwrap_err();
    assert_eq!(
        errors.render(),
        "t.toml:3:6: cannot resolve upstream \"instance.example:22\": host names are not looked up here"
    );
}

/// The man page (docs/portrelay.1.roff, which build.rs puts in portrelay(1)) describes
/// every key of the control file.
#[test]
fn man_page_names_every_key() {
    let page = include_str!("../../docs/portrelay.1.roff");
    let keys = validate::RELAY_KEYS
        .iter()
        .chain(validate::MAP_KEYS)
        .chain(validate::TLS_KEYS)
        .chain(validate::WS_KEYS);
    let missing: Vec<_> = keys
        .filter(|k| !page.contains(&format!("\\fB{k}\\fR =")))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from the man page: {missing:?}"
    );
}

#[test]
fn per_source_limits() {
    let config = ok(r#"
[relay]
per_source_max_connections = 64
per_source_rate = "60/60s"
per_source_exempt = ["10.9.0.0/16", "2001:db8::/32"]

[[map]]
port = 20544
to = "172.17.0.5:22"
per_source_max_connections = 8

[[map]]
port = 20545
to = "172.17.0.6:22"
"#);
    assert_eq!(config.relay.per_source_max_connections, 64);
    assert_eq!(
        config.relay.per_source_rate,
        Some(SourceRate {
            burst: 60,
            period: Duration::from_secs(60)
        })
    );
    assert_eq!(
        config.relay.per_source_exempt,
        vec![
            "10.9.0.0/16".parse::<IpNet>().unwrap(),
            "2001:db8::/32".parse().unwrap()
        ]
    );
    assert_eq!(config.mappings[0].per_source_max_connections, Some(8));
    assert_eq!(config.mappings[1].per_source_max_connections, None);
    // "" is off, as when the key is absent.
    let off = ok("[relay]\nper_source_rate = \"\"\n");
    assert_eq!(off.relay.per_source_rate, None);
}

#[test]
fn source_client_is_read() {
    let config = ok("[[map]]\nport = 1\nto = \"10.0.0.5:22\"\nsource = \"client\"\n\n[[map]]\nport = 2\nto = \"10.0.0.6:22\"\nsource = \"relay\"\n");
    let sources: Vec<Source> = config.mappings.iter().map(|m| m.source).collect();
    assert_eq!(sources, [Source::Client, Source::Relay]);
}
