//! Live reload of the control file (issue 4): the relay applies a rewritten file by
//! difference while connections run, and a file that fails changes nothing.
//!
//! - an scp of 256 MiB through one mapping survives 50 reloads that rename it, change its
//!   `allow` and add and remove other mappings (SIGHUP and watched renames, alternately);
//! - a removed mapping stops accepting; its live connection follows `removed_mapping`
//!   (`close`: ends at once, logged with reason `reload`; `keep`: runs on);
//! - a retargeted port reaches the new upstream for new connections without refusing any
//!   meanwhile; old connections follow `removed_mapping`;
//! - a broken file (syntax error, duplicate port) keeps what runs, is logged as
//!   `FILE:LINE:COL: message` and counted, and does not use up a generation;
//! - the watch sees both a rename over the file and an in-place rewrite, and a burst of
//!   renames ends with the last file in force;
//! - a port held by another program is reported, the rest of the file applies, and a later
//!   reload opens it;
//! - `reload_10k`: one change in a file of 10,000 mappings is applied within 2 s, and the
//!   echo round trips of another mapping meanwhile keep a p99 under 50 ms.
//!
//! Every upstream here greets with its name (`NAME\n`) and then echoes, so a client knows
//! which upstream it reached.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::files::{assert_same_file, random_file};
use crate::util::log::LogLine;
use crate::util::metrics::Scrape;
use crate::util::net::echo_until_eof;
use crate::util::net::{
    assert_refused, connect, connect_expect_reset, connect_from, expect_closed,
    free_ports_in_a_row, listen, read_some, roundtrip, Upstream, LOCALHOST,
};
use crate::util::process;
use crate::util::relay::{
    allow_line, data_path_test, map_section, relay_section, run_on, Start, BIN,
};
use crate::util::{poll, Backend, Relay, Sshd};

/// How long a reload may take to be applied and logged (the watch waits 50 ms first).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection that a reload closes may take to end, from the client's side.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Control files, upstreams, clients

/// An upstream that sends `NAME\n` as soon as it accepts, then echoes every byte; at end
/// of stream it shuts down its write side.
fn named_echo(name: &str) -> Upstream {
    let greeting = format!("{name}\n").into_bytes();
    let listener = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    Upstream::serve(listener, move |mut conn, stats| {
        conn.write_all(&greeting)?;
        echo_until_eof(&mut conn, stats)
    })
}

/// Reads the greeting line of a [`named_echo`] upstream (without its newline).
fn read_greeting(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match read_some(conn, &mut byte)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(byte[0]),
        }
    }
    Err(std::io::Error::other("greeting longer than 64 bytes"))
}

/// A connection to 127.0.0.1:`port` through the relay, and the name of the upstream it
/// reached.
fn connect_named(port: u16) -> (TcpStream, String) {
    let mut conn = connect(port);
    let name = read_greeting(&mut conn)
        .unwrap_or_else(|e| panic!("greeting of the upstream behind port {port}: {e}"));
    (conn, name)
}

/// A new connection to `port` reaches the upstream named `name` and echoes.
fn assert_serves(port: u16, name: &str) {
    let (mut conn, reached) = connect_named(port);
    assert_eq!(reached, name, "upstream reached through port {port}");
    roundtrip(&mut conn, format!("through {port} to {name}").as_bytes());
}

/// Every `control file error` line so far: its `error` field.
fn control_file_errors(relay: &Relay) -> Vec<String> {
    relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == "control file error")
        .map(|l| l.text("error").to_string())
        .collect()
}

/// Whether `line` is a `reload failed…` line.
fn is_reload_failed(line: &LogLine) -> bool {
    line.msg().starts_with("reload failed")
}

/// Splits `FILE:LINE:COL: message` for the control file at `file`: (line, col, message).
fn split_error<'a>(error: &'a str, file: &str) -> (u64, u64, &'a str) {
    let rest = error
        .strip_prefix(file)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or_else(|| panic!("error does not begin with `{file}:`: {error}"));
    let mut parts = rest.splitn(3, ':');
    let (line, col, message) = (parts.next(), parts.next(), parts.next());
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    match (number(line), number(col), message) {
        (Some(line), Some(col), Some(message)) if line >= 1 && col >= 1 => {
            (line, col, message.trim())
        }
        _ => panic!("error is not FILE:LINE:COL: message: {error}"),
    }
}

/// The 1-based number of the first line of `text` that `pred` holds for, after line
/// `after` (1-based; 0 for from the start).
fn line_number(text: &str, after: usize, pred: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .enumerate()
        .skip(after)
        .find(|(_, l)| pred(l))
        .map(|(i, _)| i as u64 + 1)
        .unwrap_or_else(|| panic!("no such line in:\n{text}"))
}

// ---------------------------------------------------------------------------------------
// scp through 50 reloads

/// Size of the file the scp test sends.
const SCP_SIZE: usize = 256 << 20;

/// scp's bandwidth cap (`-l`, Kbit/s) in the 50-reload test, so that the transfer is
/// still running when the 50th reload is applied: 256 MiB at 160 Mbit/s take about 13 s.
const SCP_LIMIT_KBITS: u32 = 160_000;

/// How many reloads the scp test makes.
const RELOADS: usize = 50;

/// Host ports of the other mappings the scp test adds and removes.
const OTHERS: u16 = 4;

