//! What fault drills and a review of the data path found, each shown with the real binary
//! and real sockets (on both backends where bytes flow):
//!
//! - a zero-byte or blank control file is a failed reload: the running mappings and their
//!   connections stay;
//! - the watch never applies a file its writer has not closed yet;
//! - an event loop that fails or panics takes the process down at once, with a log line;
//! - a connection still in admission (PROXY header not yet sent) is admitted on the mapping
//!   in force when its header arrives: a retarget, a narrower `allow`, a removed port and a
//!   shutdown all apply to it;
//! - connections in admission are capped (`max_pending_admissions`) while direct ports
//!   keep serving; a TLS client that `allow` refuses gets no handshake at all;
//! - a reset first seen by a write resets the other peer; a reset on a half-closed source
//!   ends the connection; both sides carry `TCP_USER_TIMEOUT`;
//! - `pipe_size`/`max_pipes` changed by a reload are logged as taking effect at restart.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::haproxy::PROXY_SOURCE;
use crate::util::log::LogLine;
use crate::util::metrics::Scrape;
use crate::util::net::{
    connect, connect_from, expect_closed, free_ports_in_a_row, listen, read_to_end, roundtrip,
    try_connect_from, Closed, Upstream, LOCALHOST,
};
use crate::util::relay::{data_path_test, map_section, relay_section};
use crate::util::tls::{TestCa, SNI_SUFFIX};
use crate::util::{poll, Backend, Relay};

const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A refusal or reset that must come "at once".
const AT_ONCE: Duration = Duration::from_secs(2);

/// `[relay]` with metrics on `metrics`, 127.0.0.2 as the trusted proxy; `extra` adds lines.
fn head(metrics: u16, extra: &str) -> String {
    relay_section(
        Some(metrics),
        &format!("trusted_proxies = [\"{PROXY_SOURCE}/32\"]\n{extra}"),
    )
}

/// Waits until 127.0.0.1:`port`'s accept queue is empty: every connection made to it so
/// far has been accepted by the relay (`ss` shows the queue length as Recv-Q).
fn wait_accepted(port: u16) {
    let queued = || {
        let out = Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("run ss");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let recv_q: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|q| q.parse().ok())
            .unwrap_or_else(|| panic!("ss: no listener on {port}: {text:?}"));
        (recv_q == 0).then_some(())
    };
    poll(AT_ONCE, Duration::from_millis(10), queued)
        .unwrap_or_else(|| panic!("the relay did not accept on {port} within {AT_ONCE:?}"));
}

/// A PROXY v1 header for a client at `client`:5555 to 127.0.0.1:`port`.
fn proxy_v1(client: Ipv4Addr, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 5555 {port}\r\n").into_bytes()
}

fn is_reload_failed(l: &LogLine) -> bool {
    l.msg().starts_with("reload failed")
}

// ---------------------------------------------------------------------------------------
// The control file

data_path_test!(empty_file_keeps_mappings);
/// A zero-byte file renamed into place, then a blank file written in place and a SIGHUP:
/// both fail ("control file is empty"), are counted, and the live connection and the
/// mapping stay.
fn empty_file_keeps_mappings(backend: Backend) {
    let echo = Upstream::echo();
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let good = head(metrics, "") + &map_section(port, echo.addr(), "one", "");
    let mut relay = Relay::start(&good, backend);
    let mut live = connect(port);
    roundtrip(&mut live, b"before");

    relay.rewrite("");
    relay.wait_logs(is_reload_failed, 1, RELOAD_TIMEOUT);
    relay.rewrite_in_place(" \n\t\n");
    relay.sighup();
    relay.wait_logs(is_reload_failed, 2, RELOAD_TIMEOUT);
    let errors: Vec<String> = relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == "control file error")
        .map(|l| l.text("error").to_string())
        .collect();
    assert!(
        errors.len() >= 2
            && errors
                .iter()
                .all(|e| e.ends_with(":1:1: control file is empty")),
        "{errors:?}"
    );
    roundtrip(&mut live, b"the live connection stays");
    let mut fresh = connect(port);
    roundtrip(&mut fresh, b"the mapping stays");
    assert_eq!(
        Scrape::take(metrics).get("portrelay_reloads_total", &[("result", "failure")]),
        Some(2.0)
    );
    assert_eq!(
        Scrape::take(metrics).get("portrelay_mappings", &[]),
        Some(1.0)
    );
    assert_eq!(relay.generation(), 1);
}

