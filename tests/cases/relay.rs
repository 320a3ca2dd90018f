//! The data path with raw TCP clients and in-process upstreams: half-close, many
//! connections at once, upstreams that refuse or never answer, `allow`, port ranges, and
//! SIGTERM. Each `check_*` client also runs straight against its upstream in `harness`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::files::{random_bytes, sha256};
use crate::util::log::LogLine;
use crate::util::metrics::Scrape;
use crate::util::net::{
    accept_within, connect, connect_expect_closed, connect_expect_reset, connect_from,
    expect_closed, expect_reset, free_port, free_ports_in_a_row, listen, listeners_in_a_row,
    read_some, read_to_end, reset, roundtrip, BlackHole, Upstream, AT_ONCE, LOCALHOST,
};
use crate::util::relay::{data_path_test, map_section, relay_section, Start};
use crate::util::{poll, Backend, Relay};

/// `n` distinct ports that were free a moment ago (below the ephemeral range).
fn free_ports<const N: usize>() -> [u16; N] {
    let first = free_ports_in_a_row(N as u16);
    std::array::from_fn(|i| first + i as u16)
}

/// A relay with one mapping `name`, a free host port → `to`; `relay_extra` goes into
/// `[relay]`.
fn relay_one(to: SocketAddr, name: &str, relay_extra: &str, backend: Backend) -> (Relay, u16) {
    let port = free_port();
    let toml = relay_section(None, relay_extra) + &map_section(port, to, name, "");
    (Relay::start(&toml, backend), port)
}

/// Bytes the half-close client sends before shutting down its write side.
pub(crate) const HALF_CLOSE_SEND: usize = 4 << 20;

/// Writes 4 MiB, shuts down its write side, then reads until EOF: the reply must be the
/// SHA-256 of what it sent followed by `payload` (an [`Upstream::digest_then`]).
pub(crate) fn check_half_close(port: u16, payload: &[u8]) {
    let sent = random_bytes(HALF_CLOSE_SEND);
    let mut conn = connect(port);
    conn.write_all(&sent).expect("write 4 MiB");
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let reply = read_to_end(&mut conn);
    assert_eq!(
        reply.len(),
        32 + payload.len(),
        "reply length after half-close"
    );
    assert!(
        reply[..32] == sha256(&sent),
        "the upstream did not get exactly what was sent"
    );
    assert!(reply[32..] == *payload, "the reply payload differs");
}

/// The 1 KiB that connection `id` of [`check_many_connections`] sends: its id, then bytes
/// from a generator seeded by it.
fn pattern(id: usize) -> Vec<u8> {
    let mut x = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = (id as u32).to_be_bytes().to_vec();
    while out.len() < 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(1024);
    out
}

/// What the client threads of [`check_many_connections`] share.
struct Crowd {
    deadline: Instant,
    /// Connections opened and checked, and still held.
    checked: AtomicUsize,
    /// Set when any thread failed: the others stop waiting.
    failed: AtomicBool,
    /// Set when the threads may close their connections.
    release: AtomicBool,
    failures: Mutex<Vec<String>>,
}

impl Crowd {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// One client thread: opens and checks connections `ids`, then holds them until
    /// released (or until any thread fails, or the deadline).
    fn client(&self, port: u16, ids: Range<usize>) {
        match open_and_check(port, ids) {
            Ok(conns) => {
                self.checked.fetch_add(conns.len(), Ordering::SeqCst);
                poll(self.left(), Duration::from_millis(5), || {
                    let done =
                        self.release.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst);
                    done.then_some(())
                });
            }
            Err(e) => {
                self.failures.lock().unwrap().push(e);
                self.failed.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Opens connections `ids` to `port`, writing each one's [`pattern`] as it opens; then
/// reads each one's echo back and compares.
fn open_and_check(port: u16, ids: Range<usize>) -> Result<Vec<TcpStream>, String> {
    let addr = SocketAddr::from((LOCALHOST, port));
    let mut conns = Vec::with_capacity(ids.len());
    for id in ids.clone() {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect #{id}: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.write_all(&pattern(id))
            .map_err(|e| format!("write #{id}: {e}"))?;
        conns.push(conn);
    }
    for (id, conn) in ids.zip(conns.iter_mut()) {
        let mut back = vec![0u8; 1024];
        conn.read_exact(&mut back)
            .map_err(|e| format!("read #{id}: {e}"))?;
        if back != pattern(id) {
            return Err(format!("connection #{id} got bytes that are not its own"));
        }
    }
    Ok(conns)
}

/// Opens `threads × per_thread` connections to `port` (each thread owns `per_thread`),
/// writes a distinct 1 KiB on each, reads it back on each and compares. When every
/// connection is open and checked, calls `all_open` while they are all still held, then
/// closes them. Fails after `limit`.
pub(crate) fn check_many_connections(
    port: u16,
    threads: usize,
    per_thread: usize,
    limit: Duration,
    all_open: impl FnOnce(),
) {
    let total = threads * per_thread;
    let crowd = Crowd {
        deadline: Instant::now() + limit,
        checked: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        release: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| {
        for t in 0..threads {
            let crowd = &crowd;
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    crowd.client(port, t * per_thread..(t + 1) * per_thread)
                })
                .expect("spawn client thread");
        }
        let all_checked = poll(crowd.left(), Duration::from_millis(10), || {
            if crowd.failed.load(Ordering::SeqCst) {
                return Some(false);
            }
            (crowd.checked.load(Ordering::SeqCst) == total).then_some(true)
        });
        let outcome = (all_checked == Some(true))
            .then(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(all_open)));
        crowd.release.store(true, Ordering::SeqCst);
        if let Some(Err(panic)) = outcome {
            std::panic::resume_unwind(panic);
        }
    });

    let checked = crowd.checked.load(Ordering::SeqCst);
    let failures = crowd.failures.into_inner().unwrap();
    assert!(
        failures.is_empty() && checked == total,
        "{checked} of {total} connections checked within {limit:?}; first failures: {:?}",
        &failures[..failures.len().min(10)]
    );
}

