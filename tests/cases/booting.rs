//! Instances that are still booting: `hold` keeps the client while the upstream refuses,
//! retries, and replays what the client sent to an upstream that accepted and closed
//! before its first byte; `wake` starts the instance, once per waiting spell.
//!
//! The one sleep here models an instance that starts late; everything else waits on the
//! relay's log, its metrics or the peers.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::files::{assert_same_file, random_file};
use crate::util::metrics::{wait_metric, Scrape};
use crate::util::net::{accept_within, expect_closed, free_port, free_ports_in_a_row, LOCALHOST};
use crate::util::process;
use crate::util::relay::{data_path_test, map_section, relay_section};
use crate::util::{Backend, Relay, Sshd};

const HELD: &str = "portrelay_connections_held";
const WAKES: &str = "portrelay_wakes_total";
const CONNECT_FAILURES: &str = "portrelay_upstream_connect_failures_total";

/// A relay with metrics and one mapping `C.boot` from a free port to 127.0.0.1:`upstream`,
/// with `extra` lines in its `[[map]]`. Returns it, its port and its metrics port.
fn relay_to(upstream: u16, extra: &str, backend: Backend) -> (Relay, u16, u16) {
    let port = free_port();
    let metrics = free_port();
    let to = SocketAddr::from((LOCALHOST, upstream));
    let toml = relay_section(Some(metrics), "") + &map_section(port, to, "C.boot", extra);
    (Relay::start(&toml, backend), port, metrics)
}

/// `ssh … 'echo hello'` through the relay prints `hello`.
fn assert_ssh_hello(out: &process::Finished) {
    assert_eq!(out.stdout, "hello\n", "ssh stdout (stderr: {})", out.stderr);
    assert!(out.status.success(), "ssh exit (stderr: {})", out.stderr);
}

fn ssh_hello(sshd: &Sshd, port: u16) -> std::process::Child {
    sshd.ssh(port)
        .arg("echo hello")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh")
}

fn finished(child: std::process::Child) -> process::Finished {
    let out = child.wait_with_output().expect("ssh output");
    process::Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Nothing listens on the upstream port when `ssh` starts; the instance's sshd comes up
/// 3 s later: the ssh command succeeds, over one relayed connection.
fn late_sshd(backend: Backend) {
    let upstream = free_ports_in_a_row(1);
    let (relay, port, metrics) = relay_to(upstream, "hold = \"20s\"\n", backend);
    let mut sshd = Sshd::prepare(upstream);
    let client = ssh_hello(&sshd, port);
    wait_metric(metrics, HELD, &[("map", "C.boot")], 1.0);
    // The instance starts late.
    std::thread::sleep(Duration::from_secs(3));
    sshd.launch();
    let out = finished(client);
    assert_ssh_hello(&out);
    let closed = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    assert!(
        matches!(closed.reason(), "client_eof" | "upstream_eof"),
        "{closed:?}"
    );
    let waited = relay.wait_log(
        |l| l.msg() == "upstream connected after waiting",
        Duration::from_secs(1),
    );
    assert!(waited.num("attempts") > 3, "{waited:?}");
    assert!(waited.num("waited_ms") >= 3000, "{waited:?}");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.sum("portrelay_connections_accepted_total", &[("map", "C.boot")]),
        1.0,
        "one relayed connection"
    );
    assert_eq!(s.sum(CONNECT_FAILURES, &[("map", "C.boot")]), 0.0);
    assert_eq!(s.value(HELD, &[("map", "C.boot")]), 0.0);
    drop(sshd);
}
data_path_test!(late_sshd);

/// A wake script (what a host agent would run) that records each run, waits a second
/// (the instance boots) and starts `sshd` in the background.
fn wake_script(dir: &Path, sshd: &Sshd) -> (String, std::path::PathBuf) {
    let runs = dir.join("wakes");
    let script = dir.join("start-instance");
    let argv: Vec<String> = sshd
        .command_line()
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> '{runs}'\nsleep 1\n{sshd} >/dev/null 2>&1 &\nexit 0\n",
            runs = runs.display(),
            sshd = argv.join(" "),
        ),
    )
    .unwrap();
    let wake = format!(
        "wake = [\"/bin/sh\", \"{}\", \"{{name}}\", \"{{port}}\"]\n",
        script.display()
    );
    (wake, runs)
}

