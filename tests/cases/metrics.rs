//! The `/metrics` endpoint and the lifetime of series, through real scrapes of the real
//! binary.
//!
//! - The endpoint: 50 silent clients do not delay 20 scrapes; 1 MiB of headers is refused
//!   and harms no later scrape; a client that sends a byte a second is cut at the header
//!   timeout; `HEAD`, `404`, `405` with `Allow`, gzip.
//! - Series follow the live mappings: a removed and a renamed mapping keep their series
//!   (with exact byte counts) while a connection runs through them, and lose them once it
//!   ends; 1,000 mappings added and removed over 50 reloads leave the exposition with the
//!   series it had before.
//! - The gauges of connections pending admission and of each loop's last turn.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::util::metrics::{parse_exposition, Series};
use crate::util::net::{connect, free_ports_in_a_row, read_to_end, roundtrip, Upstream};
use crate::util::relay::{data_path_test, map_section, relay_section};
use crate::util::{poll, Backend, Relay};

/// How long a reload may take to be applied and logged.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay may take to notice a closed connection and count it.
const SETTLE: Duration = Duration::from_secs(10);

/// A relay on `backend` with its metrics endpoint on a port of its own; `relay_extra` goes
/// into `[relay]`, `maps` after it. Returns the relay and the metrics port.
fn start(backend: Backend, relay_extra: &str, maps: &str) -> (Relay, u16) {
    let port = free_ports_in_a_row(1);
    let toml = metrics_file(port, relay_extra, maps);
    (Relay::start(&toml, backend), port)
}

fn metrics_file(metrics_port: u16, relay_extra: &str, maps: &str) -> String {
    relay_section(Some(metrics_port), relay_extra) + maps
}

/// An HTTP response: status code, head (without the blank line) and body.
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Sends `request` to 127.0.0.1:`port` and reads the response to its end.
fn request(port: u16, request: &[u8]) -> Response {
    let mut conn = connect(port);
    conn.write_all(request).expect("send the request");
    let response = read_to_end(&mut conn);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&response)));
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Response {
        status,
        head,
        body: response[split + 4..].to_vec(),
    }
}

const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// `GET /metrics`: the exposition of a `200`.
fn scrape(port: u16) -> String {
    let r = request(port, GET);
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.header("content-length").and_then(|v| v.parse().ok()),
        Some(r.body.len()),
        "{}",
        r.head
    );
    String::from_utf8(r.body).expect("a UTF-8 exposition")
}

/// The samples of an exposition, through the suite's one parser.
fn samples(text: &str) -> BTreeMap<Series, f64> {
    parse_exposition(text)
}

/// The series `name{labels}`.
fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (name.to_string(), labels)
}

/// The value of `series`, panicking with the exposition when it is missing.
fn value(text: &str, series: &Series) -> f64 {
    *samples(text)
        .get(series)
        .unwrap_or_else(|| panic!("no {series:?} in the exposition:\n{text}"))
}

/// Series of mapping `map` (with a `map` label of that value).
fn of_map(text: &str, map: &str) -> Vec<Series> {
    samples(text)
        .into_keys()
        .filter(|(_, labels)| labels.get("map").map(String::as_str) == Some(map))
        .collect()
}

fn bytes(map: &str, port: u16, direction: &str) -> Series {
    let port = port.to_string();
    series(
        "portrelay_bytes_total",
        &[("map", map), ("port", &port), ("direction", direction)],
    )
}

/// Asserts the exact byte counts of a mapping, both directions (the upstreams echo).
fn assert_bytes(text: &str, map: &str, port: u16, n: usize) {
    for direction in ["client_to_upstream", "upstream_to_client"] {
        assert_eq!(
            value(text, &bytes(map, port, direction)),
            n as f64,
            "{direction} of {map}:\n{text}"
        );
    }
}

/// Ends a client connection cleanly: half-close, then read the upstream's end.
fn close(mut conn: TcpStream) {
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    read_to_end(&mut conn);
}

/// Scrapes until `done` holds for the exposition, for up to [`SETTLE`]; returns it.
fn scrape_until(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    poll(SETTLE, Duration::from_millis(50), || {
        let text = scrape(port);
        done(&text).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "not within {SETTLE:?}: {what}; last scrape:\n{}",
            scrape(port)
        )
    })
}

// ---------------------------------------------------------------------------------------
// The endpoint (it does not depend on the io backend: these run on epoll)

