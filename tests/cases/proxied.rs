//! Proxied SSH (issue 5), with real peers on both backends:
//!
//! - a real HAProxy (`send-proxy` and `send-proxy-v2`, connecting from 127.0.0.2, the trusted
//!   proxy) in front of a mapped port: ssh and a 64 MiB scp each way (and a 16 MiB `scp -O`)
//!   work through it, and the
//!   relay's log and `allow` see the real client (127.0.0.3, the address the ssh client
//!   binds), not HAProxy's address; a direct client on the same port is untouched;
//! - raw connections from the trusted address without a header, with a malformed one, with
//!   a v2 LOCAL header, or silent past `proxy_header_timeout`: closed, logged and counted;
//!   an untrusted client that sends a PROXY header cannot spoof its address;
//! - SSH over TLS with `openssl s_client` as the ProxyCommand, routed by SNI, with a test CA:
//!   ssh and a 64 MiB scp each way; an unknown or missing name gets `unrecognized_name`;
//!   plain SSH bytes at the TLS port are refused; both are counted.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::ssh::{check_command, check_scp};
use crate::util::haproxy::{Haproxy, SendProxy, PROXY_SOURCE};
use crate::util::log::LogLine;
use crate::util::metrics::wait_metric;
use crate::util::net::{
    connect_expect_closed, connect_expect_reset, connect_from, free_ports_in_a_row, read_to_end,
    read_until_closed, Closed, Upstream, AT_ONCE, LOCALHOST,
};
use crate::util::process;
use crate::util::relay::{allow_line, data_path_test, map_section, relay_section};
use crate::util::tls::{TestCa, SNI_SUFFIX};
use crate::util::{Backend, Relay, Sshd};

/// The address the test's clients bind when they come through HAProxy: the real client.
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Size of the scp test file, each way.
const SCP_SIZE: usize = 64 << 20;

/// How long a log line may take to appear after the event that causes it.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// What the `[relay]` section of these tests adds: 127.0.0.2 is the trusted proxy.
fn trusted(extra: &str) -> String {
    format!("trusted_proxies = [\"{PROXY_SOURCE}/32\"]\n{extra}")
}

/// The `client` field of a log line, as IP:PORT.
fn client_of(line: &LogLine) -> SocketAddr {
    line.text("client")
        .parse()
        .unwrap_or_else(|e| panic!("client is not IP:PORT ({e}): {line}"))
}

/// Checks the fields of a `connection rejected` line.
fn assert_rejected(line: &LogLine, client: IpAddr, port: u16, reason: &str) {
    assert_eq!(line.msg(), "connection rejected", "{line}");
    assert_eq!(client_of(line).ip(), client, "client: {line}");
    assert_eq!(line.num("port"), u64::from(port), "port: {line}");
    assert_eq!(line.reason(), reason, "reason: {line}");
}

/// Whether a connection that moved a whole file ended as a transfer does: by a FIN. Through
/// the TLS entry `openssl s_client` (the ProxyCommand) may also close its socket with the
/// relay's last TLS records unread once ssh is done, which its kernel sends as a reset: the
/// relay reports what it saw, `reset`.
fn clean_end(line: &LogLine, via: &str) -> bool {
    ["client_eof", "upstream_eof"].contains(&line.reason())
        || (via == "tls" && line.reason() == "reset")
}

/// The two `connection closed` lines of an scp up and an scp down of [`SCP_SIZE`] bytes.
fn scp_lines(relay: &Relay, port: u16, via: &str) -> (LogLine, LogLine) {
    let size = SCP_SIZE as u64;
    let up = relay.wait_log(
        |l| {
            l.is_closed_on(port)
                && l.str("via") == Some(via)
                && l.u64("bytes_client_to_upstream") >= Some(size)
        },
        LOG_TIMEOUT,
    );
    let down = relay.wait_log(
        |l| {
            l.is_closed_on(port)
                && l.str("via") == Some(via)
                && l.u64("bytes_upstream_to_client") >= Some(size)
        },
        LOG_TIMEOUT,
    );
    for line in [&up, &down] {
        assert!(clean_end(line, via), "an scp that ended normally: {line}");
    }
    (up, down)
}

