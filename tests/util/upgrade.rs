//! Live upgrades of a relay under test, and what the tests look at across one.
//!
//! - The new process of an upgrade is a child of the old one. The test process makes itself
//!   a child subreaper ([`adopt_orphans`]), so that when the old process exits the new one
//!   becomes the test's child, which [`Relay`] then waits for and kills by pid
//!   ([`Successors`]).
//! - [`Relay::upgrade`] runs the real `portrelay upgrade --admin-socket … [--binary …]`;
//!   [`Relay::sigusr2`] sends SIGUSR2. Both check the old process's `upgrade done`, the new
//!   one's `adopted` and `ready`, the old process's exit and `/proc/PID/exe`.
//! - [`Binaries`]: copies of the relay's binary with another build tag, and wrapper scripts
//!   that set the test switches for the new process.
//! - A connection's 4-tuple and its owners as `ss` shows them, sshd's logins, a scrape that
//!   may fail, `portrelay sessions`, an echo stream and an `ssh … cat` session that run
//!   across an upgrade.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::log::LogLine;
use super::metrics::Scrape;
use super::net::{connect, read_some, LOCALHOST};
use super::process;
use super::relay::{Backend, BIN};
use super::{poll, Relay, Sshd};

/// How long `portrelay upgrade` may take (2,000 connections on a loaded 2-core machine
/// included).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the old process may take to exit once it has handed everything over.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the log lines of an upgrade that is over may take to arrive.
const LOG_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The relay's processes.

static SUBREAPER: OnceLock<()> = OnceLock::new();

/// Makes the test process a child subreaper (once; nextest runs each test in a process of
/// its own): a process whose parent exits is then re-parented to the test process, not to
/// init, so the test can wait for the new relay process once the old one has exited.
pub fn adopt_orphans() {
    SUBREAPER.get_or_init(|| {
        // SAFETY: prctl(2) with integer arguments only; it sets a flag of this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        assert_eq!(
            rc,
            0,
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    });
}

/// The processes that upgrades of one relay started, oldest first: the last one is the relay
/// now. Each is a child of the one before it until that one exits; then it is the test's
/// (see [`adopt_orphans`]), and only then can it be reaped.
#[derive(Default)]
pub struct Successors {
    procs: Vec<Successor>,
    /// The relay's stderr pipe as `/proc/PID/fd/2` names it (`pipe:[INODE]`): every process
    /// of the relay writes its log there.
    log_pipe: Option<PathBuf>,
    /// Processes found at drop with that pipe as their stderr that are not in `procs`: a new
    /// process an upgrade started that the test never learnt of (the upgrade failed), a
    /// preflight.
    strays: Vec<u32>,
}

struct Successor {
    pid: u32,
    status: Option<ExitStatus>,
}

/// What `waitpid` says about a process of the relay.
enum Reap {
    Running,
    Exited(ExitStatus),
    /// It exited and its parent (an older relay process) reaped it: its status is lost.
    Lost,
}

/// `waitpid(pid, flags)` (`WNOHANG`, or 0 to block), retried when a signal interrupts it.
fn reap(pid: u32, flags: libc::c_int) -> Reap {
    // Bounded: each pass returns, or was interrupted by a signal.
    for _ in 0..1000 {
        let mut status = 0;
        // SAFETY: waitpid(2) writes only the int it is given, which lives on this stack.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, flags) };
        if rc == pid as libc::pid_t {
            return Reap::Exited(ExitStatus::from_raw(status));
        }
        if rc == 0 {
            return Reap::Running;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not the test's child (yet): its parent, an older relay process, still runs.
            Some(libc::ECHILD) if Path::new(&format!("/proc/{pid}")).exists() => {
                return Reap::Running
            }
            Some(libc::ECHILD) => return Reap::Lost,
            _ => panic!("waitpid({pid}): {e}"),
        }
    }
    panic!("waitpid({pid}) interrupted 1000 times");
}

