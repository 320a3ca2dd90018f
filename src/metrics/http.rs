//! The `/metrics` endpoint: one thread that polls its listener and every client at once.
//!
//! Why one `poll(2)` thread, and not a thread per request or a pool: a client that connects
//! and says nothing (a port scanner, a stuck scraper) must not delay anyone, and a pool of
//! `N` blocking threads is stalled by `N` silent clients. Here a silent client costs a slot
//! and a few bytes until its header timeout, and a scrape is answered as soon as its
//! request has arrived, whatever the others do. An HTTP server crate would bring an async
//! runtime (hyper and what is built on it) into the relay's process, or threads that block
//! on one client each; this is a few hundred lines of std, and flate2 for gzip.
//!
//! - At most [`MAX_CLIENTS`] at once; when full, a new client takes the place of the oldest
//!   one that has not finished its request.
//! - The request head must arrive within [`HEADER_TIMEOUT`] of the connect (a client that
//!   sends a byte a second is cut then) and be at most [`MAX_HEAD`] bytes (else `431`).
//! - `GET` and `HEAD /metrics` (any query string); `404` for other paths, `405` with
//!   `Allow` for other methods, `400` for what is not HTTP/1.x; one request per connection.
//! - gzip when the request's `Accept-Encoding` allows it (Prometheus asks for it).
//! - The response must be taken within [`WRITE_TIMEOUT`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_CLIENTS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_HEAD: usize = 8192;
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a paused endpoint looks whether it may accept again.
const PAUSED_RECHECK: Duration = Duration::from_millis(100);
/// How long accepting rests after an error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the exposition that `render` writes on `addr`, from a thread of its own. Returns
/// the address once it is listening.
pub fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> io::Result<SocketAddr> {
    serve_on(TcpListener::bind(addr)?, render)
}

/// Whether the endpoint takes new clients: not while an upgrade hands its listener over
/// (the new process takes them then, and a scrape must never see the old process's
/// counters after the new one's). Held while accepting, so that once
/// [`pause_accepting`] returns no client is taken here.
static ACCEPTING: Mutex<bool> = Mutex::new(true);
/// The listening socket's descriptor (-1: none), to hand over at an upgrade.
static LISTENER: AtomicI32 = AtomicI32::new(-1);

pub fn pause_accepting() {
    *ACCEPTING.lock().unwrap_or_else(|e| e.into_inner()) = false;
}

pub fn resume_accepting() {
    *ACCEPTING.lock().unwrap_or_else(|e| e.into_inner()) = true;
}

/// Set once an upgrade has handed the listener over: the endpoint's thread ends (within
/// the paused recheck) and closes its copy of the listener.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Ends the endpoint for good (it must be paused: see [`pause_accepting`]).
pub fn stop() {
    STOPPED.store(true, Ordering::Relaxed);
}

pub fn listener_fd() -> Option<RawFd> {
    Some(LISTENER.load(Ordering::Relaxed)).filter(|fd| *fd >= 0)
}

/// [`serve`] on a listening socket already open (inherited at an upgrade).
pub fn serve_on(
    listener: TcpListener,
    render: impl Fn() -> String + Send + 'static,
) -> io::Result<SocketAddr> {
    listener.set_nonblocking(true)?;
    LISTENER.store(listener.as_raw_fd(), Ordering::Relaxed);
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            Server {
                listener,
                clients: Vec::new(),
                accept_after: None,
            }
            .run(&render)
        })?;
    Ok(local)
}

struct Server {
    listener: TcpListener,
    clients: Vec<Client>,
    /// Set after an accept error: accepting resumes then.
    accept_after: Option<Instant>,
}

struct Client {
    stream: TcpStream,
    state: State,
    /// Reading: end of the header timeout. Writing: end of the write timeout.
    deadline: Instant,
}

enum State {
    Reading(Vec<u8>),
    Writing { out: Vec<u8>, sent: usize },
}

