//! The copy path: small messages received into the loops' copy buffers and sent from them
//! by the io backend, with splice taking over when a direction streams. Every buffer comes
//! back (`portrelay_copy_buffers{state="in_use"}` returns to 0, no descriptor is left
//! behind) after thousands of connections that end in every way; bytes are counted exactly;
//! a pool run dry (`PORTRELAY_TEST_COPY_BUFFERS`) loses nothing; switching between copying
//! and splicing keeps the order of the bytes in both directions.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::relay::socket_and_pipe_fds;
use crate::util::files::{hex, sha256};
use crate::util::log::LogLine;
use crate::util::metrics::Scrape;
use crate::util::net::{
    accept_within, connect, free_ports_in_a_row, listen, read_some, read_to_end, reset, Upstream,
    LOCALHOST,
};
use crate::util::relay::{data_path_test, map_section, relay_section, Start, THREADS};
use crate::util::{poll, Backend, Relay};

const COPY_BUFFERS: &str = "portrelay_copy_buffers";
/// Copy buffers per loop unless `PORTRELAY_TEST_COPY_BUFFERS` says otherwise.
const DEFAULT_BUFFERS: usize = 128;
const BYTES: &str = "portrelay_bytes_total";
const ACTIVE: &str = "portrelay_connections_active";

/// `n` consecutive ports that were free a moment ago.
fn free_ports<const N: usize>() -> [u16; N] {
    let first = free_ports_in_a_row(N as u16);
    std::array::from_fn(|i| first + i as u16)
}

/// A small deterministic generator (xorshift64): message sizes and contents that a failure
/// can be replayed from.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen((seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `lo..=hi`.
    fn size(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// A message of `lo..=hi` bytes.
    fn message(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let len = self.size(lo, hi);
        self.bytes(len)
    }
}

/// `portrelay_copy_buffers` as (in_use, idle); panics when the gauge is not exposed.
fn copy_buffers(metrics: u16) -> (f64, f64) {
    let s = Scrape::take(metrics);
    (
        s.value(COPY_BUFFERS, &[("state", "in_use")]),
        s.value(COPY_BUFFERS, &[("state", "idle")]),
    )
}

/// The copy buffers of a relay with `loops` event loops of the default pool.
fn default_buffers(loops: usize) -> f64 {
    (DEFAULT_BUFFERS * loops) as f64
}

/// Waits (bounded) until no connection is active, no copy buffer is in use and `idle` are
/// idle (every buffer is back: a leaked one stays in use, one lost outright is missing from
/// idle). Panics with what it read otherwise.
fn wait_all_buffers_back(metrics: u16, idle: f64, what: &str) {
    let mut last = String::new();
    let settled = poll(Duration::from_secs(20), Duration::from_millis(50), || {
        let s = Scrape::take(metrics);
        let active = s.sum(ACTIVE, &[]);
        let (in_use, now_idle) = (
            s.value(COPY_BUFFERS, &[("state", "in_use")]),
            s.value(COPY_BUFFERS, &[("state", "idle")]),
        );
        last = format!("{ACTIVE} {active}, copy buffers in use {in_use}, idle {now_idle}");
        (active == 0.0 && in_use == 0.0 && now_idle == idle).then_some(())
    });
    assert!(
        settled.is_some(),
        "{what}: not settled within 20 s (wanted no connection active, no copy buffer in use, \
         {idle} idle): {last}"
    );
}

/// `portrelay_bytes_total` of host port `port` as (client_to_upstream, upstream_to_client).
fn bytes_counted(metrics: u16, port: u16) -> (f64, f64) {
    let s = Scrape::take(metrics);
    let port = port.to_string();
    let of = |direction| s.sum(BYTES, &[("port", &port), ("direction", direction)]);
    (of("client_to_upstream"), of("upstream_to_client"))
}

