//! The WebSocket entrance: an HTTP upgrade request on a `[[ws]]` listener (`ws://`), or
//! inside a TLS session whose first bytes are `GET ` (`wss://`). The request path routes
//! to a mapping; a token file, when set, must give the mapping's token; then `allow`.
//! Answers: 101 (then frames), 400/426/431 for a bad request, 404 for no such mapping,
//! 401 for a missing or wrong token, 403 when `allow` refuses the client.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::ServerConnection;

use super::{Step, TlsRoutes};
use crate::addr::ClientAddr;
use crate::control::WsEntry;
use crate::metrics::{Rejection, Via};
use crate::relay::codec::{Codec, WsCodec};
use crate::relay::connection::Side;
use crate::relay::route::Route;
use crate::sys;
use crate::tls::FdIo;
use crate::websocket::handshake::{self, Parsed, MAX_HEAD_LEN};
use crate::websocket::tokens::{self, Tokens};

/// What a `[[ws]]` entry serves with: loaded when its control file is applied.
pub struct WsEndpoint {
    pub path: String,
    pub tokens: Option<Tokens>,
    pub ping_interval: Option<Duration>,
}

impl WsEndpoint {
    pub fn load(entry: &WsEntry) -> anyhow::Result<WsEndpoint> {
        let tokens = match &entry.tokens {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading tokens file {}", path.display()))?;
                Some(
                    tokens::parse(&text)
                        .with_context(|| format!("tokens file {}", path.display()))?,
                )
            }
        };
        Ok(WsEndpoint {
            path: entry.path.clone(),
            tokens,
            ping_interval: entry.ping_interval,
        })
    }
}

/// An upgrade request being read: the bytes so far (at most [`MAX_HEAD_LEN`]).
pub struct Request {
    pub endpoint: Arc<WsEndpoint>,
    pub head: Vec<u8>,
    /// `wss://`: the TLS session the request comes in.
    pub tls: Option<Box<ServerConnection>>,
    /// `wss://` with an SNI that named a mapping: the path must name the same one.
    pub sni_route: Option<Arc<Route>>,
}

/// Reads the request as far as it has come; answers and decides once it is whole.
pub(super) fn read_request(
    client: &mut Side,
    peer: ClientAddr,
    request: &mut Request,
    routes: &TlsRoutes,
) -> Step {
    loop {
        match handshake::parse_request(&request.head) {
            Ok(Parsed::Incomplete) => {}
            Err(e) => {
                let detail = format!("bad upgrade request: {e}");
                return refuse(client, request, e.response(), Rejection::Ws, None, detail);
            }
            Ok(Parsed::Complete(req)) => {
                let path = req.path.to_string();
                let token = req.token.map(str::to_string);
                let accept = req.accept.clone();
                let head_len = req.head_len;
                return decide(
                    client, peer, request, routes, &path, token, &accept, head_len,
                );
            }
        }
        match read_more(client, request) {
            Ok(0) => {
                let detail = "closed before its upgrade request".to_string();
                return Step::Reject {
                    why: Rejection::Ws,
                    route: None,
                    detail,
                    graceful: false,
                };
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) => {
                return Step::Reject {
                    why: Rejection::Ws,
                    route: None,
                    detail: format!("reading the upgrade request: {e}"),
                    graceful: false,
                }
            }
        }
    }
}