data_path_test!(half_close);
/// The client writes 4 MiB and shuts down its write side; the upstream reads to EOF and
/// only then replies with 1 MiB, which the client must get whole, up to EOF. The relay
/// counts the bytes exactly.
fn half_close(backend: Backend) {
    let payload = random_bytes(1 << 20);
    let upstream = Upstream::digest_then(payload.clone());
    let (relay, port) = relay_one(upstream.addr(), "half-close", "", backend);
    check_half_close(port, &payload);
    assert_eq!(upstream.bytes_in(), HALF_CLOSE_SEND as u64);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    line.assert_closed_fields(port, "half-close", upstream.addr());
    assert_eq!(
        line.num("bytes_client_to_upstream"),
        HALF_CLOSE_SEND as u64,
        "{line}"
    );
    assert_eq!(
        line.num("bytes_upstream_to_client"),
        32 + (1 << 20),
        "{line}"
    );
    assert!(
        ["client_eof", "upstream_eof"].contains(&line.reason()),
        "both sides ended with EOF: {line}"
    );
}

data_path_test!(many_connections);
/// 2,000 connections open at once through one mapping to an echo upstream, every byte
/// checked; all 2,000 reach the upstream at the same time, and closing them closes
/// every upstream side too.
fn many_connections(backend: Backend) {
    const THREADS: usize = 50;
    const PER_THREAD: usize = 40;
    const TOTAL: usize = THREADS * PER_THREAD;
    let echo = Upstream::echo();
    let (relay, port) = relay_one(echo.addr(), "many", "", backend);
    check_many_connections(port, THREADS, PER_THREAD, Duration::from_secs(60), || {
        assert_eq!(
            echo.accepted(),
            TOTAL,
            "upstream connections while all are open"
        );
        assert_eq!(
            echo.active(),
            TOTAL,
            "upstream connections open while all are open"
        );
    });
    let drained = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        (echo.active() == 0).then_some(())
    });
    assert!(
        drained.is_some(),
        "{} upstream sides still open 20 s after the clients closed",
        echo.active()
    );
    let lines = relay.wait_logs(|l| l.is_closed_on(port), TOTAL, Duration::from_secs(20));
    for line in &lines {
        assert_eq!(line.num("bytes_client_to_upstream"), 1024, "{line}");
        assert_eq!(line.num("bytes_upstream_to_client"), 1024, "{line}");
        assert_eq!(line.reason(), "client_eof", "{line}");
    }
    assert_eq!(echo.bytes_in(), (TOTAL * 1024) as u64);
}

data_path_test!(upstream_refused);
/// A mapping whose upstream refuses: the client is closed promptly, the relay logs a
/// connect error saying "refused", and another mapping of the same relay still serves.
fn upstream_refused(backend: Backend) {
    let [dead_host, live_host, closed] = free_ports::<3>();
    let dead_upstream = SocketAddr::from((LOCALHOST, closed));
    let echo = Upstream::echo();
    let toml = relay_section(None, "")
        + &map_section(dead_host, dead_upstream, "dead", "")
        + &map_section(live_host, echo.addr(), "live", "");
    let relay = Relay::start(&toml, backend);

    // The refused upstream connect is passed on as a reset, at once.
    connect_expect_reset(LOCALHOST, dead_host, b"");
    let line = relay.wait_log(|l| l.is_closed_on(dead_host), Duration::from_secs(5));
    line.assert_closed_fields(dead_host, "dead", dead_upstream);
    assert!(
        line.reason().starts_with("error: connect") && line.reason().contains("refused"),
        "reason for a refused upstream: {line}"
    );
    assert_eq!(line.num("bytes_upstream_to_client"), 0, "{line}");

    let mut live = connect(live_host);
    roundtrip(&mut live, b"the other mapping still serves");
}

data_path_test!(upstream_blackholed);
/// A mapping whose upstream never answers SYN: with connect_timeout = 1s the client is
/// closed after about a second, and the relay logs a connect error saying "timed out".
fn upstream_blackholed(backend: Backend) {
    let hole = BlackHole::new();
    let (relay, port) = relay_one(hole.addr(), "hole", "", backend);
    let (_, took) = connect_expect_closed(LOCALHOST, port, b"", Duration::from_secs(4));
    assert!(
        took >= Duration::from_millis(800),
        "closed after {took:?}, before connect_timeout (1s) could pass"
    );
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(5));
    line.assert_closed_fields(port, "hole", hole.addr());
    assert!(
        line.reason().starts_with("error: connect") && line.reason().contains("timed out"),
        "reason for an upstream that never answers: {line}"
    );
}

data_path_test!(allow_denies_source);
/// `allow = ["127.0.0.2/32"]`: a client from 127.0.0.1 is closed without its bytes
/// reaching the upstream and is logged as rejected (acl); one from 127.0.0.2 is served
/// and logged with its real address.
fn allow_denies_source(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_port();
    let toml = relay_section(None, "")
        + &map_section(port, echo.addr(), "acl", "allow = [\"127.0.0.2/32\"]");
    let relay = Relay::start(&toml, backend);

    // One silent, one with bytes: each reset at once (a silent one too, which a plain
    // close would end with a FIN).
    for send in [&b""[..], b"must not reach the upstream"] {
        let took = connect_expect_reset(Ipv4Addr::new(127, 0, 0, 1), port, send);
        eprintln!("refused (acl) after {took:?}");
    }
    let lines = relay.wait_logs(|l| l.is_rejected_on(port), 2, Duration::from_secs(5));
    for line in &lines {
        assert_eq!(line.text("reason"), "acl", "{line}");
        assert!(line.text("client").starts_with("127.0.0.1:"), "{line}");
    }

    let allowed_bytes = b"allowed";
    let mut allowed = connect_from(Ipv4Addr::new(127, 0, 0, 2), port);
    roundtrip(&mut allowed, allowed_bytes);
    drop(allowed);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    assert!(line.text("client").starts_with("127.0.0.2:"), "{line}");
    assert_eq!(
        echo.accepted(),
        1,
        "only the allowed client may reach the upstream"
    );
    assert_eq!(echo.bytes_in(), allowed_bytes.len() as u64);
}