data_path_test!(scp_256mib_through_50_reloads);
/// An scp upload of 256 MiB through mapping A while the file is rewritten 50 times: each
/// rewrite renames A, changes its `allow` (always including 127.0.0.1), and adds and
/// removes other mappings; the reloads alternate between a watched rename and a SIGHUP.
/// Each reload is applied (logged, with the next generation, and the other mappings open
/// and closed as the file says) before the next rewrite, all while the transfer runs. The
/// file arrives byte for byte, and the relay logs exactly one connection on A's port, with
/// at least the file's size sent upstream: no reconnect.
fn scp_256mib_through_50_reloads(backend: Backend) {
    let sshd = Sshd::start();
    let echo = named_echo("other");
    let base = free_ports_in_a_row(1 + OTHERS);
    let port_a = base;
    let others: Vec<u16> = (1..=OTHERS).map(|i| base + i).collect();

    // Rewrites alternate: an even step renames the file over while the relay watches, and
    // its file says `watch = false`; an odd step renames the file over (unwatched) and
    // sends SIGHUP, and its file says `watch = true` again. So each step makes one reload.
    let allows = [
        "[\"127.0.0.1/32\"]",
        "[\"10.0.0.0/8\", \"127.0.0.0/8\"]",
        "[\"0.0.0.0/0\", \"::/0\"]",
    ];
    // (file, its mapping count, the other ports it opens)
    let file = |step: Option<usize>| -> (String, u64, Vec<u16>) {
        let (name, allow, watch, open) = match step {
            None => ("A.start".to_string(), allows[2], true, vec![others[0]]),
            Some(s) => {
                let count = 1 + s % 3;
                let open: Vec<u16> = (0..count).map(|j| others[(s + j) % others.len()]).collect();
                (format!("A.{s}"), allows[s % 3], s % 2 == 1, open)
            }
        };
        let mut toml = relay_section(None, &format!("watch = {watch}"));
        toml += &map_section(
            port_a,
            sshd.addr(),
            &name,
            &format!("allow = {allow}\nmax_connections = 8"),
        );
        for p in &open {
            toml += &map_section(*p, echo.addr(), &format!("other-{p}"), "");
        }
        (toml, 1 + open.len() as u64, open)
    };
    let mut relay = Relay::start(&file(None).0, backend);
    assert_serves(others[0], "other");

    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("source.bin");
    random_file(&source, SCP_SIZE);
    let remote = sshd.dir().join("scp-through-reloads.bin");
    let mut scp_cmd = sshd.scp(port_a);
    scp_cmd
        .arg("-l")
        .arg(SCP_LIMIT_KBITS.to_string())
        .arg(&source)
        .arg(Sshd::remote(&remote));
    let scp = std::thread::spawn(move || process::run(&mut scp_cmd, Duration::from_secs(180)));

    // The transfer runs once bytes arrive at the sshd.
    let started = poll(Duration::from_secs(60), Duration::from_millis(20), || {
        if scp.is_finished() {
            return Some(false);
        }
        let size = std::fs::metadata(&remote).map(|m| m.len()).unwrap_or(0);
        (size > 0).then_some(true)
    });
    match started {
        Some(true) => {}
        Some(false) => panic!("scp ended before any byte arrived: {:?}", scp.join()),
        None => panic!("no byte of the scp arrived within 60 s"),
    }

    let transfer_start = Instant::now();
    let mut generation = 1;
    let mut applied_ms = Vec::new();
    for step in 0..RELOADS {
        let (toml, mappings, open) = file(Some(step));
        relay.rewrite(&toml);
        if step % 2 == 1 {
            relay.sighup();
        }
        // The first reload after the last one that applies this file. (A SIGHUP step's
        // rename is seen by the watch while it is off; should the watch thread look at it
        // only after the SIGHUP reload turned it on again, it reloads once more: the same
        // file, or the next one. Matching on the mapping count, which differs from one
        // step to the next, finds the reload that applied this file either way.)
        let line = relay.wait_log(
            |l| {
                l.msg() == "reloaded"
                    && l.u64("generation") > Some(generation)
                    && l.u64("mappings") == Some(mappings)
            },
            RELOAD_TIMEOUT,
        );
        assert!(line.num("changed_ports") >= 1, "step {step}: {line}");
        assert_eq!(line.num("listen_failures"), 0, "step {step}: {line}");
        generation = line.num("generation");
        if let Some(ms) = line.get("ms").and_then(|v| v.as_f64()) {
            applied_ms.push(ms);
        }
        for p in &others {
            if open.contains(p) {
                assert_serves(*p, "other");
            } else {
                assert_refused(*p);
            }
        }
        if scp.is_finished() {
            panic!(
                "the scp ended at step {step} of {RELOADS}, before the reloads were done \
                 (lower SCP_LIMIT_KBITS, or it failed): {:?}",
                scp.join()
            );
        }
    }
    let reloads_took = transfer_start.elapsed();
    let failed: Vec<LogLine> = relay
        .log_lines()
        .into_iter()
        .filter(is_reload_failed)
        .collect();
    assert!(failed.is_empty(), "reloads failed: {failed:?}");
    let reloads = relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == "reloaded")
        .count();
    assert!(reloads >= RELOADS, "{reloads} reloads");
    eprintln!(
        "{RELOADS} rewrites made {reloads} reloads (generation {generation}) in {reloads_took:?}; \
         apply ms max {:.1}",
        applied_ms.iter().cloned().fold(0.0, f64::max)
    );

    let out = scp.join().expect("scp thread");
    assert!(
        out.status.success(),
        "scp through 50 reloads: {:?}: {}",
        out.status,
        out.stderr
    );
    assert_same_file(&remote, &source);

    let closed = relay.wait_log(|l| l.is_closed_on(port_a), Duration::from_secs(10));
    let on_a: Vec<LogLine> = relay
        .log_lines()
        .into_iter()
        .filter(|l| l.is_closed_on(port_a))
        .collect();
    assert_eq!(
        on_a.len(),
        1,
        "connections on A's port (exactly the scp's one): {on_a:?}"
    );
    assert_eq!(closed.text("upstream"), sshd.addr().to_string(), "{closed}");
    assert!(
        closed.num("bytes_client_to_upstream") >= SCP_SIZE as u64,
        "the scp connection counted fewer bytes upstream than the file has: {closed}"
    );
    assert!(
        ["client_eof", "upstream_eof"].contains(&closed.reason()),
        "the scp connection ended normally: {closed}"
    );
    // A new connection on A is served under A's last name.
    let mut ssh = connect(port_a);
    let mut banner = [0u8; 8];
    ssh.read_exact(&mut banner).expect("sshd banner");
    assert_eq!(&banner, b"SSH-2.0-");
    drop(ssh);
    let last = relay.wait_logs(|l| l.is_closed_on(port_a), 2, Duration::from_secs(10));
    assert_eq!(
        last[1].text("map"),
        format!("A.{}", RELOADS - 1),
        "{}",
        last[1]
    );
}

