//! Live upgrade: `portrelay upgrade` (and SIGUSR2) replaces the relay's process and no
//! session notices. Real scp and `ssh … cat` to a real sshd, raw TCP, a raw WebSocket
//! client, SSH over the TLS entry through `openssl s_client`; each test looks at what the
//! clients, sshd, `ss`, the log and the metrics see across the upgrade.
//!
//! - `scp_256mib_across_three_upgrades`: one scp, three upgrades (the second to a copy with
//!   another build tag): the file intact, the same 4-tuples, one sshd session, the new
//!   binary in `/proc/PID/exe`, the byte counters continuous and exact.
//! - `interactive_echo_across_an_upgrade`: a byte every 10 ms through `ssh … cat`, all back
//!   in order (the longest gap is printed, not asserted).
//! - `half_closed_at_the_upgrade`: the upload done and its end passed on, the download
//!   still running: all of it arrives after the upgrade.
//! - `held_connection_across_an_upgrade`: a connection held for a booting instance gets
//!   through once the instance starts after the upgrade.
//! - `websocket_across_an_upgrade`: a `ws://` session, with a frame cut in two by the
//!   upgrade.
//! - `tls_connection_stays_with_the_old_process`: the TLS-entry session stays in the old
//!   process, which exits 0 when it ends; new connections go to the new process.
//! - `many_connections_idle_across_an_upgrade`: 2,000 idle connections, each still echoes.
//! - `rollback_when_the_new_process_fails`, `rollback_on_an_incompatible_state_version`:
//!   the old process serves on, a transfer across the attempt completes, counted.
//! - `upgrade_across_backends`: io_uring to epoll and back, every connection kept.
//! - `sigusr2_upgrades`: SIGUSR2 does the same upgrade.
//! - `counters_continue_across_upgrades`: every counter of the old process goes on in the
//!   new one, exactly; gauges are recounted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::util::files::{random_bytes, random_file, sha256};
use crate::util::log::LogLine;
use crate::util::metrics::{wait_metric, Scrape};
use crate::util::net::{
    connect, connect_expect_closed, free_ports_in_a_row, read_some, roundtrip, Upstream, LOCALHOST,
};
use crate::util::process::{self, KillOnDrop};
use crate::util::relay::{data_path_test, map_section, relay_section, BIN};
use crate::util::tls::{TestCa, SNI_SUFFIX};
use crate::util::upgrade::{
    admin_line, admin_socket_dir, build_tag, established_to, runs, sessions, socket_owners,
    sshd_logins, try_scrape, version_of, Binaries, CatSession, EchoStream, Upgraded,
};
use crate::util::{poll, Backend, Relay, Sshd};

/// The mapping of every test (the TLS and WebSocket names of `C.123` are `C-123`).
const MAP: &str = "C.123";
const LOG_TIMEOUT: Duration = Duration::from_secs(20);
const UPGRADES: &str = "portrelay_upgrades_total";
const BYTES: &str = "portrelay_bytes_total";
const ACTIVE: &str = "portrelay_connections_active";
const HELD: &str = "portrelay_connections_held";
const ACCEPTED: &str = "portrelay_connections_accepted_total";

/// A relay with metrics on `metrics`, an admin socket (which `portrelay upgrade` needs)
/// and `sections` after its `[relay]`.
struct Lab {
    relay: Relay,
    metrics: u16,
    _admin: TempDir,
}

impl Lab {
    fn start(backend: Backend, metrics: u16, sections: &str) -> Lab {
        let admin = admin_socket_dir();
        let toml =
            relay_section(Some(metrics), &admin_line(&admin.path().join("admin.sock"))) + sections;
        Lab {
            relay: Relay::start(&toml, backend),
            metrics,
            _admin: admin,
        }
    }

    fn scrape(&self) -> Scrape {
        Scrape::take(self.metrics)
    }

    /// `portrelay upgrade [--binary BINARY]`, which must succeed.
    fn upgrade(&mut self, binary: Option<&Path>) -> Upgraded {
        let what = binary.map_or("the default binary".into(), |b| b.display().to_string());
        self.relay
            .upgrade(binary)
            .unwrap_or_else(|e| panic!("upgrade to {what}: {e}"))
    }

    /// Waits until `portrelay_upgrades_total{result}` reads `want`.
    fn wait_upgrades(&self, result: &str, want: f64) {
        wait_metric(self.metrics, UPGRADES, &[("result", result)], want);
    }
}

/// `portrelay_bytes_total` of [`MAP`]: (client to upstream, upstream to client).
fn map_bytes(s: &Scrape) -> (u64, u64) {
    let get = |direction| {
        s.find(BYTES, &[("map", MAP), ("direction", direction)])
            .unwrap_or_else(|| panic!("no {BYTES} of {MAP} {direction}:\n{}", s.text))
            as u64
    };
    (get("client_to_upstream"), get("upstream_to_client"))
}

/// The one series of `name` whose labels include `labels` (say a mapping's, whatever its
/// port label); panics with the exposition when there is none.
fn series(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.find(name, labels)
        .unwrap_or_else(|| panic!("no series {name}{labels:?}:\n{}", s.text))
}

