//! A retargeted port reaches the new upstream for new connections without refusing any
//! meanwhile; old connections follow `removed_mapping`.

#[allow(unused_imports)]
use super::*;

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