/// Size of the legacy-protocol scp file, each way.
const SCP_LEGACY_SIZE: usize = 16 << 20;

/// `scp -O` (the legacy scp protocol) of [`SCP_LEGACY_SIZE`] up and down through
/// `connect_port` (OPTIONS… added), after `before` connections closed on the relay's
/// `port`: intact both ways, two more connections closed, each cleanly (EOF).
fn check_legacy_scp(
    relay: &Relay,
    sshd: &Sshd,
    connect_port: u16,
    port: u16,
    options: &[&str],
    before: usize,
) {
    let mut args = vec!["-O"];
    args.extend_from_slice(options);
    check_scp(sshd, connect_port, &args, SCP_LEGACY_SIZE);
    let lines = relay.wait_logs(|l| l.is_closed_on(port), before + 2, LOG_TIMEOUT);
    for line in &lines[before..] {
        assert!(
            line.num("bytes_client_to_upstream") >= SCP_LEGACY_SIZE as u64
                || line.num("bytes_upstream_to_client") >= SCP_LEGACY_SIZE as u64,
            "an scp -O connection moved the file: {line}"
        );
        assert!(
            clean_end(line, line.str("via").unwrap_or("")),
            "an scp -O that ended normally: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// HAProxy in front of a mapped port.

/// ssh, scp both ways through HAProxy with `send_proxy`, from 127.0.0.3 to a port whose
/// `allow` is 127.0.0.3 only (HAProxy's own 127.0.0.2 is not allowed): admitted, and logged
/// with the real client and `via="proxy"`. Then ssh from 127.0.0.3 straight to the port:
/// `via="direct"`.
fn through_haproxy(backend: Backend, send_proxy: SendProxy) {
    let sshd = Sshd::start();
    let port = free_ports_in_a_row(1);
    let map = "C.proxied";
    let toml = relay_section(None, &trusted(""))
        + &map_section(
            port,
            sshd.addr(),
            map,
            &allow_line(&[&format!("{CLIENT}/32")]),
        );
    let relay = Relay::start(&toml, backend);
    let haproxy = Haproxy::start_on_free_port(port, send_proxy);
    let bind = CLIENT.to_string();

    check_command(&sshd, haproxy.port(), &["-b", &bind]);
    let line = relay.wait_log(|l| l.is_closed_on(port), LOG_TIMEOUT);
    line.assert_closed(CLIENT.into(), "proxy", port, map, sshd.addr());
    assert!(line.num("bytes_client_to_upstream") > 0, "{line}");
    assert!(line.num("bytes_upstream_to_client") > 0, "{line}");

    let bind_option = format!("BindAddress={CLIENT}");
    check_scp(&sshd, haproxy.port(), &["-o", &bind_option], SCP_SIZE);
    let (up, down) = scp_lines(&relay, port, "proxy");
    up.assert_closed(CLIENT.into(), "proxy", port, map, sshd.addr());
    down.assert_closed(CLIENT.into(), "proxy", port, map, sshd.addr());
    check_legacy_scp(
        &relay,
        &sshd,
        haproxy.port(),
        port,
        &["-o", &bind_option],
        3,
    );
    for line in &relay.log_lines()[..] {
        if line.is_closed_on(port) {
            line.assert_closed(CLIENT.into(), "proxy", port, map, sshd.addr());
        }
    }

    // The same port, straight from the client: nothing parsed, nothing changed.
    check_command(&sshd, port, &["-b", &bind]);
    let direct = relay.wait_log(
        |l| l.is_closed_on(port) && l.str("via") == Some("direct"),
        LOG_TIMEOUT,
    );
    direct.assert_closed(CLIENT.into(), "direct", port, map, sshd.addr());

    let lines = relay.log_lines();
    let closed: Vec<&LogLine> = lines.iter().filter(|l| l.is_closed_on(port)).collect();
    assert_eq!(
        closed.len(),
        6,
        "ssh, scp up, scp down, scp -O up and down, direct ssh: {closed:#?}"
    );
    for line in closed {
        assert_eq!(client_of(line).ip(), IpAddr::from(CLIENT), "{line}");
    }
    let rejected: Vec<&LogLine> = lines.iter().filter(|l| l.is_rejected_on(port)).collect();
    assert!(rejected.is_empty(), "nothing is rejected: {rejected:#?}");
}

data_path_test!(haproxy_send_proxy_v1);
/// HAProxy with `send-proxy` (PROXY v1 text header).
fn haproxy_send_proxy_v1(backend: Backend) {
    through_haproxy(backend, SendProxy::V1);
}

data_path_test!(haproxy_send_proxy_v2);
/// HAProxy with `send-proxy-v2` (PROXY v2 binary header).
fn haproxy_send_proxy_v2(backend: Backend) {
    through_haproxy(backend, SendProxy::V2);
}

data_path_test!(haproxy_allow_sees_real_client);
/// A port whose `allow` is 127.0.0.4 only: ssh from 127.0.0.3 through HAProxy (v1, then
/// v2) is refused, and the rejection names 127.0.0.3 with reason `acl`. Nothing reaches
/// the sshd.
fn haproxy_allow_sees_real_client(backend: Backend) {
    let sshd = Sshd::start();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, &trusted(""))
        + &map_section(port, sshd.addr(), "C.acl", &allow_line(&["127.0.0.4/32"]));
    let relay = Relay::start(&toml, backend);
    let bind = CLIENT.to_string();
    for (i, send_proxy) in [SendProxy::V1, SendProxy::V2].into_iter().enumerate() {
        let haproxy = Haproxy::start_on_free_port(port, send_proxy);
        let out = process::run(
            sshd.ssh_with(haproxy.port(), &["-b", &bind])
                .arg("echo hello"),
            Duration::from_secs(60),
        );
        assert_eq!(
            out.status.code(),
            Some(255),
            "ssh through HAProxy ({send_proxy:?}) to a port that does not allow 127.0.0.3: \
             stdout {:?}, stderr {}",
            out.stdout,
            out.stderr
        );
        assert_eq!(out.stdout, "", "{send_proxy:?}");
        let rejected = relay.wait_logs(|l| l.is_rejected_on(port), i + 1, LOG_TIMEOUT);
        assert_eq!(rejected[i].text("map"), "C.acl", "{}", rejected[i]);
    }
    let lines = relay.log_lines();
    for line in lines.iter().filter(|l| l.is_rejected_on(port)) {
        assert_rejected(line, CLIENT.into(), port, "acl");
    }
    let closed: Vec<&LogLine> = lines.iter().filter(|l| l.is_closed_on(port)).collect();
    assert!(closed.is_empty(), "nothing was relayed: {closed:#?}");
}

// ---------------------------------------------------------------------------------------
// Raw PROXY headers, from the trusted address and from others.

/// The 12-byte signature that starts every PROXY v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 header: version/command byte, family/protocol byte, then `body` (addresses
/// and TLVs), with the length field filled in.
fn v2_header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(family);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A v2 LOCAL header (a proxy's own connection, e.g. a health check): no client address.
fn v2_local() -> Vec<u8> {
    v2_header(0x0, 0x00, &[])
}

/// A v2 PROXY header for TCP over IPv6, with a TLV after the addresses.
fn v2_tcp6(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V6(src), SocketAddr::V6(dst)) = (src, dst) else {
        panic!("v2_tcp6 takes IPv6 addresses");
    };
    let mut body = Vec::new();
    body.extend_from_slice(&src.ip().octets());
    body.extend_from_slice(&dst.ip().octets());
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    // PP2_TYPE_AUTHORITY "x.test": skipped by the relay.
    body.extend_from_slice(&[0x02, 0x00, 0x06]);
    body.extend_from_slice(b"x.test");
    v2_header(0x1, 0x21, &body)
}

/// A connection from `src` that sends `bytes`, half-closes, and reads to the end.
fn send_and_read_back(src: Ipv4Addr, port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut conn = connect_from(src, port);
    conn.set_nodelay(true).unwrap();
    conn.write_all(bytes).expect("write");
    conn.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    read_to_end(&mut conn)
}

data_path_test!(trusted_proxy_without_valid_header_is_refused);
/// From the trusted address (proxy_header_timeout 2 s): plain SSH bytes, a malformed v1
/// header and a v2 LOCAL header are each refused at once (an RST within 1 s), and
/// silence once the timeout has passed; each is logged (`proxy_header`, with the proxy's
/// address) and counted; nothing reaches the upstream.
fn trusted_proxy_without_valid_header_is_refused(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(2);
    let metrics = port + 1;
    let toml = relay_section(Some(metrics), &trusted("proxy_header_timeout = \"2s\""))
        + &map_section(port, echo.addr(), "C.raw", "");
    let relay = Relay::start(&toml, backend);
    let wait_rejected = |count: usize| {
        let lines = relay.wait_logs(|l| l.is_rejected_on(port), count, LOG_TIMEOUT);
        let line = lines[count - 1].clone();
        assert_rejected(&line, PROXY_SOURCE.into(), port, "proxy_header");
        assert_eq!(line.text("map"), "C.raw", "{line}");
        line
    };

    let cases: [(&str, Vec<u8>); 3] = [
        ("no header (SSH bytes)", b"SSH-2.0-x\r\n".to_vec()),
        ("malformed v1 header", b"PROXY TCP4 1.2.3.4\r\n".to_vec()),
        ("v2 LOCAL header", v2_local()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let took = connect_expect_reset(PROXY_SOURCE, port, bytes);
        let line = wait_rejected(i + 1);
        eprintln!("{what}: refused after {took:?}: {line}");
    }

    // Silent: closed once proxy_header_timeout has passed, not long after.
    let (_, elapsed) = connect_expect_closed(PROXY_SOURCE, port, b"", Duration::from_secs(4));
    assert!(
        elapsed >= Duration::from_millis(1900),
        "a silent trusted connection was closed after {elapsed:?}, before proxy_header_timeout (2s)"
    );
    let timed_out = wait_rejected(4);
    for line in &relay.wait_logs(|l| l.is_rejected_on(port), 3, LOG_TIMEOUT) {
        assert_ne!(
            line.str("detail"),
            timed_out.str("detail"),
            "refused for its bytes, not for the timeout: {line}"
        );
    }

    wait_metric(
        metrics,
        "portrelay_connections_rejected_total",
        &[("port", &port.to_string()), ("reason", "proxy_header")],
        4.0,
    );
    assert_eq!(
        echo.accepted(),
        0,
        "no refused connection reached the upstream"
    );
    let closed: Vec<LogLine> = relay
        .log_lines()
        .into_iter()
        .filter(|l| l.is_closed_on(port))
        .collect();
    assert!(closed.is_empty(), "nothing was relayed: {closed:#?}");
}

data_path_test!(trusted_proxy_header_names_the_client);
/// From the trusted address, a v1 header and a v2 TCP6 header with a TLV, each followed by
/// payload in the same write (and a v1 header cut in two writes): the upstream gets exactly
/// the payload, and the log names the client of the header with `via="proxy"`.
fn trusted_proxy_header_names_the_client(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, &trusted("")) + &map_section(port, echo.addr(), "C.hdr", "");
    let relay = Relay::start(&toml, backend);

    let v1_client: SocketAddr = "9.9.9.9:1234".parse().unwrap();
    let payload = b"SSH-2.0-after-the-v1-header\r\n".to_vec();
    let mut bytes = b"PROXY TCP4 9.9.9.9 1.1.1.1 1234 22\r\n".to_vec();
    bytes.extend_from_slice(&payload);
    assert_eq!(send_and_read_back(PROXY_SOURCE, port, &bytes), payload);
    let line = relay.wait_log(|l| l.is_closed_on(port), LOG_TIMEOUT);
    line.assert_closed(v1_client.ip(), "proxy", port, "C.hdr", echo.addr());
    assert_eq!(client_of(&line), v1_client, "{line}");
    assert_eq!(
        line.num("bytes_client_to_upstream"),
        payload.len() as u64,
        "{line}"
    );
    assert_eq!(
        line.num("bytes_upstream_to_client"),
        payload.len() as u64,
        "{line}"
    );

    let v6_client = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7), 4242));
    let v6_dst = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 22));
    let payload = b"SSH-2.0-after-the-v2-header\r\n".to_vec();
    let mut bytes = v2_tcp6(v6_client, v6_dst);
    bytes.extend_from_slice(&payload);
    assert_eq!(send_and_read_back(PROXY_SOURCE, port, &bytes), payload);
    let line = relay.wait_logs(|l| l.is_closed_on(port), 2, LOG_TIMEOUT)[1].clone();
    line.assert_closed(v6_client.ip(), "proxy", port, "C.hdr", echo.addr());
    assert_eq!(client_of(&line), v6_client, "{line}");
    assert_eq!(
        line.num("bytes_client_to_upstream"),
        payload.len() as u64,
        "{line}"
    );

    // A header in two writes (with TCP_NODELAY, usually two segments).
    let payload = b"split".to_vec();
    let mut conn = connect_from(PROXY_SOURCE, port);
    conn.set_nodelay(true).unwrap();
    conn.write_all(b"PROXY TCP4 9.9.9.8 1.1").unwrap();
    conn.write_all(b".1.1 4321 22\r\nsplit").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut conn), payload);
    let line = relay.wait_logs(|l| l.is_closed_on(port), 3, LOG_TIMEOUT)[2].clone();
    assert_eq!(client_of(&line), "9.9.9.8:4321".parse().unwrap(), "{line}");
    assert_eq!(line.text("via"), "proxy", "{line}");
}

