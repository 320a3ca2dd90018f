//! The io_uring backend: accept, connect linked to a timeout (its socket options set through
//! the ring in the same submission), multishot poll for readiness, close, and the copy
//! path: a receive into the loop's provided-buffer ring and a send of that chunk, each
//! submitted with the next wait. Streaming bytes never move through io_uring: the loop
//! calls splice(2) inline when a socket is ready (`IORING_OP_SPLICE` on sockets always runs
//! on an io-wq thread; see docs/internals.md). Socket receives and sends wait for readiness
//! inside the kernel (its poll-driven retry), so no request here ever needs an io-wq worker;
//! the worker count is capped at one as a safety net.
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use socket2::SockAddr;

use super::chunk::CHUNK_SIZE;
use super::driver::{Chunk, Chunks, Driver, Event, Key, PeerAddr, Received, Sent, SockOpt, Tag};

const POLL_MASK: u32 = (libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP) as u32;
/// The mask of a socket the copy path reads (`watch_quietly`): no `POLLIN`.
const QUIET_MASK: u32 = (libc::POLLOUT | libc::POLLRDHUP) as u32;
/// A one-shot readability report (`want_read`).
const READ_MASK: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;

/// The opcodes this backend submits; all must be supported for `auto` to choose it.
const OPCODES: [(u8, &str); 8] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
];

/// The buffer group of the loop's copy buffers (one ring per loop, so one group).
const CHUNK_GROUP: u16 = 0;

/// How long a quick send may go uncounted (see `Uring::wait`). Not shorter: a wait with a
/// timer that is the CPU's next one costs a timer reprogramming on the way in and out
/// (on a VM, exits): with 1 ms here a round trip cost the relay 1.5 × the CPU of epoll's,
/// and 30 µs more latency, `perf stat` and `bench/run`; with 20 ms, 100 ms or none, alike.
const QUICK_SEND_COUNTED: Duration = Duration::from_millis(20);
/// `IORING_RECVSEND_POLL_FIRST` (Linux 5.19, as the provided-buffer ring): the receive waits
/// for readiness before its first attempt.
const RECVSEND_POLL_FIRST: u16 = 1;

pub struct Uring {
    ring: IoUring,
    /// Listeners being accepted on, to re-arm the accept once it completes.
    listeners: HashMap<Key, Listening>,
    /// The address boxes of stopped listeners whose accept the kernel has not given back
    /// yet (it may still write the address): freed when that completion comes.
    stopped: HashMap<Key, Box<PeerAddr>>,
    /// Upstream sockets being connected, to watch them once connected.
    connecting: HashMap<Key, RawFd>,
    /// Sockets watched quietly (`watch_quietly`), and those with a one-shot readability
    /// report in the kernel (by its key).
    quiet: HashSet<Key>,
    read_polls: HashSet<u64>,
    /// Connect arguments the kernel reads when the entries are submitted (it copies both
    /// at prep time); kept until the next submit. Boxed: an entry holds pointers into them,
    /// which must not move when the vector grows.
    #[allow(clippy::vec_box)]
    args: Vec<Box<(SockAddr, types::Timespec)>>,
    wake: RawFd,
    /// Socket options go through the ring with the connect (SOCKET_URING_OP_SETSOCKOPT,
    /// Linux 6.7), not as setsockopt syscalls: probed when the ring is made.
    ring_sockopt: bool,
    /// The option values ring setsockopts point to. The kernel reads a value only when
    /// its request runs, which for a linked one is later than the submit (deferred task
    /// work), so they are never freed: one set per distinct setting, a few bytes each.
    option_values: Vec<&'static [libc::c_int; 6]>,
    /// Completions reaped but not yet handled (while making room to submit).
    completions: Vec<(u64, i32, u32)>,
    /// The copy buffers, idle ones in the ring registered as `CHUNK_GROUP`.
    chunks: Chunks,
    /// Copy-path operations in the kernel, by their keys: receives, and sends with the
    /// chunk the kernel reads from (kept until the send is settled) and the socket (`None`
    /// once unwatched: a send is never submitted again to a number that may be reused).
    receiving: HashSet<u64>,
    sending: HashMap<u64, (Option<RawFd>, Chunk)>,
    /// Sends submitted the quick way (see `send`) whose outcome is not settled yet: each
    /// has sent everything once the kernel has taken it in without posting a completion.
    quick: HashSet<u64>,
    /// Bytes a send had sent before the rest went on as a waiting send.
    sent_before: HashMap<u64, usize>,
    /// `IORING_FEAT_CQE_SKIP` (Linux 5.17): quick sends.
    skip_cqe: bool,
    /// An upgrade's freeze: no receive or send is started.
    holding: bool,
}

/// A listener this loop accepts on.
struct Listening {
    fd: RawFd,
    /// An accept of it is in the kernel.
    armed: bool,
    /// Not re-armed when that accept completes (`pause_accept`).
    paused: bool,
    /// Where the kernel writes the peer's address of the accept in flight (boxed: it must
    /// not move while the accept is armed).
    peer: Box<PeerAddr>,
}

