//! Upgrading the relay in place without cutting a connection: the running process starts
//! the new binary, which inherits every listener and every relayed connection (its sockets,
//! and its pipes with the bytes in flight) and reads each connection's state from a memfd.
//!
//! 1. Preflight: `NEW --handoff-info` names the state versions it reads; an incompatible
//!    binary is refused before anything changes.
//! 2. Freeze: each loop stops accepting (accepts in the kernel called back), records its
//!    connections and waits, moving no byte. TLS sessions cannot move (rustls state):
//!    they stay here.
//! 3. The state goes into a memfd; the new binary is started with the same arguments and
//!    `PORTRELAY_HANDOFF=<memfd>,<line>`, the handed-over descriptors left open
//!    across exec (close-on-exec is cleared in the child only, between fork and exec).
//! 4. The new process checks every descriptor against its record, adopts (watching,
//!    accepting, timing and connecting nothing yet), and writes `adopted` on the line
//!    between the two. This process answers `go` and lets go of its copies (no FIN: the
//!    new process holds the sockets), and exits once what stayed has ended; only on `go`
//!    does the new process start moving bytes and accepting. Any failure before `go` (the
//!    binary exits, times out, refuses a record) rolls back: the new process is killed,
//!    having moved nothing, and the loops here go on as if nothing happened.
//!
//! `state` is the layout, `wire` its primitives.
#![allow(unsafe_code)]

pub mod state;
pub mod wire;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::relay::{Relay, Verdict};
use crate::sys;
use state::{ListenerRecord, State, STATE_VERSION};

/// The environment variable that tells a starting relay it is taking over.
pub const HANDOFF_ENV: &str = "PORTRELAY_HANDOFF";
/// How long the new process has to adopt everything.
pub const ADOPT_TIMEOUT: Duration = Duration::from_secs(10);
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(5);
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The line `--handoff-info` prints: the state versions this binary reads.
pub fn handoff_info() -> String {
    // Debug builds (the tests' binary): PORTRELAY_TEST_STATE_VERSION names another version,
    // to test the refusal of an incompatible binary.
    #[cfg(debug_assertions)]
    let version = std::env::var("PORTRELAY_TEST_STATE_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(STATE_VERSION);
    #[cfg(not(debug_assertions))]
    let version = STATE_VERSION;
    format!("portrelay-handoff state-versions={version}")
}

/// What the old process knows that the state needs besides the loops' records.
pub struct Context {
    pub config_text: String,
    pub generation: u64,
    /// The arguments the relay was started with (argv[1..]).
    pub args: Vec<OsString>,
}

/// A finished upgrade, as the old process saw it.
pub struct Outcome {
    pub pid: u32,
    pub moved: usize,
    pub stayed: usize,
    pub ms: u64,
    /// The new process, to be reaped when this one has nothing left to do.
    pub child: Child,
}

/// The old process's side: hands everything over to `binary`. On `Err` the relay is
/// running as before (rolled back), and the error says why.
pub fn hand_over(relay: &mut Relay, binary: &Path, ctx: &Context) -> Result<Outcome, String> {
    let started = Instant::now();
    preflight(binary)?;
    crate::metrics::http::pause_accepting();
    let crate::relay::FrozenRelay {
        records,
        stayed,
        loops,
    } = match relay.freeze(FREEZE_TIMEOUT) {
        Ok(f) => f,
        Err(e) => {
            crate::metrics::http::resume_accepting();
            return Err(e);
        }
    };
    let moved = records.len();
    let state = State {
        version: STATE_VERSION,
        from_pid: std::process::id(),
        next_id: crate::relay::next_id(),
        generation: ctx.generation,
        config_text: ctx.config_text.clone(),
        listeners: relay
            .listener_fds()
            .into_iter()
            .map(|(addr, fd)| ListenerRecord { addr, fd })
            .collect(),
        metrics_fd: crate::metrics::http::listener_fd(),
        counters: crate::metrics::snapshot_state(),
        connections: records,
    };
    match spawn_and_wait(binary, &state, ctx) {
        Ok(child) => {
            let pid = child.id();
            Relay::verdict(&loops, Verdict::Commit);
            relay.let_go_of_listeners();
            crate::metrics::http::stop();
            Ok(Outcome {
                pid,
                moved,
                stayed,
                ms: started.elapsed().as_millis() as u64,
                child,
            })
        }
        Err(e) => {
            Relay::verdict(&loops, Verdict::Rollback);
            crate::metrics::http::resume_accepting();
            Err(e)
        }
    }
}

/// Runs `binary --handoff-info` and checks that it reads this state version.
fn preflight(binary: &Path) -> Result<(), String> {
    let mut child = Command::new(binary)
        .arg("--handoff-info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let status = wait_deadline(&mut child, Instant::now() + PREFLIGHT_TIMEOUT);
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            return Err(format!(
                "{} --handoff-info failed ({s}): not a portrelay that can take over",
                binary.display()
            ))
        }
        None => {
            return Err(format!(
                "{} --handoff-info did not answer",
                binary.display()
            ))
        }
    }
    let versions: Vec<u32> = out
        .trim()
        .strip_prefix("portrelay-handoff state-versions=")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    if !versions.contains(&STATE_VERSION) {
        return Err(format!(
            "{} reads state versions {versions:?}, this relay writes version {STATE_VERSION}: incompatible",
            binary.display()
        ));
    }
    Ok(())
}

