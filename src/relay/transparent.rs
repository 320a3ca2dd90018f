//! `source = "client"`: the upstream connect comes from the real client's address, so that
//! the instance's sshd (its log, `$SSH_CLIENT`, `PerSourcePenalties`, fail2ban) sees the
//! client rather than the relay.
//!
//! The upstream socket gets `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), which lets it bind an
//! address that is not the host's, and binds the client's address and port (port 0 with
//! `IP_BIND_ADDRESS_NO_PORT` when that port is taken here); the connect then goes through
//! the loop's usual non-blocking path. The instance's answers are addressed to the client,
//! so the host must deliver them locally: `scripts/transparent-routing` marks the packets
//! of transparent sockets and routes marked packets to `lo`.
//!
//! Where that cannot work the connection connects from the relay's address instead (a
//! fallback), counted by reason in `portrelay_transparent_fallbacks_total` and logged once
//! per mapping and reason:
//! - `loopback`: a client on 127/8 or ::1 (its address cannot appear on another link);
//! - `family`: a client of the other address family than the upstream's;
//! - `local`: a client address of this host, or one on the upstream's own on-link network
//!   (the instance would answer it directly, past the relay);
//! - `permission`: `IP_TRANSPARENT` refused (no CAP_NET_ADMIN or CAP_NET_RAW);
//! - `bind`: any other failure to bind the client's address.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{SockAddr, SockRef};

use crate::control::{Mapping, Source};
use crate::metrics::{fallback_counters, Fallback};
use crate::sys::{self, SockOpt};

/// How long a loop trusts its copy of the host's interface addresses.
const ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// The transparent-source state of one `source = "client"` mapping.
#[derive(Debug)]
pub struct Transparent {
    fallbacks: [metrics::Counter; Fallback::COUNT],
    /// Whether a fallback of each reason has been logged for this mapping.
    logged: [AtomicBool; Fallback::COUNT],
    /// Whether a timed-out connect from a client's address has been logged.
    timeout_logged: AtomicBool,
}

impl Transparent {
    /// `Some` for a `source = "client"` mapping (its fallback series then exist, at 0).
    pub fn of(m: &Mapping) -> Option<Transparent> {
        (m.source == Source::Client).then(|| Transparent {
            fallbacks: fallback_counters(&m.name),
            logged: Default::default(),
            timeout_logged: AtomicBool::new(false),
        })
    }

    /// Makes `socket` (an upstream socket, not yet connected) connect to `upstream` from
    /// `client`'s address; where that cannot work, leaves it to connect from the relay's
    /// address and counts (and the first time per reason, logs) why.
    pub fn bind(
        &self,
        map: &str,
        socket: BorrowedFd<'_>,
        client: SocketAddr,
        upstream: SocketAddr,
    ) {
        let result = source_for(client, upstream).and_then(|from| bind_from(socket, from));
        if let Err((why, error)) = result {
            self.fallbacks[why as usize].increment(1);
            if !self.logged[why as usize].swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    map,
                    client = %client,
                    upstream = %upstream,
                    reason = why.label(),
                    error = error.as_deref().unwrap_or(""),
                    "source = \"client\" falls back to the relay's address (logged once per mapping and reason)"
                );
            }
        }
    }

    /// An upstream connect failed: when it timed out from the client's address, says
    /// (once per mapping) what that usually means. The connection fails like any other
    /// whose connect fails (or, held, retries).
    pub fn connect_failed(
        &self,
        map: &str,
        socket: BorrowedFd<'_>,
        client: SocketAddr,
        e: &io::Error,
    ) {
        let timed_out =
            e.kind() == io::ErrorKind::TimedOut || e.raw_os_error() == Some(libc::ETIMEDOUT);
        let from_client = SockRef::from(&socket)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.ip().to_canonical() == client.ip().to_canonical());
        if timed_out && from_client && !self.timeout_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                map,
                client = %client,
                "an upstream connect from the client's address timed out: without the host \
                 routing (scripts/transparent-routing up) the instance's answers never reach \
                 the relay (logged once per mapping)"
            );
        }
    }
}

type Refusal = (Fallback, Option<String>);

/// The address to connect from for `client`, or why the relay's own must do.
fn source_for(client: SocketAddr, upstream: SocketAddr) -> Result<SocketAddr, Refusal> {
    let ip = client.ip().to_canonical();
    let up = upstream.ip().to_canonical();
    let from = SocketAddr::new(ip, client.port());
    match classify(ip, up, &host_addresses()) {
        None => Ok(from),
        Some(why) => Err((why, None)),
    }
}

