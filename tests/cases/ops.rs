//! Operations: the relay's side of systemd's notify protocol, played by the test with a
//! `NOTIFY_SOCKET` of its own, and the exact figures of `/metrics` after known transfers.
//!
//! The Prometheus server, `promtool`, the dashboard and the unit file are checked by
//! `scripts/check-ops`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::files::random_bytes;
use crate::util::metrics::{scrape, Scrape};
use crate::util::net::{
    connect, connect_expect_closed, free_ports_in_a_row, read_to_end, roundtrip, Upstream,
    LOCALHOST,
};
use crate::util::relay::{data_path_test, map_section, relay_section};
use crate::util::{poll, Backend, Relay};

/// `map`/`port` labels plus `extra`.
fn labels<'a>(
    map: &'a str,
    port: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![("map", map), ("port", port)];
    l.extend_from_slice(extra);
    l
}

// ---------------------------------------------------------------------------------------
// sd_notify

/// The test's stand-in for systemd: a datagram socket the relay finds in `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    /// Every message received so far, in order; each is a list of `KEY=VALUE` lines.
    seen: Vec<Vec<String>>,
    /// When each message of `seen` arrived.
    seen_at: Vec<Instant>,
}

impl Manager {
    /// A manager on `notify.sock` in a directory of its own (gone with the `TempDir`).
    fn in_tempdir() -> (tempfile::TempDir, std::path::PathBuf, Manager) {
        let dir = tempfile::Builder::new()
            .prefix("portrelay-notify-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("notify.sock");
        let manager = Manager::bind(&path);
        (dir, path, manager)
    }

    fn bind(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("bind the notify socket {}: {e}", path.display()));
        Manager {
            socket,
            seen: Vec::new(),
            seen_at: Vec::new(),
        }
    }

    /// Receives messages until one holds the line `want` (and satisfies `also`), for at
    /// most `timeout`; returns that message. Panics with everything seen otherwise.
    fn wait_for(
        &mut self,
        want: &str,
        timeout: Duration,
        also: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        // Bounded: each pass receives a message or returns/panics at the deadline.
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let lines: Vec<String> = text.lines().map(str::to_string).collect();
                    self.seen.push(lines.clone());
                    self.seen_at.push(Instant::now());
                    if lines.iter().any(|l| l == want) && also(&lines) {
                        return lines;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("recv on the notify socket: {e}"),
            }
        }
        panic!(
            "no notify message with {want:?} within {timeout:?}; received: {:?}",
            self.seen
        )
    }

    /// When each message holding exactly the line `line` (and nothing else) arrived.
    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.seen
            .iter()
            .zip(&self.seen_at)
            .filter(|(m, _)| m.iter().all(|l| l == line))
            .map(|(_, at)| *at)
            .collect()
    }

    /// How many messages seen so far hold the line `line`.
    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|m| m.iter().any(|l| l == line))
            .count()
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock of `MONOTONIC_USEC`.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec that clock_gettime writes.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn signal(relay: &Relay, sig: libc::c_int) {
    // SAFETY: kill(2) on the relay's pid; `Relay` reaps its child only on drop or
    // `wait_exit`, so the pid names our child.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
}

