//! The admin socket: `portrelay sessions` and `portrelay kill` against a running relay,
//! with real ssh to a real sshd (its own log names the relay's address and port), raw TCP
//! clients from several addresses, a PROXY header's client, and bad admin clients.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::util::metrics::Scrape;
use crate::util::net::{connect_from, expect_reset, free_port, roundtrip, Upstream, LOCALHOST};
use crate::util::process::{self, KillOnDrop};
use crate::util::relay::{data_path_test, map_section, relay_section, BIN};
use crate::util::{poll, Backend, Relay, Sshd};

const A3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const A4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// A directory for an admin socket (short: a unix socket path has at most 107 bytes).
fn socket_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("portrelay-admin-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn admin_line(path: &Path) -> String {
    format!("admin_socket = \"{}\"", path.display())
}

/// `portrelay ARGS… --admin-socket PATH`: exit code, stdout, stderr.
fn portrelay(args: &[&str], socket: &Path) -> (Option<i32>, String, String) {
    let out = process::run(
        Command::new(BIN)
            .args(args)
            .arg("--admin-socket")
            .arg(socket),
        Duration::from_secs(20),
    );
    (out.status.code(), out.stdout, out.stderr)
}

/// `portrelay sessions --json [--map NAME]`: the array it prints.
fn sessions(socket: &Path, map: Option<&str>) -> Vec<Value> {
    let mut args = vec!["sessions", "--json"];
    if let Some(m) = map {
        args.extend(["--map", m]);
    }
    let (code, stdout, stderr) = portrelay(&args, socket);
    assert_eq!(code, Some(0), "sessions: {stderr}");
    match serde_json::from_str(&stdout) {
        Ok(Value::Array(all)) => all,
        other => panic!("sessions --json printed {stdout:?}: {other:?}"),
    }
}

/// `portrelay kill ARGS…`: stdout, which must say it ended `want`.
fn kill(socket: &Path, args: &[&str], want: usize) {
    let mut all = vec!["kill"];
    all.extend(args);
    let (code, stdout, stderr) = portrelay(&all, socket);
    assert_eq!(code, Some(0), "kill {args:?}: {stdout}{stderr}");
    let s = if want == 1 { "" } else { "s" };
    assert_eq!(
        stdout,
        format!("killed {want} connection{s}\n"),
        "kill {args:?}"
    );
}

fn addr(v: &Value, key: &str) -> SocketAddr {
    v[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key} of {v}"))
}

