//! The epoll backend: readiness from edge-triggered epoll, accept and connect as plain
//! non-blocking syscalls, connect timeouts from a small deadline heap. For machines where
//! io_uring is blocked (seccomp, `kernel.io_uring_disabled`).
#![allow(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{SockAddr, SockRef};

use super::driver::{
    Chunk, Chunks, Driver, Event, Key, PeerAddr, Received, Sent, SockOpt, Tag, CHUNK_SIZE,
};

pub struct Epoll {
    epfd: OwnedFd,
    events: Vec<libc::epoll_event>,
    listeners: HashMap<Key, RawFd>,
    /// Upstream sockets whose connect is in progress, with their deadlines.
    connecting: HashMap<Key, (Instant, RawFd)>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Events produced outside `epoll_wait` (a connect that finished at once).
    ready: Vec<Event>,
    /// The copy path, done here: sockets with a receive waiting for their next readiness
    /// report, and sends waiting for room.
    chunks: Chunks,
    receiving: HashMap<Key, RawFd>,
    sending: HashMap<Key, (RawFd, Chunk)>,
    /// Sockets reported readable since this backend last found them empty, and whether
    /// the report said the peer closed (then its end of stream is still to be read). A
    /// receive asked for later reads at once: the loop may have taken the report in after
    /// it asked (an earlier event of the same batch started the receive).
    readable: HashMap<Key, bool>,
    /// An upgrade's freeze: no receive or send is started.
    holding: bool,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Epoll {
    pub fn new(wake: RawFd, chunks: u16) -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; on success the fd is new and ours.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let e = Epoll {
            epfd,
            events: Vec::with_capacity(1024),
            listeners: HashMap::new(),
            connecting: HashMap::new(),
            deadlines: BinaryHeap::new(),
            ready: Vec::new(),
            chunks: Chunks::list(chunks)?,
            receiving: HashMap::new(),
            sending: HashMap::new(),
            readable: HashMap::new(),
            holding: false,
        };
        e.ctl(
            libc::EPOLL_CTL_ADD,
            wake,
            libc::EPOLLIN as u32,
            Key::new(Tag::Wake, 0, 0),
        )?;
        Ok(e)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, key: Key) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key.0 };
        // SAFETY: `ev` is a live epoll_event for the call; `fd` is open (owned by the loop).
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// One connection from a listener that reported some: `None` when its queue is empty.
    fn accept_one(&mut self, key: Key, fd: RawFd) -> Option<Event> {
        loop {
            let mut peer = PeerAddr::default();
            // SAFETY: `peer` holds a sockaddr_storage and its length, both live for the
            // call; `fd` is an open listening socket.
            let ret = unsafe {
                libc::accept4(
                    fd,
                    (&mut peer.storage as *mut libc::sockaddr_storage).cast(),
                    &mut peer.len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if ret >= 0 {
                // SAFETY: accept4 returned a new fd that nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(ret) };
                return Some(Event::Accepted(key, fd, peer));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return None,
                // The peer gave up before we took it, or a signal: take the next one.
                Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO) => continue,
                _ => {
                    self.stop_accept(key, fd);
                    return Some(Event::AcceptFailed(key, err));
                }
            }
        }
    }

    /// One recv(2) into an idle chunk.
    fn recv_chunk(&mut self, key: Key, fd: RawFd) -> Received {
        let Some(mut chunk) = self.chunks.take() else {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        };
        let n = match crate::sys::recv(fd, chunk.space()) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.readable.remove(&key);
                }
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(None);
        }
        // Stopped short: empty, unless the peer's FIN is still to be read.
        if n < CHUNK_SIZE && self.readable.get(&key) != Some(&true) {
            self.readable.remove(&key);
        }
        chunk.set_len(n);
        Ok(Some(chunk))
    }

    /// One send(2) of what the chunk holds; `None`: no room (it waits in `sending`).
    fn send_chunk(&mut self, key: Key, fd: RawFd, mut chunk: Chunk) -> Option<Sent> {
        match crate::sys::send(fd, chunk.bytes()) {
            Ok(n) => {
                chunk.advance(n);
                Some((chunk, Ok(n)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.sending.insert(key, (fd, chunk));
                None
            }
            Err(e) => Some((chunk, Err(e))),
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, key))) = self.deadlines.peek() {
            if self.connecting.get(&Key(*key)).map(|c| c.0) == Some(*at) {
                return Some(*at);
            }
            self.deadlines.pop();
        }
        None
    }
}