impl Successors {
    /// For a relay whose stderr is `log`, the test's end of the pipe.
    pub fn new(log: &impl std::os::fd::AsRawFd) -> Successors {
        let log_pipe = std::fs::read_link(format!("/proc/self/fd/{}", log.as_raw_fd())).ok();
        Successors {
            log_pipe,
            ..Successors::default()
        }
    }

    /// The relay's current process, if an upgrade replaced the first one.
    pub fn current(&self) -> Option<u32> {
        self.procs.last().map(|p| p.pid)
    }

    pub fn push(&mut self, pid: u32) {
        assert!(
            SUBREAPER.get().is_some(),
            "a relay process started by an upgrade, but the test process is no subreaper"
        );
        self.procs.push(Successor { pid, status: None });
    }

    /// `Some(status)` once process `pid` (one of these) has exited and been reaped.
    pub fn try_wait(&mut self, pid: u32) -> Option<ExitStatus> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.pid == pid)
            .unwrap_or_else(|| panic!("{pid} is no process of this relay"));
        if p.status.is_none() {
            match reap(pid, libc::WNOHANG) {
                Reap::Running => {}
                Reap::Exited(status) => p.status = Some(status),
                Reap::Lost => panic!(
                    "relay process {pid} exited and its parent (an older relay process) \
                     reaped it: its exit status is lost"
                ),
            }
        }
        p.status
    }

    /// When upgrades ran: SIGKILL to every process of the relay that is still running (but
    /// `started`, the one the test started, which its `Child` ends): those in `procs`, and
    /// any other that writes to the relay's stderr.
    pub fn kill_all(&mut self, started: u32) {
        if SUBREAPER.get().is_none() {
            return;
        }
        let alive: Vec<u32> = self
            .procs
            .iter()
            .filter(|p| p.status.is_none())
            .map(|p| p.pid)
            .collect();
        self.strays = self
            .log_pipe
            .as_deref()
            .map(writers_of)
            .unwrap_or_default()
            .into_iter()
            .filter(|pid| *pid != started && !alive.contains(pid))
            .collect();
        for &pid in alive.iter().chain(&self.strays) {
            // SAFETY: kill(2), no memory involved. Each pid is a process of this relay that
            // nobody but this harness reaps (a successor not reaped yet, or a process that
            // has the relay's log pipe as its stderr right now), so it names no other one.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// After [`Successors::kill_all`] and the first process's end: reaps each process in
    /// order (each one's parent is gone by then, so it is the test's child).
    pub fn reap_all(&mut self) {
        for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
            if let Reap::Exited(status) = reap(p.pid, 0) {
                p.status = Some(status);
            }
        }
        for &pid in &self.strays {
            reap(pid, 0);
        }
    }
}

/// The pids of the processes (other than this one) whose stderr is `pipe` (from /proc).
fn writers_of(pipe: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stderr = std::fs::read_link(format!("/proc/{pid}/fd/2")).ok()?;
        (stderr == pipe && pid != std::process::id()).then_some(pid)
    })
    .collect()
}

// ---------------------------------------------------------------------------------------
// Upgrading.

/// A short directory for an admin socket (a unix socket path has at most 107 bytes).
pub fn admin_socket_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("portrelay-admin-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// The `[relay]` line that opens the admin socket at `path`.
pub fn admin_line(path: &Path) -> String {
    format!("admin_socket = \"{}\"\n", path.display())
}

/// The admin socket the relay's control file names (`portrelay upgrade` talks to it).
pub fn admin_socket(relay: &Relay) -> PathBuf {
    let toml = std::fs::read_to_string(relay.config_path()).expect("read the control file");
    toml.lines()
        .find_map(|l| {
            let value = l.trim().strip_prefix("admin_socket")?.trim_start();
            let value = value.strip_prefix('=')?.trim();
            Some(PathBuf::from(value.trim_matches('"')))
        })
        .expect("the control file sets no admin_socket, which `portrelay upgrade` needs")
}

/// A successful upgrade, as the command (or the old process's log) reported it.
#[derive(Debug)]
pub struct Upgraded {
    /// The new process.
    pub pid: u32,
    /// The process it replaced.
    pub old_pid: u32,
    /// Connections handed to the new process.
    pub moved: u64,
    /// TLS-entry connections left with the old process.
    pub stayed: u64,
    pub ms: u64,
    /// The new process's `adopted` line.
    pub adopted: LogLine,
    /// The old process's exit status; `None` while it drains TLS connections.
    pub old_exit: Option<ExitStatus>,
}

/// What the log held before an upgrade began.
struct Before {
    pid: u32,
    exe: PathBuf,
    done: usize,
    rolled_back: usize,
    ready: usize,
}

fn count(relay: &Relay, message: &str) -> usize {
    relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == message)
        .count()
}