/// 50 clients that connect and send nothing (and 10 that send half a request) do not delay
/// any of 20 scrapes in a row: each is answered within 1 s; nor do 70 more, past the cap.
#[test]
fn silent_clients_do_not_delay_scrapes() {
    let (_relay, port) = start(Backend::Epoll, "", "");
    let mut held: Vec<TcpStream> = (0..50).map(|_| connect(port)).collect();
    for _ in 0..10 {
        let mut c = connect(port);
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .unwrap();
        held.push(c);
    }
    for i in 0..20 {
        let started = Instant::now();
        let text = scrape(port);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "scrape {i} took {took:?} with 60 clients holding connections"
        );
        assert!(text.contains("portrelay_config_generation 1\n"), "{text}");
    }
    // Past the endpoint's 64 clients, the oldest that have not sent a request make room.
    held.extend((0..70).map(|_| connect(port)));
    let started = Instant::now();
    scrape(port);
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(held);
}

/// A request of 1 MiB of headers is refused (a `431`, or a reset once the endpoint closes
/// on what it did not read), never answered with the exposition; the next scrape is
/// answered within 1 s.
#[test]
fn a_huge_request_is_refused() {
    let (_relay, port) = start(Backend::Epoll, "", "");
    let mut conn = connect(port);
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let pad = "a".repeat(1 << 20);
        // The endpoint stops reading long before the end: this write may fail.
        let _ =
            writer.write_all(format!("GET /metrics HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n").as_bytes());
    });
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let ended = loop {
        let mut buf = [0u8; 4096];
        match conn.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("after {} bytes of response: {e}", got.len()),
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 431 "),
        "response to 1 MiB of headers ({ended}): {text}"
    );
    sender.join().unwrap();
    let started = Instant::now();
    scrape(port);
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A client that sends its request one byte a second is cut at the header timeout (2 s),
/// long before it would have finished (35 s).
#[test]
fn a_slow_client_is_cut_at_the_header_timeout() {
    let (_relay, port) = start(Backend::Epoll, "", "");
    let mut conn = connect(port);
    // Each read waits up to a second for the endpoint to answer or close: the pace.
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = Instant::now();
    let mut answer = Vec::new();
    'sending: for byte in request {
        if conn.write_all(&[*byte]).is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break 'sending,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break 'sending,
            }
        }
    }
    let cut = started.elapsed();
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(5)).contains(&cut),
        "cut after {cut:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408 "),
        "{answer}"
    );
}

