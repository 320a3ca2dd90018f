//! What a listener leads to: the route of one host port (its upstream and its mapping's
//! shared state), and the listening sockets themselves. Built by the control thread, shared
//! read-only with the loops.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use socket2::{Domain, SockAddr, Socket, Type};

use super::transparent::Transparent;
use crate::addr::{ListenAddr, UpstreamAddr};
use crate::control::Mapping;
use crate::metrics::{MappingMetrics, PortMetrics};
use crate::sys::{self, SockOpt};

/// The state of one `[[map]]` entry that all its ports and loops share.
#[derive(Debug)]
pub struct MappingState {
    pub name: String,
    pub allow: Vec<IpNet>,
    pub max_connections: Option<u32>,
    /// Live connections of this mapping, over all its ports and loops; carried over when
    /// a reload changes the mapping in place.
    pub active: Arc<AtomicU32>,
    /// Its own `hold`; `None`: the `[relay]` one.
    pub hold: Option<Duration>,
    /// Its `wake` argv, placeholders not yet substituted; empty: none.
    pub wake: Vec<String>,
    /// Held connections (a connect failed, retrying), over all ports and loops: a waiting
    /// spell begins when this leaves 0 and ends when it is back at 0.
    pub held: AtomicU32,
    /// Its wake command is running (at most one at a time).
    pub waking: Arc<AtomicBool>,
    /// Its own cap of connections per client source; `None`: none.
    pub per_source_max_connections: Option<u32>,
    pub metrics: MappingMetrics,
    /// With `source = "client"`: how its upstream connects bind the client's address.
    pub transparent: Option<Transparent>,
}

impl MappingState {
    pub fn new(m: &Mapping, active: Option<Arc<AtomicU32>>) -> MappingState {
        MappingState {
            name: m.name.clone(),
            allow: m.allow.clone(),
            max_connections: m.max_connections,
            active: active.unwrap_or_default(),
            hold: m.hold,
            wake: m.wake.clone(),
            held: AtomicU32::new(0),
            waking: Arc::default(),
            per_source_max_connections: m.per_source_max_connections,
            metrics: MappingMetrics::new(&m.name),
            transparent: Transparent::of(m),
        }
    }

    /// Whether a client at `ip` may use this mapping (IPv4-mapped IPv6 counts as IPv4).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Takes one connection slot of the mapping's cap, if one is free.
    pub fn try_acquire(&self) -> bool {
        let Some(max) = self.max_connections else {
            self.active.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        self.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Its cap per client source, with the scope its per-source counts go under: the
    /// address of its live-connection count, which a reload that changes the mapping in
    /// place carries over, and which no other mapping has while this one lives.
    pub fn per_source(&self) -> Option<(crate::limits::MapScope, u32)> {
        let scope = crate::limits::MapScope(Arc::as_ptr(&self.active) as usize);
        self.per_source_max_connections.map(|max| (scope, max))
    }
}

/// One host port: where its connections go, and what they count into.
#[derive(Debug)]
pub struct Route {
    pub port: u16,
    pub upstream: UpstreamAddr,
    pub upstream_sockaddr: SockAddr,
    pub mapping: Arc<MappingState>,
    pub metrics: PortMetrics,
}

impl Route {
    pub fn new(port: u16, upstream: UpstreamAddr, mapping: Arc<MappingState>) -> Route {
        Route {
            port,
            upstream,
            upstream_sockaddr: upstream.0.into(),
            metrics: PortMetrics::new(&mapping.name, port),
            mapping,
        }
    }
}

/// A listening socket for one host port on one bind address, shared by all loops (each
/// accepts from it; the kernel hands each connection to one of them).
#[derive(Debug)]
pub struct Listener {
    pub socket: Socket,
    pub addr: ListenAddr,
    pub port: u16,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            None,
        )?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // "::" must not also take the IPv4 port that "0.0.0.0" binds.
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        Ok(Listener {
            socket,
            addr: ListenAddr(addr),
            port: addr.port(),
        })
    }

