//! The admin socket: a unix stream socket (mode 0600) on which `portrelay sessions` and
//! `portrelay kill` ask the running relay about its live connections.
//!
//! - `protocol`: the request and reply lines (pure; docs/admin-protocol.md).
//! - `client`: the command line's side: connect, ask, print.
//!
//! The server runs on threads of its own, never in an event loop: one accepts, and each
//! admin connection has a thread (at most [`MAX_CLIENTS`] at once), so that a client that
//! never finishes its request holds only its own thread, and only for [`REQUEST_TIMEOUT`].
//! The loops are asked through their mailboxes ([`Sessions`]).

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::relay::Sessions;

pub mod client;
pub mod protocol;

use protocol::{Reply, Request, MAX_LINE};

/// How long a client has to send each complete request line (and to take its reply).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; one more is answered "busy" and closed.
pub const MAX_CLIENTS: usize = 16;

/// Why the admin socket cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: its directory does not exist")]
    NoDirectory { path: PathBuf },
    #[error("admin socket {path}: a relay is already answering on it; not taking it over")]
    InUse { path: PathBuf },
    #[error("admin socket {path}: a file that is not a socket is there; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("admin socket {path}: {step}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The open admin socket. Dropping it stops serving and removes the socket file (if it is
/// still ours: not one a later relay made there).
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file we made.
    file: (u64, u64),
    stop: Arc<AtomicBool>,
    /// A second descriptor of the listening socket, to wake the accepting thread.
    wake: OwnedFd,
}

impl Server {
    /// Opens the admin socket at `path` and serves it from a thread of its own. A socket
    /// file that nobody answers on (left by a relay that died) is replaced; one that a
    /// live relay answers on is an error, as is any other file there.
    pub fn start(path: &Path, sessions: Sessions) -> Result<Server, AdminError> {
        let err = |step, source| AdminError::Io {
            path: path.to_owned(),
            step,
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            return Err(AdminError::NoDirectory {
                path: path.to_owned(),
            });
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(AdminError::InUse {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    tracing::info!(path = %path.display(), "replacing a stale admin socket");
                    std::fs::remove_file(path)
                        .map_err(|e| err("cannot remove the stale socket", e))?;
                }
                Err(e) => return Err(err("cannot tell whether a relay answers on it", e)),
            },
            Ok(_) => {
                return Err(AdminError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("cannot look at it", e)),
        }
        // bind, chmod, then listen: until listen() no one can connect, so no one connects
        // while the file has the umask's mode.
        let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
            .map_err(|e| err("socket", e))?;
        let addr = SockAddr::unix(path).map_err(|e| err("bad path", e))?;
        socket.bind(&addr).map_err(|e| err("bind", e))?;
        let made = (|| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            socket.listen(16)?;
            let meta = std::fs::symlink_metadata(path)?;
            Ok::<_, io::Error>((meta.dev(), meta.ino()))
        })();
        let file = match made {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(err("chmod or listen", e));
            }
        };
        let listener: UnixListener = UnixListener::from(OwnedFd::from(socket));
        let wake = listener
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|e| err("dup", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_forever(listener, sessions, thread_stop));
        if let Err(e) = spawned {
            let _ = std::fs::remove_file(path);
            return Err(err("cannot start its thread", e));
        }
        tracing::info!(path = %path.display(), "admin socket open");
        Ok(Server {
            path: path.to_owned(),
            file,
            stop,
            wake,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The admin socket a reload asks for: `current` follows `wanted`, live. When the new
    /// one cannot be opened, the old one stays (and the error is logged).
    pub fn follow(current: &mut Option<Server>, wanted: Option<&Path>, sessions: &Sessions) {
        if current.as_ref().map(Server::path) == wanted {
            return;
        }
        let Some(path) = wanted else {
            *current = None;
            return;
        };
        match Server::start(path, sessions.clone()) {
            Ok(server) => *current = Some(server),
            Err(e) => tracing::error!(
                error = %e,
                "cannot open the new admin socket; the old one (if any) stays"
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = socket2::SockRef::from(&self.wake).shutdown(std::net::Shutdown::Both);
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The accepting thread. It never ends on its own: an accept error (EMFILE) is logged and
/// retried after a pause, and a panic is logged and the loop starts again.
fn accept_forever(listener: UnixListener, sessions: Sessions, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            accept_one(&listener, &sessions, &active, &stop)
        }));
        if let Err(panic) = turn {
            tracing::error!(panic = %panic_text(&*panic), "admin socket: the accepting thread panicked; accepting again");
        }
    }
}

fn accept_one(
    listener: &UnixListener,
    sessions: &Sessions,
    active: &Arc<AtomicUsize>,
    stop: &AtomicBool,
) {
    let stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(_) if stop.load(Ordering::Acquire) => return,
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: accept failed; backing off");
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
    };
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        active.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::admin_request(false);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&stream).write_all(
            Reply::error(format!("busy: {MAX_CLIENTS} admin connections are open"))
                .encode()
                .as_bytes(),
        );
        return;
    }
    let (sessions, left) = (sessions.clone(), active.clone());
    let spawned = std::thread::Builder::new()
        .name("admin-client".into())
        .spawn(move || {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve(stream, &sessions)
            }));
            if let Err(panic) = served {
                tracing::error!(panic = %panic_text(&*panic), "admin socket: a request panicked; its connection is closed");
            }
            left.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        // The closure and its stream are dropped with the error: the client sees a close.
        active.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(error = %e, "admin socket: cannot start a thread for a client");
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