// ---------------------------------------------------------------------------------------
// Removing a mapping

/// A relay with mappings `gone` and `stays` (each to an upstream of that name) and the
/// given `removed_mapping`; a live connection on each; then a rewrite without `gone`.
/// Checks that `gone` refuses new connections and `stays` is untouched, and returns the
/// relay, the live connection of `gone`, its port and its upstream.
fn remove_one(policy: &str, backend: Backend) -> (Relay, TcpStream, u16, Upstream) {
    let gone = named_echo("gone");
    let stays = named_echo("stays");
    let base = free_ports_in_a_row(2);
    let (p_gone, p_stays) = (base, base + 1);
    let h = relay_section(None, &format!("removed_mapping = \"{policy}\""));
    let both = h.clone()
        + &map_section(p_gone, gone.addr(), "gone", "")
        + &map_section(p_stays, stays.addr(), "stays", "");
    let relay = Relay::start(&both, backend);
    let (mut live, name) = connect_named(p_gone);
    assert_eq!(name, "gone");
    roundtrip(&mut live, b"before the reload");
    let (mut other, name) = connect_named(p_stays);
    assert_eq!(name, "stays");
    roundtrip(&mut other, b"before the reload");

    relay.rewrite(&(h + &map_section(p_stays, stays.addr(), "stays", "")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 1, "{line}");
    assert_eq!(line.num("changed_ports"), 1, "{line}");
    assert_refused(p_gone);
    roundtrip(
        &mut other,
        b"the other mapping's live connection is untouched",
    );
    assert_serves(p_stays, "stays");
    drop(other);
    (relay, live, p_gone, gone)
}

data_path_test!(removed_mapping_close);
/// `removed_mapping = "close"`: after a rewrite without the mapping its port refuses new
/// connections, its live connection ends within seconds (logged with reason `reload`), and
/// the relay closes the upstream side too.
fn removed_mapping_close(backend: Backend) {
    let (relay, mut live, port, upstream) = remove_one("close", backend);
    let (_, took) = expect_closed(&mut live, CLOSE_WITHIN);
    let line = relay.wait_log(|l| l.is_closed_on(port), CLOSE_WITHIN);
    assert_eq!(line.reason(), "reload", "{line}");
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
    let upstream_closed = poll(CLOSE_WITHIN, Duration::from_millis(10), || {
        (upstream.active() == 0).then_some(())
    });
    assert!(
        upstream_closed.is_some(),
        "the upstream side of the closed connection is still open"
    );
    eprintln!("the live connection of the removed mapping ended {took:?} after the reload");
}

data_path_test!(removed_mapping_keep);
/// `removed_mapping = "keep"`: after a rewrite without the mapping its port refuses new
/// connections, but its live connection keeps relaying until the client closes it.
fn removed_mapping_keep(backend: Backend) {
    let (relay, mut live, port, upstream) = remove_one("keep", backend);
    for i in 0..3 {
        roundtrip(&mut live, format!("after the reload, #{i}").as_bytes());
    }
    assert_eq!(upstream.active(), 1, "the kept connection's upstream side");
    assert!(
        !relay.log_lines().iter().any(|l| l.is_closed_on(port)),
        "the kept connection was logged as closed while it runs"
    );
    live.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "{} bytes after the last echo", rest.len());
    let line = relay.wait_log(|l| l.is_closed_on(port), CLOSE_WITHIN);
    assert!(
        ["client_eof", "upstream_eof"].contains(&line.reason()),
        "the kept connection ended by the client: {line}"
    );
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
}

data_path_test!(removed_after_rename_closes);
/// `removed_mapping = "close"`, with a reload in between that only renames the mapping
/// (which leaves its live connection alone): removing the mapping afterwards still ends
/// the connection that was accepted before the rename.
fn removed_after_rename_closes(backend: Backend) {
    close_after_rename(backend, false);
}

data_path_test!(retargeted_after_rename_closes);
/// `removed_mapping = "close"`, with a reload in between that only renames the mapping:
/// giving its port a new upstream afterwards still ends the connection that was accepted
/// before the rename.
fn retargeted_after_rename_closes(backend: Backend) {
    close_after_rename(backend, true);
}

/// A live connection on a mapping; a reload renames the mapping (the connection runs on);
/// a second reload removes the mapping, or gives its port a new upstream (`retarget`):
/// with `removed_mapping = "close"` the connection must end.
fn close_after_rename(backend: Backend, retarget: bool) {
    let upstream = named_echo("first");
    let second = named_echo("second");
    let stays = named_echo("stays");
    let base = free_ports_in_a_row(2);
    let (port, p_stays) = (base, base + 1);
    let h = relay_section(None, "removed_mapping = \"close\"");
    let keep = map_section(p_stays, stays.addr(), "stays", "");
    let relay = Relay::start(
        &(h.clone() + &map_section(port, upstream.addr(), "before", "") + &keep),
        backend,
    );
    let (mut live, _) = connect_named(port);
    roundtrip(&mut live, b"before the rename");

    relay.rewrite(&(h.clone() + &map_section(port, upstream.addr(), "after", "") + &keep));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    roundtrip(&mut live, b"a rename leaves the live connection alone");
    assert_serves(port, "first");

    if retarget {
        relay.rewrite(&(h + &map_section(port, second.addr(), "after", "") + &keep));
        relay.wait_reloaded(3, RELOAD_TIMEOUT);
        assert_serves(port, "second");
    } else {
        relay.rewrite(&(h + &keep));
        relay.wait_reloaded(3, RELOAD_TIMEOUT);
        assert_refused(port);
    }
    // removed_mapping = "close", a connection accepted before a rename, then the port
    // retargeted or removed: it ends.
    expect_closed(&mut live, CLOSE_WITHIN);
    let line = relay.wait_log(
        |l| l.is_closed_on(port) && l.reason() == "reload",
        CLOSE_WITHIN,
    );
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
}

