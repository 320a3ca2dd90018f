//! Thin syscall wrappers the data path needs and std lacks: pipes and splice(2), eventfd,
//! the open-file limit, socket options, the host's interface addresses. Every call is non-blocking; every `unsafe` names its invariants.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints, as pipe2(2) requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe capacity of `bytes` (F_SETPIPE_SZ); the kernel may refuse.
pub fn set_pipe_capacity(fd: &OwnedFd, bytes: u32) -> io::Result<()> {
    // SAFETY: `fd` is an open pipe fd for the duration of the call; F_SETPIPE_SZ takes an
    // integer, no pointer.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) }).map(drop)
}

/// The capacity of a pipe in bytes (F_GETPIPE_SZ).
pub fn pipe_capacity(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: `fd` is an open pipe fd for the duration of the call; F_GETPIPE_SZ takes no
    // pointer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) }).map(|n| n as usize)
}

/// splice(2) without offsets, never blocking on the pipe (`SPLICE_F_NONBLOCK`); the sockets
/// on the other end are non-blocking too. No `SPLICE_F_MORE`: it would delay keystrokes.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the call (owned by the caller's connection and pipe);
    // null offsets are allowed for pipes and sockets; no buffer of ours is touched.
    cvt_size(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// recv(2) into `buf`, non-blocking.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// recv(2) with MSG_PEEK: looks at queued bytes without consuming them.
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    cvt_size(unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    })
}

/// send(2) of `buf`, non-blocking, never raising SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
    cvt_size(unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// [`send`] with `MSG_MORE`: the bytes wait for what is sent next, so that a frame header
/// leaves in one segment with the payload spliced after it.
pub fn send_more(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
    cvt_size(unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE,
        )
    })
}

/// Whether a TCP socket is in CLOSE_WAIT: its peer's FIN arrived and no reset since (a
/// reset moves it to CLOSE, whether or not its error was read already).
pub fn tcp_close_wait(fd: RawFd) -> bool {
    // SAFETY: `info` is a writable tcp_info of `len` bytes for the call; the kernel writes
    // at most `len` bytes and sets `len` to what it wrote.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        // TCP_CLOSE_WAIT in the kernel's `enum tcp_state` (include/net/tcp_states.h).
        const TCP_CLOSE_WAIT: u8 = 8;
        rc == 0 && len >= 1 && info.tcpi_state == TCP_CLOSE_WAIT
    }
}

/// A non-blocking eventfd, used to wake a loop from the control thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; on success the fd is new and ours.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (wakes whoever polls it).
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; an error (counter full) still leaves it readable.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter so that it stops being readable.
pub fn eventfd_clear(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (already clear) is fine.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that setrlimit only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// The system's page size and clock ticks per second (for figures read from /proc).
pub fn page_size_and_ticks() -> (u64, u64) {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let (page, ticks) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    (
        if page > 0 { page as u64 } else { 4096 },
        if ticks > 0 { ticks as u64 } else { 100 },
    )
}

/// Blocks until `fd` is readable (or reports an error or hang-up), retrying on EINTR.
pub fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The address an accept filled in: the kernel writes it and its length in place.
#[derive(Clone, Copy)]
pub struct PeerAddr {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

impl Default for PeerAddr {
    fn default() -> PeerAddr {
        PeerAddr {
            // SAFETY: all-zero bytes are a valid sockaddr_storage (family AF_UNSPEC).
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }
}

impl PeerAddr {
    /// The address, if accept filled in an IPv4 or IPv6 one.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        // SAFETY: `storage` is a sockaddr_storage the kernel filled, `len` bytes of it.
        let addr = unsafe { socket2::SockAddr::new(self.storage, self.len) };
        addr.as_socket()
    }
}

impl std::fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.socket_addr())
    }
}

/// One integer socket option, as setsockopt(2) takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOpt {
    pub level: i32,
    pub name: i32,
    pub value: i32,
}

/// setsockopt(2) of one `int` option.
pub fn set_int_option(fd: RawFd, o: &SockOpt) -> io::Result<()> {
    // SAFETY: `o.value` is a live c_int for the call and its size is passed with it.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            o.level,
            o.name,
            (&o.value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The addresses of this host's interfaces (in the calling thread's network namespace),
/// each with its prefix length.
pub fn interface_addresses() -> io::Result<Vec<(std::net::IpAddr, u8)>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs below frees.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs made, not yet freed; its address
        // and netmask pointers are null or point at a sockaddr of the family they name
        // (sockaddr_in for AF_INET, sockaddr_in6 for AF_INET6), owned by the list.
        unsafe {
            let ifa = &*at;
            let (addr, mask) = (ifa.ifa_addr, ifa.ifa_netmask);
            if !addr.is_null() && !mask.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(addr as *const libc::sockaddr_in);
                        let m = &*(mask as *const libc::sockaddr_in);
                        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                        let prefix = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
                        out.push((IpAddr::V4(ip), prefix));
                    }
                    libc::AF_INET6 => {
                        let a = &*(addr as *const libc::sockaddr_in6);
                        let m = &*(mask as *const libc::sockaddr_in6);
                        let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                        let prefix = u128::from_be_bytes(m.sin6_addr.s6_addr).count_ones() as u8;
                        out.push((IpAddr::V6(ip), prefix));
                    }
                    _ => {}
                }
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and nothing refers to the list past here.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Bytes queued to read on a pipe or socket (FIONREAD).
pub fn fionread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) })?;
    Ok(n as usize)
}

/// An anonymous in-memory file (memfd), close-on-exec, named `name` in /proc.
pub fn memfd(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string valid for the call.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: memfd_create returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What kind of file `fd` is (the `S_IFMT` bits of fstat), or an error if it is not open.
pub fn file_type(fd: RawFd) -> io::Result<libc::mode_t> {
    // SAFETY: an all-zero stat is a valid value to be overwritten by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes for the whole call.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_SETFD takes an integer flag, no pointer.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) }).map(drop)
}

/// Waits up to `timeout` for `fd` to be readable (or to report an error or hang-up):
/// `Ok(false)` when the time ran out or a signal came first.
pub fn wait_readable_for(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n >= 0 {
        return Ok(n > 0);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(false)
    } else {
        Err(e)
    }
}
