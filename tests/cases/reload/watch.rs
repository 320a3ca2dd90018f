//! The watch sees both a rename over the file and an in-place rewrite, and a burst of
//! renames ends with the last file in force.

#[allow(unused_imports)]
use super::*;

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
