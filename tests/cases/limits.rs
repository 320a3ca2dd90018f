//! Per-source limits, on both backends, with the harness's 4 event loops:
//!
//! - the concurrent cap is one count for the whole relay (a cap of 4 admits exactly 4 from
//!   127.0.0.3, not 4 per loop); the next one is closed with a FIN before any upstream
//!   connect, while 127.0.0.4 still connects; closing one frees its place; counters exact;
//! - the real ssh client against real sshd: past the cap `ssh -b 127.0.0.3` is closed, `-b
//!   127.0.0.4` logs in;
//! - behind a trusted proxy the source is the PROXY header's address, not the proxy's, and
//!   IPv6 clients count per /64; at a `[[ws]]` entry the WebSocket client is the source;
//! - the rate bucket refuses the burst's excess and admits again after its refill;
//! - exempt CIDRs are never refused; a reload applies new limits to new connections;
//! - a mapping's own cap counts only that mapping's connections; held connections count
//!   until a reload closes them;
//! - refusals are logged once, then summed up every 10 s;
//! - `portrelay check` reports bad values with their line and column.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::haproxy::PROXY_SOURCE;
use crate::util::metrics::wait_metric;
use crate::util::net::{
    connect_expect_closed, connect_from, free_port, free_ports_in_a_row, roundtrip, Closed,
    Upstream, AT_ONCE,
};
use crate::util::relay::{data_path_test, map_section, relay_section, run_check};
use crate::util::{poll, Backend, Relay, Sshd};

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const EXEMPT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const REJECTED: &str = "portrelay_connections_rejected_total";
const ACTIVE: &str = "portrelay_connections_active";

/// A connection from `src` that the relay admits: an echo round trip works.
fn admitted(src: Ipv4Addr, port: u16) -> TcpStream {
    let mut conn = connect_from(src, port);
    roundtrip(&mut conn, b"SSH-2.0-limits-test\r\n");
    conn
}

/// A connection from `src` that the relay refuses by a per-source limit: closed with a
/// FIN, at once, without a byte.
fn refused(src: Ipv4Addr, port: u16) {
    let (closed, took) = connect_expect_closed(src, port, b"SSH-2.0-limits-test\r\n", AT_ONCE);
    assert_eq!(
        closed,
        Closed::Eof,
        "a per-source refusal of {src} is a FIN, got a reset after {took:?}"
    );
}

/// Waits until the relay counts `n` live connections on `port` (a closed one has been
/// seen and its places given back).
fn wait_active(metrics: u16, port: u16, n: f64) {
    wait_metric(metrics, ACTIVE, &[("port", &port.to_string())], n);
}

data_path_test!(one_cap_for_all_loops);
/// `per_source_max_connections = 4` with 4 loops: of 8 concurrent connections from
/// 127.0.0.3 exactly 4 are relayed and 4 closed with a FIN, none of them reaching the
/// upstream; 127.0.0.4 connects meanwhile; after one of the 4 closes, one more is admitted.
fn one_cap_for_all_loops(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let toml = relay_section(Some(metrics), "per_source_max_connections = 4\n")
        + &map_section(port, echo.addr(), "C.cap", "");
    let relay = Relay::start(&toml, backend);

    let mut held: Vec<TcpStream> = (0..4).map(|_| admitted(CLIENT, port)).collect();
    for _ in 0..4 {
        refused(CLIENT, port);
    }
    assert_eq!(
        echo.accepted(),
        4,
        "refused connections never reach the upstream"
    );
    let other = admitted(OTHER, port);
    let s = wait_metric(metrics, REJECTED, &[("reason", "per_source")], 4.0);
    assert_eq!(s.sum(REJECTED, &[("reason", "rate")]), 0.0);
    assert_eq!(
        s.sum("portrelay_connections_accepted_total", &[]),
        5.0,
        "{}",
        s.text
    );

    // One ends: its place is given back (once: the next but one is refused again).
    drop(held.pop());
    wait_active(metrics, port, 4.0);
    held.push(admitted(CLIENT, port));
    refused(CLIENT, port);
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 5.0);
    assert_eq!(echo.accepted(), 6);

    // All end: the whole budget is back.
    drop(held);
    drop(other);
    wait_active(metrics, port, 0.0);
    let again: Vec<TcpStream> = (0..4).map(|_| admitted(CLIENT, port)).collect();
    refused(CLIENT, port);
    drop(again);
    // One line for the first refusal of the spell; the rest are summed up later.
    let lines = relay.log_lines();
    let single: Vec<_> = lines
        .iter()
        .filter(|l| {
            l.msg()
                .starts_with("connection rejected by a per-source limit")
        })
        .collect();
    assert_eq!(single.len(), 1, "{lines:?}");
    assert_eq!(single[0].reason(), "per_source", "{}", single[0]);
    assert!(
        !lines
            .iter()
            .any(|l| l.msg() == "connection rejected" && l.reason() == "per_source"),
        "per-source refusals are not logged one by one"
    );
}

