//! What a client socket must do before it is routed and connected upstream: a trusted
//! proxy's connection must present its PROXY header (which names the real client); a TLS
//! entry connection must send a ClientHello whose SNI names a mapping, then finish its
//! handshake. Each step is driven by readiness, like the data path, and bounded by a timer.
//!
//! One file per entrance: `proxy` (the PROXY header), `tls` (ClientHello, SNI routing,
//! handshake, then raw SSH or a WebSocket request), `websocket` (the upgrade request). [`Pending::advance`] is the one interface the loop calls. A connection in
//! admission holds an [`AdmissionPermit`], a relayed one a [`Permit`] and a
//! [`MappingPermit`]: places in the caps that are given back when dropped.

mod proxy;
mod tls;
mod websocket;

pub use websocket::{Request as WsRequest, WsEndpoint};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustls::server::Acceptor;
use rustls::ServerConnection;

use super::codec::Codec;
use super::connection::Side;
use super::route::{MappingState, Route};
use super::Shared;
use crate::addr::ClientAddr;
use crate::metrics::{Rejection, Via};
use crate::tls::TlsEndpoint;

/// Mapping names (and their `-` forms, lower case) → the route that TLS connections (by
/// SNI) and WebSocket connections (by path) take.
pub type TlsRoutes = HashMap<String, Arc<Route>>;

pub enum Stage {
    /// From a trusted proxy: its PROXY header is awaited.
    ProxyHeader { route: Arc<Route> },
    /// At a TLS entry: the ClientHello is awaited.
    TlsHello {
        acceptor: Box<Acceptor>,
        endpoint: Arc<TlsEndpoint>,
        /// WebSocket requests are served inside the session too (`wss://`).
        ws: Option<Arc<WsEndpoint>>,
    },
    /// Routed by SNI (or, with `ws`, the SNI may be the bare suffix: no route yet); the
    /// handshake is finishing.
    TlsHandshake {
        tls: Box<ServerConnection>,
        route: Option<Arc<Route>>,
        /// The routing name (a key of [`TlsRoutes`]) the route was found by.
        name: Option<String>,
        ws: Option<Arc<WsEndpoint>>,
    },
    /// Handshake done, and WebSocket served here: the first plaintext bytes tell `GET `
    /// (a WebSocket request) from SSH.
    TlsFirstBytes {
        tls: Box<ServerConnection>,
        route: Option<Arc<Route>>,
        name: Option<String>,
        ws: Arc<WsEndpoint>,
    },
    /// A WebSocket upgrade request is being read (`ws://`, or inside TLS).
    WsRequest(websocket::Request),
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
    /// Its places in the caps while in admission.
    pub permit: AdmissionPermit,
}

