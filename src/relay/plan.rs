//! What applying a control file does, decided apart from doing it: a pure function of what
//! runs ([`Running`]) and the new file, giving a [`Plan`] that [`super::Relay::apply`]
//! carries out (binds, commands to the loops). No socket, no route object, no clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::addr::UpstreamAddr;
use crate::control::diff::{self, PortChange};
use crate::control::{Config, RemovedMapping};

/// What runs when a file is applied.
#[derive(Clone, Debug, Default)]
pub struct Running<'a> {
    /// The file in force; `None` before the first.
    pub config: Option<&'a Config>,
    /// Listeners the loops accept on.
    pub listening: BTreeSet<SocketAddr>,
    /// Listening sockets handed over by the process before this one (a live upgrade) that
    /// no loop accepts on yet: a wanted one is taken instead of bound, the others closed.
    pub inherited: BTreeSet<SocketAddr>,
    /// The upstream of each host port's route in force.
    pub routes: BTreeMap<u16, UpstreamAddr>,
    /// `pipe_size` and `max_pipes` the pools were made with.
    pub pipes: (u32, u32),
}

/// Where a listener's new connections go, by the file's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntranceKind {
    /// The route of this host port.
    Mapped(u16),
    /// The `[[tls]]` entry at this index of the file.
    Tls(usize),
    /// The `[[ws]]` entry at this index of the file.
    Ws(usize),
}

/// Where the socket of a listener to open comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    Bind,
    Inherited,
}

/// A listener to open: the loops start accepting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    pub addr: SocketAddr,
    pub entrance: EntranceKind,
    pub socket: Socket,
}

/// A host port's route under the new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteStep {
    /// The port does not change: its route in force stays (the same object).
    Keep,
    /// A new route to `upstream` for the file's mapping at index `mapping`. All ports of a
    /// mapping share one mapping state; `carry` says it takes over the live-connection
    /// count of the route in force at the mapping's first port (an updated mapping's cap
    /// still counts the connections it has).
    Build {
        upstream: UpstreamAddr,
        mapping: usize,
        carry: bool,
    },
}

/// Exactly what applying a file does. Lists are in address (or port) order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ports whose handling changes (opened, closed, retargeted, updated).
    pub changed_ports: usize,
    /// The route of every host port of the new file.
    pub routes: BTreeMap<u16, RouteStep>,
    /// Listeners to open (a listener that could not be opened before is here again).
    pub open: Vec<Open>,
    /// Open listeners whose new connections take a new entrance (a retargeted or updated
    /// port's new route, a TLS or WebSocket entry's reloaded endpoint).
    pub enter: Vec<(SocketAddr, EntranceKind)>,
    /// Open listeners no longer asked for: the loops stop accepting on them.
    pub close: Vec<SocketAddr>,
    /// Inherited sockets no longer asked for: closed without ever being accepted on.
    pub discard: Vec<SocketAddr>,
    /// Live connections to close (`removed_mapping = "close"`): all of a removed port's
    /// (`None`), those of a retargeted port not going to its new upstream (`Some`).
    pub close_connections: BTreeMap<u16, Option<UpstreamAddr>>,
    /// The name table (SNI and WebSocket path routing) is sent again.
    pub name_routes: bool,
    /// `tcp_keepalive` changed: the listeners already open take the new setting (the
    /// opened ones always get it).
    pub retune: bool,
    /// `pipe_size` and `max_pipes` asked for, when they differ from the running pools'
    /// (they take effect at the next restart only).
    pub pipes_ignored: Option<(u32, u32)>,
}

