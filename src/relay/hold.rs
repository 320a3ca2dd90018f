//! Held connections: while a mapping's upstream refuses or times out (its instance boots),
//! a connection with a `hold` keeps its client (not read, beyond the replay copy) and
//! retries the connect with a new upstream socket each time, backing off from 50 ms to
//! 1 s, until `hold` has passed.
//!
//! The replay copy: what the client sent (up to [`REPLAY_MAX`]) is kept until the
//! upstream's first byte, so that an upstream that accepts and closes before saying
//! anything (an sshd restarted during boot, a container whose port is published before its
//! sshd listens) is retried with nothing lost: the client has seen no byte of it. The copy
//! is kept for plain client ends only (direct and PROXY entrances); a TLS or WebSocket
//! client end is retried only while its connect fails.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::connection::{would_block, Side};
use super::route::MappingState;
use crate::metrics::ConnectFailure;
use crate::sys;

/// The most of the client's bytes a held connection keeps; past it the client is not read
/// until the upstream's first byte.
pub const REPLAY_MAX: usize = 64 * 1024;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The retry state of a connection with a `hold`, until its upstream's first byte (or,
/// without a replay copy, until its connect succeeds).
pub struct Holding {
    /// When it gives up.
    pub until: Instant,
    /// Connects started, this one included.
    pub attempts: u32,
    backoff: Duration,
    /// Counted as held (in its mapping's count and gauge): a connect failed and no later
    /// one has succeeded yet.
    pub held: bool,
    /// Waiting for its retry timer: no connect in flight.
    pub waiting: bool,
    /// The last connect failure's reason, for the one count when it gives up.
    pub last_reason: Option<ConnectFailure>,
    /// The last failure, for the close reason when it gives up.
    pub last_error: Option<io::Error>,
    pub replay: Option<Replay>,
    /// The upstream closed or reset before its first byte: the loop retries or gives up.
    pub lost: Option<io::Error>,
}

impl Holding {
    pub fn new(now: Instant, hold: Duration, replay: bool) -> Holding {
        Holding {
            until: super::deadline(now, hold),
            attempts: 1,
            backoff: BACKOFF_FIRST,
            held: false,
            waiting: false,
            last_reason: None,
            last_error: None,
            replay: replay.then(Replay::default),
            lost: None,
        }
    }

    /// The wait before the next attempt: 50 ms, doubling up to 1 s.
    pub fn next_backoff(&mut self) -> Duration {
        let b = self.backoff;
        self.backoff = (b * 2).min(BACKOFF_MAX);
        b
    }