/// Why `client` cannot be the source towards `upstream` on a host with `addresses`
/// (interface address, prefix length), if it cannot.
fn classify(client: IpAddr, upstream: IpAddr, addresses: &[(IpAddr, u8)]) -> Option<Fallback> {
    if client.is_loopback() {
        return Some(Fallback::Loopback);
    }
    if client.is_ipv4() != upstream.is_ipv4() {
        return Some(Fallback::Family);
    }
    let on_link = addresses.iter().any(|&(addr, prefix)| {
        addr == client
            || ipnet::IpNet::new(addr, prefix)
                .is_ok_and(|net| net.contains(&client) && net.contains(&upstream))
    });
    on_link.then_some(Fallback::Local)
}

/// Interface addresses with their prefix lengths.
type Addresses = Vec<(IpAddr, u8)>;

/// The host's interface addresses, as this loop last read them (at most [`ADDRESSES_TTL`]
/// ago). A read that fails counts as no addresses: then only the kernel can refuse.
fn host_addresses() -> Rc<Addresses> {
    thread_local! {
        static CACHE: RefCell<Option<(Instant, Rc<Addresses>)>> = const { RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some((at, a)) if at.elapsed() < ADDRESSES_TTL => a.clone(),
            _ => {
                let a = Rc::new(sys::interface_addresses().unwrap_or_else(|e| {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "cannot read the host's interface addresses (getifaddrs); \
                             source = \"client\" cannot tell local clients (logged once)"
                        );
                    }
                    Vec::new()
                }));
                *c = Some((Instant::now(), a.clone()));
                a
            }
        }
    })
}

/// `IP(V6)_TRANSPARENT` and a bind to `from` (its port if free here, else any port chosen
/// at connect time).
fn bind_from(socket: BorrowedFd<'_>, from: SocketAddr) -> Result<(), Refusal> {
    set_transparent(socket.as_raw_fd(), from.is_ipv6()).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Fallback::Permission,
            _ => Fallback::Bind,
        };
        (why, Some(e.to_string()))
    })?;
    let sock = SockRef::from(&socket);
    let socket = socket.as_raw_fd();
    match sock.bind(&SockAddr::from(from)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let any_port = SocketAddr::new(from.ip(), 0);
            let no_port = SockOpt {
                level: libc::IPPROTO_IP,
                name: libc::IP_BIND_ADDRESS_NO_PORT,
                value: 1,
            };
            sys::set_int_option(socket, &no_port)
                .and_then(|()| sock.bind(&SockAddr::from(any_port)))
                .map_err(|e| (Fallback::Bind, Some(e.to_string())))
        }
        Err(e) => Err((Fallback::Bind, Some(e.to_string()))),
    }
}

fn set_transparent(socket: RawFd, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::IPPROTO_IP, libc::IP_TRANSPARENT)
    };
    sys::set_int_option(
        socket,
        &SockOpt {
            level,
            name,
            value: 1,
        },
    )
}

/// At start and at each reload: when some mapping has `source = "client"`, whether this
/// process may set `IP_TRANSPARENT`; if not, says so once (each connection then falls back,
/// counted as `permission`).
pub fn probe(mappings: &[Mapping]) {
    let Some(m) = mappings.iter().find(|m| m.source == Source::Client) else {
        return;
    };
    let scratch = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot make a scratch socket to probe IP_TRANSPARENT");
            return;
        }
    };
    if let Err(e) = set_transparent(scratch.as_raw_fd(), false) {
        tracing::warn!(
            map = %m.name,
            error = %e,
            "source = client needs CAP_NET_ADMIN or CAP_NET_RAW; connections fall back to the relay's address"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn which_clients_fall_back() {
        // The host: 10.10.0.1/24 towards clients, 172.31.0.1/24 towards instances.
        let host = [
            (ip("10.10.0.1"), 24),
            (ip("172.31.0.1"), 24),
            (ip("fd00:10::1"), 64),
        ];
        let up = ip("172.31.0.2");
        let cases = [
            ("10.10.0.2", None),
            ("203.0.113.7", None),
            ("127.0.0.1", Some(Fallback::Loopback)),
            ("127.1.2.3", Some(Fallback::Loopback)),
            ("::1", Some(Fallback::Loopback)),
            ("fd00:10::2", Some(Fallback::Family)),
            ("10.10.0.1", Some(Fallback::Local)),
            ("172.31.0.1", Some(Fallback::Local)),
            ("172.31.0.3", Some(Fallback::Local)),
        ];
        for (client, want) in cases {
            assert_eq!(classify(ip(client), up, &host), want, "client {client}");
        }
        assert_eq!(classify(ip("fd00:10::2"), ip("fd00:31::2"), &host), None);
        assert_eq!(
            classify(ip("10.10.0.2"), ip("fd00:31::2"), &host),
            Some(Fallback::Family)
        );
    }

    #[test]
    fn an_ipv4_mapped_client_counts_as_ipv4() {
        let client: SocketAddr = "[::ffff:10.10.0.2]:4242".parse().unwrap();
        let from = source_for(client, "192.0.2.1:22".parse().unwrap());
        assert_eq!(from.ok(), Some("10.10.0.2:4242".parse().unwrap()));
    }
}
