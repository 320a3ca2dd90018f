//! The harness on its own, without a relay: the sshd and the client commands, the
//! upstreams and the raw clients, the black hole, and the log parser. The `check_*`
//! functions the relay tests use run here straight against their peer, so a failing relay
//! test points at the relay, not at the harness.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::relay::{check_half_close, check_many_connections, HALF_CLOSE_SEND};
use crate::ssh::{check_command, check_local_forward, check_scp, check_sftp};
use crate::util::files::{assert_same_file, random_bytes, random_file, sha256_file};
use crate::util::log::{Json, LogLine};
use crate::util::net::{
    connect, connect_from, expect_closed, free_port, free_ports_in_a_row, http_get,
    listeners_in_a_row, read_to_end, roundtrip, BlackHole, Upstream, LOCALHOST,
};
use crate::util::{poll, Sshd};

#[test]
fn sshd_runs_command() {
    let sshd = Sshd::start();
    check_command(&sshd, sshd.port(), &[]);
}

#[test]
fn sshd_scp_and_sftp() {
    let sshd = Sshd::start();
    check_scp(&sshd, sshd.port(), &[], 3 << 20);
    check_sftp(&sshd, sshd.port(), 3 << 20);
}

#[test]
fn sshd_local_forward() {
    let sshd = Sshd::start();
    check_local_forward(&sshd, sshd.port());
}

#[test]
fn echo_upstream() {
    let echo = Upstream::echo();
    let mut conn = connect(echo.port());
    roundtrip(&mut conn, b"hello");
    let big = random_bytes(1 << 20);
    roundtrip(&mut conn, &big);
    drop(conn);
    let done = poll(Duration::from_secs(5), Duration::from_millis(5), || {
        (echo.active() == 0).then_some(())
    });
    assert!(
        done.is_some(),
        "echo connection still active after the client closed"
    );
    assert_eq!(echo.accepted(), 1);
    assert_eq!(echo.bytes_in(), 5 + (1 << 20));
}

#[test]
fn reply_upstream_and_consecutive_ports() {
    let upstreams: Vec<Upstream> = listeners_in_a_row(3)
        .into_iter()
        .map(|l| {
            let port = l.local_addr().unwrap().port();
            Upstream::reply_on(l, format!("I am {port}").into_bytes())
        })
        .collect();
    for pair in upstreams.windows(2) {
        assert_eq!(pair[1].port(), pair[0].port() + 1);
    }
    for upstream in &upstreams {
        let mut conn = connect(upstream.port());
        let reply = read_to_end(&mut conn);
        assert_eq!(reply, format!("I am {}", upstream.port()).into_bytes());
    }
    let first = free_ports_in_a_row(3);
    for port in first..first + 3 {
        std::net::TcpListener::bind((LOCALHOST, port)).expect("free port in a row");
    }
}

#[test]
fn digest_upstream_half_close() {
    let payload = random_bytes(1 << 20);
    let upstream = Upstream::digest_then(payload.clone());
    check_half_close(upstream.port(), &payload);
    assert_eq!(upstream.bytes_in(), HALF_CLOSE_SEND as u64);
}

#[test]
fn http_upstream() {
    let body = random_bytes(100_000);
    let http = Upstream::http(body.clone());
    assert!(http_get(http.port()) == body);
}

#[test]
fn many_connections_to_echo() {
    let echo = Upstream::echo();
    check_many_connections(echo.port(), 50, 40, Duration::from_secs(60), || {
        assert_eq!(echo.active(), 2000);
    });
    let done = poll(Duration::from_secs(20), Duration::from_millis(10), || {
        (echo.active() == 0).then_some(())
    });
    assert!(
        done.is_some(),
        "{} echo connections still active",
        echo.active()
    );
    assert_eq!(echo.bytes_in(), 2000 * 1024);
}

#[test]
fn black_hole_never_answers() {
    let hole = BlackHole::new();
    let started = std::time::Instant::now();
    let attempt = TcpStream::connect_timeout(&hole.addr(), Duration::from_millis(500));
    assert!(attempt.is_err(), "connected to the black hole");
    assert!(started.elapsed() >= Duration::from_millis(450));
}