/// `wake` starts the instance's sshd itself; 5 clients connecting at once cause one wake,
/// and all 5 get through.
fn wake_once_for_five(backend: Backend) {
    let upstream = free_ports_in_a_row(1);
    let sshd = Sshd::prepare(upstream);
    let dir = tempfile::tempdir().unwrap();
    let (wake, runs) = wake_script(dir.path(), &sshd);
    let (relay, port, metrics) = relay_to(upstream, &format!("hold = \"20s\"\n{wake}"), backend);
    let clients: Vec<_> = (0..5).map(|_| ssh_hello(&sshd, port)).collect();
    for client in clients {
        assert_ssh_hello(&finished(client));
    }
    let runs = std::fs::read_to_string(runs).unwrap();
    assert_eq!(runs, format!("C.boot {port}\n"), "one wake");
    wait_metric(metrics, WAKES, &[("map", "C.boot"), ("result", "ok")], 1.0);
    let s = Scrape::take(metrics);
    assert_eq!(
        s.value(WAKES, &[("map", "C.boot"), ("result", "failed")]),
        0.0
    );
    let wake = relay.wait_log(
        |l| l.msg() == "wake command finished",
        Duration::from_secs(1),
    );
    assert!(wake.num("duration_ms") >= 1000, "{wake:?}");
    drop(sshd);
}
data_path_test!(wake_once_for_five);

/// An upstream that accepts and closes at once the first two times (sshd restarted while
/// its instance boots), then is a real sshd: the client's `scp` succeeds, its bytes
/// replayed to the sshd that answers.
fn replay_after_early_close(backend: Backend) {
    let upstream = free_ports_in_a_row(1);
    let fake = TcpListener::bind((LOCALHOST, upstream)).unwrap();
    let (relay, port, _metrics) = relay_to(upstream, "hold = \"20s\"\n", backend);
    let mut sshd = Sshd::prepare(upstream);
    let files = tempfile::tempdir().unwrap();
    let source = files.path().join("source.bin");
    random_file(&source, 3 << 20);
    let copy = files.path().join("copy.bin");
    let mut scp = sshd.scp(port);
    scp.arg(&source).arg(Sshd::remote(&copy));
    let mut client = scp.spawn().expect("start scp");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut conn = accept_within(&fake, Duration::from_secs(10));
        // What the client sent first reaches every attempt: its SSH banner.
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut banner = [0u8; 7];
        let _ = std::io::Read::read_exact(&mut conn, &mut banner);
        seen.push(banner);
    }
    drop(fake);
    sshd.launch();
    let status =
        process::wait_deadline(&mut client, Duration::from_secs(60)).expect("scp still running");
    assert!(status.success(), "scp: {status}");
    assert!(seen.iter().all(|b| b == b"SSH-2.0"), "{seen:?}");
    let closed = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(10));
    assert!(
        matches!(closed.reason(), "client_eof" | "upstream_eof"),
        "{closed:?}"
    );
    assert_same_file(&copy, &source);
}
data_path_test!(replay_after_early_close);

/// The hold runs out with nothing listening: the client is closed within `hold` + 1 s,
/// the failure counted once, with the last reason.
fn hold_runs_out(backend: Backend) {
    let upstream = free_ports_in_a_row(1);
    let (relay, port, metrics) = relay_to(upstream, "hold = \"2s\"\n", backend);
    let started = Instant::now();
    let mut conn = TcpStream::connect((LOCALHOST, port)).unwrap();
    std::io::Write::write_all(&mut conn, b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    let (_, _) = expect_closed(&mut conn, Duration::from_secs(4));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let gave_up = relay.wait_log(
        |l| l.msg() == "gave up waiting for the upstream",
        Duration::from_secs(1),
    );
    assert!(gave_up.num("attempts") >= 4, "{gave_up:?}");
    let closed = relay.wait_log(|l| l.is_closed_on(port), Duration::from_secs(1));
    assert!(closed.reason().starts_with("error: connect:"), "{closed:?}");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.sum(CONNECT_FAILURES, &[("map", "C.boot")]),
        1.0,
        "counted once"
    );
    assert_eq!(
        s.sum(
            CONNECT_FAILURES,
            &[("map", "C.boot"), ("reason", "refused")]
        ),
        1.0
    );
    assert_eq!(s.value(HELD, &[("map", "C.boot")]), 0.0);
}
data_path_test!(hold_runs_out);

