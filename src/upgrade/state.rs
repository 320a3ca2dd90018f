//! What an upgrading relay hands its successor besides the file descriptors themselves:
//! one versioned, length-prefixed record per listener and per connection, and the counter
//! values. Plain data: the relay's types fill these in and are rebuilt from them (see
//! `relay::handover`). The layout is this module's and nobody else's; a change to it is a
//! new [`STATE_VERSION`].

use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::wire::{Reader, WireError, Writer};

/// The layout written here. `portrelay --handoff-info` lists the versions a binary reads.
pub const STATE_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"PRHANDOF";

pub struct State {
    pub version: u32,
    pub from_pid: u32,
    /// The next connection id, so that ids stay unique across the upgrade.
    pub next_id: u64,
    pub generation: u64,
    /// The control file in force in the old process (used if the file on disk is broken).
    pub config_text: String,
    pub listeners: Vec<ListenerRecord>,
    pub metrics_fd: Option<RawFd>,
    /// The counters' values, as `metrics::snapshot` encodes them.
    pub counters: Vec<u8>,
    pub connections: Vec<ConnRecord>,
}

pub struct ListenerRecord {
    pub addr: SocketAddr,
    pub fd: RawFd,
}

/// A socket as the old process knew it, to check the inherited descriptor against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideRecord {
    pub fd: RawFd,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// readable, writable, hup, error, fin, reset, dead (bits 0..6).
    pub flags: u8,
}

pub enum ConnRecord {
    Relay(Box<RelayRecord>),
    Pending(PendingRecord),
}

/// A client socket still in admission: a PROXY header or a `ws://` request awaited.
pub struct PendingRecord {
    pub client: SideRecord,
    pub peer: SocketAddr,
    pub port: u16,
    /// The listener it came in on (its entrance decides the stage).
    pub listen: SocketAddr,
    /// The bytes of a WebSocket request read so far (`None`: a PROXY header is awaited,
    /// which is only peeked, so nothing of it was read).
    pub ws_head: Option<Vec<u8>>,
    pub left_ms: u64,
}

pub struct RelayRecord {
    pub id: u64,
    pub port: u16,
    pub upstream: SocketAddr,
    pub map: String,
    pub client_addr: SocketAddr,
    pub via: u8,
    pub client: SideRecord,
    pub upstream_side: SideRecord,
    pub connected: bool,
    pub to_upstream: DirRecord,
    pub to_client: DirRecord,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// 0: none, 1: the client's, 2: the upstream's.
    pub first_eof: u8,
    /// (kind, detail) of `CloseReason`, if one failure was recorded already.
    pub failure: Option<(u8, String)>,
    pub hold: Option<HoldingRecord>,
    pub attempt: u8,
    /// `None`: plain bytes; `Some`: a `ws://` codec's own state.
    pub ws: Option<Vec<u8>>,
}

pub struct DirRecord {
    /// 0 open, 1 eof, 2 closed, 3 aborted.
    pub state: u8,
    pub bytes: u64,
    pub streaming: bool,
    pub held: HeldBytes,
}

/// A direction's bytes in flight: in a pipe (whose descriptors are handed over) or copied
/// out of a buffer.
pub enum HeldBytes {
    None,
    Pipe {
        read: RawFd,
        write: RawFd,
        in_flight: u64,
    },
    Buffer(Vec<u8>),
}

pub struct HoldingRecord {
    pub left_ms: u64,
    pub attempts: u32,
    pub backoff_ms: u64,
    pub held: bool,
    pub waiting: bool,
    pub last_reason: Option<u8>,
    pub last_error: Option<String>,
    pub replay: Option<ReplayRecord>,
}

