//! Reloads of `allow` and `max_connections` take effect for new connections; live ones
//! are untouched.

#[allow(unused_imports)]
use super::*;

/// A connection from `src` to 127.0.0.1:`port` through the relay, checked to reach the
/// upstream named `name` and echo.
fn connect_named_from(src: Ipv4Addr, port: u16, name: &str) -> TcpStream {
    let mut conn = connect_from(src, port);
    let reached = read_greeting(&mut conn)
        .unwrap_or_else(|e| panic!("greeting of the upstream behind port {port} for {src}: {e}"));
    assert_eq!(
        reached, name,
        "upstream reached from {src} through port {port}"
    );
    roundtrip(&mut conn, format!("from {src}").as_bytes());
    conn
}

/// The `connection rejected` lines on `port` so far.
fn rejections(relay: &Relay, port: u16) -> Vec<LogLine> {
    relay
        .log_lines()
        .into_iter()
        .filter(|l| l.is_rejected_on(port))
        .collect()
}

/// Connections from `src` must be refused at once (an RST), one silent and one that sends
/// bytes, each logged with `reason`; none of the bytes may reach `upstream`.
fn assert_refused_now(relay: &Relay, port: u16, src: Ipv4Addr, reason: &str, upstream: &Upstream) {
    let (accepted, bytes) = (upstream.accepted(), upstream.bytes_in());
    let before = rejections(relay, port).len();
    connect_expect_reset(src, port, b"");
    connect_expect_reset(src, port, b"must not reach the upstream");
    let lines = relay.wait_logs(|l| l.is_rejected_on(port), before + 2, RELOAD_TIMEOUT);
    for line in &lines[before..] {
        assert_eq!(line.reason(), reason, "{line}");
        assert!(
            line.text("client").starts_with(&format!("{src}:")),
            "{line}"
        );
    }
    assert_eq!(
        upstream.accepted(),
        accepted,
        "a refused connection reached the upstream"
    );
    assert_eq!(
        upstream.bytes_in(),
        bytes,
        "a refused connection's bytes reached the upstream"
    );
}

const SRC_OLD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SRC_NEW: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

data_path_test!(reload_narrows_allow);
/// `allow = ["127.0.0.2/32"]`, then a reload to `["127.0.0.3/32"]` (same port and upstream:
/// the same mapping, changed in place). The live connection from 127.0.0.2 keeps echoing;
/// a new one from 127.0.0.2 is refused at once (`acl`, its bytes never reach the
/// upstream); one from 127.0.0.3, refused before, is served.
fn reload_narrows_allow(backend: Backend) {
    let upstream = named_echo("acl");
    let port = free_ports_in_a_row(1);
    let file = |cidr: &str| {
        relay_section(None, "") + &map_section(port, upstream.addr(), "C.acl", &allow_line(&[cidr]))
    };
    let relay = Relay::start(&file("127.0.0.2/32"), backend);
    let mut live = connect_named_from(SRC_OLD, port, "acl");
    assert_refused_now(&relay, port, SRC_NEW, "acl", &upstream);

    relay.rewrite(&file("127.0.0.3/32"));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("changed_ports"), 1, "{line}");
    roundtrip(&mut live, b"the live connection is untouched");
    assert_refused_now(&relay, port, SRC_OLD, "acl", &upstream);
    let mut new = connect_named_from(SRC_NEW, port, "acl");
    roundtrip(&mut live, b"still untouched");
    roundtrip(&mut new, b"served under the new allow");
}

data_path_test!(reload_lowers_max_connections);
/// A mapping's `max_connections = 4` with two live connections, then a reload to 1: both
/// keep echoing; a new one is refused at once (`limit`) while either is open; once both
/// have closed one is served and the next refused. Then the same with the relay-wide
/// `max_connections` lowered to 1 (and the mapping's cap removed).
fn reload_lowers_max_connections(backend: Backend) {
    let upstream = named_echo("cap");
    let port = free_ports_in_a_row(1);
    let file = |relay_cap: &str, map_cap: &str| {
        relay_section(None, relay_cap) + &map_section(port, upstream.addr(), "C.cap", map_cap)
    };
    let relay = Relay::start(&file("", "max_connections = 4"), backend);
    let src = LOCALHOST;
    let mut a = connect_named_from(src, port, "cap");
    let mut b = connect_named_from(src, port, "cap");

    relay.rewrite(&file("", "max_connections = 1"));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    roundtrip(&mut a, b"a is untouched");
    roundtrip(&mut b, b"b is untouched");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(a);
    relay.wait_logs(|l| l.is_closed_on(port), 1, RELOAD_TIMEOUT);
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(b);
    relay.wait_logs(|l| l.is_closed_on(port), 2, RELOAD_TIMEOUT);
    let mut only = connect_named_from(src, port, "cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    roundtrip(&mut only, b"the one the cap allows");

    // The relay-wide cap, lowered to 1 (the mapping's removed) with one connection open:
    // the next is refused until it closes.
    relay.rewrite(&file("max_connections = 1", ""));
    relay.wait_reloaded(3, RELOAD_TIMEOUT);
    roundtrip(&mut only, b"untouched by the relay-wide cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(only);
    relay.wait_logs(|l| l.is_closed_on(port), 3, RELOAD_TIMEOUT);
    let _one = connect_named_from(src, port, "cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
}