data_path_test!(port_range_offsets);
/// `port = "A-(A+2)"`, `to = "127.0.0.1:U"`: host port A+i reaches upstream port U+i.
fn port_range_offsets(backend: Backend) {
    let upstreams: Vec<Upstream> = listeners_in_a_row(3)
        .into_iter()
        .enumerate()
        .map(|(i, l)| Upstream::reply_on(l, format!("upstream #{i}").into_bytes()))
        .collect();
    let host = free_ports_in_a_row(3);
    let range = format!("\"{}-{}\"", host, host + 2);
    let toml = relay_section(None, "") + &map_section(&range, upstreams[0].addr(), "range", "");
    let relay = Relay::start(&toml, backend);
    for (i, upstream) in upstreams.iter().enumerate() {
        let port = host + i as u16;
        let mut conn = connect(port);
        let reply = read_to_end(&mut conn);
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("upstream #{i}"),
            "host port {port}"
        );
        drop(conn);
        let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
        line.assert_closed_fields(port, "range", upstream.addr());
    }
    for upstream in &upstreams {
        assert_eq!(upstream.accepted(), 1, "upstream {}", upstream.addr());
    }
}

data_path_test!(sigterm_drains_live_connection);
/// SIGTERM with a live connection: the relay stops serving new connections, keeps the
/// live one working, and exits 0 as soon as it closes (long before shutdown_grace).
fn sigterm_drains_live_connection(backend: Backend) {
    let echo = Upstream::echo();
    let (mut relay, port) = relay_one(echo.addr(), "drain", "shutdown_grace = \"30s\"", backend);
    let mut live = connect(port);
    roundtrip(&mut live, b"before SIGTERM");

    relay.sigterm();
    // Listeners close at once: a connect is refused (ECONNREFUSED) within AT_ONCE.
    let sent = Instant::now();
    let refused = poll(AT_ONCE, Duration::from_millis(5), || {
        let addr = SocketAddr::from((LOCALHOST, port));
        match TcpStream::connect_timeout(&addr, AT_ONCE) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    });
    assert!(
        refused.is_some(),
        "connects to the listener still not refused {:?} after SIGTERM",
        sent.elapsed()
    );
    eprintln!("listener closed {:?} after SIGTERM", sent.elapsed());
    assert!(
        relay.exited().is_none(),
        "the relay exited while a connection was live"
    );
    roundtrip(&mut live, b"after SIGTERM, still relayed");

    drop(live);
    let status = relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let line = relay.wait_log(
        |l| l.is_closed_on(port) && l.u64("bytes_client_to_upstream") > Some(4),
        Duration::from_secs(1),
    );
    assert_eq!(line.reason(), "client_eof", "{line}");
}

data_path_test!(sigterm_grace_expires);
/// SIGTERM with a connection that stays open: after shutdown_grace (1s) the relay
/// closes it, logs reason "shutdown" and exits 0.
fn sigterm_grace_expires(backend: Backend) {
    let echo = Upstream::echo();
    let (mut relay, port) = relay_one(echo.addr(), "grace", "shutdown_grace = \"1s\"", backend);
    let mut live = connect(port);
    roundtrip(&mut live, b"before SIGTERM");

    relay.sigterm();
    let (_, took) = expect_closed(&mut live, Duration::from_secs(8));
    assert!(
        took >= Duration::from_millis(800),
        "the live connection was closed after {took:?}, before shutdown_grace (1s)"
    );
    let status = relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(1));
    assert_eq!(line.reason(), "shutdown", "{line}");
}

data_path_test!(sigterm_logs_every_close);
/// Every connection closed at shutdown has its close line in the log when the relay has
/// exited: the event loops write their lines out in batches, and none is lost at the end.
fn sigterm_logs_every_close(backend: Backend) {
    const CONNECTIONS: usize = 200;
    let echo = Upstream::echo();
    let (mut relay, port) = relay_one(echo.addr(), "many", "shutdown_grace = \"1s\"", backend);
    let mut live: Vec<TcpStream> = (0..CONNECTIONS).map(|_| connect(port)).collect();
    for (i, c) in live.iter_mut().enumerate() {
        roundtrip(c, format!("connection {i}").as_bytes());
    }
    relay.sigterm();
    let status = relay.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let closed = relay.wait_logs(
        |l| l.is_closed_on(port),
        CONNECTIONS,
        Duration::from_secs(5),
    );
    assert!(
        closed.iter().all(|l| l.reason() == "shutdown"),
        "close reasons at shutdown: {:?}",
        closed.iter().map(|l| l.reason()).collect::<Vec<_>>()
    );
    drop(live);
}