/// Waits (bounded: the relay counts when a send completes) until `portrelay_bytes_total` of
/// `port` reads `want` each way; panics with what it read otherwise.
fn wait_bytes_counted(metrics: u16, port: u16, want: (u64, u64), what: &str) {
    let want = (want.0 as f64, want.1 as f64);
    let mut last = (f64::NAN, f64::NAN);
    let seen = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        last = bytes_counted(metrics, port);
        (last == want).then_some(())
    });
    assert!(
        seen.is_some(),
        "{what}: {BYTES} of port {port} (client_to_upstream, upstream_to_client) is {last:?}, \
         expected {want:?}"
    );
}

/// Writes `msg` and reads back exactly as many bytes, which must equal it.
fn echo_once(conn: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    conn.write_all(msg)
        .map_err(|e| format!("write {} bytes: {e}", msg.len()))?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)
        .map_err(|e| format!("read the echo of {} bytes: {e}", msg.len()))?;
    if back != msg {
        return Err(format!("the echo of {} bytes differs", msg.len()));
    }
    Ok(())
}

/// [`echo_once`] for a message too large to write before reading: a thread writes it while
/// this one reads the echo back.
fn echo_burst(conn: &mut TcpStream, msg: &Arc<Vec<u8>>) -> Result<(), String> {
    let mut writer = conn.try_clone().map_err(|e| format!("clone: {e}"))?;
    let sent = msg.clone();
    let write = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; msg.len()];
    let read = conn.read_exact(&mut back);
    let wrote = write
        .join()
        .map_err(|_| "the writer panicked".to_string())?;
    wrote.map_err(|e| format!("write a burst of {} bytes: {e}", msg.len()))?;
    read.map_err(|e| format!("read the echo of a burst of {} bytes: {e}", msg.len()))?;
    if back != **msg {
        let at = back.iter().zip(msg.iter()).position(|(a, b)| a != b);
        return Err(format!(
            "the echo of a burst of {} bytes differs (first at {at:?})",
            msg.len()
        ));
    }
    Ok(())
}

/// Reads until the relay ends the connection (EOF or reset) within `within`; a byte
/// before the end is an error.
fn wait_ended(conn: &mut TcpStream, within: Duration) -> Result<(), String> {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => return Err(format!("{n} bytes where the end was expected")),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("waiting for the end: {e}")),
        }
    }
}

/// Connects to `port`, with an error rather than a panic. A plain connect (no bind first):
/// its local port may be one in TIME_WAIT towards another address, so thousands of them
/// do not use up the ephemeral ports that the rest of the suite binds.
fn try_connect(port: u16) -> Result<TcpStream, String> {
    let addr = std::net::SocketAddr::from((LOCALHOST, port));
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(crate::util::net::IO_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(crate::util::net::IO_TIMEOUT)))
        .map_err(|e| format!("timeouts: {e}"))?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------
// Churn

/// The ways a connection of the churn ends, each on a mapping (host port) of its own so
/// that the close lines can be told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// A few small messages, each echo checked, then [`BYE`], after which the upstream
    /// closes (first: the TIME_WAIT of 4,000 such connections is then on the upstream's
    /// and the relay's listening ports, not on ephemeral ones) and the client closes too.
    Clean,
    /// A message, then an RST from the client at once (its echo may be in flight).
    ClientReset,
    /// A message, shutdown(Write), the echo read to EOF.
    HalfClose,
    /// A message to an upstream that resets once it has read it.
    UpstreamReset,
    /// A message and its echo, then silence until the relay's idle timeout.
    Idle,
}

impl Ending {
    const ALL: [Ending; 5] = [
        Ending::Clean,
        Ending::ClientReset,
        Ending::HalfClose,
        Ending::UpstreamReset,
        Ending::Idle,
    ];

    /// The ending of churn connection `id` (the idle ones are opened apart).
    fn of(id: usize) -> Ending {
        match id % 20 {
            0..=7 => Ending::Clean,
            8..=12 => Ending::ClientReset,
            13..=15 => Ending::HalfClose,
            _ => Ending::UpstreamReset,
        }
    }

    /// The close reason the relay must log for it.
    fn reason(self) -> &'static str {
        match self {
            Ending::Clean => "upstream_eof",
            Ending::HalfClose => "client_eof",
            Ending::ClientReset | Ending::UpstreamReset => "reset",
            Ending::Idle => "idle",
        }
    }
}