    /// Counts it as held; returns whether that began a waiting spell of its mapping.
    pub fn hold(&mut self, m: &MappingState) -> bool {
        if self.held {
            return false;
        }
        self.held = true;
        m.metrics.held.increment(1.0);
        m.held.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// No longer counted as held.
    pub fn release(&mut self, m: &MappingState) {
        if std::mem::take(&mut self.held) {
            m.metrics.held.decrement(1.0);
            m.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What the client sent, kept until the upstream's first byte.
#[derive(Default)]
pub struct Replay {
    buf: Vec<u8>,
    /// Bytes of `buf` sent to the current upstream socket.
    sent: usize,
    /// Bytes of `buf` counted as delivered (the most any attempt sent).
    counted: usize,
    client_eof: bool,
    /// The client's EOF was passed on to the current upstream socket.
    eof_passed: bool,
    first_byte: bool,
}

/// What a turn of [`Replay::pump`] came to.
pub enum ReplayStep {
    /// Waiting for readiness.
    Wait,
    /// The upstream closed or reset before its first byte: retry while the hold lasts.
    Lost(io::Error),
    /// Reading the client failed.
    ClientFailed(io::Error),
    /// Writing the upstream failed after its first byte.
    UpstreamFailed(io::Error),
    /// The upstream's first byte came and the copy is all sent: the data path takes over.
    /// `client_eof`: the client's EOF came meanwhile; `eof_passed`: and went on.
    Done { client_eof: bool, eof_passed: bool },
}

impl Replay {
    /// For the next upstream socket: everything is sent again.
    pub fn restart(&mut self) {
        self.sent = 0;
        self.eof_passed = false;
        self.first_byte = false;
    }

    /// Reads the client into the copy, sends the copy on, and watches for the upstream's
    /// first byte (peeked: the data path reads it). Returns the step and how many bytes
    /// were delivered for the first time.
    pub fn pump(&mut self, client: &mut Side, upstream: &mut Side) -> (ReplayStep, u64) {
        let step = self.turn(client, upstream);
        let fresh = self.sent.saturating_sub(self.counted);
        self.counted += fresh;
        (step, fresh as u64)
    }

    fn turn(&mut self, client: &mut Side, upstream: &mut Side) -> ReplayStep {
        loop {
            if !self.first_byte && (upstream.readable || upstream.hup || upstream.error) {
                let mut one = [0u8; 1];
                match sys::peek(upstream.fd.as_raw_fd(), &mut one) {
                    Ok(0) => {
                        return ReplayStep::Lost(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed before its first byte",
                        ))
                    }
                    Ok(_) => self.first_byte = true,
                    Err(e) if would_block(&e) => {
                        upstream.readable = false;
                        upstream.error = false;
                    }
                    Err(e) => return ReplayStep::Lost(e),
                }
            }
            if self.sent < self.buf.len() && upstream.writable {
                match sys::send(upstream.fd.as_raw_fd(), &self.buf[self.sent..]) {
                    Ok(n) => {
                        self.sent += n;
                        if self.sent < self.buf.len() {
                            upstream.writable = false;
                        }
                    }
                    Err(e) if would_block(&e) => upstream.writable = false,
                    Err(e) if self.first_byte => return ReplayStep::UpstreamFailed(e),
                    Err(e) => return ReplayStep::Lost(e),
                }
            }
            if self.first_byte && self.sent == self.buf.len() {
                return ReplayStep::Done {
                    client_eof: self.client_eof,
                    eof_passed: self.eof_passed,
                };
            }
            if client.readable && !self.client_eof && self.buf.len() < REPLAY_MAX {
                let mut chunk = [0u8; 16 * 1024];
                let room = (REPLAY_MAX - self.buf.len()).min(chunk.len());
                match sys::recv(client.fd.as_raw_fd(), &mut chunk[..room]) {
                    Ok(0) => self.client_eof = true,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if would_block(&e) => client.readable = false,
                    Err(e) => return ReplayStep::ClientFailed(e),
                }
                continue;
            }
            if self.client_eof && !self.eof_passed && self.sent == self.buf.len() {
                let _ = SockRef::from(&upstream.fd).shutdown(Shutdown::Write);
                self.eof_passed = true;
            }
            return ReplayStep::Wait;
        }
    }

    /// Bytes kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
}

/// A held connection's retry state across an upgrade (deadlines as time left).
impl Holding {
    pub fn save(&self, now: Instant) -> crate::upgrade::state::HoldingRecord {
        use crate::upgrade::state::{HoldingRecord, ReplayRecord};
        HoldingRecord {
            left_ms: self.until.saturating_duration_since(now).as_millis() as u64,
            attempts: self.attempts,
            backoff_ms: self.backoff.as_millis() as u64,
            held: self.held,
            waiting: self.waiting,
            last_reason: self.last_reason.map(|r| r as u8),
            last_error: self.last_error.as_ref().map(|e| e.to_string()),
            replay: self.replay.as_ref().map(|r| ReplayRecord {
                buf: r.buf.clone(),
                sent: r.sent as u64,
                counted: r.counted as u64,
                client_eof: r.client_eof,
                eof_passed: r.eof_passed,
                first_byte: r.first_byte,
            }),
        }
    }

    /// The state `save` wrote. `held` is counted again in its mapping (the new process's
    /// gauges start from what it adopts).
    pub fn load(
        r: &crate::upgrade::state::HoldingRecord,
        now: Instant,
        m: &MappingState,
    ) -> Holding {
        let mut h = Holding {
            until: super::deadline(now, Duration::from_millis(r.left_ms)),
            attempts: r.attempts,
            backoff: Duration::from_millis(r.backoff_ms).clamp(BACKOFF_FIRST, BACKOFF_MAX),
            held: false,
            waiting: r.waiting,
            last_reason: r
                .last_reason
                .and_then(|i| ConnectFailure::ALL.get(i as usize).copied()),
            last_error: r.last_error.clone().map(io::Error::other),
            replay: r.replay.as_ref().map(|p| Replay {
                sent: (p.sent as usize).min(p.buf.len()),
                counted: (p.counted as usize).min(p.buf.len()),
                buf: p.buf.clone(),
                client_eof: p.client_eof,
                eof_passed: p.eof_passed,
                first_byte: p.first_byte,
            }),
            lost: None,
        };
        if r.held {
            h.hold(m);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::OwnedFd;

    use super::*;

    /// A held connection's retry state across an upgrade: attempts, backoff, the replay
    /// copy and how much of it went out come back; deadlines come back as time left; a
    /// connection counted as held is counted again in the new process's mapping.
    #[test]
    fn holding_comes_back_from_its_record() {
        let mapping = || {
            crate::relay::route::MappingState::new(
                &crate::control::Mapping::detached("C.1", 2222, "127.0.0.1:22".parse().unwrap()),
                None,
            )
        };
        let m = mapping();
        let now = Instant::now();
        let mut h = Holding::new(now, Duration::from_secs(30), true);
        h.attempts = 4;
        h.next_backoff();
        h.next_backoff();
        h.waiting = true;
        h.hold(&m);
        h.last_reason = Some(ConnectFailure::Refused);
        h.last_error = Some(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        let r = h.replay.as_mut().unwrap();
        r.buf = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec();
        r.sent = 5;
        r.counted = 21;
        let rec = h.save(now + Duration::from_secs(10));
        assert_eq!(rec.left_ms, 20_000);
        let later = now + Duration::from_secs(100);
        let m2 = mapping();
        let back = Holding::load(&rec, later, &m2);
        assert_eq!(back.until, later + Duration::from_secs(20));
        assert_eq!(
            (back.attempts, back.backoff, back.waiting, back.held),
            (4, Duration::from_millis(200), true, true)
        );
        assert_eq!(m2.held.load(Ordering::Acquire), 1, "counted as held again");
        assert_eq!(back.last_reason, Some(ConnectFailure::Refused));
        let p = back.replay.as_ref().unwrap();
        assert_eq!(
            (p.buf.as_slice(), p.sent, p.counted),
            (&b"SSH-2.0-OpenSSH_9.2\r\n"[..], 5, 21)
        );
    }

    #[test]
    fn backoff_doubles_from_50_ms_to_1_s() {
        let mut h = Holding::new(Instant::now(), Duration::from_secs(20), false);
        let waits: Vec<u64> = (0..8)
            .map(|_| h.next_backoff().as_millis() as u64)
            .collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    fn pair() -> (TcpStream, Side) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut side = Side::new(OwnedFd::from(ours));
        side.readable = true;
        side.writable = true;
        (peer, side)
    }

    /// The copy is sent to each new upstream in full, counted once, and at most
    /// `REPLAY_MAX` bytes of the client are read.
    #[test]
    fn the_copy_goes_to_every_attempt_and_is_capped() {
        let (mut client, mut c) = pair();
        client.write_all(&vec![7u8; REPLAY_MAX + 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut r = Replay::default();
        let mut delivered = 0;
        for attempt in 0..2 {
            let (mut up_peer, mut up) = pair();
            up.readable = false;
            if attempt == 1 {
                r.restart();
            }
            let mut got = Vec::new();
            while got.len() < REPLAY_MAX {
                let (step, fresh) = r.pump(&mut c, &mut up);
                delivered += fresh;
                assert!(matches!(step, ReplayStep::Wait));
                up.writable = true;
                let mut buf = [0u8; 65536];
                up_peer
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let n = up_peer.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), REPLAY_MAX, "attempt {attempt}");
            assert_eq!(r.len(), REPLAY_MAX);
            if attempt == 1 {
                // The upstream speaks: done once all is sent.
                up_peer.write_all(b"SSH-2.0-x\r\n").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                up.readable = true;
                let (step, _) = r.pump(&mut c, &mut up);
                assert!(matches!(step, ReplayStep::Done { .. }));
            } else {
                drop(up_peer);
                std::thread::sleep(Duration::from_millis(50));
                up.readable = true;
                let (step, _) = r.pump(&mut c, &mut up);
                assert!(matches!(step, ReplayStep::Lost(_)));
            }
        }
        assert_eq!(delivered, REPLAY_MAX as u64, "counted once");
    }
}
