//! `source = "client"`: the instance's sshd sees the real client's address, in network
//! namespaces the test makes (client, host, instance: see `util::netns`), with the relay in
//! the host namespace and `scripts/transparent-routing up` run there; and the fallbacks to
//! the relay's address (a loopback client, one of the other family, one local to the host,
//! a relay without the capability), counted exactly. Also the routing script itself.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::util::files::{assert_same_file, random_file};
use crate::util::metrics::{wait_metric, Scrape};
use crate::util::net::free_port;
use crate::util::netns::{
    self, addr, Lab, Netns, CLIENT_V4, CLIENT_V6, HOST_CLIENT_SIDE_V4, HOST_CLIENT_SIDE_V6,
    HOST_INSTANCE_SIDE_V4, INSTANCE_V4, INSTANCE_V6,
};
use crate::util::process;
use crate::util::relay::{data_path_test, map_section, relay_section, Start};
use crate::util::{poll, Backend, Relay, Sshd};

const FALLBACKS: &str = "portrelay_transparent_fallbacks_total";
const REASONS: [&str; 5] = ["loopback", "family", "local", "permission", "bind"];
const MAP: &str = "C.transparent";

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/transparent-routing")
        .display()
        .to_string()
}

/// A lab with the real sshd in its instance namespace (172.31.0.2:22).
struct Setup {
    lab: Lab,
    sshd: Sshd,
}

fn setup(routing: bool) -> Setup {
    let mut s = setup_unlaunched(routing);
    let (lab, sshd) = (&s.lab, &mut s.sshd);
    lab.instance.enter(|| sshd.launch());
    s
}

/// [`setup`] with sshd prepared but not started (an instance still booting).
fn setup_unlaunched(routing: bool) -> Setup {
    let lab = Lab::new();
    if routing {
        lab.host.run(&[&script(), "up"]);
    }
    let sshd = Sshd::prepare_at(SocketAddr::new(addr(INSTANCE_V4), 22));
    Setup { lab, sshd }
}

/// The relay in the host namespace, listening on every address there, with one mapping
/// `MAP` (`source = "client"`) from a port to the instance's sshd. Its port and metrics port.
fn start_relay(s: &Setup, backend: Backend, how: Start) -> (Relay, u16, u16) {
    start_relay_with(s, backend, how, "", "")
}

/// [`start_relay`] with `relay` lines in `[relay]` and `extra` lines in the mapping.
fn start_relay_with(
    s: &Setup,
    backend: Backend,
    how: Start,
    relay: &str,
    extra: &str,
) -> (Relay, u16, u16) {
    let (port, metrics) = (free_port(), free_port());
    let extra = format!("source = \"client\"\n{extra}");
    let toml = relay_section(Some(metrics), relay)
        .replace("bind = [\"127.0.0.1\"]", "bind = [\"0.0.0.0\", \"::\"]")
        + &map_section(port, s.sshd.addr(), MAP, &extra);
    let relay = s.lab.host.enter(|| Relay::start_with(&toml, backend, how));
    (relay, port, metrics)
}

/// `echo $SSH_CLIENT` over ssh from `ns` to the relay at `host`:`port`: what sshd saw.
fn ssh_client(s: &Setup, ns: &Netns, host: IpAddr, port: u16) -> String {
    let out = ns.enter(|| {
        process::run(
            s.sshd.ssh_at(host, port).arg("echo $SSH_CLIENT"),
            Duration::from_secs(60),
        )
    });
    assert!(
        out.status.success(),
        "ssh to {host}:{port} failed ({}): {}\nsshd log:\n{}",
        out.status,
        out.stderr,
        s.sshd.log()
    );
    out.stdout.trim().to_string()
}

/// Each fallback reason's count for `MAP`, scraped in the host namespace.
fn fallbacks(s: &Setup, metrics: u16) -> Vec<(&'static str, f64)> {
    let scrape = s.lab.host.enter(|| Scrape::take(metrics));
    REASONS
        .iter()
        .map(|r| (*r, scrape.value(FALLBACKS, &[("map", MAP), ("reason", r)])))
        .collect()
}