/// Held clients and reloads: removing the mapping ends its held clients at once
/// (`removed_mapping = "close"`, the default), logged with reason `reload`.
fn reload_removes_held(backend: Backend) {
    let upstream = free_ports_in_a_row(1);
    let (relay, port, metrics) = relay_to(upstream, "hold = \"30s\"\n", backend);
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect((LOCALHOST, port)).unwrap())
        .collect();
    wait_metric(metrics, HELD, &[("map", "C.boot")], 3.0);
    let other = free_port();
    let to = SocketAddr::from((LOCALHOST, free_port()));
    relay.rewrite(&(relay_section(Some(metrics), "") + &map_section(other, to, "other", "")));
    relay.wait_reloaded(2, Duration::from_secs(10));
    for c in &mut clients {
        let (_, took) = expect_closed(c, Duration::from_secs(2));
        assert!(took < Duration::from_secs(2));
    }
    let closed = relay.wait_logs(|l| l.is_closed_on(port), 3, Duration::from_secs(2));
    assert!(closed.iter().all(|l| l.reason() == "reload"), "{closed:?}");
    let s = Scrape::take(metrics);
    assert_eq!(s.find(HELD, &[("map", "C.boot")]).unwrap_or(0.0), 0.0);
}
data_path_test!(reload_removes_held);

/// The relay's open fds and resident memory (kB).
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (fds, rss)
}

/// 500 held clients at once stay within the budget the README states (2 fds and under
/// 2 KiB of memory each, no pipe); SIGTERM then ends them at once.
fn five_hundred_held(backend: Backend) {
    const N: usize = 500;
    let upstream = free_ports_in_a_row(1);
    let (mut relay, port, metrics) = relay_to(upstream, "hold = \"60s\"\n", backend);
    let before = fds_and_rss(relay.pid());
    let pipes_before = Scrape::take(metrics).sum("portrelay_pipes", &[]);
    let clients: Vec<TcpStream> = (0..N)
        .map(|_| {
            let mut c = TcpStream::connect((LOCALHOST, port)).unwrap();
            std::io::Write::write_all(&mut c, b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
            c
        })
        .collect();
    wait_metric(metrics, HELD, &[("map", "C.boot")], N as f64);
    // Let every connection go through a few retries (each a new socket).
    std::thread::sleep(Duration::from_secs(3));
    let after = fds_and_rss(relay.pid());
    let fds = after.0 - before.0;
    let rss_kb = after.1.saturating_sub(before.1);
    eprintln!("{N} held clients: +{fds} fds, +{rss_kb} kB RSS");
    assert!(fds <= 2 * N + 16, "{fds} fds for {N} held clients");
    // What this guards against is a held client holding a copy buffer (64 KiB) or a pipe,
    // not the relay's exact footprint (a benchmark's business): the entry table doubling
    // once in the window moves RSS by several hundred kB, so the bound is 4 kB a client,
    // a sixteenth of one buffer each.
    assert!(rss_kb <= 4 * N as u64, "{rss_kb} kB for {N} held clients");
    let s = Scrape::take(metrics);
    assert_eq!(s.sum("portrelay_pipes", &[]), pipes_before, "no pipe");
    let started = Instant::now();
    relay.sigterm();
    let status = relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "held clients must not wait for shutdown_grace: {:?}",
        started.elapsed()
    );
    let shut = relay
        .log_lines()
        .iter()
        .filter(|l| l.is_closed_on(port) && l.reason() == "shutdown")
        .count();
    assert_eq!(shut, N);
    drop(clients);
}
data_path_test!(five_hundred_held);