data_path_test!(watch_waits_for_the_writer);
/// An agent removes the file and writes a new one in place, slowly: a valid-looking prefix
/// (mapping one only) sits in the file, still open, for longer than the watch's settle
/// time. It is not applied (the connection on mapping two is not cut); the whole file is,
/// once its writer closes it.
fn watch_waits_for_the_writer(backend: Backend) {
    let (one, two) = (Upstream::echo(), Upstream::echo());
    let base = free_ports_in_a_row(3);
    let (p1, p2, metrics) = (base, base + 1, base + 2);
    let h = head(metrics, "");
    let m1 = map_section(p1, one.addr(), "one", "");
    let m2 = map_section(p2, two.addr(), "two", "");
    let relay = Relay::start(&(h.clone() + &m1 + &m2), backend);
    let mut live = connect(p2);
    roundtrip(&mut live, b"before");

    let path = relay.config_path().to_path_buf();
    std::fs::remove_file(&path).expect("remove the control file");
    let mut file = std::fs::File::create(&path).expect("create the control file");
    file.write_all((h.clone() + &m1).as_bytes()).expect("write");
    file.flush().expect("flush");
    // The agent is slow: six times the watch's settle time with the prefix in the file.
    std::thread::sleep(Duration::from_millis(300));
    roundtrip(&mut live, b"the prefix was not applied");
    file.write_all(m2.as_bytes()).expect("write the rest");
    drop(file);
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 2, "{line}");
    assert_eq!(line.num("changed_ports"), 0, "{line}");
    roundtrip(&mut live, b"after the whole file");
    assert!(
        !relay
            .log_lines()
            .iter()
            .any(|l| l.msg() == "connection closed"),
        "a connection was closed"
    );
}

// ---------------------------------------------------------------------------------------
// A loop that dies

/// A relay whose loops fail (`fault`: `panic` or `error`, injected by the debug build once
/// a loop holds a connection) exits at once with status 70 and says why.
fn loop_failure_exits(backend: Backend, fault: &str) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, "") + &map_section(port, echo.addr(), "one", "");
    let mut relay = Relay::start_with_env(&toml, backend, &[("PORTRELAY_TEST_FAULT", fault)]);
    let _conn = connect(port);
    let started = Instant::now();
    let status = relay.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(70), "exit status after the loop failed");
    let line = relay.wait_log(
        |l| l.msg().starts_with("an event loop failed"),
        Duration::from_secs(1),
    );
    assert!(line.text("error").contains("injected fault"), "{line}");
    eprintln!("exited {:?} after the connect", started.elapsed());
}

data_path_test!(loop_panic_exits);
fn loop_panic_exits(backend: Backend) {
    loop_failure_exits(backend, "panic");
}

data_path_test!(loop_error_exits);
fn loop_error_exits(backend: Backend) {
    loop_failure_exits(backend, "error");
}

// ---------------------------------------------------------------------------------------
// Admission against reloads and shutdown

/// A relay where port `port` maps to `one` (which replies "one"), and a connection from
/// the trusted proxy that the relay has accepted but whose PROXY header is not sent yet.
struct PendingSetup {
    relay: Relay,
    pending: TcpStream,
    port: u16,
    metrics: u16,
    one: Upstream,
}

fn pending_setup(backend: Backend, relay_extra: &str, map_extra: &str) -> PendingSetup {
    let one = Upstream::reply(b"one\n".to_vec());
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let toml = head(
        metrics,
        &format!("proxy_header_timeout = \"20s\"\n{relay_extra}"),
    ) + &map_section(port, one.addr(), "one", map_extra);
    let relay = Relay::start(&toml, backend);
    let pending = connect_from(PROXY_SOURCE, port);
    wait_accepted(port);
    PendingSetup {
        relay,
        pending,
        port,
        metrics,
        one,
    }
}

