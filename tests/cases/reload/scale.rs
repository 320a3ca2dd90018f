//! The time to apply one change in a file of 10,000 mappings, and the echo round-trip times
//! of another mapping meanwhile.

#[allow(unused_imports)]
use super::*;

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
