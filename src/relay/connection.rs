//! One relayed connection: a client socket, an upstream socket and two directions
//! (client→upstream, upstream→client), each moving bytes through a pipe or buffer lent by
//! the loop's pool. Backend-agnostic: the loop feeds readiness in, this moves bytes.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::admission::{MappingPermit, Permit};
use super::backend::driver::{Chunk, Driver, Key, Received, Sent, Tag};
use super::codec::Codec;
use super::hold::{Holding, ReplayStep};
use super::pipe::{Hold, PipePool};
use super::route::Route;
use crate::addr::ClientAddr;
use crate::limits::SourcePermit;
use crate::metrics::Via;
use crate::sys;

/// Why a connection ended: the `reason` of its close line, as the text says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent FIN first (and then both directions ended cleanly).
    ClientEof,
    /// The upstream sent FIN first.
    UpstreamEof,
    /// A peer reset its side (or a write to it failed as a reset does).
    Reset,
    /// No byte moved for `idle_timeout`.
    Idle,
    /// A reload removed or retargeted its port (`removed_mapping = "close"`).
    Reload,
    /// `shutdown_grace` ran out after SIGTERM.
    Shutdown,
    /// `portrelay kill` ended it.
    Killed,
    /// Anything else, with what failed: `error: connect: timed out`, `error: …`.
    Error(String),
}

impl CloseReason {
    /// The reason of an ended connection whose socket call failed with `e`.
    pub fn of(e: &io::Error) -> CloseReason {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => CloseReason::Reset,
            _ => CloseReason::Error(e.to_string()),
        }
    }

    /// The reason of a failed upstream connect.
    pub fn connect(e: &io::Error) -> CloseReason {
        if e.kind() == io::ErrorKind::TimedOut {
            CloseReason::Error("connect: timed out".into())
        } else {
            CloseReason::Error(format!("connect: {e}"))
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::ClientEof => "client_eof",
            CloseReason::UpstreamEof => "upstream_eof",
            CloseReason::Reset => "reset",
            CloseReason::Idle => "idle",
            CloseReason::Reload => "reload",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Killed => "killed",
            CloseReason::Error(what) => return write!(f, "error: {what}"),
        })
    }
}

/// A spliced read smaller than this sends a direction back to the copy path.
pub(super) const STREAMING_READ: usize = 16 * 1024;

/// Reads a direction may make in one turn before the loop serves other connections.
pub(super) const ROUNDS_PER_TURN: usize = 16;

/// One end of a connection, with what the driver last told us about it.
pub struct Side {
    pub fd: OwnedFd,
    pub readable: bool,
    pub writable: bool,
    /// The peer has closed (or reset): a short read no longer proves the socket empty,
    /// because its FIN may be queued behind the data without a new readiness report.
    pub hup: bool,
    /// The driver reported a pending socket error, not yet looked at.
    pub error: bool,
    /// The peer's FIN arrived while the connection was whole (the socket was seen in
    /// CLOSE_WAIT after a readiness report of it).
    pub fin: bool,
    /// A write found it reset before its FIN was seen (the write took the socket error): a
    /// read of 0 from it now is that reset, not an end of stream.
    pub reset: bool,
    /// The peer reset it, or a syscall on it failed: nothing more can be sent.
    pub dead: bool,
}

impl Side {
    pub fn new(fd: OwnedFd) -> Side {
        Side {
            fd,
            readable: false,
            writable: false,
            hup: false,
            error: false,
            fin: false,
            reset: false,
            dead: false,
        }
    }
}

/// The states of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfState {
    /// Moving bytes.
    Open,
    /// The source sent FIN: drain what is held, then shut down the destination's write side.
    Eof,
    /// FIN passed on to the destination.
    Closed,
    /// Ended by an error or reset; held bytes were dropped.
    Aborted,
}

pub struct Direction {
    pub state: HalfState,
    pub(super) hold: Option<Hold>,
    pub(super) in_flight: usize,
    /// Bytes delivered to the destination (exact: counted from splice/send return values).
    pub bytes: u64,
    /// Reads fill whole buffers: splice (zero-copy) pays off. Small reads (keystrokes, a
    /// request/response) go through a buffer instead, where a short read proves the socket
    /// empty and saves the `EAGAIN` read a splice would need.
    pub(super) streaming: bool,
    /// The copy path: small messages received and sent by the driver.
    pub(super) copying: Copying,
}