/// Waits until the relay shows no active connection of [`MAP`]; the scrape then.
fn settled(metrics: u16) -> Scrape {
    wait_metric(metrics, ACTIVE, &[("map", MAP)], 0.0)
}

/// `sha256sum FILE`: the hex digest (native speed, unlike sha2 in a test build).
fn sha256sum(path: &Path) -> String {
    let out = process::run(
        Command::new("sha256sum").arg(path),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "sha256sum: {}", out.stderr);
    out.stdout
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// The `connection closed` line of the connection with `id`.
fn closed_line(relay: &Relay, id: u64) -> LogLine {
    relay.wait_log(
        |l| l.msg() == "connection closed" && l.u64("id") == Some(id),
        LOG_TIMEOUT,
    )
}

/// The id `portrelay sessions` gives the one live connection whose client is `client`.
fn session_id(relay: &Relay, client: SocketAddr) -> u64 {
    let all = sessions(relay);
    let found: Vec<&serde_json::Value> = all
        .iter()
        .filter(|s| s["client"].as_str() == Some(&client.to_string()))
        .collect();
    assert_eq!(found.len(), 1, "sessions of client {client}: {all:?}");
    found[0]["id"].as_u64().expect("an id")
}

/// The `adopted` line's `version` is what `binary --version` prints after `portrelay `,
/// and that names build tag `tag`.
fn assert_version(upgraded: &Upgraded, binary: &Path, tag: &str) {
    let field = upgraded.adopted.text("version");
    let version = version_of(binary);
    assert_eq!(
        version.strip_prefix("portrelay "),
        Some(field),
        "`adopted` says version {field:?}; {} --version says {version:?}",
        binary.display()
    );
    assert_eq!(build_tag(binary), tag, "{}", binary.display());
}

/// Scrapes the relay's metrics every 25 ms on a thread until stopped, keeping the byte
/// counters of [`MAP`] and the scrapes that failed.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Scraped>,
}

/// What a [`Scraper`] saw: the byte counters of each scrape, and the scrapes that failed.
type Scraped = (Vec<(u64, u64)>, Vec<String>);

impl Scraper {
    fn start(metrics: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut failures) = (Vec::new(), Vec::new());
            // Bounded: 20,000 scrapes (8 minutes).
            for _ in 0..20_000 {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                match try_scrape(metrics) {
                    Ok(s) => samples.push(map_bytes(&s)),
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (samples, failures)
        });
        Scraper { stop, thread }
    }

    /// Stops; asserts that neither counter ever went down from one scrape to the next.
    /// Returns how many scrapes there were.
    fn check_monotonic(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, failures) = self.thread.join().expect("scraper thread");
        for pair in samples.windows(2) {
            assert!(
                pair[1].0 >= pair[0].0 && pair[1].1 >= pair[0].1,
                "{BYTES} of {MAP} went down between two scrapes: {:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
        if !failures.is_empty() {
            println!(
                "{} of {} scrapes failed across the upgrades: {failures:?}",
                failures.len(),
                samples.len() + failures.len()
            );
        }
        samples.len()
    }
}

// ---------------------------------------------------------------------------------------
// scp across three upgrades.

/// The scp test's file.
const SCP_SIZE: usize = 256 << 20;

/// scp's `-l` (Kbit/s): the upload lasts about 8 s (unlimited it takes about 2 s here), so
/// that the three upgrades fall inside it.
const SCP_LIMIT: &str = "268000";