data_path_test!(sd_notify);
/// With `NOTIFY_SOCKET` and `WATCHDOG_USEC=400000` (no `WATCHDOG_PID`, so the watchdog is
/// meant for the relay): `READY=1` once its listener accepts, `WATCHDOG=1` every 200 ms,
/// on SIGHUP `RELOADING=1` with a current `MONOTONIC_USEC` then `READY=1`, and on SIGTERM
/// `STOPPING=1` before it exits 0.
fn sd_notify(backend: Backend) {
    let (_dir, path, mut manager) = Manager::in_tempdir();
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, "watch = false") + &map_section(port, echo.addr(), "notify", "");
    let socket = path.to_str().expect("a UTF-8 tempdir path");
    let mut relay = Relay::start_with_env(
        &toml,
        backend,
        &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "400000")],
    );

    // READY=1, and by then the listener accepts and forwards.
    manager.wait_for("READY=1", Duration::from_secs(10), |_| true);
    let mut conn = connect(port);
    roundtrip(&mut conn, b"ready means listening");
    drop(conn);
    assert_eq!(
        manager.count("RELOADING=1") + manager.count("STOPPING=1"),
        0,
        "before any signal: {:?}",
        manager.seen
    );

    // Watchdog pings: every WATCHDOG_USEC/2 = 200 ms while the loops answer. Over 8 gaps
    // the median is about 200 ms, and no gap reaches WATCHDOG_USEC (systemd would kill it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.count("WATCHDOG=1") < 9 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "fewer than 9 WATCHDOG=1 in 10 s: {:?}",
            manager.seen
        );
        manager.wait_for("WATCHDOG=1", left, |_| true);
    }
    let pings = manager.times_of("WATCHDOG=1");
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    let longest = *gaps.last().unwrap();
    eprintln!("watchdog gaps: median {median:?}, longest {longest:?}: {gaps:?}");
    assert!(
        (Duration::from_millis(150)..=Duration::from_millis(280)).contains(&median),
        "median gap between WATCHDOG=1 pings is {median:?}, expected about WATCHDOG_USEC/2 \
         (200 ms): {gaps:?}"
    );
    assert!(
        longest < Duration::from_millis(400),
        "a gap of {longest:?} between WATCHDOG=1 pings reaches WATCHDOG_USEC (400 ms): {gaps:?}"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC taken during the reload, then READY=1.
    let before = monotonic_usec();
    let seen_before = manager.seen.len();
    signal(&relay, libc::SIGHUP);
    let reloading = manager.wait_for("RELOADING=1", Duration::from_secs(10), |_| true);
    let after = monotonic_usec();
    let usec: u64 = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("MONOTONIC_USEC is not a number ({e}): {reloading:?}"));
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is not between {before} and {after} (CLOCK_MONOTONIC around the SIGHUP)"
    );
    manager.wait_for("READY=1", Duration::from_secs(10), |_| true);
    let reload_msgs: Vec<&Vec<String>> = manager.seen[seen_before..]
        .iter()
        .filter(|m| !m.iter().all(|l| l == "WATCHDOG=1"))
        .collect();
    assert_eq!(
        reload_msgs.len(),
        2,
        "around a reload exactly RELOADING=1 then READY=1: {reload_msgs:?}"
    );
    relay.wait_log(|l| l.msg() == "reloaded", Duration::from_secs(10));
    // Still forwarding, and still pinging the watchdog.
    let mut conn = connect(port);
    roundtrip(&mut conn, b"after the reload");
    drop(conn);
    let pings_after_reload = manager.count("WATCHDOG=1");
    manager.wait_for("WATCHDOG=1", Duration::from_secs(5), |_| true);
    assert!(manager.count("WATCHDOG=1") > pings_after_reload);

    // SIGTERM: STOPPING=1, then exit 0.
    relay.sigterm();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), |_| true);
    let status = relay.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert_eq!(
        manager.count("READY=1"),
        2,
        "READY=1 once at start and once after the reload: {:?}",
        manager.seen
    );
}

data_path_test!(sd_notify_follows_an_upgrade);
/// Under systemd the unit must stay active across an upgrade, with the new process as its
/// main one: the old process names it (`MAINPID=` with the new pid, before it lets go), the
/// new one says `READY=1`, and its watchdog pings go on after the old process has exited
/// (without them systemd would kill the unit at `WatchdogSec`). The connection open across
/// it still relays.
fn sd_notify_follows_an_upgrade(backend: Backend) {
    let (_dir, path, mut manager) = Manager::in_tempdir();
    let admin = crate::util::upgrade::admin_socket_dir();
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let extra = format!(
        "watch = false\n{}",
        crate::util::upgrade::admin_line(&admin.path().join("admin.sock"))
    );
    let toml = relay_section(None, &extra) + &map_section(port, echo.addr(), "notify", "");
    let socket = path.to_str().expect("a UTF-8 tempdir path");
    let mut relay = Relay::start_with_env(
        &toml,
        backend,
        &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "400000")],
    );
    manager.wait_for("READY=1", Duration::from_secs(10), |_| true);
    let mut conn = connect(port);
    roundtrip(&mut conn, b"before the upgrade");
    let old = relay.pid();

    let up = relay.sigusr2().expect("the upgrade");
    assert_ne!(up.pid, old);
    let main_pid = format!("MAINPID={}", up.pid);
    manager.wait_for(&main_pid, Duration::from_secs(10), |_| true);
    let at = manager
        .seen
        .iter()
        .position(|m| m.contains(&main_pid))
        .unwrap();
    // READY=1 of the new process, after the old one named it.
    while !manager.seen[at..]
        .iter()
        .any(|m| m.iter().any(|l| l == "READY=1"))
    {
        manager.wait_for("READY=1", Duration::from_secs(10), |_| true);
    }
    assert!(
        up.old_exit.is_some_and(|s| s.success()),
        "the old process exits 0 once it has let go: {:?}",
        up.old_exit
    );
    // The old process is gone: pings from now on are the new process's.
    let pings = manager.count("WATCHDOG=1");
    for _ in 0..3 {
        manager.wait_for("WATCHDOG=1", Duration::from_secs(5), |_| true);
    }
    assert!(manager.count("WATCHDOG=1") >= pings + 3);
    roundtrip(&mut conn, b"after the upgrade");
    drop(conn);
    relay.sigterm();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), |_| true);
    assert!(relay.wait_exit(Duration::from_secs(20)).success());
}