data_path_test!(ssh_past_the_cap);
/// The real ssh client and sshd: with `per_source_max_connections = 2`, two lingering
/// `ssh -N -b 127.0.0.3` sessions (as VS Code keeps them) fill the cap; a third from
/// 127.0.0.3 is closed before the key exchange; one from 127.0.0.4 logs in; once a
/// session ends, 127.0.0.3 logs in again.
fn ssh_past_the_cap(backend: Backend) {
    let sshd = Sshd::start();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let toml = relay_section(Some(metrics), "per_source_max_connections = 2\n")
        + &map_section(port, sshd.addr(), "C.ssh", "");
    let _relay = Relay::start(&toml, backend);

    let session = |src: Ipv4Addr| {
        sshd.ssh_with(port, &["-N", "-b", &src.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh -N")
    };
    let run = |src: Ipv4Addr| {
        let mut cmd: Command = sshd.ssh_with(port, &["-b", &src.to_string()]);
        cmd.arg("echo logged-in");
        cmd.output().expect("run ssh")
    };
    let mut sessions = vec![session(CLIENT), session(CLIENT)];
    wait_active(metrics, port, 2.0);

    let out = run(CLIENT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a third ssh from {CLIENT} logged in");
    assert!(
        stderr.contains("Connection closed by"),
        "ssh should see the connection closed before the key exchange: {stderr}"
    );
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 1.0);

    let out = run(OTHER);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("logged-in"),
        "ssh from {OTHER}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut first = sessions.remove(0);
    first.kill().expect("kill ssh -N");
    first.wait().expect("reap ssh -N");
    wait_active(metrics, port, 1.0);
    let out = run(CLIENT);
    assert!(
        out.status.success(),
        "ssh from {CLIENT} once a place was free: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mut s in sessions {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// A PROXY v2 header for TCP over IPv4 from `src` (port 40000) to 10.0.0.1:22.
fn v2_tcp4(src: Ipv4Addr) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&[10, 0, 0, 1]);
    out.extend_from_slice(&40000u16.to_be_bytes());
    out.extend_from_slice(&22u16.to_be_bytes());
    out
}

/// A PROXY v2 header for TCP over IPv6 from `src` (port 40000) to [2001:db8::ffff]:22.
fn v2_tcp6(src: Ipv6Addr) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x21, 0, 36]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&"2001:db8::ffff".parse::<Ipv6Addr>().unwrap().octets());
    out.extend_from_slice(&40000u16.to_be_bytes());
    out.extend_from_slice(&22u16.to_be_bytes());
    out
}

/// A connection from the trusted proxy for the client `client`: header, then an echo.
fn through_proxy(port: u16, client: Ipv4Addr) -> (TcpStream, bool) {
    through_proxy_with(port, &v2_tcp4(client))
}

/// A connection from the trusted proxy that sends `header`, then whether an echo comes back.
fn through_proxy_with(port: u16, header: &[u8]) -> (TcpStream, bool) {
    let mut conn = connect_from(PROXY_SOURCE, port);
    conn.write_all(header).expect("write header");
    conn.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    let ok = std::io::Read::read_exact(&mut conn, &mut buf).is_ok() && &buf == b"ping";
    (conn, ok)
}

