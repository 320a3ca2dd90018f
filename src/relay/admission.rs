//! What a client socket must do before it is routed and connected upstream: a trusted
//! proxy's connection must present its PROXY header (which names the real client); a TLS
//! entry connection must send a ClientHello whose SNI names a mapping, then finish its
//! handshake. Each step is driven by readiness, like the data path, and bounded by a timer.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use rustls::server::Acceptor;
use rustls::ServerConnection;

use super::codec::Codec;
use super::connection::Side;
use super::route::Route;
use crate::addr::ClientAddr;
use crate::metrics::{Rejection, Via};
use crate::proxy_protocol::{self, Parsed};
use crate::sys;
use crate::tls::{FdIo, TlsEndpoint, ACCESS_DENIED_ALERT, UNRECOGNIZED_NAME_ALERT};

/// Mapping names (and their `-` forms, lower case) → the route TLS connections take.
pub type TlsRoutes = HashMap<String, Arc<Route>>;

pub enum Stage {
    /// From a trusted proxy: its PROXY header is awaited.
    ProxyHeader { route: Arc<Route> },
    /// At a TLS entry: the ClientHello is awaited.
    TlsHello {
        acceptor: Box<Acceptor>,
        endpoint: Arc<TlsEndpoint>,
    },
    /// Routed by SNI; the handshake is finishing.
    TlsHandshake {
        tls: Box<ServerConnection>,
        route: Arc<Route>,
        /// The routing name (a key of [`TlsRoutes`]) the route was found by.
        name: String,
    },
    /// Admitted: what it carried has moved on to the connection.
    Done,
}

/// A client socket not yet routed.
pub struct Pending {
    pub client: Side,
    /// The peer: a trusted proxy, or the client itself at a TLS entry.
    pub peer: ClientAddr,
    /// The port it connected to (a mapped port, or the TLS entry's).
    pub port: u16,
    pub stage: Stage,
}

/// What a step of admission decided.
pub enum Step {
    /// Waiting for readiness.
    Wait,
    /// Refuse the connection; `detail` goes to the log.
    Reject {
        why: Rejection,
        route: Option<Arc<Route>>,
        detail: String,
    },
    /// Route it: the real client address, how it came, and how its client end carries
    /// bytes (the TLS session of a TLS entrance).
    /// `route` is the route found when admission began; the loop admits the connection on
    /// the route in force now (its port's, or for TLS its `tls_name`'s).
    Admit {
        route: Arc<Route>,
        client_addr: ClientAddr,
        via: Via,
        codec: Codec,
        tls_name: Option<String>,
    },
}

impl Pending {
    /// The mapped host port this connection is bound for, once known.
    pub fn mapped_port(&self) -> Option<u16> {
        match &self.stage {
            Stage::ProxyHeader { route } | Stage::TlsHandshake { route, .. } => Some(route.port),
            Stage::TlsHello { .. } | Stage::Done => None,
        }
    }

    /// Moves admission on as far as the bytes that have arrived allow.
    pub fn advance(&mut self, tls_routes: &TlsRoutes) -> Step {
        loop {
            let next = match &mut self.stage {
                Stage::Done => return Step::Wait,
                Stage::ProxyHeader { route } => {
                    return read_proxy_header(&mut self.client, route);
                }
                Stage::TlsHello { acceptor, endpoint } => {
                    match read_hello(&mut self.client, self.peer, acceptor, endpoint, tls_routes) {
                        Ok(Some(next)) => next,
                        Ok(None) => return Step::Wait,
                        Err(step) => return step,
                    }
                }
                Stage::TlsHandshake { tls, route, .. } => {
                    return match handshake(&mut self.client, tls) {
                        Ok(true) => {
                            let Stage::TlsHandshake { tls, route, name } =
                                std::mem::replace(&mut self.stage, Stage::Done)
                            else {
                                unreachable!()
                            };
                            Step::Admit {
                                route,
                                client_addr: self.peer,
                                via: Via::Tls,
                                codec: Codec::Tls(tls),
                                tls_name: Some(name),
                            }
                        }
                        Ok(false) => Step::Wait,
                        Err(detail) => Step::Reject {
                            why: Rejection::Tls,
                            route: Some(route.clone()),
                            detail,
                        },
                    };
                }
            };
            self.stage = next;
        }
    }
}