/// A direction on the copy path: the driver receives from the source into a chunk and
/// sends the chunk to the destination, one operation at a time (so at most one chunk per
/// direction, and none while it waits for bytes). Its completions come as events, taken in
/// at the direction's next turn.
#[derive(Default)]
pub(super) struct Copying {
    /// A receive from the source is in the driver.
    pub(super) receiving: bool,
    /// A send is in the driver, which holds the chunk meanwhile.
    pub(super) sending: bool,
    /// Bytes received and not yet (wholly) sent (not while the driver sends them).
    pub(super) chunk: Option<Chunk>,
    /// Bytes received while `chunk` was being sent: they go after it. The next receive
    /// starts once this is empty, so a direction holds at most two chunks.
    pub(super) queued: Option<Chunk>,
    /// A completion not taken in yet.
    pub(super) done: Option<Done>,
    /// The driver had no idle chunk: the next read is the loop's own, into a buffer.
    pub(super) starved: bool,
}

pub(super) enum Done {
    Received(Received),
    Sent(Sent),
}

/// What the copy path of one direction works with: the driver, and the keys of its source
/// and destination sockets.
pub(super) struct Copier<'a, D: Driver> {
    pub(super) io: &'a mut D,
    pub(super) keys: (Key, Key),
}

impl Copying {
    /// Whether the copy path has this direction now (an operation in the driver, bytes
    /// held, or a completion to take in): the splice path must not touch its sockets.
    pub(super) fn active(&self) -> bool {
        self.receiving
            || self.sending
            || self.chunk.is_some()
            || self.queued.is_some()
            || self.done.is_some()
    }
}

impl Direction {
    fn new() -> Direction {
        Direction {
            state: HalfState::Open,
            hold: None,
            in_flight: 0,
            bytes: 0,
            streaming: false,
            copying: Copying::default(),
        }
    }

    pub(super) fn ended(&self) -> bool {
        matches!(self.state, HalfState::Closed | HalfState::Aborted)
    }

    /// Ends the direction abruptly, dropping any held bytes (a pipe with bytes is closed).
    fn abort(&mut self, pool: &mut PipePool) {
        self.state = HalfState::Aborted;
        self.drop_hold(pool);
    }

    fn drop_hold(&mut self, pool: &mut PipePool) {
        self.copying.chunk = None;
        self.copying.queued = None;
        self.copying.done = None;
        if let Some(h) = self.hold.take() {
            if self.in_flight == 0 {
                pool.give_back(h);
            } else {
                pool.discard(h);
            }
        }
        self.in_flight = 0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ToUpstream,
    ToClient,
}

/// What a turn of [`Connection::pump`] left to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// Waiting for readiness (or finished).
    Wait,
    /// Still has work; serve others first, then come back.
    Yield,
}

/// The next connection id: relay-wide (one relay per process), so that ids are unique
/// across the loops and never reused while the relay runs.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Connection {
    /// Given at admission; what `portrelay sessions` shows and `portrelay kill` takes.
    pub id: u64,
    pub client: Side,
    pub upstream: Side,
    pub connected: bool,
    pub to_upstream: Direction,
    pub to_client: Direction,
    pub route: Arc<Route>,
    pub client_addr: ClientAddr,
    pub via: Via,
    /// How the client end carries its bytes.
    pub codec: Codec,
    /// Its places in the relay-wide and the mapping's cap, and in its source's counts,
    /// until it ends.
    pub caps: Option<(Permit, MappingPermit, SourcePermit)>,
    pub started: Instant,
    pub last_active: Instant,
    /// With a `hold`: its retry state, until the upstream's first byte.
    pub hold: Option<Box<Holding>>,
    /// The upstream socket's connect attempt (its events' keys carry it).
    pub attempt: u8,
    /// Its sockets are watched as the copy path reads them (see `reads_quietly`).
    pub quiet: bool,
    /// Which side sent FIN first: the reason of a clean end.
    first_eof: Option<CloseReason>,
    /// The reason of an unclean end (reset, error), first one wins.
    failure: Option<CloseReason>,
}