/// What a step of admission decided.
pub enum Step {
    /// Waiting for readiness.
    Wait,
    /// Refuse the connection; `detail` goes to the log. `graceful`: an answer was sent
    /// (an HTTP error), so close without a reset that could throw it away.
    Reject {
        why: Rejection,
        route: Option<Arc<Route>>,
        detail: String,
        graceful: bool,
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
            Stage::ProxyHeader { route } => Some(route.port),
            Stage::TlsHandshake { route, .. } | Stage::TlsFirstBytes { route, .. } => {
                route.as_ref().map(|r| r.port)
            }
            Stage::TlsHello { .. } | Stage::WsRequest(_) | Stage::Done => None,
        }
    }

    /// Moves admission on as far as the bytes that have arrived allow.
    pub fn advance(&mut self, tls_routes: &TlsRoutes) -> Step {
        loop {
            let next = match &mut self.stage {
                Stage::Done => return Step::Wait,
                Stage::ProxyHeader { route } => {
                    return proxy::read_header(&mut self.client, route);
                }
                Stage::TlsHello {
                    acceptor,
                    endpoint,
                    ws,
                } => {
                    match tls::read_hello(
                        &mut self.client,
                        self.peer,
                        acceptor,
                        endpoint,
                        ws.clone(),
                        tls_routes,
                    ) {
                        Ok(Some(next)) => next,
                        Ok(None) => return Step::Wait,
                        Err(step) => return step,
                    }
                }
                Stage::TlsHandshake { tls, route, .. } => {
                    match tls::handshake(&mut self.client, tls) {
                        Ok(true) => {
                            let Stage::TlsHandshake {
                                tls,
                                route,
                                name,
                                ws,
                            } = std::mem::replace(&mut self.stage, Stage::Done)
                            else {
                                unreachable!()
                            };
                            match ws {
                                Some(ws) => Stage::TlsFirstBytes {
                                    tls,
                                    route,
                                    name,
                                    ws,
                                },
                                None => return self.admit_tls(tls, route, name),
                            }
                        }
                        Ok(false) => return Step::Wait,
                        Err(detail) => {
                            return Step::Reject {
                                why: Rejection::Tls,
                                route: route.clone(),
                                detail,
                                graceful: false,
                            }
                        }
                    }
                }
                Stage::TlsFirstBytes { tls, route, .. } => {
                    match tls::first_bytes(&mut self.client, tls) {
                        Ok(None) => return Step::Wait,
                        Ok(Some(true)) => {
                            let Stage::TlsFirstBytes { tls, route, ws, .. } =
                                std::mem::replace(&mut self.stage, Stage::Done)
                            else {
                                unreachable!()
                            };
                            Stage::WsRequest(websocket::Request {
                                endpoint: ws,
                                head: Vec::new(),
                                tls: Some(tls),
                                sni_route: route,
                            })
                        }
                        Ok(Some(false)) => {
                            let Stage::TlsFirstBytes {
                                tls, route, name, ..
                            } = std::mem::replace(&mut self.stage, Stage::Done)
                            else {
                                unreachable!()
                            };
                            return self.admit_tls(tls, route, name);
                        }
                        Err(detail) => {
                            return Step::Reject {
                                why: Rejection::Tls,
                                route: route.clone(),
                                detail,
                                graceful: false,
                            }
                        }
                    }
                }
                Stage::WsRequest(request) => {
                    return websocket::read_request(
                        &mut self.client,
                        self.peer,
                        request,
                        tls_routes,
                    );
                }
            };
            self.stage = next;
        }
    }

    /// A TLS connection carrying SSH itself: admitted on the route its SNI named (one
    /// that named only the suffix has none: it could only have been a WebSocket).
    fn admit_tls(
        &self,
        tls: Box<ServerConnection>,
        route: Option<Arc<Route>>,
        name: Option<String>,
    ) -> Step {
        match route {
            Some(route) => Step::Admit {
                route,
                client_addr: self.peer,
                via: Via::Tls,
                codec: Codec::Tls(tls),
                tls_name: name,
            },
            None => Step::Reject {
                why: Rejection::NoRoute,
                route: None,
                detail: "SNI names no mapping and the stream is no WebSocket request".into(),
                graceful: false,
            },
        }
    }
}

/// A place in the relay-wide cap (`max_connections`), given back when dropped.
pub struct Permit(Arc<Shared>);

impl Permit {
    pub fn acquire(shared: &Arc<Shared>) -> Option<Permit> {
        let max = shared.max_connections.load(Ordering::Relaxed);
        shared
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(shared.clone()))
    }

    /// A place for a connection adopted at an upgrade: it is live already, so it counts
    /// even past the cap.
    pub fn adopt(shared: &Arc<Shared>) -> Permit {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Permit(shared.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place among the connections in admission (`max_pending_admissions`), with its place
/// in the relay-wide cap; given back when dropped, or handed on by [`Self::admitted`].
pub struct AdmissionPermit {
    shared: Arc<Shared>,
    permit: Option<Permit>,
}

impl AdmissionPermit {
    pub fn acquire(shared: &Arc<Shared>) -> Option<AdmissionPermit> {
        let max = shared.max_pending.load(Ordering::Relaxed);
        shared
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        // Made first, so that a refusal below gives the pending place back.
        let mut admission = AdmissionPermit {
            shared: shared.clone(),
            permit: None,
        };
        admission.permit = Some(Permit::acquire(shared)?);
        Some(admission)
    }

    /// [`Permit::adopt`] for a connection adopted while still in admission.
    pub fn adopt(shared: &Arc<Shared>) -> AdmissionPermit {
        shared.pending.fetch_add(1, Ordering::Relaxed);
        AdmissionPermit {
            shared: shared.clone(),
            permit: Some(Permit::adopt(shared)),
        }
    }

    /// Admission is over: the place among the pending is given back, the place in the
    /// relay-wide cap passes to the connection.
    pub fn admitted(mut self) -> Permit {
        self.permit
            .take()
            .expect("an admission permit holds a permit")
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place in a mapping's own cap (and its live-connection count), given back when dropped.
pub struct MappingPermit(Arc<MappingState>);

impl MappingPermit {
    pub fn acquire(mapping: &Arc<MappingState>) -> Option<MappingPermit> {
        mapping
            .try_acquire()
            .then(|| MappingPermit(mapping.clone()))
    }

    /// [`Permit::adopt`] in the mapping's own count.
    pub fn adopt(mapping: &Arc<MappingState>) -> MappingPermit {
        mapping.active.fetch_add(1, Ordering::Relaxed);
        MappingPermit(mapping.clone())
    }
}

impl Drop for MappingPermit {
    fn drop(&mut self) {
        self.0.release();
    }
}
