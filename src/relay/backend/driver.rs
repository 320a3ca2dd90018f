//! The small interface between the event loop and its io backend: readiness for the splice
//! path, completions (receive into a copy buffer, send it) for the copy path. The loop (and
//! the connection state machine in it) is written once against [`Driver`]; `uring.rs` and
//! `epoll.rs` are its two implementations (epoll does the copy path's reads and writes
//! itself, as completions that are ready at once).

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use socket2::SockAddr;

pub use super::chunk::{Chunk, Chunks, CHUNK_SIZE, DEFAULT_CHUNKS};
pub use crate::sys::{PeerAddr, SockOpt};

/// Names what an event is about: a slot in the loop's tables, the slot's generation (so an
/// event for a reused slot is recognised as stale), which operation or socket, and (for an
/// upstream socket) which connect attempt: a held connection gets a new upstream socket per
/// attempt, and a completion of an earlier attempt's socket must not be taken for the
/// current one's. Bits: slot 63..32, generation 31..8, attempt 6..3, tag 2..0; bit 7 tells
/// the side (upstream) of a copy-path operation's key (tags `Receive`, `Send`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Wake = 0,
    Listener = 1,
    Client = 2,
    Upstream = 3,
    /// io_uring only: completions of link timeouts and cancellations, ignored.
    Ignore = 4,
    /// io_uring only: a receive on the socket of the side the key names.
    Receive = 5,
    /// io_uring only: a send to it.
    Send = 6,
    /// io_uring only: a one-shot readability report on it ([`Driver::want_read`]).
    Readable = 7,
}

/// Attempts are numbered modulo this (4 bits of the key).
pub const ATTEMPTS: u8 = 16;

const UPSTREAM_OP: u64 = 1 << 7;