/// What admission decided about a connection: where it goes, who it is, how it came.
pub struct Admitted {
    pub route: Arc<Route>,
    pub client_addr: ClientAddr,
    pub via: Via,
    pub codec: Codec,
    pub caps: (Permit, MappingPermit, SourcePermit),
}

impl Connection {
    /// Whether its sockets are read by the copy path (and the splice path, which asks for
    /// each readability report): plain bytes, not held. Everything else reads on every
    /// readiness report.
    pub fn reads_quietly(&self) -> bool {
        matches!(self.codec, Codec::Plain) && self.hold.is_none()
    }

    pub fn new(client: Side, upstream: OwnedFd, admitted: Admitted, now: Instant) -> Connection {
        let Admitted {
            route,
            client_addr,
            via,
            codec,
            caps,
        } = admitted;
        Connection {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            client,
            upstream: Side::new(upstream),
            connected: false,
            quiet: false,
            to_upstream: Direction::new(),
            to_client: Direction::new(),
            route,
            client_addr,
            via,
            codec,
            caps: Some(caps),
            started: now,
            last_active: now,
            hold: None,
            attempt: 0,
            first_eof: None,
            failure: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.to_upstream.ended() && self.to_client.ended()
    }

    /// Why the connection ended (meaningful once `is_done`).
    pub fn reason(&self) -> CloseReason {
        self.failure
            .clone()
            .or_else(|| self.first_eof.clone())
            .unwrap_or_else(|| CloseReason::Error("ended without cause".into()))
    }

    pub fn duration(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Moves bytes both ways until each direction blocks, ends, or uses up its turn. `key`
    /// is the connection's (its client socket's) key.
    pub fn pump<D: Driver>(&mut self, key: Key, pool: &mut PipePool, io: &mut D) -> Turn {
        if let Some(replay) = self.hold.as_mut().and_then(|h| h.replay.as_mut()) {
            let (step, fresh) = replay.pump(&mut self.client, &mut self.upstream);
            self.to_upstream.bytes += fresh;
            match step {
                ReplayStep::Wait => return Turn::Wait,
                ReplayStep::Lost(e) => {
                    if let Some(h) = self.hold.as_mut() {
                        h.lost = Some(e);
                    }
                    return Turn::Wait;
                }
                ReplayStep::ClientFailed(e) => {
                    self.client.dead = true;
                    self.abort(CloseReason::of(&e), pool);
                    return Turn::Wait;
                }
                ReplayStep::UpstreamFailed(e) => {
                    self.upstream.dead = true;
                    self.abort(CloseReason::of(&e), pool);
                    return Turn::Wait;
                }
                ReplayStep::Done {
                    client_eof,
                    eof_passed,
                } => {
                    // The data path takes over, where the copy left the client's stream.
                    self.hold = None;
                    if client_eof {
                        self.to_upstream.state = if eof_passed {
                            HalfState::Closed
                        } else {
                            HalfState::Eof
                        };
                        self.first_eof.get_or_insert(CloseReason::ClientEof);
                    }
                }
            }
        }
        self.notice_errors(pool);
        let keys = self.keys(key);
        let a = self.pump_dir(Dir::ToUpstream, pool, io, keys);
        let b = self.pump_dir(Dir::ToClient, pool, io, keys);
        if a == Turn::Yield || b == Turn::Yield {
            Turn::Yield
        } else {
            Turn::Wait
        }
    }

    /// The keys of the client and the upstream socket (of the current attempt).
    pub fn keys(&self, key: Key) -> (Key, Key) {
        let client = key.with_tag(Tag::Client);
        (
            client,
            client.with_tag(Tag::Upstream).with_attempt(self.attempt),
        )
    }

    /// The direction a copy-path completion on the socket `side` is about: a receive
    /// reads its source, a send writes its destination.
    pub fn copying_of(&mut self, side: Key, received: bool) -> Option<&mut Direction> {
        let upstream = match side.tag() {
            Tag::Client => false,
            Tag::Upstream if side.attempt() == self.attempt => true,
            _ => return None,
        };
        Some(if upstream == received {
            &mut self.to_client
        } else {
            &mut self.to_upstream
        })
    }

    fn pump_dir<D: Driver>(
        &mut self,
        d: Dir,
        pool: &mut PipePool,
        io: &mut D,
        (client_key, upstream_key): (Key, Key),
    ) -> Turn {
        let (src, dst, dir, reverse, keys) = match d {
            Dir::ToUpstream => (
                &mut self.client,
                &mut self.upstream,
                &mut self.to_upstream,
                &mut self.to_client,
                (client_key, upstream_key),
            ),
            Dir::ToClient => (
                &mut self.upstream,
                &mut self.client,
                &mut self.to_client,
                &mut self.to_upstream,
                (upstream_key, client_key),
            ),
        };
        let last = reverse.ended();
        let copier = Copier { io, keys };
        let result = self.codec.pump(d, src, dst, dir, last, pool, copier);
        let eof_name = match d {
            Dir::ToUpstream => CloseReason::ClientEof,
            Dir::ToClient => CloseReason::UpstreamEof,
        };
        match result {
            Ok(turn) => {
                if dir.state != HalfState::Open && self.first_eof.is_none() {
                    self.first_eof = Some(eof_name);
                }
                turn
            }
            Err(Failure::Read(e)) => {
                // The source is gone: nothing more comes from it, nothing more reaches it.
                src.dead = true;
                dir.abort(pool);
                reverse.abort(pool);
                self.fail(&e);
                Turn::Wait
            }
            Err(Failure::Write(e)) => {
                // The destination is gone. What it sent before going may still be queued:
                // let the reverse direction read it. The write took the socket's error, so
                // the read of 0 that follows tells nothing (splice may even swallow the
                // ECONNRESET and leave EPIPE for the next call): it is the reset, unless the
                // peer's FIN was seen before (its stream ended cleanly, then it reset: the
                // tail of an scp that sshd sent before exiting is not turned into a reset).
                dst.dead = true;
                dst.readable = true;
                dir.abort(pool);
                if !dst.fin {
                    dst.reset = true;
                    self.fail(&e);
                }
                Turn::Yield
            }
        }
    }

    /// A socket whose own direction has ended is read no more, so a reset (or a peer that
    /// keepalive or `TCP_USER_TIMEOUT` found dead) would go unnoticed until the other peer
    /// writes: its pending error ends the connection now, and the other peer is reset.
    fn notice_errors(&mut self, pool: &mut PipePool) {
        for d in [Dir::ToUpstream, Dir::ToClient] {
            let (src, dir) = match d {
                Dir::ToUpstream => (&mut self.client, &self.to_upstream),
                Dir::ToClient => (&mut self.upstream, &self.to_client),
            };
            if !std::mem::take(&mut src.error) || src.dead || dir.state == HalfState::Open {
                continue;
            }
            if let Ok(Some(e)) = SockRef::from(&src.fd).take_error() {
                // A direction that already passed its FIN on stays closed: that peer has
                // everything and is closed gracefully; the others end now.
                src.dead = true;
                for dir in [&mut self.to_upstream, &mut self.to_client] {
                    if !dir.ended() {
                        dir.abort(pool);
                    }
                }
                self.fail(&e);
            }
        }
    }

    fn fail(&mut self, e: &io::Error) {
        self.failure.get_or_insert_with(|| CloseReason::of(e));
    }

    /// Ends the connection now, for `reason` (idle, shutdown, reload, connect errors).
    pub fn abort(&mut self, reason: CloseReason, pool: &mut PipePool) {
        self.failure.get_or_insert(reason);
        self.to_upstream.abort(pool);
        self.to_client.abort(pool);
    }

    /// Closes both sockets once the connection is done. A peer that got our FIN is closed
    /// gracefully (its unread bytes are discarded first, so the kernel does not answer them
    /// with a reset that would drop the tail of what we sent); a live peer whose other side
    /// failed is reset, so it learns of the failure. Returns the two sockets for the loop to
    /// close (through its driver, which knows when the kernel is done with them).
    pub fn close(self, pool: &mut PipePool) -> [OwnedFd; 2] {
        let Connection {
            client,
            upstream,
            mut to_upstream,
            mut to_client,
            ..
        } = self;
        to_upstream.drop_hold(pool);
        to_client.drop_hold(pool);
        [
            close_side(client, &to_client, &to_upstream),
            close_side(upstream, &to_upstream, &to_client),
        ]
    }
}

impl Connection {
    /// Lets go of a connection handed over at an upgrade: its held bytes are the new
    /// process's (a pipe is closed here, not pooled: the new process holds it too), its
    /// places in the caps are given back, and its two sockets come back to be closed as
    /// they are: no shutdown, no linger, no draining (the new process holds them).
    pub fn forget(self, pool: &mut PipePool) -> [OwnedFd; 2] {
        let Connection {
            client,
            upstream,
            mut to_upstream,
            mut to_client,
            mut hold,
            route,
            ..
        } = self;
        for dir in [&mut to_upstream, &mut to_client] {
            if let Some(h) = dir.hold.take() {
                pool.discard(h);
            }
        }
        if let Some(h) = hold.as_mut() {
            h.release(&route.mapping);
        }
        route.metrics.active.decrement(1.0);
        [client.fd, upstream.fd]
    }
}

fn close_side(side: Side, inbound: &Direction, outbound: &Direction) -> OwnedFd {
    if side.dead {
        return side.fd;
    }
    if inbound.state == HalfState::Closed {
        if outbound.state != HalfState::Closed {
            discard_unread(&side);
        }
        return side.fd;
    }
    let _ = SockRef::from(&side.fd).set_linger(Some(Duration::ZERO));
    side.fd
}

/// Reads and drops what a peer sent that will never be forwarded, until its socket is
/// empty: closing a socket with unread bytes sends a reset, which would throw away the tail
/// of what we sent that is still queued. Bounded (16 MiB, more than a receive buffer
/// holds), so a peer that keeps sending cannot hold the loop.
fn discard_unread(side: &Side) {
    let mut scratch = [0u8; 64 * 1024];
    for _ in 0..256 {
        match sys::recv(side.fd.as_raw_fd(), &mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => return,
        }
    }
}

pub(super) enum Failure {
    Read(io::Error),
    Write(io::Error),
}

/// Whether a drain emptied the hold or must wait for the destination.
pub(super) enum Drained {
    Empty,
    Blocked,
}

/// Moves held bytes into `dst`; gives the hold back to the pool once empty.
pub(super) fn drain(
    dst: &mut Side,
    dir: &mut Direction,
    pool: &mut PipePool,
) -> Result<Drained, Failure> {
    drain_up_to(dst, dir, pool, usize::MAX)
}

/// [`drain`] of at most `limit` bytes: `Empty` once they are delivered (the hold goes back
/// to the pool only when it is empty).
pub(super) fn drain_up_to(
    dst: &mut Side,
    dir: &mut Direction,
    pool: &mut PipePool,
    limit: usize,
) -> Result<Drained, Failure> {
    if dir.in_flight > 0 && limit > 0 {
        if !dst.writable {
            return Ok(Drained::Blocked);
        }
        let want = dir.in_flight.min(limit);
        let hold = dir.hold.as_mut().expect("bytes in flight have a hold");
        match hold.drain_to(dst.fd.as_raw_fd(), want) {
            Ok(n) => {
                dir.in_flight -= n;
                dir.bytes += n as u64;
                if n < want {
                    // A short write means the socket buffer is full; the kernel will report
                    // it writable again (it set SOCK_NOSPACE).
                    dst.writable = false;
                    return Ok(Drained::Blocked);
                }
            }
            Err(e) if would_block(&e) => {
                dst.writable = false;
                return Ok(Drained::Blocked);
            }
            Err(e) => return Err(Failure::Write(e)),
        }
    }
    if dir.in_flight == 0 {
        if let Some(h) = dir.hold.take() {
            pool.give_back(h);
        }
    }
    Ok(Drained::Empty)
}

/// The start of each round of a direction that delivers through a hold: deliver what is
/// held, then pass on an EOF once everything before it is delivered. `true`: the round
/// is over (the direction ended, the destination is full, or the EOF went on).
pub(super) fn deliver(
    dst: &mut Side,
    dir: &mut Direction,
    last: bool,
    pool: &mut PipePool,
) -> Result<bool, Failure> {
    if dir.ended() {
        return Ok(true);
    }
    if let Drained::Blocked = drain(dst, dir, pool)? {
        return Ok(true);
    }
    if dir.state == HalfState::Eof {
        // Everything is delivered: pass the half-close on, keep the other direction.
        pass_eof(dst, dir, last);
        return Ok(true);
    }
    Ok(false)
}

/// Passes a half-close on once everything before it is delivered. When the other
/// direction has ended too, the connection closes next and close(2) sends this FIN: no
/// shutdown call.
pub(super) fn pass_eof(dst: &Side, dir: &mut Direction, last: bool) {
    if !last {
        let _ = SockRef::from(&dst.fd).shutdown(Shutdown::Write);
    }
    dir.state = HalfState::Closed;
}

/// The source's read returned end of stream. After a write to that socket failed before its
/// FIN was seen (a reset first seen by `send`/`splice` consumes the socket's error, and
/// reads then return 0), that is no clean end: it is the reset, passed on as one.
pub(super) fn end_of_stream(src: &Side, dir: &mut Direction) -> Result<(), Failure> {
    if src.reset {
        return Err(Failure::Read(io::Error::from_raw_os_error(
            libc::ECONNRESET,
        )));
    }
    dir.state = HalfState::Eof;
    Ok(())
}

pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// The ids go on across an upgrade: the new process starts where the old one was.
pub fn next_id() -> u64 {
    NEXT_ID.load(Ordering::Relaxed)
}

pub fn continue_ids_from(next: u64) {
    NEXT_ID.fetch_max(next, Ordering::Relaxed);
}

/// A connection across an upgrade: saved as plain records (its descriptors by number, the
/// new process inherits them), rebuilt from them in the new process.
mod saved {
    use std::collections::HashMap;
    use std::os::fd::RawFd;

    use super::*;
    use crate::upgrade::state::{DirRecord, HeldBytes, RelayRecord, SideRecord};

    impl Side {
        pub fn save(&self) -> SideRecord {
            let s = SockRef::from(&self.fd);
            let flags = [
                self.readable,
                self.writable,
                self.hup,
                self.error,
                self.fin,
                self.reset,
                self.dead,
            ]
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, on)| acc | (u8::from(*on) << i));
            SideRecord {
                fd: self.fd.as_raw_fd(),
                local: s.local_addr().ok().and_then(|a| a.as_socket()),
                peer: s.peer_addr().ok().and_then(|a| a.as_socket()),
                flags,
            }
        }

        /// The inherited socket `fd`, checked against its record: a socket, with the local
        /// and peer addresses the old process saw (so a descriptor number that names
        /// something else is refused, never relayed to).
        pub fn adopt(r: &SideRecord, fd: OwnedFd) -> io::Result<Side> {
            if sys::file_type(fd.as_raw_fd())? != libc::S_IFSOCK {
                return Err(io::Error::other(format!("fd {} is not a socket", r.fd)));
            }
            let s = SockRef::from(&fd);
            let local = s.local_addr().ok().and_then(|a| a.as_socket());
            // A peer that reset or finished closing since the record has no address any
            // more (ENOTCONN): the socket is still the one recorded; its end shows at the
            // first read.
            let peer = s.peer_addr().ok().and_then(|a| a.as_socket());
            if local != r.local || (r.peer.is_some() && peer.is_some() && peer != r.peer) {
                return Err(io::Error::other(format!(
                    "fd {}: addresses {local:?} → {peer:?}, its record says {:?} → {:?}",
                    r.fd, r.local, r.peer
                )));
            }
            let bit = |i: u8| r.flags & (1 << i) != 0;
            Ok(Side {
                fd,
                readable: bit(0),
                writable: bit(1),
                hup: bit(2),
                error: bit(3),
                fin: bit(4),
                reset: bit(5),
                dead: bit(6),
            })
        }
    }