data_path_test!(behind_a_proxy_the_header_is_the_source);
/// Behind a trusted proxy (127.0.0.2) with a cap of 1: the second connection for client
/// 9.9.9.9 is refused, one for 9.9.9.8 is relayed: the proxy itself carries more than the
/// cap, so its own address is not what is counted.
fn behind_a_proxy_the_header_is_the_source(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let extra =
        format!("trusted_proxies = [\"{PROXY_SOURCE}/32\"]\nper_source_max_connections = 1\n");
    let toml = relay_section(Some(metrics), &extra) + &map_section(port, echo.addr(), "C.px", "");
    let _relay = Relay::start(&toml, backend);

    let a = Ipv4Addr::new(9, 9, 9, 9);
    let (_first, ok) = through_proxy(port, a);
    assert!(ok, "the first connection for {a} is relayed");
    let (mut second, ok) = through_proxy(port, a);
    assert!(!ok, "a second connection for {a} is refused");
    let (closed, _) = crate::util::net::expect_closed(&mut second, AT_ONCE);
    assert_eq!(closed, Closed::Eof);
    let b = Ipv4Addr::new(9, 9, 9, 8);
    let (_third, ok) = through_proxy(port, b);
    assert!(ok, "a connection for another client {b} is relayed");
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 1.0);
    assert_eq!(echo.accepted(), 2);
}

data_path_test!(rate_refuses_the_excess_then_refills);
/// `per_source_rate = "3/3s"`: three connect-and-close from 127.0.0.3 are relayed, the
/// fourth is refused (`rate`); 127.0.0.4 is unaffected; a second later the bucket has a
/// token again. Every refusal is counted.
fn rate_refuses_the_excess_then_refills(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let toml = relay_section(Some(metrics), "per_source_rate = \"3/3s\"\n")
        + &map_section(port, echo.addr(), "C.rate", "");
    let _relay = Relay::start(&toml, backend);

    for _ in 0..3 {
        drop(admitted(CLIENT, port));
    }
    refused(CLIENT, port);
    drop(admitted(OTHER, port));
    let mut refusals = 1.0;
    // Refilled at one token a second: polled, each failed try is one more refusal.
    let back = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let mut conn = connect_from(CLIENT, port);
        conn.write_all(b"x").ok()?;
        let mut buf = [0u8; 1];
        match std::io::Read::read(&mut conn, &mut buf) {
            Ok(1) => Some(()),
            _ => {
                refusals += 1.0;
                None
            }
        }
    });
    assert!(back.is_some(), "the bucket never refilled");
    let s = wait_metric(metrics, REJECTED, &[("reason", "rate")], refusals);
    assert_eq!(s.sum(REJECTED, &[("reason", "per_source")]), 0.0);
    assert_eq!(echo.accepted(), 5);
}

data_path_test!(exempt_and_reloaded_limits);
/// A cap of 1 and a rate of 1 per hour, with 127.0.0.5 exempt: 127.0.0.5 opens 5 at once
/// and 5 more in a row; 127.0.0.3 gets 1. A reload to a cap of 3 and no rate lets
/// 127.0.0.3 open 2 more at once (the live one still counts), and no more.
fn exempt_and_reloaded_limits(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let map = map_section(port, echo.addr(), "C.ex", "");
    let limits = |cap: u32, rate: &str| {
        relay_section(
            Some(metrics),
            &format!(
                "per_source_max_connections = {cap}\nper_source_rate = \"{rate}\"\nper_source_exempt = [\"{EXEMPT}/32\"]\n"
            ),
        ) + &map
    };
    let relay = Relay::start(&limits(1, "1/1h"), backend);

    let exempt: Vec<TcpStream> = (0..5).map(|_| admitted(EXEMPT, port)).collect();
    for _ in 0..5 {
        drop(admitted(EXEMPT, port));
    }
    let live = admitted(CLIENT, port);
    refused(CLIENT, port);
    // The cap is checked first: a refusal by `per_source`, not `rate`.
    let s = wait_metric(metrics, REJECTED, &[("reason", "per_source")], 1.0);
    assert_eq!(s.sum(REJECTED, &[("reason", "rate")]), 0.0);

    relay.rewrite(&limits(3, ""));
    relay.wait_reloaded(2, Duration::from_secs(10));
    let more: Vec<TcpStream> = (0..2).map(|_| admitted(CLIENT, port)).collect();
    refused(CLIENT, port);
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 2.0);
    drop((exempt, live, more));
}

