//! A removed mapping stops accepting; its live connection follows `removed_mapping`
//! (`close`: ends at once, logged with reason `reload`; `keep`: runs on), also after a rename.

#[allow(unused_imports)]
use super::*;

/// A relay with mappings `gone` and `stays` (each to an upstream of that name) and the
/// given `removed_mapping`; a live connection on each; then a rewrite without `gone`.
/// Checks that `gone` refuses new connections and `stays` is untouched, and returns the
/// relay, the live connection of `gone`, its port and its upstream.
fn remove_one(policy: &str, backend: Backend) -> (Relay, TcpStream, u16, Upstream) {
    let gone = named_echo("gone");
    let stays = named_echo("stays");
    let base = free_ports_in_a_row(2);
    let (p_gone, p_stays) = (base, base + 1);
    let h = relay_section(None, &format!("removed_mapping = \"{policy}\""));
    let both = h.clone()
        + &map_section(p_gone, gone.addr(), "gone", "")
        + &map_section(p_stays, stays.addr(), "stays", "");
    let relay = Relay::start(&both, backend);
    let (mut live, name) = connect_named(p_gone);
    assert_eq!(name, "gone");
    roundtrip(&mut live, b"before the reload");
    let (mut other, name) = connect_named(p_stays);
    assert_eq!(name, "stays");
    roundtrip(&mut other, b"before the reload");

    relay.rewrite(&(h + &map_section(p_stays, stays.addr(), "stays", "")));
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("mappings"), 1, "{line}");
    assert_eq!(line.num("changed_ports"), 1, "{line}");
    assert_refused(p_gone);
    roundtrip(
        &mut other,
        b"the other mapping's live connection is untouched",
    );
    assert_serves(p_stays, "stays");
    drop(other);
    (relay, live, p_gone, gone)
}

data_path_test!(removed_mapping_close);
/// `removed_mapping = "close"`: after a rewrite without the mapping its port refuses new
/// connections, its live connection ends within seconds (logged with reason `reload`), and
/// the relay closes the upstream side too.
fn removed_mapping_close(backend: Backend) {
    let (relay, mut live, port, upstream) = remove_one("close", backend);
    let (_, took) = expect_closed(&mut live, CLOSE_WITHIN);
    let line = relay.wait_log(|l| l.is_closed_on(port), CLOSE_WITHIN);
    assert_eq!(line.reason(), "reload", "{line}");
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
    let upstream_closed = poll(CLOSE_WITHIN, Duration::from_millis(10), || {
        (upstream.active() == 0).then_some(())
    });
    assert!(
        upstream_closed.is_some(),
        "the upstream side of the closed connection is still open"
    );
    eprintln!("the live connection of the removed mapping ended {took:?} after the reload");
}

data_path_test!(removed_mapping_keep);
/// `removed_mapping = "keep"`: after a rewrite without the mapping its port refuses new
/// connections, but its live connection keeps relaying until the client closes it.
fn removed_mapping_keep(backend: Backend) {
    let (relay, mut live, port, upstream) = remove_one("keep", backend);
    for i in 0..3 {
        roundtrip(&mut live, format!("after the reload, #{i}").as_bytes());
    }
    assert_eq!(upstream.active(), 1, "the kept connection's upstream side");
    assert!(
        !relay.log_lines().iter().any(|l| l.is_closed_on(port)),
        "the kept connection was logged as closed while it runs"
    );
    live.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "{} bytes after the last echo", rest.len());
    let line = relay.wait_log(|l| l.is_closed_on(port), CLOSE_WITHIN);
    assert!(
        ["client_eof", "upstream_eof"].contains(&line.reason()),
        "the kept connection ended by the client: {line}"
    );
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
}

data_path_test!(removed_after_rename_closes);
/// `removed_mapping = "close"`, with a reload in between that only renames the mapping
/// (which leaves its live connection alone): removing the mapping afterwards still ends
/// the connection that was accepted before the rename.
fn removed_after_rename_closes(backend: Backend) {
    close_after_rename(backend, false);
}

data_path_test!(retargeted_after_rename_closes);
/// `removed_mapping = "close"`, with a reload in between that only renames the mapping:
/// giving its port a new upstream afterwards still ends the connection that was accepted
/// before the rename.
fn retargeted_after_rename_closes(backend: Backend) {
    close_after_rename(backend, true);
}

/// A live connection on a mapping; a reload renames the mapping (the connection runs on);
/// a second reload removes the mapping, or gives its port a new upstream (`retarget`):
/// with `removed_mapping = "close"` the connection must end.
fn close_after_rename(backend: Backend, retarget: bool) {
    let upstream = named_echo("first");
    let second = named_echo("second");
    let stays = named_echo("stays");
    let base = free_ports_in_a_row(2);
    let (port, p_stays) = (base, base + 1);
    let h = relay_section(None, "removed_mapping = \"close\"");
    let keep = map_section(p_stays, stays.addr(), "stays", "");
    let relay = Relay::start(
        &(h.clone() + &map_section(port, upstream.addr(), "before", "") + &keep),
        backend,
    );
    let (mut live, _) = connect_named(port);
    roundtrip(&mut live, b"before the rename");

    relay.rewrite(&(h.clone() + &map_section(port, upstream.addr(), "after", "") + &keep));
    relay.wait_reloaded(2, RELOAD_TIMEOUT);
    roundtrip(&mut live, b"a rename leaves the live connection alone");
    assert_serves(port, "first");

    if retarget {
        relay.rewrite(&(h + &map_section(port, second.addr(), "after", "") + &keep));
        relay.wait_reloaded(3, RELOAD_TIMEOUT);
        assert_serves(port, "second");
    } else {
        relay.rewrite(&(h + &keep));
        relay.wait_reloaded(3, RELOAD_TIMEOUT);
        assert_refused(port);
    }
    // removed_mapping = "close", a connection accepted before a rename, then the port
    // retargeted or removed: it ends.
    expect_closed(&mut live, CLOSE_WITHIN);
    let line = relay.wait_log(
        |l| l.is_closed_on(port) && l.reason() == "reload",
        CLOSE_WITHIN,
    );
    assert_eq!(line.text("upstream"), upstream.addr().to_string(), "{line}");
}