/// Connections in all.
const CHURN_TOTAL: usize = 10_000;
/// Of them, those left idle until the relay's idle timeout closes them, in batches.
const CHURN_IDLE: usize = 300;
const IDLE_BATCH: usize = 30;
/// Client threads of the rest, one connection each at a time.
const CHURN_THREADS: usize = 24;
const IDLE_TIMEOUT_MS: u64 = 500;

/// What the churn's client threads share.
struct Churn {
    ports: BTreeMap<Ending, u16>,
    deadline: Instant,
    next: AtomicUsize,
    /// Bytes the clients sent on connections whose every byte was echoed (clean and
    /// half-closed ones), by ending: what the relay must count.
    exact: Mutex<BTreeMap<Ending, u64>>,
    failed: AtomicBool,
    failures: Mutex<Vec<String>>,
}

impl Churn {
    fn fail(&self, e: String) {
        self.failed.store(true, Ordering::SeqCst);
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < 20 {
            failures.push(e);
        }
    }

    fn running(&self) -> bool {
        if self.failed.load(Ordering::SeqCst) {
            return false;
        }
        if Instant::now() >= self.deadline {
            self.fail("the churn's deadline passed".into());
            return false;
        }
        true
    }

    /// One client thread: connections from the shared count until none is left.
    fn client(&self) {
        while self.running() {
            let id = self.next.fetch_add(1, Ordering::SeqCst);
            if id >= CHURN_TOTAL - CHURN_IDLE {
                return;
            }
            let ending = Ending::of(id);
            if let Err(e) = self.one(id, ending) {
                self.fail(format!("connection #{id} ({ending:?}): {e}"));
            }
        }
    }

    fn one(&self, id: usize, ending: Ending) -> Result<(), String> {
        let mut gen = Gen::new(id as u64);
        let mut conn = try_connect(self.ports[&ending])?;
        let first = gen.message(1, 200);
        match ending {
            Ending::Clean => {
                let mut sent = first.len();
                echo_once(&mut conn, &first)?;
                for _ in 0..gen.size(0, 3) {
                    let msg = gen.message(1, 200);
                    echo_once(&mut conn, &msg)?;
                    sent += msg.len();
                }
                echo_once(&mut conn, BYE)?;
                sent += BYE.len();
                wait_ended(&mut conn, Duration::from_secs(10))?;
                drop(conn);
                self.count_exact(ending, sent);
            }
            Ending::ClientReset => {
                conn.write_all(&first).map_err(|e| format!("write: {e}"))?;
                reset(conn);
            }
            Ending::HalfClose => {
                conn.write_all(&first).map_err(|e| format!("write: {e}"))?;
                conn.shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown(Write): {e}"))?;
                let mut back = Vec::new();
                conn.read_to_end(&mut back)
                    .map_err(|e| format!("read the echo to EOF: {e}"))?;
                if back != first {
                    return Err(format!(
                        "{} bytes echoed to EOF for {} sent, or different ones",
                        back.len(),
                        first.len()
                    ));
                }
                self.count_exact(ending, first.len());
            }
            Ending::UpstreamReset => {
                conn.write_all(&first).map_err(|e| format!("write: {e}"))?;
                wait_ended(&mut conn, Duration::from_secs(10))?;
            }
            Ending::Idle => unreachable!("idle connections are opened in batches"),
        }
        Ok(())
    }

    fn count_exact(&self, ending: Ending, bytes: usize) {
        *self.exact.lock().unwrap().entry(ending).or_default() += bytes as u64;
    }

