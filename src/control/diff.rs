//! What a reload changes, port by port: a pure function of the running file and the new
//! one. A host port is "the same mapping" across a reload while its upstream stays the
//! same; its name, `allow` and limits may then change in place.

use std::collections::BTreeMap;

use super::{Config, Mapping};
use crate::addr::UpstreamAddr;

/// What a reload does to one host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChange {
    /// A new port: open it.
    Open,
    /// The port is gone: close it; its connections follow `removed_mapping`.
    Close,
    /// Same port, new upstream: new connections go to the new upstream at once (the
    /// listener stays open); old ones follow `removed_mapping`.
    Retarget,
    /// Same port and upstream; name, `allow`, limits or `source` changed: new connections see the
    /// change, live ones are untouched.
    Update,
}

/// Every port whose handling changes, in port order; ports not listed are untouched.
pub fn diff(old: &Config, new: &Config) -> Vec<(u16, PortChange)> {
    let old_ports = ports(old);
    let new_ports = ports(new);
    let mut changes = Vec::new();
    for (port, (upstream, m)) in &new_ports {
        let m = &new.mappings[*m];
        let change = match old_ports.get(port) {
            None => Some(PortChange::Open),
            Some((old_upstream, _)) if old_upstream != upstream => Some(PortChange::Retarget),
            Some((_, old_m)) if !same_terms(&old.mappings[*old_m], m) => Some(PortChange::Update),
            Some(_) => None,
        };
        if let Some(c) = change {
            changes.push((*port, c));
        }
    }
    for port in old_ports.keys() {
        if !new_ports.contains_key(port) {
            changes.push((*port, PortChange::Close));
        }
    }
    changes.sort_by_key(|(p, _)| *p);
    changes
}

/// Each host port of a file with its upstream and the index of its mapping.
pub fn ports(config: &Config) -> BTreeMap<u16, (UpstreamAddr, usize)> {
    config
        .mappings
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.ports.clone().map(move |p| (p, (m.upstream_for(p), i))))
        .collect()
}

/// Whether two mappings give a port's new connections the same treatment. A range
/// mapping's `max_connections` covers all its ports, so its span counts too.
fn same_terms(a: &Mapping, b: &Mapping) -> bool {
    a.name == b.name
        && a.allow == b.allow
        && a.max_connections == b.max_connections
        && a.hold == b.hold
        && a.wake == b.wake
        && a.per_source_max_connections == b.per_source_max_connections
        && a.source == b.source
        && a.ports == b.ports
}

#[cfg(test)]
mod tests {
    use super::PortChange::*;
    use super::*;
    use crate::control::parse_str;

    fn config(maps: &str) -> Config {
        parse_str("test.toml", maps).expect("valid test file")
    }

    #[test]
    fn diff_table() {
        let base = r#"
            [[map]]
            port = 2000
            to = "127.0.0.1:22"
            name = "a"
            [[map]]
            port = 2001
            to = "127.0.0.1:23"
            name = "b"
        "#;
        type Case<'a> = (&'a str, &'a str, Vec<(u16, PortChange)>);
        let cases: &[Case] = &[
            ("identical", base, vec![]),
            (
                "one added",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a"
                [[map]]
                port = 2001
                to = "127.0.0.1:23"
                name = "b"
                [[map]]
                port = 2002
                to = "127.0.0.1:24"
                "#,
                vec![(2002, Open)],
            ),
            (
                "one removed",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a"
                "#,
                vec![(2001, Close)],
            ),
            (
                "retargeted",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a"
                [[map]]
                port = 2001
                to = "127.0.0.2:23"
                name = "b"
                "#,
                vec![(2001, Retarget)],
            ),
            (
                "source changed",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a"
                source = "client"
                [[map]]
                port = 2001
                to = "127.0.0.1:23"
                name = "b"
                "#,
                vec![(2000, Update)],
            ),
            (
                "renamed and allow changed",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a2"
                [[map]]
                port = 2001
                to = "127.0.0.1:23"
                name = "b"
                allow = ["127.0.0.0/8"]
                "#,
                vec![(2000, Update), (2001, Update)],
            ),
            (
                "reordered entries change nothing",
                r#"
                [[map]]
                port = 2001
                to = "127.0.0.1:23"
                name = "b"
                [[map]]
                port = 2000
                to = "127.0.0.1:22"
                name = "a"
                "#,
                vec![],
            ),
            (
                "ports swap instances",
                r#"
                [[map]]
                port = 2000
                to = "127.0.0.1:23"
                name = "b"
                [[map]]
                port = 2001
                to = "127.0.0.1:22"
                name = "a"
                "#,
                vec![(2000, Retarget), (2001, Retarget)],
            ),
        ];
        let old = config(base);
        for (what, new, want) in cases {
            assert_eq!(&diff(&old, &config(new)), want, "{what}");
        }
    }

    #[test]
    fn range_offsets_and_growth() {
        let old = config("[[map]]\nport = \"3000-3001\"\nto = \"127.0.0.1:8000\"\nname = \"r\"\n");
        // Same first upstream, one more port: the old ports' upstreams are unchanged, but the
        // mapping's span (and so its shared cap) changed.
        let grown =
            config("[[map]]\nport = \"3000-3002\"\nto = \"127.0.0.1:8000\"\nname = \"r\"\n");
        assert_eq!(
            diff(&old, &grown),
            vec![(3000, Update), (3001, Update), (3002, Open)]
        );
        // Shifting the upstream base retargets every port of the range.
        let shifted =
            config("[[map]]\nport = \"3000-3001\"\nto = \"127.0.0.1:9000\"\nname = \"r\"\n");
        assert_eq!(
            diff(&old, &shifted),
            vec![(3000, Retarget), (3001, Retarget)]
        );
    }
}