/// `HEAD` has the headers of `GET` and no body; other paths are `404`, other methods `405`
/// with `Allow`; with `Accept-Encoding: gzip` the body is gzip.
#[test]
fn methods_paths_and_gzip() {
    let (_relay, port) = start(Backend::Epoll, "", "");
    let head = request(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.status, 200, "{}", head.head);
    assert!(head.body.is_empty());
    let length: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(length > 1000, "{}", head.head);
    assert!(head
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));

    let other = request(port, b"GET /favicon.ico HTTP/1.1\r\n\r\n");
    assert_eq!(other.status, 404, "{}", other.head);
    let post = request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.status, 405, "{}", post.head);
    assert_eq!(post.header("allow"), Some("GET, HEAD"), "{}", post.head);
    let bad = request(port, b"SSH-2.0-OpenSSH_9.6\r\n\r\n");
    assert_eq!(bad.status, 400, "{}", bad.head);

    let gz = request(
        port,
        b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip, deflate\r\n\r\n",
    );
    assert_eq!(gz.status, 200, "{}", gz.head);
    assert_eq!(gz.header("content-encoding"), Some("gzip"), "{}", gz.head);
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz.body[..])
        .read_to_string(&mut text)
        .expect("a gzip body");
    assert!(text.contains("\nportrelay_config_generation 1\n"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Series follow the live mappings

data_path_test!(removed_and_renamed_mappings_keep_series_while_connections_run);
/// With `removed_mapping = "keep"`, a reload removes mapping `gone` and renames `old` to
/// `new` while a connection runs through each: both keep their series and count the bytes
/// that follow exactly; each one's series disappear once its connection has ended, and
/// `new` has its own from the reload on.
fn removed_and_renamed_mappings_keep_series_while_connections_run(backend: Backend) {
    let echo = Upstream::echo();
    let base = free_ports_in_a_row(2);
    let (p_gone, p_old) = (base, base + 1);
    let relay_extra = "removed_mapping = \"keep\"\n";
    let map = |port: u16, name: &str| map_section(port, echo.addr(), name, "");
    let (relay, metrics) = start(
        backend,
        relay_extra,
        &(map(p_gone, "gone") + &map(p_old, "old")),
    );
    let mut gone = connect(p_gone);
    roundtrip(&mut gone, &[1u8; 1000]);
    let mut old = connect(p_old);
    roundtrip(&mut old, &[2u8; 500]);

    relay.rewrite(&metrics_file(metrics, relay_extra, &map(p_old, "new")));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    roundtrip(&mut gone, &[3u8; 300]);
    roundtrip(&mut old, &[4u8; 200]);
    // A loop counts a turn's bytes just after the turn, so the echo can reach the client a
    // moment before its count: wait for the counts (they must then be exact).
    let text = scrape_until(metrics, "the counts of the last round trips", |t| {
        let of = |map: &str, port: u16| {
            samples(t)
                .get(&bytes(map, port, "upstream_to_client"))
                .copied()
        };
        of("gone", p_gone) == Some(1300.0) && of("old", p_old) == Some(700.0)
    });
    assert_bytes(&text, "gone", p_gone, 1300);
    assert_bytes(&text, "old", p_old, 700);
    assert_bytes(&text, "new", p_old, 0);
    let active = |map: &str, port: u16| {
        let port = port.to_string();
        series(
            "portrelay_connections_active",
            &[("map", map), ("port", &port)],
        )
    };
    assert_eq!(value(&text, &active("gone", p_gone)), 1.0, "{text}");
    assert_eq!(value(&text, &active("old", p_old)), 1.0, "{text}");

    close(gone);
    let text = scrape_until(metrics, "the series of `gone` dropped", |t| {
        of_map(t, "gone").is_empty()
    });
    let port_label = p_gone.to_string();
    assert!(
        !samples(&text)
            .keys()
            .any(|(_, labels)| labels.get("port") == Some(&port_label)),
        "a series of the removed port is left:\n{text}"
    );
    assert_bytes(&text, "old", p_old, 700);

    close(old);
    let text = scrape_until(metrics, "the series of `old` dropped", |t| {
        of_map(t, "old").is_empty()
    });
    assert_bytes(&text, "new", p_old, 0);
    assert_eq!(value(&text, &active("new", p_old)), 0.0, "{text}");
}

data_path_test!(mapping_churn_leaves_no_series);
/// 1,000 mappings added and removed over 50 reloads (20 a reload, each with a connection
/// that ran through it), while one connection runs through a mapping removed at the second
/// reload: that one keeps its series and exact counts to its end, and once it has ended the
/// exposition has exactly the series it had before the churn.
fn mapping_churn_leaves_no_series(backend: Backend) {
    const ROUNDS: usize = 50;
    const PER_ROUND: u16 = 20;
    let echo = Upstream::echo();
    // The base mapping, the long-lived one, and two blocks of ports used in turn.
    let first = free_ports_in_a_row(2 + 2 * PER_ROUND);
    let (p_base, p_long) = (first, first + 1);
    let block = |round: usize| first + 2 + (round % 2) as u16 * PER_ROUND;
    let relay_extra = "removed_mapping = \"keep\"\n";
    let map = |port: u16, name: &str| map_section(port, echo.addr(), name, "");
    let (relay, metrics) = start(backend, relay_extra, &map(p_base, "base"));
    let before = scrape(metrics);
    let before_series: Vec<Series> = samples(&before).into_keys().collect();

    let mut long = None;
    let mut peak = 0;
    for round in 1..=ROUNDS {
        let mut maps = map(p_base, "base");
        if round == 1 {
            maps += &map(p_long, "long");
        }
        for i in 0..PER_ROUND {
            maps += &map(block(round) + i, &format!("churn-{round}-{i}"));
        }
        relay.rewrite(&metrics_file(metrics, relay_extra, &maps));
        relay.wait_reloaded(round as u64 + 1, RELOAD_TIMEOUT);
        if round == 1 {
            let mut conn = connect(p_long);
            roundtrip(&mut conn, &[7u8; 1000]);
            long = Some(conn);
        }
        for i in 0..PER_ROUND {
            let mut conn = connect(block(round) + i);
            roundtrip(&mut conn, b"through a mapping that the next reload removes");
            close(conn);
        }
        if round == ROUNDS / 2 {
            peak = scrape(metrics).len();
        }
    }
    relay.rewrite(&metrics_file(metrics, relay_extra, &map(p_base, "base")));
    relay.wait_reloaded(ROUNDS as u64 + 2, RELOAD_TIMEOUT);

    // The long connection's mapping went 49 reloads ago; its series are still there and
    // count what it sends now, exactly. (The relay counts a turn's bytes once the turn has
    // sent them, so the client can have its echo a moment before the counter moves: the
    // scrape waits for the count, and a count past it never matches.)
    let mut long = long.expect("the long connection");
    roundtrip(&mut long, &[8u8; 500]);
    let text = scrape_until(
        metrics,
        "only the long-lived mapping left, 1500 bytes each way",
        |t| {
            let s = samples(t);
            s.keys()
                .all(|(_, labels)| !labels.get("map").is_some_and(|m| m.starts_with("churn-")))
                && ["client_to_upstream", "upstream_to_client"]
                    .iter()
                    .all(|d| s.get(&bytes("long", p_long, d)) == Some(&1500.0))
        },
    );
    assert_bytes(&text, "long", p_long, 1500);
    close(long);

    let after = scrape_until(metrics, "the series from before the churn, no more", |t| {
        samples(t).into_keys().collect::<Vec<_>>() == before_series
    });
    eprintln!(
        "exposition: {} bytes before the churn, {peak} bytes during it, {} bytes after",
        before.len(),
        after.len()
    );
    // Values grew (reloads, generation), series did not.
    assert!(after.len() < before.len() + 200, "{after}");
}

// ---------------------------------------------------------------------------------------
// Pending admission and loop health

data_path_test!(pending_admission_gauge);
/// Two connections from a trusted proxy that have not sent their PROXY header count as
/// pending; one sends its header (admitted), the other closes (refused): back to 0.
fn pending_admission_gauge(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let (_relay, metrics) = start(
        backend,
        "trusted_proxies = [\"127.0.0.1/32\"]\nproxy_header_timeout = \"20s\"\n",
        &map_section(port, echo.addr(), "proxied", ""),
    );
    let pending = series("portrelay_connections_pending", &[]);
    assert_eq!(value(&scrape(metrics), &pending), 0.0);
    let mut admitted = connect(port);
    let refused = connect(port);
    scrape_until(metrics, "2 connections pending", |t| {
        samples(t).get(&pending) == Some(&2.0)
    });
    admitted
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 22\r\n")
        .unwrap();
    roundtrip(&mut admitted, b"admitted");
    scrape_until(metrics, "1 connection pending", |t| {
        samples(t).get(&pending) == Some(&1.0)
    });
    drop(refused);
    let text = scrape_until(metrics, "no connection pending", |t| {
        samples(t).get(&pending) == Some(&0.0)
    });
    let port_text = port.to_string();
    let accepted = series(
        "portrelay_connections_accepted_total",
        &[("map", "proxied"), ("port", &port_text), ("via", "proxy")],
    );
    assert_eq!(value(&text, &accepted), 1.0, "{text}");
    close(admitted);
}

data_path_test!(loop_health_gauge);
/// Every loop has its series, and on an idle relay (no connection, no timer) each shows a
/// last turn under 2.5 s ago for 4 s on end: an idle loop still turns every second.
fn loop_health_gauge(backend: Backend) {
    let loops = crate::util::relay::THREADS;
    let (_relay, metrics) = start(backend, "", "");
    let started = Instant::now();
    let _ = poll(Duration::from_secs(4), Duration::from_millis(200), || {
        let text = scrape(metrics);
        let s = samples(&text);
        let ages = s
            .keys()
            .filter(|(name, _)| name == "portrelay_loop_last_turn_seconds")
            .count();
        assert_eq!(ages, loops, "one series per loop:\n{text}");
        for i in 0..loops {
            let index = i.to_string();
            let series = series("portrelay_loop_last_turn_seconds", &[("loop", &index)]);
            let age = *s
                .get(&series)
                .unwrap_or_else(|| panic!("no {series:?}:\n{text}"));
            assert!(
                age < 2.5,
                "{series:?} = {age} after {:?} of an idle relay",
                started.elapsed()
            );
        }
        None::<()>
    });
}
