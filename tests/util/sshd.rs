//! A real OpenSSH sshd on 127.0.0.1 at a free port, with everything it needs in a tempdir,
//! and `ssh`/`scp`/`sftp` commands that log in to it as root with its own client key.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::net::{free_port, LOCALHOST};
use super::process::{self, tee_lines};

/// The sshd binary: `$PORTRELAY_TEST_SSHD`, else OpenSSH's usual place.
fn sshd_binary() -> PathBuf {
    std::env::var_os("PORTRELAY_TEST_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"))
}

/// How long sshd has to open its port.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running sshd, killed on drop. Its tempdir holds the keys, the config, and whatever the
/// tests copy there ([`Sshd::dir`]).
pub struct Sshd {
    /// `None`: prepared, started elsewhere (if at all).
    child: Option<Child>,
    dir: TempDir,
    /// The address it listens on: 127.0.0.1 unless [`Sshd::prepare_at`] said otherwise.
    ip: IpAddr,
    port: u16,
    client_key: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    /// Starts sshd and returns once it has sent its `SSH-2.0` banner on a connection.
    pub fn start() -> Sshd {
        let mut failures = Vec::new();
        // The free port may be taken by someone else before sshd binds it: try a few.
        for _ in 0..3 {
            let mut sshd = Sshd::prepare(free_port());
            match sshd.spawn() {
                Ok(()) => return sshd,
                Err(why) => failures.push(why),
            }
        }
        panic!("sshd did not start:\n{}", failures.join("\n---\n"));
    }