impl Server {
    fn run(mut self, render: &dyn Fn() -> String) {
        let mut fds = Vec::new();
        loop {
            if STOPPED.load(Ordering::Relaxed) {
                LISTENER.store(-1, Ordering::Relaxed);
                return;
            }
            let now = Instant::now();
            if self.accept_after.is_some_and(|t| t <= now) {
                self.accept_after = None;
            }
            fds.clear();
            let accepting = *ACCEPTING.lock().unwrap_or_else(|e| e.into_inner());
            let listening = self.accept_after.is_none() && accepting;
            fds.push(pollfd(self.listener.as_raw_fd(), listening, false));
            for c in &self.clients {
                let writing = matches!(c.state, State::Writing { .. });
                fds.push(pollfd(c.stream.as_raw_fd(), !writing, writing));
            }
            let next = self
                .clients
                .iter()
                .map(|c| c.deadline)
                .chain(self.accept_after)
                .chain((!accepting).then(|| now + PAUSED_RECHECK))
                .min();
            if let Err(e) = poll(&mut fds, next.map(|t| t.saturating_duration_since(now))) {
                tracing::warn!(error = %e, "metrics endpoint: poll failed");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            let now = Instant::now();
            let mut events = fds[1..].iter().map(|f| f.revents);
            self.clients.retain_mut(|c| {
                let ready = events.next().unwrap_or(0) != 0;
                c.step(ready, now, render)
            });
            if listening && fds[0].revents != 0 {
                self.accept(now);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        let accepting = ACCEPTING.lock().unwrap_or_else(|e| e.into_inner());
        if !*accepting {
            return;
        }
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed; backing off");
                    self.accept_after = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                // The oldest client still reading has had the most time to send its request.
                let oldest = self
                    .clients
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| matches!(c.state, State::Reading(_)))
                    .min_by_key(|(_, c)| c.deadline)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => drop(self.clients.swap_remove(i)),
                    None => continue, // all are being answered: this one is closed
                }
            }
            if stream.set_nonblocking(true).is_ok() {
                self.clients.push(Client {
                    stream,
                    state: State::Reading(Vec::new()),
                    deadline: now + HEADER_TIMEOUT,
                });
            }
        }
    }
}

impl Client {
    /// Moves the client on; `false` when it is done (and is then closed).
    fn step(&mut self, ready: bool, now: Instant, render: &dyn Fn() -> String) -> bool {
        if now >= self.deadline {
            if let State::Reading(_) = self.state {
                // Best effort: a client this slow may not read it.
                let _ = self.stream.write(&response(Status::Timeout, ""));
            }
            return false;
        }
        if !ready {
            return true;
        }
        if let State::Reading(head) = &mut self.state {
            match read_head(&mut self.stream, head) {
                Ok(Some(out)) => {
                    self.state = State::Writing {
                        out: answer(&out, render),
                        sent: 0,
                    };
                    self.deadline = now + WRITE_TIMEOUT;
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        let State::Writing { out, sent } = &mut self.state else {
            return true;
        };
        while *sent < out.len() {
            match self.stream.write(&out[*sent..]) {
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        false
    }
}

/// Reads what has arrived; `Some(head)` once the request head is complete (or has grown
/// past [`MAX_HEAD`]: then all of it so far). `Err` when the client went away first.
fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 2048];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if head_end(head).is_some() || head.len() > MAX_HEAD {
            return Ok(Some(std::mem::take(head)));
        }
    }
}

/// Where the request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    TooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::Timeout => "408 Request Timeout",
            Status::TooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// A request head, as far as the endpoint cares.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    gzip: bool,
}

/// Parses a complete request head; `None` when it is not HTTP/1.x.
fn parse(head: &[u8]) -> Option<Request<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.lines();
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.trim_end().starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let mut gzip = false;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("accept-encoding") {
            gzip |= accepts_gzip(value);
        }
    }
    let path = target.split('?').next().unwrap_or("");
    Some(Request { method, path, gzip })
}