fn wait_deadline(child: &mut Child, until: Instant) -> Option<std::process::ExitStatus> {
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes the state to a memfd, starts the new process with it and waits for `adopted`.
/// On failure the new process is killed and reaped.
fn spawn_and_wait(binary: &Path, state: &State, ctx: &Context) -> Result<Child, String> {
    let memfd = sys::memfd(c"portrelay-handoff").map_err(|e| format!("memfd: {e}"))?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&state.encode())
        .and_then(|_| file.rewind())
        .map_err(|e| format!("writing the state: {e}"))?;
    let (ready_r, ready_w) = control_pair().map_err(|e| format!("socketpair: {e}"))?;
    let mut inherit: Vec<RawFd> = state.fds();
    inherit.push(file.as_raw_fd());
    inherit.push(ready_w.as_raw_fd());
    let mut cmd = Command::new(binary);
    cmd.args(&ctx.args).env(
        HANDOFF_ENV,
        format!("{},{}", file.as_raw_fd(), ready_w.as_raw_fd()),
    );
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl(2),
    // which is async-signal-safe, on descriptor numbers computed before the fork; it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    drop(ready_w);
    drop(file);
    match wait_adopted(&ready_r, &mut child) {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// The two ends of the line between the processes: the new one says `adopted`, the old
/// one answers `go` (a stream socket pair, close-on-exec).
fn control_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both are new fds that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads from `fd` until `want` has come, the other end closes, or `until`. A line that has
/// arrived by the deadline counts: it is read before the deadline is looked at.
fn read_line_until(fd: &OwnedFd, want: &[u8], until: Instant) -> Result<(), LineEnd> {
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let readable = sys::wait_readable_for(fd.as_raw_fd(), left).map_err(LineEnd::Failed)?;
        if readable {
            let mut buf = [0u8; 64];
            // SAFETY: `buf` is valid for writes of its length for the call.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                got.extend_from_slice(&buf[..n as usize]);
                if got.starts_with(want) {
                    return Ok(());
                }
                continue;
            }
            let e = std::io::Error::last_os_error();
            if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n < 0 {
                return Err(LineEnd::Failed(e));
            }
            return Err(LineEnd::Closed);
        }
        if Instant::now() >= until {
            return Err(LineEnd::TimedOut);
        }
    }
}

enum LineEnd {
    Closed,
    TimedOut,
    Failed(std::io::Error),
}

/// Waits for the new process's `adopted`, its exit, or [`ADOPT_TIMEOUT`]; then answers
/// `go`, after which the new process moves bytes and this one must let go.
fn wait_adopted(line: &OwnedFd, child: &mut Child) -> Result<(), String> {
    match read_line_until(line, b"adopted\n", Instant::now() + ADOPT_TIMEOUT) {
        Ok(()) => {}
        Err(LineEnd::TimedOut) => {
            return Err(format!(
                "the new process did not adopt within {ADOPT_TIMEOUT:?}"
            ))
        }
        Err(LineEnd::Failed(e)) => return Err(format!("waiting for the new process: {e}")),
        Err(LineEnd::Closed) => {
            let status = wait_deadline(child, Instant::now() + Duration::from_secs(2));
            return Err(match status {
                Some(s) => format!("the new process exited before adopting ({s})"),
                None => "the new process closed its line before adopting".to_string(),
            });
        }
    }
    // The new process is the service from here on: systemd hears it from the main process
    // (NotifyAccess=main), before the new one says READY=1 or pings the watchdog, which it
    // does only after `go`. No byte has moved in the new process yet: until `go` is
    // written, killing it is a clean rollback (and the main process is this one again).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(child.id())]);
    let go = line
        .try_clone()
        .and_then(|l| std::fs::File::from(l).write_all(b"go\n"));
    if let Err(e) = go {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
        return Err(format!("the new process went away after adopting: {e}"));
    }
    Ok(())
}

/// The new process's side: what `PORTRELAY_HANDOFF` hands it.
pub struct Handoff {
    pub state: State,
    /// Every handed-over descriptor, by number, close-on-exec again.
    pub fds: HashMap<RawFd, OwnedFd>,
    ready: OwnedFd,
}

impl Handoff {
    /// `None` when this is no upgrade (the variable is not set).
    pub fn from_env() -> Option<Result<Handoff, String>> {
        let value = std::env::var(HANDOFF_ENV).ok()?;
        std::env::remove_var(HANDOFF_ENV);
        Some(Handoff::take(&value))
    }