pub struct ReplayRecord {
    pub buf: Vec<u8>,
    pub sent: u64,
    pub counted: u64,
    pub client_eof: bool,
    pub eof_passed: bool,
    pub first_byte: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not a portrelay hand-over state")]
    Magic,
    #[error("state version {found}; this binary reads version {STATE_VERSION}")]
    Version { found: u32 },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl State {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.0.extend_from_slice(MAGIC);
        w.u32(self.version);
        w.u32(self.from_pid);
        w.u64(self.next_id);
        w.u64(self.generation);
        w.str(&self.config_text);
        w.u32(self.listeners.len() as u32);
        for l in &self.listeners {
            w.record(|w| {
                w.addr(l.addr);
                w.i32(l.fd);
            });
        }
        w.i32(self.metrics_fd.unwrap_or(-1));
        w.bytes(&self.counters);
        w.u32(self.connections.len() as u32);
        for c in &self.connections {
            w.record(|w| match c {
                ConnRecord::Relay(r) => {
                    w.u8(1);
                    r.encode(w);
                }
                ConnRecord::Pending(p) => {
                    w.u8(2);
                    p.encode(w);
                }
            });
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<State, StateError> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(StateError::Magic);
        }
        let mut r = Reader(&bytes[8..]);
        let version = r.u32("version")?;
        if version != STATE_VERSION {
            return Err(StateError::Version { found: version });
        }
        let from_pid = r.u32("pid")?;
        let next_id = r.u64("next id")?;
        let generation = r.u64("generation")?;
        let config_text = r.str("control file")?;
        let mut listeners = Vec::new();
        for _ in 0..r.u32("listeners")? {
            let mut l = r.record("listener")?;
            listeners.push(ListenerRecord {
                addr: l.addr("listener address")?,
                fd: l.i32("listener fd")?,
            });
        }
        let metrics_fd = Some(r.i32("metrics fd")?).filter(|fd| *fd >= 0);
        let counters = r.bytes("counters")?.to_vec();
        let mut connections = Vec::new();
        for _ in 0..r.u32("connections")? {
            let mut c = r.record("connection")?;
            connections.push(match c.u8("connection kind")? {
                1 => ConnRecord::Relay(Box::new(RelayRecord::decode(&mut c)?)),
                2 => ConnRecord::Pending(PendingRecord::decode(&mut c)?),
                v => {
                    return Err(WireError::Bad {
                        what: "connection kind",
                        value: v.into(),
                    }
                    .into())
                }
            });
        }
        Ok(State {
            version,
            from_pid,
            next_id,
            generation,
            config_text,
            listeners,
            metrics_fd,
            counters,
            connections,
        })
    }

    /// Every descriptor the records name, for the new process to inherit.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        fds.extend(self.metrics_fd);
        for c in &self.connections {
            match c {
                ConnRecord::Pending(p) => fds.push(p.client.fd),
                ConnRecord::Relay(r) => {
                    fds.push(r.client.fd);
                    fds.push(r.upstream_side.fd);
                    for d in [&r.to_upstream, &r.to_client] {
                        if let HeldBytes::Pipe { read, write, .. } = d.held {
                            fds.extend([read, write]);
                        }
                    }
                }
            }
        }
        fds
    }
}

fn opt_addr(w: &mut Writer, a: Option<SocketAddr>) {
    w.bool(a.is_some());
    if let Some(a) = a {
        w.addr(a);
    }
}

fn read_opt_addr(r: &mut Reader, what: &'static str) -> Result<Option<SocketAddr>, WireError> {
    Ok(if r.bool(what)? {
        Some(r.addr(what)?)
    } else {
        None
    })
}

impl SideRecord {
    fn encode(&self, w: &mut Writer) {
        w.i32(self.fd);
        opt_addr(w, self.local);
        opt_addr(w, self.peer);
        w.u8(self.flags);
    }
    fn decode(r: &mut Reader) -> Result<SideRecord, WireError> {
        Ok(SideRecord {
            fd: r.i32("socket fd")?,
            local: read_opt_addr(r, "local address")?,
            peer: read_opt_addr(r, "peer address")?,
            flags: r.u8("socket flags")?,
        })
    }
}

impl PendingRecord {
    fn encode(&self, w: &mut Writer) {
        self.client.encode(w);
        w.addr(self.peer);
        w.u16(self.port);
        w.addr(self.listen);
        w.bool(self.ws_head.is_some());
        if let Some(h) = &self.ws_head {
            w.bytes(h);
        }
        w.u64(self.left_ms);
    }
    fn decode(r: &mut Reader) -> Result<PendingRecord, WireError> {
        Ok(PendingRecord {
            client: SideRecord::decode(r)?,
            peer: r.addr("peer")?,
            port: r.u16("port")?,
            listen: r.addr("listen")?,
            ws_head: if r.bool("ws")? {
                Some(r.bytes("ws head")?.to_vec())
            } else {
                None
            },
            left_ms: r.u64("deadline")?,
        })
    }
}