/// Peeks at the socket until a whole PROXY header is there, then consumes exactly the
/// header: the bytes after it stay in the socket and are relayed like any others.
fn read_proxy_header(client: &mut Side, route: &Arc<Route>) -> Step {
    let reject = |detail: String| Step::Reject {
        why: Rejection::ProxyHeader,
        route: Some(route.clone()),
        detail,
    };
    if !client.readable {
        return Step::Wait;
    }
    let mut buf = [0u8; proxy_protocol::MAX_HEADER_LEN];
    let fd = client.fd.as_raw_fd();
    let n = match sys::peek(fd, &mut buf) {
        Ok(0) => return reject("closed before its PROXY header".into()),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            client.readable = false;
            return Step::Wait;
        }
        Err(e) => return reject(format!("reading the PROXY header: {e}")),
    };
    match proxy_protocol::parse(&buf[..n]) {
        Err(e) => reject(e.to_string()),
        Ok(Parsed::Incomplete) => {
            // The bytes stay queued; more arrive with a new readiness report.
            client.readable = false;
            Step::Wait
        }
        Ok(Parsed::Complete { header, consumed }) => {
            if let Err(e) = sys::recv(fd, &mut buf[..consumed]) {
                return reject(format!("reading the PROXY header: {e}"));
            }
            match header.source {
                Some(source) => Step::Admit {
                    route: route.clone(),
                    client_addr: ClientAddr(source),
                    via: Via::Proxy,
                    codec: Codec::Plain,
                    tls_name: None,
                },
                None => reject(format!(
                    "PROXY v{} header names no client address ({:?})",
                    header.version, header.command
                )),
            }
        }
    }
}

/// Reads the ClientHello and routes by its SNI. `Ok(None)`: need more bytes. A client that
/// the mapping's `allow` refuses is refused here, before any handshake work.
fn read_hello(
    client: &mut Side,
    peer: ClientAddr,
    acceptor: &mut Acceptor,
    endpoint: &TlsEndpoint,
    tls_routes: &TlsRoutes,
) -> Result<Option<Stage>, Step> {
    let fd = client.fd.as_raw_fd();
    let tls_reject = |detail: String| Step::Reject {
        why: Rejection::Tls,
        route: None,
        detail,
    };
    while client.readable {
        match acceptor.read_tls(&mut FdIo(fd)) {
            Ok(0) => return Err(tls_reject("closed before its ClientHello".into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.readable = false,
            Err(e) => return Err(tls_reject(format!("reading the ClientHello: {e}"))),
        }
    }
    let accepted = match acceptor.accept() {
        Ok(None) => return Ok(None),
        Ok(Some(a)) => a,
        Err((e, mut alert)) => {
            let _ = alert.write(&mut FdIo(fd));
            return Err(tls_reject(format!("bad ClientHello: {e}")));
        }
    };
    let sni = accepted
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    let route = sni
        .as_deref()
        .and_then(|s| endpoint.mapping_name(s))
        .and_then(|name| tls_routes.get_key_value(name));
    let Some((name, route)) = route else {
        let _ = FdIo(fd).write(&UNRECOGNIZED_NAME_ALERT);
        return Err(Step::Reject {
            why: Rejection::NoRoute,
            route: None,
            detail: format!("no mapping for SNI {:?}", sni.unwrap_or_default()),
        });
    };
    if !route.mapping.allows(peer.0.ip()) {
        let _ = FdIo(fd).write(&ACCESS_DENIED_ALERT);
        return Err(Step::Reject {
            why: Rejection::Acl,
            route: Some(route.clone()),
            detail: String::new(),
        });
    }
    match accepted.into_connection(endpoint.config.clone()) {
        Ok(tls) => Ok(Some(Stage::TlsHandshake {
            tls: Box::new(tls),
            route: route.clone(),
            name: name.clone(),
        })),
        Err((e, mut alert)) => {
            let _ = alert.write(&mut FdIo(fd));
            Err(tls_reject(format!("handshake: {e}")))
        }
    }
}

/// Drives the handshake; `Ok(true)` once it is complete.
fn handshake(client: &mut Side, tls: &mut ServerConnection) -> Result<bool, String> {
    let fd = client.fd.as_raw_fd();
    loop {
        while tls.wants_write() {
            if !client.writable {
                return Ok(false);
            }
            match tls.write_tls(&mut FdIo(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.writable = false,
                Err(e) => return Err(format!("handshake: {e}")),
            }
        }
        if !tls.is_handshaking() {
            return Ok(true);
        }
        if !client.readable {
            return Ok(false);
        }
        match tls.read_tls(&mut FdIo(fd)) {
            Ok(0) => return Err("closed during the handshake".into()),
            Ok(_) => {
                if let Err(e) = tls.process_new_packets() {
                    // Send the alert rustls queued, best effort.
                    let _ = tls.write_tls(&mut FdIo(fd));
                    return Err(format!("handshake: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.readable = false,
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
}