    fn take(value: &str) -> Result<Handoff, String> {
        let (memfd, ready) = value
            .split_once(',')
            .and_then(|(a, b)| Some((a.parse::<RawFd>().ok()?, b.parse::<RawFd>().ok()?)))
            .ok_or_else(|| format!("{HANDOFF_ENV}={value}: not two descriptors"))?;
        let own = |fd: RawFd| -> Result<OwnedFd, String> {
            sys::file_type(fd).map_err(|e| format!("handed-over fd {fd}: {e}"))?;
            sys::set_cloexec(fd, true).map_err(|e| format!("fd {fd}: {e}"))?;
            // SAFETY: the old process handed this descriptor to us, and it is open (fstat
            // above); each number is taken once (checked by the callers).
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let ready = own(ready)?;
        let mut bytes = Vec::new();
        std::fs::File::from(own(memfd)?)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the state: {e}"))?;
        let state = State::decode(&bytes).map_err(|e| e.to_string())?;
        let mut fds = HashMap::new();
        for fd in state.fds() {
            if fd == memfd || fd == ready.as_raw_fd() || fds.contains_key(&fd) {
                return Err(format!("fd {fd} is named twice in the state"));
            }
            fds.insert(fd, own(fd)?);
        }
        Ok(Handoff { state, fds, ready })
    }

    /// The inherited listeners, by address (taken out of `fds`).
    pub fn listeners(&mut self) -> HashMap<std::net::SocketAddr, OwnedFd> {
        let mut out = HashMap::new();
        for l in &self.state.listeners {
            if let Some(fd) = self.fds.remove(&l.fd) {
                out.insert(l.addr, fd);
            }
        }
        out
    }

    /// The inherited metrics listener, if one was handed over.
    pub fn metrics_listener(&mut self) -> Option<std::net::TcpListener> {
        let fd = self.fds.remove(&self.state.metrics_fd?)?;
        Some(std::net::TcpListener::from(fd))
    }

    /// Tells the old process that everything is adopted and waits for its `go`: from
    /// then on this process moves the bytes and the old one lets go. Without a `go` (the
    /// old process rolled back, or is gone) nothing may move: the caller exits.
    pub fn report_adopted(self) -> Result<(), String> {
        let mut f = std::fs::File::from(self.ready.try_clone().map_err(|e| e.to_string())?);
        f.write_all(b"adopted\n")
            .map_err(|e| format!("telling the old process: {e}"))?;
        match read_line_until(&self.ready, b"go\n", Instant::now() + ADOPT_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(LineEnd::TimedOut) => Err("the old process did not answer `adopted`".into()),
            Err(LineEnd::Closed) => Err("the old process rolled back".into()),
            Err(LineEnd::Failed(e)) => Err(format!("waiting for the old process: {e}")),
        }
    }
}

/// The path to start at an upgrade by default: the relay's own executable as it was
/// named when it started (a package upgrade replaces the file there).
pub fn default_binary() -> PathBuf {
    static START: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    START
        .get_or_init(|| {
            std::env::current_exe()
                .ok()
                .map(|p| {
                    let s = p.to_string_lossy();
                    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
                })
                .unwrap_or_else(|| PathBuf::from("/usr/bin/portrelay"))
        })
        .clone()
}

/// An upgrade asked for on the admin socket, for the control thread to carry out.
pub struct Ask {
    pub binary: Option<PathBuf>,
    pub answer: std::sync::mpsc::Sender<Result<Report, String>>,
    /// Disconnected once the asker has passed the answer on (written it to its client): the
    /// old process waits for that before it exits.
    pub delivered: std::sync::mpsc::Receiver<()>,
}

/// Held by the asker until it has passed the answer on; dropping it says so.
pub struct Delivered(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

/// What an upgrade came to, for whoever asked.
#[derive(Clone, Debug)]
pub struct Report {
    pub pid: u32,
    pub moved: usize,
    pub stayed: usize,
    pub ms: u64,
}

type AskHandler = Box<dyn Fn(Ask) -> bool + Send + Sync>;
static ASKS: std::sync::OnceLock<AskHandler> = std::sync::OnceLock::new();

/// Where [`ask`] sends its requests (the control thread's channel); `false` from the
/// handler: the control thread is gone.
pub fn on_ask(handler: impl Fn(Ask) -> bool + Send + Sync + 'static) {
    let _ = ASKS.set(Box::new(handler));
}

/// Asks the control thread for an upgrade and waits for its end. Drop the [`Delivered`]
/// once the answer is passed on.
pub fn ask(binary: Option<PathBuf>) -> (Result<Report, String>, Delivered) {
    let (dtx, drx) = std::sync::mpsc::channel();
    let delivered = Delivered(dtx);
    let Some(handler) = ASKS.get() else {
        return (
            Err("this relay takes no upgrade requests".into()),
            delivered,
        );
    };
    let (tx, rx) = std::sync::mpsc::channel();
    if !handler(Ask {
        binary,
        answer: tx,
        delivered: drx,
    }) {
        return (Err("the relay is stopping".into()), delivered);
    }
    let limit = PREFLIGHT_TIMEOUT + FREEZE_TIMEOUT + ADOPT_TIMEOUT + Duration::from_secs(10);
    let result = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| Err("the upgrade did not finish in time".to_string()));
    (result, delivered)
}

/// Waits (at most a second) until the asker has passed its answer on.
pub fn wait_delivered(delivered: &std::sync::mpsc::Receiver<()>) {
    let _ = delivered.recv_timeout(Duration::from_secs(1));
}
