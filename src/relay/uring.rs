//! The io_uring backend: accept, connect linked to a timeout, multishot poll for
//! readiness. Bytes never move through io_uring: the loop calls splice(2) inline when a
//! socket is ready (`IORING_OP_SPLICE` on sockets always runs on an io-wq thread; see
//! DESIGN.md). So no request here ever needs an io-wq worker; the worker count is capped at
//! one as a safety net.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use socket2::SockAddr;

use super::driver::{Driver, Event, Key, Tag};

const POLL_MASK: u32 = (libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP) as u32;

/// The opcodes this backend submits; all must be supported for `auto` to choose it.
const OPCODES: [(u8, &str); 5] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

pub struct Uring {
    ring: IoUring,
    /// Listeners being accepted on, to re-arm a multishot accept that ended.
    listeners: HashMap<Key, RawFd>,
    /// Upstream sockets being connected, to watch them once connected.
    connecting: HashMap<Key, RawFd>,
    /// Connect arguments the kernel reads when the entries are submitted (it copies both
    /// at prep time); kept until the next submit. Boxed: an entry holds pointers into them,
    /// which must not move when the vector grows.
    #[allow(clippy::vec_box)]
    args: Vec<Box<(SockAddr, types::Timespec)>>,
    wake: RawFd,
    completions: Vec<(u64, i32, u32)>,
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
    Ok(())
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(16384)
        .build(4096)
}

impl Uring {
    pub fn new(wake: RawFd) -> io::Result<Uring> {
        let ring = new_ring()?;
        // Nothing we submit uses io-wq; cap its workers at one (bounded, unbounded).
        let mut max = [1u32, 1u32];
        ring.submitter().register_iowq_max_workers(&mut max)?;
        let mut u = Uring {
            ring,
            listeners: HashMap::new(),
            connecting: HashMap::new(),
            args: Vec::new(),
            wake,
            completions: Vec::with_capacity(1024),
        };
        u.poll(Key::new(Tag::Wake, 0, 0), wake, libc::POLLIN as u32);
        Ok(u)
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry we build references only fds the loop keeps open until it
            // cancels the request, and memory in `self.args`, which lives until submitted.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The queue is full: hand it to the kernel (which copies what it needs) and retry.
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
            self.args.clear();
        }
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
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(key.0);
        self.push(e);
    }

    fn cancel(&mut self, key: Key) {
        let e = opcode::AsyncCancel::new(key.0)
            .build()
            .user_data(key.with_tag(Tag::Ignore).0);
        self.push(e);
    }

    fn complete(&mut self, key: Key, res: i32, more: bool, out: &mut Vec<Event>) {
        match key.tag() {
            Tag::Wake => {
                if !more {
                    self.poll(key, self.wake, libc::POLLIN as u32);
                }
                out.push(Event::Wake);
            }
            Tag::Listener => {
                let Some(&fd) = self.listeners.get(&key) else {
                    // Stopped: an fd that raced the cancel is closed here.
                    if res >= 0 {
                        // SAFETY: the kernel returned a new fd that nobody else owns.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                    return;
                };
                if res >= 0 {
                    // SAFETY: the kernel returned a new fd that nobody else owns.
                    out.push(Event::Accepted(key, unsafe { OwnedFd::from_raw_fd(res) }));
                    if !more {
                        self.arm_accept(key, fd);
                    }
                } else if matches!(-res, libc::ECONNABORTED | libc::EINTR | libc::EPROTO) {
                    if !more {
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
                        self.poll(key, fd, POLL_MASK);
                    }
                    return;
                }
                if res >= 0 {
                    let bits = res as i16;
                    let readable = bits
                        & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR)
                        != 0;
                    let writable = bits & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0;
                    let hup = bits & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
                    out.push(Event::Ready {
                        key,
                        readable,
                        writable,
                        hup,
                    });
                }
                if !more && res != -libc::ECANCELED {
                    out.push(Event::Unwatched(key));
                }
            }
            Tag::Ignore => {}
        }
    }
}

impl Driver for Uring {
    fn accept(&mut self, key: Key, fd: RawFd) -> io::Result<()> {
        self.listeners.insert(key, fd);
        self.arm_accept(key, fd);
        Ok(())
    }

    fn stop_accept(&mut self, key: Key, _fd: RawFd) {
        if self.listeners.remove(&key).is_some() {
            self.cancel(key);
        }
    }

    fn connect(&mut self, key: Key, fd: RawFd, addr: &SockAddr, timeout: Duration) {
        // Both entries must land in the same submission for the link to hold: make room.
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            let _ = self.ring.submit();
            self.args.clear();
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
        self.poll(key, fd, POLL_MASK);
        Ok(())
    }

    fn unwatch(&mut self, key: Key, _fd: RawFd) {
        self.connecting.remove(&key);
        self.cancel(key);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        let ts;
        let args = types::SubmitArgs::new();
        let args = match timeout {
            Some(t) => {
                ts = types::Timespec::from(t);
                args.timespec(&ts)
            }
            None => args,
        };
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.args.clear();
        let mut batch = std::mem::take(&mut self.completions);
        batch.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(key, res, flags) in &batch {
            self.complete(Key(key), res, cqueue::more(flags), out);
        }
        batch.clear();
        self.completions = batch;
        Ok(())
    }

    fn flush(&mut self) {
        // Submit, and run completions (a cancelled accept releases its listener then).
        let ts = types::Timespec::new();
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = self.ring.submitter().submit_with_args(1, &args);
        self.args.clear();
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
        for _ in 0..20 {
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            if self.ring.completion().any(|c| c.user_data() == marker) {
                break;
            }
        }
        self.listeners.clear();
        self.connecting.clear();
    }
}