data_path_test!(scp_256mib_across_three_upgrades);
/// An scp upload through the relay while it is upgraded three times (to the same binary,
/// to a copy with build tag `next`, and back to the test build): scp exits 0 with the file
/// intact; the client's 4-tuple and the relay's to sshd never change, and sshd saw one
/// session; each new process runs the binary it was given and logs its version; the
/// connection keeps its id; `portrelay_bytes_total` never goes down between scrapes and
/// ends equal to the close line's counts (over the connection's whole life).
fn scp_256mib_across_three_upgrades(backend: Backend) {
    let size = SCP_SIZE;
    let sshd = Sshd::start();
    let binaries = Binaries::new();
    let next = binaries.tagged("next");
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let mut lab = Lab::start(backend, metrics, &map_section(port, sshd.addr(), MAP, ""));
    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("source.bin");
    random_file(&source, size);
    let remote = sshd.dir().join("upgraded.bin");
    let mut scp = KillOnDrop::spawn(
        sshd.scp(port)
            .args(["-l", SCP_LIMIT])
            .arg(&source)
            .arg(Sshd::remote(&remote)),
        "[scp]",
    );

    // scp's connection to the relay, and the relay's to sshd, as `ss` shows them.
    let entry = SocketAddr::from((LOCALHOST, port));
    let one = |to: SocketAddr| {
        poll(Duration::from_secs(30), Duration::from_millis(20), || {
            let all = established_to(to);
            (all.len() == 1).then(|| all[0])
        })
        .unwrap_or_else(|| panic!("not one connection to {to}: {:?}", established_to(to)))
    };
    let client = one(entry);
    let upstream = one(sshd.addr());
    let id = session_id(&lab.relay, client.0);
    let scraper = Scraper::start(metrics);

    let test_build = Path::new(BIN);
    let dev = build_tag(test_build);
    let plan: [(&str, Option<&Path>, &str); 3] = [
        ("the default binary", None, &dev),
        ("a copy with build tag next", Some(&next), "next"),
        ("the test build", Some(test_build), &dev),
    ];
    for (i, (what, binary, tag)) in plan.into_iter().enumerate() {
        // Upgrade at 1/4, 2/4 and 3/4 of the upload, as far as sshd has written the file.
        let at = (i as u64 + 1) * size as u64 / 4;
        let reached = poll(Duration::from_secs(120), Duration::from_millis(20), || {
            if let Some(status) = scp.exited() {
                panic!(
                    "scp exited ({status}) before upgrade {}: {}",
                    i + 1,
                    scp.stderr()
                );
            }
            let written = std::fs::metadata(&remote).map_or(0, |m| m.len());
            (written >= at).then_some(())
        });
        assert!(reached.is_some(), "the upload never reached {at} bytes");
        let up = lab.upgrade(binary);
        println!(
            "upgrade {} on {} to {what}: {} ms, pid {} -> {}",
            i + 1,
            backend.name(),
            up.ms,
            up.old_pid,
            up.pid
        );
        assert_eq!((up.moved, up.stayed), (1, 0), "upgrade {}", i + 1);
        assert!(
            scp.exited().is_none(),
            "scp ended before upgrade {} was over: the transfer must run across it",
            i + 1
        );
        assert_version(&up, &runs(binary.unwrap_or(test_build)), tag);
        assert_eq!(established_to(entry), [client], "scp's 4-tuple");
        assert_eq!(
            established_to(sshd.addr()),
            [upstream],
            "the relay's 4-tuple"
        );
        assert_eq!(
            socket_owners(client.1, client.0),
            [up.pid],
            "who holds the relay's end of scp's connection"
        );
        assert_eq!(session_id(&lab.relay, client.0), id, "the connection's id");
    }

    let status = process::wait_deadline(&mut scp.child, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("scp still running after 300 s: {}", scp.stderr()));
    assert!(status.success(), "scp: {status}: {}", scp.stderr());
    assert_eq!(sha256sum(&remote), sha256sum(&source), "the file after scp");
    assert_eq!(sshd_logins(&sshd), 1, "sshd sessions:\n{}", sshd.log());

    let closed = closed_line(&lab.relay, id);
    closed.assert_closed_fields(port, MAP, sshd.addr());
    assert!(
        ["client_eof", "upstream_eof"].contains(&closed.reason()),
        "{closed}"
    );
    let scrapes = scraper.check_monotonic();
    assert!(scrapes > 10, "only {scrapes} scrapes");
    let s = settled(metrics);
    let (up, down) = map_bytes(&s);
    assert!(up >= size as u64, "{BYTES} up: {up}");
    assert_eq!(
        (up, down),
        (
            closed.num("bytes_client_to_upstream"),
            closed.num("bytes_upstream_to_client")
        ),
        "{BYTES} of {MAP} vs the close line {closed}"
    );
    assert_eq!(s.value(UPGRADES, &[("result", "success")]), 3.0);
    assert_eq!(
        series(&s, ACCEPTED, &[("map", MAP), ("via", "direct")]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// An interactive session.

data_path_test!(interactive_echo_across_an_upgrade);
/// `ssh … cat` through the relay, one byte every 10 ms for 6 s, upgraded after the first
/// second: every byte comes back, in order, over the one session. Prints the longest gap
/// between two echoed bytes and the longest round trip (no timed assertion).
fn interactive_echo_across_an_upgrade(backend: Backend) {
    const BYTES_SENT: usize = 600;
    const PERIOD: Duration = Duration::from_millis(10);
    let sshd = Sshd::start();
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let mut lab = Lab::start(backend, metrics, &map_section(port, sshd.addr(), MAP, ""));
    let mut cat = CatSession::start(sshd.ssh(port).arg("cat"));
    let mut stdin = cat.take_stdin();
    let typist = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = Vec::with_capacity(BYTES_SENT);
        for i in 0..BYTES_SENT {
            // Pacing, not waiting for readiness: a keystroke every 10 ms.
            let due = start + PERIOD * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            stdin.write_all(&[i as u8]).expect("type into ssh");
            stdin.flush().expect("flush into ssh");
            sent.push(Instant::now());
        }
        (stdin, sent)
    });
    let mut echoed = cat.read(100, Duration::from_secs(30));
    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (1, 0));
    assert!(
        !typist.is_finished(),
        "the upgrade ({} ms) outlasted the typing: it must come while bytes flow",
        up.ms
    );
    echoed.extend(cat.read(BYTES_SENT - 100, Duration::from_secs(60)));
    let (stdin, sent) = typist.join().expect("typist thread");
    let bytes: Vec<u8> = echoed.iter().map(|(_, b)| *b).collect();
    let want: Vec<u8> = (0..BYTES_SENT).map(|i| i as u8).collect();
    assert!(bytes == want, "the echo differs: {bytes:?}");
    let gap = echoed
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    let latency = echoed
        .iter()
        .zip(&sent)
        .map(|((at, _), sent)| at.saturating_duration_since(*sent))
        .max()
        .unwrap_or_default();
    println!(
        "interactive echo on {}: longest gap {gap:?} between echoed bytes, longest round \
         trip {latency:?}; the upgrade took {} ms",
        backend.name(),
        up.ms
    );
    drop(stdin);
    cat.end();
    assert_eq!(sshd_logins(&sshd), 1, "sshd sessions:\n{}", sshd.log());
}