/// Why reading a request line stopped.
enum LineEnd {
    /// The client closed, with nothing unanswered.
    Closed,
    /// No complete line within the timeout.
    TimedOut,
    /// A line longer than [`MAX_LINE`].
    TooLong,
    Failed,
}

/// Serves one admin connection: each request line gets its reply line, until the client
/// closes, goes quiet for [`REQUEST_TIMEOUT`], or sends a line that is too long.
fn serve(mut stream: UnixStream, sessions: &Sessions) {
    let mut buf = Vec::new();
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    loop {
        let (reply, last) = match read_line(&mut stream, &mut buf) {
            Ok(line) => {
                let (reply, delivered) = answer(&line, sessions);
                // An upgrade's old process waits for this reply to be written.
                crate::metrics::admin_request(!matches!(reply, Reply::Error { .. }));
                let sent = stream.write_all(reply.encode().as_bytes());
                drop(delivered);
                if sent.is_err() {
                    return;
                }
                continue;
            }
            Err(LineEnd::Closed) => return,
            Err(LineEnd::TimedOut) => (
                Reply::error(format!(
                    "no complete request line within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )),
                true,
            ),
            Err(LineEnd::TooLong) => (
                Reply::error(format!("request line longer than {MAX_LINE} bytes")),
                true,
            ),
            Err(LineEnd::Failed) => return,
        };
        crate::metrics::admin_request(!matches!(reply, Reply::Error { .. }));
        if stream.write_all(reply.encode().as_bytes()).is_err() || last {
            return;
        }
    }
}

/// The next request line (without its newline; a last line without one counts), read
/// within [`REQUEST_TIMEOUT`] from now. `buf` keeps what follows it.
fn read_line(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, LineEnd> {
    let until = Instant::now() + REQUEST_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line = buf[..end].to_vec();
            buf.drain(..=end);
            return Ok(line);
        }
        if buf.len() >= MAX_LINE {
            return Err(LineEnd::TooLong);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LineEnd::TimedOut);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|_| LineEnd::Failed)?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.iter().all(u8::is_ascii_whitespace) => return Err(LineEnd::Closed),
            Ok(0) => return Ok(std::mem::take(buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(LineEnd::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(LineEnd::Failed),
        }
    }
}

/// The reply to one request line (with, for an upgrade, the token to drop once the reply
/// is written).
fn answer(line: &[u8], sessions: &Sessions) -> (Reply, Option<crate::upgrade::Delivered>) {
    let request = match protocol::parse(line) {
        Ok(r) => r,
        Err(why) => {
            tracing::info!(error = %why, "admin socket: bad request");
            return (Reply::error(why), None);
        }
    };
    #[cfg(debug_assertions)]
    inject_fault(&request);
    let reply = match request {
        Request::Sessions { map } => match sessions.list(map.as_deref()) {
            Ok(sessions) => Reply::Sessions {
                v: protocol::VERSION,
                sessions,
            },
            Err(e) => Reply::error(e.to_string()),
        },
        Request::Kill(selector) => match sessions.kill(selector.clone()) {
            Ok(killed) => {
                // Each one has its close line; this says who asked for what.
                tracing::info!(killed = killed.len(), selector = ?selector, "admin socket: kill");
                Reply::Killed {
                    v: protocol::VERSION,
                    killed,
                }
            }
            Err(e) => Reply::error(e.to_string()),
        },
        Request::Upgrade { binary } => {
            let (result, delivered) = crate::upgrade::ask(binary.map(std::path::PathBuf::from));
            let reply = match result {
                Ok(r) => Reply::Upgraded {
                    v: protocol::VERSION,
                    pid: r.pid,
                    moved: r.moved,
                    stayed: r.stayed,
                    ms: r.ms,
                },
                Err(e) => Reply::error(format!("upgrade rolled back: {e}")),
            };
            return (reply, Some(delivered));
        }
    };
    (reply, None)
}

/// Debug builds only (the tests' binary): with `PORTRELAY_TEST_FAULT=admin-panic`, a
/// `sessions` request for the mapping `panic` panics as a bug would, so that the tests can
/// check that only its admin connection ends. Release builds have no such switch.
#[cfg(debug_assertions)]
fn inject_fault(request: &Request) {
    let asked = matches!(request, Request::Sessions { map: Some(m) } if m == "panic");
    if asked && std::env::var("PORTRELAY_TEST_FAULT").as_deref() == Ok("admin-panic") {
        panic!("injected fault");
    }
}
