//! A port held by another program is reported, the rest of the file applies, and a later
//! reload opens it.

#[allow(unused_imports)]
use super::*;

data_path_test!(port_in_use_reported);
/// A rewrite that adds a port another program listens on, and another new port: the busy
/// one is logged (`cannot listen`, with the port) and counted in the `reloaded` line, the
/// other new one serves; once the port is free, a SIGHUP opens it.
fn port_in_use_reported(backend: Backend) {
    let ups: Vec<Upstream> = ["old", "busy", "new"]
        .iter()
        .map(|n| named_echo(n))
        .collect();
    let base = free_ports_in_a_row(3);
    let (p_old, p_busy, p_new) = (base, base + 1, base + 2);
    let holder = TcpListener::bind((LOCALHOST, p_busy)).expect("bind the port to hold");
    let h = relay_section(None, "");
    let mut relay = Relay::start(
        &(h.clone() + &map_section(p_old, ups[0].addr(), "old", "")),
        backend,
    );

    relay.rewrite(
        &(h + &map_section(p_old, ups[0].addr(), "old", "")
            + &map_section(p_busy, ups[1].addr(), "busy", "")
            + &map_section(p_new, ups[2].addr(), "new", "")),
    );
    let line = relay.wait_reloaded(2, RELOAD_TIMEOUT);
    assert_eq!(line.num("listen_failures"), 1, "{line}");
    assert_eq!(line.num("mappings"), 3, "{line}");
    let busy = format!("127.0.0.1:{p_busy}");
    let cannot = relay.wait_log(
        |l| l.msg().starts_with("cannot listen") && l.raw.contains(&busy),
        Duration::from_secs(1),
    );
    assert_eq!(cannot.str("listen"), Some(busy.as_str()), "{cannot}");
    assert_serves(p_new, "new");
    assert_serves(p_old, "old");

    drop(holder);
    relay.sighup();
    let line = relay.wait_reloaded(3, RELOAD_TIMEOUT);
    assert_eq!(line.num("listen_failures"), 0, "{line}");
    assert_serves(p_busy, "busy");
    assert_serves(p_new, "new");
    assert_serves(p_old, "old");
}