data_path_test!(pending_takes_retarget);
/// The port is retargeted to `two` while the header is pending: the connection reaches
/// `two`, and `one` never sees it.
fn pending_takes_retarget(backend: Backend) {
    let mut s = pending_setup(backend, "", "");
    let two = Upstream::reply(b"two\n".to_vec());
    let toml = head(s.metrics, "proxy_header_timeout = \"20s\"\n")
        + &map_section(s.port, two.addr(), "two", "");
    s.relay.rewrite(&toml);
    s.relay.wait_reloaded(2, RELOAD_TIMEOUT);
    s.pending
        .write_all(&proxy_v1(Ipv4Addr::new(127, 0, 0, 3), s.port))
        .unwrap();
    s.pending.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut s.pending), b"two\n");
    assert_eq!(s.one.accepted(), 0, "the old upstream was reached");
}

data_path_test!(pending_takes_narrower_allow);
/// `allow` narrows to 127.0.0.9 while the header (naming 127.0.0.3) is pending: refused
/// with `acl` at once, and nothing reaches the upstream.
fn pending_takes_narrower_allow(backend: Backend) {
    let mut s = pending_setup(backend, "", "");
    let toml = head(s.metrics, "proxy_header_timeout = \"20s\"\n")
        + &map_section(s.port, s.one.addr(), "one", "allow = [\"127.0.0.9/32\"]");
    s.relay.rewrite(&toml);
    s.relay.wait_reloaded(2, RELOAD_TIMEOUT);
    let client = Ipv4Addr::new(127, 0, 0, 3);
    s.pending.write_all(&proxy_v1(client, s.port)).unwrap();
    let (closed, took) = expect_closed(&mut s.pending, AT_ONCE);
    assert_eq!(closed, Closed::Reset, "after {took:?}");
    let line = s.relay.wait_log(|l| l.is_rejected_on(s.port), AT_ONCE);
    assert_eq!(line.reason(), "acl", "{line}");
    assert!(line.text("client").starts_with("127.0.0.3:"), "{line}");
    assert_eq!(
        s.one.accepted(),
        0,
        "a refused connection reached the upstream"
    );
}

data_path_test!(pending_of_removed_port_closed);
/// The port is removed (`removed_mapping = "close"`) while the header is pending: the
/// pending connection is reset with the reload, not admitted later.
fn pending_of_removed_port_closed(backend: Backend) {
    let mut s = pending_setup(backend, "", "");
    let other = free_ports_in_a_row(1);
    let toml = head(s.metrics, "proxy_header_timeout = \"20s\"\n")
        + &map_section(other, s.one.addr(), "elsewhere", "");
    s.relay.rewrite(&toml);
    s.relay.wait_reloaded(2, RELOAD_TIMEOUT);
    let (closed, took) = expect_closed(&mut s.pending, AT_ONCE);
    assert_eq!(closed, Closed::Reset, "after {took:?}");
    let line = s.relay.wait_log(|l| l.is_rejected_on(s.port), AT_ONCE);
    assert_eq!(line.reason(), "no_route", "{line}");
    assert_eq!(s.one.accepted(), 0);
}

data_path_test!(pending_refused_at_shutdown);
/// SIGTERM while the header is pending (with a long grace): the pending connection is
/// refused at once (`shutdown`), before its header comes, and opens no upstream
/// connection; the relay exits 0.
fn pending_refused_at_shutdown(backend: Backend) {
    let mut s = pending_setup(backend, "shutdown_grace = \"30s\"\n", "");
    s.relay.sigterm();
    let (closed, took) = expect_closed(&mut s.pending, AT_ONCE);
    assert_eq!(closed, Closed::Reset, "after {took:?}");
    let status = s.relay.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    let line = s.relay.wait_log(|l| l.is_rejected_on(s.port), AT_ONCE);
    assert_eq!(line.reason(), "shutdown", "{line}");
    assert_eq!(
        s.one.accepted(),
        0,
        "a pending connection reached the upstream"
    );
}

fn tls_toml(map_port: u16, to: SocketAddr, tls_port: u16, ca: &TestCa) -> String {
    relay_section(None, "")
        + &map_section(map_port, to, "C.1", "")
        + &format!(
            "[[tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\nsni_suffix = \"{SNI_SUFFIX}\"\n",
            ca.chain.display(),
            ca.key.display()
        )
}