/// Polls `sessions` until `pred` holds for the list.
fn wait_sessions(socket: &Path, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    poll(Duration::from_secs(20), Duration::from_millis(50), || {
        last = sessions(socket, None);
        pred(&last).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("sessions never matched; last: {last:?}"))
}

/// A live `ssh` through the relay is listed with its real client, mapping, nonzero byte
/// counts both ways, and `relay_local` equal to what sshd logged as the client; `kill ID`
/// resets it: ssh exits, and the close line says `killed`.
fn ssh_session_is_listed_and_killed(backend: Backend) {
    let sshd = Sshd::start();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let port = free_port();
    let toml =
        relay_section(None, &admin_line(&socket)) + &map_section(port, sshd.addr(), "C.ssh", "");
    let relay = Relay::start(&toml, backend);
    let mut ssh = KillOnDrop::spawn(sshd.ssh(port).arg("echo started; sleep 600"), "[ssh]");

    // sshd's log: "Accepted publickey for root from 127.0.0.1 port 43512 ssh2: …".
    let logged = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        sshd.log().lines().find_map(|l| {
            let rest = l.split("Accepted publickey for root from ").nth(1)?;
            let mut words = rest.split_whitespace();
            let ip = words.next()?;
            let port = words.nth(1)?;
            format!("{ip}:{port}").parse::<SocketAddr>().ok()
        })
    })
    .unwrap_or_else(|| panic!("sshd logged no login:\n{}", sshd.log()));
    let listed = wait_sessions(&socket, |all| {
        all.len() == 1
            && all[0]["bytes_client_to_upstream"].as_u64() > Some(0)
            && all[0]["bytes_upstream_to_client"].as_u64() > Some(0)
    });
    let s = &listed[0];
    assert_eq!(
        addr(s, "relay_local"),
        logged,
        "relay_local vs sshd's log: {s}"
    );
    assert_eq!(addr(s, "client").ip(), LOCALHOST, "{s}");
    assert_ne!(
        addr(s, "client"),
        logged,
        "the client is ssh's end, not the relay's: {s}"
    );
    assert_eq!(s["map"], "C.ssh");
    assert_eq!(s["port"].as_u64(), Some(port as u64));
    assert_eq!(s["via"], "direct");
    assert_eq!(s["state"], "relayed");
    assert_eq!(addr(s, "upstream"), sshd.addr());
    assert!(s["age_ms"].as_u64().is_some(), "{s}");
    let id = s["id"].as_u64().expect("id");

    // The table: a header, and the connection under it.
    let (code, table, stderr) = portrelay(&["sessions"], &socket);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "CLIENT",
            "VIA",
            "PORT",
            "MAP",
            "UPSTREAM",
            "RELAY_LOCAL",
            "STATE",
            "TO_UPSTREAM",
            "TO_CLIENT",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], id.to_string());
    assert_eq!(row[6], logged.to_string());
    // Columns are aligned: each starts where its header does.
    let at = lines[0].find("RELAY_LOCAL").unwrap();
    assert_eq!(
        &lines[1][at..at + logged.to_string().len()],
        logged.to_string()
    );

    kill(&socket, &[&id.to_string()], 1);
    let status = process::wait_deadline(&mut ssh.child, Duration::from_secs(20))
        .expect("ssh still running after kill");
    assert!(!status.success(), "ssh exited {status:?} after kill");
    let closed = relay.wait_log(
        |l| l.msg() == "connection closed" && l.u64("id") == Some(id),
        Duration::from_secs(10),
    );
    assert_eq!(closed.reason(), "killed", "{}", closed.raw);
    // The close line's counters are the ones `sessions` showed, moved on since.
    for key in ["bytes_client_to_upstream", "bytes_upstream_to_client"] {
        assert!(
            closed.num(key) >= s[key].as_u64().unwrap(),
            "{key}: {}",
            closed.raw
        );
    }
    assert!(sessions(&socket, None).is_empty());
    // An id that is gone: nothing ended, and the command says so.
    let (code, stdout, _) = portrelay(&["kill", &id.to_string()], &socket);
    assert_eq!(code, Some(1));
    assert_eq!(
        stdout,
        format!("killed 0 connections\nno live connection with id {id}\n")
    );
}
data_path_test!(ssh_session_is_listed_and_killed);

/// A connection to the echo upstream from `src`, relayed (its first echo came back).
fn echo_client(src: Ipv4Addr, port: u16) -> TcpStream {
    let mut c = connect_from(src, port);
    roundtrip(&mut c, b"hello");
    c
}