/// The binary a process runs: `/proc/PID/exe`, resolved.
pub fn exe_of(pid: u32) -> PathBuf {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/exe: {e}"));
    std::fs::canonicalize(&exe).unwrap_or(exe)
}

/// `upgraded: pid NEW, MOVED connections moved, STAYED stayed (TLS), MS ms`: (NEW, MOVED,
/// STAYED, MS).
fn parse_upgraded(stdout: &str) -> (u32, u64, u64, u64) {
    let parsed = (|| {
        let line = stdout.strip_suffix('\n')?;
        let rest = line.strip_prefix("upgraded: pid ")?;
        let parts: Vec<&str> = rest.split(", ").collect();
        let [pid, moved, stayed, ms] = parts[..] else {
            return None;
        };
        Some((
            pid.parse().ok()?,
            moved.strip_suffix(" connections moved")?.parse().ok()?,
            stayed.strip_suffix(" stayed (TLS)")?.parse().ok()?,
            ms.strip_suffix(" ms")?.parse().ok()?,
        ))
    })();
    parsed.unwrap_or_else(|| {
        panic!(
            "`portrelay upgrade` printed {stdout:?}, not \
             \"upgraded: pid NEW, MOVED connections moved, STAYED stayed (TLS), MS ms\\n\""
        )
    })
}

impl Relay {
    /// `portrelay upgrade --admin-socket SOCKET [--binary BINARY]` (the socket from the
    /// control file). On success (exit 0) checks the old process's `upgrade done` and the
    /// new one's `adopted` and `ready` lines, waits for the old process to exit 0 unless TLS
    /// connections stayed, checks `/proc/NEW/exe`, and makes the new process the relay's.
    /// On failure (exit 1, `portrelay upgrade: …` on stderr) checks that the relay logged
    /// `upgrade rolled back` and still runs with the same pid, and returns the stderr.
    pub fn upgrade(&mut self, binary: Option<&Path>) -> Result<Upgraded, String> {
        adopt_orphans();
        let before = self.before_upgrade();
        let mut cmd = Command::new(BIN);
        cmd.arg("upgrade")
            .arg("--admin-socket")
            .arg(admin_socket(self));
        if let Some(binary) = binary {
            cmd.arg("--binary").arg(binary);
        }
        let out = process::run(&mut cmd, UPGRADE_TIMEOUT);
        match out.status.code() {
            Some(0) => {
                let (pid, moved, stayed, ms) = parse_upgraded(&out.stdout);
                Ok(self.after_upgrade(before, pid, (moved, stayed, ms), binary))
            }
            Some(1) => {
                assert!(
                    out.stdout.is_empty(),
                    "a failed upgrade printed {:?}",
                    out.stdout
                );
                assert!(
                    out.stderr.starts_with("portrelay upgrade: "),
                    "the failed upgrade's stderr: {:?}",
                    out.stderr
                );
                let said = out.stderr.trim_end().to_string();
                self.after_rollback(&before, &said);
                Err(said)
            }
            _ => panic!(
                "`portrelay upgrade` exited {}: {}{}",
                out.status, out.stdout, out.stderr
            ),
        }
    }

