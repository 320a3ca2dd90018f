//! The small readiness interface between the event loop and its io backend. The loop (and
//! the connection state machine in it) is written once against [`Driver`]; `uring.rs` and
//! `epoll.rs` are its two implementations.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use socket2::SockAddr;

pub use crate::sys::{PeerAddr, SockOpt};

/// Names what an event is about: a slot in the loop's tables, the slot's generation (so an
/// event for a reused slot is recognised as stale), which operation or socket, and (for an
/// upstream socket) which connect attempt: a held connection gets a new upstream socket per
/// attempt, and a completion of an earlier attempt's socket must not be taken for the
/// current one's. Bits: slot 63..32, generation 31..8, attempt 7..3, tag 2..0.
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
}

/// Attempts are numbered modulo this (5 bits of the key).
pub const ATTEMPTS: u8 = 32;

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
            _ => Tag::Ignore,
        }
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
        Key(self.0 & !0xf8 | u64::from(attempt % ATTEMPTS) << 3)
    }
    pub fn attempt(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
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
}

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
    /// `options` are set on the socket before the connect starts.
    fn connect(
        &mut self,
        key: Key,
        fd: RawFd,
        addr: &SockAddr,
        timeout: Duration,
        options: &[SockOpt],
    );
    /// Reports readiness changes of a connected socket as [`Event::Ready`] until `unwatch`.
    /// (After a successful connect the upstream socket is already watched.)
    fn watch(&mut self, key: Key, fd: RawFd) -> io::Result<()>;
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
}