data_path_test!(limits_refuse_at_once);
/// `max_connections` of a mapping and of the whole relay: past the cap a connection is reset
/// at once (never left waiting in the accept queue), logged as rejected (limit), and once a
/// connection ends a new one is served again.
fn limits_refuse_at_once(backend: Backend) {
    let echo = Upstream::echo();
    let [capped, other] = free_ports::<2>();
    let toml = relay_section(None, "max_connections = 3")
        + &map_section(capped, echo.addr(), "capped", "max_connections = 2")
        + &map_section(other, echo.addr(), "other", "");
    let relay = Relay::start(&toml, backend);

    let mut first = connect(capped);
    roundtrip(&mut first, b"one");
    let mut second = connect(capped);
    roundtrip(&mut second, b"two");
    for send in [&b""[..], b"three"] {
        let took = connect_expect_reset(LOCALHOST, capped, send);
        eprintln!("refused (limit) after {took:?}");
    }
    let line = relay.wait_log(|l| l.is_rejected_on(capped), Duration::from_secs(5));
    assert_eq!(line.text("reason"), "limit", "{line}");

    // The relay-wide cap (3): one more on the other mapping fits, the next does not.
    let mut third = connect(other);
    roundtrip(&mut third, b"relay-wide third");
    connect_expect_reset(LOCALHOST, other, b"fourth");
    let line = relay.wait_log(|l| l.is_rejected_on(other), Duration::from_secs(5));
    assert_eq!(line.text("reason"), "limit", "{line}");

    // Freed slots are reused.
    drop(first);
    relay.wait_log(|l| l.is_closed_on(capped), Duration::from_secs(5));
    let mut again = connect(capped);
    roundtrip(&mut again, b"a slot came free");
    // The refused connections' bytes never reached the upstream.
    let served = ["one", "two", "relay-wide third", "a slot came free"];
    assert_eq!(echo.accepted(), served.len(), "upstream connections");
    assert_eq!(
        echo.bytes_in(),
        served.iter().map(|s| s.len() as u64).sum::<u64>(),
        "bytes at the upstream: only the served connections'"
    );
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

data_path_test!(accept_backs_off_at_fd_limit);
/// At the open-file limit (EMFILE on accept or on the upstream socket) the relay backs off
/// instead of spinning or exiting, and loses no client: connections past the limit wait in
/// the listen queue, unserved (none of their bytes reaches the upstream, none is answered,
/// refused or closed), and each is served once a held connection ends and frees the two
/// descriptors it needs.
fn accept_backs_off_at_fd_limit(backend: Backend) {
    use std::collections::BTreeSet;
    const HELD: usize = 4;
    const WAITING: usize = 6;
    let echo = Upstream::echo();
    let (relay, port) = relay_one(echo.addr(), "fds", "", backend);
    let pid = relay.pid();
    // RLIMIT_NOFILE bounds descriptor numbers, and a new descriptor takes the lowest free
    // number: the room left is the run of free numbers below the limit, not the count of
    // open descriptors (one inherited far above the limit is counted but never in the way).
    let open_fds = || -> BTreeSet<usize> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    let lowest_free = |open: &BTreeSet<usize>| (0..).find(|n| !open.contains(n)).unwrap();
    let fd_table = || {
        let mut table = String::new();
        for fd in open_fds() {
            let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"));
            table += &format!("\n  {fd} -> {:?}", link.map(|l| l.display().to_string()));
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let nofile = limits.lines().find(|l| l.starts_with("Max open files"));
        format!("{nofile:?}{table}")
    };
    let before = open_fds();
    let first = lowest_free(&before);
    // Room for the held connections (2 fds each), then EMFILE.
    let limit = first + 2 * HELD;
    assert!(
        before.range(first..limit).next().is_none(),
        "descriptors {first}..{limit} of the relay must be free: {}",
        fd_table()
    );
    let table_before = fd_table();
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");

    let mut held = Vec::new();
    for i in 0..HELD {
        let mut c = connect(port);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let sent = format!("held {i}");
        let mut back = vec![0u8; sent.len()];
        if let Err(e) = c
            .write_all(sent.as_bytes())
            .and_then(|()| c.read_exact(&mut back))
        {
            panic!(
                "held connection {i} of {HELD} (limit {limit}): {e}\nthe relay's fds before \
                 the limit: {table_before}\nnow: {}",
                fd_table()
            );
        }
        assert_eq!(back, sent.as_bytes(), "held connection {i}");
        held.push(c);
    }
    // The held connections and the loops' next upstream sockets take every descriptor
    // left. A loop whose next socket found no free number (another thread of the relay
    // held one for a moment) makes it on its 100 ms retry: waited for, bounded.
    let filled = poll(Duration::from_secs(3), Duration::from_millis(20), || {
        (lowest_free(&open_fds()) >= limit).then_some(())
    });
    assert!(
        filled.is_some(),
        "the held connections use every descriptor left: {}",
        fd_table()
    );
    assert_eq!(lowest_free(&open_fds()), limit, "{}", fd_table());
    let held_bytes = echo.bytes_in();
    // These wait in the listen queue: the relay is out of descriptors.
    let mut waiting: Vec<TcpStream> = (0..WAITING)
        .map(|i| {
            let mut c = connect(port);
            c.write_all(format!("waiting {i}").as_bytes())
                .unwrap_or_else(|e| panic!("write while waiting {i}: {e}"));
            c
        })
        .collect();
    let before = cpu_seconds(pid);
    let started = Instant::now();
    poll(Duration::from_secs(1), Duration::from_millis(100), || {
        (started.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.5,
        "the relay used {spent:.2} CPU-s in 1 s at its fd limit: it spins instead of backing off"
    );
    assert!(relay_alive(pid), "the relay exited at its fd limit");
    // The limit was hit: accepts failed with EMFILE.
    let hit = relay
        .log_lines()
        .iter()
        .any(|l| l.msg() == "accept failed; backing off" && l.raw.contains("os error 24"));
    assert!(
        hit,
        "no EMFILE in the log at the fd limit: {:?}",
        relay.logs()
    );
    // Not served: nothing reached the upstream, nothing came back, nothing was refused.
    assert_eq!(
        echo.accepted(),
        HELD,
        "upstream connections at the fd limit"
    );
    assert_eq!(
        echo.bytes_in(),
        held_bytes,
        "bytes of waiting connections reached the upstream"
    );
    for (i, c) in waiting.iter_mut().enumerate() {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "waiting connection {i} at the fd limit: read {other:?}, expected nothing \
                 (it waits in the listen queue)"
            ),
        }
        c.set_nonblocking(false).unwrap();
    }

    // Each held connection that ends makes room for one waiting connection: served in
    // turn, each closed once it is, so that the next has room.
    drop(held);
    for (i, mut c) in waiting.into_iter().enumerate() {
        let want = format!("waiting {i}");
        let mut back = vec![0u8; want.len()];
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut back).unwrap_or_else(|e| {
            panic!(
                "waiting connection {i} after the held ones ended: {e}\nthe relay's fds: {}",
                fd_table()
            )
        });
        assert_eq!(back, want.as_bytes(), "waiting connection {i}");
    }
    assert_eq!(echo.accepted(), HELD + WAITING, "upstream connections");
    let refused: Vec<String> = relay
        .log_lines()
        .iter()
        .filter(|l| l.is_rejected_on(port))
        .map(|l| l.raw.clone())
        .collect();
    assert!(refused.is_empty(), "refused at the fd limit: {refused:?}");
}

fn relay_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The relay's sockets and pipes, by fd link text ("socket:[inode]", "pipe:[inode]").
pub(crate) fn socket_and_pipe_fds(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().to_string())
        .filter(|t| t.starts_with("socket:") || t.starts_with("pipe:"))
        .collect()
}

