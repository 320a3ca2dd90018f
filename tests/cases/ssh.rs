//! OpenSSH through the relay, as users use it: `ssh -p`, `scp -P`, `sftp -P`, `ssh -L`.
//!
//! Each `check_*` function takes the port to connect to, so `harness` runs the same checks
//! straight against the sshd.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::files::{assert_same_file, random_bytes, random_file, sha256_file};
use crate::util::net::{free_port, http_get, Upstream, LOCALHOST};
use crate::util::process::{self, KillOnDrop};
use crate::util::relay::{data_path_test, map_section, relay_section};
use crate::util::{poll, Backend, Relay, Sshd};

/// A relay with one mapping, host port → the sshd.
pub(crate) fn relay_to(sshd: &Sshd, backend: Backend) -> (Relay, u16) {
    let port = free_port();
    let toml = relay_section(None, "") + &map_section(port, sshd.addr(), "C.ssh", "");
    (Relay::start(&toml, backend), port)
}

/// `ssh -p PORT OPTIONS… root@127.0.0.1 'echo hello; exit 3'` prints `hello` and exits 3.
/// The one such check of the suite.
pub(crate) fn check_command(sshd: &Sshd, port: u16, options: &[&str]) {
    let out = process::run(
        sshd.ssh_with(port, options).arg("echo hello; exit 3"),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.stdout, "hello\n",
        "ssh {options:?} stdout (stderr: {})",
        out.stderr
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "ssh {options:?} exit (stderr: {})",
        out.stderr
    );
}

/// `scp -P OPTIONS…` a random file of `size` bytes up into the sshd's dir and back down to
/// another path; both copies must equal the original, byte for byte.
pub(crate) fn check_scp(sshd: &Sshd, port: u16, options: &[&str], size: usize) {
    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("source.bin");
    random_file(&source, size);
    let remote = sshd.dir().join(format!("scp-{port}.bin"));
    let back = local.path().join("back.bin");

    let up = process::run(
        sshd.scp(port)
            .args(options)
            .arg(&source)
            .arg(Sshd::remote(&remote)),
        Duration::from_secs(300),
    );
    assert!(
        up.status.success(),
        "scp up {options:?}: {:?}: {}",
        up.status,
        up.stderr
    );
    assert_same_file(&remote, &source);

    let down = process::run(
        sshd.scp(port)
            .args(options)
            .arg(Sshd::remote(&remote))
            .arg(&back),
        Duration::from_secs(300),
    );
    assert!(
        down.status.success(),
        "scp down {options:?}: {:?}: {}",
        down.status,
        down.stderr
    );
    assert_same_file(&back, &source);
    let _ = std::fs::remove_file(&remote);
}

/// One `sftp -P -b` session puts a random file of `size` bytes and gets it back to another
/// path; the files must be equal.
pub(crate) fn check_sftp(sshd: &Sshd, port: u16, size: usize) {
    check_sftp_with(sshd, port, &[], size);
}

/// [`check_sftp`] with `options` (`-o ProxyCommand=…`) on sftp's command line.
pub(crate) fn check_sftp_with(sshd: &Sshd, port: u16, options: &[&str], size: usize) {
    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("source.bin");
    random_file(&source, size);
    let sha = sha256_file(&source);
    let remote = sshd.dir().join(format!("sftp-{port}.bin"));
    let back = local.path().join("back.bin");
    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            source.display(),
            remote.display(),
            remote.display(),
            back.display()
        ),
    )
    .expect("write sftp batch");

    let out = process::run(
        &mut sshd.sftp_with(port, options, &batch),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "sftp: {:?}: {}",
        out.status,
        out.stderr
    );
    assert_eq!(sha256_file(&remote), sha, "file after sftp put");
    assert_eq!(sha256_file(&back), sha, "file after sftp get");
    let _ = std::fs::remove_file(&remote);
}

/// `ssh -N -L LOCAL:127.0.0.1:HTTP`: once the local port accepts, two GETs through the
/// tunnel return the HTTP upstream's body.
pub(crate) fn check_local_forward(sshd: &Sshd, port: u16) {
    check_local_forward_with(sshd, port, &[]);
}