    /// The idle connections, [`IDLE_BATCH`] at a time: each sends a message, reads its
    /// echo, then waits for the relay to close it.
    fn idle_batches(&self) {
        let port = self.ports[&Ending::Idle];
        for batch in 0..CHURN_IDLE / IDLE_BATCH {
            if !self.running() {
                return;
            }
            let result = (|| -> Result<(), String> {
                let mut conns = Vec::with_capacity(IDLE_BATCH);
                for i in 0..IDLE_BATCH {
                    let id = batch * IDLE_BATCH + i;
                    let mut conn = try_connect(port)?;
                    let msg = Gen::new(1_000_000 + id as u64).message(1, 200);
                    echo_once(&mut conn, &msg).map_err(|e| format!("idle #{id}: {e}"))?;
                    conns.push(conn);
                }
                for (i, conn) in conns.iter_mut().enumerate() {
                    wait_ended(conn, Duration::from_secs(10))
                        .map_err(|e| format!("idle #{}: {e}", batch * IDLE_BATCH + i))?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                self.fail(e);
            }
        }
    }
}

/// What ends a clean connection of the churn: its upstream echoes it, then closes.
const BYE: &[u8] = b"\x00\xffbye, says the client\xff\x00";

/// An echo that closes once the bytes it has echoed end with [`BYE`].
fn echo_until_bye() -> Upstream {
    let listener = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    Upstream::serve(listener, |mut conn, stats| {
        let mut buf = vec![0u8; 16 * 1024];
        let mut tail: Vec<u8> = Vec::with_capacity(2 * BYE.len());
        loop {
            let n = read_some(&mut conn, &mut buf)?;
            if n == 0 {
                return conn.shutdown(Shutdown::Write);
            }
            stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
            conn.write_all(&buf[..n])?;
            tail.extend_from_slice(&buf[..n]);
            tail.drain(..tail.len().saturating_sub(BYE.len()));
            if tail == BYE {
                return conn.shutdown(Shutdown::Both);
            }
        }
    })
}

/// An upstream that reads one message, then resets (SO_LINGER 0).
fn resetting_upstream() -> Upstream {
    let listener = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    Upstream::serve(listener, |mut conn, stats| {
        let mut buf = [0u8; 1024];
        let n = read_some(&mut conn, &mut buf)?;
        stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
        reset(conn);
        Ok(())
    })
}

/// The relay's sockets and pipes: (sockets, pipes).
fn fd_counts(pid: u32) -> (usize, usize) {
    let fds = socket_and_pipe_fds(pid);
    let sockets = fds.iter().filter(|t| t.starts_with("socket:")).count();
    (sockets, fds.len() - sockets)
}

data_path_test!(copy_buffers_come_back_after_churn);
/// 10,000 connections through one relay (`idle_timeout` 500 ms), 24 at a time plus batches
/// of idle ones, ending every way: clean ends after small echoed messages (the upstream
/// closes, then the client), client resets with an echo in flight, half-closes, upstreams that reset after reading, and idle
/// timeouts. Afterwards no connection is active, no copy buffer is in use, the relay holds
/// as many sockets as before and no pipe in use; every connection has one close line with
/// the reason its ending implies, and the bytes of the clean and half-closed ones are
/// counted exactly.
fn copy_buffers_come_back_after_churn(backend: Backend) {
    let echo = Upstream::echo();
    let until_bye = echo_until_bye();
    let resetting = resetting_upstream();
    let [metrics, clean, client_reset, half_close, upstream_reset, idle] = free_ports::<6>();
    let ports: BTreeMap<Ending, u16> = [
        (Ending::Clean, clean),
        (Ending::ClientReset, client_reset),
        (Ending::HalfClose, half_close),
        (Ending::UpstreamReset, upstream_reset),
        (Ending::Idle, idle),
    ]
    .into();
    let mut toml = relay_section(
        Some(metrics),
        &format!("idle_timeout = \"{IDLE_TIMEOUT_MS}ms\""),
    );
    for (ending, port) in &ports {
        let to = match ending {
            Ending::UpstreamReset => resetting.addr(),
            Ending::Clean => until_bye.addr(),
            _ => echo.addr(),
        };
        toml += &map_section(port, to, &format!("{ending:?}").to_lowercase(), "");
    }
    let relay = Relay::start(&toml, backend);
    let pid = relay.pid();
    let (sockets_before, pipes_before) = fd_counts(pid);

    let started = Instant::now();
    let churn = Churn {
        ports: ports.clone(),
        deadline: started + Duration::from_secs(90),
        next: AtomicUsize::new(0),
        exact: Mutex::new(BTreeMap::new()),
        failed: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| {
        for _ in 0..CHURN_THREADS {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, || churn.client())
                .expect("spawn a client thread");
        }
        churn.idle_batches();
    });
    let failures = churn.failures.into_inner().unwrap();
    assert!(failures.is_empty(), "churn failures: {failures:#?}");
    eprintln!(
        "{CHURN_TOTAL} connections in {:?} on {}",
        started.elapsed(),
        backend.name()
    );

    wait_all_buffers_back(metrics, default_buffers(THREADS), "after the churn");
    let mut fds = (0, 0);
    let settled = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        fds = fd_counts(pid);
        (fds.0 == sockets_before).then_some(())
    });
    assert!(
        settled.is_some(),
        "the relay holds {} sockets after the churn, {sockets_before} before",
        fds.0
    );
    let s = Scrape::take(metrics);
    assert_eq!(
        s.value("portrelay_pipes", &[("state", "in_use")]),
        0.0,
        "pipes in use after the churn"
    );
    let pipes_idle = s.value("portrelay_pipes", &[("state", "idle")]);
    assert!(
        fds.1 as f64 <= pipes_before as f64 + 2.0 * pipes_idle,
        "{} pipe fds after the churn: {pipes_before} before and {pipes_idle} pipes pooled",
        fds.1
    );

    // One close line per connection, with the reason of its ending.
    let lines = relay.wait_logs(
        |l| l.msg() == "connection closed",
        CHURN_TOTAL,
        Duration::from_secs(30),
    );
    let mut reasons: BTreeMap<(Ending, String), usize> = BTreeMap::new();
    let ending_of_port: BTreeMap<u64, Ending> =
        ports.iter().map(|(e, p)| (u64::from(*p), *e)).collect();
    for line in &lines {
        let ending = ending_of_port[&line.num("port")];
        *reasons.entry((ending, line.reason().into())).or_default() += 1;
    }
    let mut want: BTreeMap<(Ending, String), usize> = BTreeMap::new();
    for id in 0..CHURN_TOTAL - CHURN_IDLE {
        *want
            .entry((Ending::of(id), Ending::of(id).reason().into()))
            .or_default() += 1;
    }
    want.insert((Ending::Idle, "idle".into()), CHURN_IDLE);
    assert_eq!(reasons, want, "close lines by ending and reason");
    let late: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.reason() == "idle" && l.num("duration_ms") < IDLE_TIMEOUT_MS)
        .collect();
    assert!(late.is_empty(), "closed as idle too early: {late:?}");
    let others: Vec<String> = relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == "connection rejected" || l.str("level") == Some("ERROR"))
        .map(|l| l.raw.clone())
        .collect();
    assert!(others.is_empty(), "rejections or errors: {others:?}");

    // The connections whose every byte was echoed: counted exactly, each way, in the close
    // lines and in the counters.
    let exact = churn.exact.into_inner().unwrap();
    for ending in Ending::ALL {
        let Some(&sent) = exact.get(&ending) else {
            continue;
        };
        let port = ports[&ending];
        let logged = lines
            .iter()
            .filter(|l| l.is_closed_on(port))
            .fold((0, 0), |(up, down), l| {
                (
                    up + l.num("bytes_client_to_upstream"),
                    down + l.num("bytes_upstream_to_client"),
                )
            });
        assert_eq!(logged, (sent, sent), "{ending:?}: bytes in the close lines");
        wait_bytes_counted(metrics, port, (sent, sent), &format!("{ending:?}"));
    }
}