// ---------------------------------------------------------------------------------------
// Retargeting a port

/// What the probe thread of [`retarget`] saw: when each connection started, and the
/// upstream it reached or how it failed.
type Probes = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

/// Connects to `port` over and over until `stop` (or 60 s, or 100,000 connections),
/// recording each outcome.
fn probe_loop(port: u16, stop: Arc<AtomicBool>, probes: Probes) {
    let addr = SocketAddr::from((LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..100_000 {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return;
        }
        let at = Instant::now();
        let outcome = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Err(e) => Err(format!("connect: {e}")),
            Ok(mut conn) => {
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                read_greeting(&mut conn).map_err(|e| format!("greeting: {e}"))
            }
        };
        probes.lock().unwrap().push((at, outcome));
    }
}

/// A port retargeted from upstream `old` to upstream `new` with `removed_mapping =
/// policy`: while a thread keeps connecting, no connection is refused; every connection
/// begun after the reload reaches `new`; the live connection on `old` follows the policy.
fn retarget(policy: &str, backend: Backend) {
    let old = named_echo("old");
    let new = named_echo("new");
    let port = free_ports_in_a_row(1);
    let h = relay_section(None, &format!("removed_mapping = \"{policy}\""));
    let relay = Relay::start(
        &(h.clone() + &map_section(port, old.addr(), "C.1", "")),
        backend,
    );
    let (mut live, name) = connect_named(port);
    assert_eq!(name, "old");
    const BEFORE: &[u8] = b"before the reload";
    const AFTER: &[u8] = b"after the reload, still the old upstream";
    roundtrip(&mut live, BEFORE);

    let stop = Arc::new(AtomicBool::new(false));
    let probes: Probes = Arc::default();
    let prober = std::thread::spawn({
        let (stop, probes) = (stop.clone(), probes.clone());
        move || probe_loop(port, stop, probes)
    });
    let count = |since: Instant| {
        probes
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .count()
    };
    let t0 = Instant::now();
    let warmed = poll(Duration::from_secs(20), Duration::from_millis(5), || {
        (count(t0) >= 20).then_some(())
    });
    assert!(warmed.is_some(), "the probe connections do not get through");

    relay.rewrite(&(h + &map_section(port, new.addr(), "C.1", "")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    let reloaded = Instant::now();
    assert_eq!(line.num("changed_ports"), 1, "{line}");
    let after = poll(Duration::from_secs(20), Duration::from_millis(5), || {
        (count(reloaded) >= 20).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    prober.join().expect("probe thread");
    assert!(
        after.is_some(),
        "the probe connections stopped after the reload"
    );

    let probes = probes.lock().unwrap();
    // The listener stays open: no connect is ever refused. A connection begun after the
    // reload applied never fails. One begun before it may have been accepted by a loop just
    // before that loop applied the change: it reached the old upstream, and with "close"
    // the policy resets it (with "keep" nothing may fail at all).
    let failed: Vec<_> = probes
        .iter()
        .filter(|(at, o)| match o {
            Err(e) if e.contains("refused") => true,
            Err(_) => *at >= reloaded || policy == "keep",
            Ok(_) => false,
        })
        .collect();
    assert!(
        failed.is_empty(),
        "connections failed while the port was retargeted: {failed:?}"
    );
    let stale: Vec<_> = probes
        .iter()
        .filter(|(at, o)| *at >= reloaded && o.as_deref() != Ok("new"))
        .collect();
    assert!(
        stale.is_empty(),
        "connections begun after the reload did not reach the new upstream: {stale:?}"
    );
    // Connections begun before the reload reached `old`, or were closed by it.
    let odd: Vec<_> = probes
        .iter()
        .filter(|(_, o)| match o {
            Ok(name) => name != "old" && name != "new",
            Err(_) => policy == "keep",
        })
        .collect();
    assert!(odd.is_empty(), "unexpected probe outcomes: {odd:?}");
    let reached_old = probes
        .iter()
        .filter(|(_, o)| o.as_deref() == Ok("old"))
        .count();
    eprintln!(
        "{} probe connections, {reached_old} to the old upstream",
        probes.len()
    );
    drop(probes);
    assert_serves(port, "new");

    match policy {
        "close" => {
            expect_closed(&mut live, CLOSE_WITHIN);
            let line = relay.wait_log(
                |l| {
                    l.is_closed_on(port)
                        && l.str("upstream") == Some(&old.addr().to_string())
                        && l.u64("bytes_client_to_upstream") == Some(BEFORE.len() as u64)
                },
                CLOSE_WITHIN,
            );
            assert_eq!(line.reason(), "reload", "{line}");
        }
        "keep" => {
            let before = old.bytes_in();
            roundtrip(&mut live, AFTER);
            assert_eq!(
                old.bytes_in(),
                before + AFTER.len() as u64,
                "bytes at the old upstream"
            );
            live.shutdown(Shutdown::Write).expect("shutdown(Write)");
            let mut rest = Vec::new();
            live.read_to_end(&mut rest).expect("read to EOF");
            let line = relay.wait_log(
                |l| {
                    l.is_closed_on(port)
                        && l.str("upstream") == Some(&old.addr().to_string())
                        && l.u64("bytes_client_to_upstream")
                            == Some((BEFORE.len() + AFTER.len()) as u64)
                },
                CLOSE_WITHIN,
            );
            assert!(
                ["client_eof", "upstream_eof"].contains(&line.reason()),
                "{line}"
            );
        }
        _ => unreachable!(),
    }
}

data_path_test!(retarget_close);
/// A retargeted port with `removed_mapping = "close"`: see [`retarget`].
fn retarget_close(backend: Backend) {
    retarget("close", backend);
}

data_path_test!(retarget_keep);
/// A retargeted port with `removed_mapping = "keep"`: see [`retarget`].
fn retarget_keep(backend: Backend) {
    retarget("keep", backend);
}

// ---------------------------------------------------------------------------------------
// `allow` and `max_connections` changed in place

/// A connection from `src` to 127.0.0.1:`port` through the relay, checked to reach the
/// upstream named `name` and echo.
fn connect_named_from(src: Ipv4Addr, port: u16, name: &str) -> TcpStream {
    let mut conn = connect_from(src, port);
    let reached = read_greeting(&mut conn)
        .unwrap_or_else(|e| panic!("greeting of the upstream behind port {port} for {src}: {e}"));
    assert_eq!(
        reached, name,
        "upstream reached from {src} through port {port}"
    );
    roundtrip(&mut conn, format!("from {src}").as_bytes());
    conn
}

/// The `connection rejected` lines on `port` so far.
fn rejections(relay: &Relay, port: u16) -> Vec<LogLine> {
    relay
        .log_lines()
        .into_iter()
        .filter(|l| l.is_rejected_on(port))
        .collect()
}

/// Connections from `src` must be refused at once (an RST), one silent and one that sends
/// bytes, each logged with `reason`; none of the bytes may reach `upstream`.
fn assert_refused_now(relay: &Relay, port: u16, src: Ipv4Addr, reason: &str, upstream: &Upstream) {
    let (accepted, bytes) = (upstream.accepted(), upstream.bytes_in());
    let before = rejections(relay, port).len();
    connect_expect_reset(src, port, b"");
    connect_expect_reset(src, port, b"must not reach the upstream");
    let lines = relay.wait_logs(|l| l.is_rejected_on(port), before + 2, RELOAD_TIMEOUT);
    for line in &lines[before..] {
        assert_eq!(line.reason(), reason, "{line}");
        assert!(
            line.text("client").starts_with(&format!("{src}:")),
            "{line}"
        );
    }
    assert_eq!(
        upstream.accepted(),
        accepted,
        "a refused connection reached the upstream"
    );
    assert_eq!(
        upstream.bytes_in(),
        bytes,
        "a refused connection's bytes reached the upstream"
    );
}

const SRC_OLD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SRC_NEW: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

data_path_test!(reload_narrows_allow);
/// `allow = ["127.0.0.2/32"]`, then a reload to `["127.0.0.3/32"]` (same port and upstream:
/// the same mapping, changed in place). The live connection from 127.0.0.2 keeps echoing;
/// a new one from 127.0.0.2 is refused at once (`acl`, its bytes never reach the
/// upstream); one from 127.0.0.3, refused before, is served.
fn reload_narrows_allow(backend: Backend) {
    let upstream = named_echo("acl");
    let port = free_ports_in_a_row(1);
    let file = |cidr: &str| {
        relay_section(None, "") + &map_section(port, upstream.addr(), "C.acl", &allow_line(&[cidr]))
    };
    let relay = Relay::start(&file("127.0.0.2/32"), backend);
    let mut live = connect_named_from(SRC_OLD, port, "acl");
    assert_refused_now(&relay, port, SRC_NEW, "acl", &upstream);

    relay.rewrite(&file("127.0.0.3/32"));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("changed_ports"), 1, "{line}");
    roundtrip(&mut live, b"the live connection is untouched");
    assert_refused_now(&relay, port, SRC_OLD, "acl", &upstream);
    let mut new = connect_named_from(SRC_NEW, port, "acl");
    roundtrip(&mut live, b"still untouched");
    roundtrip(&mut new, b"served under the new allow");
}

data_path_test!(reload_lowers_max_connections);
/// A mapping's `max_connections = 4` with two live connections, then a reload to 1: both
/// keep echoing; a new one is refused at once (`limit`) while either is open; once both
/// have closed one is served and the next refused. Then the same with the relay-wide
/// `max_connections` lowered to 1 (and the mapping's cap removed).
fn reload_lowers_max_connections(backend: Backend) {
    let upstream = named_echo("cap");
    let port = free_ports_in_a_row(1);
    let file = |relay_cap: &str, map_cap: &str| {
        relay_section(None, relay_cap) + &map_section(port, upstream.addr(), "C.cap", map_cap)
    };
    let relay = Relay::start(&file("", "max_connections = 4"), backend);
    let src = LOCALHOST;
    let mut a = connect_named_from(src, port, "cap");
    let mut b = connect_named_from(src, port, "cap");

    relay.rewrite(&file("", "max_connections = 1"));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    roundtrip(&mut a, b"a is untouched");
    roundtrip(&mut b, b"b is untouched");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(a);
    relay.wait_logs(|l| l.is_closed_on(port), 1, RELOAD_TIMEOUT);
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(b);
    relay.wait_logs(|l| l.is_closed_on(port), 2, RELOAD_TIMEOUT);
    let mut only = connect_named_from(src, port, "cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    roundtrip(&mut only, b"the one the cap allows");

    // The relay-wide cap, lowered to 1 (the mapping's removed) with one connection open:
    // the next is refused until it closes.
    relay.rewrite(&file("max_connections = 1", ""));
    relay.wait_reloaded(3, RELOAD_TIMEOUT);
    roundtrip(&mut only, b"untouched by the relay-wide cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
    drop(only);
    relay.wait_logs(|l| l.is_closed_on(port), 3, RELOAD_TIMEOUT);
    let _one = connect_named_from(src, port, "cap");
    assert_refused_now(&relay, port, src, "limit", &upstream);
}

// ---------------------------------------------------------------------------------------
// Broken rewrites

/// A relay with metrics and one mapping (to upstream `one`), and a live connection on it;
/// `broken` rewrites the file so that it fails to load, and returns where the failure must
/// be reported (1-based line, and column if it is certain) and a word its message holds. Checks that every error is logged as FILE:LINE:COL (one
/// at `broken`'s line), that the generation stays, the old mapping serves (the live
/// connection and new ones), and the failures are counted; then a good rewrite gets
/// generation 2.
fn broken_rewrite(
    backend: Backend,
    broken: impl Fn(&mut Relay, &str, u16) -> (u64, Option<u64>, String),
    failures: u64,
) {
    let one = named_echo("one");
    let two = named_echo("two");
    let base = free_ports_in_a_row(3);
    let (port, port_two, metrics) = (base, base + 1, base + 2);
    let good = relay_section(Some(metrics), "") + &map_section(port, one.addr(), "one", "");
    let mut relay = Relay::start(&good, backend);
    let (mut live, _) = connect_named(port);
    roundtrip(&mut live, b"before the broken rewrite");

    let want = broken(&mut relay, &good, port);
    let fails = relay.wait_logs(is_reload_failed, failures as usize, RELOAD_TIMEOUT);
    for fail in &fails {
        assert_eq!(fail.u64("generation"), Some(1), "{fail}");
    }
    let file = relay.config_path().display().to_string();
    let errors = control_file_errors(&relay);
    assert!(!errors.is_empty(), "no `control file error` line");
    for e in &errors {
        let (_, _, message) = split_error(e, &file);
        assert!(!message.is_empty(), "empty message: {e}");
    }
    let (want_line, want_col, says) = want;
    assert!(
        errors.iter().any(|e| {
            let (line, col, message) = split_error(e, &file);
            line == want_line && want_col.map_or(true, |c| c == col) && message.contains(&says)
        }),
        "no error at line {want_line}, column {want_col:?} saying {says:?}: {errors:?}"
    );
    assert_eq!(
        relay.generation(),
        1,
        "a failed reload changed the generation"
    );

    roundtrip(&mut live, b"the live connection is untouched");
    assert_serves(port, "one");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "failure")]),
        Some(failures as f64),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "success")])
            .unwrap_or(0.0),
        0.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_config_generation", &[]),
        Some(1.0),
        "{}",
        s.text
    );
    assert_eq!(s.get("portrelay_mappings", &[]), Some(1.0), "{}", s.text);

    // A good file next: the next generation, applied.
    relay.rewrite(&(good + &map_section(port_two, two.addr(), "two", "")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 2, "{line}");
    assert_serves(port_two, "two");
    assert_serves(port, "one");
    roundtrip(&mut live, b"still untouched");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "success")]),
        Some(1.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "failure")]),
        Some(failures as f64),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_config_generation", &[]),
        Some(2.0),
        "{}",
        s.text
    );
    assert_eq!(s.get("portrelay_mappings", &[]), Some(2.0), "{}", s.text);
}