/// The plan for applying `config` to what runs.
pub fn plan(running: &Running, config: &Config) -> Plan {
    let changes: HashMap<u16, PortChange> = match running.config {
        Some(old) => diff::diff(old, config).into_iter().collect(),
        None => diff::ports(config)
            .keys()
            .map(|p| (*p, PortChange::Open))
            .collect(),
    };

    let mut routes = BTreeMap::new();
    for (port, (upstream, idx)) in diff::ports(config) {
        let step = match (changes.get(&port), running.routes.get(&port)) {
            (None, Some(_)) => RouteStep::Keep,
            _ => {
                let m = &config.mappings[idx];
                RouteStep::Build {
                    upstream,
                    mapping: idx,
                    carry: running.routes.get(m.ports.start()) == Some(&m.upstream),
                }
            }
        };
        routes.insert(port, step);
    }

    // One listener per port and bind address, and one per TLS and WebSocket entry (an
    // entry's address wins over a port's: validation keeps them apart).
    let mut entrances: BTreeMap<SocketAddr, EntranceKind> = routes
        .keys()
        .flat_map(|p| {
            config
                .relay
                .bind
                .iter()
                .map(move |ip| (SocketAddr::new(*ip, *p), EntranceKind::Mapped(*p)))
        })
        .collect();
    for (i, entry) in config.tls.iter().enumerate() {
        entrances.insert(entry.listen, EntranceKind::Tls(i));
    }
    for (i, entry) in config.ws.iter().enumerate() {
        entrances.insert(entry.listen, EntranceKind::Ws(i));
    }

    let mut plan = Plan {
        changed_ports: changes.len(),
        ..Plan::default()
    };
    for (addr, entrance) in &entrances {
        if running.listening.contains(addr) {
            let changed = match entrance {
                EntranceKind::Mapped(p) => matches!(
                    changes.get(p),
                    Some(PortChange::Retarget | PortChange::Update)
                ),
                EntranceKind::Tls(_) | EntranceKind::Ws(_) => true,
            };
            if changed {
                plan.enter.push((*addr, *entrance));
            }
        } else {
            let socket = if running.inherited.contains(addr) {
                Socket::Inherited
            } else {
                Socket::Bind
            };
            plan.open.push(Open {
                addr: *addr,
                entrance: *entrance,
                socket,
            });
        }
    }
    plan.close = running
        .listening
        .iter()
        .filter(|a| !entrances.contains_key(a))
        .copied()
        .collect();
    plan.discard = running
        .inherited
        .iter()
        .filter(|a| !entrances.contains_key(a) || running.listening.contains(a))
        .copied()
        .collect();

    if config.relay.removed_mapping == RemovedMapping::Close {
        plan.close_connections = changes
            .iter()
            .filter_map(|(p, c)| match c {
                PortChange::Close => Some((*p, None)),
                PortChange::Retarget => match routes.get(p) {
                    Some(RouteStep::Build { upstream, .. }) => Some((*p, Some(*upstream))),
                    _ => None,
                },
                _ => None,
            })
            .collect();
    }

    let by_name = |c: &Config| !c.tls.is_empty() || !c.ws.is_empty();
    plan.name_routes = by_name(config) || running.config.is_some_and(by_name);
    plan.retune = running
        .config
        .is_some_and(|c| c.relay.tcp_keepalive != config.relay.tcp_keepalive);
    let asked = (config.relay.pipe_size, config.relay.max_pipes);
    plan.pipes_ignored = (asked != running.pipes).then_some(asked);
    plan.routes = routes;
    plan
}

#[cfg(test)]
mod tests {
    use super::EntranceKind::*;
    use super::*;
    use crate::control::parse_str;

    const RELAY: &str = "[relay]\nbind = [\"127.0.0.1\"]\npipe_size = 1048576\nmax_pipes = 1024\n";