    /// SIGUSR2 to the relay: the same upgrade to the default binary, with the same checks
    /// as [`Relay::upgrade`], from the log (`upgrade done` or `upgrade rolled back`). A
    /// rollback returns its `error`.
    pub fn sigusr2(&mut self) -> Result<Upgraded, String> {
        adopt_orphans();
        let before = self.before_upgrade();
        self.signal(libc::SIGUSR2, "USR2");
        let n = before.done + before.rolled_back + 1;
        let outcome = self
            .wait_logs(
                |l| matches!(l.msg(), "upgrade done" | "upgrade rolled back"),
                n,
                UPGRADE_TIMEOUT,
            )
            .remove(n - 1);
        if outcome.msg() == "upgrade rolled back" {
            self.after_rollback(&before, "SIGUSR2");
            return Err(outcome.text("error").to_string());
        }
        let result = (
            outcome.num("moved"),
            outcome.num("stayed"),
            outcome.num("ms"),
        );
        let pid = outcome.num("pid") as u32;
        Ok(self.after_upgrade(before, pid, result, None))
    }

    fn before_upgrade(&mut self) -> Before {
        assert!(self.exited().is_none(), "upgrade of a relay that exited");
        Before {
            pid: self.pid(),
            exe: exe_of(self.pid()),
            done: count(self, "upgrade done"),
            rolled_back: count(self, "upgrade rolled back"),
            ready: count(self, "ready"),
        }
    }

    fn after_upgrade(
        &mut self,
        before: Before,
        pid: u32,
        (moved, stayed, ms): (u64, u64, u64),
        binary: Option<&Path>,
    ) -> Upgraded {
        assert_ne!(
            pid, before.pid,
            "the upgrade names the old pid as the new one"
        );
        let done = self
            .wait_logs(|l| l.msg() == "upgrade done", before.done + 1, LOG_TIMEOUT)
            .remove(before.done);
        assert_eq!(done.u64("pid"), Some(pid.into()), "{done}");
        assert_eq!(done.u64("moved"), Some(moved), "{done}");
        assert_eq!(done.u64("stayed"), Some(stayed), "{done}");
        let adopted = self.wait_log(
            |l| l.msg() == "adopted" && l.u64("pid") == Some(pid.into()),
            LOG_TIMEOUT,
        );
        assert_eq!(
            adopted.u64("from_pid"),
            Some(before.pid.into()),
            "{adopted}"
        );
        assert_eq!(
            adopted.u64("connections"),
            Some(moved),
            "the new process adopted what the old one moved: {adopted}"
        );
        let backend = match adopted.text("backend") {
            "uring" => Backend::Uring,
            "epoll" => Backend::Epoll,
            other => panic!("`adopted` names backend {other:?}: {adopted}"),
        };
        let ready = self
            .wait_logs(|l| l.msg() == "ready", before.ready + 1, LOG_TIMEOUT)
            .remove(before.ready);
        assert_eq!(
            ready.str("backend"),
            Some(backend.name()),
            "the new process's `ready`: {ready}"
        );
        self.succeeded_by(pid, backend);
        let old_exit = (stayed == 0).then(|| {
            let status = self.wait_process_exit(before.pid, OLD_EXIT_TIMEOUT);
            assert!(
                status.success(),
                "the old process {} exited {status}",
                before.pid
            );
            status
        });
        let want = runs(binary.unwrap_or(&before.exe));
        assert_eq!(
            exe_of(pid),
            want,
            "/proc/{pid}/exe after an upgrade to {binary:?}"
        );
        Upgraded {
            pid,
            old_pid: before.pid,
            moved,
            stayed,
            ms,
            adopted,
            old_exit,
        }
    }