data_path_test!(untrusted_client_cannot_spoof);
/// From 127.0.0.1 (not a trusted proxy), PROXY v1 and v2 headers are ordinary bytes: the
/// echo upstream returns them as they were sent, and the log names 127.0.0.1,
/// `via="direct"`.
fn untrusted_client_cannot_spoof(backend: Backend) {
    let echo = Upstream::echo();
    let port = free_ports_in_a_row(1);
    let toml = relay_section(None, &trusted("")) + &map_section(port, echo.addr(), "C.spoof", "");
    let relay = Relay::start(&toml, backend);

    let headers = [
        b"PROXY TCP4 9.9.9.9 1.1.1.1 1 2\r\n".to_vec(),
        v2_tcp6(
            "[2001:db8::9]:1".parse().unwrap(),
            "[2001:db8::1]:2".parse().unwrap(),
        ),
    ];
    for (i, header) in headers.iter().enumerate() {
        assert!(
            send_and_read_back(LOCALHOST, port, header) == *header,
            "header {i}: the upstream must get the header's bytes as they were sent"
        );
        let line = relay.wait_logs(|l| l.is_closed_on(port), i + 1, LOG_TIMEOUT)[i].clone();
        line.assert_closed(LOCALHOST.into(), "direct", port, "C.spoof", echo.addr());
        assert_eq!(
            line.num("bytes_client_to_upstream"),
            header.len() as u64,
            "{line}"
        );
        assert_eq!(
            line.num("bytes_upstream_to_client"),
            header.len() as u64,
            "{line}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// SSH over TLS: `openssl s_client` as the ProxyCommand.

/// A relay with one mapping (named `map`) to the sshd and a TLS entry on the next port
/// (and metrics on the one after, when `metrics`), with a certificate from a fresh test CA.
/// Returns the relay, the CA, its tempdir, the mapped port and the TLS port.
fn tls_relay(
    sshd: &Sshd,
    backend: Backend,
    map: &str,
    metrics: bool,
) -> (Relay, TestCa, tempfile::TempDir, u16, u16) {
    let dir = tempfile::Builder::new()
        .prefix("portrelay-ca-")
        .tempdir()
        .expect("tempdir");
    let ca = TestCa::new(dir.path());
    let port = free_ports_in_a_row(3);
    let tls_port = port + 1;
    let toml = relay_section(metrics.then_some(port + 2), &trusted(""))
        + &map_section(port, sshd.addr(), map, "")
        + &format!(
            "[[tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             sni_suffix = \"{SNI_SUFFIX}\"\n",
            ca.chain.display(),
            ca.key.display()
        );
    let relay = Relay::start(&toml, backend);
    (relay, ca, dir, port, tls_port)
}

/// `-o ProxyCommand=openssl s_client …` for SNI `sni`, verifying the chain and the name.
fn proxy_command(tls_port: u16, sni: &str, ca: &Path) -> String {
    format!(
        "ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:{tls_port} -servername {sni} \
         -CAfile {} -verify_return_error -verify_hostname {sni}",
        ca.display()
    )
}

data_path_test!(tls_entry_ssh_and_scp);
/// Through the TLS entry with SNI `C-123.ssh.test` (mapping `C.123`, "." sent as "-"): an
/// ssh command and a 64 MiB scp each way; logged with `via="tls"`.
fn tls_entry_ssh_and_scp(backend: Backend) {
    let sshd = Sshd::start();
    let map = "C.123";
    let (relay, ca, _dir, port, tls_port) = tls_relay(&sshd, backend, map, false);
    let sni = format!("C-123.{SNI_SUFFIX}");
    let option = proxy_command(tls_port, &sni, &ca.ca);

    check_command(&sshd, port, &["-o", &option]);
    let line = relay.wait_log(|l| l.is_closed_on(port), LOG_TIMEOUT);
    line.assert_closed(LOCALHOST.into(), "tls", port, map, sshd.addr());
    assert!(line.num("bytes_client_to_upstream") > 0, "{line}");
    assert!(line.num("bytes_upstream_to_client") > 0, "{line}");

    check_scp(&sshd, port, &["-o", &option], SCP_SIZE);
    let (up, down) = scp_lines(&relay, port, "tls");
    up.assert_closed(LOCALHOST.into(), "tls", port, map, sshd.addr());
    down.assert_closed(LOCALHOST.into(), "tls", port, map, sshd.addr());
    check_legacy_scp(&relay, &sshd, port, port, &["-o", &option], 3);
    for line in &relay.log_lines()[..] {
        if line.is_closed_on(port) {
            line.assert_closed(LOCALHOST.into(), "tls", port, map, sshd.addr());
        }
    }

    let rejected: Vec<LogLine> = relay
        .log_lines()
        .into_iter()
        .filter(|l| l.msg() == "connection rejected")
        .collect();
    assert!(rejected.is_empty(), "nothing is rejected: {rejected:#?}");
}

data_path_test!(tls_entry_refuses_unknown_names_and_plain_ssh);
/// At the TLS entry: an unknown SNI name (through ssh's ProxyCommand) and a missing one
/// (s_client alone) get the `unrecognized_name` alert and are refused as `no_route`; plain
/// SSH bytes are closed and refused as `tls`. The metrics count both reasons on the TLS
/// port, and nothing reaches the sshd.
fn tls_entry_refuses_unknown_names_and_plain_ssh(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, ca, _dir, port, tls_port) = tls_relay(&sshd, backend, "C.123", true);
    let metrics = port + 2;

    // An unknown name: ssh fails cleanly, with s_client's error on its stderr.
    let sni = format!("nosuch.{SNI_SUFFIX}");
    let option = proxy_command(tls_port, &sni, &ca.ca);
    let out = process::run(
        sshd.ssh_with(port, &["-o", &option]).arg("echo hello"),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(255),
        "ssh with SNI {sni}: stdout {:?}, stderr {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("unrecognized name"),
        "s_client must report the unrecognized_name alert: {}",
        out.stderr
    );
    let line = relay.wait_log(|l| l.is_rejected_on(tls_port), LOG_TIMEOUT);
    assert_rejected(&line, LOCALHOST.into(), tls_port, "no_route");

    // No name at all: s_client alone fails with the same alert (112).
    let out = process::run(
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{tls_port}")])
            .arg("-noservername")
            .arg("-CAfile")
            .arg(&ca.ca),
        Duration::from_secs(30),
    );
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !out.status.success()
            && (said.contains("unrecognized name") || said.contains("alert number 112")),
        "s_client without SNI: {:?}: {said}",
        out.status
    );
    let line = relay.wait_logs(|l| l.is_rejected_on(tls_port), 2, LOG_TIMEOUT)[1].clone();
    assert_rejected(&line, LOCALHOST.into(), tls_port, "no_route");

    // Plain SSH: closed at once (within AT_ONCE); at most a TLS alert comes back, never an
    // SSH banner.
    let mut conn = connect_from(LOCALHOST, tls_port);
    let _ = conn.write_all(b"SSH-2.0-OpenSSH_9\r\n");
    let (got, _, took) = read_until_closed(&mut conn, AT_ONCE);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "plain SSH at the TLS port got {} bytes back that are no TLS alert: {:?}",
        got.len(),
        String::from_utf8_lossy(&got)
    );
    let line = relay.wait_logs(|l| l.is_rejected_on(tls_port), 3, LOG_TIMEOUT)[2].clone();
    assert_rejected(&line, LOCALHOST.into(), tls_port, "tls");
    eprintln!("plain SSH at the TLS port: closed after {took:?}");

    let tls_port_label = tls_port.to_string();
    wait_metric(
        metrics,
        "portrelay_connections_rejected_total",
        &[("port", &tls_port_label), ("reason", "no_route")],
        2.0,
    );
    wait_metric(
        metrics,
        "portrelay_connections_rejected_total",
        &[("port", &tls_port_label), ("reason", "tls")],
        1.0,
    );
    let closed: Vec<LogLine> = relay
        .log_lines()
        .into_iter()
        .filter(|l| l.msg() == "connection closed")
        .collect();
    assert!(closed.is_empty(), "nothing was relayed: {closed:#?}");
}