impl DirRecord {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.state);
        w.u64(self.bytes);
        w.bool(self.streaming);
        match &self.held {
            HeldBytes::None => w.u8(0),
            HeldBytes::Pipe {
                read,
                write,
                in_flight,
            } => {
                w.u8(1);
                w.i32(*read);
                w.i32(*write);
                w.u64(*in_flight);
            }
            HeldBytes::Buffer(b) => {
                w.u8(2);
                w.bytes(b);
            }
        }
    }
    fn decode(r: &mut Reader) -> Result<DirRecord, WireError> {
        let state = r.u8("direction state")?;
        if state > 3 {
            return Err(WireError::Bad {
                what: "direction state",
                value: state.into(),
            });
        }
        Ok(DirRecord {
            state,
            bytes: r.u64("bytes")?,
            streaming: r.bool("streaming")?,
            held: match r.u8("held bytes")? {
                0 => HeldBytes::None,
                1 => HeldBytes::Pipe {
                    read: r.i32("pipe")?,
                    write: r.i32("pipe")?,
                    in_flight: r.u64("in flight")?,
                },
                2 => HeldBytes::Buffer(r.bytes("buffer")?.to_vec()),
                v => {
                    return Err(WireError::Bad {
                        what: "held bytes",
                        value: v.into(),
                    })
                }
            },
        })
    }
}

impl RelayRecord {
    fn encode(&self, w: &mut Writer) {
        w.u64(self.id);
        w.u16(self.port);
        w.addr(self.upstream);
        w.str(&self.map);
        w.addr(self.client_addr);
        w.u8(self.via);
        self.client.encode(w);
        self.upstream_side.encode(w);
        w.bool(self.connected);
        self.to_upstream.encode(w);
        self.to_client.encode(w);
        w.u64(self.age_ms);
        w.u64(self.idle_ms);
        w.u8(self.first_eof);
        w.bool(self.failure.is_some());
        if let Some((kind, detail)) = &self.failure {
            w.u8(*kind);
            w.str(detail);
        }
        w.bool(self.hold.is_some());
        if let Some(h) = &self.hold {
            w.u64(h.left_ms);
            w.u32(h.attempts);
            w.u64(h.backoff_ms);
            w.bool(h.held);
            w.bool(h.waiting);
            w.u8(h.last_reason.map_or(u8::MAX, |r| r));
            w.bool(h.last_error.is_some());
            if let Some(e) = &h.last_error {
                w.str(e);
            }
            w.bool(h.replay.is_some());
            if let Some(p) = &h.replay {
                w.bytes(&p.buf);
                w.u64(p.sent);
                w.u64(p.counted);
                w.bool(p.client_eof);
                w.bool(p.eof_passed);
                w.bool(p.first_byte);
            }
        }
        w.u8(self.attempt);
        w.bool(self.ws.is_some());
        if let Some(ws) = &self.ws {
            w.bytes(ws);
        }
    }