    /// After an upgrade that failed (`said`: the command's stderr).
    fn after_rollback(&mut self, before: &Before, said: &str) {
        let n = before.rolled_back + 1;
        let rolled_back = poll(LOG_TIMEOUT, Duration::from_millis(10), || {
            let lines = self.log_lines();
            let mut found = lines.iter().filter(|l| l.msg() == "upgrade rolled back");
            found.nth(n - 1).cloned()
        });
        let Some(line) = rolled_back else {
            panic!(
                "the upgrade failed ({said}) but the relay logged no `upgrade rolled back`; \
                 log:\n{}",
                self.logs().join("\n")
            );
        };
        assert!(!line.text("error").is_empty(), "{line}");
        assert_eq!(self.pid(), before.pid);
        assert_eq!(
            count(self, "upgrade done"),
            before.done,
            "a rolled back upgrade logged `upgrade done`"
        );
        if let Some(status) = self.exited() {
            panic!("the relay exited ({status}) after a rolled back upgrade");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Binaries to upgrade to.

/// The marker the relay's binary holds before its 16-byte build tag.
pub const BUILD_TAG_MARKER: &str = "@@portrelay-build-tag@@";
const TAG_LEN: usize = 16;

/// `tag` padded with `.` to the 16 bytes of the binary.
fn padded(tag: &str) -> Vec<u8> {
    assert!(
        tag.len() <= TAG_LEN && !tag.ends_with('.'),
        "build tag {tag:?}"
    );
    let mut out = tag.as_bytes().to_vec();
    out.resize(TAG_LEN, b'.');
    out
}

/// `BINARY --version`, trimmed: `portrelay VERSION`, and ` (build TAG)` unless the tag is
/// the default `dev`.
pub fn version_of(binary: &Path) -> String {
    let out = process::run(
        Command::new(binary).arg("--version"),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{} --version: {}",
        binary.display(),
        out.stderr
    );
    out.stdout.trim().to_string()
}

/// The build tag `binary --version` names: its `(build TAG)`, or `dev` without one.
pub fn build_tag(binary: &Path) -> String {
    let version = version_of(binary);
    assert!(
        version.starts_with("portrelay "),
        "{} --version: {version:?}",
        binary.display()
    );
    version
        .strip_suffix(')')
        .and_then(|v| v.rsplit_once(" (build "))
        .map_or("dev".to_string(), |(_, tag)| tag.to_string())
}

/// The binary that running `binary` ends up in: a wrapper script of [`Binaries::wrapper`]
/// execs the binary it names; any other file is itself. Resolved.
pub fn runs(binary: &Path) -> PathBuf {
    let text = std::fs::read(binary).unwrap_or_else(|e| panic!("read {}: {e}", binary.display()));
    let target = text
        .starts_with(b"#!")
        .then(|| {
            let script = String::from_utf8_lossy(&text);
            let line = script.lines().find(|l| l.starts_with("exec '"))?;
            let path = line.strip_prefix("exec '")?.split('\'').next()?;
            Some(PathBuf::from(path))
        })
        .flatten()
        .unwrap_or_else(|| binary.to_path_buf());
    std::fs::canonicalize(&target).unwrap_or(target)
}

/// Binaries for upgrades, in a tempdir of their own.
pub struct Binaries {
    dir: TempDir,
}

impl Binaries {
    pub fn new() -> Binaries {
        let dir = tempfile::Builder::new()
            .prefix("portrelay-bin-")
            .tempdir()
            .expect("tempdir");
        Binaries { dir }
    }

    /// A copy of the test build of `portrelay` whose build tag is `tag` (not `dev`): the 16
    /// bytes after [`BUILD_TAG_MARKER`] overwritten. Its `--version` must then end in
    /// `(build TAG)`.
    pub fn tagged(&self, tag: &str) -> PathBuf {
        let source = Path::new(BIN);
        let old = padded(&build_tag(source));
        let new = padded(tag);
        assert_ne!(old, new, "a copy with the tag the build has");
        // grep finds the marker at native speed (this is a test build, unoptimised).
        let out = process::run(
            Command::new("grep")
                .args(["-obaF", "-e", BUILD_TAG_MARKER])
                .arg(source),
            Duration::from_secs(60),
        );
        let offsets: Vec<u64> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_once(':')?.0.parse().ok())
            .collect();
        let copy = self.dir.path().join(format!("portrelay-{tag}"));
        std::fs::copy(source, &copy).expect("copy the portrelay binary");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&copy)
            .expect("open the copy");
        let mut patched = 0;
        for offset in offsets {
            use std::io::{Seek, SeekFrom};
            let at = offset + BUILD_TAG_MARKER.len() as u64;
            let mut current = vec![0u8; TAG_LEN];
            file.seek(SeekFrom::Start(at)).unwrap();
            if file.read_exact(&mut current).is_ok() && current == old {
                file.seek(SeekFrom::Start(at)).unwrap();
                file.write_all(&new).expect("patch the build tag");
                patched += 1;
            }
        }
        drop(file);
        assert!(
            patched > 0,
            "{BIN} holds no {BUILD_TAG_MARKER} followed by its tag {:?}",
            String::from_utf8_lossy(&old)
        );
        assert_eq!(build_tag(&copy), tag, "the patched copy's --version");
        copy
    }

    /// A script `NAME` that runs `binary` with `env` set (the test switches that the new
    /// process of an upgrade reads), for `--binary`.
    pub fn wrapper(&self, name: &str, env: &[(&str, &str)], binary: &Path) -> PathBuf {
        let mut script = String::from("#!/bin/sh\n");
        for (key, value) in env {
            script += &format!("export {key}='{value}'\n");
        }
        script += &format!("exec '{}' \"$@\"\n", binary.display());
        let path = self.dir.path().join(name);
        std::fs::write(&path, script).expect("write the wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the wrapper");
        path
    }
}

impl Default for Binaries {
    fn default() -> Binaries {
        Binaries::new()
    }
}

// ---------------------------------------------------------------------------------------
// Looking at connections from outside.

/// The established TCP connections to `to`, as `ss -tn` lists them: (local, peer) of each.
pub fn established_to(to: SocketAddr) -> Vec<(SocketAddr, SocketAddr)> {
    ss(&["dst", &to.to_string()])
        .iter()
        .map(|l| four_tuple(l))
        .collect()
}

/// The pids holding the socket `local` → `peer` (`ss -tnp`).
pub fn socket_owners(local: SocketAddr, peer: SocketAddr) -> Vec<u32> {
    let lines = ss(&["-p", "src", &local.to_string(), "dst", &peer.to_string()]);
    let mut pids: Vec<u32> = lines
        .iter()
        .flat_map(|l| l.split("pid=").skip(1))
        .filter_map(|rest| rest.split([',', ')']).next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `ss -Htn state established ARGS…`: its lines.
fn ss(args: &[&str]) -> Vec<String> {
    let out = process::run(
        Command::new("ss")
            .args(["-Htn"])
            .args(args.iter().filter(|a| a.starts_with('-')))
            .args(["state", "established"])
            .args(args.iter().filter(|a| !a.starts_with('-'))),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "ss: {}", out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

/// "RECV-Q SEND-Q LOCAL PEER [PROCESS]": (LOCAL, PEER).
fn four_tuple(line: &str) -> (SocketAddr, SocketAddr) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let addr = |i: usize| -> SocketAddr {
        fields
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("ss line {line:?}"))
    };
    (addr(2), addr(3))
}

/// How many logins sshd has logged (one per SSH session that reached it).
pub fn sshd_logins(sshd: &Sshd) -> usize {
    sshd.log()
        .lines()
        .filter(|l| l.contains("Accepted publickey for "))
        .count()
}

/// `GET /metrics` from 127.0.0.1:`port`, parsed; an error, not a panic, when the scrape
/// fails (one in flight while the relay changes process).
pub fn try_scrape(port: u16) -> Result<Scrape, String> {
    let addr = SocketAddr::from((LOCALHOST, port));
    let mut conn =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8(response).map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("status: {head}"));
    }
    Ok(Scrape::parse(body.to_string()))
}

/// `portrelay sessions --json` against the relay's admin socket: the array it prints.
pub fn sessions(relay: &Relay) -> Vec<serde_json::Value> {
    let out = process::run(
        Command::new(BIN)
            .args(["sessions", "--json", "--admin-socket"])
            .arg(admin_socket(relay)),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "sessions: {}", out.stderr);
    match serde_json::from_str(&out.stdout) {
        Ok(serde_json::Value::Array(all)) => all,
        other => panic!("sessions --json printed {:?}: {other:?}", out.stdout),
    }
}

// ---------------------------------------------------------------------------------------
// Traffic that runs across an upgrade.

/// The size of an [`EchoStream`] block.
const BLOCK: usize = 64 * 1024;
/// What one [`EchoStream`] may send at most, and for how long.
const STREAM_MAX: u64 = 4 << 30;
const STREAM_TIME: Duration = Duration::from_secs(120);
/// An [`EchoStream`] sends at most a block a millisecond (64 MB/s): bytes are in flight
/// at any moment, and the 2 cores are left to the upgrade.
const STREAM_PACE: Duration = Duration::from_millis(1);

/// A raw TCP connection through the relay to an echo upstream that carries a stream both
/// ways while the test upgrades the relay: a writer thread sends numbered 64 KiB blocks
/// (at most 64 MB/s) until [`EchoStream::finish`], a reader thread checks every byte that
/// comes back.
pub struct EchoStream {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    /// How many more bytes the writer sends once stopped.
    tail: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    writer: JoinHandle<Result<u64, String>>,
    reader: JoinHandle<Result<u64, String>>,
}

/// Block `index` of an [`EchoStream`]: its number, then `pattern`.
fn block(index: u64, pattern: &[u8]) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&pattern[8..]);
    b
}