    fn state_code(s: HalfState) -> u8 {
        match s {
            HalfState::Open => 0,
            HalfState::Eof => 1,
            HalfState::Closed => 2,
            HalfState::Aborted => 3,
        }
    }

    fn state_of(code: u8) -> HalfState {
        match code {
            0 => HalfState::Open,
            1 => HalfState::Eof,
            2 => HalfState::Closed,
            _ => HalfState::Aborted,
        }
    }

    impl Direction {
        fn save(&self) -> DirRecord {
            DirRecord {
                state: state_code(self.state),
                bytes: self.bytes,
                streaming: self.streaming,
                held: match &self.hold {
                    Some(h) if self.in_flight > 0 => h.save(self.in_flight),
                    // The copy path's chunks, in order: their bytes go over, the new
                    // process sends them.
                    _ => {
                        let c = &self.copying;
                        let bytes: Vec<u8> = [&c.chunk, &c.queued]
                            .into_iter()
                            .flatten()
                            .flat_map(|c| c.bytes().iter().copied())
                            .collect();
                        if bytes.is_empty() {
                            HeldBytes::None
                        } else {
                            HeldBytes::Buffer(bytes)
                        }
                    }
                },
            }
        }

        fn adopt(
            r: &DirRecord,
            fds: &mut HashMap<RawFd, OwnedFd>,
            pool: &mut PipePool,
        ) -> io::Result<Direction> {
            let (hold, in_flight) = match &r.held {
                HeldBytes::None => (None, 0),
                HeldBytes::Pipe {
                    read,
                    write,
                    in_flight,
                } => {
                    let (read, write) = (take(fds, *read)?, take(fds, *write)?);
                    let n = *in_flight as usize;
                    (Some(pool.adopt_pipe(read, write, n)?), n)
                }
                HeldBytes::Buffer(b) => (Some(pool.adopt_bytes(b)?), b.len()),
            };
            Ok(Direction {
                state: state_of(r.state),
                hold,
                in_flight,
                bytes: r.bytes,
                streaming: r.streaming,
                copying: Copying::default(),
            })
        }
    }