data_path_test!(broken_rewrite_syntax);
/// A rewrite (by rename) with a TOML syntax error: nothing changes; see [`broken_rewrite`].
fn broken_rewrite_syntax(backend: Backend) {
    broken_rewrite(
        backend,
        |relay, good, _| {
            let broken = format!("{good}[[map]\nport = 1\n");
            relay.rewrite(&broken);
            let line = line_number(&broken, 0, |l| l == "[[map]");
            (line, None, "syntax".to_string())
        },
        1,
    );
}

data_path_test!(broken_rewrite_duplicate_port);
/// A rewrite (in place) that maps the same port twice, then a SIGHUP that reads it again:
/// two failures, nothing changes; see [`broken_rewrite`].
fn broken_rewrite_duplicate_port(backend: Backend) {
    broken_rewrite(
        backend,
        |relay, good, port| {
            let other = named_echo("duplicate");
            let broken = format!(
                "{good} {}",
                map_section(port, other.addr(), "duplicate", "")
            );
            relay.rewrite_in_place(&broken);
            relay.wait_logs(is_reload_failed, 1, RELOAD_TIMEOUT);
            relay.sighup();
            let first = line_number(&broken, 0, |l| l == format!("port = {port}"));
            let second = line_number(&broken, first as usize, |l| l == format!("port = {port}"));
            // At the second mapping's port value ("port = " is 7 characters).
            (second, Some(8), port.to_string())
        },
        2,
    );
}