/// `--map` and `--client` list and end exactly their connections; the others go on.
fn map_and_client_select_only_theirs(backend: Backend) {
    let echo = Upstream::echo();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let (pa, pb) = (free_port(), free_port());
    let toml = relay_section(None, &admin_line(&socket))
        + &map_section(pa, echo.addr(), "A", "")
        + &map_section(pb, echo.addr(), "B", "");
    let _relay = Relay::start(&toml, backend);
    let mut a3 = [echo_client(A3, pa), echo_client(A3, pa)];
    let mut a4 = echo_client(A4, pa);
    let mut b3 = echo_client(A3, pb);

    let all = wait_sessions(&socket, |all| all.len() == 4);
    let ids: Vec<u64> = all.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), 4, "ids are unique across loops: {ids:?}");
    let of_a = sessions(&socket, Some("A"));
    assert_eq!(of_a.len(), 3, "{of_a:?}");
    assert!(of_a.iter().all(|s| s["map"] == "A" && s["port"] == pa));
    assert_eq!(sessions(&socket, Some("B")).len(), 1);
    assert_eq!(sessions(&socket, Some("C")).len(), 0);

    kill(&socket, &["--client", "127.0.0.4"], 1);
    expect_reset(&mut a4, Duration::from_secs(5));
    kill(&socket, &["--map", "B"], 1);
    expect_reset(&mut b3, Duration::from_secs(5));
    for c in &mut a3 {
        roundtrip(c, b"still here");
    }
    let left = sessions(&socket, None);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left
        .iter()
        .all(|s| s["map"] == "A" && addr(s, "client").ip() == A3));
    // A prefix: both of 127.0.0.3's, as one selector.
    kill(&socket, &["--client", "127.0.0.0/29"], 2);
    for c in &mut a3 {
        expect_reset(c, Duration::from_secs(5));
    }
    assert!(sessions(&socket, None).is_empty());
}
data_path_test!(map_and_client_select_only_theirs);

/// Behind a trusted proxy the real client is the PROXY header's, in `sessions` and for
/// `kill --client`.
fn proxied_connection_shows_its_real_client(backend: Backend) {
    let echo = Upstream::echo();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let port = free_port();
    let extra = format!(
        "trusted_proxies = [\"127.0.0.1/32\"]\n{}",
        admin_line(&socket)
    );
    let toml = relay_section(None, &extra) + &map_section(port, echo.addr(), "P", "");
    let _relay = Relay::start(&toml, backend);
    let mut c = connect_from(LOCALHOST, port);
    c.write_all(format!("PROXY TCP4 198.51.100.7 127.0.0.1 40001 {port}\r\n").as_bytes())
        .unwrap();
    roundtrip(&mut c, b"through the proxy");
    let all = wait_sessions(&socket, |all| all.len() == 1);
    assert_eq!(
        addr(&all[0], "client"),
        "198.51.100.7:40001".parse().unwrap()
    );
    assert_eq!(all[0]["via"], "proxy");
    kill(&socket, &["--client", "127.0.0.1"], 0);
    kill(&socket, &["--client", "198.51.100.0/24"], 1);
    expect_reset(&mut c, Duration::from_secs(5));
}
data_path_test!(proxied_connection_shows_its_real_client);

/// A held connection (its instance not up yet) is listed as `held`.
fn held_connection_is_listed(backend: Backend) {
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let (port, down) = (free_port(), free_port());
    let upstream = SocketAddr::from((LOCALHOST, down));
    let toml = relay_section(None, &admin_line(&socket))
        + &map_section(port, upstream, "Boot", "hold = \"30s\"\n");
    let _relay = Relay::start(&toml, backend);
    let _c = connect_from(LOCALHOST, port);
    let all = wait_sessions(&socket, |all| all.len() == 1 && all[0]["state"] == "held");
    assert_eq!(all[0]["map"], "Boot");
    assert_eq!(addr(&all[0], "upstream"), upstream);
}
data_path_test!(held_connection_is_listed);

/// One raw request line on a fresh admin connection: the reply line.
fn raw_request(socket: &Path, line: &[u8]) -> String {
    let mut c = UnixStream::connect(socket).expect("connect the admin socket");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(line).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while c.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}