/// The relay's io-wq worker threads ("iou-wrk-*", which a splice submitted to io_uring
/// would use).
fn io_wq_workers(pid: u32) -> Vec<String> {
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read the relay's tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("iou-wrk") {
            workers.push(comm.trim().to_string());
        }
    }
    workers
}

/// The sockets and pipes the relay opened since `baseline` (its connections and pool
/// pipes, not stdio or its signal pipe), and those of them that lack O_NONBLOCK. An fd
/// whose flags cannot be read must have been closed meanwhile (its link is gone or names
/// another file); anything else fails.
fn new_fds(pid: u32, baseline: &std::collections::HashSet<String>) -> (Vec<String>, Vec<String>) {
    let mut new = Vec::new();
    let mut blocking = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the relay's fds")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue; // closed since the listing
        };
        let target = target.to_string_lossy().to_string();
        if !(target.starts_with("socket:") || target.starts_with("pipe:"))
            || baseline.contains(&target)
        {
            continue;
        }
        let name = fd.file_name().to_string_lossy().to_string();
        let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{name}"))
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        let Some(flags) = flags else {
            let now = std::fs::read_link(fd.path()).map(|t| t.to_string_lossy().to_string());
            assert!(
                now.ok().as_deref() != Some(target.as_str()),
                "fd {name} ({target}) is open but its flags cannot be read"
            );
            continue;
        };
        if flags & libc::O_NONBLOCK as u32 == 0 {
            blocking.push(format!("fd {name} ({target})"));
        }
        new.push(target);
    }
    (new, blocking)
}

/// While bytes flow both ways through one connection, the relay has no io-wq worker
/// thread and every socket and pipe it holds is non-blocking; returns the most pipe fds
/// seen at once (besides `baseline`'s) over 32 echoes of 1 MiB.
fn watch_bulk_echo(pid: u32, port: u16, baseline: &std::collections::HashSet<String>) -> usize {
    let mut conn = connect(port);
    let chunk = random_bytes(1 << 20);
    let mut most_pipes = 0;
    let mut most_sockets = 0;
    for _ in 0..32 {
        conn.write_all(&chunk).expect("write");
        let mut back = vec![0u8; chunk.len()];
        // Look while the echo is in flight through the relay.
        let workers = io_wq_workers(pid);
        assert!(
            workers.is_empty(),
            "io-wq workers while relaying: {workers:?}"
        );
        let (new, blocking) = new_fds(pid, baseline);
        assert!(
            blocking.is_empty(),
            "blocking fds while relaying: {blocking:?}"
        );
        most_pipes = most_pipes.max(new.iter().filter(|t| t.starts_with("pipe:")).count());
        most_sockets = most_sockets.max(new.iter().filter(|t| t.starts_with("socket:")).count());
        conn.read_exact(&mut back).expect("read the echo");
        assert!(back == chunk, "echo differs");
    }
    // The client and upstream sockets were looked at.
    assert!(most_sockets >= 2, "saw at most {most_sockets} new sockets");
    most_pipes
}

data_path_test!(no_io_wq_threads_no_blocking_fds);
/// While bytes flow both ways, the relay has no io-wq worker thread (nothing it submits to
/// io_uring runs on one: no IORING_OP_SPLICE), every socket and pipe it holds is
/// non-blocking, and the bytes are spliced: pipes are open during the transfer and pooled
/// after it. Then 100 connections that each moved 256 KiB and went idle hold no pipe
/// (none in use, no more pipe fds than the pool's) and no io-wq worker.
fn no_io_wq_threads_no_blocking_fds(backend: Backend) {
    let echo = Upstream::echo();
    let [port, metrics] = free_ports::<2>();
    let toml = relay_section(Some(metrics), "") + &map_section(port, echo.addr(), "nowq", "");
    let relay = Relay::start(&toml, backend);
    let pid = relay.pid();
    let baseline = socket_and_pipe_fds(pid);
    let most_pipes = watch_bulk_echo(pid, port, &baseline);
    assert!(
        most_pipes >= 2,
        "no pipe (2 fds) open while 32 MiB were echoed: the bytes were not spliced"
    );
    let (in_use, idle) = pipes(metrics);
    assert!(
        in_use == 0.0 && idle >= 1.0,
        "after the transfer the pipes are pooled: in_use {in_use}, idle {idle}"
    );

    // 100 connections, each moves 256 KiB (spliced) and then stays open, idle.
    let mut idle_conns = Vec::new();
    let burst = random_bytes(256 << 10);
    for _ in 0..100 {
        let mut c = connect(port);
        roundtrip(&mut c, &burst);
        idle_conns.push(c);
    }
    let settled = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        let (in_use, idle) = pipes(metrics);
        (in_use == 0.0).then_some(idle)
    });
    let Some(idle) = settled else {
        panic!(
            "pipes in use with 100 idle connections: {:?}",
            pipes(metrics)
        );
    };
    let (new, _) = new_fds(pid, &baseline);
    let pipe_fds = new.iter().filter(|t| t.starts_with("pipe:")).count();
    assert!(
        pipe_fds as f64 <= 2.0 * idle,
        "{pipe_fds} pipe fds with 100 idle connections, but only {idle} pipes pooled"
    );
    let workers = io_wq_workers(pid);
    assert!(
        workers.is_empty(),
        "io-wq workers with 100 idle connections: {workers:?}"
    );
    for c in idle_conns.iter_mut().take(3) {
        roundtrip(c, b"still relayed after idling");
    }
}

data_path_test!(copy_path_only_when_forced);
/// With `max_pipes = 0` the same bulk echo is copied: no pipe is ever open, none pooled.
fn copy_path_only_when_forced(backend: Backend) {
    let echo = Upstream::echo();
    let [port, metrics] = free_ports::<2>();
    let toml = relay_section(Some(metrics), "max_pipes = 0")
        + &map_section(port, echo.addr(), "copied", "");
    let relay = Relay::start(&toml, backend);
    let pid = relay.pid();
    let baseline = socket_and_pipe_fds(pid);
    let most_pipes = watch_bulk_echo(pid, port, &baseline);
    assert_eq!(most_pipes, 0, "pipes open with max_pipes = 0");
    assert_eq!(pipes(metrics), (0.0, 0.0), "pipes with max_pipes = 0");
}