// ---------------------------------------------------------------------------------------
// Half-closed.

data_path_test!(half_closed_at_the_upgrade);
/// The client has sent 1 MiB and its end of stream; the upstream has it all and answers
/// with its digest and 64 MiB, of which the client has read 1 MiB when the relay is
/// upgraded: the rest arrives, then the end, and the close line counts every byte.
fn half_closed_at_the_upgrade(backend: Backend) {
    const UPLOAD: usize = 1 << 20;
    const DOWNLOAD: usize = 64 << 20;
    const READ_BEFORE: usize = 1 << 20;
    let upload = random_bytes(UPLOAD);
    let payload = random_bytes(DOWNLOAD);
    let upstream = Upstream::digest_then(payload.clone());
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let mut lab = Lab::start(
        backend,
        metrics,
        &map_section(port, upstream.addr(), MAP, ""),
    );
    let mut conn = connect(port);
    conn.write_all(&upload).expect("upload");
    conn.shutdown(Shutdown::Write).expect("half-close");
    // The digest proves the upstream read the upload and its end.
    let mut head = vec![0u8; 32 + READ_BEFORE];
    conn.read_exact(&mut head)
        .expect("the digest and the first MiB");
    assert_eq!(
        head[..32],
        sha256(&upload),
        "the upstream's digest of the upload"
    );
    assert_eq!(upstream.bytes_in(), UPLOAD as u64);
    let id = session_id(&lab.relay, conn.local_addr().unwrap());

    // The client reads no more: the rest of the download waits in the relay's pipes and
    // the sockets' buffers, and the upstream's writes block.
    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (1, 0));

    let mut rest = Vec::with_capacity(DOWNLOAD);
    conn.read_to_end(&mut rest)
        .expect("the rest of the download");
    assert_eq!(
        rest.len(),
        DOWNLOAD - READ_BEFORE,
        "bytes after the upgrade"
    );
    assert!(
        head[32..] == payload[..READ_BEFORE] && rest[..] == payload[READ_BEFORE..],
        "the download differs"
    );
    let closed = closed_line(&lab.relay, id);
    assert_eq!(
        closed.num("bytes_client_to_upstream"),
        UPLOAD as u64,
        "{closed}"
    );
    assert_eq!(
        closed.num("bytes_upstream_to_client"),
        (32 + DOWNLOAD) as u64,
        "{closed}"
    );
    assert_eq!(
        map_bytes(&settled(metrics)),
        (UPLOAD as u64, (32 + DOWNLOAD) as u64)
    );
}

// ---------------------------------------------------------------------------------------
// Held for a booting instance.

data_path_test!(held_connection_across_an_upgrade);
/// `ssh 'echo hello'` to a mapping with `hold` whose sshd is not up: held; the relay is
/// upgraded (the new process counts it held); then sshd starts: ssh prints hello, over one
/// relayed connection and one sshd session.
fn held_connection_across_an_upgrade(backend: Backend) {
    let base = free_ports_in_a_row(3);
    let (port, metrics, instance) = (base, base + 1, base + 2);
    let mut sshd = Sshd::prepare(instance);
    let to = SocketAddr::from((LOCALHOST, instance));
    let mut lab = Lab::start(
        backend,
        metrics,
        &map_section(port, to, MAP, "hold = \"60s\"\n"),
    );
    let client = sshd
        .ssh(port)
        .arg("echo hello")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ssh");
    wait_metric(metrics, HELD, &[("map", MAP)], 1.0);

    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (1, 0), "the held connection moves");
    wait_metric(metrics, HELD, &[("map", MAP)], 1.0);
    sshd.launch();

    let out = client.wait_with_output().expect("ssh output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "hello\n",
        "ssh stdout (stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ssh: {}", out.status);
    lab.relay.wait_log(
        |l| l.msg() == "upstream connected after waiting",
        LOG_TIMEOUT,
    );
    let s = settled(metrics);
    assert_eq!(
        s.sum(ACCEPTED, &[("map", MAP)]),
        1.0,
        "one relayed connection"
    );
    assert_eq!(s.value(HELD, &[("map", MAP)]), 0.0);
    assert_eq!(sshd_logins(&sshd), 1);
}

// ---------------------------------------------------------------------------------------
// WebSocket.

