//! The admin protocol: one JSON object a line each way, versioned (`"v": 1`). Pure: text in,
//! a [`Request`] or the error text of its reply out. docs/admin-protocol.md is its
//! reference.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The protocol version this relay speaks.
pub const VERSION: u32 = 1;

/// The longest request line, its newline included. A longer one is answered with an error
/// and its connection closed (the rest of it cannot be told from the next request).
pub const MAX_LINE: usize = 64 * 1024;

/// What a request asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The live connections, of one mapping or all.
    Sessions { map: Option<String> },
    /// End the connections the selector names.
    Kill(Selector),
    /// Upgrade the relay in place to `binary` (default: its own executable).
    Upgrade { binary: Option<String> },
}

/// Which connections a `kill` ends: exactly one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Ids(Vec<u64>),
    Map(String),
    /// The real client's address in this network (an address alone is a /32 or /128).
    Client(IpNet),
}

impl Selector {
    /// Whether it names the connection with this id, mapping and real client.
    pub fn selects(&self, id: u64, map: &str, client: SocketAddr) -> bool {
        match self {
            Selector::Ids(ids) => ids.contains(&id),
            Selector::Map(name) => name == map,
            Selector::Client(net) => net.contains(&client.ip().to_canonical()),
        }
    }
}

/// A live connection, as `sessions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Unique over the relay's life, across its loops (given at admission, from 1).
    pub id: u64,
    /// The real client (behind a trusted proxy: the address its PROXY header carried).
    pub client: SocketAddr,
    /// How it arrived: `direct`, `proxy`, `tls`, `ws`.
    pub via: String,
    /// The host port it came in on (a TLS or WebSocket entry: its mapping's first port).
    pub port: u16,
    pub map: String,
    pub upstream: SocketAddr,
    /// The relay's end of the upstream connection: what the instance's sshd logs as the
    /// client. `None` before the connect has bound it.
    pub relay_local: Option<SocketAddr>,
    /// `relayed` (connected upstream), `connecting`, or `held` (waiting for a booting
    /// instance, between connect attempts).
    pub state: String,
    /// The close log line's counters, so far.
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub age_ms: u64,
}

/// A request line as sent; checked into a [`Request`] by [`parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    v: Option<u32>,
    op: Option<String>,
    #[serde(default)]
    map: Option<String>,
    #[serde(default)]
    ids: Option<Vec<u64>>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    binary: Option<String>,
}

/// A request line (without its newline) → the request, or the text of the error reply.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("a request is a JSON object".into());
    }
    let raw: RawRequest = serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))?;
    match raw.v {
        Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported version {v}; this relay speaks {VERSION}"
            ))
        }
        None => return Err(format!("missing \"v\" (this relay speaks {VERSION})")),
    }
    let op = raw.op.ok_or("missing \"op\"")?;
    match op.as_str() {
        _ if raw.binary.is_some() && op != "upgrade" => Err(format!("{op:?} takes no \"binary\"")),
        "upgrade" => {
            if raw.ids.is_some() || raw.client.is_some() || raw.map.is_some() {
                return Err("\"upgrade\" takes only \"binary\"".into());
            }
            Ok(Request::Upgrade { binary: raw.binary })
        }
        "sessions" => {
            if raw.ids.is_some() || raw.client.is_some() {
                return Err("\"sessions\" takes only \"map\"".into());
            }
            Ok(Request::Sessions { map: raw.map })
        }
        "kill" => {
            let selector = match (raw.ids, raw.map, raw.client) {
                (Some(ids), None, None) if ids.is_empty() => {
                    return Err("\"ids\" must name at least one connection".into())
                }
                (Some(ids), None, None) => Selector::Ids(ids),
                (None, Some(map), None) => Selector::Map(map),
                (None, None, Some(client)) => Selector::Client(parse_client(&client)?),
                _ => {
                    return Err(
                        "\"kill\" takes exactly one of \"ids\", \"map\" and \"client\"".into(),
                    )
                }
            };
            Ok(Request::Kill(selector))
        }
        other => Err(format!(
            "unknown op {other:?} (known: \"sessions\", \"kill\", \"upgrade\")"
        )),
    }
}

/// `ADDR` or `ADDR/PREFIX`.
pub fn parse_client(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("\"client\" must be ADDR or ADDR/PREFIX, got {text:?}"))
}

/// A request line for `request` (with its newline): what the command line sends.
pub fn encode(request: &Request) -> String {
    let value = match request {
        Request::Sessions { map } => {
            serde_json::json!({"v": VERSION, "op": "sessions", "map": map})
        }
        Request::Kill(Selector::Ids(ids)) => {
            serde_json::json!({"v": VERSION, "op": "kill", "ids": ids})
        }
        Request::Kill(Selector::Map(map)) => {
            serde_json::json!({"v": VERSION, "op": "kill", "map": map})
        }
        Request::Kill(Selector::Client(net)) => {
            serde_json::json!({"v": VERSION, "op": "kill", "client": net.to_string()})
        }
        Request::Upgrade { binary: Some(b) } => {
            serde_json::json!({"v": VERSION, "op": "upgrade", "binary": b})
        }
        Request::Upgrade { binary: None } => serde_json::json!({"v": VERSION, "op": "upgrade"}),
    };
    format!("{value}\n")
}

/// A reply line, with its newline.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Sessions {
        v: u32,
        sessions: Vec<Session>,
    },
    /// The ids of the connections it ended.
    Killed {
        v: u32,
        killed: Vec<u64>,
    },
    /// The new process took over: its pid, the connections it took, those that stayed
    /// (TLS sessions) and how long it all took.
    Upgraded {
        v: u32,
        pid: u32,
        moved: usize,
        stayed: usize,
        ms: u64,
    },
    Error {
        v: u32,
        error: String,
    },
}