#[test]
fn refused_port_refuses() {
    let port = free_port();
    let err = TcpStream::connect(SocketAddr::from((LOCALHOST, port))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn client_source_address() {
    // A listener that tells each client its source address, then closes.
    let listener = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, peer) = listener.accept().unwrap();
            std::io::Write::write_all(&mut conn, peer.ip().to_string().as_bytes()).unwrap();
        }
    });
    for src in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)] {
        let mut conn = connect_from(src, port);
        assert_eq!(read_to_end(&mut conn), src.to_string().into_bytes());
    }
    server.join().unwrap();
    // And a closed connection is seen as closed.
    let reply = Upstream::reply(Vec::new());
    let mut conn = connect(reply.port());
    expect_closed(&mut conn, Duration::from_secs(5));
}

#[test]
fn random_files_compare_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    random_file(&a, (2 << 20) + 17);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), (2 << 20) + 17);
    let copy = dir.path().join("copy");
    std::fs::copy(&a, &copy).unwrap();
    assert_same_file(&copy, &a);
    assert_eq!(sha256_file(&copy), sha256_file(&a));

    // One flipped byte past the first chunk is found, at its offset.
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[(1 << 20) + 5] ^= 1;
    std::fs::write(&copy, &bytes).unwrap();
    let err = std::panic::catch_unwind(|| assert_same_file(&copy, &a)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.ends_with(&format!("at byte {}", (1 << 20) + 5)),
        "{msg}"
    );
    assert_ne!(sha256_file(&copy), sha256_file(&a));

    let b = dir.path().join("b");
    random_file(&b, 1 << 20);
    assert_ne!(sha256_file(&b), sha256_file(&a));
    // SHA-256 of the empty string.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(
        sha256_file(&empty),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn log_line_parser() {
    let line = LogLine::new(concat!(
        r#"{"timestamp":"2025-01-01T00:00:00.000001Z","level":"INFO","#,
        r#""message":"connection closed","client":"127.0.0.1:5000","via":"direct","#,
        r#""port":20544,"map":"C.1","upstream":"127.0.0.1:22","#,
        r#""bytes_client_to_upstream":268435456,"bytes_upstream_to_client":0,"#,
        r#""duration_ms":12.5,"reason":"error: connect: Connection refused (os error 111)","#,
        r#""target":"portrelay::relay","span":{"client":"x","name":"conn"},"#,
        r#""spans":[{"name":"conn"}]}"#
    ));
    assert_eq!(line.msg(), "connection closed");
    assert!(line.is_closed_on(20544));
    assert!(!line.is_closed_on(20545));
    assert_eq!(line.text("client"), "127.0.0.1:5000");
    assert_eq!(line.num("bytes_client_to_upstream"), 268_435_456);
    assert_eq!(line.get("duration_ms").unwrap().as_f64(), Some(12.5));
    assert_eq!(line.u64("duration_ms"), None);
    assert!(line.reason().contains("refused"));
    assert_eq!(
        line.get("span").unwrap().get("name").unwrap().as_str(),
        Some("conn")
    );

    let escaped = LogLine::new(
        r#"{"message":"a \"q\" \\ \n \u00e9 \ud83d\ude00","n":-1,"ok":true,"x":null}"#,
    );
    assert_eq!(escaped.msg(), "a \"q\" \\ \n é 😀");
    assert_eq!(escaped.get("n"), Some(&Json::Num("-1".into())));
    assert_eq!(escaped.u64("n"), None);
    assert_eq!(escaped.get("ok"), Some(&Json::Bool(true)));

    for bad in [
        "",
        "thread 'main' panicked at src/main.rs:1:1",
        "2025-01-01T00:00:00Z  INFO ready",
        r#"{"message":"unterminated}"#,
        r#"{"a":1,}"#,
        r#"{"a":1} trailing"#,
        r#"["not", "an object"]"#,
    ] {
        let line = LogLine::new(bad);
        assert!(line.json.is_none(), "parsed {bad:?}");
        assert_eq!(line.msg(), "");
    }
}