data_path_test!(a_mapping_cap_counts_its_own_connections);
/// Mappings with `per_source_max_connections` 1 and 3, and one without: 127.0.0.3 gets
/// one connection to the first, three to the second, and more to the third, each counted
/// apart; 127.0.0.4 has its own budget.
fn a_mapping_cap_counts_its_own_connections(backend: Backend) {
    let echo = Upstream::echo();
    let ports = free_ports_in_a_row(3);
    let metrics = free_port();
    let cap = |n: u32| format!("per_source_max_connections = {n}\n");
    let toml = relay_section(Some(metrics), "")
        + &map_section(ports, echo.addr(), "C.one", &cap(1))
        + &map_section(ports + 1, echo.addr(), "C.three", &cap(3))
        + &map_section(ports + 2, echo.addr(), "C.free", "");
    let _relay = Relay::start(&toml, backend);

    let _one = admitted(CLIENT, ports);
    refused(CLIENT, ports);
    let _three: Vec<TcpStream> = (0..3).map(|_| admitted(CLIENT, ports + 1)).collect();
    refused(CLIENT, ports + 1);
    let _free: Vec<TcpStream> = (0..5).map(|_| admitted(CLIENT, ports + 2)).collect();
    let _other = admitted(OTHER, ports);
    for port in [ports, ports + 1] {
        wait_metric(
            metrics,
            REJECTED,
            &[("reason", "per_source"), ("port", &port.to_string())],
            1.0,
        );
    }
}

/// `portrelay check` reports bad per-source values at their line and column, exit 1.
#[test]
fn check_reports_bad_limits() {
    let text = "[relay]\nper_source_rate = \"30 per 10s\"\nper_source_exempt = [\"10.0.0.0/40\"]\n\n[[map]]\nport = 2000\nto = \"127.0.0.1:22\"\nper_source_max_connections = -3\n";
    let (status, stderr) = run_check(text);
    assert_eq!(status.code(), Some(1), "{stderr}");
    for want in [
        ":2:19: \"per_source_rate\" must be \"BURST/PERIOD\"",
        ":3:22: invalid CIDR \"10.0.0.0/40\" in \"per_source_exempt\"",
        ":8:30: \"per_source_max_connections\" must be between 0 and",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
    let (status, stderr) = run_check("[relay]\nper_source_rate = \"0/10s\"\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":2:19: BURST of \"per_source_rate\" must be between 1 and 1000000, got 0"),
        "{stderr}"
    );
}

data_path_test!(held_connections_count_until_they_end);
/// With a cap of 1, a connection held while its upstream refuses (`hold`) takes the
/// source's place: a second is refused. A reload that retargets the mapping closes the held
/// one (`removed_mapping = "close"`), and its place is free again.
fn held_connections_count_until_they_end(backend: Backend) {
    let echo = Upstream::echo();
    let dead = free_ports_in_a_row(1);
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let relay_part = relay_section(Some(metrics), "per_source_max_connections = 1\n");
    let to_dead: std::net::SocketAddr = (Ipv4Addr::LOCALHOST, dead).into();
    let toml = relay_part.clone() + &map_section(port, to_dead, "C.boot", "hold = \"60s\"\n");
    let relay = Relay::start(&toml, backend);

    let mut waiting = connect_from(CLIENT, port);
    wait_metric(metrics, "portrelay_connections_held", &[], 1.0);
    refused(CLIENT, port);

    relay.rewrite(&(relay_part + &map_section(port, echo.addr(), "C.boot", "")));
    relay.wait_reloaded(2, Duration::from_secs(10));
    crate::util::net::expect_closed(&mut waiting, Duration::from_secs(10));
    wait_active(metrics, port, 0.0);
    let _now = admitted(CLIENT, port);
    refused(CLIENT, port);
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 2.0);
}