// ---------------------------------------------------------------------------------------
// The watch

data_path_test!(watch_rename_and_in_place);
/// With `watch = true` (the default) and no SIGHUP: a file renamed over the control file
/// is applied, then an in-place truncate-and-write; then a burst of renames ends with the
/// last file of the burst in force.
fn watch_rename_and_in_place(backend: Backend) {
    let ups: Vec<Upstream> = ["one", "two", "three"]
        .iter()
        .map(|n| named_echo(n))
        .collect();
    let base = free_ports_in_a_row(3);
    let p: Vec<u16> = (0..3).map(|i| base + i).collect();
    let h = relay_section(None, "");
    let m = |i: usize, name: &str| map_section(p[i], ups[i].addr(), name, "");
    let relay = Relay::start(&(h.clone() + &m(0, "one")), backend);
    assert_serves(p[0], "one");

    relay.rewrite(&(h.clone() + &m(0, "one") + &m(1, "two")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 2, "{line}");
    assert_serves(p[1], "two");
    assert_serves(p[0], "one");

    relay.rewrite_in_place(&(h.clone() + &m(1, "two") + &m(2, "three")));
    let line = relay.wait_reloaded(3, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 2, "{line}");
    assert_serves(p[2], "three");
    assert_serves(p[1], "two");
    assert_refused(p[0]);

    // A burst: ten renames in a row, each renaming mapping two; the last also brings back
    // mapping one. Whatever the burst coalesces into, the last file is what runs.
    const BURST: usize = 10;
    for i in 0..BURST {
        let mut toml = h.clone() + &m(1, &format!("two-{i}")) + &m(2, "three");
        if i == BURST - 1 {
            toml += &m(0, "one");
        }
        relay.rewrite(&toml);
    }
    relay.wait_log(
        |l| l.msg() == "reloaded" && l.u64("mappings") == Some(3),
        RELOAD_TIMEOUT,
    );
    assert_serves(p[0], "one");
    assert_serves(p[1], "two");
    assert_serves(p[2], "three");
    // A burst gives one reload, two at most (a burst that straddles the settling time).
    // Count once no reload has come for 500 ms.
    let mut last = (relay.generation(), Instant::now());
    let quiet = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = relay.generation();
        if now != last.0 {
            last = (now, Instant::now());
        }
        (last.1.elapsed() >= Duration::from_millis(500)).then_some(())
    });
    assert!(quiet.is_some(), "reloads keep coming after the burst");
    let burst_reloads = relay.generation() - 3;
    eprintln!("a burst of {BURST} renames made {burst_reloads} reload(s)");
    assert!(
        (1..=2).contains(&burst_reloads),
        "a burst of {BURST} renames made {burst_reloads} reloads"
    );
    assert!(
        !relay.log_lines().iter().any(is_reload_failed),
        "a reload failed"
    );
}