/// Malformed, oversized, unfinished and silent admin clients each get at most an error
/// reply; other admin requests are answered meanwhile, and relayed connections go on.
fn bad_admin_clients_do_not_disturb_the_relay(backend: Backend) {
    let echo = Upstream::echo();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let (port, metrics) = (free_port(), free_port());
    let toml = relay_section(Some(metrics), &admin_line(&socket))
        + &map_section(port, echo.addr(), "E", "");
    let _relay = Relay::start(&toml, backend);
    let mut relayed = echo_client(A3, port);

    // Silent, and unfinished: they hold only their own admin connections.
    let silent = UnixStream::connect(&socket).unwrap();
    let mut unfinished = UnixStream::connect(&socket).unwrap();
    unfinished.write_all(br#"{"v":1,"op":"sess"#).unwrap();
    let started = Instant::now();

    let cases: &[(&[u8], &str)] = &[
        (
            b"not json\n",
            r#"{"v":1,"error":"not JSON: expected ident at line 1 column 2"}"#,
        ),
        (
            b"{\"v\":1,\"op\":\"reboot\"}\n",
            r#"{"v":1,"error":"unknown op \"reboot\" (known: \"sessions\", \"kill\", \"upgrade\")"}"#,
        ),
        (
            b"{\"v\":9,\"op\":\"sessions\"}\n",
            r#"{"v":1,"error":"unsupported version 9; this relay speaks 1"}"#,
        ),
        (
            b"{\"v\":1,\"op\":\"kill\",\"client\":\"10.0.0.0/40\"}\n",
            r#"{"v":1,"error":"\"client\" must be ADDR or ADDR/PREFIX, got \"10.0.0.0/40\""}"#,
        ),
    ];
    for (line, want) in cases {
        assert_eq!(raw_request(&socket, line), *want);
    }
    let long = vec![b'x'; 70 * 1024];
    assert_eq!(
        raw_request(&socket, &long),
        r#"{"v":1,"error":"request line longer than 65536 bytes"}"#
    );
    // Several requests on one connection, a bad one among them.
    let mut c = UnixStream::connect(&socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"{\"v\":1,\"op\":\"sessions\"}\n]\n{\"v\":1,\"op\":\"sessions\",\"map\":\"none\"}\n",
    )
    .unwrap();
    let mut replies = String::new();
    while replies.lines().count() < 3 {
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).expect("replies");
        assert!(n > 0, "closed after {replies:?}");
        replies.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    let replies: Vec<&str> = replies.lines().collect();
    assert!(
        replies[0].starts_with(r#"{"v":1,"sessions":[{"id":"#),
        "{replies:?}"
    );
    assert!(replies[1].starts_with(r#"{"v":1,"error":"#), "{replies:?}");
    assert_eq!(replies[2], r#"{"v":1,"sessions":[]}"#);
    drop(c);

    // While the silent and unfinished ones still wait, the command line is answered.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "too slow to tell"
    );
    assert_eq!(sessions(&socket, None).len(), 1);
    roundtrip(&mut relayed, b"unaffected");
    // Then they are answered with the timeout and closed.
    for mut c in [silent, unfinished] {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply)
            .expect("timeout reply, then close");
        assert_eq!(
            reply,
            "{\"v\":1,\"error\":\"no complete request line within 5s\"}\n"
        );
    }
    roundtrip(&mut relayed, b"still unaffected");
    let scrape = Scrape::take(metrics);
    assert_eq!(
        scrape.value("portrelay_admin_requests_total", &[("result", "error")]),
        8.0
    );
    assert!(scrape.value("portrelay_admin_requests_total", &[("result", "ok")]) >= 3.0);
}
data_path_test!(bad_admin_clients_do_not_disturb_the_relay);

/// A panic while answering a request (a bug) is logged and ends only that admin connection:
/// the next request is answered, and relayed connections go on.
fn a_panicking_request_ends_only_its_connection(backend: Backend) {
    let echo = Upstream::echo();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    let port = free_port();
    let toml = relay_section(None, &admin_line(&socket)) + &map_section(port, echo.addr(), "E", "");
    let relay = Relay::start_with_env(&toml, backend, &[("PORTRELAY_TEST_FAULT", "admin-panic")]);
    let mut relayed = echo_client(A3, port);
    assert_eq!(
        raw_request(
            &socket,
            b"{\"v\":1,\"op\":\"sessions\",\"map\":\"panic\"}\n"
        ),
        "",
        "a reply from a request that panicked"
    );
    relay.wait_log(
        |l| l.msg() == "admin socket: a request panicked; its connection is closed",
        Duration::from_secs(10),
    );
    assert_eq!(sessions(&socket, None).len(), 1);
    roundtrip(&mut relayed, b"unaffected");
}
data_path_test!(a_panicking_request_ends_only_its_connection);

/// The admin socket's file: mode 0600; a stale one (no relay answers) is replaced, a live
/// one is not taken over; a reload moves it live; it is removed at exit.
#[test]
fn socket_file_mode_stale_live_reload_and_exit() {
    let echo = Upstream::echo();
    let dir = socket_dir();
    let socket = dir.path().join("admin.sock");
    // A stale socket file, as a relay that was killed leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let toml = |path: &Path| {
        relay_section(None, &admin_line(path)) + &map_section(free_port(), echo.addr(), "M", "")
    };
    let mut relay = Relay::start(&toml(&socket), Backend::Epoll);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert!(sessions(&socket, None).is_empty());

    // A second relay on the same path refuses to start, and the first keeps it.
    let second = crate::util::ControlFile::new(&toml(&socket));
    let (status, stderr) = second.run_expecting_exit(&["--io-backend", "epoll"]);
    assert!(!status.success());
    let want = format!(
        "admin socket {}: a relay is already answering on it; not taking it over",
        socket.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(sessions(&socket, None).is_empty());

    // No directory, or a file that is not a socket: the start fails, and the file stays.
    let missing = dir.path().join("no-such-dir/admin.sock");
    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, "keep me").unwrap();
    for (path, why) in [
        (&missing, "its directory does not exist"),
        (
            &plain,
            "a file that is not a socket is there; not replacing it",
        ),
    ] {
        let (status, stderr) = crate::util::ControlFile::new(&toml(path))
            .run_expecting_exit(&["--io-backend", "epoll"]);
        assert!(!status.success());
        let want = format!("admin socket {}: {why}", path.display());
        assert!(stderr.contains(&want), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");

    // A reload moves it: the new path answers, the old one is gone.
    let moved: PathBuf = dir.path().join("moved.sock");
    let generation = relay.generation();
    relay.rewrite(&toml(&moved));
    relay.wait_reloaded(generation + 1, Duration::from_secs(10));
    assert!(sessions(&moved, None).is_empty());
    assert!(!socket.exists(), "the old socket file is still there");

    relay.sigterm();
    assert!(relay.wait_exit(Duration::from_secs(20)).success());
    assert!(!moved.exists(), "the socket file is still there after exit");
}

/// Where no relay listens, `sessions` and `kill` say so and exit 1.
#[test]
fn no_admin_socket_is_a_clear_error() {
    let dir = socket_dir();
    // Nothing there; then a relay that was started without admin_socket.
    let socket = dir.path().join("admin.sock");
    let echo = Upstream::echo();
    let _relay = Relay::start(
        &(relay_section(None, "") + &map_section(free_port(), echo.addr(), "M", "")),
        Backend::Epoll,
    );
    for args in [&["sessions"][..], &["kill", "--map", "M"]] {
        let (code, stdout, stderr) = portrelay(args, &socket);
        assert_eq!(code, Some(1), "{args:?}");
        assert_eq!(stdout, "");
        assert_eq!(
            stderr,
            format!(
                "portrelay: no relay admin socket at {} (is admin_socket set in the control file?)\n",
                socket.display()
            )
        );
    }
    // `kill` takes exactly one kind of selector.
    for args in [
        &["kill"][..],
        &["kill", "1", "--map", "M"],
        &["kill", "--map", "M", "--client", "10.0.0.1"],
    ] {
        let (code, _, stderr) = portrelay(args, &socket);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
    }
}