data_path_test!(idle_timeout_closes_only_idle);
/// `idle_timeout`: a connection with no bytes either way for that long is closed (reason
/// "idle"); one that keeps talking is not.
fn idle_timeout_closes_only_idle(backend: Backend) {
    let echo = Upstream::echo();
    let (relay, port) = relay_one(echo.addr(), "idle", "idle_timeout = \"400ms\"", backend);
    let mut busy = connect(port);
    let mut quiet = connect(port);
    roundtrip(&mut quiet, b"then silence");
    let started = Instant::now();
    // The busy one talks every 100 ms for 1.5 s: well past the timeout.
    while started.elapsed() < Duration::from_millis(1500) {
        roundtrip(&mut busy, b"still here");
        poll(
            Duration::from_millis(100),
            Duration::from_millis(100),
            || None::<()>,
        );
    }
    let (_, _) = expect_closed(&mut quiet, Duration::from_secs(3));
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(5));
    assert_eq!(line.reason(), "idle", "{line}");
    assert!(
        line.num("duration_ms") >= 400,
        "closed before idle_timeout: {line}"
    );
    roundtrip(&mut busy, b"the busy one survived");
}

/// The `ss -tno` lines of established sockets whose local port is `port`.
fn sockets_on_local_port(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tno", "state", "established"])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|local| local.ends_with(&format!(":{port}")))
        })
        .map(str::to_string)
        .collect()
}

/// The seconds left on the keepalive timer of an `ss -tno` line. ss prints the time as
/// `[Mmin][S(sec|.)][MMMms]`: `timer:(keepalive,6.992ms,0)` is 6.992 s, `59sec`, `1min2sec`,
/// `850ms`. Panics when the line has no keepalive timer.
fn keepalive_left(line: &str) -> f64 {
    let timer = line
        .split("timer:(keepalive,")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .unwrap_or_else(|| panic!("no keepalive timer: {line}"));
    let bad = || -> ! { panic!("keepalive timer {timer:?} not understood: {line}") };
    let number = |n: &str| n.parse::<f64>().unwrap_or_else(|_| bad());
    let mut rest = timer;
    let mut secs = 0.0;
    if let Some((m, after)) = rest.split_once("min") {
        secs += 60.0 * number(m);
        rest = after;
    }
    if let Some((s, after)) = rest.split_once("sec") {
        secs += number(s);
        rest = after;
    } else if let Some((s, after)) = rest.split_once('.') {
        secs += number(s);
        rest = after;
    }
    if let Some(ms) = rest.strip_suffix("ms") {
        secs += number(ms) / 1000.0;
        rest = "";
    }
    if !rest.is_empty() {
        bad();
    }
    secs
}

#[test]
fn keepalive_timer_formats() {
    let line = |t: &str| format!("0 0 127.0.0.1:1 127.0.0.1:2 timer:(keepalive,{t},0)");
    assert_eq!(keepalive_left(&line("6.992ms")), 6.992);
    assert_eq!(keepalive_left(&line("59sec")), 59.0);
    assert_eq!(keepalive_left(&line("1min2sec")), 62.0);
    assert_eq!(keepalive_left(&line("850ms")), 0.85);
    assert_eq!(keepalive_left(&line("119min")), 7140.0);
}

data_path_test!(keepalive_on_both_sides);
/// `tcp_keepalive = "7s"` arms a keepalive timer of 7 s on the relay's client-side socket
/// (inherited from the listener) and on its upstream socket: the time left is at most 7 s
/// and at least 7 s minus the time since the connection began (and a margin).
fn keepalive_on_both_sides(backend: Backend) {
    const KEEPALIVE: f64 = 7.0;
    let echo = Upstream::echo();
    let (_relay, port) = relay_one(echo.addr(), "ka", "tcp_keepalive = \"7s\"", backend);
    let began = Instant::now();
    let mut conn = connect(port);
    roundtrip(&mut conn, b"keepalive");
    let client_side = sockets_on_local_port(port);
    assert_eq!(
        client_side.len(),
        1,
        "relay's client-side socket: {client_side:?}"
    );
    let relay_port_of_upstream_conn: Vec<String> =
        sockets_on_local_port(echo.port()).into_iter().collect();
    // The echo's accepted socket has the upstream connection's peer: find the relay's end.
    assert_eq!(
        relay_port_of_upstream_conn.len(),
        1,
        "{relay_port_of_upstream_conn:?}"
    );
    let peer = relay_port_of_upstream_conn[0]
        .split_whitespace()
        .nth(3)
        .expect("peer column")
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let upstream_side = sockets_on_local_port(peer);
    assert_eq!(
        upstream_side.len(),
        1,
        "relay's upstream socket: {upstream_side:?}"
    );
    let elapsed = began.elapsed().as_secs_f64();
    for (side, line) in [("client", &client_side[0]), ("upstream", &upstream_side[0])] {
        let left = keepalive_left(line);
        assert!(
            left <= KEEPALIVE && left >= KEEPALIVE - elapsed - 1.0,
            "{side} side: keepalive timer {left} s, configured {KEEPALIVE} s ({elapsed:.2} s \
             since the connect): {line}"
        );
    }
}