/// A TCP relay of the test's own between a TLS client and the relay's TLS port: it passes
/// on everything, except that once the relay has answered the ClientHello it holds the
/// client's next bytes (its Finished) until `release` says so. Returns its port, and a
/// receiver told once the relay has answered the ClientHello.
fn hold_after_hello(to: u16, release: mpsc::Receiver<()>) -> (u16, mpsc::Receiver<()>) {
    let (told_tx, told_rx) = mpsc::channel();
    let listener = listen((LOCALHOST, 0).into()).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut relay = connect(to);
        let (answered_tx, answered_rx) = mpsc::channel();
        let (mut from_relay, mut to_client) =
            (relay.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from_relay.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = answered_tx.send(());
                let _ = told_tx.send(());
                if to_client.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to_client.shutdown(Shutdown::Write);
        });
        let mut buf = [0u8; 16 * 1024];
        let mut held = false;
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            if !held && answered_rx.try_recv().is_ok() {
                held = true;
                let _ = release.recv_timeout(Duration::from_secs(20));
            }
            if relay.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = relay.shutdown(Shutdown::Write);
    });
    (port, told_rx)
}

data_path_test!(pending_tls_takes_retarget);
/// A TLS client (`openssl s_client`) whose handshake is held half way (the relay has
/// answered its ClientHello, its Finished is held back) while the mapping its SNI names is
/// retargeted to `two`: once the handshake completes it reaches `two`, not `one`.
fn pending_tls_takes_retarget(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (one, two) = (
        Upstream::reply(b"one\n".to_vec()),
        Upstream::reply(b"two\n".to_vec()),
    );
    let base = free_ports_in_a_row(2);
    let (map_port, tls_port) = (base, base + 1);
    let relay = Relay::start(&tls_toml(map_port, one.addr(), tls_port, &ca), backend);
    let (release_tx, release_rx) = mpsc::channel();
    let (hold_port, answered) = hold_after_hello(tls_port, release_rx);
    let sni = format!("C-1.{SNI_SUFFIX}");
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{hold_port}"),
        ])
        .args(["-servername", &sni, "-verify_return_error", "-CAfile"])
        .arg(&ca.ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start openssl s_client");
    let mut out = client.stdout.take().unwrap();
    let (got_tx, got_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got = [0u8; 4];
        let _ = got_tx.send(out.read_exact(&mut got).map(|_| got.to_vec()));
    });
    // The relay has routed the ClientHello (to `one`) and waits for the client's Finished.
    answered
        .recv_timeout(Duration::from_secs(10))
        .expect("the relay answered the ClientHello");
    relay.rewrite(&tls_toml(map_port, two.addr(), tls_port, &ca));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    release_tx.send(()).unwrap();
    let got = got_rx.recv_timeout(Duration::from_secs(10));
    let _ = client.kill();
    let _ = client.wait();
    let got = got
        .expect("s_client printed nothing")
        .expect("s_client output");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "two\n",
        "reached through the TLS entry"
    );
    assert_eq!(one.accepted(), 0, "the old upstream was reached");
}

// ---------------------------------------------------------------------------------------
// Admission costs

data_path_test!(pending_admissions_capped);
/// `max_pending_admissions = 4`: four silent connections from the trusted proxy are held;
/// the fifth is refused at once (`limit`); a direct client is served meanwhile, and the
/// held ones still get through once their headers arrive.
fn pending_admissions_capped(backend: Backend) {
    let s = pending_setup(backend, "max_pending_admissions = 4\n", "");
    let mut held = vec![s.pending];
    for _ in 0..3 {
        held.push(connect_from(PROXY_SOURCE, s.port));
    }
    wait_accepted(s.port);
    // A reset may come before connect() returns: that counts too.
    let (closed, took) =
        crate::util::net::connect_expect_closed(PROXY_SOURCE, s.port, b"", AT_ONCE);
    assert_eq!(closed, Closed::Reset, "the fifth, after {took:?}");
    let line = s.relay.wait_log(|l| l.is_rejected_on(s.port), AT_ONCE);
    assert_eq!(line.reason(), "limit", "{line}");

    let mut direct = connect(s.port);
    direct.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut direct), b"one\n", "a direct client");
    for conn in &mut held {
        conn.write_all(&proxy_v1(Ipv4Addr::new(127, 0, 0, 3), s.port))
            .unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(conn), b"one\n", "a held connection");
    }
    assert_eq!(
        Scrape::take(s.metrics).get(
            "portrelay_connections_rejected_total",
            &[("port", &s.port.to_string()), ("reason", "limit")]
        ),
        Some(1.0)
    );
}