fn counts(only: &[(&'static str, f64)]) -> Vec<(&'static str, f64)> {
    REASONS
        .iter()
        .map(|r| {
            let n = only.iter().find(|(o, _)| o == r).map_or(0.0, |(_, n)| *n);
            (*r, n)
        })
        .collect()
}

/// The reasons of the relay's fallback log lines, in order.
fn fallback_logs(relay: &Relay) -> Vec<String> {
    relay
        .log_lines()
        .into_iter()
        .filter(|l| l.msg().contains("falls back to the relay's address"))
        .map(|l| l.str("reason").unwrap_or("").to_string())
        .collect()
}

/// With the host routing up, ssh from the client namespace reaches sshd from the client's
/// own address and port, and a 64 MiB scp arrives intact; nothing falls back.
fn sshd_sees_the_client(backend: Backend) {
    if !netns::available("transparent::sshd_sees_the_client") {
        return;
    }
    let s = setup(true);
    let (relay, port, metrics) = start_relay(&s, backend, Start::default());
    assert_eq!(fallbacks(&s, metrics), counts(&[]), "series exist at 0");

    let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V4), port);
    let fields: Vec<&str> = seen.split(' ').collect();
    assert_eq!(fields.len(), 3, "SSH_CLIENT = {seen:?}");
    assert_eq!(fields[0], CLIENT_V4, "sshd saw {seen:?}");
    assert_eq!(fields[2], "22", "SSH_CLIENT = {seen:?}");
    assert!(
        s.sshd
            .log()
            .contains(&format!("from {CLIENT_V4} port {}", fields[1])),
        "sshd logs the client's address and port:\n{}",
        s.sshd.log()
    );
    // The port sshd saw is the client's own (the relay logs the client with its port).
    let client = format!("{CLIENT_V4}:{}", fields[1]);
    relay.wait_log(
        |l| l.msg() == "connection closed" && l.str("client") == Some(client.as_str()),
        Duration::from_secs(10),
    );

    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("64m.bin");
    random_file(&original, 64 << 20);
    let copy = s.sshd.dir().join("64m.copy");
    let remote = format!("root@{HOST_CLIENT_SIDE_V4}:{}", copy.display());
    let out = s.lab.client.enter(|| {
        process::run(
            s.sshd.scp(port).arg(&original).arg(&remote),
            Duration::from_secs(120),
        )
    });
    assert!(out.status.success(), "scp failed: {}", out.stderr);
    assert_same_file(&copy, &original);

    assert_eq!(fallbacks(&s, metrics), counts(&[]));
    assert!(fallback_logs(&relay).is_empty(), "{:?}", relay.logs());
}
data_path_test!(sshd_sees_the_client);

/// The same over IPv6: a client at fd00:10::2 reaches an sshd at [fd00:31::2]:22 from its
/// own address.
fn sshd_sees_the_ipv6_client(backend: Backend) {
    if !netns::available("transparent::sshd_sees_the_ipv6_client") {
        return;
    }
    let lab = Lab::new();
    lab.host.run(&[&script(), "up"]);
    let mut sshd = Sshd::prepare_at(SocketAddr::new(addr(INSTANCE_V6), 22));
    lab.instance.enter(|| sshd.launch());
    let s = Setup { lab, sshd };
    let (_relay, port, metrics) = start_relay(&s, backend, Start::default());
    let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V6), port);
    assert!(
        seen.starts_with(&format!("{CLIENT_V6} ")),
        "sshd saw {seen:?}"
    );
    assert_eq!(fallbacks(&s, metrics), counts(&[]));
}
data_path_test!(sshd_sees_the_ipv6_client);