#[test]
/// A relay that could open none of its listeners at start serves nothing: it exits 1 (so a
/// supervisor sees a failed start) after naming the port and the reason. (Some ports
/// failing is reported and retried at each reload instead: `reload::port_in_use_reported`.)
fn start_without_any_listener_fails() {
    let held = listeners_in_a_row(1);
    let port = held[0].local_addr().unwrap().port();
    let toml =
        relay_section(None, "") + &map_section(port, SocketAddr::from((LOCALHOST, 22)), "busy", "");
    let file = crate::util::ControlFile::new(&toml);
    let (status, stderr) = file.run_expecting_exit(&["--io-backend", "epoll"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen") && stderr.contains(&format!(":{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("no listener could be opened"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// Resets, the pipe pool, the backend choice

/// A relay with one mapping to a listener the test accepts on itself (so that it holds
/// the upstream end of each connection), metrics on a free port; `relay_extra` goes into
/// `[relay]`. Returns the relay, its host port, the upstream listener and the metrics port.
fn relay_to_held(
    name: &str,
    relay_extra: &str,
    start: Start,
    backend: Backend,
) -> (Relay, u16, TcpListener, u16) {
    let upstream = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    let [port, metrics] = free_ports::<2>();
    let toml = relay_section(Some(metrics), relay_extra)
        + &map_section(port, upstream.local_addr().unwrap(), name, "");
    (
        Relay::start_with(&toml, backend, start),
        port,
        upstream,
        metrics,
    )
}

/// A connection through the relay's `port` and its upstream end (accepted from
/// `upstream`), checked with one exchange each way.
fn held_pair(port: u16, upstream: &TcpListener) -> (TcpStream, TcpStream) {
    let mut client = connect(port);
    let mut far = accept_within(upstream, Duration::from_secs(5));
    client.write_all(b"ping").expect("client write");
    let mut got = [0u8; 4];
    far.read_exact(&mut got).expect("upstream read");
    assert_eq!(&got, b"ping");
    far.write_all(b"pong").expect("upstream write");
    client.read_exact(&mut got).expect("client read");
    assert_eq!(&got, b"pong");
    (client, far)
}

/// How long a peer may take to see the reset the relay passes on.
const RESET_WITHIN: Duration = Duration::from_secs(1);

data_path_test!(reset_on_one_side_resets_the_other);
/// An idle connection whose upstream resets: the client gets an RST (ECONNRESET, not a
/// FIN) at once, and the relay logs reason `reset`. The same with the client resetting:
/// the upstream gets the RST.
fn reset_on_one_side_resets_the_other(backend: Backend) {
    let (relay, port, upstream, _) = relay_to_held("rst", "", Start::default(), backend);

    let (mut client, far) = held_pair(port, &upstream);
    reset(far);
    let took = expect_reset(&mut client, RESET_WITHIN);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(5));
    assert_eq!(line.reason(), "reset", "the upstream reset: {line}");
    eprintln!("upstream reset: the client got its RST after {took:?}");

    let (client, mut far) = held_pair(port, &upstream);
    reset(client);
    let took = expect_reset(&mut far, RESET_WITHIN);
    let lines = relay.wait_logs(|l| l.is_closed_on(port), 2, Duration::from_secs(5));
    assert_eq!(lines[1].reason(), "reset", "the client reset: {}", lines[1]);
    eprintln!("client reset: the upstream got its RST after {took:?}");
}

/// `portrelay_pipes` as (in_use, idle).
fn pipes(metrics: u16) -> (f64, f64) {
    let s = Scrape::take(metrics);
    (
        s.value("portrelay_pipes", &[("state", "in_use")]),
        s.value("portrelay_pipes", &[("state", "idle")]),
    )
}

/// Waits until `portrelay_pipes` reads `want` (in_use, idle); panics with what it read.
fn wait_pipes(metrics: u16, want: (f64, f64), what: &str) {
    let mut last = (f64::NAN, f64::NAN);
    let seen = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        last = pipes(metrics);
        (last == want).then_some(())
    });
    assert!(
        seen.is_some(),
        "{what}: portrelay_pipes (in_use, idle) is {last:?}, expected {want:?}"
    );
}

/// One loop with a pool of one pipe: which connection gets the pipe is then certain.
const ONE_PIPE: &str = "max_pipes = 1";

/// A bulk upload whose upstream end does not read: a thread writes until the path is
/// full, so the relay's direction holds bytes in its (only) pipe.
struct Stall {
    client: TcpStream,
    far: TcpStream,
    writer: std::thread::JoinHandle<()>,
}

impl Stall {
    /// Starts the upload and returns once the writer has made no progress for 300 ms and
    /// the relay holds one pipe, in use. A direction that stalled while it held a buffer
    /// (it was on the copy path for a moment) is moved on by letting 256 KiB through.
    fn start(port: u16, upstream: &TcpListener, metrics: u16) -> Stall {
        let (client, mut far) = held_pair(port, upstream);
        let sent = Arc::new(AtomicUsize::new(0));
        let mut writer = client.try_clone().unwrap();
        let progress = sent.clone();
        let writer = std::thread::spawn(move || {
            let chunk = vec![0x5a_u8; 64 * 1024];
            // Bounded: 64 KiB writes up to 1 GiB; ends when the socket is shut down.
            for _ in 0..16 * 1024 {
                match writer.write(&chunk) {
                    Ok(n) => progress.fetch_add(n, Ordering::SeqCst),
                    Err(_) => return,
                };
            }
        });
        for _ in 0..40 {
            let before = sent.load(Ordering::SeqCst);
            let at = Instant::now();
            poll(
                Duration::from_millis(300),
                Duration::from_millis(50),
                || (at.elapsed() >= Duration::from_millis(300)).then_some(()),
            );
            if sent.load(Ordering::SeqCst) != before {
                continue;
            }
            if pipes(metrics) == (1.0, 0.0) {
                return Stall {
                    client,
                    far,
                    writer,
                };
            }
            let mut let_through = vec![0u8; 256 << 10];
            far.read_exact(&mut let_through)
                .expect("let 256 KiB of the stalled upload through");
        }
        panic!(
            "the upload never stalled with its pipe in use: portrelay_pipes {:?}, {} bytes sent",
            pipes(metrics),
            sent.load(Ordering::SeqCst)
        );
    }

    /// Ends the upload: the writer thread stops, the client half-closes.
    fn stop_writing(&self) {
        let _ = self.client.shutdown(Shutdown::Write);
    }
}

data_path_test!(pipe_with_bytes_is_never_reused);
/// `max_pipes = 1`, one loop: a bulk upload stalls (its upstream does not read), so the
/// pipe holds its bytes; then that upstream resets. The pipe is closed, not pooled (no
/// idle pipe), and a second connection's upload of 4 MiB reaches its upstream exactly,
/// with nothing of the first connection's bytes, spliced through a new pipe.
fn pipe_with_bytes_is_never_reused(backend: Backend) {
    let (relay, port, upstream, metrics) =
        relay_to_held("dirty", ONE_PIPE, Start::default().threads(1), backend);
    let stall = Stall::start(port, &upstream, metrics);
    reset(stall.far);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(5));
    assert_eq!(line.reason(), "reset", "{line}");
    wait_pipes(
        metrics,
        (0.0, 0.0),
        "the pipe that held bytes when its connection died is closed, not pooled",
    );
    stall.client.shutdown(Shutdown::Both).ok();
    stall.writer.join().expect("writer thread");

    // The second connection: its upstream must get exactly its bytes.
    let payload = random_bytes(1 << 20);
    let digest = Upstream::digest_then(payload.clone());
    let second = free_port();
    let toml = std::fs::read_to_string(relay.config_path()).unwrap()
        + &map_section(second, digest.addr(), "clean", "");
    relay.rewrite(&toml);
    relay.wait_reloaded(2, Duration::from_secs(10));
    check_half_close(second, &payload);
    assert_eq!(digest.bytes_in(), HALF_CLOSE_SEND as u64);
    wait_pipes(
        metrics,
        (0.0, 1.0),
        "the second connection spliced through a new pipe",
    );
}

data_path_test!(pipe_pool_runs_dry);
/// `max_pipes = 1`, one loop. While a stalled upload holds the only pipe, a connection
/// moving 4 MiB each way at once through an echo finds the pool dry and copies: its bytes
/// arrive exact and it takes no pipe. Once the stall ends the pipe is pooled; a
/// connection moving 4 MiB each way again shares the one pipe between its two directions
/// (the pool is dry for one of them, mid-connection), and ends with it pooled.
fn pipe_pool_runs_dry(backend: Backend) {
    let echo = Upstream::echo();
    let (relay, port, upstream, metrics) =
        relay_to_held("dry", ONE_PIPE, Start::default().threads(1), backend);
    let echo_port = free_port();
    let toml = std::fs::read_to_string(relay.config_path()).unwrap()
        + &map_section(echo_port, echo.addr(), "echo", "");
    relay.rewrite(&toml);
    relay.wait_reloaded(2, Duration::from_secs(10));

    let mut stall = Stall::start(port, &upstream, metrics);
    bulk_echo(echo_port, 4 << 20);
    assert_eq!(
        pipes(metrics),
        (1.0, 0.0),
        "a connection that ran while the pool was dry took a pipe"
    );

    // End the stall: the client half-closes, the upstream reads everything, then closes.
    stall.stop_writing();
    let mut sink = vec![0u8; 1 << 20];
    while read_some(&mut stall.far, &mut sink).expect("drain the stalled upload") > 0 {}
    let Stall {
        client,
        far,
        writer,
        ..
    } = stall;
    writer.join().expect("writer thread");
    drop((client, far));
    wait_pipes(
        metrics,
        (0.0, 1.0),
        "the stalled connection gave its pipe back",
    );

    bulk_echo(echo_port, 4 << 20);
    wait_pipes(metrics, (0.0, 1.0), "one pipe, pooled again after the echo");
}

/// Writes `size` random bytes to an echo through `port` on one thread while reading the
/// echo back on another; the echo must equal what was sent.
fn bulk_echo(port: u16, size: usize) {
    let data = random_bytes(size);
    let mut conn = connect(port);
    let mut writer = conn.try_clone().unwrap();
    let sent = data.clone();
    let write = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write the bulk echo");
        writer.shutdown(Shutdown::Write).expect("shutdown(Write)");
    });
    let back = read_to_end(&mut conn);
    write.join().expect("writer thread");
    assert!(
        back.len() == data.len() && back == data,
        "the echo of {size} bytes differs ({} bytes back)",
        back.len()
    );
}