impl EchoStream {
    /// Connects to 127.0.0.1:`port` (a mapping to an echo upstream) and starts both threads.
    pub fn start(port: u16) -> EchoStream {
        let conn = connect(port);
        let local = conn.local_addr().unwrap();
        let pattern = Arc::new(super::files::random_bytes(BLOCK));
        let stop: Arc<AtomicBool> = Arc::default();
        let tail: Arc<AtomicU64> = Arc::default();
        let echoed: Arc<AtomicU64> = Arc::default();
        let writer = {
            let (mut out, pattern) = (conn.try_clone().unwrap(), pattern.clone());
            let (stop, tail) = (Arc::clone(&stop), Arc::clone(&tail));
            std::thread::spawn(move || {
                let start = Instant::now();
                let deadline = start + STREAM_TIME;
                let mut sent = 0u64;
                let mut stopped_at = None;
                for index in 0.. {
                    if stopped_at.is_none() && stop.load(Ordering::SeqCst) {
                        stopped_at = Some(sent);
                    }
                    if stopped_at.is_some_and(|at| sent >= at + tail.load(Ordering::SeqCst)) {
                        break;
                    }
                    if sent >= STREAM_MAX || Instant::now() > deadline {
                        return Err(format!("the stream was never stopped ({sent} bytes sent)"));
                    }
                    // Pacing, not waiting for readiness.
                    let due = start + STREAM_PACE * index as u32;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    out.write_all(&block(index, &pattern))
                        .map_err(|e| format!("write after {sent} bytes: {e}"))?;
                    sent += BLOCK as u64;
                }
                out.shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
                Ok(sent)
            })
        };
        let reader = {
            let (mut conn, echoed) = (conn, Arc::clone(&echoed));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BLOCK];
                let mut pending = Vec::with_capacity(2 * BLOCK);
                let mut index = 0u64;
                let mut total = 0u64;
                loop {
                    let n = read_some(&mut conn, &mut buf)
                        .map_err(|e| format!("read after {total} bytes: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    echoed.store(total, Ordering::SeqCst);
                    pending.extend_from_slice(&buf[..n]);
                    while pending.len() >= BLOCK {
                        if pending[..BLOCK] != block(index, &pattern)[..] {
                            return Err(format!("block {index} came back changed"));
                        }
                        pending.drain(..BLOCK);
                        index += 1;
                    }
                }
                if !pending.is_empty() {
                    return Err(format!("{} bytes of a block at the end", pending.len()));
                }
                Ok(total)
            })
        };
        EchoStream {
            local,
            stop,
            tail,
            echoed,
            writer,
            reader,
        }
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Bytes echoed back so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// Waits until at least `bytes` more than now have come back (the stream moves).
    pub fn wait_moving(&self, bytes: u64) {
        let want = self.echoed() + bytes;
        let moved = poll(Duration::from_secs(60), Duration::from_millis(5), || {
            (self.echoed() >= want || self.reader.is_finished()).then_some(())
        });
        assert!(
            moved.is_some() && self.echoed() >= want,
            "the echo stream is stuck at {} bytes (wanted {want})",
            self.echoed()
        );
    }

