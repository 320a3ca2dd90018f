//! Ports, in-process upstreams and client helpers, all on 127.0.0.x.
//!
//! An [`Upstream`] is a listener on port 0 with one accept thread and one thread per
//! connection (small stacks, so a few thousand are fine), counting what it sees.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// How long any single read or write of a test socket may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A port of 127.0.0.1 that was free a moment ago, below the ephemeral range: a port-0
/// bind would hand out an ephemeral port, which a client's connect() elsewhere in the suite
/// may take as its own local port before the relay binds it (EADDRINUSE).
pub fn free_port() -> u16 {
    free_ports_in_a_row(1)
}

/// A port-0 bind: an ephemeral port (for when the fallback needs one).
fn ephemeral_port() -> u16 {
    TcpListener::bind((LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Listeners on `n` consecutive ports of 127.0.0.1.
///
/// Not from a port-0 bind: the kernel hands out odd ports to bind(0) and even ones to
/// connect(), and after the many-connection tests the even ports of the ephemeral range sit
/// in TIME_WAIT for a minute, which blocks bind even with SO_REUSEADDR. So the run starts
/// at a random port below the ephemeral range (where neither hands out ports), each one
/// checked by binding it; a port-0 bind and its neighbours are the fallback.
pub fn listeners_in_a_row(n: u16) -> Vec<TcpListener> {
    use rand::Rng;
    assert!(n >= 1);
    let try_run = |start: u16| -> Option<Vec<TcpListener>> {
        (0..n)
            .map(|i| listen((LOCALHOST, start.checked_add(i)?).into()).ok())
            .collect()
    };
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 10_000 + n {
        for _ in 0..500 {
            let start = rand::thread_rng().gen_range(10_000..ephemeral_low - n);
            if let Some(run) = try_run(start) {
                return run;
            }
        }
    }
    for _ in 0..200 {
        let port = ephemeral_port();
        for start in port.saturating_sub(n - 1)..=port {
            if let Some(run) = try_run(start) {
                return run;
            }
        }
    }
    panic!("found no {n} consecutive free ports of 127.0.0.1");
}

/// The first of `n` consecutive ports of 127.0.0.1 that were free a moment ago.
pub fn free_ports_in_a_row(n: u16) -> u16 {
    listeners_in_a_row(n)[0].local_addr().unwrap().port()
}

/// What an upstream has seen.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted so far.
    pub accepted: AtomicUsize,
    /// Connections whose handler has not returned yet.
    pub active: AtomicUsize,
    /// Bytes read from all connections.
    pub bytes_in: AtomicU64,
}

/// An in-process upstream: accepts on its own thread, one thread per connection. Stops
/// accepting when dropped (connections already handed out run to their end).
pub struct Upstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

struct ActiveGuard(Arc<Stats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Upstream {
    /// Serves `listener`, calling `handler` on a new thread for each connection.
    pub fn serve(
        listener: TcpListener,
        handler: impl Fn(TcpStream, &Stats) -> io::Result<()> + Send + Sync + 'static,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let (stats2, stop2) = (stats.clone(), stop.clone());
        thread::Builder::new()
            .name(format!("upstream-{}", addr.port()))
            .spawn(move || {
                let mut errors = 0;
                while errors < 100 {
                    let conn = match listener.accept() {
                        Ok((conn, _)) => conn,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    };
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                    stats2.accepted.fetch_add(1, Ordering::SeqCst);
                    stats2.active.fetch_add(1, Ordering::SeqCst);
                    let guard = ActiveGuard(stats2.clone());
                    let handler = handler.clone();
                    // On spawn failure the closure (connection and guard) is dropped.
                    let _ = thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            let _ = handler(conn, &guard.0);
                            drop(guard);
                        });
                }
            })
            .expect("spawn accept thread");
        Upstream { addr, stats, stop }
    }

    /// Echoes every byte back; at end of stream shuts down its write side.
    pub fn echo() -> Upstream {
        Self::echo_on(bind0())
    }

    pub fn echo_on(listener: TcpListener) -> Upstream {
        Self::serve(listener, |mut conn, stats| echo_until_eof(&mut conn, stats))
    }

    /// Sends `reply` as soon as a connection is accepted, shuts down its write side, then
    /// reads (and counts) until the peer's end of stream before closing, so that closing
    /// never resets a connection with unread bytes.
    pub fn reply(reply: Vec<u8>) -> Upstream {
        Self::reply_on(bind0(), reply)
    }

    pub fn reply_on(listener: TcpListener, reply: Vec<u8>) -> Upstream {
        Self::serve(listener, move |mut conn, stats| {
            conn.write_all(&reply)?;
            conn.shutdown(Shutdown::Write)?;
            drain(&mut conn, stats)
        })
    }

    /// Reads until end of stream, then sends the SHA-256 of what it read followed by
    /// `payload`, and closes. A client that does not half-close never gets a reply.
    pub fn digest_then(payload: Vec<u8>) -> Upstream {
        Self::serve(bind0(), move |mut conn, stats| {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = read_some(&mut conn, &mut buf)?;
                if n == 0 {
                    break;
                }
                stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
                hash.update(&buf[..n]);
            }
            conn.write_all(&hash.finalize())?;
            conn.write_all(&payload)?;
            conn.shutdown(Shutdown::Write)
        })
    }

    /// A minimal HTTP/1.1 server: any request gets `200 OK` with `body`, then the
    /// connection is closed.
    pub fn http(body: Vec<u8>) -> Upstream {
        Self::serve(bind0(), move |mut conn, stats| {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                if request.len() > 64 * 1024 {
                    return Err(io::Error::other("request head too long"));
                }
                let n = read_some(&mut conn, &mut buf)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
                request.extend_from_slice(&buf[..n]);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes())?;
            conn.write_all(&body)?;
            conn.shutdown(Shutdown::Write)?;
            drain(&mut conn, stats)
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    pub fn active(&self) -> usize {
        self.stats.active.load(Ordering::SeqCst)
    }

    pub fn bytes_in(&self) -> u64 {
        self.stats.bytes_in.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// `read`, retried when a signal interrupts it.
pub fn read_some(conn: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match conn.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn bind0() -> TcpListener {
    listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0")
}

/// A listener on `addr` with a long accept queue (std's is 128): thousands of connections
/// may arrive faster than one accept thread spawns their threads, and a full queue drops
/// SYNs, which costs the connecting side a 1 s retransmit.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Reads and counts until end of stream.
fn drain(conn: &mut TcpStream, stats: &Stats) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = read_some(conn, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// An address on 127.0.0.1 that never answers a SYN: a listener with backlog 0 that never
/// accepts, whose queue is filled first. The constructor checks that a connect to it does
/// time out.
pub struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl BlackHole {
    pub fn new() -> BlackHole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener
            .bind(&SocketAddr::from((LOCALHOST, 0)).into())
            .expect("bind 127.0.0.1:0");
        listener.listen(0).expect("listen");
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let probe = Duration::from_millis(300);
        let mut queued = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&addr, probe) {
                Ok(conn) => queued.push(conn),
                Err(e) if is_timeout(&e) => {
                    // Full: SYNs are now dropped. Check once more that it stays so.
                    let again = TcpStream::connect_timeout(&addr, probe);
                    assert!(
                        matches!(&again, Err(e) if is_timeout(e)),
                        "black hole {addr} answered a SYN after its queue was full: {again:?}"
                    );
                    return BlackHole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    };
                }
                Err(e) => panic!("connect to the black hole {addr}: {e}"),
            }
        }
        panic!("the queue of {addr} (backlog 0) took 16 connections and is still not full");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// Echoes every byte of `conn` back, counting them; at end of stream shuts down its write
/// side.
pub fn echo_until_eof(conn: &mut TcpStream, stats: &Stats) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(conn, &mut buf)?;
        stats.bytes_in.fetch_add(n as u64, Ordering::SeqCst);
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

/// A client connection to 127.0.0.1:`port`, with [`IO_TIMEOUT`] on reads and writes.
pub fn connect(port: u16) -> TcpStream {
    connect_from(LOCALHOST, port)
}

/// A client connection from source address `src` (port 0) to 127.0.0.1:`port`.
pub fn connect_from(src: Ipv4Addr, port: u16) -> TcpStream {
    try_connect_from(src, port)
        .unwrap_or_else(|e| panic!("connect from {src} to 127.0.0.1:{port}: {e}"))
}

/// [`connect_from`], returning the error.
pub fn try_connect_from(src: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    let addr = SocketAddr::from((LOCALHOST, port));
    socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
    let conn: TcpStream = socket.into();
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// A connection from `src` to 127.0.0.1:`port` that the far end must close without sending
/// a byte: it writes `send` (if the connection is still up), then expects EOF or a reset
/// within `within`. A reset that arrives before connect returns counts (the relay accepted
/// and reset at once). Returns how it ended and how long that took from the connect.
pub fn connect_expect_closed(
    src: Ipv4Addr,
    port: u16,
    send: &[u8],
    within: Duration,
) -> (Closed, Duration) {
    let start = Instant::now();
    let mut conn = match try_connect_from(src, port) {
        Ok(conn) => conn,
        Err(e) if is_reset(&e) => return (Closed::Reset, start.elapsed()),
        Err(e) => panic!("connect from {src} to 127.0.0.1:{port}: {e}"),
    };
    if !send.is_empty() {
        // The far end may already have closed: a failed write is fine here.
        let _ = conn.write_all(send);
    }
    let (closed, _) = expect_closed(&mut conn, within.saturating_sub(start.elapsed()));
    (closed, start.elapsed())
}

/// How soon a refusal must arrive to count as "at once": an RST for a connection the relay
/// refuses, ECONNREFUSED for a listener it closed. Loose enough for a loaded 2-core
/// machine, far below any timeout of the relay's.
pub const AT_ONCE: Duration = Duration::from_secs(1);

/// A connection from `src` to 127.0.0.1:`port` that the relay must refuse at once: it
/// writes `send`, then must get an RST (ECONNRESET, not a FIN, not a timeout) within
/// [`AT_ONCE`] of the connect, with no byte before. Returns how long that took.
pub fn connect_expect_reset(src: Ipv4Addr, port: u16, send: &[u8]) -> Duration {
    let (closed, took) = connect_expect_closed(src, port, send, AT_ONCE);
    assert_eq!(
        closed,
        Closed::Reset,
        "a refused connection from {src} to port {port} ended with a FIN after {took:?}, not an RST"
    );
    took
}

fn is_reset(e: &io::Error) -> bool {
    e.kind() == ErrorKind::ConnectionReset
}

/// Writes `data` and reads back exactly as many bytes, which must equal it.
pub fn roundtrip(conn: &mut TcpStream, data: &[u8]) {
    conn.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    conn.read_exact(&mut back).expect("read the echo");
    assert!(back == data, "echo differs from what was sent");
}

/// How a connection ended, from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// A FIN: `read` returned 0.
    Eof,
    /// An RST: `read` failed with ECONNRESET.
    Reset,
}

/// The one "connection ended" reader of the suite: reads from `conn` until the far end
/// closes it, for at most `within`. Returns what arrived before the end (at most 64 KiB),
/// how it ended, and how long that took. Only EOF and ECONNRESET are an end; any other
/// read error, more bytes, or the deadline passing panics.
pub fn read_until_closed(conn: &mut TcpStream, within: Duration) -> (Vec<u8>, Closed, Duration) {
    const MAX: usize = 64 * 1024;
    let start = Instant::now();
    let deadline = start + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: each pass reads bytes (at most MAX in all), ends, panics, or was
    // interrupted by a signal.
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return (got, Closed::Eof, start.elapsed()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(
                    got.len() <= MAX,
                    "expected the connection to end; it sent more than {MAX} bytes"
                );
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (got, Closed::Reset, start.elapsed())
            }
            Err(e) if is_timeout(&e) => break,
            Err(e) => panic!(
                "read (after {} bytes): {e}; a connection ends with EOF or ECONNRESET",
                got.len()
            ),
        }
    }
    panic!(
        "connection still open after {within:?} (got {} bytes: {:?})",
        got.len(),
        String::from_utf8_lossy(&got)
    )
}

/// Reads from `conn`, which must end (EOF or reset) within `within` without delivering a
/// single byte. Returns how it ended and how long that took.
pub fn expect_closed(conn: &mut TcpStream, within: Duration) -> (Closed, Duration) {
    let (got, closed, took) = read_until_closed(conn, within);
    assert!(
        got.is_empty(),
        "expected the connection to be closed, got {} bytes: {:?}",
        got.len(),
        String::from_utf8_lossy(&got)
    );
    (closed, took)
}

/// `conn` must be reset (ECONNRESET, not a FIN) within `within`, with no byte before.
/// Returns how long that took.
pub fn expect_reset(conn: &mut TcpStream, within: Duration) -> Duration {
    let (closed, took) = expect_closed(conn, within);
    assert_eq!(
        closed,
        Closed::Reset,
        "the connection ended with a FIN after {took:?}; expected a reset"
    );
    took
}

/// A connect to 127.0.0.1:`port` is refused (ECONNREFUSED: nothing listens there).
pub fn assert_refused(port: u16) {
    let addr = SocketAddr::from((LOCALHOST, port));
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("connect to port {port}: {e}, expected refused"),
        Ok(mut conn) => {
            // Say what answered: the relay would close it (no route) or relay it.
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            let got = conn.read(&mut buf);
            panic!("port {port} still accepts connections (then read {got:?})");
        }
    }
}

/// Reads until end of stream; a reset or a stall past [`IO_TIMEOUT`] panics.
pub fn read_to_end(conn: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    conn.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read to end of stream (after {} bytes): {e}", out.len()));
    out
}

/// `GET /` from 127.0.0.1:`port`: the body of a `200 OK` whose length matches its
/// Content-Length.
pub fn http_get(port: u16) -> Vec<u8> {
    let mut conn = connect(port);
    conn.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let response = read_to_end(&mut conn);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {} bytes", response.len()));
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = response[split + 4..].to_vec();
    assert!(head.starts_with("HTTP/1.1 200 "), "status: {head}");
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head}"));
    assert_eq!(body.len(), length, "body length vs Content-Length");
    body
}

/// Accepts one connection on `listener` within `within` (polling a non-blocking accept
/// every 5 ms), with [`IO_TIMEOUT`] on its reads and writes. Panics when none comes.
pub fn accept_within(listener: &TcpListener, within: Duration) -> TcpStream {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let accepted = super::poll(within, Duration::from_millis(5), || {
        match listener.accept() {
            Ok((conn, _)) => Some(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    });
    let conn = accepted.unwrap_or_else(|| {
        panic!(
            "no connection to {:?} within {within:?}",
            listener.local_addr()
        )
    });
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    conn
}

/// Closes `conn` with an RST (SO_LINGER 0), as a crashed or killed peer's kernel does.
pub fn reset(conn: TcpStream) {
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(conn);
}