// ---------------------------------------------------------------------------------------
// A port held by another program

data_path_test!(port_in_use_reported);
/// A rewrite that adds a port another program listens on, and another new port: the busy
/// one is logged (`cannot listen`, with the port) and counted in the `reloaded` line, the
/// other new one serves; once the port is free, a SIGHUP opens it.
fn port_in_use_reported(backend: Backend) {
    let ups: Vec<Upstream> = ["old", "busy", "new"]
        .iter()
        .map(|n| named_echo(n))
        .collect();
    let base = free_ports_in_a_row(3);
    let (p_old, p_busy, p_new) = (base, base + 1, base + 2);
    let holder = TcpListener::bind((LOCALHOST, p_busy)).expect("bind the port to hold");
    let h = relay_section(None, "");
    let mut relay = Relay::start(
        &(h.clone() + &map_section(p_old, ups[0].addr(), "old", "")),
        backend,
    );

    relay.rewrite(
        &(h + &map_section(p_old, ups[0].addr(), "old", "")
            + &map_section(p_busy, ups[1].addr(), "busy", "")
            + &map_section(p_new, ups[2].addr(), "new", "")),
    );
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("listen_failures"), 1, "{line}");
    assert_eq!(line.num("mappings"), 3, "{line}");
    let busy = format!("127.0.0.1:{p_busy}");
    let cannot = relay.wait_log(
        |l| l.msg().starts_with("cannot listen") && l.raw.contains(&busy),
        Duration::from_secs(1),
    );
    assert_eq!(cannot.str("listen"), Some(busy.as_str()), "{cannot}");
    assert_serves(p_new, "new");
    assert_serves(p_old, "old");

    drop(holder);
    relay.sighup();
    let line = relay.wait_reloaded(3, RELOAD_TIMEOUT);
    assert_eq!(line.num("listen_failures"), 0, "{line}");
    assert_serves(p_busy, "busy");
    assert_serves(p_new, "new");
    assert_serves(p_old, "old");
}

// ---------------------------------------------------------------------------------------
// 10,000 mappings

/// Where the 10,000 mappings of `reload_10k` start looking for free ports.
const TEN_K_BASE: u16 = 10_000;
const TEN_K: u16 = 10_000;