/// Whether io_uring can run this backend here: creates a ring with the flags the loops use
/// and probes the exact opcodes. The error says what is missing.
pub fn probe() -> io::Result<()> {
    let ring = new_ring()?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in OPCODES {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {name} is not supported"),
            ));
        }
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks IORING_FEAT_EXT_ARG (wait with timeout)",
        ));
    }
    register_chunks(&ring, 1).map(drop)
}

/// The copy buffers, registered with `ring` as a provided-buffer ring (Linux 5.19).
fn register_chunks(ring: &IoUring, count: u16) -> io::Result<Chunks> {
    let (chunks, addr) = Chunks::ring(count)?;
    // SAFETY: the ring at `addr` has `count` entries and is never unmapped (see `Chunks`).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(addr, count, CHUNK_GROUP, 0)
    }
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("io_uring cannot register a provided-buffer ring: {e}"),
        )
    })?;
    Ok(chunks)
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(16384)
        .build(4096)
}

impl Uring {
    /// A ring with `chunks` copy buffers (a power of two).
    pub fn new(wake: RawFd, chunks: u16) -> io::Result<Uring> {
        let ring = new_ring()?;
        // Nothing we submit uses io-wq; cap its workers at one (bounded, unbounded).
        let mut max = [1u32, 1u32];
        ring.submitter().register_iowq_max_workers(&mut max)?;
        let chunks = register_chunks(&ring, chunks)?;
        let skip_cqe = ring.params().is_feature_skip_cqe_on_success();
        let mut u = Uring {
            ring,
            listeners: HashMap::new(),
            stopped: HashMap::new(),
            connecting: HashMap::new(),
            quiet: HashSet::new(),
            read_polls: HashSet::new(),
            args: Vec::new(),
            wake,
            ring_sockopt: false,
            option_values: Vec::new(),
            completions: Vec::with_capacity(1024),
            chunks,
            receiving: HashSet::new(),
            sending: HashMap::new(),
            quick: HashSet::new(),
            sent_before: HashMap::new(),
            skip_cqe,
            holding: false,
        };
        u.ring_sockopt = u.probe_ring_sockopt();
        u.poll(Key::new(Tag::Wake, 0, 0), wake, libc::POLLIN as u32);
        Ok(u)
    }

    /// Whether a setsockopt through the ring works here: sets TCP_NODELAY on a scratch
    /// socket and reads it back.
    fn probe_ring_sockopt(&mut self) -> bool {
        let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
            return false;
        };
        let one: libc::c_int = 1;
        let marker = Key::new(Tag::Ignore, u32::MAX, 1).0;
        let e = opcode::SetSockOpt::new(
            types::Fd(std::os::fd::AsRawFd::as_raw_fd(&s)),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
        .build()
        .user_data(marker);
        // SAFETY: `one` and the socket outlive the request: it is waited for below.
        if unsafe { self.ring.submission().push(&e) }.is_err()
            || self.ring.submit_and_wait(1).is_err()
        {
            return false;
        }
        let res = self
            .ring
            .completion()
            .find(|c| c.user_data() == marker)
            .map(|c| c.result());
        res == Some(0) && s.nodelay().unwrap_or(false)
    }