/// A reload that turns `source = "client"` on applies to the next connection, and its
/// fallback series appear (at 0).
fn a_reload_turns_the_client_source_on(backend: Backend) {
    if !netns::available("transparent::a_reload_turns_the_client_source_on") {
        return;
    }
    let s = setup(true);
    let (port, metrics) = (free_port(), free_port());
    let file = |source: &str| {
        relay_section(Some(metrics), "").replace("bind = [\"127.0.0.1\"]", "bind = [\"0.0.0.0\"]")
            + &map_section(
                port,
                s.sshd.addr(),
                MAP,
                &format!("source = \"{source}\"\n"),
            )
    };
    let relay = s.lab.host.enter(|| Relay::start(&file("relay"), backend));
    let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V4), port);
    assert!(
        seen.starts_with(&format!("{HOST_INSTANCE_SIDE_V4} ")),
        "sshd saw {seen:?}"
    );
    let scrape = s.lab.host.enter(|| Scrape::take(metrics));
    assert_eq!(scrape.sum(FALLBACKS, &[]), 0.0);
    assert!(
        scrape.matching(FALLBACKS, &[]).next().is_none(),
        "no series for source = relay"
    );

    relay.rewrite(&file("client"));
    relay.wait_reloaded(2, Duration::from_secs(10));
    let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V4), port);
    assert!(
        seen.starts_with(&format!("{CLIENT_V4} ")),
        "sshd saw {seen:?}"
    );
    assert_eq!(fallbacks(&s, metrics), counts(&[]));
}
data_path_test!(a_reload_turns_the_client_source_on);

/// A held connection (its instance still booting) makes a new upstream socket for each
/// attempt: each binds the client's address too.
fn a_held_connection_connects_from_the_client(backend: Backend) {
    if !netns::available("transparent::a_held_connection_connects_from_the_client") {
        return;
    }
    let s = setup_unlaunched(true);
    let (_relay, port, metrics) =
        start_relay_with(&s, backend, Start::default(), "", "hold = \"30s\"\n");
    // ssh's ConnectTimeout (10 s) bounds its wait for the banner.
    let ssh = s.lab.client.enter(|| {
        s.sshd
            .ssh_at(addr(HOST_CLIENT_SIDE_V4), port)
            .arg("echo $SSH_CLIENT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ssh")
    });
    // The first connect was refused: the connection is held, retrying.
    s.lab
        .host
        .enter(|| wait_metric(metrics, "portrelay_connections_held", &[("map", MAP)], 1.0));
    let Setup { lab, mut sshd } = s;
    lab.instance.enter(|| sshd.launch());
    let out = ssh.wait_with_output().expect("ssh output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "ssh: {stderr}");
    assert!(
        stdout.starts_with(&format!("{CLIENT_V4} ")),
        "sshd saw {stdout:?}\n{}",
        sshd.log()
    );
    let scrape = lab.host.enter(|| Scrape::take(metrics));
    for r in REASONS {
        assert_eq!(
            scrape.value(FALLBACKS, &[("map", MAP), ("reason", r)]),
            0.0,
            "{r}"
        );
    }
}
data_path_test!(a_held_connection_connects_from_the_client);

/// Without the host routing the instance's answers go past the relay: the transparent
/// connect times out (`connect_timeout`, 1 s here) and fails like any connect, counted as
/// `timeout`, and the relay says once what is likely missing. Nothing falls back.
fn without_the_routing_the_connect_times_out(backend: Backend) {
    if !netns::available("transparent::without_the_routing_the_connect_times_out") {
        return;
    }
    let s = setup(false);
    let (relay, port, metrics) = start_relay(&s, backend, Start::default());
    let out = s.lab.client.enter(|| {
        process::run(
            s.sshd
                .ssh_at(addr(HOST_CLIENT_SIDE_V4), port)
                .arg("echo $SSH_CLIENT"),
            Duration::from_secs(60),
        )
    });
    assert!(!out.status.success(), "ssh got through: {}", out.stdout);
    let hint = relay.wait_log(
        |l| {
            l.msg()
                .contains("an upstream connect from the client's address timed out")
        },
        Duration::from_secs(10),
    );
    assert_eq!(hint.str("map"), Some(MAP), "{hint}");
    let failures = s.lab.host.enter(|| {
        wait_metric(
            metrics,
            "portrelay_upstream_connect_failures_total",
            &[("map", MAP), ("reason", "timeout")],
            1.0,
        )
    });
    assert_eq!(
        failures.sum("portrelay_upstream_connect_failures_total", &[("map", MAP)]),
        1.0
    );
    assert_eq!(fallbacks(&s, metrics), counts(&[]));
}
data_path_test!(without_the_routing_the_connect_times_out);

/// Behind a trusted proxy the source is the address in its PROXY header (here one that no
/// link of the host has: the routing delivers the answers all the same).
fn a_proxied_client_is_the_source(backend: Backend) {
    if !netns::available("transparent::a_proxied_client_is_the_source") {
        return;
    }
    let s = setup(true);
    let trusted = format!("trusted_proxies = [\"{CLIENT_V4}/32\"]");
    let (_relay, port, metrics) = start_relay_with(&s, backend, Start::default(), &trusted, "");
    let banner = s.lab.client.enter(|| {
        let mut conn = TcpStream::connect((addr(HOST_CLIENT_SIDE_V4), port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            conn,
            "PROXY TCP4 198.51.100.7 {HOST_CLIENT_SIDE_V4} 40000 {port}\r\n"
        )
        .unwrap();
        let mut banner = String::new();
        BufReader::new(conn)
            .read_line(&mut banner)
            .expect("sshd's banner");
        banner
    });
    assert!(banner.starts_with("SSH-2.0-"), "{banner:?}");
    let seen = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        s.sshd
            .log()
            .contains("Connection from 198.51.100.7 port 40000 on 172.31.0.2 port 22")
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "sshd saw the PROXY header's client:\n{}",
        s.sshd.log()
    );
    assert_eq!(fallbacks(&s, metrics), counts(&[]));
}
data_path_test!(a_proxied_client_is_the_source);

/// A loopback client, an IPv6 client of the IPv4 instance and a client on the host's own
/// address connect from the relay's address, each counted under its reason and logged
/// once per reason.
fn clients_that_cannot_be_the_source_fall_back(backend: Backend) {
    if !netns::available("transparent::clients_that_cannot_be_the_source_fall_back") {
        return;
    }
    let s = setup(true);
    let (relay, port, metrics) = start_relay(&s, backend, Start::default());
    let relay_side = |seen: &str| seen.starts_with(&format!("{HOST_INSTANCE_SIDE_V4} "));

    for _ in 0..2 {
        let seen = ssh_client(&s, &s.lab.host, addr("127.0.0.1"), port);
        assert!(relay_side(&seen), "loopback: sshd saw {seen:?}");
    }
    let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V6), port);
    assert!(relay_side(&seen), "IPv6 client: sshd saw {seen:?}");
    let seen = ssh_client(&s, &s.lab.host, addr(HOST_CLIENT_SIDE_V4), port);
    assert!(relay_side(&seen), "host's own address: sshd saw {seen:?}");

    assert_eq!(
        fallbacks(&s, metrics),
        counts(&[("loopback", 2.0), ("family", 1.0), ("local", 1.0)])
    );
    let logs = fallback_logs(&relay);
    assert_eq!(logs, ["loopback", "family", "local"], "one line per reason");
}
data_path_test!(clients_that_cannot_be_the_source_fall_back);