/// A client frame: FIN, `opcode`, masked with a random key.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    use rand::Rng;
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    let key: [u8; 4] = rand::thread_rng().gen();
    out.extend(key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

const WS_BINARY: u8 = 2;
const WS_CLOSE: u8 = 8;

/// A raw `ws://` client: the socket and what was read past the last frame.
struct Ws {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    /// Connects to the `[[ws]]` port and completes the upgrade to a WebSocket for `path`.
    fn open(port: u16, path: &str) -> Ws {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(random_bytes(16));
        let mut ws = Ws {
            conn: connect(port),
            buf: Vec::new(),
        };
        ws.send(
            format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        );
        let end = loop {
            if let Some(at) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(ws.fill(), "the connection ended before the answer's head");
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        ws.buf.drain(..end);
        ws
    }

    fn send(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).expect("send to the relay");
    }

    /// Reads more; `false` at the end of the stream.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        let n = read_some(&mut self.conn, &mut chunk).expect("read from the relay");
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next frame from the relay (unmasked): its opcode and payload.
    fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "a masked frame from the relay");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (opcode, payload);
                }
            }
            assert!(self.fill(), "the connection ended inside a frame");
        }
    }

    /// Data frames until `n` payload bytes have come.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let mut data = Vec::new();
        while data.len() < n {
            let (opcode, payload) = self.frame();
            assert_eq!(opcode, WS_BINARY, "a data frame");
            data.extend(payload);
        }
        assert_eq!(data.len(), n, "more data than was sent");
        data
    }

    fn roundtrip(&mut self, payload: &[u8]) {
        self.send(&ws_frame(WS_BINARY, payload));
        assert!(self.data(payload.len()) == payload, "the echo differs");
    }
}

data_path_test!(websocket_across_an_upgrade);
/// A `ws://` session to an echo upstream: frames echo before the upgrade; a frame whose
/// first half was sent before the upgrade and the second after echoes whole; frames echo
/// after; then a clean close (the client's Close, the relay's Close 1000, the end).
fn websocket_across_an_upgrade(backend: Backend) {
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(3);
    let (port, ws_port, metrics) = (base, base + 1, base + 2);
    let sections = map_section(port, upstream.addr(), MAP, "")
        + &format!(
            "[[ws]]\nlisten = \"127.0.0.1:{ws_port}\"\npath = \"/ssh/{{name}}\"\n\
             ping_interval = \"0s\"\n"
        );
    let mut lab = Lab::start(backend, metrics, &sections);
    let mut ws = Ws::open(ws_port, "/ssh/C-123");
    ws.roundtrip(b"before the upgrade");

    let payload = random_bytes(100_000);
    let frame = ws_frame(WS_BINARY, &payload);
    let (first, second) = frame.split_at(frame.len() / 2);
    ws.send(first);
    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (1, 0));
    ws.send(second);
    assert!(
        ws.data(payload.len()) == payload,
        "the cut frame's echo differs"
    );
    ws.roundtrip(b"after the upgrade");
    ws.roundtrip(&random_bytes(70_000));

    ws.send(&ws_frame(WS_CLOSE, &1000u16.to_be_bytes()));
    let (opcode, payload) = ws.frame();
    assert_eq!(opcode, WS_CLOSE, "the relay's answer to the Close");
    assert_eq!(payload[..2], 1000u16.to_be_bytes(), "the Close code");
    assert!(!ws.fill() && ws.buf.is_empty(), "bytes after the Close");
    let closed = lab.relay.wait_log(
        |l| l.msg() == "connection closed" && l.str("via") == Some("ws"),
        LOG_TIMEOUT,
    );
    assert_eq!(closed.text("map"), MAP, "{closed}");
}

// ---------------------------------------------------------------------------------------
// TLS stays.

/// `-o ProxyCommand=openssl s_client …` to the TLS entry for mapping [`MAP`].
fn tls_proxy(tls_port: u16, ca: &Path) -> String {
    let sni = format!("C-123.{SNI_SUFFIX}");
    format!(
        "ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:{tls_port} -servername {sni} \
         -CAfile {} -verify_return_error -verify_hostname {sni}",
        ca.display()
    )
}