    fn decode(r: &mut Reader) -> Result<RelayRecord, WireError> {
        let id = r.u64("id")?;
        let port = r.u16("port")?;
        let upstream = r.addr("upstream")?;
        let map = r.str("map")?;
        let client_addr = r.addr("client")?;
        let via = r.u8("via")?;
        let client = SideRecord::decode(r)?;
        let upstream_side = SideRecord::decode(r)?;
        let connected = r.bool("connected")?;
        let to_upstream = DirRecord::decode(r)?;
        let to_client = DirRecord::decode(r)?;
        let age_ms = r.u64("age")?;
        let idle_ms = r.u64("idle")?;
        let first_eof = r.u8("first eof")?;
        let failure = if r.bool("failure")? {
            Some((r.u8("failure kind")?, r.str("failure detail")?))
        } else {
            None
        };
        let hold = if r.bool("hold")? {
            let left_ms = r.u64("hold left")?;
            let attempts = r.u32("attempts")?;
            let backoff_ms = r.u64("backoff")?;
            let held = r.bool("held")?;
            let waiting = r.bool("waiting")?;
            let last_reason = Some(r.u8("last reason")?).filter(|v| *v != u8::MAX);
            let last_error = if r.bool("last error")? {
                Some(r.str("last error")?)
            } else {
                None
            };
            let replay = if r.bool("replay")? {
                Some(ReplayRecord {
                    buf: r.bytes("replay")?.to_vec(),
                    sent: r.u64("replay sent")?,
                    counted: r.u64("replay counted")?,
                    client_eof: r.bool("replay eof")?,
                    eof_passed: r.bool("replay eof passed")?,
                    first_byte: r.bool("replay first byte")?,
                })
            } else {
                None
            };
            Some(HoldingRecord {
                left_ms,
                attempts,
                backoff_ms,
                held,
                waiting,
                last_reason,
                last_error,
                replay,
            })
        } else {
            None
        };
        let attempt = r.u8("attempt")?;
        let ws = if r.bool("ws")? {
            Some(r.bytes("ws codec")?.to_vec())
        } else {
            None
        };
        Ok(RelayRecord {
            id,
            port,
            upstream,
            map,
            client_addr,
            via,
            client,
            upstream_side,
            connected,
            to_upstream,
            to_client,
            age_ms,
            idle_ms,
            first_eof,
            failure,
            hold,
            attempt,
            ws,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(fd: RawFd) -> SideRecord {
        SideRecord {
            fd,
            local: Some("127.0.0.1:2222".parse().unwrap()),
            peer: Some("127.0.0.1:40000".parse().unwrap()),
            flags: 0b101,
        }
    }

    fn sample() -> State {
        State {
            version: STATE_VERSION,
            from_pid: 42,
            next_id: 7,
            generation: 3,
            config_text: "[relay]\n".into(),
            listeners: vec![ListenerRecord {
                addr: "0.0.0.0:2222".parse().unwrap(),
                fd: 5,
            }],
            metrics_fd: Some(6),
            counters: vec![1, 2, 3],
            connections: vec![
                ConnRecord::Relay(Box::new(RelayRecord {
                    id: 3,
                    port: 2222,
                    upstream: "127.0.0.1:22".parse().unwrap(),
                    map: "C.1".into(),
                    client_addr: "10.0.0.1:5000".parse().unwrap(),
                    via: 1,
                    client: side(10),
                    upstream_side: side(11),
                    connected: true,
                    to_upstream: DirRecord {
                        state: 1,
                        bytes: 1 << 40,
                        streaming: true,
                        held: HeldBytes::Pipe {
                            read: 12,
                            write: 13,
                            in_flight: 4096,
                        },
                    },
                    to_client: DirRecord {
                        state: 0,
                        bytes: 9,
                        streaming: false,
                        held: HeldBytes::Buffer(b"tail".to_vec()),
                    },
                    age_ms: 1000,
                    idle_ms: 10,
                    first_eof: 1,
                    failure: Some((2, "x".into())),
                    hold: Some(HoldingRecord {
                        left_ms: 5,
                        attempts: 2,
                        backoff_ms: 100,
                        held: true,
                        waiting: true,
                        last_reason: Some(1),
                        last_error: Some("refused".into()),
                        replay: Some(ReplayRecord {
                            buf: b"SSH-2.0".to_vec(),
                            sent: 3,
                            counted: 7,
                            client_eof: false,
                            eof_passed: false,
                            first_byte: false,
                        }),
                    }),
                    attempt: 4,
                    ws: Some(vec![9; 20]),
                })),
                ConnRecord::Pending(PendingRecord {
                    client: side(14),
                    peer: "10.0.0.2:1".parse().unwrap(),
                    port: 443,
                    listen: "0.0.0.0:443".parse().unwrap(),
                    ws_head: Some(b"GET /".to_vec()),
                    left_ms: 900,
                }),
            ],
        }
    }

    #[test]
    fn a_state_comes_back_whole_and_its_fds_are_listed() {
        let bytes = sample().encode();
        let s = State::decode(&bytes).unwrap();
        assert_eq!(s.encode(), bytes);
        assert_eq!(s.fds(), vec![5, 6, 10, 11, 12, 13, 14]);
        let ConnRecord::Relay(r) = &s.connections[0] else {
            panic!()
        };
        assert_eq!(r.to_upstream.bytes, 1 << 40);
        assert_eq!(
            r.hold.as_ref().unwrap().replay.as_ref().unwrap().buf,
            b"SSH-2.0"
        );
    }

    #[test]
    fn a_wrong_version_truncation_or_garbage_is_refused() {
        let bytes = sample().encode();
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            State::decode(&other),
            Err(StateError::Version { found: 2 })
        ));
        assert!(matches!(
            State::decode(b"garbage!...."),
            Err(StateError::Magic)
        ));
        for cut in 12..bytes.len() {
            assert!(State::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