    /// The interned, never-freed copy of `options`' values (see `option_values`).
    fn values_of(&mut self, options: &[SockOpt]) -> &'static [libc::c_int; 6] {
        let mut values = [0; 6];
        for (v, o) in values.iter_mut().zip(options) {
            *v = o.value;
        }
        if let Some(v) = self.option_values.iter().find(|v| ***v == values) {
            return v;
        }
        let v: &'static [libc::c_int; 6] = Box::leak(Box::new(values));
        self.option_values.push(v);
        v
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry we build references only fds that stay open until the
            // kernel has taken the entry in (the loop closes sockets through `retire`), and
            // memory in `self.args`, which lives until the queue is empty after a submit.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The queue is full: hand it to the kernel (which copies what it needs) and retry.
            // Should the kernel refuse for now (EBUSY: completions to reap first; EAGAIN,
            // ENOMEM), reap them into `completions`, handled at the next `wait`.
            let result = self.ring.submit();
            self.submitted();
            if let Err(e) = result {
                tracing::warn!(error = %e, "io_uring submit failed; retrying");
                self.stash_completions();
                if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR)) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// After a submit, whatever it returned: the connect arguments the submitted entries
    /// pointed to may go (the kernel copied them), but not while an entry that points to
    /// them is still queued.
    fn submitted(&mut self) {
        if self.ring.submission().is_empty() {
            self.args.clear();
        }
    }

    /// Moves what the completion queue holds into `completions`.
    fn stash_completions(&mut self) {
        self.completions.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }

    fn poll(&mut self, key: Key, fd: RawFd, mask: u32) {
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(true)
            .build()
            .user_data(key.0);
        self.push(e);
    }

    /// One accept at a time per loop and listener, not a multishot accept: a multishot
    /// accept takes every queued connection in one go, so one loop would get a whole burst
    /// while the other cores idle. io_uring arms accept polls exclusive, so with one
    /// pending accept in each loop the kernel gives the next connection to a loop that is
    /// waiting for one, i.e. not busy.
    fn arm_accept(&mut self, key: Key, fd: RawFd) {
        let Some(l) = self.listeners.get_mut(&key) else {
            return;
        };
        l.armed = true;
        *l.peer = PeerAddr::default();
        let (addr, len) = (
            (&mut l.peer.storage as *mut libc::sockaddr_storage).cast(),
            &mut l.peer.len as *mut libc::socklen_t,
        );
        // The kernel writes `addr` and `len` when the accept completes: they live in the
        // listener's box until then (a stopped listener's accept is cancelled and reaped
        // before the box goes, see `stop_accept` and `close`).
        let e = opcode::Accept::new(types::Fd(fd), addr, len)
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(key.0);
        self.push(e);
    }

    fn mask_of(&self, key: Key) -> u32 {
        if self.quiet.contains(&key) {
            QUIET_MASK
        } else {
            POLL_MASK
        }
    }

    fn submit_send(&mut self, op: Key, fd: RawFd, chunk: &Chunk, quick: bool) {
        let bytes = chunk.bytes();
        // The chunk's memory stays put while `sending` keeps the chunk (until the send is
        // settled): the kernel reads it until then.
        let e = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32);
        let e = if quick {
            self.quick.insert(op.0);
            e.flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | libc::MSG_WAITALL)
                .build()
                .flags(squeue::Flags::SKIP_SUCCESS)
        } else {
            e.flags(libc::MSG_NOSIGNAL).build()
        };
        self.push(e.user_data(op.0));
    }

    /// After a wait whose submission the kernel took in whole: every quick send without a
    /// completion sent everything.
    fn settle_quick_sends(&mut self, out: &mut Vec<Event>) {
        for op in self.quick.drain() {
            if let Some((_, mut chunk)) = self.sending.remove(&op) {
                let n = chunk.len() + self.sent_before.remove(&op).unwrap_or(0);
                chunk.advance(chunk.len());
                out.push(Event::Sent(Key(op).side(), chunk, Ok(n)));
            }
        }
    }

    fn cancel(&mut self, key: Key) {
        let e = opcode::AsyncCancel::new(key.0)
            .build()
            .user_data(key.with_tag(Tag::Ignore).0);
        self.push(e);
    }

    /// [`Uring::cancel`] of every request with the key, not only the first found.
    fn cancel_all(&mut self, key: Key) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(key.0).all())
            .build()
            .user_data(key.with_tag(Tag::Ignore).0);
        self.push(e);
    }

    fn complete(&mut self, key: Key, res: i32, flags: u32, out: &mut Vec<Event>) {
        let more = cqueue::more(flags);
        match key.tag() {
            Tag::Wake => {
                if !more {
                    self.poll(key, self.wake, libc::POLLIN as u32);
                }
                out.push(Event::Wake);
            }
            Tag::Listener => {
                let Some(l) = self.listeners.get_mut(&key) else {
                    // Stopped: its accept is back, and an fd that raced the cancel is
                    // closed here.
                    self.stopped.remove(&key);
                    if res >= 0 {
                        // SAFETY: the kernel returned a new fd that nobody else owns.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                    return;
                };
                l.armed = more;
                let (fd, rearm) = (l.fd, !more && !l.paused);
                if res >= 0 {
                    // Armed again by `accept_next`, once the loop has admitted this one.
                    // SAFETY: the kernel returned a new fd that nobody else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    out.push(Event::Accepted(key, fd, *l.peer));
                } else if -res == libc::ECANCELED && l.paused {
                    // Called back by `hold_accept`: resumed by `accept`.
                } else if matches!(-res, libc::ECONNABORTED | libc::EINTR | libc::EPROTO) {
                    if rearm {
                        self.arm_accept(key, fd);
                    }
                } else if !more {
                    self.listeners.remove(&key);
                    out.push(Event::AcceptFailed(key, io::Error::from_raw_os_error(-res)));
                }
            }
            Tag::Client | Tag::Upstream => {
                if let Some(fd) = self.connecting.remove(&key) {
                    let result = match res {
                        0 => Ok(()),
                        r if -r == libc::ECANCELED => {
                            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                        }
                        r => Err(io::Error::from_raw_os_error(-r)),
                    };
                    let ok = result.is_ok();
                    out.push(Event::Connected(key, result));
                    if ok {
                        self.poll(key, fd, self.mask_of(key));
                    }
                    return;
                }
                if res >= 0 {
                    out.push(Event::ready(key, res as u32));
                }
                if !more && res != -libc::ECANCELED {
                    out.push(Event::Unwatched(key));
                }
            }
            Tag::Receive => {
                self.receiving.remove(&key.0);
                // A completion that consumed a ring buffer names it (also with 0 bytes).
                let chunk = cqueue::buffer_select(flags)
                    .and_then(|id| self.chunks.filled(id, res.max(0) as usize));
                let result = match (res, chunk) {
                    (r, Some(chunk)) if r > 0 => Ok(Some(chunk)),
                    (0, _) => Ok(None),
                    (r, _) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    _ => Err(io::Error::other("a receive's bytes came without a buffer")),
                };
                out.push(Event::Received(key.side(), result));
            }
            Tag::Readable => {
                self.read_polls.remove(&key.0);
                match res {
                    r if r >= 0 => out.push(Event::ready(key.side(), r as u32)),
                    r if -r == libc::ECANCELED => {}
                    // Reported as readable: the loop's read finds out what it is.
                    _ => out.push(Event::ready(key.side(), libc::POLLIN as u32)),
                }
            }
            Tag::Send => {
                let quick = self.quick.remove(&key.0);
                let Some((fd, mut chunk)) = self.sending.remove(&key.0) else {
                    return;
                };
                if res > 0 {
                    chunk.advance(res as usize);
                }
                if quick && (res > 0 || res == -libc::EAGAIN) && !chunk.is_empty() {
                    // No room for all of it: the rest goes on as a send that waits for room.
                    *self.sent_before.entry(key.0).or_default() += res.max(0) as usize;
                    if let Some(fd) = fd {
                        self.submit_send(key, fd, &chunk, false);
                        self.sending.insert(key.0, (Some(fd), chunk));
                        return;
                    }
                }
                let before = self.sent_before.remove(&key.0).unwrap_or(0);
                let result = match res {
                    r if r >= 0 => Ok(before + r as usize),
                    _ if before > 0 => Ok(before),
                    r => Err(io::Error::from_raw_os_error(-r)),
                };
                out.push(Event::Sent(key.side(), chunk, result));
            }
            Tag::Ignore => {}
        }
    }
}