/// The time a TLS client has to finish its handshake (README: 10 s).
const TLS_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

data_path_test!(tls_handshake_limit);
/// At the TLS entry, a client that never sends its ClientHello and one that sends half a
/// record are each closed (an RST) once the 10 s handshake limit has passed, not long
/// after, and refused as `tls`. Both run at once.
fn tls_handshake_limit(backend: Backend) {
    let sshd = Sshd::start();
    let (relay, _ca, _dir, _port, tls_port) = tls_relay(&sshd, backend, "C.123", false);
    // A TLS handshake record header announcing 512 bytes, and 5 of them.
    let half_record = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    let cases: [(&str, &[u8]); 2] = [("silent", b""), ("half a ClientHello", &half_record)];
    let started = Instant::now();
    let ends: Vec<(&str, Closed, Duration)> = std::thread::scope(|scope| {
        let threads: Vec<_> = cases
            .iter()
            .map(|(what, bytes)| {
                scope.spawn(move || {
                    let (closed, took) = connect_expect_closed(
                        LOCALHOST,
                        tls_port,
                        bytes,
                        TLS_HANDSHAKE_LIMIT + Duration::from_secs(3),
                    );
                    (*what, closed, took)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (what, closed, took) in ends {
        assert!(
            took >= TLS_HANDSHAKE_LIMIT - Duration::from_millis(200),
            "{what}: closed after {took:?}, before the handshake limit ({TLS_HANDSHAKE_LIMIT:?})"
        );
        assert_eq!(closed, Closed::Reset, "{what}: closed after {took:?}");
        eprintln!("{what}: reset after {took:?}");
    }
    let lines = relay.wait_logs(|l| l.is_rejected_on(tls_port), 2, LOG_TIMEOUT);
    for line in &lines {
        assert_rejected(line, LOCALHOST.into(), tls_port, "tls");
    }
    assert!(started.elapsed() < TLS_HANDSHAKE_LIMIT + Duration::from_secs(4));
}
