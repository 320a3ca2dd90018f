//! The data path with raw TCP clients and in-process upstreams: half-close, many
//! connections at once, upstreams that refuse or never answer, `allow`, port ranges, and
//! SIGTERM. Each `check_*` client also runs straight against its upstream in `harness`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::files::{random_bytes, sha256};
use crate::util::net::{
    connect, connect_expect_closed, connect_from, expect_closed, free_port, free_ports_in_a_row,
    listeners_in_a_row, read_to_end, roundtrip, BlackHole, Upstream, LOCALHOST,
};
use crate::util::relay::{data_path_test, map_section, relay_section};
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

    let (_, took) = connect_expect_closed(LOCALHOST, dead_host, b"", Duration::from_secs(5));
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
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

    connect_expect_closed(
        Ipv4Addr::new(127, 0, 0, 1),
        port,
        b"must not reach the upstream",
        Duration::from_secs(5),
    );
    let line = relay.wait_log(|l| l.is_rejected_on(port), Duration::from_secs(5));
    assert_eq!(line.text("reason"), "acl", "{line}");
    assert!(line.text("client").starts_with("127.0.0.1:"), "{line}");

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

/// Whether a new connection to `port` is still served (its bytes echoed). Refused, closed,
/// reset or left unanswered all count as "not served".
fn serves_new_connection(port: u16) -> bool {
    let addr = SocketAddr::from((LOCALHOST, port));
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if conn.write_all(b"ping").is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).is_ok() && &back == b"ping"
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
    let stopped = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        (!serves_new_connection(port)).then_some(())
    });
    assert!(
        stopped.is_some(),
        "new connections still served 10 s after SIGTERM"
    );
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
    let (_, took) = connect_expect_closed(LOCALHOST, capped, b"three", Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    let line = relay.wait_log(|l| l.is_rejected_on(capped), Duration::from_secs(5));
    assert_eq!(line.text("reason"), "limit", "{line}");

    // The relay-wide cap (3): one more on the other mapping fits, the next does not.
    let mut third = connect(other);
    roundtrip(&mut third, b"relay-wide third");
    connect_expect_closed(LOCALHOST, other, b"fourth", Duration::from_secs(5));
    let line = relay.wait_log(|l| l.is_rejected_on(other), Duration::from_secs(5));
    assert_eq!(line.text("reason"), "limit", "{line}");

    // Freed slots are reused.
    drop(first);
    relay.wait_log(|l| l.is_closed_on(capped), Duration::from_secs(5));
    let mut again = connect(capped);
    roundtrip(&mut again, b"a slot came free");
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
/// instead of spinning or exiting, and serves again once connections end.
fn accept_backs_off_at_fd_limit(backend: Backend) {
    let echo = Upstream::echo();
    let (relay, port) = relay_one(echo.addr(), "fds", "", backend);
    let pid = relay.pid();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // Room for a handful of connections (2 fds each), then EMFILE.
    let limit = open_fds() + 8;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");

    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = connect(port);
        roundtrip(&mut c, format!("held {i}").as_bytes());
        held.push(c);
    }
    // These wait in the accept queue or are refused: the relay is out of descriptors.
    let waiting: Vec<_> = (0..6)
        .filter_map(|_| {
            let c = crate::util::net::try_connect_from(LOCALHOST, port).ok()?;
            c.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
            Some(c)
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

    drop(waiting);
    drop(held);
    let served = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let mut c = crate::util::net::try_connect_from(LOCALHOST, port).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        c.write_all(b"after").ok()?;
        let mut back = [0u8; 5];
        c.read_exact(&mut back).ok()?;
        (&back == b"after").then_some(())
    });
    assert!(
        served.is_some(),
        "not serving again after connections ended"
    );
}

fn relay_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The relay's sockets and pipes, by fd link text ("socket:[inode]", "pipe:[inode]").
fn socket_and_pipe_fds(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().to_string())
        .filter(|t| t.starts_with("socket:") || t.starts_with("pipe:"))
        .collect()
}

/// What the relay holds while it relays: io-wq worker threads ("iou-wrk-*", which a splice
/// submitted to io_uring would use), and the sockets and pipes it opened since `baseline`
/// (its connections and pool pipes, not stdio or its signal pipe) that lack O_NONBLOCK.
fn relay_snapshot(
    pid: u32,
    baseline: &std::collections::HashSet<String>,
) -> (Vec<String>, Vec<String>) {
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        if comm.starts_with("iou-wrk") {
            workers.push(comm.trim().to_string());
        }
    }
    let mut blocking = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
    {
        let fd = fd.unwrap();
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().to_string();
        if !(target.starts_with("socket:") || target.starts_with("pipe:"))
            || baseline.contains(&target)
        {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        if let Some(flags) = flags {
            if flags & 0o4000 == 0 {
                blocking.push(format!(
                    "fd {} ({target})",
                    fd.file_name().to_string_lossy()
                ));
            }
        }
    }
    (workers, blocking)
}

data_path_test!(no_io_wq_threads_no_blocking_fds);
/// While bytes flow both ways, the relay has no io-wq worker thread (nothing it submits to
/// io_uring runs on one: no IORING_OP_SPLICE) and every socket and pipe it holds is
/// non-blocking.
fn no_io_wq_threads_no_blocking_fds(backend: Backend) {
    let echo = Upstream::echo();
    let (relay, port) = relay_one(echo.addr(), "nowq", "", backend);
    let pid = relay.pid();
    let baseline = socket_and_pipe_fds(pid);
    let mut conn = connect(port);
    let chunk = random_bytes(1 << 20);
    let mut snapshots = 0;
    let mut checked_fds = 0;
    for _ in 0..32 {
        conn.write_all(&chunk).expect("write");
        let mut back = vec![0u8; chunk.len()];
        // Look while the echo is in flight through the relay.
        let (workers, blocking) = relay_snapshot(pid, &baseline);
        assert!(
            workers.is_empty(),
            "io-wq workers while relaying: {workers:?}"
        );
        assert!(
            blocking.is_empty(),
            "blocking fds while relaying: {blocking:?}"
        );
        checked_fds = checked_fds.max(socket_and_pipe_fds(pid).len() - baseline.len());
        snapshots += 1;
        conn.read_exact(&mut back).expect("read the echo");
        assert!(back == chunk, "echo differs");
    }
    assert_eq!(snapshots, 32);
    // The client and upstream sockets at least were looked at.
    assert!(checked_fds >= 2, "saw only {checked_fds} new fds");
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

data_path_test!(keepalive_on_both_sides);
/// `tcp_keepalive` arms a keepalive timer on the relay's client-side socket (inherited from
/// the listener) and on its upstream socket.
fn keepalive_on_both_sides(backend: Backend) {
    let echo = Upstream::echo();
    let (_relay, port) = relay_one(echo.addr(), "ka", "tcp_keepalive = \"7s\"", backend);
    let mut conn = connect(port);
    roundtrip(&mut conn, b"keepalive");
    let client_side = sockets_on_local_port(port);
    assert_eq!(
        client_side.len(),
        1,
        "relay's client-side socket: {client_side:?}"
    );
    assert!(
        client_side[0].contains("timer:(keepalive"),
        "no keepalive on the client side: {client_side:?}"
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
    assert!(
        upstream_side[0].contains("timer:(keepalive"),
        "no keepalive on the upstream side: {upstream_side:?}"
    );
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