/// `TEN_K` + 1 ports of 127.0.0.1 from [`TEN_K_BASE`] up that were free a moment ago (a
/// port another program holds is skipped).
fn ten_k_free_ports() -> Vec<u16> {
    let mut ports = Vec::with_capacity(usize::from(TEN_K) + 1);
    for port in TEN_K_BASE..=u16::MAX {
        if ports.len() > usize::from(TEN_K) {
            break;
        }
        if TcpListener::bind((LOCALHOST, port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(
        ports.len(),
        usize::from(TEN_K) + 1,
        "free ports from {TEN_K_BASE}"
    );
    ports
}

/// How long the apply of one change in a file of 10,000 mappings may take, from SIGHUP to
/// the `reloaded` line: a loose bound for a debug build on a loaded 2-core machine.
const RELOAD_10K_WITHIN: Duration = Duration::from_secs(2);

/// The echo round trips of another mapping while that reload is applied: their p99 stays
/// below this.
const RELOAD_10K_P99: Duration = Duration::from_millis(50);

/// One test for both backends, one after the other: both relays want the same 10,000
/// ports. It runs alone (`.config/nextest.toml`): no other test may take one of
/// those ports meanwhile.
#[test]
fn reload_10k() {
    run_on(measure_10k, Backend::Uring);
    run_on(measure_10k, Backend::Epoll);
}

/// CPU time the relay's main thread (its control thread, which reloads) has used so far:
/// the first field of /proc/PID/task/PID/schedstat, in nanoseconds.
fn control_thread_cpu(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/task/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{path}: {text:?}"));
    Duration::from_nanos(ns)
}

/// Round-trip times of 64-byte echoes: (when each began, how long it took).
type Rtts = Arc<Mutex<Vec<(Instant, Duration)>>>;

/// A relay with 10,000 mappings (ports 10000-19999 → one upstream) and one more to an echo
/// upstream, on which a client does 64-byte round trips back to back. Two reloads change
/// one mapping each (a rename, then a new upstream); prints each one's `ms`, and the echo
/// round-trip times before and while it is applied. Runs the relay named by
/// `$PORTRELAY_BIN` (say target/release/portrelay), else the test build (debug).
fn measure_10k(backend: Backend) {
    let program: PathBuf = std::env::var_os("PORTRELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN));
    let target = named_echo("ten-k");
    let other_target = named_echo("ten-k-other");
    let echo = Upstream::echo();
    let mut ports = ten_k_free_ports();
    // The echo mapping's port: one more free one.
    let echo_port = ports.pop().unwrap();
    let changed = ports[usize::from(TEN_K / 2)];
    let file = |name: &str, to: SocketAddr| {
        let mut toml = relay_section(None, "watch = false");
        toml.reserve(TEN_K as usize * 80);
        for (i, &port) in ports.iter().enumerate() {
            let (name, to) = if port == changed {
                (name.to_string(), to)
            } else {
                (format!("m{i}"), target.addr())
            };
            toml += &map_section(port, to, &name, "");
        }
        toml + &map_section(echo_port, echo.addr(), "echo", "")
    };
    let start = Instant::now();
    let mut relay = Relay::start_with(
        &file(&format!("m{}", TEN_K / 2), target.addr()),
        backend,
        Start {
            program: program.clone(),
            ..Start::default()
        },
    );
    let ready = relay.wait_log(|l| l.msg() == "ready", Duration::from_secs(1));
    assert_eq!(
        ready.num("listeners"),
        u64::from(TEN_K) + 1,
        "some of the {TEN_K} ports were taken meanwhile: {ready}"
    );
    eprintln!(
        "{}: {} ready with {} mappings after {:?}",
        program.display(),
        backend.name(),
        TEN_K + 1,
        start.elapsed()
    );
    assert_serves(changed, "ten-k");

    let rtts: Rtts = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut conn = connect(echo_port);
    conn.set_nodelay(true).unwrap();
    let pinger = std::thread::spawn({
        let (rtts, stop, rounds) = (rtts.clone(), stop.clone(), rounds.clone());
        move || {
            let data = [0x5au8; 64];
            let mut back = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let at = Instant::now();
                conn.write_all(&data).expect("write 64 bytes");
                conn.read_exact(&mut back).expect("read 64 bytes back");
                rtts.lock().unwrap().push((at, at.elapsed()));
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let wait_rounds = |n: usize| {
        let from = rounds.load(Ordering::SeqCst);
        let done = poll(Duration::from_secs(30), Duration::from_millis(5), || {
            (rounds.load(Ordering::SeqCst) >= from + n).then_some(())
        });
        assert!(done.is_some(), "the echo round trips stalled");
    };
    wait_rounds(3000);

    let changes: [(&str, String, SocketAddr); 2] = [
        ("a rename", "renamed".to_string(), target.addr()),
        ("a new upstream", "renamed".to_string(), other_target.addr()),
    ];
    let mut quiet_from = Instant::now();
    for (i, (what, name, to)) in changes.iter().enumerate() {
        let toml = file(name, *to);
        // The baseline is the 500 ms before the rewrite: none of it during the last reload.
        let quiet = poll(Duration::from_secs(5), Duration::from_millis(10), || {
            (quiet_from.elapsed() >= Duration::from_millis(600)).then_some(())
        });
        assert!(quiet.is_some());
        let before_end = Instant::now();
        relay.rewrite(&toml);
        let cpu0 = control_thread_cpu(relay.pid());
        let t0 = Instant::now();
        relay.sighup();
        let line = relay.wait_reloaded(2 + i as u64, Duration::from_secs(120));
        let t1 = Instant::now();
        let cpu = control_thread_cpu(relay.pid()) - cpu0;
        quiet_from = t1;
        wait_rounds(3000);
        assert_eq!(line.num("changed_ports"), 1, "{line}");
        let ms = line.get("ms").and_then(|v| v.as_f64()).expect("ms");
        let samples = rtts.lock().unwrap().clone();
        let stats = |from: Instant, to: Instant| {
            let mut d: Vec<Duration> = samples
                .iter()
                .filter(|(at, rtt)| *at + *rtt >= from && *at <= to)
                .map(|(_, rtt)| *rtt)
                .collect();
            d.sort();
            let pick = |q: f64| d.get(((d.len() as f64 - 1.0) * q) as usize).copied();
            (d.len(), pick(0.5), pick(0.99), d.last().copied())
        };
        let baseline_from = before_end - Duration::from_millis(500);
        let (n0, p50_0, p99_0, max0) = stats(baseline_from, before_end);
        let (n1, p50_1, p99_1, max1) = stats(t0, t1);
        eprintln!(
            "RELOAD_10K {} {}: {what}: ms = {ms:.2} (SIGHUP → `reloaded` seen: {:?}; \
             control thread CPU {cpu:?}); \
             echo rtt in the 500 ms before: n={n0} p50={p50_0:?} p99={p99_0:?} max={max0:?}; \
             during: n={n1} p50={p50_1:?} p99={p99_1:?} max={max1:?}",
            program.display(),
            backend.name(),
            t1 - t0
        );
        let reached = if i == 0 { "ten-k" } else { "ten-k-other" };
        assert_serves(changed, reached);
        assert!(
            t1 - t0 < RELOAD_10K_WITHIN,
            "{what}: applied {:?} after the SIGHUP (ms = {ms:.1}), bound {RELOAD_10K_WITHIN:?}",
            t1 - t0
        );
        let p99 = p99_1.expect("echo round trips while the reload was applied");
        assert!(
            p99 < RELOAD_10K_P99,
            "{what}: echo p99 {p99:?} while the reload was applied (n={n1}), bound {RELOAD_10K_P99:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    pinger.join().expect("echo thread");
}
