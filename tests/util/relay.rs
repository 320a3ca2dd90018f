//! The real `portrelay` binary: control files, `check`, and a running relay whose JSON log
//! the tests read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::log::LogLine;
use super::process::{self, tee_lines};
use super::upgrade::Successors;

pub const BIN: &str = env!("CARGO_BIN_EXE_portrelay");

/// How long the relay has to open every listener and log `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The io backend a relay runs with (`--io-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }

    /// Why this machine cannot run this backend at all, if it cannot. Only the kernel is
    /// asked, never the relay: a relay that fails on a capable kernel must fail its tests.
    pub fn unavailable(self) -> Option<String> {
        match self {
            Backend::Epoll => None,
            Backend::Uring => {
                // On a thread of its own: tearing a ring down queues task work on the
                // thread that made it, which interrupts that thread's blocking socket calls
                // (EINTR) a little later; a test thread must not be that thread.
                static PROBE: OnceLock<Option<String>> = OnceLock::new();
                PROBE
                    .get_or_init(|| {
                        std::thread::spawn(probe_uring)
                            .join()
                            .unwrap_or_else(|_| Some("the io_uring probe panicked".into()))
                    })
                    .clone()
            }
        }
    }
}

/// Whether the kernel lets this process create an io_uring that has the opcodes the relay
/// uses (accept, connect with a linked timeout, poll, cancel).
fn probe_uring() -> Option<String> {
    use io_uring::{opcode, IoUring, Probe};
    if let Ok(value) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if value.trim() != "0" {
            return Some(format!("kernel.io_uring_disabled = {}", value.trim()));
        }
    }
    let ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => return Some(format!("io_uring_setup failed: {e}")),
    };
    let mut probe = Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return Some(format!("IORING_REGISTER_PROBE failed: {e}"));
    }
    let needed = [
        ("Accept", opcode::Accept::CODE),
        ("Connect", opcode::Connect::CODE),
        ("LinkTimeout", opcode::LinkTimeout::CODE),
        ("PollAdd", opcode::PollAdd::CODE),
        ("PollRemove", opcode::PollRemove::CODE),
        ("AsyncCancel", opcode::AsyncCancel::CODE),
        ("Timeout", opcode::Timeout::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, code)| !probe.is_supported(*code))
        .map(|(name, _)| *name)
        .collect();
    (!missing.is_empty()).then(|| format!("io_uring lacks opcodes {missing:?}"))
}

/// The environment switch that lets a test on a backend this machine lacks be skipped
/// (printed, and counted as a pass) instead of failing. CI refuses it.
pub const ALLOW_SKIP: &str = "PORTRELAY_TEST_ALLOW_SKIP";

/// Whether the environment says this is a CI run (`CI` set to anything but `""`, `0` or
/// `false`, as CI services and `.ci/run` set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Runs `test` on `backend`. When the machine lacks the backend the test fails, unless
/// [`ALLOW_SKIP`]`=1` outside CI makes it a printed skip: a skipped io_uring test must
/// never pass for one that ran.
pub fn run_on(test: fn(Backend), backend: Backend) {
    if let Some(reason) = backend.unavailable() {
        let allowed = std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1");
        if allowed && !in_ci() {
            eprintln!("SKIPPED on {} ({ALLOW_SKIP}=1): {reason}", backend.name());
            return;
        }
        let why = if allowed {
            format!(
                "{ALLOW_SKIP}=1 is refused in CI (CI is set): CI runs every test on both backends"
            )
        } else {
            format!("set {ALLOW_SKIP}=1 to skip such tests outside CI")
        };
        panic!(
            "the {} backend is unavailable on this machine: {reason}; {why}",
            backend.name()
        );
    }
    test(backend);
}

/// Runs a data-path test on both backends: after `fn NAME(backend: Backend) { … }`,
/// `data_path_test!(NAME);` adds the `#[test]`s `NAME::uring` and `NAME::epoll` (a module
/// and a function may share a name). Filter with `cargo nextest run NAME`, or
/// `-E 'test(/::uring$/)'` for one backend.
macro_rules! data_path_test {
    ($name:ident) => {
        mod $name {
            #[test]
            fn uring() {
                $crate::util::relay::run_on(super::$name, $crate::util::Backend::Uring);
            }

            #[test]
            fn epoll() {
                $crate::util::relay::run_on(super::$name, $crate::util::Backend::Epoll);
            }
        }
    };
}
pub(crate) use data_path_test;