    /// Starts a [`Sshd::prepare`]d sshd (on the port the test chose: a mapping's upstream
    /// before its instance is up); returns once it has sent its banner.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "sshd already started");
        if let Err(why) = self.spawn() {
            panic!("sshd did not start: {why}");
        }
    }

    /// The keys and config of an sshd for `port`, not started: [`Sshd::launch`] starts it,
    /// or [`Sshd::command_line`] elsewhere (a script: a wake command), and the client
    /// commands work as for a started one. On drop, an sshd started elsewhere is ended
    /// through its pid file.
    pub fn prepare(port: u16) -> Sshd {
        Sshd::prepare_at(SocketAddr::from((LOCALHOST, port)))
    }

    /// [`Sshd::prepare`] for an sshd listening on `addr` (an instance's address in a
    /// network namespace: launch it from a thread in that namespace).
    pub fn prepare_at(addr: SocketAddr) -> Sshd {
        let port = addr.port();
        let sshd = sshd_binary();
        assert!(
            sshd.exists(),
            "{} is missing: install openssh-server (scripts/test does)",
            sshd.display()
        );
        // Privilege separation directory; sshd refuses to start without it.
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");

        let dir = tempfile::Builder::new()
            .prefix("portrelay-sshd-")
            .tempdir()
            .expect("tempdir");
        let host_key = dir.path().join("ssh_host_ed25519_key");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        let public = std::fs::read(client_key.with_extension("pub")).expect("read client .pub");
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, public).expect("write authorized_keys");
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress {listen}\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {authorized_keys}\n\
                 PidFile {pid}\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 AllowTcpForwarding yes\n\
                 Subsystem sftp internal-sftp\n\
                 LogLevel VERBOSE\n\
                 MaxStartups 100:30:200\n\
                 MaxSessions 100\n",
                host_key = host_key.display(),
                authorized_keys = authorized_keys.display(),
                pid = dir.path().join("sshd.pid").display(),
                listen = addr,
            ),
        )
        .expect("write sshd_config");
        Sshd {
            child: None,
            dir,
            ip: addr.ip(),
            port,
            client_key,
            log: Arc::default(),
        }
    }

    /// The argv that starts this sshd in the foreground (`-D`), logging to stderr.
    pub fn command_line(&self) -> Vec<String> {
        vec![
            sshd_binary().display().to_string(),
            "-D".into(),
            "-e".into(),
            "-f".into(),
            self.dir.path().join("sshd_config").display().to_string(),
        ]
    }

    fn spawn(&mut self) -> Result<(), String> {
        let argv = self.command_line();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", argv[0]));
        let sink = self.log.clone();
        tee_lines(child.stderr.take().unwrap(), "[sshd]", move |l| {
            sink.lock().unwrap().push(l)
        });
        match wait_banner(&mut child, self.addr()) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                // What sshd said so far (its log thread may still be reading).
                let lines = self.log.lock().unwrap().join("\n");
                Err(format!("port {}: {why}\n{lines}", self.port))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// The sshd's tempdir (root may write there over ssh, scp and sftp).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The options every client command shares: this sshd's client key, no known_hosts,
    /// no user config, no agent, no prompts.
    fn client_options(&self, cmd: &mut Command) {
        cmd.env_remove("SSH_AUTH_SOCK")
            .arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(&self.client_key);
        for option in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",
            "ConnectTimeout=10",
        ] {
            cmd.arg("-o").arg(option);
        }
    }

    /// `ssh … -p PORT root@127.0.0.1`; append the remote command (or `-N`, `-L` …) after.
    /// `port` is where to connect: this sshd's own port, or a relay's.
    pub fn ssh(&self, port: u16) -> Command {
        let mut cmd = Command::new("ssh");
        self.client_options(&mut cmd);
        cmd.arg("-p").arg(port.to_string());
        cmd.arg("root@127.0.0.1");
        cmd
    }

    /// `ssh … -p PORT root@HOST`: to a relay listening on `host` (not 127.0.0.1).
    pub fn ssh_at(&self, host: IpAddr, port: u16) -> Command {
        let mut cmd = Command::new("ssh");
        self.client_options(&mut cmd);
        cmd.arg("-p").arg(port.to_string());
        cmd.arg(format!("root@{host}"));
        cmd
    }

    /// `ssh … -p PORT OPTIONS… root@127.0.0.1`, for options that must come before the
    /// destination (`-N`, `-L`).
    pub fn ssh_with(&self, port: u16, options: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        self.client_options(&mut cmd);
        cmd.arg("-p").arg(port.to_string());
        cmd.args(options);
        cmd.arg("root@127.0.0.1");
        cmd
    }

    /// `scp … -P PORT`; append the source and destination (use [`Sshd::remote`]).
    pub fn scp(&self, port: u16) -> Command {
        let mut cmd = Command::new("scp");
        self.client_options(&mut cmd);
        cmd.arg("-q").arg("-P").arg(port.to_string());
        cmd
    }

    /// `sftp … -P PORT -b BATCH root@127.0.0.1`.
    pub fn sftp(&self, port: u16, batch: &Path) -> Command {
        self.sftp_with(port, &[], batch)
    }

    /// `sftp … -P PORT OPTIONS… -b BATCH root@127.0.0.1`.
    pub fn sftp_with(&self, port: u16, options: &[&str], batch: &Path) -> Command {
        let mut cmd = Command::new("sftp");
        self.client_options(&mut cmd);
        cmd.arg("-P").arg(port.to_string());
        cmd.args(options);
        cmd.arg("-b").arg(batch);
        cmd.arg("root@127.0.0.1");
        cmd
    }

    /// `root@127.0.0.1:PATH`, for scp.
    pub fn remote(path: &Path) -> String {
        format!("root@127.0.0.1:{}", path.display())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        } else if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("sshd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) takes no pointers; the pid is the sshd this test started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

fn keygen(path: &Path) {
    let out = process::run(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "portrelay-test",
                "-f",
            ])
            .arg(path),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "ssh-keygen failed: {}", out.stderr);
}

/// Connects until sshd answers with its banner, retrying while the port refuses.
fn wait_banner(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let port = addr.port();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("never tried");
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Err(format!("sshd exited with {status}"));
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut conn) => {
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut banner = Vec::new();
                let mut byte = [0u8; 1];
                while banner.len() < 255 && !banner.ends_with(b"\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => banner.push(byte[0]),
                        _ => break,
                    }
                }
                if banner.starts_with(b"SSH-2.0") {
                    return Ok(());
                }
                return Err(format!(
                    "port {port} answered without an SSH banner: {:?}",
                    String::from_utf8_lossy(&banner)
                ));
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => last = e.to_string(),
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("no banner within {READY_TIMEOUT:?} ({last})"))
}