    fn config(text: &str) -> Config {
        parse_str("test.toml", &format!("{RELAY}{text}")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A file with a `[relay]` of its own (the others get [`RELAY`]).
    fn config_with(relay: &str, text: &str) -> Config {
        parse_str(
            "test.toml",
            &format!("[relay]\nbind = [\"127.0.0.1\"]\n{relay}\n{text}"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn map(port: u16, to: &str, name: &str) -> String {
        format!("[[map]]\nport = {port}\nto = \"{to}\"\nname = \"{name}\"\n")
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn up(s: &str) -> UpstreamAddr {
        UpstreamAddr(s.parse().unwrap())
    }

    /// What runs once `config` was applied with every listener opened.
    fn running(config: &Config) -> Running<'_> {
        let first = plan(&Running::default(), config);
        Running {
            config: Some(config),
            listening: first.open.iter().map(|o| o.addr).collect(),
            inherited: BTreeSet::new(),
            routes: diff::ports(config)
                .into_iter()
                .map(|(p, (u, _))| (p, u))
                .collect(),
            pipes: (config.relay.pipe_size, config.relay.max_pipes),
        }
    }

    fn bind(port: u16, entrance: EntranceKind) -> Open {
        Open {
            addr: addr(port),
            entrance,
            socket: Socket::Bind,
        }
    }

    fn build(to: &str, mapping: usize, carry: bool) -> RouteStep {
        RouteStep::Build {
            upstream: up(to),
            mapping,
            carry,
        }
    }

    #[test]
    fn a_first_file_opens_every_listener() {
        let new = config(&(map(2000, "127.0.0.1:22", "a") + &map(2001, "127.0.0.1:23", "b")));
        let got = plan(
            &Running {
                pipes: (1 << 20, 1024),
                ..Running::default()
            },
            &new,
        );
        assert_eq!(
            got,
            Plan {
                changed_ports: 2,
                routes: [
                    (2000, build("127.0.0.1:22", 0, false)),
                    (2001, build("127.0.0.1:23", 1, false)),
                ]
                .into(),
                open: vec![bind(2000, Mapped(2000)), bind(2001, Mapped(2001))],
                close_connections: BTreeMap::new(),
                ..Plan::default()
            }
        );
    }

    /// Each reload against the same running file, `removed_mapping = "close"` (the default).
    #[test]
    fn reload_table() {
        let base = map(2000, "127.0.0.1:22", "a") + &map(2001, "127.0.0.1:23", "b");
        let old = config(&base);
        let keep_both = [(2000, RouteStep::Keep), (2001, RouteStep::Keep)];
        type Case = (&'static str, String, Plan);
        let cases: Vec<Case> = vec![
            (
                "identical: nothing changes",
                base.clone(),
                Plan {
                    routes: keep_both.into(),
                    ..Plan::default()
                },
            ),
            (
                "port added: one listener opened, the others kept",
                base.clone() + &map(2002, "127.0.0.1:24", "c"),
                Plan {
                    changed_ports: 1,
                    routes: [
                        (2000, RouteStep::Keep),
                        (2001, RouteStep::Keep),
                        (2002, build("127.0.0.1:24", 2, false)),
                    ]
                    .into(),
                    open: vec![bind(2002, Mapped(2002))],
                    ..Plan::default()
                },
            ),
            (
                "port removed: its listener and its connections close",
                map(2000, "127.0.0.1:22", "a"),
                Plan {
                    changed_ports: 1,
                    routes: [(2000, RouteStep::Keep)].into(),
                    close: vec![addr(2001)],
                    close_connections: [(2001, None)].into(),
                    ..Plan::default()
                },
            ),
            (
                "retarget: same listener, new route, connections elsewhere close",
                map(2000, "127.0.0.1:22", "a") + &map(2001, "127.0.0.2:23", "b"),
                Plan {
                    changed_ports: 1,
                    routes: [
                        (2000, RouteStep::Keep),
                        (2001, build("127.0.0.2:23", 1, false)),
                    ]
                    .into(),
                    enter: vec![(addr(2001), Mapped(2001))],
                    close_connections: [(2001, Some(up("127.0.0.2:23")))].into(),
                    ..Plan::default()
                },
            ),
            (
                "update (rename): new route carrying the live count, connections kept",
                map(2000, "127.0.0.1:22", "a2") + &map(2001, "127.0.0.1:23", "b"),
                Plan {
                    changed_ports: 1,
                    routes: [
                        (2000, build("127.0.0.1:22", 0, true)),
                        (2001, RouteStep::Keep),
                    ]
                    .into(),
                    enter: vec![(addr(2000), Mapped(2000))],
                    ..Plan::default()
                },
            ),
            (
                "moved entries: a mapping's index follows the file",
                map(2001, "127.0.0.1:23", "b") + &map(2000, "127.0.0.1:22", "a"),
                Plan {
                    routes: keep_both.into(),
                    ..Plan::default()
                },
            ),
        ];
        for (what, text, want) in cases {
            assert_eq!(plan(&running(&old), &config(&text)), want, "{what}");
        }
    }

    #[test]
    fn removed_mapping_keep_closes_no_connection() {
        let old = config(&(map(2000, "127.0.0.1:22", "a") + &map(2001, "127.0.0.1:23", "b")));
        let new = config_with(
            "removed_mapping = \"keep\"\npipe_size = 1048576\nmax_pipes = 1024",
            &map(2001, "127.0.0.2:23", "b"),
        );
        let got = plan(&running(&old), &new);
        assert_eq!(got.close, vec![addr(2000)]);
        assert_eq!(got.enter, vec![(addr(2001), Mapped(2001))]);
        assert_eq!(got.close_connections, BTreeMap::new());
        // The same reload with "close" closes both ports' connections.
        let new = config(&map(2001, "127.0.0.2:23", "b"));
        assert_eq!(
            plan(&running(&old), &new).close_connections,
            [(2000, None), (2001, Some(up("127.0.0.2:23")))].into()
        );
    }

    /// A range whose base moves: every port is retargeted, one mapping state for all of
    /// them, which carries no count (the upstream changed).
    #[test]
    fn range_retarget_builds_one_mapping() {
        let old = config("[[map]]\nport = \"3000-3001\"\nto = \"127.0.0.1:8000\"\nname = \"r\"\n");
        let new = config("[[map]]\nport = \"3000-3001\"\nto = \"127.0.0.1:9000\"\nname = \"r\"\n");
        let got = plan(&running(&old), &new);
        assert_eq!(
            got.routes,
            [
                (3000, build("127.0.0.1:9000", 0, false)),
                (3001, build("127.0.0.1:9001", 0, false)),
            ]
            .into()
        );
        let grown =
            config("[[map]]\nport = \"3000-3002\"\nto = \"127.0.0.1:8000\"\nname = \"r\"\n");
        let got = plan(&running(&old), &grown);
        assert_eq!(got.routes[&3002], build("127.0.0.1:8002", 0, true));
        assert_eq!(got.open, vec![bind(3002, Mapped(3002))]);
    }

    /// A listener that could not be opened is not among the running ones: the next
    /// apply, even of the same file, tries it again.
    #[test]
    fn failed_listeners_are_retried() {
        let old = config(&(map(2000, "127.0.0.1:22", "a") + &map(2001, "127.0.0.1:23", "b")));
        let mut run = running(&old);
        run.listening.remove(&addr(2001));
        let got = plan(&run, &old);
        assert_eq!(got.open, vec![bind(2001, Mapped(2001))]);
        assert_eq!(got.changed_ports, 0);
        assert_eq!(got.routes[&2001], RouteStep::Keep);
    }

    #[test]
    fn tls_and_ws_entries() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::fs::write(dir.path().join(f), "-----BEGIN X-----\n").unwrap();
        }
        let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let tls = format!(
            "[[tls]]\nlisten = \"127.0.0.1:4430\"\ncert = \"{}\"\nkey = \"{}\"\nsni_suffix = \"x\"\n",
            crt.display(),
            key.display()
        );
        let ws = "[[ws]]\nlisten = \"127.0.0.1:8080\"\n";
        let a = map(2000, "127.0.0.1:22", "a");
        let plain = config(&a);
        let with = config(&format!("{a}{tls}{ws}"));

        let got = plan(&running(&plain), &with);
        assert_eq!(
            got.open,
            vec![bind(4430, Tls(0)), bind(8080, Ws(0))],
            "entries open"
        );
        assert!(got.name_routes);
        assert!(got.enter.is_empty());

        // Reloading the same file: the entries take their reloaded endpoints, ports stay.
        let got = plan(&running(&with), &with);
        assert!(got.open.is_empty());
        assert_eq!(got.enter, vec![(addr(4430), Tls(0)), (addr(8080), Ws(0))]);
        assert!(got.name_routes);

        // Removing them closes their listeners and sends the (now empty) name table once.
        let got = plan(&running(&with), &plain);
        assert_eq!(got.close, vec![addr(4430), addr(8080)]);
        assert!(got.name_routes);
        assert_eq!(got.changed_ports, 0);

        // Without any entry, before or after, no name table is sent.
        assert!(!plan(&running(&plain), &plain).name_routes);
    }

    #[test]
    fn keepalive_and_pipe_settings() {
        let a = map(2000, "127.0.0.1:22", "a");
        let old = config(&a);
        let same = plan(&running(&old), &old);
        assert!(!same.retune);
        assert_eq!(same.pipes_ignored, None);
        let new = config_with(
            "tcp_keepalive = \"5s\"\npipe_size = 65536\nmax_pipes = 1024",
            &a,
        );
        let got = plan(&running(&old), &new);
        assert!(got.retune);
        assert_eq!(got.pipes_ignored, Some((65536, 1024)));
        assert!(got.open.is_empty() && got.enter.is_empty() && got.close.is_empty());
        // A first file never retunes: its listeners are all new.
        assert!(!plan(&Running::default(), &new).retune);
    }

    /// A process that adopted the listeners of the process before it (a live upgrade): it
    /// has no file in force and accepts on nothing yet. It takes the inherited sockets the
    /// file asks for instead of binding them, binds only the rest, and closes the
    /// inherited ones the file no longer asks for; nothing is re-entered or unlistened.
    #[test]
    fn inherited_listeners_are_taken_not_bound() {
        let new = config(&(map(2000, "127.0.0.1:22", "a") + &map(2002, "127.0.0.1:24", "c")));
        let run = Running {
            inherited: [addr(2000), addr(2001), addr(4430)].into(),
            pipes: (1 << 20, 1024),
            ..Running::default()
        };
        let got = plan(&run, &new);
        assert_eq!(
            got.open,
            vec![
                Open {
                    addr: addr(2000),
                    entrance: Mapped(2000),
                    socket: Socket::Inherited,
                },
                bind(2002, Mapped(2002)),
            ]
        );
        assert_eq!(got.discard, vec![addr(2001), addr(4430)]);
        assert!(got.close.is_empty() && got.enter.is_empty());
        assert!(got.close_connections.is_empty());
        assert_eq!(got.changed_ports, 2);

        // Every inherited socket wanted: nothing is bound, nothing discarded.
        let run = Running {
            inherited: [addr(2000), addr(2002)].into(),
            ..run
        };
        let got = plan(&run, &new);
        assert!(got.open.iter().all(|o| o.socket == Socket::Inherited));
        assert_eq!(got.open.len(), 2);
        assert!(got.discard.is_empty());
    }
}