/// A relay without CAP_NET_ADMIN and CAP_NET_RAW says so at start, and its connections
/// connect from its own address, counted as `permission`.
fn without_the_capability_connections_fall_back(backend: Backend) {
    if !netns::available("transparent::without_the_capability_connections_fall_back") {
        return;
    }
    let s = setup(true);
    let drop_caps = Start {
        wrapper: [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-net_admin,-net_raw",
            "--",
        ]
        .map(String::from)
        .to_vec(),
        ..Start::default()
    };
    let (relay, port, metrics) = start_relay(&s, backend, drop_caps);
    assert!(
        relay.logs().iter().any(|l| l.contains(
            "source = client needs CAP_NET_ADMIN or CAP_NET_RAW; connections fall back to the relay's address"
        )),
        "the start-up probe warns: {:?}",
        relay.logs()
    );
    for _ in 0..2 {
        let seen = ssh_client(&s, &s.lab.client, addr(HOST_CLIENT_SIDE_V4), port);
        assert!(
            seen.starts_with(&format!("{HOST_INSTANCE_SIDE_V4} ")),
            "sshd saw {seen:?}"
        );
    }
    assert_eq!(fallbacks(&s, metrics), counts(&[("permission", 2.0)]));
    assert_eq!(fallback_logs(&relay), ["permission"], "{:?}", relay.logs());
}
data_path_test!(without_the_capability_connections_fall_back);