    /// The inherited descriptor `fd`, taken from the table of them (each once).
    pub fn take(fds: &mut HashMap<RawFd, OwnedFd>, fd: RawFd) -> io::Result<OwnedFd> {
        fds.remove(&fd)
            .ok_or_else(|| io::Error::other(format!("fd {fd} was not handed over")))
    }

    impl CloseReason {
        fn save(&self) -> (u8, String) {
            match self {
                CloseReason::ClientEof => (0, String::new()),
                CloseReason::UpstreamEof => (1, String::new()),
                CloseReason::Reset => (2, String::new()),
                CloseReason::Idle => (3, String::new()),
                CloseReason::Reload => (4, String::new()),
                CloseReason::Shutdown => (5, String::new()),
                CloseReason::Killed => (6, String::new()),
                CloseReason::Error(e) => (7, e.clone()),
            }
        }

        fn load(kind: u8, detail: &str) -> CloseReason {
            match kind {
                0 => CloseReason::ClientEof,
                1 => CloseReason::UpstreamEof,
                2 => CloseReason::Reset,
                3 => CloseReason::Idle,
                4 => CloseReason::Reload,
                5 => CloseReason::Shutdown,
                6 => CloseReason::Killed,
                _ => CloseReason::Error(detail.to_string()),
            }
        }
    }