impl Driver for Epoll {
    fn accept(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        if self.listeners.contains_key(&key) {
            return Ok(());
        }
        // Level-triggered and exclusive: a listener shared by several loops wakes one.
        self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            key,
        )?;
        self.listeners.insert(key, fd);
        Ok(())
    }

    fn stop_accept(&mut self, key: Key, fd: RawFd) {
        if self.listeners.remove(&key).is_some() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, key);
        }
    }

    fn accept_next(&mut self, key: Key) -> Option<Event> {
        let fd = *self.listeners.get(&key)?;
        self.accept_one(key, fd)
    }

    fn pause_accept(&mut self, key: Key, fd: RawFd) {
        // Connections wait in the listen queue meanwhile.
        self.stop_accept(key, fd);
    }

    fn connect(
        &mut self,
        key: Key,
        fd: RawFd,
        addr: &SockAddr,
        timeout: Duration,
        options: &[SockOpt],
        _quiet: bool,
    ) {
        for o in options {
            let _ = crate::sys::set_int_option(fd, o);
        }
        // SAFETY: `addr` points to a valid sockaddr of `addr.len()` bytes for the call.
        let ret = unsafe { libc::connect(fd, addr.as_ptr(), addr.len()) };
        let err = io::Error::last_os_error();
        if ret < 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
            self.ready.push(Event::Connected(key, Err(err)));
            return;
        }
        if let Err(e) = self.watch(key, fd) {
            self.ready.push(Event::Connected(key, Err(e)));
            return;
        }
        if ret == 0 {
            self.ready.push(Event::Connected(key, Ok(())));
        } else {
            let at = crate::relay::deadline(Instant::now(), timeout);
            self.connecting.insert(key, (at, fd));
            self.deadlines.push(Reverse((at, key.0)));
        }
    }

    fn watch(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.ctl(libc::EPOLL_CTL_ADD, fd, events as u32, key)
    }

    fn unwatch(&mut self, key: Key, _fd: RawFd) {
        // Closing the fd removes it from the epoll set (it is never duplicated). A chunk
        // waiting to be sent goes back to the pool.
        self.connecting.remove(&key);
        self.receiving.remove(&key);
        self.sending.remove(&key);
        self.readable.remove(&key);
    }

    fn forget(&mut self, key: Key, fd: RawFd) {
        // The socket outlives this descriptor (another process holds it): the epoll set
        // would keep reporting it.
        self.unwatch(key, fd);
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, key);
    }

    fn receive(&mut self, key: Key, fd: RawFd, ready: bool) -> Option<Received> {
        if self.holding {
            return Some(Err(io::Error::from_raw_os_error(libc::ECANCELED)));
        }
        if ready || self.readable.contains_key(&key) {
            match self.recv_chunk(key, fd) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Some(done),
            }
        }
        self.receiving.insert(key, fd);
        None
    }

    fn send(&mut self, key: Key, fd: RawFd, chunk: Chunk) -> Option<Sent> {
        if self.holding {
            return Some((chunk, Err(io::Error::from_raw_os_error(libc::ECANCELED))));
        }
        self.send_chunk(key, fd, chunk)
    }

    fn call_back_transfers(&mut self, out: &mut Vec<Event>) {
        self.holding = true;
        let cancelled = || io::Error::from_raw_os_error(libc::ECANCELED);
        for (key, _) in self.receiving.drain() {
            out.push(Event::Received(key, Err(cancelled())));
        }
        for (key, (_, chunk)) in self.sending.drain() {
            out.push(Event::Sent(key, chunk, Err(cancelled())));
        }
    }

    fn resume_transfers(&mut self) {
        self.holding = false;
    }

    fn transfers_in_flight(&self) -> bool {
        !self.receiving.is_empty() || !self.sending.is_empty()
    }

    fn chunks(&self) -> &Chunks {
        &self.chunks
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        let now = Instant::now();
        let mut timeout = timeout;
        if let Some(at) = self.next_deadline() {
            let until = at.saturating_duration_since(now);
            timeout = Some(timeout.map_or(until, |t| t.min(until)));
        }
        if !self.ready.is_empty() {
            timeout = Some(Duration::ZERO);
        }
        // Round up so that a deadline 0.3 ms away does not spin with a 0 ms timeout.
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        self.events.clear();
        // SAFETY: the buffer has room for `capacity` events; the kernel writes at most that
        // many and we set the length to the count it returned.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.capacity() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        } else {
            // SAFETY: epoll_wait initialised the first `n` entries.
            unsafe { self.events.set_len(n as usize) };
        }
        out.append(&mut self.ready);
        for i in 0..self.events.len() {
            let ev = self.events[i];
            let key = Key(ev.u64);
            let bits = ev.events as i32;
            match key.tag() {
                Tag::Wake => out.push(Event::Wake),
                Tag::Listener => {
                    // One now; the loop takes the rest with `accept_next`, each admitted
                    // before the next is taken.
                    if let Some(&fd) = self.listeners.get(&key) {
                        out.extend(self.accept_one(key, fd));
                    }
                }
                _ => {
                    let writable = bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0;
                    let readable = bits
                        & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                        != 0;
                    if writable {
                        if let Some((_, fd)) = self.connecting.remove(&key) {
                            out.push(Event::Connected(key, socket_error(fd)));
                        }
                    }
                    out.push(Event::ready(key, ev.events));
                    // The copy path's operations waiting for this report.
                    if readable {
                        let hup = bits & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0;
                        *self.readable.entry(key).or_default() |= hup;
                        if let Some(fd) = self.receiving.remove(&key) {
                            match self.recv_chunk(key, fd) {
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    self.receiving.insert(key, fd);
                                }
                                done => out.push(Event::Received(key, done)),
                            }
                        }
                    }
                    if writable {
                        if let Some((fd, chunk)) = self.sending.remove(&key) {
                            if let Some((chunk, result)) = self.send_chunk(key, fd, chunk) {
                                out.push(Event::Sent(key, chunk, result));
                            }
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        while let Some(at) = self.next_deadline() {
            if at > now {
                break;
            }
            let Reverse((_, key)) = self.deadlines.pop().expect("peeked");
            self.connecting.remove(&Key(key));
            out.push(Event::Connected(
                Key(key),
                Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            ));
        }
        Ok(())
    }
}

/// SO_ERROR of a socket: the connect error, if any.
fn socket_error(fd: RawFd) -> io::Result<()> {
    let raw = BorrowedRaw(fd);
    let sock = SockRef::from(&raw);
    match sock.take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct BorrowedRaw(RawFd);
impl std::os::fd::AsFd for BorrowedRaw {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the fd is open for as long as this wrapper is used (one call above).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}
