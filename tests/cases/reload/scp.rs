//! An scp of 256 MiB through one mapping survives 50 reloads that rename it, change its
//! `allow` and add and remove other mappings (SIGHUP and watched renames, alternately).

#[allow(unused_imports)]
use super::*;

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