// ---------------------------------------------------------------------------------------
// Exact counts, a dry pool, order across splice switches

/// A relay with metrics and one mapping to `to`, started as `how` says: (relay, host
/// port, metrics port).
fn relay_to(
    to: std::net::SocketAddr,
    name: &str,
    how: Start,
    backend: Backend,
) -> (Relay, u16, u16) {
    let [port, metrics] = free_ports::<2>();
    let toml = relay_section(Some(metrics), "") + &map_section(port, to, name, "");
    (Relay::start_with(&toml, backend, how), port, metrics)
}

data_path_test!(copy_path_counts_bytes_exactly);
/// One connection, 2,000 small messages of 1 to 1,000 bytes, each echo checked, then a
/// half-close: halfway, while the connection is open, `portrelay_bytes_total` reaches
/// exactly the bytes so far each way; at the end the close line and the counters hold
/// exactly what was sent and echoed.
fn copy_path_counts_bytes_exactly(backend: Backend) {
    const MESSAGES: usize = 2_000;
    let echo = Upstream::echo();
    let (relay, port, metrics) = relay_to(echo.addr(), "exact", Start::default(), backend);
    let mut gen = Gen::new(2);
    let mut conn = connect(port);
    let mut sent = 0u64;
    for i in 0..MESSAGES {
        let msg = gen.message(1, 1000);
        echo_once(&mut conn, &msg).unwrap_or_else(|e| panic!("message {i}: {e}"));
        sent += msg.len() as u64;
        if i == MESSAGES / 2 {
            wait_bytes_counted(metrics, port, (sent, sent), "mid-connection");
        }
    }
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let rest = read_to_end(&mut conn);
    assert!(rest.is_empty(), "{} bytes after the last echo", rest.len());
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    line.assert_closed_fields(port, "exact", echo.addr());
    assert_eq!(line.reason(), "client_eof", "{line}");
    assert_eq!(line.num("bytes_client_to_upstream"), sent, "{line}");
    assert_eq!(line.num("bytes_upstream_to_client"), sent, "{line}");
    wait_bytes_counted(metrics, port, (sent, sent), "after the close");
    assert_eq!(echo.bytes_in(), sent, "bytes at the upstream");
    wait_all_buffers_back(metrics, default_buffers(THREADS), "after the connection");
}