/// The ClientHello of a rustls client for `sni`, as bytes.
fn client_hello(sni: &str) -> Vec<u8> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    let _ = roots.add(rustls::pki_types::CertificateDer::from(Vec::new()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

data_path_test!(tls_allow_before_handshake);
/// A TLS client whose mapping does not `allow` it gets an `access_denied` alert in answer
/// to its ClientHello, and no handshake message (no ServerHello, no certificate); the
/// rejection is `acl`.
fn tls_allow_before_handshake(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let echo = Upstream::echo();
    let base = free_ports_in_a_row(2);
    let (port, tls_port) = (base, base + 1);
    let toml = relay_section(None, "")
        + &map_section(port, echo.addr(), "C.1", "allow = [\"127.0.0.9/32\"]")
        + &format!(
            "[[tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\nsni_suffix = \"{SNI_SUFFIX}\"\n",
            ca.chain.display(),
            ca.key.display()
        );
    let relay = Relay::start(&toml, backend);
    let mut conn = connect(tls_port);
    conn.write_all(&client_hello(&format!("C-1.{SNI_SUFFIX}")))
        .unwrap();
    conn.set_read_timeout(Some(AT_ONCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read after the ClientHello: {e} (got {got:?})"),
        }
    }
    assert_eq!(
        got,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31],
        "expected only an access_denied alert"
    );
    let line = relay.wait_log(|l| l.is_rejected_on(tls_port), AT_ONCE);
    assert_eq!(line.reason(), "acl", "{line}");
    assert_eq!(echo.accepted(), 0);
}

// ---------------------------------------------------------------------------------------
// Resets and dead peers

data_path_test!(reset_seen_by_a_write_resets_the_client);
/// The client streams; the upstream reads a little, then resets. The relay sees the reset
/// first on a write (its send to the upstream fails), and must pass it on as a reset (the
/// read that follows returns 0, which is no end of stream): five times in a row.
fn reset_seen_by_a_write_resets_the_client(backend: Backend) {
    let upstream = Upstream::serve(listen((LOCALHOST, 0).into()).unwrap(), |mut conn, _| {
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < 256 * 1024 {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            read += n;
        }
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
        Ok(())
    });
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, "") + &map_section(port, upstream.addr(), "one", "");
    let relay = Relay::start(&toml, backend);
    for round in 0..5 {
        let ended = stream_until_it_ends(connect(port));
        assert_eq!(
            ended, "reset",
            "round {round}: the client must be reset, never sent a FIN"
        );
        let line = relay.wait_logs(|l| l.is_closed_on(port), round + 1, Duration::from_secs(5));
        assert_eq!(line[round].reason(), "reset", "{}", line[round]);
    }
}

/// Writes to `conn` (bounded: 64 MiB, 10 s) and reads what comes back, on one thread so
/// that no read or write consumes the socket error unseen: `"reset"` when the first thing
/// the connection tells is a reset (ECONNRESET), `"eof"` for a FIN, else what happened.
fn stream_until_it_ends(mut conn: TcpStream) -> String {
    conn.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut wrote = 0usize;
    while Instant::now() < deadline && wrote < 64 << 20 {
        match conn.read(&mut buf) {
            Ok(0) => return "eof".into(),
            Ok(n) => return format!("{n} unexpected bytes"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return "reset".into(),
            Err(e) => return format!("read: {e}"),
        }
        match conn.write(&chunk) {
            Ok(n) => wrote += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&conn),
                    events: libc::POLLIN | libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the call; the fd is open (owned by `conn`).
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return "reset".into(),
            // EPIPE: the relay sent a FIN first, then a reset.
            Err(e) => return format!("write: {e}"),
        }
    }
    format!("still open after writing {wrote} bytes")
}