    /// Sends `tail` more bytes, half-closes, and waits for every byte to come back and the
    /// echo's end of stream: the bytes each way (equal).
    pub fn finish(self, tail: u64) -> u64 {
        self.tail.store(tail, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.writer.join().expect("writer thread");
        let got = self.reader.join().expect("reader thread");
        let (sent, got) = match (sent, got) {
            (Ok(sent), Ok(got)) => (sent, got),
            (sent, got) => panic!("the echo stream failed: writer {sent:?}, reader {got:?}"),
        };
        assert_eq!(sent, got, "bytes sent and echoed");
        sent
    }
}

/// An `ssh … cat` session (stdin and stdout piped): what is written comes back from cat on
/// the far side. Each chunk read is kept with the time it arrived.
pub struct CatSession {
    child: Child,
    stdin: Option<ChildStdin>,
    arrivals: Receiver<(Instant, Vec<u8>)>,
    /// Bytes read from `arrivals` and not yet taken.
    unread: Vec<(Instant, u8)>,
}

impl CatSession {
    /// Starts `cmd` (an `ssh … cat` command), and checks that a first byte comes back.
    pub fn start(cmd: &mut Command) -> CatSession {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        process::tee_lines(child.stderr.take().unwrap(), "[ssh cat]", |_| {});
        let (tx, arrivals) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut session = CatSession {
            child,
            stdin,
            arrivals,
            unread: Vec::new(),
        };
        // The login can take a while on a loaded machine.
        session.write(b"!");
        session.read(1, Duration::from_secs(60));
        session
    }