impl Reply {
    pub fn error(text: impl Into<String>) -> Reply {
        Reply::Error {
            v: VERSION,
            error: text.into(),
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "{}\n",
            serde_json::to_string(self).expect("plain values serialize")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let cases: &[(&str, Request)] = &[
            (
                r#"{"v":1,"op":"sessions"}"#,
                Request::Sessions { map: None },
            ),
            (
                r#"{"v":1,"op":"sessions","map":null}"#,
                Request::Sessions { map: None },
            ),
            (
                r#"{"v":1,"op":"sessions","map":"C.1"}"#,
                Request::Sessions {
                    map: Some("C.1".into()),
                },
            ),
            (
                r#"{"v":1,"op":"kill","ids":[3,9]}"#,
                Request::Kill(Selector::Ids(vec![3, 9])),
            ),
            (
                r#"{"v":1,"op":"kill","map":"C.1"}"#,
                Request::Kill(Selector::Map("C.1".into())),
            ),
            (
                r#"{"v":1,"op":"kill","client":"10.1.2.3/16"}"#,
                Request::Kill(Selector::Client("10.1.0.0/16".parse().unwrap())),
            ),
            (
                r#"{"v":1,"op":"kill","client":"fd00::1"}"#,
                Request::Kill(Selector::Client("fd00::1/128".parse().unwrap())),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line.as_bytes()).as_ref(), Ok(want), "{line}");
            // What the command line sends reads back as the same request.
            assert_eq!(
                parse(encode(want).trim_end().as_bytes()).as_ref(),
                Ok(want),
                "{line}"
            );
        }
    }

    #[test]
    fn bad_requests_get_their_error_text() {
        let cases = [
            ("sessions", "not JSON: expected value at line 1 column 1"),
            ("[1]", "a request is a JSON object"),
            (
                r#"{"v":"1","op":"sessions"}"#,
                "bad request: invalid type: string \"1\", expected u32",
            ),
            (
                r#"{"op":"sessions"}"#,
                "missing \"v\" (this relay speaks 1)",
            ),
            (
                r#"{"v":2,"op":"sessions"}"#,
                "unsupported version 2; this relay speaks 1",
            ),
            (r#"{"v":1}"#, "missing \"op\""),
            (
                r#"{"v":1,"op":"reboot"}"#,
                "unknown op \"reboot\" (known: \"sessions\", \"kill\", \"upgrade\")",
            ),
            (
                r#"{"v":1,"op":"upgrade","map":"C.1"}"#,
                "\"upgrade\" takes only \"binary\"",
            ),
            (
                r#"{"v":1,"op":"sessions","binary":"/x"}"#,
                "\"sessions\" takes no \"binary\"",
            ),
            (
                r#"{"v":1,"op":"kill"}"#,
                "\"kill\" takes exactly one of \"ids\", \"map\" and \"client\"",
            ),
            (
                r#"{"v":1,"op":"kill","ids":[1],"map":"a"}"#,
                "\"kill\" takes exactly one of \"ids\", \"map\" and \"client\"",
            ),
            (
                r#"{"v":1,"op":"kill","ids":[]}"#,
                "\"ids\" must name at least one connection",
            ),
            (
                r#"{"v":1,"op":"kill","client":"10.0.0.0/33"}"#,
                "\"client\" must be ADDR or ADDR/PREFIX, got \"10.0.0.0/33\"",
            ),
            (
                r#"{"v":1,"op":"sessions","ids":[1]}"#,
                "\"sessions\" takes only \"map\"",
            ),
            (
                r#"{"v":1,"op":"sessions","x":1}"#,
                "bad request: unknown field `x`, expected one of `v`, `op`, `map`, `ids`, `client`, `binary`",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line.as_bytes()), Err(want.to_string()), "{line}");
        }
    }

    #[test]
    fn client_selector_matches_the_network_and_v4_mapped_addresses() {
        let sel = Selector::Client(parse_client("127.0.0.3/32").unwrap());
        assert!(sel.selects(1, "m", "127.0.0.3:4000".parse().unwrap()));
        assert!(sel.selects(1, "m", "[::ffff:127.0.0.3]:4000".parse().unwrap()));
        assert!(!sel.selects(1, "m", "127.0.0.4:4000".parse().unwrap()));
        let sel = Selector::Client(parse_client("127.0.0.0/8").unwrap());
        assert!(sel.selects(1, "m", "127.0.0.4:1".parse().unwrap()));
        assert!(Selector::Ids(vec![2, 5]).selects(5, "m", "1.2.3.4:1".parse().unwrap()));
        assert!(!Selector::Map("a".into()).selects(5, "b", "1.2.3.4:1".parse().unwrap()));
    }

    #[test]
    fn replies_round_trip() {
        let s = Session {
            id: 7,
            client: "127.0.0.3:5000".parse().unwrap(),
            via: "direct".into(),
            port: 2222,
            map: "C.1".into(),
            upstream: "127.0.0.1:22".parse().unwrap(),
            relay_local: Some("127.0.0.1:43512".parse().unwrap()),
            state: "relayed".into(),
            bytes_client_to_upstream: 10,
            bytes_upstream_to_client: 20,
            age_ms: 1500,
        };
        for reply in [
            Reply::Sessions {
                v: 1,
                sessions: vec![s],
            },
            Reply::Killed {
                v: 1,
                killed: vec![1, 2],
            },
            Reply::error("nope"),
        ] {
            let line = reply.encode();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        }
    }
}