#[test]
/// `--io-backend auto` under a seccomp filter that fails `io_uring_setup` with EPERM (as
/// Docker's default profile does): one warning line says io_uring is unavailable and why,
/// `ready` and `portrelay_io_backend_info` name epoll, and it relays. Without the filter
/// `auto` takes io_uring where this machine has it, with no such line.
fn auto_backend_falls_back_to_epoll_under_seccomp() {
    let is_fallback = |l: &LogLine| l.msg() == "io_uring unavailable; using the epoll backend";
    let echo = Upstream::echo();
    let [port, metrics] = free_ports::<2>();
    let toml = relay_section(Some(metrics), "") + &map_section(port, echo.addr(), "auto", "");
    let relay = Relay::start_with(
        &toml,
        Backend::Epoll,
        Start {
            io_backend: Some("auto"),
            deny_io_uring: true,
            ..Start::default()
        },
    );
    let fallbacks: Vec<LogLine> = relay.log_lines().into_iter().filter(is_fallback).collect();
    assert_eq!(fallbacks.len(), 1, "one fallback line: {:?}", relay.logs());
    let line = &fallbacks[0];
    assert_eq!(line.str("level"), Some("WARN"), "{line}");
    assert!(
        line.text("error").contains("Operation not permitted"),
        "the line says why (EPERM from the seccomp filter): {line}"
    );
    let s = Scrape::take(metrics);
    assert_eq!(
        s.get("portrelay_io_backend_info", &[("backend", "epoll")]),
        Some(1.0)
    );
    assert_eq!(
        s.get("portrelay_io_backend_info", &[("backend", "uring")]),
        None
    );
    let mut conn = connect(port);
    roundtrip(&mut conn, b"relayed on the fallback");
    drop(relay);

    let expected = match Backend::Uring.unavailable() {
        None => Backend::Uring,
        Some(_) => Backend::Epoll,
    };
    let relay = Relay::start_with(
        &toml,
        expected,
        Start {
            io_backend: Some("auto"),
            ..Start::default()
        },
    );
    if expected == Backend::Uring {
        assert!(
            !relay.log_lines().iter().any(is_fallback),
            "a fallback line without a filter: {:?}",
            relay.logs()
        );
    }
    let mut conn = connect(port);
    roundtrip(&mut conn, b"relayed on the backend auto chose");
}