data_path_test!(reset_on_a_half_closed_source_ends_the_connection);
/// The client sends its FIN (passed on), then resets; the upstream stays silent and open.
/// The relay notices the reset on the half-closed client at once, with no `idle_timeout`
/// to help: the connection ends (logged `reset`) and its place in the caps is free (with
/// `max_connections = 1`, a new connection is served).
fn reset_on_a_half_closed_source_ends_the_connection(backend: Backend) {
    let (eof_tx, eof_rx) = mpsc::channel();
    let eof_tx = std::sync::Mutex::new(eof_tx);
    let upstream = Upstream::serve(
        listen((LOCALHOST, 0).into()).unwrap(),
        move |mut conn, stats| {
            let mut buf = [0u8; 64];
            let first = conn.read(&mut buf)?;
            if first > 0 {
                // A later connection: echo it.
                conn.write_all(&buf[..first])?;
                return crate::util::net::echo_until_eof(&mut conn, stats);
            }
            let _ = eof_tx.lock().unwrap().send(());
            // Silent and open (bounded) past the FIN.
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        },
    );
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, "max_connections = 1\n")
        + &map_section(port, upstream.addr(), "one", "");
    let relay = Relay::start(&toml, backend);
    let conn = connect(port);
    conn.shutdown(Shutdown::Write).unwrap();
    eof_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream gets the client's FIN");
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn);
    let line = relay.wait_log(|l| l.is_closed_on(port), AT_ONCE);
    assert_eq!(line.reason(), "reset", "{line}");
    let mut next = connect(port);
    roundtrip(&mut next, b"the place in max_connections is free");
}

/// A duplicate of the relay's fd `fd` (pidfd_getfd), to read its socket options.
fn relay_socket(pid: u32, fd: i32) -> std::io::Result<socket2::Socket> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls on integers; a returned fd is new and ours alone.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        let err = std::io::Error::last_os_error();
        libc::close(pidfd);
        if dup < 0 {
            return Err(err);
        }
        Ok(socket2::Socket::from_raw_fd(dup))
    }
}

data_path_test!(user_timeout_on_both_sides);
/// With `tcp_keepalive = "7s"` (probes every 7 s, 6 of them), both sockets of a relayed
/// connection have `TCP_USER_TIMEOUT` = 7 + 7 × 6 = 49 s and keepalive 7 s.
fn user_timeout_on_both_sides(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, "tcp_keepalive = \"7s\"\n")
        + &map_section(port, echo.addr(), "one", "");
    let relay = Relay::start(&toml, backend);
    let mut conn = connect(port);
    roundtrip(&mut conn, b"up");
    let client_end: SocketAddr = conn.local_addr().unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{}/fd", relay.pid())).unwrap() {
        let fd: i32 = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .parse()
            .unwrap();
        let Ok(socket) = relay_socket(relay.pid(), fd) else {
            continue;
        };
        let Some(peer) = socket.peer_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        let which = if peer == client_end {
            "client"
        } else if peer == echo.addr() {
            "upstream"
        } else {
            continue;
        };
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(49)),
            "{which} side"
        );
        assert_eq!(
            socket.keepalive_time().unwrap(),
            Duration::from_secs(7),
            "{which} side"
        );
        assert_eq!(socket.keepalive_retries().unwrap(), 6, "{which} side");
        seen.push(which);
    }
    seen.sort();
    assert_eq!(
        seen,
        ["client", "upstream"],
        "the relayed connection's two sockets"
    );
}

// ---------------------------------------------------------------------------------------
// Settings that change only at restart

#[test]
fn pipe_settings_at_reload_are_logged() {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let map = map_section(port, echo.addr(), "one", "");
    let relay = Relay::start(&(relay_section(None, "") + &map), Backend::Epoll);
    relay.rewrite(&(relay_section(None, "pipe_size = 65536\nmax_pipes = 8\n") + &map));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    let line = relay.wait_log(
        |l| {
            l.msg()
                .starts_with("pipe_size and max_pipes take effect at the next restart")
        },
        Duration::from_secs(1),
    );
    assert_eq!(line.u64("pipe_size"), Some(65536), "{line}");
    assert_eq!(line.u64("running_pipe_size"), Some(1 << 20), "{line}");
    let _ = try_connect_from(LOCALHOST, port).expect("still serving");
}