data_path_test!(tls_connection_stays_with_the_old_process);
/// An `ssh … cat` session over the TLS entry and one direct: the upgrade moves the direct
/// one and leaves the TLS one with the old process (`stayed` 1), which logs `draining after
/// upgrade`, alone holds that connection, and keeps serving it; a new TLS session goes to
/// the new process. When the old session ends, the old process exits 0.
fn tls_connection_stays_with_the_old_process(backend: Backend) {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path());
    let base = free_ports_in_a_row(3);
    let (port, tls_port, metrics) = (base, base + 1, base + 2);
    let sections = map_section(port, sshd.addr(), MAP, "")
        + &format!(
            "[[tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             sni_suffix = \"{SNI_SUFFIX}\"\n",
            ca.chain.display(),
            ca.key.display()
        );
    let mut lab = Lab::start(backend, metrics, &sections);
    let proxy = tls_proxy(tls_port, &ca.ca);
    let tls_entry = SocketAddr::from((LOCALHOST, tls_port));
    let direct_entry = SocketAddr::from((LOCALHOST, port));

    let mut old_session = CatSession::start(sshd.ssh_with(port, &["-o", &proxy]).arg("cat"));
    let mut direct = CatSession::start(sshd.ssh(port).arg("cat"));
    let [tls_client] = established_to(tls_entry)[..] else {
        panic!("not one connection to the TLS entry");
    };
    let [direct_client] = established_to(direct_entry)[..] else {
        panic!("not one direct connection");
    };
    let old = lab.relay.pid();

    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (1, 1));
    assert!(up.old_exit.is_none());
    // Found by its start; its exact message is checked at the end, after the behaviour.
    let draining = lab.relay.wait_log(
        |l| l.msg().starts_with("draining after upgrade"),
        LOG_TIMEOUT,
    );
    assert_eq!(draining.u64("connections"), Some(1), "{draining}");
    assert_eq!(
        socket_owners(tls_client.1, tls_client.0),
        [old],
        "the TLS connection is the old process's alone"
    );
    // The old process closes its copies of what moved.
    let moved = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        (socket_owners(direct_client.1, direct_client.0) == [up.pid]).then_some(())
    });
    assert!(
        moved.is_some(),
        "the direct connection's relay end is held by {:?}, not the new process alone",
        socket_owners(direct_client.1, direct_client.0)
    );
    old_session.roundtrip(b"still served by the old process");
    direct.roundtrip(b"served by the new process");

    // A new TLS session: the new process's.
    let mut new_session = CatSession::start(sshd.ssh_with(port, &["-o", &proxy]).arg("cat"));
    let fresh: Vec<_> = established_to(tls_entry)
        .into_iter()
        .filter(|c| *c != tls_client)
        .collect();
    let [fresh] = fresh[..] else {
        panic!("not one new TLS connection: {fresh:?}");
    };
    assert_eq!(socket_owners(fresh.1, fresh.0), [up.pid]);
    assert!(
        lab.relay.process_exited(old).is_none(),
        "the old process left early"
    );

    old_session.end();
    let status = lab.relay.wait_process_exit(old, Duration::from_secs(30));
    assert!(status.success(), "the old process exited {status}");
    new_session.roundtrip(b"after the old process left");
    direct.roundtrip(b"after the old process left");
    new_session.end();
    direct.end();
    assert_eq!(sshd_logins(&sshd), 3);
    let s = settled(metrics);
    assert_eq!(s.value(UPGRADES, &[("result", "success")]), 1.0);
    assert_eq!(
        draining.msg(),
        "draining after upgrade",
        "the message of {draining}"
    );
}

// ---------------------------------------------------------------------------------------
// Many idle connections.

/// How many idle connections cross the upgrade.
const IDLE: usize = 2_000;

data_path_test!(many_connections_idle_across_an_upgrade);
/// 2,000 connections to an echo upstream, each checked with a byte, then idle: all of them
/// move (`ss` still lists 2,000, the gauge says 2,000), and each echoes a byte again.
fn many_connections_idle_across_an_upgrade(backend: Backend) {
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let mut lab = Lab::start(
        backend,
        metrics,
        &map_section(port, upstream.addr(), MAP, ""),
    );
    let started = Instant::now();
    let mut conns: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            let mut conn = connect(port);
            roundtrip(&mut conn, &[i as u8]);
            conn
        })
        .collect();
    println!("{IDLE} connections opened in {:?}", started.elapsed());
    wait_metric(metrics, ACTIVE, &[("map", MAP)], IDLE as f64);

    let up = lab.upgrade(None);
    println!("upgrade of {IDLE} connections: {} ms", up.ms);
    assert_eq!((up.moved, up.stayed), (IDLE as u64, 0));
    let entry = SocketAddr::from((LOCALHOST, port));
    assert_eq!(established_to(entry).len(), IDLE, "connections `ss` lists");
    // The gauge, recounted by the new process.
    wait_metric(metrics, ACTIVE, &[("map", MAP)], IDLE as f64);
    for (i, conn) in conns.iter_mut().enumerate() {
        roundtrip(conn, &[!(i as u8)]);
    }
    drop(conns);
    settled(metrics);
}

// ---------------------------------------------------------------------------------------
// Rollback.

/// A transfer and a relay; an upgrade through a wrapper that sets `switch` fails: the
/// command exits 1, the relay logs `upgrade rolled back` with an error that names each of
/// `error_names`, and serves on with the same pid: the transfer completes, a new connection
/// is its; `portrelay_upgrades_total{result="rollback"}` is 1. Then an upgrade to the test
/// build succeeds, and both counts hold.
fn check_rollback(backend: Backend, switch: (&str, &str), error_names: &[&str]) {
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(2);
    let (port, metrics) = (base, base + 1);
    let binaries = Binaries::new();
    let failing = binaries.wrapper("portrelay-failing", &[switch], Path::new(BIN));
    let mut lab = Lab::start(
        backend,
        metrics,
        &map_section(port, upstream.addr(), MAP, ""),
    );
    let pid = lab.relay.pid();
    let stream = EchoStream::start(port);
    stream.wait_moving(1 << 20);

    let err = lab
        .relay
        .upgrade(Some(&failing))
        .expect_err("an upgrade to the failing binary");
    println!("the failed upgrade said: {err}");
    let line = lab
        .relay
        .wait_log(|l| l.msg() == "upgrade rolled back", LOG_TIMEOUT);
    for name in error_names {
        assert!(line.text("error").contains(name), "{name:?} in {line}");
    }
    assert!(
        !lab.relay.log_lines().iter().any(|l| l.msg() == "adopted"),
        "nothing was adopted"
    );
    assert_eq!(lab.relay.pid(), pid);
    stream.wait_moving(1 << 20);

    let mut conn = connect(port);
    roundtrip(&mut conn, b"a new connection after the rollback");
    assert_eq!(
        socket_owners(
            SocketAddr::from((LOCALHOST, port)),
            conn.local_addr().unwrap()
        ),
        [pid]
    );
    lab.wait_upgrades("rollback", 1.0);
    let s = lab.scrape();
    assert_eq!(
        s.get(UPGRADES, &[("result", "success")]).unwrap_or(0.0),
        0.0
    );

    // The relay still upgrades, and the counts go on.
    let up = lab.upgrade(None);
    assert_eq!((up.moved, up.stayed), (2, 0));
    roundtrip(&mut conn, b"after the upgrade");
    let bytes = stream.finish(4 << 20);
    println!("echo stream across the rollback and the upgrade: {bytes} bytes");
    lab.wait_upgrades("success", 1.0);
    assert_eq!(lab.scrape().value(UPGRADES, &[("result", "rollback")]), 1.0);
}