// ---------------------------------------------------------------------------------------
// /metrics

/// An upstream that reads exactly as many bytes as the client announced in an 8-byte
/// big-endian header (header included), then sends the reply size asked for in the header's
/// next 8 bytes, shuts down its write side, and reads until the client's end of stream.
fn sized_upstream() -> Upstream {
    Upstream::serve(
        std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind 127.0.0.1:0"),
        |mut conn, _| {
            let mut head = [0u8; 16];
            conn.read_exact(&mut head)?;
            let up = u64::from_be_bytes(head[..8].try_into().unwrap()) as usize;
            let down = u64::from_be_bytes(head[8..].try_into().unwrap()) as usize;
            let mut left = up - head.len();
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = conn.read(&mut buf[..left.min(64 * 1024)])?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                left -= n;
            }
            conn.write_all(&random_bytes(down))?;
            conn.shutdown(Shutdown::Write)?;
            loop {
                if conn.read(&mut buf)? == 0 {
                    return Ok(());
                }
            }
        },
    )
}

/// Sends `up` bytes (at least 16: the header for [`sized_upstream`]) through the relay's
/// `port`, half-closes, and reads the `down`-byte reply to its end.
fn transfer(port: u16, up: usize, down: usize) {
    assert!(up >= 16);
    let mut payload = random_bytes(up);
    payload[..8].copy_from_slice(&(up as u64).to_be_bytes());
    payload[8..16].copy_from_slice(&(down as u64).to_be_bytes());
    let mut conn = connect(port);
    conn.write_all(&payload).expect("send");
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let reply = read_to_end(&mut conn);
    assert_eq!(reply.len(), down, "reply size through the relay");
}

/// (bytes up, bytes down) of each connection: odd sizes, from a few bytes to several pipe
/// capacities, and one that sends nothing back.
const TRANSFERS: [(usize, usize); 4] = [
    (1_000_003, 2_500_007),
    (16, 0),
    (65_537, 131_071),
    (4_099, 1),
];