/// The `[relay]` section every test starts from: listen on 127.0.0.1 only, metrics on
/// 127.0.0.1:`metrics` (or off), 1 s upstream connect timeout; `extra` adds lines
/// (`key = value\n`). The one `[relay]` builder of the suite.
pub fn relay_section(metrics: Option<u16>, extra: &str) -> String {
    let metrics = metrics.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
    format!(
        "[relay]\nbind = [\"127.0.0.1\"]\nmetrics = \"{metrics}\"\nconnect_timeout = \"1s\"\n{extra}\n"
    )
}

/// A `[[map]]` section for one host port (a number), or a range (`"\"A-B\""`, quoted);
/// `extra` adds lines. The one `[[map]]` builder of the suite.
pub fn map_section(
    port: impl std::fmt::Display,
    to: SocketAddr,
    name: &str,
    extra: &str,
) -> String {
    format!("[[map]]\nport = {port}\nto = \"{to}\"\nname = \"{name}\"\n{extra}\n")
}

/// An `allow = [...]` line for `map_section`'s `extra` (empty: no line, the default).
pub fn allow_line(cidrs: &[&str]) -> String {
    if cidrs.is_empty() {
        return String::new();
    }
    let cidrs: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!("allow = [{}]\n", cidrs.join(", "))
}

/// A control file in its own tempdir.
pub struct ControlFile {
    _dir: TempDir,
    path: PathBuf,
}