/// A listener whose accepted sockets have a small receive buffer: an upstream end that
/// does not read fills up after a few KiB.
fn small_window_listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind(&std::net::SocketAddr::from((LOCALHOST, 0)).into())
        .expect("bind 127.0.0.1:0");
    socket.listen(16).expect("listen");
    socket.into()
}

/// A client→upstream direction stuck with a copy buffer: its upstream end does not read.
struct Stalled {
    client: TcpStream,
    far: TcpStream,
    /// Bytes the client sent, and their SHA-256 so far.
    sent: u64,
    digest: Sha256,
}

/// Bytes of each message a [`Stalled`] client sends: small, so that each is copied (a read
/// of a whole copy buffer would switch the direction to splice).
const STALL_MESSAGE: usize = 12_000;

impl Stalled {
    /// Connects through host `port` (to `upstream`) and sends messages of
    /// [`STALL_MESSAGE`] bytes, each once the relay has counted the previous one (so that
    /// each is read on its own), until one stays uncounted: the relay's send to the full
    /// upstream end holds its bytes.
    fn start(port: u16, upstream: &TcpListener, metrics: u16) -> Stalled {
        let mut client = connect(port);
        let far = accept_within(upstream, Duration::from_secs(5));
        let mut sent = 0u64;
        let (mut gen, mut digest) = (Gen::new(u64::from(port)), Sha256::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        // Bounded: at most 1,000 messages (12 MB), past any window and send buffer on the
        // way to the upstream end (the relay's send buffer grows to a few MB).
        for _ in 0..1_000 {
            let msg = gen.bytes(STALL_MESSAGE);
            client.write_all(&msg).expect("write a message to stall");
            digest.update(&msg);
            sent += msg.len() as u64;
            // Counted: send the next. Uncounted for 100 scrapes in a row (a send with room
            // is counted within a millisecond): stalled.
            let mut stuck = 0;
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = poll(left, Duration::from_millis(5), || {
                let (counted, _) = bytes_counted(metrics, port);
                if counted == sent as f64 {
                    return Some(false);
                }
                stuck += 1;
                (stuck >= 100).then_some(true)
            });
            match outcome {
                Some(true) => {
                    return Stalled {
                        client,
                        far,
                        sent,
                        digest,
                    }
                }
                Some(false) => continue,
                None => panic!(
                    "no stall within 20 s: after {sent} bytes ({} messages, each sent once the \
                     previous one was counted) the relay has counted {:?} and holds copy \
                     buffers (in_use, idle) {:?}",
                    sent / STALL_MESSAGE as u64,
                    bytes_counted(metrics, port),
                    copy_buffers(metrics)
                ),
            }
        }
        panic!("the upstream end took {sent} bytes without reading: no stall");
    }

    /// Lets the stalled bytes through: the client half-closes, the upstream end reads to
    /// EOF and must get every byte sent.
    fn release(mut self) {
        self.client
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
        let got = read_to_end(&mut self.far);
        assert_eq!(
            got.len() as u64,
            self.sent,
            "bytes of the stalled connection"
        );
        let want: [u8; 32] = self.digest.finalize().into();
        assert_eq!(hex(&sha256(&got)), hex(&want), "the stalled bytes differ");
    }
}

data_path_test!(copy_path_survives_a_dry_buffer_pool);
/// One loop with one copy buffer (`PORTRELAY_TEST_COPY_BUFFERS=1`), and a connection whose
/// upstream end does not read, stalled with bytes held (in that buffer, or in a buffer of
/// the loop's own when the pool was dry as it read them). Then 20 connections at once each
/// exchange 200 small messages and one 1 MiB burst (which streams: spliced) through an
/// echo, contending for the one buffer (each read that finds none is the loop's own):
/// every byte is echoed in order. Once the stalled connection is let through its bytes
/// arrive whole, and the buffer is back, idle.
fn copy_path_survives_a_dry_buffer_pool(backend: Backend) {
    const CONNECTIONS: usize = 20;
    const MESSAGES: usize = 200;
    const BUFFERS: f64 = 1.0;
    let echo = Upstream::echo();
    let upstream = small_window_listener();
    let [port, stall_a, metrics] = free_ports::<3>();
    let toml = relay_section(Some(metrics), "")
        + &map_section(port, echo.addr(), "dry", "")
        + &map_section(stall_a, upstream.local_addr().unwrap(), "stall-a", "");
    let how = Start::default()
        .threads(1)
        .env(&[("PORTRELAY_TEST_COPY_BUFFERS", &BUFFERS.to_string())]);
    let relay = Relay::start_with(&toml, backend, how);
    wait_all_buffers_back(metrics, BUFFERS, "at start (the one loop's buffers)");
    let stalls = [Stalled::start(stall_a, &upstream, metrics)];

    let burst = Arc::new(Gen::new(3).bytes(1 << 20));
    let results: Vec<Result<u64, String>> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|c| {
                let burst = &burst;
                scope.spawn(move || -> Result<u64, String> {
                    let mut gen = Gen::new(100 + c as u64);
                    let mut conn = try_connect(port)?;
                    let mut sent = 0;
                    for i in 0..MESSAGES {
                        if i == MESSAGES / 2 {
                            echo_burst(&mut conn, burst)?;
                            sent += burst.len() as u64;
                        }
                        let msg = gen.message(1, 1000);
                        echo_once(&mut conn, &msg).map_err(|e| format!("message {i}: {e}"))?;
                        sent += msg.len() as u64;
                    }
                    conn.shutdown(Shutdown::Write)
                        .map_err(|e| format!("shutdown(Write): {e}"))?;
                    let mut rest = Vec::new();
                    conn.read_to_end(&mut rest)
                        .map_err(|e| format!("read to EOF: {e}"))?;
                    if !rest.is_empty() {
                        return Err(format!("{} bytes after the last echo", rest.len()));
                    }
                    Ok(sent)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let failures: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("connection {c}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let sent: u64 = results.iter().map(|r| *r.as_ref().unwrap()).sum();
    let lines = relay.wait_logs(
        |l| l.is_closed_on(port),
        CONNECTIONS,
        Duration::from_secs(10),
    );
    for line in &lines {
        assert_eq!(line.reason(), "client_eof", "{line}");
    }
    let logged: u64 = lines
        .iter()
        .map(|l| l.num("bytes_client_to_upstream"))
        .sum();
    assert_eq!(logged, sent, "bytes to the upstream in the close lines");
    assert_eq!(echo.bytes_in(), sent, "bytes at the echo");
    wait_bytes_counted(metrics, port, (sent, sent), "the echoed connections");

    // Counted when a send completes: the stalled sends' bytes, once through, exactly once.
    for (stall, port) in stalls.into_iter().zip([stall_a]) {
        let sent = stall.sent;
        stall.release();
        let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
        assert_eq!(line.num("bytes_client_to_upstream"), sent, "{line}");
        wait_bytes_counted(metrics, port, (sent, 0), "a stalled connection");
    }
    wait_all_buffers_back(metrics, BUFFERS, "after the stalls ended");
}

/// What a hashing echo saw on its connections: the SHA-256 of each one's bytes, at EOF.
type Digests = Arc<Mutex<Vec<[u8; 32]>>>;

/// An upstream that echoes every byte and, at end of stream, records the SHA-256 of what it
/// read.
fn hashing_echo() -> (Upstream, Digests) {
    let digests = Digests::default();
    let record = digests.clone();
    let listener = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    let upstream = Upstream::serve(listener, move |mut conn, stats| {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read_some(&mut conn, &mut buf)?;
            if n == 0 {
                record.lock().unwrap().push(hash.finalize().into());
                return conn.shutdown(Shutdown::Write);
            }
            stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
            hash.update(&buf[..n]);
            conn.write_all(&buf[..n])?;
        }
    });
    (upstream, digests)
}

data_path_test!(copy_path_messages_stay_in_order_across_splice_switches);
/// One connection alternating small messages and bursts that stream (64 KiB, 1 byte,
/// 1 MiB, 10 bytes, ...), each echoed whole before the next: a direction switches from the
/// copy path to splice and back again and again, in both directions. The upstream's
/// SHA-256 of what it got is the client's of what it sent, and the client's of what came
/// back is the same: nothing lost, nothing out of order.
fn copy_path_messages_stay_in_order_across_splice_switches(backend: Backend) {
    let sizes: &[usize] = &[
        64 << 10,
        1,
        1 << 20,
        10,
        200,
        16 << 10,
        3,
        (16 << 10) + 1,
        1000,
        256 << 10,
        1,
        2,
        (1 << 20) + 7,
        15,
        64 << 10,
        100,
        4 << 20,
        1,
    ];
    let (upstream, digests) = hashing_echo();
    let (relay, port, metrics) = relay_to(upstream.addr(), "switch", Start::default(), backend);
    let mut gen = Gen::new(4);
    let mut conn = connect(port);
    let (mut sent, mut back) = (Sha256::new(), Sha256::new());
    let mut total = 0u64;
    for round in 0..3 {
        for (i, &size) in sizes.iter().enumerate() {
            let msg = Arc::new(gen.bytes(size));
            sent.update(&msg[..]);
            echo_burst(&mut conn, &msg)
                .unwrap_or_else(|e| panic!("round {round}, message {i} ({size} bytes): {e}"));
            back.update(&msg[..]);
            total += size as u64;
        }
    }
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let rest = read_to_end(&mut conn);
    assert!(rest.is_empty(), "{} bytes after the last echo", rest.len());
    let (sent, back): ([u8; 32], [u8; 32]) = (sent.finalize().into(), back.finalize().into());
    assert_eq!(hex(&back), hex(&sent), "what came back");
    let got = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        digests.lock().unwrap().first().copied()
    })
    .expect("the upstream's digest at EOF");
    assert_eq!(hex(&got), hex(&sent), "what the upstream got");
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    assert_eq!(line.num("bytes_client_to_upstream"), total, "{line}");
    assert_eq!(line.num("bytes_upstream_to_client"), total, "{line}");
    assert_eq!(upstream.bytes_in(), total, "bytes at the upstream");
    wait_bytes_counted(metrics, port, (total, total), "after the close");
    wait_all_buffers_back(metrics, default_buffers(THREADS), "after the connection");
    // The bursts were spliced: their pipes are pooled now.
    let s = Scrape::take(metrics);
    assert_eq!(s.value("portrelay_pipes", &[("state", "in_use")]), 0.0);
    assert!(
        s.value("portrelay_pipes", &[("state", "idle")]) >= 1.0,
        "no pipe pooled: the bursts were never spliced"
    );
}
