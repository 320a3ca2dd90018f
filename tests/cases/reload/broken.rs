//! A broken file (syntax error, duplicate port) keeps what runs, is logged as
//! `FILE:LINE:COL: message` and counted, and does not use up a generation.

#[allow(unused_imports)]
use super::*;

/// A relay with metrics and one mapping (to upstream `one`), and a live connection on it;
/// `broken` rewrites the file so that it fails to load, and returns where the failure must
/// be reported (1-based line, and column if it is certain) and a word its message holds. Checks that every error is logged as FILE:LINE:COL (one
/// at `broken`'s line), that the generation stays, the old mapping serves (the live
/// connection and new ones), and the failures are counted; then a good rewrite gets
/// generation 2.
fn broken_rewrite(
    backend: Backend,
    broken: impl Fn(&mut Relay, &str, u16) -> (u64, Option<u64>, String),
    failures: u64,
) {
    let one = named_echo("one");
    let two = named_echo("two");
    let base = free_ports_in_a_row(3);
    let (port, port_two, metrics) = (base, base + 1, base + 2);
    let good = relay_section(Some(metrics), "") + &map_section(port, one.addr(), "one", "");
    let mut relay = Relay::start(&good, backend);
    let (mut live, _) = connect_named(port);
    roundtrip(&mut live, b"before the broken rewrite");

    let want = broken(&mut relay, &good, port);
    let fails = relay.wait_logs(is_reload_failed, failures as usize, RELOAD_TIMEOUT);
    for fail in &fails {
        assert_eq!(fail.u64("generation"), Some(1), "{fail}");
    }
    let file = relay.config_path().display().to_string();
    let errors = control_file_errors(&relay);
    assert!(!errors.is_empty(), "no `control file error` line");
    for e in &errors {
        let (_, _, message) = split_error(e, &file);
        assert!(!message.is_empty(), "empty message: {e}");
    }
    let (want_line, want_col, says) = want;
    assert!(
        errors.iter().any(|e| {
            let (line, col, message) = split_error(e, &file);
            line == want_line && want_col.map_or(true, |c| c == col) && message.contains(&says)
        }),
        "no error at line {want_line}, column {want_col:?} saying {says:?}: {errors:?}"
    );
    assert_eq!(
        relay.generation(),
        1,
        "a failed reload changed the generation"
    );

    roundtrip(&mut live, b"the live connection is untouched");
    assert_serves(port, "one");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "failure")]),
        Some(failures as f64),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "success")])
            .unwrap_or(0.0),
        0.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_config_generation", &[]),
        Some(1.0),
        "{}",
        s.text
    );
    assert_eq!(s.get("portrelay_mappings", &[]), Some(1.0), "{}", s.text);

    // A good file next: the next generation, applied.
    relay.rewrite(&(good + &map_section(port_two, two.addr(), "two", "")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 2, "{line}");
    assert_serves(port_two, "two");
    assert_serves(port, "one");
    roundtrip(&mut live, b"still untouched");
    let s = Scrape::take(metrics);
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "success")]),
        Some(1.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_reloads_total", &[("result", "failure")]),
        Some(failures as f64),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("portrelay_config_generation", &[]),
        Some(2.0),
        "{}",
        s.text
    );
    assert_eq!(s.get("portrelay_mappings", &[]), Some(2.0), "{}", s.text);
}

data_path_test!(broken_rewrite_syntax);
/// A rewrite (by rename) with a TOML syntax error: nothing changes; see [`broken_rewrite`].
fn broken_rewrite_syntax(backend: Backend) {
    broken_rewrite(
        backend,
        |relay, good, _| {
            let broken = format!("{good}[[map]\nport = 1\n");
            relay.rewrite(&broken);
            let line = line_number(&broken, 0, |l| l == "[[map]");
            (line, None, "syntax".to_string())
        },
        1,
    );
}

data_path_test!(broken_rewrite_duplicate_port);
/// A rewrite (in place) that maps the same port twice, then a SIGHUP that reads it again:
/// two failures, nothing changes; see [`broken_rewrite`].
fn broken_rewrite_duplicate_port(backend: Backend) {
    broken_rewrite(
        backend,
        |relay, good, port| {
            let other = named_echo("duplicate");
            let broken = format!(
                "{good} {}",
                map_section(port, other.addr(), "duplicate", "")
            );
            relay.rewrite_in_place(&broken);
            relay.wait_logs(is_reload_failed, 1, RELOAD_TIMEOUT);
            relay.sighup();
            let first = line_number(&broken, 0, |l| l == format!("port = {port}"));
            let second = line_number(&broken, first as usize, |l| l == format!("port = {port}"));
            // At the second mapping's port value ("port = " is 7 characters).
            (second, Some(8), port.to_string())
        },
        2,
    );
}