/// A relay with a mapping `data` (to a [`sized_upstream`], `allow` 127.0.0.1 only) and a
/// mapping `refused` (to a port where nothing listens), metrics on a free port; `extra` goes
/// into `[relay]`. Runs [`TRANSFERS`], one denied client (from 127.0.0.2) and one refused
/// upstream, then checks every figure of the scrape.
fn check_exact_counters(backend: Backend, extra: &str) {
    let upstream = sized_upstream();
    // Four free ports in a row: the two mappings, metrics, and one where nothing listens.
    let base = free_ports_in_a_row(4);
    let (data_port, refused_port, metrics_port, closed_port) = (base, base + 1, base + 2, base + 3);
    let toml = relay_section(Some(metrics_port), &format!("watch = false\n{extra}"))
        + &map_section(
            data_port,
            upstream.addr(),
            "data",
            "allow = [\"127.0.0.1/32\"]",
        )
        + &map_section(
            refused_port,
            SocketAddr::from((LOCALHOST, closed_port)),
            "refused",
            "",
        );
    let relay = Relay::start(&toml, backend);
    let (dp, rp) = (data_port.to_string(), refused_port.to_string());
    let data = |extra: &[(&'static str, &'static str)]| labels("data", &dp, extra);

    // Before any connection: the series exist and are zero.
    let s = Scrape::take(metrics_port);
    assert_eq!(s.value("portrelay_connections_active", &data(&[])), 0.0);
    for direction in ["client_to_upstream", "upstream_to_client"] {
        assert_eq!(
            s.value("portrelay_bytes_total", &data(&[("direction", direction)])),
            0.0
        );
    }
    assert_eq!(
        s.value("portrelay_io_backend_info", &[("backend", backend.name())]),
        1.0
    );
    assert_eq!(s.value("portrelay_mappings", &[]), 2.0);
    assert_eq!(s.value("portrelay_config_generation", &[]), 1.0);

    for (up, down) in TRANSFERS {
        transfer(data_port, up, down);
    }
    let up_total: usize = TRANSFERS.iter().map(|t| t.0).sum();
    let down_total: usize = TRANSFERS.iter().map(|t| t.1).sum();
    let count = TRANSFERS.len() as f64;

    // Denied by `allow`: closed at once, counted as rejected (acl), never accepted.
    connect_expect_closed(
        Ipv4Addr::new(127, 0, 0, 2),
        data_port,
        b"denied",
        Duration::from_secs(5),
    );
    // An upstream that refuses.
    connect_expect_closed(LOCALHOST, refused_port, b"", Duration::from_secs(5));

    // Wait until every connection has ended and been counted.
    let settled = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let s = Scrape::take(metrics_port);
        let done = s.sum("portrelay_connections_active", &[]) == 0.0
            && s.get(
                "portrelay_session_duration_seconds_count",
                &[("map", "data")],
            ) == Some(count)
            && s.sum(
                "portrelay_connections_rejected_total",
                &[("port", dp.as_str())],
            ) >= 1.0
            && s.sum(
                "portrelay_upstream_connect_failures_total",
                &[("port", rp.as_str())],
            ) >= 1.0;
        done.then_some(s)
    });
    let s = settled.unwrap_or_else(|| {
        panic!(
            "connections not all counted as ended within 10 s:\n{}",
            scrape(metrics_port)
        )
    });

    // Exact bytes each way.
    assert_eq!(
        s.value(
            "portrelay_bytes_total",
            &data(&[("direction", "client_to_upstream")])
        ),
        up_total as f64,
        "bytes client_to_upstream on {}",
        backend.name()
    );
    assert_eq!(
        s.value(
            "portrelay_bytes_total",
            &data(&[("direction", "upstream_to_client")])
        ),
        down_total as f64,
        "bytes upstream_to_client on {}",
        backend.name()
    );
    // Accepted: the transfers, direct; the denied client is not one of them.
    assert_eq!(
        s.value(
            "portrelay_connections_accepted_total",
            &data(&[("via", "direct")])
        ),
        count
    );
    for via in ["proxy", "tls"] {
        assert_eq!(
            s.get(
                "portrelay_connections_accepted_total",
                &data(&[("via", via)])
            )
            .unwrap_or(0.0),
            0.0
        );
    }
    assert_eq!(s.value("portrelay_connections_active", &data(&[])), 0.0);
    // Rejections on the data port: exactly one, for acl.
    assert_eq!(
        s.value(
            "portrelay_connections_rejected_total",
            &[("port", dp.as_str()), ("reason", "acl")]
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "portrelay_connections_rejected_total",
            &[("port", dp.as_str())]
        ),
        1.0,
        "rejections on the data port:\n{}",
        s.text
    );
    // The refused upstream: one failure, reason refused, no bytes, nothing active.
    let refused = |extra: &[(&'static str, &'static str)]| labels("refused", &rp, extra);
    assert_eq!(
        s.value(
            "portrelay_upstream_connect_failures_total",
            &refused(&[("reason", "refused")])
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "portrelay_upstream_connect_failures_total",
            &[("port", rp.as_str())]
        ),
        1.0
    );
    assert_eq!(
        s.sum("portrelay_upstream_connect_failures_total", &data(&[])),
        0.0
    );
    assert_eq!(s.sum("portrelay_bytes_total", &refused(&[])), 0.0);
    assert_eq!(s.value("portrelay_connections_active", &refused(&[])), 0.0);
    // Durations: every data connection ended once; every successful connect was timed.
    assert_eq!(
        s.value(
            "portrelay_session_duration_seconds_bucket",
            &[("map", "data"), ("le", "+Inf")]
        ),
        count
    );
    assert!(
        s.value("portrelay_upstream_connect_duration_seconds_count", &[]) >= count,
        "upstream connects timed:\n{}",
        s.text
    );
    // No pipe is held once every connection has ended; with max_pipes = 0 none was made.
    assert_eq!(
        s.value("portrelay_pipes", &[("state", "in_use")]),
        0.0,
        "pipes in use with no connection open"
    );
    // Spliced by default: the transfers of a MiB and more went through pipes, which are
    // pooled now; with max_pipes = 0 none was made and every byte was copied.
    let idle = s.value("portrelay_pipes", &[("state", "idle")]);
    if extra.contains("max_pipes = 0") {
        assert_eq!(idle, 0.0, "idle pipes with max_pipes = 0");
    } else {
        assert!(
            idle >= 1.0,
            "no pipe pooled after transfers of up to 2.5 MB: the bytes were not spliced"
        );
    }
    assert!(s.value("process_open_fds", &[]) > 0.0);
    drop(relay);
}

data_path_test!(exact_counters);
/// After known transfers through one mapping (spliced through pipes), the scrape shows
/// exactly the bytes each way, the accepted and active counts, one acl rejection and one
/// refused upstream.
fn exact_counters(backend: Backend) {
    check_exact_counters(backend, "");
}

data_path_test!(exact_counters_copied);
/// The same with `max_pipes = 0`: no pipe at all, every byte copied through a buffer.
fn exact_counters_copied(backend: Backend) {
    check_exact_counters(backend, "max_pipes = 0");
}