/// `scripts/transparent-routing`: `status` fails until `up`; `up` twice installs one table,
/// one rule and one route per family; `down` leaves nothing; `--mark`/`--table` and the
/// environment choose the mark and the table.
#[test]
fn routing_script_up_status_down() {
    if !netns::available("transparent::routing_script_up_status_down") {
        return;
    }
    let ns = Netns::new("routing");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = ns.command(&[&script()]);
        cmd.args(args).envs(env.iter().copied());
        process::run(&mut cmd, Duration::from_secs(30))
    };
    let shown = |argv: &[&str]| -> String {
        let out = process::run(&mut ns.command(argv), Duration::from_secs(30));
        out.stdout + &out.stderr
    };
    let rules = |mark: &str, table: &str| -> usize {
        ["-4", "-6"]
            .iter()
            .map(|f| {
                shown(&["ip", f, "rule", "show"])
                    .lines()
                    .filter(|l| l.contains(&format!("fwmark {mark} lookup {table}")))
                    .count()
            })
            .sum()
    };
    let routes = |table: &str| -> usize {
        ["-4", "-6"]
            .iter()
            .map(|f| {
                shown(&["ip", f, "route", "show", "table", table])
                    .lines()
                    .filter(|l| l.starts_with("local default dev lo"))
                    .count()
            })
            .sum()
    };
    let table_listed = || {
        process::run(
            &mut ns.command(&["nft", "list", "table", "inet", "portrelay_tproxy"]),
            Duration::from_secs(30),
        )
    };
    let rules_before = shown(&["ip", "rule", "show"]) + &shown(&["ip", "-6", "rule", "show"]);

    let status = run(&["status"], &[]);
    assert_eq!(status.status.code(), Some(3), "{}", status.stdout);
    assert!(
        status.stdout.contains("not (fully) up"),
        "{}",
        status.stdout
    );

    for _ in 0..2 {
        let up = run(&["up"], &[]);
        assert!(up.status.success(), "up: {}", up.stderr);
    }
    let listed = table_listed();
    assert!(listed.status.success(), "{}", listed.stderr);
    assert!(
        listed
            .stdout
            .contains("socket transparent 1 meta mark set 0x00000001"),
        "{}",
        listed.stdout
    );
    assert_eq!(rules("0x1", "100"), 2, "one rule per family");
    assert_eq!(routes("100"), 2, "one route per family");
    let status = run(&["status"], &[]);
    assert!(status.status.success(), "{}", status.stdout);
    assert!(
        status.stdout.contains("transparent routing: up"),
        "{}",
        status.stdout
    );

    let down = run(&["down"], &[]);
    assert!(down.status.success(), "down: {}", down.stderr);
    assert!(
        !table_listed().status.success(),
        "down deletes the nft table"
    );
    assert_eq!(rules("0x1", "100"), 0);
    assert_eq!(routes("100"), 0);
    let rules_after = shown(&["ip", "rule", "show"]) + &shown(&["ip", "-6", "rule", "show"]);
    assert_eq!(
        rules_after, rules_before,
        "down leaves the rules as they were"
    );
    assert!(
        run(&["down"], &[]).status.success(),
        "down again is a no-op"
    );

    // Another mark and table, by flag and by the environment.
    let up = run(
        &["--mark", "0x2a", "up"],
        &[("PORTRELAY_TPROXY_TABLE", "142")],
    );
    assert!(up.status.success(), "up: {}", up.stderr);
    assert_eq!(rules("0x2a", "142"), 2);
    assert_eq!(routes("142"), 2);
    assert!(table_listed().stdout.contains("meta mark set 0x0000002a"));
    let down = run(&["down", "--table=142"], &[("PORTRELAY_TPROXY_MARK", "42")]);
    assert!(down.status.success(), "down: {}", down.stderr);
    assert_eq!(rules("0x2a", "142"), 0);
    assert_eq!(routes("142"), 0);
    assert!(!table_listed().status.success());

    for bad in [
        &["sideways"][..],
        &[][..],
        &["--mark", "0", "up"][..],
        &["--table", "254", "up"][..],
    ] {
        let out = run(bad, &[]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("usage:") || out.stderr.contains("must be"),
            "{bad:?}: {}",
            out.stderr
        );
    }
}