/// A WebSocket upgrade from `src` for the mapping `name` at the `[[ws]]` entry on `ws`,
/// which is answered `101`; then whether the connection is relayed (a binary frame comes
/// back from the echo upstream) or closed with a FIN and nothing more.
fn ws_upgrade(src: Ipv4Addr, ws: u16, name: &str) -> bool {
    use std::io::Read;
    let mut conn = connect_from(src, ws);
    let req = format!(
        "GET /ssh/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).expect("write the request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        conn.read_exact(&mut byte).expect("read the answer");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A masked binary frame "ping" (mask key 0): the echo upstream sends it back.
    if conn
        .write_all(&[0x82, 0x84, 0, 0, 0, 0, b'p', b'i', b'n', b'g'])
        .is_err()
    {
        return false;
    }
    let mut back = [0u8; 6];
    match conn.read_exact(&mut back) {
        Ok(()) => {
            assert_eq!(&back, &[0x82, 4, b'p', b'i', b'n', b'g']);
            std::mem::forget(conn); // held open until the test's relay ends
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
            false
        }
    }
}

data_path_test!(websocket_clients_are_sources);
/// At a `[[ws]]` entry, with a cap of 1: the WebSocket client is the source, checked once
/// its request has routed it (after the `101`, like the mapping's own cap): a second
/// WebSocket from 127.0.0.3 is closed and never reaches the upstream; one from 127.0.0.4 is
/// relayed; and the direct port shares 127.0.0.3's count.
fn websocket_clients_are_sources(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let ws = free_ports_in_a_row(1);
    let toml = relay_section(Some(metrics), "per_source_max_connections = 1\n")
        + &map_section(port, echo.addr(), "wsmap", "")
        + &format!("[[ws]]\nlisten = \"127.0.0.1:{ws}\"\npath = \"/ssh/{{name}}\"\n");
    let _relay = Relay::start(&toml, backend);

    assert!(
        ws_upgrade(CLIENT, ws, "wsmap"),
        "the first from {CLIENT} is relayed"
    );
    assert!(
        !ws_upgrade(CLIENT, ws, "wsmap"),
        "a second from {CLIENT} is refused"
    );
    assert!(
        ws_upgrade(OTHER, ws, "wsmap"),
        "one from {OTHER} is relayed"
    );
    refused(CLIENT, port);
    // Both refusals count on the mapping's port (the `[[ws]]` port counts none).
    let port_label = port.to_string();
    let s = wait_metric(
        metrics,
        REJECTED,
        &[("reason", "per_source"), ("port", &port_label)],
        2.0,
    );
    assert_eq!(s.sum(REJECTED, &[("reason", "per_source")]), 2.0);
    assert_eq!(echo.accepted(), 2);
}

data_path_test!(ipv6_sources_are_64s);
/// Behind a trusted proxy, with a cap of 2: IPv6 clients count per /64: 2001:db8:1:2::1
/// and 2001:db8:1:2::2 share one budget (the third from that /64 is refused), while
/// 2001:db8:1:3::1 has its own.
fn ipv6_sources_are_64s(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let extra =
        format!("trusted_proxies = [\"{PROXY_SOURCE}/32\"]\nper_source_max_connections = 2\n");
    let toml = relay_section(Some(metrics), &extra) + &map_section(port, echo.addr(), "C.v6", "");
    let _relay = Relay::start(&toml, backend);

    let v6 = |s: &str| v2_tcp6(s.parse().unwrap());
    let (_a, ok) = through_proxy_with(port, &v6("2001:db8:1:2::1"));
    assert!(ok);
    let (_b, ok) = through_proxy_with(port, &v6("2001:db8:1:2::2"));
    assert!(ok, "a second address of the /64 is within its budget of 2");
    let (_c, ok) = through_proxy_with(port, &v6("2001:db8:1:2:ffff::3"));
    assert!(!ok, "a third address of the same /64 is refused");
    let (_d, ok) = through_proxy_with(port, &v6("2001:db8:1:3::1"));
    assert!(ok, "another /64 has its own budget");
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 1.0);
    assert_eq!(echo.accepted(), 3);
}

data_path_test!(refusals_are_summed_up_in_the_log);
/// A burst of refusals is one line at once, then one summary line 10 s later with the exact
/// counts by reason and the number of distinct sources; no line per refusal.
fn refusals_are_summed_up_in_the_log(backend: Backend) {
    let echo = Upstream::echo();
    let (port, metrics) = (free_ports_in_a_row(1), free_port());
    let toml = relay_section(Some(metrics), "per_source_max_connections = 1\n")
        + &map_section(port, echo.addr(), "C.log", "");
    let relay = Relay::start(&toml, backend);

    let sources = [CLIENT, OTHER, Ipv4Addr::new(127, 0, 0, 6)];
    let _live: Vec<TcpStream> = sources.iter().map(|s| admitted(*s, port)).collect();
    for i in 0..30 {
        refused(sources[i % 3], port);
    }
    let summary = relay.wait_log(
        |l| {
            l.msg()
                .starts_with("connections rejected by per-source limits")
        },
        Duration::from_secs(20),
    );
    assert_eq!(summary.num("per_source"), 30, "{summary}");
    assert_eq!(summary.num("rate"), 0, "{summary}");
    assert_eq!(summary.num("sources"), 3, "{summary}");
    let lines = relay.log_lines();
    let single = lines
        .iter()
        .filter(|l| l.msg().starts_with("connection rejected"))
        .count();
    assert_eq!(single, 1, "one line for the first refusal only: {lines:?}");
    wait_metric(metrics, REJECTED, &[("reason", "per_source")], 30.0);
}