data_path_test!(rollback_when_the_new_process_fails);
/// The new process exits 1 after reading the state (`PORTRELAY_TEST_FAIL_ADOPT=1`).
fn rollback_when_the_new_process_fails(backend: Backend) {
    check_rollback(backend, ("PORTRELAY_TEST_FAIL_ADOPT", "1"), &[]);
}

data_path_test!(rollback_on_an_incompatible_state_version);
/// The new binary reads state version 99 only (`PORTRELAY_TEST_STATE_VERSION=99`): the
/// preflight refuses, and the error names the versions.
fn rollback_on_an_incompatible_state_version(backend: Backend) {
    check_rollback(
        backend,
        ("PORTRELAY_TEST_STATE_VERSION", "99"),
        &["99", "1"],
    );
}

// ---------------------------------------------------------------------------------------
// Across backends.

data_path_test!(upgrade_across_backends);
/// Started on `backend`, upgraded through a wrapper with `PORTRELAY_IO_BACKEND` set to the
/// other one, then back: an echo stream, an `ssh … cat` session and 50 idle connections
/// are kept; `adopted`, `ready` and the metrics name the backend in force.
fn upgrade_across_backends(backend: Backend) {
    let other = match backend {
        Backend::Uring => Backend::Epoll,
        Backend::Epoll => Backend::Uring,
    };
    if let Some(why) = other.unavailable() {
        panic!(
            "this test needs both backends; {} is unavailable: {why}",
            other.name()
        );
    }
    let sshd = Sshd::start();
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(3);
    let (port, ssh_port, metrics) = (base, base + 1, base + 2);
    let binaries = Binaries::new();
    let sections = map_section(port, upstream.addr(), MAP, "")
        + &map_section(ssh_port, sshd.addr(), "C.ssh", "");
    let mut lab = Lab::start(backend, metrics, &sections);
    let stream = EchoStream::start(port);
    let mut cat = CatSession::start(sshd.ssh(ssh_port).arg("cat"));
    let mut idle: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut conn = connect(port);
            roundtrip(&mut conn, &[i]);
            conn
        })
        .collect();
    stream.wait_moving(1 << 20);

    for target in [other, backend] {
        let wrapper = binaries.wrapper(
            &format!("portrelay-{}", target.name()),
            &[("PORTRELAY_IO_BACKEND", target.name())],
            Path::new(BIN),
        );
        let up = lab.upgrade(Some(&wrapper));
        assert_eq!(up.adopted.text("backend"), target.name(), "{}", up.adopted);
        assert_eq!((up.moved, up.stayed), (52, 0));
        assert_eq!(lab.relay.backend(), target);
        stream.wait_moving(1 << 20);
        cat.roundtrip(format!("on {}", target.name()).as_bytes());
        for (i, conn) in idle.iter_mut().enumerate() {
            roundtrip(conn, &[i as u8, target as u8]);
        }
        let s = lab.scrape();
        assert_eq!(
            s.value("portrelay_io_backend_info", &[("backend", target.name())]),
            1.0
        );
    }
    stream.finish(4 << 20);
    cat.end();
    drop(idle);
    assert_eq!(sshd_logins(&sshd), 1);
}

// ---------------------------------------------------------------------------------------
// SIGUSR2.

data_path_test!(sigusr2_upgrades);
/// SIGUSR2 to the relay upgrades it to its own binary, as `portrelay upgrade` does: `upgrade
/// done`, a new pid, an `ssh … cat` session and an echo stream kept.
fn sigusr2_upgrades(backend: Backend) {
    let sshd = Sshd::start();
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(3);
    let (port, ssh_port, metrics) = (base, base + 1, base + 2);
    let sections = map_section(port, upstream.addr(), MAP, "")
        + &map_section(ssh_port, sshd.addr(), "C.ssh", "");
    let mut lab = Lab::start(backend, metrics, &sections);
    let stream = EchoStream::start(port);
    let mut cat = CatSession::start(sshd.ssh(ssh_port).arg("cat"));
    stream.wait_moving(1 << 20);
    let old = lab.relay.pid();

    let up = lab
        .relay
        .sigusr2()
        .unwrap_or_else(|e| panic!("SIGUSR2: {e}"));
    assert_eq!(up.old_pid, old);
    assert_ne!(lab.relay.pid(), old);
    assert_eq!((up.moved, up.stayed), (2, 0));
    stream.wait_moving(1 << 20);
    cat.roundtrip(b"after SIGUSR2");
    stream.finish(4 << 20);
    cat.end();
    lab.wait_upgrades("success", 1.0);
}