/// Reads more of the request head (never past [`MAX_HEAD_LEN`]: a longer head is refused
/// by the parser). 0: the client closed.
fn read_more(client: &mut Side, request: &mut Request) -> io::Result<usize> {
    let room = MAX_HEAD_LEN + 1 - request.head.len().min(MAX_HEAD_LEN);
    let mut buf = [0u8; 1024];
    let want = room.min(buf.len());
    let fd = client.fd.as_raw_fd();
    let n = match request.tls.as_mut() {
        None => {
            if !client.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            match sys::recv(fd, &mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    client.readable = false;
                    return Err(e);
                }
                other => other?,
            }
        }
        Some(tls) => loop {
            match tls.reader().read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !client.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            match tls.read_tls(&mut FdIo(fd)) {
                Ok(0) => break 0,
                Ok(_) => {
                    tls.process_new_packets()
                        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    client.readable = false;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        },
    };
    request.head.extend_from_slice(&buf[..n]);
    Ok(n)
}

/// Routes a whole request, checks token and `allow`, and answers.
#[allow(clippy::too_many_arguments)]
fn decide(
    client: &mut Side,
    peer: ClientAddr,
    request: &mut Request,
    routes: &TlsRoutes,
    path: &str,
    token: Option<String>,
    accept: &str,
    head_len: usize,
) -> Step {
    let found = handshake::route(&request.endpoint.path, path)
        .map(str::to_ascii_lowercase)
        .and_then(|name| routes.get_key_value(&name));
    let Some((name, route)) = found else {
        let detail = format!("no mapping for path {path:?}");
        let answer = handshake::response_error(404, &[]);
        return refuse(client, request, answer, Rejection::NoRoute, None, detail);
    };
    let (name, route) = (name.clone(), route.clone());
    if let Some(sni) = &request.sni_route {
        if !Arc::ptr_eq(&sni.mapping, &route.mapping) {
            let detail = format!("path {path:?} names another mapping than the SNI");
            let answer = handshake::response_error(404, &[]);
            return refuse(client, request, answer, Rejection::NoRoute, None, detail);
        }
    }
    if let Some(tokens) = &request.endpoint.tokens {
        if !tokens.allows(&route.mapping.name, token.as_deref()) {
            let detail = if token.is_some() {
                "wrong token"
            } else {
                "no token"
            };
            let answer = handshake::response_error(401, &[]);
            let route = Some(route.clone());
            return refuse(
                client,
                request,
                answer,
                Rejection::Auth,
                route,
                detail.into(),
            );
        }
    }
    if !route.mapping.allows(peer.0.ip()) {
        let answer = handshake::response_error(403, &[]);
        let route = Some(route.clone());
        return refuse(
            client,
            request,
            answer,
            Rejection::Acl,
            route,
            String::new(),
        );
    }
    if let Err(e) = answer(client, request, &handshake::response_101(accept)) {
        return Step::Reject {
            why: Rejection::Ws,
            route: Some(route),
            detail: format!("sending the 101: {e}"),
            graceful: false,
        };
    }
    let early = request.head.split_off(head_len);
    let codec = WsCodec::new(early, request.tls.take(), request.endpoint.ping_interval);
    Step::Admit {
        route,
        client_addr: peer,
        via: Via::Ws,
        codec: Codec::WebSocket(Box::new(codec)),
        tls_name: Some(name),
    }
}

/// Answers an HTTP error and refuses the connection (closed gracefully, so that the answer
/// is not thrown away by a reset).
fn refuse(
    client: &mut Side,
    request: &mut Request,
    response: Vec<u8>,
    why: Rejection,
    route: Option<Arc<Route>>,
    detail: String,
) -> Step {
    let _ = answer(client, request, &response);
    if let Some(tls) = request.tls.as_mut() {
        tls.send_close_notify();
        let _ = tls.write_tls(&mut FdIo(client.fd.as_raw_fd()));
    }
    Step::Reject {
        why,
        route,
        detail,
        graceful: true,
    }
}

/// Writes an HTTP answer: on the socket, or into the TLS session (flushed as far as the
/// socket takes it now; the rest goes with the connection's first turn).
fn answer(client: &mut Side, request: &mut Request, bytes: &[u8]) -> io::Result<()> {
    let fd = client.fd.as_raw_fd();
    match request.tls.as_mut() {
        None => {
            // A new socket's send buffer takes a short answer whole.
            let n = sys::send(fd, bytes)?;
            if n < bytes.len() {
                return Err(io::Error::other("short write of the answer"));
            }
        }
        Some(tls) => {
            tls.writer().write_all(bytes)?;
            while tls.wants_write() {
                match tls.write_tls(&mut FdIo(fd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}