    /// The listening socket `fd`, handed over from the process before (a live upgrade),
    /// as the listener of `addr`: checked to be a listening TCP socket bound to `addr`,
    /// and made non-blocking and close-on-exec again. On an error the fd is closed.
    pub fn from_fd(addr: SocketAddr, fd: OwnedFd) -> Result<Listener, InheritError> {
        let raw = fd.as_raw_fd();
        let socket = Socket::from(fd);
        let io = |step: &'static str| {
            move |source| InheritError::Io {
                fd: raw,
                step,
                source,
            }
        };
        let ty = socket.r#type().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => InheritError::NotSocket { fd: raw },
            _ => InheritError::Io {
                fd: raw,
                step: "SO_TYPE",
                source: e,
            },
        })?;
        let protocol = socket.protocol().map_err(io("SO_PROTOCOL"))?;
        if ty != Type::STREAM || protocol != Some(socket2::Protocol::TCP) {
            return Err(InheritError::NotTcp { fd: raw });
        }
        if !socket.is_listener().map_err(io("SO_ACCEPTCONN"))? {
            return Err(InheritError::NotListening { fd: raw });
        }
        let local = socket.local_addr().map_err(io("getsockname"))?.as_socket();
        if local.map(|a| (a.ip(), a.port())) != Some((addr.ip(), addr.port())) {
            return Err(InheritError::WrongAddress {
                fd: raw,
                want: addr,
                got: local,
            });
        }
        socket.set_nonblocking(true).map_err(io("O_NONBLOCK"))?;
        socket.set_cloexec(true).map_err(io("FD_CLOEXEC"))?;
        Ok(Listener {
            socket,
            addr: ListenAddr(addr),
            port: addr.port(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Why a handed-over fd cannot be taken as a listener.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("inherited fd {fd} is not a socket")]
    NotSocket { fd: RawFd },
    #[error("inherited fd {fd} is not a TCP stream socket")]
    NotTcp { fd: RawFd },
    #[error("inherited fd {fd} is not listening")]
    NotListening { fd: RawFd },
    #[error("inherited fd {fd} is bound to {}, not to {want}", got.map_or("no IP address".to_string(), |a| a.to_string()))]
    WrongAddress {
        fd: RawFd,
        want: SocketAddr,
        got: Option<SocketAddr>,
    },
    #[error("inherited fd {fd}: {step}")]
    Io {
        fd: RawFd,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Keepalive probes unanswered before a peer is taken for dead.
pub const KEEPALIVE_PROBES: u32 = 6;

/// TCP_NODELAY (no Nagle delay on keystrokes), keepalive (`None`: off) and, with
/// keepalive, `TCP_USER_TIMEOUT` = idle + interval × probes, so that a vanished peer is
/// given up at the same time whether the connection is idle (keepalive) or has unacked
/// data (retransmissions, which alone take ~15 min). Set on each listener, whose accepted
/// sockets inherit them (a few setsockopt per listener instead of per connection), and on
/// each upstream socket.
pub fn tune(fd: RawFd, keepalive: Option<Duration>) {
    for o in socket_options(keepalive).as_slice() {
        let _ = sys::set_int_option(fd, o);
    }
}

/// The options [`tune`] sets, in order: at most six.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOptions {
    opts: [SockOpt; 6],
    len: usize,
}

impl SocketOptions {
    fn push(&mut self, level: i32, name: i32, value: i32) {
        self.opts[self.len] = SockOpt { level, name, value };
        self.len += 1;
    }
    pub fn as_slice(&self) -> &[SockOpt] {
        &self.opts[..self.len]
    }
}

/// What [`tune`] sets for `keepalive`, for a backend that sets them its own way.
pub fn socket_options(keepalive: Option<Duration>) -> SocketOptions {
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as i32;
    let mut o = SocketOptions::default();
    o.push(libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    match keepalive {
        Some(t) => {
            let interval = t.min(Duration::from_secs(10));
            let user_timeout = (t + interval * KEEPALIVE_PROBES).as_millis();
            o.push(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            o.push(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(t));
            o.push(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(interval));
            o.push(
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                KEEPALIVE_PROBES as i32,
            );
            o.push(
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                user_timeout.min(i32::MAX as u128) as i32,
            );
        }
        None => {
            o.push(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0);
            o.push(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 0);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A handed-over listening socket is taken as it is: its queued connections are still
    /// there to accept, and it is close-on-exec again.
    #[test]
    fn from_fd_takes_a_listening_socket() {
        let std = TcpListener::bind(loopback()).unwrap();
        let addr = std.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        // As the process before leaves it for the exec.
        let socket = Socket::from(OwnedFd::from(std));
        socket.set_cloexec(false).unwrap();
        let l = Listener::from_fd(addr, OwnedFd::from(socket)).unwrap();
        assert_eq!((l.addr.0, l.port), (addr, addr.port()));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", l.fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(flags & libc::O_CLOEXEC, libc::O_CLOEXEC, "{info}");
        assert!(l.socket.nonblocking().unwrap());
        let (_, peer) = l.socket.accept().unwrap();
        assert_eq!(peer.as_socket(), Some(queued.local_addr().unwrap()));
    }

    #[test]
    fn from_fd_refuses_what_is_not_that_listener() {
        let std = TcpListener::bind(loopback()).unwrap();
        let addr = std.local_addr().unwrap();
        let other = SocketAddr::from(([127, 0, 0, 1], addr.port().wrapping_add(1).max(1)));
        let err = Listener::from_fd(other, OwnedFd::from(std)).unwrap_err();
        assert!(
            err.to_string()
                .ends_with(&format!("is bound to {addr}, not to {other}")),
            "{err}"
        );

        let bound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        bound.bind(&loopback().into()).unwrap();
        let at = bound.local_addr().unwrap().as_socket().unwrap();
        let err = Listener::from_fd(at, OwnedFd::from(bound)).unwrap_err();
        assert!(matches!(err, InheritError::NotListening { .. }), "{err}");

        let udp = UdpSocket::bind(loopback()).unwrap();
        let at = udp.local_addr().unwrap();
        let err = Listener::from_fd(at, OwnedFd::from(udp)).unwrap_err();
        assert!(matches!(err, InheritError::NotTcp { .. }), "{err}");

        let (r, _w) = sys::pipe().unwrap();
        let err = Listener::from_fd(at, r).unwrap_err();
        assert!(matches!(err, InheritError::NotSocket { .. }), "{err}");
        assert!(err.to_string().ends_with("is not a socket"), "{err}");
    }
}