/// Whether an `Accept-Encoding` value allows gzip (`gzip` or `*`, without `q=0`).
fn accepts_gzip(value: &str) -> bool {
    value.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q == 0.0)
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// The whole response to a request head (complete, or cut at [`MAX_HEAD`]).
fn answer(head: &[u8], render: &dyn Fn() -> String) -> Vec<u8> {
    if head_end(head).is_none() {
        return response(Status::TooLarge, "request head too large\n");
    }
    let Some(req) = parse(head) else {
        return response(Status::BadRequest, "bad request\n");
    };
    let mut out = match (req.method, req.path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render();
            let body = match req.gzip {
                true => gzip(body.as_bytes()),
                false => body.into_bytes(),
            };
            let mut out = head_bytes(Status::Ok, body.len(), req.gzip);
            out.extend_from_slice(&body);
            out
        }
        ("GET" | "HEAD", _) => response(Status::NotFound, "portrelay serves /metrics\n"),
        _ => response(Status::MethodNotAllowed, "GET or HEAD /metrics\n"),
    };
    if req.method == "HEAD" {
        out.truncate(head_end(&out).expect("a head we wrote"));
    }
    out
}

fn response(status: Status, body: &str) -> Vec<u8> {
    let mut out = head_bytes(status, body.len(), false);
    out.extend_from_slice(body.as_bytes());
    out
}

fn head_bytes(status: Status, length: usize, gzip: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {length}\r\nConnection: close\r\n",
        status.line()
    );
    if gzip {
        head.push_str("Content-Encoding: gzip\r\n");
    }
    if status == Status::MethodNotAllowed {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use flate2::write::GzEncoder;
    let mut enc = GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    enc.write_all(body).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

fn pollfd(fd: RawFd, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2) for at most `timeout` (`None`: until something is ready); EINTR is not an error.
#[allow(unsafe_code)]
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    // Round up, so that a deadline 0.4 ms away is not polled for 0 ms again and again.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
    });
    // SAFETY: `fds` is a live, exclusively borrowed slice of `pollfd` for the whole call,
    // and its length is passed with it; the kernel writes only `revents` inside it. The fds
    // belong to the listener and clients, which outlive the call (a closed fd would only
    // make poll report POLLNVAL, never touch memory).
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(out: &[u8]) -> String {
        String::from_utf8_lossy(out).to_string()
    }

    fn render() -> String {
        "m 1\n".to_string()
    }

    #[test]
    fn answers_each_kind_of_request() {
        let get = text(&answer(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            &render,
        ));
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("\r\nContent-Length: 4\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\nm 1\n"), "{get}");

        let head = text(&answer(b"HEAD /metrics?x=1 HTTP/1.0\n\n", &render));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 4\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        let other = text(&answer(b"GET / HTTP/1.1\r\n\r\n", &render));
        assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
        let other = text(&answer(b"HEAD / HTTP/1.1\r\n\r\n", &render));
        assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
        assert!(other.ends_with("\r\n\r\n"), "HEAD has no body: {other}");

        let post = text(&answer(b"POST /metrics HTTP/1.1\r\n\r\n", &render));
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");

        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"\r\n\r\n",
            b"GET /metrics SSH-2.0\r\n\r\n",
        ] {
            let out = text(&answer(bad, &render));
            assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        }

        let big = vec![b'a'; MAX_HEAD + 1];
        let out = text(&answer(&big, &render));
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[test]
    fn gzip_when_asked() {
        let out = answer(
            b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n",
            &render,
        );
        let end = head_end(&out).unwrap();
        let head = text(&out[..end]);
        assert!(head.contains("\r\nContent-Encoding: gzip\r\n"), "{head}");
        let mut body = String::new();
        flate2::read::GzDecoder::new(&out[end..])
            .read_to_string(&mut body)
            .unwrap();
        assert_eq!(body, "m 1\n");
    }

    #[test]
    fn accept_encoding() {
        for (value, gzip) in [
            ("gzip", true),
            (" deflate, GZIP;q=0.5", true),
            ("*", true),
            ("gzip;q=0", false),
            ("identity", false),
            ("", false),
            ("x-gzip2", false),
        ] {
            assert_eq!(accepts_gzip(value), gzip, "{value:?}");
        }
    }
}