impl Key {
    pub fn new(tag: Tag, slot: u32, generation: u32) -> Key {
        Key((slot as u64) << 32 | ((generation & 0xff_ffff) as u64) << 8 | tag as u64)
    }
    pub fn tag(self) -> Tag {
        match self.0 & 0x7 {
            0 => Tag::Wake,
            1 => Tag::Listener,
            2 => Tag::Client,
            3 => Tag::Upstream,
            5 => Tag::Receive,
            6 => Tag::Send,
            7 => Tag::Readable,
            _ => Tag::Ignore,
        }
    }
    /// The key of an operation (`Receive`, `Send`, `Readable`) on the side `self` names.
    pub fn op(self, tag: Tag) -> Key {
        let side = if self.tag() == Tag::Upstream {
            UPSTREAM_OP
        } else {
            0
        };
        Key(self.0 & !0x87 | side | tag as u64)
    }
    /// The side an operation's key is about (the inverse of [`Key::op`]).
    pub fn side(self) -> Key {
        let tag = if self.0 & UPSTREAM_OP != 0 {
            Tag::Upstream
        } else {
            Tag::Client
        };
        Key(self.0 & !0x87 | tag as u64)
    }
    pub fn slot(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub fn generation(self) -> u32 {
        ((self.0 >> 8) & 0xff_ffff) as u32
    }
    /// The same slot and generation with another tag (attempt 0).
    pub fn with_tag(self, tag: Tag) -> Key {
        Key(self.0 & !0xff | tag as u64)
    }
    /// The same key for connect attempt `attempt` (modulo [`ATTEMPTS`]).
    pub fn with_attempt(self, attempt: u8) -> Key {
        Key(self.0 & !0x78 | u64::from(attempt % ATTEMPTS) << 3)
    }
    pub fn attempt(self) -> u8 {
        ((self.0 >> 3) & 0xf) as u8
    }
}

#[derive(Debug)]
pub enum Event {
    /// A connection accepted on the listener named by the key (non-blocking, close-on-exec),
    /// and its peer's address as accept gave it.
    Accepted(Key, OwnedFd, PeerAddr),
    /// Accepting on that listener failed; the driver has stopped accepting on it.
    AcceptFailed(Key, io::Error),
    /// The upstream connect started with [`Driver::connect`] finished.
    Connected(Key, io::Result<()>),
    /// The socket named by the key may have changed state. Edge-like: it is reported when
    /// the state changes, so the loop keeps its own readable/writable flags.
    Ready {
        key: Key,
        readable: bool,
        writable: bool,
        /// The peer closed or reset (RDHUP, HUP, ERR): reads must go on until they say so.
        hup: bool,
        /// The socket has a pending error (ERR): a reset, or a dead peer found by keepalive
        /// or `TCP_USER_TIMEOUT`.
        error: bool,
    },
    /// The driver stopped reporting on this socket on its own (io_uring: a multishot poll
    /// ended); call `watch` again to go on.
    Unwatched(Key),
    /// The loop's eventfd was signalled.
    Wake,
    /// The receive started with [`Driver::receive`] on the socket the key names finished:
    /// a chunk of bytes, `None` at the end of its stream, or an error (`ECANCELED`: called
    /// back, nothing was read; `ENOBUFS`: no idle chunk, nothing was read).
    Received(Key, io::Result<Option<Chunk>>),
    /// The send started with [`Driver::send`] to the socket the key names finished: how
    /// many bytes went out (the chunk has the rest, if any), or an error (`ECANCELED`:
    /// called back, nothing went out).
    Sent(Key, Chunk, io::Result<usize>),
}

/// What a copy-path operation gives back when it finishes at once.
pub type Received = io::Result<Option<Chunk>>;
pub type Sent = (Chunk, io::Result<usize>);

impl Event {
    /// The readiness report of the socket `key` names, from its poll mask (epoll's
    /// `EPOLL*` bits and poll's `POLL*` bits are the same on Linux).
    pub fn ready(key: Key, mask: u32) -> Event {
        let has = |bits: libc::c_short| mask & bits as u32 != 0;
        Event::Ready {
            key,
            readable: has(libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR),
            writable: has(libc::POLLOUT | libc::POLLHUP | libc::POLLERR),
            hup: has(libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR),
            error: has(libc::POLLERR),
        }
    }
}

pub trait Driver {
    /// Starts accepting on a listening socket (or resumes, after `pause_accept`; a no-op
    /// while accepting); connections arrive as [`Event::Accepted`]. The listener may be
    /// shared with other loops: each accepted connection goes to one.
    fn accept(&mut self, key: Key, fd: RawFd) -> io::Result<()>;
    /// Stops accepting on a listening socket. No `Accepted` with this key follows.
    fn stop_accept(&mut self, key: Key, fd: RawFd);
    /// Stops taking connections from a listening socket until `accept`, losing none: they
    /// wait in its listen queue (one the kernel already took still comes as `Accepted`).
    fn pause_accept(&mut self, key: Key, fd: RawFd);
    /// Called once the loop has admitted an `Accepted` connection and may take another:
    /// the listener's next waiting connection, taken now (`Accepted`, `AcceptFailed`), or
    /// `None` when none waits or when the backend reports each as an event of its own
    /// (then the next accept is started here, not before: none runs while the loop is not
    /// ready for one).
    fn accept_next(&mut self, key: Key) -> Option<Event>;
    /// [`Driver::pause_accept`] that also calls back an accept already in the kernel: its
    /// completion still comes (a connection it took as `Accepted`), and then none is in
    /// flight on this listener until `accept` ([`Driver::accepts_in_flight`]).
    fn hold_accept(&mut self, key: Key, fd: RawFd) {
        self.pause_accept(key, fd);
    }
    /// Whether an accept of some listener is still in the kernel (one that could take a
    /// connection while the loop is not looking). Backends that accept synchronously: never.
    fn accepts_in_flight(&self) -> bool {
        false
    }
    /// Starts a non-blocking connect of `fd` to `addr`, bounded by `timeout`; its end comes
    /// as [`Event::Connected`] (a timeout as `ErrorKind::TimedOut`); on success the socket
    /// is watched as by [`Driver::watch`].
    /// `options` are set on the socket before the connect starts. `quiet`: watched as by
    /// [`Driver::watch_quietly`].
    fn connect(
        &mut self,
        key: Key,
        fd: RawFd,
        addr: &SockAddr,
        timeout: Duration,
        options: &[SockOpt],
        quiet: bool,
    );
    /// Reports readiness changes of a connected socket as [`Event::Ready`] until `unwatch`.
    /// (After a successful connect the upstream socket is already watched.)
    fn watch(&mut self, key: Key, fd: RawFd) -> io::Result<()>;
    /// [`Driver::watch`] for a socket the copy path reads (its receives bring the bytes):
    /// that it became readable is reported only once asked with [`Driver::want_read`]
    /// (a backend that would report it with every message, next to the receive's own
    /// completion, would wake the loop twice a message). Writability, the peer's FIN and
    /// errors are reported as by `watch`.
    fn watch_quietly(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        self.watch(key, fd)
    }
    /// The loop found the socket empty on its own reads and needs to know when it has
    /// bytes again: reported once as [`Event::Ready`] (a no-op where every readiness change
    /// is reported anyway).
    fn want_read(&mut self, _key: Key, _fd: RawFd) {}
    /// A socket watched by [`Driver::watch`] is read by the copy path from now on: watched
    /// as by [`Driver::watch_quietly`]. `true` when its watch changed (a backend that
    /// reports every readiness change has nothing to change).
    fn quieten(&mut self, _key: Key, _fd: RawFd) -> bool {
        false
    }
    /// Stops reporting on `fd`, which the caller is about to close.
    fn unwatch(&mut self, key: Key, fd: RawFd);
    /// [`Driver::unwatch`] for a socket another process holds too (handed over at an
    /// upgrade): closing this process's descriptor does not end the socket, so nothing
    /// may stay registered on it here.
    fn forget(&mut self, key: Key, fd: RawFd) {
        self.unwatch(key, fd);
    }
    /// Closes `fd` (already unwatched) once the kernel has taken in every request queued
    /// so far that names it: closed any earlier, its number could go to a new socket that
    /// a queued request would then act on.
    fn retire(&mut self, fd: OwnedFd) {
        drop(fd);
    }
    /// Receives once from the socket `key` names into a copy buffer: the result now, or
    /// `None` when it comes later as [`Event::Received`]. At most one receive per socket,
    /// and never while the loop reads it itself (bytes would be taken out of order).
    /// `ready`: the socket may have bytes (a backend that reads on readiness tries at once;
    /// otherwise it waits for the next report, which is due since the last read that
    /// found the socket empty).
    fn receive(&mut self, key: Key, fd: RawFd, ready: bool) -> Option<Received>;
    /// Sends a chunk's bytes to the socket `key` names: the result now, or `None` when it
    /// comes later as [`Event::Sent`]. At most one send per socket, and never while the
    /// loop writes to it itself. `quick`: a receive is armed on the connection, so the loop
    /// will wake for it anyway; a backend may then report a send that went whole with the
    /// results of its next wait instead of waking the loop for it.
    fn send(&mut self, key: Key, fd: RawFd, chunk: Chunk, quick: bool) -> Option<Sent>;
    /// Calls back every receive and send still in the backend (each finishes, as bytes or
    /// `ECANCELED`), and until [`Driver::resume_transfers`] starts none: each asked for
    /// finishes at once with `ECANCELED`. For an upgrade's freeze: no byte may be taken in
    /// or sent by this process while another holds the sockets.
    /// Completions that are ready at once are appended to `out`.
    fn call_back_transfers(&mut self, out: &mut Vec<Event>);
    fn resume_transfers(&mut self);
    /// Whether a receive or send is still in the backend.
    fn transfers_in_flight(&self) -> bool;
    /// The loop's copy buffers (for the gauges).
    fn chunks(&self) -> &Chunks;
    /// Waits up to `timeout` (forever if `None`) for events, appending them to `events`.
    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()>;
    /// Hands queued requests to the kernel now (a change must take effect before the
    /// control thread is told it has).
    fn flush(&mut self) {}
    /// Ends every request still in the kernel before the loop exits, so that no socket
    /// (a listener above all) outlives the process's intent to close it.
    fn close(&mut self) {}
    /// [`Driver::close`] after an upgrade handed every listener over (no accept is in the
    /// kernel: they were called back at the freeze): what is left in the kernel holds no
    /// listener, so it may go with the backend's own teardown instead of being ended
    /// first.
    fn abandon(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_parts_apart() {
        let k = Key::new(Tag::Upstream, u32::MAX, 0xff_ffff).with_attempt(33);
        assert_eq!(
            (k.tag(), k.slot(), k.generation(), k.attempt()),
            (Tag::Upstream, u32::MAX, 0xff_ffff, 1)
        );
        assert_ne!(k, k.with_attempt(2));
        assert_eq!(k.with_tag(Tag::Client).attempt(), 0);
        assert_eq!(k.with_tag(Tag::Ignore).tag(), Tag::Ignore);
    }

    #[test]
    fn an_operation_key_names_its_side() {
        let up = Key::new(Tag::Upstream, 7, 9).with_attempt(5);
        let client = up.with_tag(Tag::Client);
        for side in [up, client] {
            for tag in [Tag::Receive, Tag::Send, Tag::Readable] {
                let op = side.op(tag);
                assert_eq!(op.tag(), tag);
                assert_eq!(op.side(), side);
            }
        }
        assert_ne!(up.op(Tag::Receive), client.op(Tag::Receive));
        assert_ne!(up.op(Tag::Receive), up.op(Tag::Send));
    }
}