    impl Connection {
        /// Its record, or `None` when it cannot move: a TLS session's state stays in this
        /// process.
        pub fn save(&self, now: Instant) -> Option<RelayRecord> {
            let ws = match &self.codec {
                Codec::Plain => None,
                Codec::WebSocket(ws) if ws.can_move() => Some(ws.save()),
                Codec::WebSocket(_) | Codec::Tls(_) => return None,
            };
            Some(RelayRecord {
                id: self.id,
                port: self.route.port,
                upstream: self.route.upstream.0,
                map: self.route.mapping.name.clone(),
                client_addr: self.client_addr.0,
                via: self.via as u8,
                client: self.client.save(),
                upstream_side: self.upstream.save(),
                connected: self.connected,
                to_upstream: self.to_upstream.save(),
                to_client: self.to_client.save(),
                age_ms: now.saturating_duration_since(self.started).as_millis() as u64,
                idle_ms: now.saturating_duration_since(self.last_active).as_millis() as u64,
                first_eof: match self.first_eof {
                    Some(CloseReason::ClientEof) => 1,
                    Some(CloseReason::UpstreamEof) => 2,
                    _ => 0,
                },
                failure: self.failure.as_ref().map(CloseReason::save),
                hold: self.hold.as_ref().map(|h| h.save(now)),
                attempt: self.attempt,
                ws,
            })
        }