    /// The session's stdin, for a writer of its own (see [`CatSession::write`]).
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin already taken")
    }

    pub fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin taken");
        stdin.write_all(bytes).expect("write to ssh");
        stdin.flush().expect("flush to ssh");
    }

    /// The next `n` bytes that come back, each with its arrival time; panics when they have
    /// not all come within `within`.
    pub fn read(&mut self, n: usize, within: Duration) -> Vec<(Instant, u8)> {
        let deadline = Instant::now() + within;
        while self.unread.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.arrivals.recv_timeout(left) {
                Ok((at, chunk)) => self.unread.extend(chunk.into_iter().map(|b| (at, b))),
                Err(e) => panic!(
                    "{} of {n} bytes came back through ssh … cat within {within:?} ({e})",
                    self.unread.len()
                ),
            }
        }
        self.unread.drain(..n).collect()
    }

    /// Writes `bytes` and reads them back.
    pub fn roundtrip(&mut self, bytes: &[u8]) {
        self.write(bytes);
        let back: Vec<u8> = self
            .read(bytes.len(), Duration::from_secs(20))
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        assert!(back == bytes, "ssh … cat echoed other bytes");
    }

    /// Closes stdin (cat ends, and with it the session): ssh must exit 0 with nothing more
    /// on its stdout.
    pub fn end(mut self) {
        drop(self.stdin.take());
        let status = process::wait_deadline(&mut self.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("ssh … cat still running 30 s after its stdin closed"));
        assert!(status.success(), "ssh … cat exited {status}");
        let extra: usize = self.arrivals.try_iter().map(|(_, c)| c.len()).sum();
        assert_eq!(extra + self.unread.len(), 0, "bytes nobody sent came back");
    }
}

impl Drop for CatSession {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