impl Driver for Uring {
    fn accept(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        let l = self.listeners.entry(key).or_insert_with(|| Listening {
            fd,
            armed: false,
            paused: false,
            peer: Box::default(),
        });
        l.paused = false;
        if !l.armed {
            self.arm_accept(key, fd);
        }
        Ok(())
    }

    fn stop_accept(&mut self, key: Key, _fd: RawFd) {
        if let Some(l) = self.listeners.remove(&key) {
            if l.armed {
                self.stopped.insert(key, l.peer);
                self.cancel(key);
            }
        }
    }

    fn pause_accept(&mut self, key: Key, _fd: RawFd) {
        // Not cancelled: a connection the kernel takes meanwhile is delivered, not closed.
        if let Some(l) = self.listeners.get_mut(&key) {
            l.paused = true;
        }
    }

    fn hold_accept(&mut self, key: Key, _fd: RawFd) {
        if let Some(l) = self.listeners.get_mut(&key) {
            l.paused = true;
            if l.armed {
                self.cancel(key);
            }
        }
    }

    fn accepts_in_flight(&self) -> bool {
        self.listeners.values().any(|l| l.armed)
    }

    fn accept_next(&mut self, key: Key) -> Option<Event> {
        // The next accept completes as an event of its own.
        if let Some(l) = self.listeners.get(&key) {
            if !l.armed && !l.paused {
                self.arm_accept(key, l.fd);
            }
        }
        None
    }