// ---------------------------------------------------------------------------------------
// Counters.

/// Series of a counter that the new process continues (every `portrelay_…_total` but the
/// upgrade and admin-request counts, which the upgrade itself moves).
fn continued_counters(s: &Scrape) -> Vec<(String, f64)> {
    s.samples
        .iter()
        .filter(|((name, _), _)| {
            name.starts_with("portrelay_")
                && name.ends_with("_total")
                && name != UPGRADES
                && name != "portrelay_admin_requests_total"
        })
        .map(|((name, labels), v)| (format!("{name}{labels:?}"), *v))
        .collect()
}

/// The transfers of [`counted_traffic`]: bytes sent, then more bytes sent, each echoed.
const TRANSFERS: [(usize, usize); 3] = [(1000, 10), (100_000, 5), (7, 7)];

/// [`TRANSFERS`] on [`MAP`], a client `allow` denies, an upstream that refuses: closed,
/// counted.
fn counted_traffic(port: u16, refused_port: u16) {
    for (up, down) in TRANSFERS {
        let mut conn = connect(port);
        conn.write_all(&random_bytes(up)).unwrap();
        let mut back = vec![0u8; up];
        conn.read_exact(&mut back).unwrap();
        conn.write_all(&random_bytes(down)).unwrap();
        let mut back = vec![0u8; down];
        conn.read_exact(&mut back).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
    }
    connect_expect_closed(
        Ipv4Addr::new(127, 0, 0, 2),
        port,
        b"denied",
        Duration::from_secs(5),
    );
    connect_expect_closed(LOCALHOST, refused_port, b"", Duration::from_secs(5));
}

data_path_test!(counters_continue_across_upgrades);
/// Counters of every kind moved before an upgrade (bytes, accepted, rejected, connect
/// failures): the new process exposes each one exactly as the old one last did; traffic
/// after the upgrade adds exactly what it moved; the active gauge is recounted from the
/// adopted connections; `portrelay_upgrades_total{result="success"}` counts the upgrades.
fn counters_continue_across_upgrades(backend: Backend) {
    let upstream = Upstream::echo();
    let base = free_ports_in_a_row(4);
    let (port, refused_port, metrics, closed_port) = (base, base + 1, base + 2, base + 3);
    let sections = map_section(port, upstream.addr(), MAP, "allow = [\"127.0.0.1/32\"]\n")
        + &map_section(
            refused_port,
            SocketAddr::from((LOCALHOST, closed_port)),
            "C.refused",
            "",
        );
    let mut lab = Lab::start(backend, metrics, &sections);
    counted_traffic(port, refused_port);
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut conn = connect(port);
            roundtrip(&mut conn, b"idle");
            conn
        })
        .collect();
    // Each way: the transfers, and the idle connections' checks (echoed).
    let moved = TRANSFERS.iter().map(|(a, b)| a + b).sum::<usize>() as u64 + 2 * 4;
    let before = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let s = lab.scrape();
        let done = series(&s, ACTIVE, &[("map", MAP)]) == 2.0
            && map_bytes(&s) == (moved, moved)
            && s.get("portrelay_session_duration_seconds_count", &[("map", MAP)]) == Some(3.0)
            && s.sum("portrelay_connections_rejected_total", &[]) >= 1.0
            && s.sum("portrelay_upstream_connect_failures_total", &[]) >= 1.0;
        done.then_some(s)
    })
    .unwrap_or_else(|| panic!("the traffic was not counted:\n{}", lab.scrape().text));
    let counters = continued_counters(&before);
    assert!(counters.len() > 5, "{counters:?}");

    for n in 1..=2u32 {
        let up = lab.upgrade(None);
        assert_eq!((up.moved, up.stayed), (2, 0));
        lab.wait_upgrades("success", n.into());
        let after = lab.scrape();
        assert_eq!(
            continued_counters(&after),
            counters,
            "counters after upgrade {n}"
        );
        // Recounted by the new process.
        wait_metric(metrics, ACTIVE, &[("map", MAP)], 2.0);
        assert_eq!(after.value(HELD, &[("map", MAP)]), 0.0);
    }

    // Traffic in the new process adds to the old counts, exactly.
    let (up0, down0) = map_bytes(&before);
    let accepted0 = series(&before, ACCEPTED, &[("map", MAP), ("via", "direct")]);
    let mut conn = connect(port);
    roundtrip(&mut conn, &random_bytes(4321));
    drop(conn);
    for conn in idle.iter_mut() {
        roundtrip(conn, b"idle again");
    }
    drop(idle);
    let s = settled(metrics);
    let more = 4321 + 2 * "idle again".len() as u64;
    assert_eq!(map_bytes(&s), (up0 + more, down0 + more));
    assert_eq!(
        series(&s, ACCEPTED, &[("map", MAP), ("via", "direct")]),
        accepted0 + 1.0
    );
    assert_eq!(s.value(UPGRADES, &[("result", "success")]), 2.0);
    assert_eq!(
        s.get(UPGRADES, &[("result", "rollback")]).unwrap_or(0.0),
        0.0
    );
}