/// [`check_local_forward`] with `options` (`-o ProxyCommand=…`) on ssh's command line.
pub(crate) fn check_local_forward_with(sshd: &Sshd, port: u16, options: &[&str]) {
    let body = random_bytes(256 * 1024);
    let http = Upstream::http(body.clone());
    let local = free_port();
    let forward = format!("{local}:127.0.0.1:{}", http.port());
    let mut args = options.to_vec();
    args.extend(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward]);
    let mut ssh = KillOnDrop::spawn(&mut sshd.ssh_with(port, &args), "[ssh -L]");
    let local_addr = SocketAddr::from((LOCALHOST, local));
    let opened = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        if let Some(status) = ssh.exited() {
            panic!("ssh -L exited with {status}: {}", ssh.stderr());
        }
        TcpStream::connect_timeout(&local_addr, Duration::from_secs(1)).ok()
    });
    assert!(
        opened.is_some(),
        "ssh -L did not open {local_addr} within 30 s: {}",
        ssh.stderr()
    );
    drop(opened);
    assert!(
        http_get(local) == body,
        "first GET through ssh -L: body differs"
    );
    assert!(
        http_get(local) == body,
        "second GET through ssh -L: body differs"
    );
    assert!(
        http.accepted() >= 2,
        "the HTTP upstream saw {}",
        http.accepted()
    );
}

data_path_test!(ssh_runs_command);
/// `ssh -p` through the relay runs a command and returns its output and exit status;
/// the relay then logs the connection with every field of the contract.
fn ssh_runs_command(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, port) = relay_to(&sshd, backend);
    check_command(&sshd, port, &[]);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    line.assert_closed_fields(port, "C.ssh", sshd.addr());
    assert!(
        ["client_eof", "upstream_eof"].contains(&line.reason()),
        "a session that ended normally: {line}"
    );
    assert!(line.num("bytes_client_to_upstream") > 0, "{line}");
    assert!(line.num("bytes_upstream_to_client") > 0, "{line}");
}

/// Size of the scp test file.
const SCP_SIZE: usize = 256 << 20;

/// The `connection closed` lines of the scp up and the scp down of [`check_scp`] with a
/// file of `size` bytes on `port`, each checked: every field, and a clean end (the session
/// ended with EOF, not a reset or an error).
pub(crate) fn scp_closed_lines(relay: &Relay, sshd: &Sshd, port: u16, size: usize) {
    let size = size as u64;
    let up = relay.wait_log(
        |l| l.is_closed_on(port) && l.u64("bytes_client_to_upstream") >= Some(size),
        Duration::from_secs(10),
    );
    let down = relay.wait_log(
        |l| l.is_closed_on(port) && l.u64("bytes_upstream_to_client") >= Some(size),
        Duration::from_secs(10),
    );
    for line in [up, down] {
        line.assert_closed_fields(port, "C.ssh", sshd.addr());
        assert!(
            ["client_eof", "upstream_eof"].contains(&line.reason()),
            "an scp that ended normally: {line}"
        );
    }
}

data_path_test!(scp_256mib_both_ways);
/// `scp -P` of 256 MiB up and back down through the relay (OpenSSH 9's default, the SFTP
/// protocol): both copies intact, and the relay counts at least the file's size in each
/// direction and logs a clean end.
fn scp_256mib_both_ways(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, port) = relay_to(&sshd, backend);
    check_scp(&sshd, port, &[], SCP_SIZE);
    scp_closed_lines(&relay, &sshd, port, SCP_SIZE);
}

/// Size of the legacy-protocol scp test file.
const SCP_LEGACY_SIZE: usize = 64 << 20;

data_path_test!(scp_legacy_protocol_both_ways);
/// `scp -O` (the legacy scp protocol: `scp -t`/`scp -f` on the far side, half-closes
/// instead of SFTP requests) of 64 MiB up and back down: intact, counted, a clean end.
fn scp_legacy_protocol_both_ways(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, port) = relay_to(&sshd, backend);
    check_scp(&sshd, port, &["-O"], SCP_LEGACY_SIZE);
    scp_closed_lines(&relay, &sshd, port, SCP_LEGACY_SIZE);
}

data_path_test!(sftp_put_get);
/// One `sftp -P` batch session puts and gets 16 MiB through the relay.
fn sftp_put_get(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, port) = relay_to(&sshd, backend);
    check_sftp(&sshd, port, 16 << 20);
    let line = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    line.assert_closed_fields(port, "C.ssh", sshd.addr());
    assert!(line.num("bytes_client_to_upstream") >= 16 << 20, "{line}");
    assert!(line.num("bytes_upstream_to_client") >= 16 << 20, "{line}");
}

data_path_test!(ssh_local_forward);
/// `ssh -p RELAY -N -L …`: port forwarding inside an SSH session that runs through the
/// relay.
fn ssh_local_forward(backend: Backend) {
    let sshd = Sshd::start();
    let (_relay, port) = relay_to(&sshd, backend);
    check_local_forward(&sshd, port);
}