    fn connect(
        &mut self,
        key: Key,
        fd: RawFd,
        addr: &SockAddr,
        timeout: Duration,
        options: &[SockOpt],
        quiet: bool,
    ) {
        if quiet {
            self.quiet.insert(key);
        }
        let ring_options = if self.ring_sockopt && options.len() <= 6 {
            options
        } else {
            for o in options {
                let _ = crate::sys::set_int_option(fd, o);
            }
            &[]
        };
        // The connect and its timeout must land in the same submission for the link to
        // hold: make room.
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 + ring_options.len() {
            let _ = self.ring.submit();
            self.submitted();
        }
        // The options first, not linked: an unlinked request runs when it is submitted,
        // naming the socket by its number then (a linked one would run later, when the
        // number may be another socket's, see `retire`); then the connect linked to its
        // timeout. An option's result is not needed (as with the syscalls).
        let values = self.values_of(ring_options);
        for (o, value) in ring_options.iter().zip(values.iter()) {
            let e = opcode::SetSockOpt::new(
                types::Fd(fd),
                o.level as u32,
                o.name as u32,
                (value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
            .build()
            .user_data(key.with_tag(Tag::Ignore).0);
            self.push(e);
        }
        let args = Box::new((addr.clone(), types::Timespec::from(timeout)));
        let connect = opcode::Connect::new(types::Fd(fd), args.0.as_ptr(), args.0.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(key.0);
        let timeout = opcode::LinkTimeout::new(&args.1)
            .build()
            .user_data(key.with_tag(Tag::Ignore).0);
        self.args.push(args);
        self.push(connect);
        self.push(timeout);
        self.connecting.insert(key, fd);
    }

    fn watch(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        self.poll(key, fd, self.mask_of(key));
        Ok(())
    }

    fn watch_quietly(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        self.quiet.insert(key);
        self.watch(key, fd)
    }

    fn quieten(&mut self, key: Key, fd: RawFd) -> bool {
        if !self.quiet.insert(key) {
            return false;
        }
        // The poll that reports readability ends (its cancelled end is no stop of its
        // own: `complete` drops it) and one without `POLLIN` takes its place. The cancel
        // is issued first, in the same submission, so it cannot find the new poll. (Should
        // the old poll have ended on its own just before, its `Unwatched` makes the loop
        // watch again: a second quiet poll, duplicate reports until `unwatch` ends both.)
        self.cancel(key);
        self.poll(key, fd, QUIET_MASK);
        true
    }

    fn want_read(&mut self, key: Key, fd: RawFd) {
        let op = key.op(Tag::Readable);
        if self.quiet.contains(&key) && self.read_polls.insert(op.0) {
            let e = opcode::PollAdd::new(types::Fd(fd), READ_MASK)
                .build()
                .user_data(op.0);
            self.push(e);
        }
    }

    fn unwatch(&mut self, key: Key, _fd: RawFd) {
        self.connecting.remove(&key);
        self.quiet.remove(&key);
        // Every poll with its key: `quieten` may have replaced one in this very submission
        // (the one it cancelled stays findable until its end is posted).
        self.cancel_all(key);
        // Its receive, send or readability report ends too (a completion gives the chunk
        // back), so that the socket closes with its descriptor: a request holds its file.
        for op in [
            key.op(Tag::Receive),
            key.op(Tag::Send),
            key.op(Tag::Readable),
        ] {
            // A quick send that found no room is not sent on to this number again.
            if let Some((fd, _)) = self.sending.get_mut(&op.0) {
                *fd = None;
            }
            if self.receiving.contains(&op.0)
                || self.sending.contains_key(&op.0)
                || self.read_polls.contains(&op.0)
            {
                self.cancel(op);
            }
        }
    }

    fn receive(&mut self, key: Key, fd: RawFd, ready: bool) -> Option<Received> {
        if self.holding {
            return Some(Err(io::Error::from_raw_os_error(libc::ECANCELED)));
        }
        let op = key.op(Tag::Receive);
        // A socket the last receive emptied is polled first: no attempt that would find
        // nothing (a socket lock and unlock per message, for nothing).
        let poll_first = if ready { 0 } else { RECVSEND_POLL_FIRST };
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), CHUNK_SIZE as u32)
            .buf_group(CHUNK_GROUP)
            .ioprio(poll_first)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(op.0);
        self.push(e);
        self.receiving.insert(op.0);
        None
    }

    /// A `quick` send may not wait for room (`MSG_DONTWAIT`) and must send everything
    /// (`MSG_WAITALL`), and it posts a completion only if it does not
    /// (`IOSQE_CQE_SKIP_SUCCESS`). So it is done, one way or the other, once the kernel has
    /// taken it in: a send with room (nearly every one) costs no completion, and the wait it
    /// is submitted with sleeps until the receive armed beside it (the reply, the next
    /// message) instead of waking for the send: one `io_uring_enter` per message fewer. It
    /// is reported with that wait's results. One that finds no room (or room for part)
    /// posts what it sent and goes on as an ordinary send, which waits for room in the
    /// kernel and completes on its own (as every send that is not `quick` does: without
    /// `MSG_WAITALL`, so one called back has sent nothing).
    fn send(&mut self, key: Key, fd: RawFd, chunk: Chunk, quick: bool) -> Option<Sent> {
        if self.holding {
            return Some((chunk, Err(io::Error::from_raw_os_error(libc::ECANCELED))));
        }
        let op = key.op(Tag::Send);
        self.submit_send(op, fd, &chunk, quick && self.skip_cqe);
        self.sending.insert(op.0, (Some(fd), chunk));
        None
    }

    fn call_back_transfers(&mut self, _out: &mut Vec<Event>) {
        self.holding = true;
        let ops: Vec<u64> = self
            .receiving
            .iter()
            .chain(self.sending.keys())
            .copied()
            .collect();
        for op in ops {
            self.cancel(Key(op));
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

    /// Closes through the ring, queued after everything that names the fd: the kernel
    /// takes the entries in order, so each earlier one has resolved the fd to this socket
    /// before the close frees its number. No extra syscall.
    fn retire(&mut self, fd: OwnedFd) {
        let e = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .user_data(Key::new(Tag::Ignore, 0, 0).0);
        self.push(e);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        // A quick send is done once submitted, but counted (and its chunk given back) only
        // when the loop hears of it: with this wait's results, which the receive armed
        // beside it usually ends soon (the reply, the next message). One that is the last
        // for a while is still counted within QUICK_SEND_COUNTED.
        let timeout = if self.quick.is_empty() {
            timeout
        } else {
            Some(timeout.map_or(QUICK_SEND_COUNTED, |t| t.min(QUICK_SEND_COUNTED)))
        };
        let ts;
        let args = types::SubmitArgs::new();
        let args = match timeout {
            Some(t) => {
                ts = types::Timespec::from(t);
                args.timespec(&ts)
            }
            None => args,
        };
        // Completions reaped while submitting are handled now, without waiting.
        let want = usize::from(self.completions.is_empty());
        let result = self.ring.submitter().submit_with_args(want, &args);
        // Everything queued was taken in (quick sends among it are done by now).
        let taken_in = self.ring.submission().is_empty();
        self.submitted();
        match result {
            Ok(_) => {}
            // Woken without a completion (a timeout, a signal), or the completion queue
            // must be reaped first: reap it below.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            // Transient shortages: the next turn tries again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                tracing::warn!(error = %e, "io_uring_enter failed; retrying");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
        self.stash_completions();
        let mut batch = std::mem::take(&mut self.completions);
        for &(key, res, flags) in &batch {
            self.complete(Key(key), res, flags, out);
        }
        batch.clear();
        // What `complete` stashed meanwhile (a full queue while re-arming) stays queued.
        batch.append(&mut self.completions);
        self.completions = batch;
        if taken_in && self.completions.is_empty() {
            self.settle_quick_sends(out);
        }
        Ok(())
    }

    fn flush(&mut self) {
        // Submit, and run completions (a cancelled accept releases its listener then).
        let ts = types::Timespec::new();
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = self.ring.submitter().submit_with_args(1, &args);
        self.submitted();
    }

    fn abandon(&mut self) {
        // No cancel of everything: the kernel cancels "any" requests one lookup at a time
        // among all of them (quadratic: 0.7 s of two cores for 18,000 polls, `perf`:
        // `io_cancel_req_match`), while the new process needs the cores. The ring's
        // teardown ends them in one pass. Every accept was called back at the freeze, so no
        // listener is held and no address box can still be written.
        if self.listeners.values().any(|l| l.armed) || !self.stopped.is_empty() {
            return self.close();
        }
        self.listeners.clear();
        self.connecting.clear();
    }

    fn close(&mut self) {
        // Without this, a listener's file stays referenced by its multishot accept until the
        // kernel's asynchronous ring teardown, and a restarted relay finds its port taken.
        let marker = Key::new(Tag::Ignore, u32::MAX, 0).0;
        self.push(
            opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(marker),
        );
        let ts = types::Timespec::from(Duration::from_millis(100));
        let mut cancelled = false;
        for _ in 0..20 {
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            if self.ring.completion().any(|c| c.user_data() == marker) {
                cancelled = true;
                break;
            }
        }
        if !cancelled {
            // An accept may still be in the kernel, which would write its address box
            // later: leak the boxes rather than free memory the kernel may write.
            self.listeners
                .drain()
                .for_each(|(_, l)| std::mem::forget(l.peer));
            self.stopped.drain().for_each(|(_, b)| std::mem::forget(b));
        }
        self.listeners.clear();
        self.stopped.clear();
        self.connecting.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn socket() -> Socket {
        Socket::new(Domain::IPV4, Type::STREAM.nonblocking().cloexec(), None).unwrap()
    }

    /// Whether io_uring runs here; where it does not, a skip if skips are allowed, else
    /// the test fails.
    fn ring_or_skip() -> bool {
        match probe() {
            Ok(()) => true,
            Err(e) if std::env::var_os("PORTRELAY_TEST_ALLOW_SKIP").is_some() => {
                eprintln!("SKIPPED: io_uring unavailable: {e}");
                false
            }
            Err(e) => panic!("io_uring unavailable ({e}); set PORTRELAY_TEST_ALLOW_SKIP=1 to skip"),
        }
    }

    /// A connection to `listener`: the peer's end, and ours (non-blocking).
    fn connected(listener: &TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (peer, ours)
    }

    /// Waits (bounded) until `pick` takes one of the ring's events.
    fn wait_for<T>(ring: &mut Uring, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut events = Vec::new();
            ring.wait(Some(Duration::from_millis(50)), &mut events)
                .unwrap();
            if let Some(t) = events.into_iter().find_map(&mut pick) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "the awaited completion never came"
            );
        }
    }

    /// A socket watched with readability reports and then quietened reports no more
    /// arrivals (its receives bring them), still its peer's FIN; quietening it twice
    /// changes nothing; and a socket quietened and let go in one submission closes (no
    /// poll is left holding it).
    #[test]
    fn quieten_stops_readability_reports_and_leaves_no_poll_behind() {
        if !ring_or_skip() {
            return;
        }
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut peer, mut ours) = connected(&listener);
        let (key, fd) = (Key::new(Tag::Client, 1, 1), ours.as_raw_fd());
        let wake = crate::sys::eventfd().unwrap();
        let mut ring = Uring::new(wake.as_raw_fd(), 2).unwrap();
        // The ring's reports on `key` (readable, hup, or the watch's end) for `for_ms`,
        // or until one of them is `wanted` (then bounded at 5 s).
        type Seen = (bool, bool, bool);
        let reports = |ring: &mut Uring, for_ms: u64, wanted: &dyn Fn(&Seen) -> bool| {
            let mut seen: Vec<Seen> = Vec::new();
            let until = Instant::now() + Duration::from_millis(for_ms);
            let bound = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until || (for_ms == 0 && Instant::now() < bound) {
                let mut events = Vec::new();
                ring.wait(Some(Duration::from_millis(10)), &mut events)
                    .unwrap();
                seen.extend(events.into_iter().filter_map(|e| match e {
                    Event::Ready {
                        key: k,
                        readable,
                        hup,
                        ..
                    } if k == key => Some((readable, hup, false)),
                    Event::Unwatched(k) if k == key => Some((false, false, true)),
                    _ => None,
                }));
                if seen.iter().any(wanted) {
                    break;
                }
            }
            seen
        };
        let none = |_: &Seen| false;

        ring.watch(key, fd).unwrap();
        peer.write_all(b"x").unwrap();
        let seen = reports(&mut ring, 0, &|&(r, _, _)| r);
        assert!(seen.iter().any(|&(r, _, _)| r), "watched: {seen:?}");
        let mut byte = [0u8; 1];
        ours.read_exact(&mut byte).unwrap();

        assert!(ring.quieten(key, fd), "its watch changes");
        assert!(
            !ring.quieten(key, fd),
            "a quiet socket has nothing to change"
        );
        // The old poll's end (cancelled: not a stop the loop would re-watch for), the
        // new one's first report.
        let seen = reports(&mut ring, 50, &none);
        assert!(
            seen.iter().all(|&(_, _, end)| !end),
            "no watch ended: {seen:?}"
        );
        peer.write_all(b"y").unwrap();
        let seen = reports(&mut ring, 150, &none);
        assert!(
            seen.iter().all(|&(r, _, end)| !r && !end),
            "quiet: {seen:?}"
        );
        assert!(ring.receive(key, fd, false).is_none());
        let chunk = wait_for(&mut ring, |e| match e {
            Event::Received(k, Ok(Some(c))) if k == key => Some(c),
            _ => None,
        });
        assert_eq!(chunk.bytes(), b"y", "its receives bring the bytes");
        drop(chunk);
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let seen = reports(&mut ring, 0, &|&(_, hup, _)| hup);
        assert!(
            seen.iter().any(|&(_, hup, _)| hup),
            "the FIN is reported: {seen:?}"
        );
        ring.unwatch(key, fd);
        drop(ring);

        // Quietened and let go before the ring has taken either in.
        let mut ring = Uring::new(wake.as_raw_fd(), 2).unwrap();
        let (mut peer, ours) = connected(&listener);
        let fd = ours.as_raw_fd();
        ring.watch(key, fd).unwrap();
        reports(&mut ring, 20, &none);
        assert!(ring.quieten(key, fd));
        ring.unwatch(key, fd);
        ring.retire(OwnedFd::from(ours));
        reports(&mut ring, 50, &none);
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest)
            .expect("the socket closed: no poll holds it");
        assert!(rest.is_empty());
    }

    /// The copy path on the ring: a waiting receive holds no chunk; bytes arrive in one;
    /// a send counts exactly; with every chunk lent out a receive reads nothing
    /// (`ENOBUFS`); a receive called back by `unwatch` ends; every chunk comes back.
    #[test]
    fn the_copy_path_lends_chunks_only_while_bytes_are_held() {
        if !ring_or_skip() {
            return;
        }
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut peer, ours) = connected(&listener);
        let (key, fd) = (Key::new(Tag::Client, 1, 1), ours.as_raw_fd());
        let wake = crate::sys::eventfd().unwrap();
        let mut ring = Uring::new(wake.as_raw_fd(), 2).unwrap();
        let receive = |ring: &mut Uring| {
            assert!(
                ring.receive(key, fd, false).is_none(),
                "a receive completes later"
            );
            wait_for(ring, |e| match e {
                Event::Received(k, r) if k == key => Some(r),
                _ => None,
            })
        };

        assert!(ring.receive(key, fd, false).is_none());
        let mut events = Vec::new();
        ring.wait(Some(Duration::from_millis(20)), &mut events)
            .unwrap();
        assert!(events.is_empty(), "nothing arrived: {events:?}");
        assert_eq!(
            ring.chunks().in_use(),
            0,
            "a waiting receive holds no chunk"
        );
        peer.write_all(b"hello").unwrap();
        let chunk = wait_for(&mut ring, |e| match e {
            Event::Received(k, Ok(Some(c))) if k == key => Some(c),
            _ => None,
        });
        assert_eq!((chunk.bytes(), ring.chunks().in_use()), (&b"hello"[..], 1));

        assert!(
            ring.send(key, fd, chunk, true).is_none(),
            "a send completes later"
        );
        let (chunk, n) = wait_for(&mut ring, |e| match e {
            Event::Sent(k, c, Ok(n)) if k == key => Some((c, n)),
            _ => None,
        });
        assert_eq!((n, chunk.len()), (5, 0));
        drop(chunk);
        assert_eq!(ring.chunks().in_use(), 0);
        let mut back = [0u8; 5];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");

        let mut held = Vec::new();
        for byte in [b"a", b"b"] {
            peer.write_all(byte).unwrap();
            held.push(receive(&mut ring).unwrap().expect("a chunk"));
        }
        peer.write_all(b"c").unwrap();
        let dry = receive(&mut ring).expect_err("no idle chunk");
        assert_eq!(dry.raw_os_error(), Some(libc::ENOBUFS));
        held.clear();
        let c = receive(&mut ring).unwrap().expect("the byte still waits");
        assert_eq!(c.bytes(), b"c", "nothing was lost to the dry pool");
        drop(c);

        assert!(ring.receive(key, fd, false).is_none());
        ring.unwatch(key, fd);
        let called_back = wait_for(&mut ring, |e| match e {
            Event::Received(k, r) if k == key => Some(r),
            _ => None,
        });
        assert_eq!(
            called_back
                .map(|c| c.map(|c| c.len()))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ECANCELED)
        );
        assert_eq!((ring.chunks().in_use(), ring.chunks().idle()), (0, 2));
        assert!(!ring.transfers_in_flight());
    }

    /// Sends to a socket that is often full (small buffers, a slow reader) go the quick way,
    /// find no room or room for part, and go on as waiting sends: the reader gets every
    /// byte once, in order, and the counts add up to exactly what was sent.
    #[test]
    fn sends_that_find_no_room_lose_and_repeat_nothing() {
        if !ring_or_skip() {
            return;
        }
        use std::io::{Read, Write};
        let pair = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let peer = socket();
            peer.set_recv_buffer_size(4096).unwrap();
            let _ = peer.connect(&SockAddr::from(l.local_addr().unwrap()));
            let (ours, _) = l.accept().unwrap();
            ours.set_nonblocking(true).unwrap();
            let ours = Socket::from(ours);
            ours.set_send_buffer_size(4096).unwrap();
            peer.set_nonblocking(false).unwrap();
            (ours, std::net::TcpStream::from(peer))
        };
        let (src, mut src_peer) = pair();
        let (dst, mut dst_peer) = pair();
        const TOTAL: usize = 2 << 20;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 + i / 251) as u8).collect();
        let expect = data.clone();
        let writer = std::thread::spawn(move || src_peer.write_all(&data).unwrap());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = [0u8; 700];
            while got.len() < TOTAL {
                match dst_peer.read(&mut buf).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        let wake = crate::sys::eventfd().unwrap();
        let mut ring = Uring::new(wake.as_raw_fd(), 4).unwrap();
        let (rkey, skey) = (Key::new(Tag::Client, 1, 1), Key::new(Tag::Upstream, 1, 1));
        let mut sent = 0;
        while sent < TOTAL {
            assert!(ring.receive(rkey, src.as_raw_fd(), true).is_none());
            let mut chunk = wait_for(&mut ring, |e| match e {
                Event::Received(k, r) if k == rkey => Some(r.unwrap().expect("bytes")),
                _ => None,
            });
            while !chunk.is_empty() {
                let before = chunk.len();
                assert!(ring.send(skey, dst.as_raw_fd(), chunk, true).is_none());
                let (rest, n) = wait_for(&mut ring, |e| match e {
                    Event::Sent(k, c, r) if k == skey => Some((c, r.unwrap())),
                    _ => None,
                });
                assert_eq!(n, before - rest.len(), "the count is what left the chunk");
                sent += n;
                chunk = rest;
            }
        }
        writer.join().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(sent, TOTAL);
        assert!(got == expect, "the reader got other bytes than were sent");
        assert_eq!(ring.chunks().in_use(), 0);
    }

    /// A socket whose connect is still queued when the loop lets it go (a reload closed its
    /// connection in the same turn) must stay open until the kernel has taken the queued
    /// requests in: otherwise the next socket gets its number, and the queued connect
    /// connects that socket to the old connection's upstream.
    #[test]
    fn a_retired_socket_number_never_takes_a_queued_connect() {
        if !ring_or_skip() {
            return;
        }
        let old = TcpListener::bind("127.0.0.1:0").unwrap();
        let new = TcpListener::bind("127.0.0.1:0").unwrap();
        old.set_nonblocking(true).unwrap();
        let addr = |l: &TcpListener| SockAddr::from(l.local_addr().unwrap());
        let wake = crate::sys::eventfd().unwrap();
        let mut ring = Uring::new(wake.as_raw_fd(), 4).unwrap();
        let timeout = Duration::from_secs(5);

        let options = crate::relay::route::socket_options(Some(Duration::from_secs(77)));
        let options = options.as_slice();
        let first = socket();
        let first_key = Key::new(Tag::Upstream, 1, 1);
        ring.connect(
            first_key,
            first.as_raw_fd(),
            &addr(&old),
            timeout,
            options,
            false,
        );
        ring.unwatch(first_key, first.as_raw_fd());
        ring.retire(first.into());
        let second = socket();
        let second_key = Key::new(Tag::Upstream, 2, 1);
        ring.connect(
            second_key,
            second.as_raw_fd(),
            &addr(&new),
            timeout,
            options,
            false,
        );

        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        let connected = loop {
            ring.wait(Some(Duration::from_millis(100)), &mut events)
                .unwrap();
            let found = events.iter().find_map(|e| match e {
                Event::Connected(k, r) if *k == second_key => Some(r.as_ref().map(|_| ())),
                _ => None,
            });
            if let Some(r) = found {
                break r.map_err(|e| e.to_string());
            }
            assert!(
                Instant::now() < deadline,
                "no connect completion: {events:?}"
            );
        };
        assert_eq!(connected, Ok(()), "the second socket's connect");
        let peer: SocketAddr = second.peer_addr().unwrap().as_socket().unwrap();
        assert_eq!(peer, new.local_addr().unwrap(), "the second socket's peer");
        // The options went with the connect (through the ring where it can).
        assert!(second.nodelay().unwrap(), "TCP_NODELAY");
        assert!(second.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(
            second.keepalive_time().unwrap(),
            Duration::from_secs(77),
            "TCP_KEEPIDLE"
        );
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release.split(|c: char| !c.is_ascii_digit());
        let version = (
            v.next().and_then(|n| n.parse().ok()).unwrap_or(0u32),
            v.next().and_then(|n| n.parse().ok()).unwrap_or(0u32),
        );
        if version >= (6, 7) {
            assert!(
                ring.ring_sockopt,
                "Linux {version:?}: setsockopt through the ring"
            );
        }
        // The first socket's own connect may have reached the old upstream before its
        // cancellation: never from the second socket.
        let second_local: SocketAddr = second.local_addr().unwrap().as_socket().unwrap();
        match old.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, from)) => assert_ne!(
                from, second_local,
                "the second socket reached the old upstream"
            ),
            Err(e) => panic!("accept on the old upstream: {e}"),
        }
    }
}