        /// The connection `r` describes, on its inherited sockets and pipes (taken from
        /// `fds`), counted in `caps`. A connect that was in flight is not resumed here:
        /// the caller starts a new one (`connected` is false).
        pub fn adopt(
            r: &RelayRecord,
            fds: &mut HashMap<RawFd, OwnedFd>,
            route: Arc<Route>,
            caps: (Permit, MappingPermit, SourcePermit),
            pool: &mut PipePool,
            now: Instant,
        ) -> io::Result<Connection> {
            let client = Side::adopt(&r.client, take(fds, r.client.fd)?)?;
            let upstream = Side::adopt(&r.upstream_side, take(fds, r.upstream_side.fd)?)?;
            let codec = match &r.ws {
                None => Codec::Plain,
                Some(bytes) => Codec::WebSocket(Box::new(
                    super::super::codec::WsCodec::load(bytes).map_err(io::Error::other)?,
                )),
            };
            let to_upstream = Direction::adopt(&r.to_upstream, fds, pool)?;
            let to_client = Direction::adopt(&r.to_client, fds, pool)?;
            let hold = r
                .hold
                .as_ref()
                .map(|h| Box::new(Holding::load(h, now, &route.mapping)));
            let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
            Ok(Connection {
                id: r.id,
                client,
                upstream,
                connected: r.connected,
                // Watched as `reads_quietly` says at adoption; its first turn confirms it.
                quiet: false,
                to_upstream,
                to_client,
                client_addr: ClientAddr(r.client_addr),
                via: Via::ALL.get(r.via as usize).copied().unwrap_or(Via::Direct),
                codec,
                caps: Some(caps),
                started: ago(r.age_ms),
                last_active: ago(r.idle_ms),
                hold,
                attempt: r.attempt % super::super::backend::driver::ATTEMPTS,
                first_eof: match r.first_eof {
                    1 => Some(CloseReason::ClientEof),
                    2 => Some(CloseReason::UpstreamEof),
                    _ => None,
                },
                failure: r.failure.as_ref().map(|(k, d)| CloseReason::load(*k, d)),
                route,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn close_reasons_read_as_the_log_contract_says() {
        let cases = [
            (CloseReason::ClientEof, "client_eof"),
            (CloseReason::UpstreamEof, "upstream_eof"),
            (CloseReason::Reset, "reset"),
            (CloseReason::Idle, "idle"),
            (CloseReason::Reload, "reload"),
            (CloseReason::Shutdown, "shutdown"),
            (CloseReason::Killed, "killed"),
            (
                CloseReason::of(&io::Error::from_raw_os_error(libc::EPIPE)),
                "reset",
            ),
            (
                CloseReason::connect(&io::Error::from(io::ErrorKind::TimedOut)),
                "error: connect: timed out",
            ),
            (
                CloseReason::connect(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
                "error: connect: Connection refused (os error 111)",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    /// Closing a socket that still has unread bytes sends a reset, which throws away what
    /// is still queued towards that peer: before a graceful close every unread byte is
    /// read, however many the peer sent (here over 64 KiB).
    #[test]
    fn discard_unread_empties_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0;
        for _ in 0..16 {
            match peer.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(sent > 128 * 1024, "sent only {sent} bytes");
        // Wait (bounded) until more than 64 KiB has arrived.
        let mut probe = vec![0u8; 256 * 1024];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let queued = sys::peek(ours.as_raw_fd(), &mut probe).unwrap_or(0);
            if queued > 96 * 1024 || Instant::now() > deadline {
                assert!(queued > 96 * 1024, "only {queued} bytes arrived");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let side = Side::new(OwnedFd::from(ours));
        discard_unread(&side);
        let mut one = [0u8; 1];
        match sys::recv(side.fd.as_raw_fd(), &mut one) {
            Err(e) if would_block(&e) => {}
            other => panic!("the socket still has unread bytes: {other:?}"),
        }
    }
}