impl ControlFile {
    pub fn new(toml: &str) -> ControlFile {
        let dir = tempfile::Builder::new()
            .prefix("portrelay-test-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("portrelay.toml");
        std::fs::write(&path, toml).expect("write control file");
        ControlFile { _dir: dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `portrelay check --config FILE`: its exit status and stderr.
    pub fn check(&self) -> (ExitStatus, String) {
        let out = process::run(
            Command::new(BIN)
                .arg("check")
                .arg("--config")
                .arg(&self.path),
            Duration::from_secs(20),
        );
        (out.status, out.stderr)
    }

    /// `portrelay run --config FILE ARGS…`, for a file that must make it exit (invalid):
    /// its exit status and stderr. Panics if it is still running after 20 s.
    pub fn run_expecting_exit(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = process::run(
            Command::new(BIN)
                .arg("run")
                .arg("--config")
                .arg(&self.path)
                .args(args),
            Duration::from_secs(20),
        );
        (out.status, out.stderr)
    }
}

/// `portrelay check` on a control file with this text: its exit status and stderr.
pub fn run_check(toml: &str) -> (ExitStatus, String) {
    ControlFile::new(toml).check()
}

#[derive(Default)]
struct LogState {
    lines: Vec<LogLine>,
    /// The relay's stderr has ended (it exited).
    closed: bool,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

/// A running `portrelay run --log-format json`. Killed (SIGKILL) on drop if still running.
///
/// A live upgrade (`super::upgrade`) replaces its process: [`Relay::pid`], the signals,
/// [`Relay::exited`], [`Relay::wait_exit`] and the drop act on the current one, and the log
/// keeps coming through the same stderr pipe, which the new process inherits.
pub struct Relay {
    /// The process the test started.
    child: Child,
    /// The processes upgrades started, oldest first: the last one is the relay now.
    successors: Successors,
    log: Arc<Log>,
    backend: Backend,
    control: ControlFile,
}

/// How a test starts a relay, besides its control file and backend.
#[derive(Clone, Debug)]
pub struct Start {
    /// `--io-backend`: the backend's own name unless set (say to `"auto"`, where `ready`
    /// must still name the backend of the test).
    pub io_backend: Option<&'static str>,
    /// `--threads`: 4 unless set, so that every path between loops runs even on a
    /// machine with fewer cores.
    pub threads: usize,
    /// Extra environment variables for the relay process (set after the harness's own, so
    /// they may override them).
    pub env: Vec<(String, String)>,
    /// The binary: the test build unless set (say `target/release/portrelay`).
    pub program: PathBuf,
    /// Run the relay under a seccomp filter that fails `io_uring_setup` with EPERM, as
    /// Docker's default profile does.
    pub deny_io_uring: bool,
    /// A program (and its arguments) that runs the relay: `program` and the relay's
    /// arguments follow it (say `setpriv --bounding-set=-net_admin --`). Empty: none.
    pub wrapper: Vec<String>,
}

/// The harness's relays run this many event loops.
pub const THREADS: usize = 4;

impl Default for Start {
    fn default() -> Start {
        Start {
            io_backend: None,
            threads: THREADS,
            env: Vec::new(),
            program: PathBuf::from(BIN),
            deny_io_uring: false,
            wrapper: Vec::new(),
        }
    }
}

impl Start {
    pub fn env(mut self, env: &[(&str, &str)]) -> Start {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    pub fn threads(mut self, threads: usize) -> Start {
        self.threads = threads;
        self
    }
}

/// A seccomp filter program (classic BPF) that fails `io_uring_setup` with EPERM and lets
/// every other system call through; `None` on an architecture it does not know.
fn deny_io_uring_filter() -> Option<Vec<libc::sock_filter>> {
    const AUDIT_ARCH: u32 = if cfg!(target_arch = "x86_64") {
        0xC000_003E
    } else if cfg!(target_arch = "aarch64") {
        0xC000_00B7
    } else {
        0
    };
    if AUDIT_ARCH == 0 {
        return None;
    }
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld_abs, jeq, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    Some(vec![
        // struct seccomp_data: int nr at 0, u32 arch at 4.
        stmt(ld_abs, 4),
        jump(jeq, AUDIT_ARCH, 0, 3),
        stmt(ld_abs, 0),
        jump(jeq, libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ])
}

impl Relay {
    /// Writes `toml` to a tempdir, starts the relay on `backend`, and returns once it has
    /// logged `ready` (which must name that backend). Panics with the log otherwise.
    pub fn start(toml: &str, backend: Backend) -> Relay {
        Self::start_with(toml, backend, Start::default())
    }

    /// [`Relay::start`], with extra environment variables for the relay process.
    pub fn start_with_env(toml: &str, backend: Backend, env: &[(&str, &str)]) -> Relay {
        Self::start_with(toml, backend, Start::default().env(env))
    }

    /// [`Relay::start`] as `how` says.
    pub fn start_with(toml: &str, backend: Backend, how: Start) -> Relay {
        use std::os::unix::process::CommandExt;
        let control = ControlFile::new(toml);
        let mut cmd = match how.wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut cmd = Command::new(wrapper);
                cmd.args(args).arg(&how.program);
                cmd
            }
            None => Command::new(&how.program),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(control.path())
            .arg("--io-backend")
            .arg(how.io_backend.unwrap_or(backend.name()))
            .arg("--threads")
            .arg(how.threads.to_string())
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            // Whatever systemd told the test runner is not for the relay under test.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(how.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if how.deny_io_uring {
            let filter = deny_io_uring_filter()
                .expect("a seccomp filter for io_uring_setup on this architecture");
            // SAFETY: between fork and exec only prctl(2) runs (async-signal-safe, no
            // allocation). `prog` points into `filter`, which the closure owns and which
            // lives until the child execs.
            unsafe {
                cmd.pre_exec(move || {
                    let prog = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::prctl(
                            libc::PR_SET_SECCOMP,
                            libc::SECCOMP_MODE_FILTER,
                            &prog as *const libc::sock_fprog,
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let program = how.program.clone();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        tee_lines(child.stdout.take().unwrap(), "[relay stdout]", |_| {});
        let log = Arc::new(Log::default());
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        let successors = Successors::new(&stderr);
        std::thread::spawn(move || {
            tee_lines(stderr, "[relay]", {
                let sink = sink.clone();
                move |line| {
                    sink.state.lock().unwrap().lines.push(LogLine::new(line));
                    sink.changed.notify_all();
                }
            })
            .join()
            .ok();
            sink.state.lock().unwrap().closed = true;
            sink.changed.notify_all();
        });
        let mut relay = Relay {
            child,
            successors,
            log,
            backend,
            control,
        };
        let ready = match relay.find_logs(|l| l.msg() == "ready", 1, READY_TIMEOUT) {
            Ok(ready) => ready,
            Err(why) => {
                let status = process::wait_deadline(&mut relay.child, Duration::from_secs(1));
                panic!(
                    "relay on {} not ready (exit status {status:?}): {why}",
                    backend.name()
                );
            }
        };
        assert_eq!(
            ready[0].str("backend"),
            Some(backend.name()),
            "`ready` must name the backend asked for: {}",
            ready[0]
        );
        relay
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pid of the relay's current process (after an upgrade, the new one's).
    pub fn pid(&self) -> u32 {
        self.successors.current().unwrap_or(self.child.id())
    }

    /// Makes `pid`, started by an upgrade, the relay's current process, now running
    /// `backend`.
    pub(super) fn succeeded_by(&mut self, pid: u32, backend: Backend) {
        self.successors.push(pid);
        self.backend = backend;
    }

    pub fn config_path(&self) -> &Path {
        self.control.path()
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        let state = self.log.state.lock().unwrap();
        state.lines.iter().map(|l| l.raw.clone()).collect()
    }

    /// Every stderr line so far, parsed.
    pub fn log_lines(&self) -> Vec<LogLine> {
        self.log.state.lock().unwrap().lines.clone()
    }

    /// The first log line (since start) for which `pred` holds, waiting up to `timeout`
    /// for it. Panics with the log when there is none by then.
    pub fn wait_log(&self, pred: impl Fn(&LogLine) -> bool, timeout: Duration) -> LogLine {
        self.wait_logs(pred, 1, timeout).remove(0)
    }

    /// The first `count` log lines (since start) for which `pred` holds, waiting up to
    /// `timeout` for them. Panics with the log when there are fewer by then.
    pub fn wait_logs(
        &self,
        pred: impl Fn(&LogLine) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<LogLine> {
        self.find_logs(pred, count, timeout)
            .unwrap_or_else(|why| panic!("{why}"))
    }

    fn find_logs(
        &self,
        pred: impl Fn(&LogLine) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<LogLine>, String> {
        let deadline = Instant::now() + timeout;
        let mut found = Vec::new();
        let mut seen = 0;
        let mut state = self.log.state.lock().unwrap();
        loop {
            found.extend(state.lines[seen..].iter().filter(|l| pred(l)).cloned());
            seen = state.lines.len();
            if found.len() >= count {
                found.truncate(count);
                return Ok(found);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let why = if state.closed {
                    "the relay exited (its stderr closed)".to_string()
                } else {
                    format!("{timeout:?} passed")
                };
                let dump = dump(&state.lines);
                drop(state);
                return Err(format!(
                    "found {} of {count} wanted log lines; {why}; log:\n{dump}",
                    found.len()
                ));
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Sends SIGTERM; the relay must still be running.
    pub fn sigterm(&mut self) {
        self.signal(libc::SIGTERM, "TERM");
    }

    /// Sends SIGHUP (reload the control file); the relay must still be running.
    pub fn sighup(&mut self) {
        self.signal(libc::SIGHUP, "HUP");
    }

    /// Sends `signal` (named `name`) to the relay's current process, which must still be
    /// running.
    pub(super) fn signal(&mut self, signal: libc::c_int, name: &str) {
        if let Some(status) = self.exited() {
            panic!("SIG{name} to a relay that already exited ({status})");
        }
        // SAFETY: kill(2) with no memory involved. The pid is a process of this relay that
        // was running just now and that nobody but `self` reaps (the test's own child, or
        // one an upgrade started, which only `self` waits for), so it names no other
        // process.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill -{name}: {}", std::io::Error::last_os_error());
    }

    /// Replaces the control file the way a host agent does: writes `toml` to a temporary
    /// file in the same directory, then renames it over the control file (a new inode).
    pub fn rewrite(&self, toml: &str) {
        use std::io::Write;
        let path = self.control.path();
        let dir = path.parent().expect("control file dir");
        let mut tmp = tempfile::Builder::new()
            .prefix(".portrelay.toml.")
            .tempfile_in(dir)
            .expect("temp file next to the control file");
        tmp.write_all(toml.as_bytes())
            .expect("write temp control file");
        tmp.flush().expect("flush temp control file");
        tmp.persist(path)
            .unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
    }

    /// Rewrites the control file in place: truncates the same inode and writes `toml`.
    pub fn rewrite_in_place(&self, toml: &str) {
        use std::io::Write;
        let path = self.control.path();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {} for rewriting: {e}", path.display()));
        file.write_all(toml.as_bytes())
            .unwrap_or_else(|e| panic!("rewrite {}: {e}", path.display()));
    }

    /// The `reloaded` line of generation `generation` (the file the relay started with is
    /// generation 1), waiting up to `timeout` for it. Panics with the log when there is
    /// none by then.
    pub fn wait_reloaded(&self, generation: u64, timeout: Duration) -> LogLine {
        self.wait_log(
            |l| l.msg() == "reloaded" && l.u64("generation") == Some(generation),
            timeout,
        )
    }

    /// The generation in force as far as the log tells: the highest `reloaded` generation
    /// so far, or 1 before any reload.
    pub fn generation(&self) -> u64 {
        let state = self.log.state.lock().unwrap();
        state
            .lines
            .iter()
            .filter(|l| l.msg() == "reloaded")
            .filter_map(|l| l.u64("generation"))
            .max()
            .unwrap_or(1)
    }

    /// `Some(status)` once the relay (its current process) has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process_exited(self.pid())
    }

    /// `Some(status)` once the relay's process `pid` (the one the test started, or one an
    /// upgrade started) has exited.
    pub fn process_exited(&mut self, pid: u32) -> Option<ExitStatus> {
        if pid == self.child.id() {
            self.child.try_wait().expect("try_wait")
        } else {
            self.successors.try_wait(pid)
        }
    }

    /// Waits for the relay (its current process) to exit, and for its log to end; panics
    /// with the log if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = self.wait_process_exit(self.pid(), timeout);
        self.wait_log_end(Duration::from_secs(5));
        status
    }

    /// Waits for the relay's process `pid` to exit; panics with the log if it is still
    /// running after `timeout`.
    pub fn wait_process_exit(&mut self, pid: u32, timeout: Duration) -> ExitStatus {
        let status = super::poll(timeout, Duration::from_millis(10), || {
            self.process_exited(pid)
        });
        status.unwrap_or_else(|| {
            panic!(
                "relay process {pid} still running {timeout:?} later; log:\n{}",
                dump(&self.log.state.lock().unwrap().lines)
            )
        })
    }
}

impl Relay {
    /// Waits until the log reader has read the relay's stderr to its end, so that
    /// [`Relay::log_lines`] holds every line the relay wrote before it exited (its last lines
    /// may still be in the pipe when the process is reaped). Bounded by `timeout`: a process
    /// that inherited the relay's stderr could keep it open.
    fn wait_log_end(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().unwrap();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The processes upgrades started, and any other writing to the relay's log (a new
        // process of an upgrade the test never learnt of), ended by pid.
        self.successors.kill_all(self.child.id());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.successors.reap_all();
    }
}

/// The log for a panic message: all of it, or its first and last lines when long.
fn dump(lines: &[LogLine]) -> String {
    const KEEP: usize = 100;
    if lines.len() <= 2 * KEEP {
        return lines
            .iter()
            .map(|l| l.raw.as_str())
            .collect::<Vec<_>>()
            .join("\n");
    }
    let mut out: Vec<&str> = lines[..KEEP].iter().map(|l| l.raw.as_str()).collect();
    let skipped = format!("… {} lines …", lines.len() - 2 * KEEP);
    out.push(&skipped);
    out.extend(lines[lines.len() - KEEP..].iter().map(|l| l.raw.as_str()));
    out.join("\n")
}
