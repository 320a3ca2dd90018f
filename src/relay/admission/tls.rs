//! The TLS entrance: a ClientHello whose SNI names a mapping (checked against its `allow`
//! before any handshake work), then the handshake.

use std::io::{self, BufRead, Write};
use std::os::fd::AsRawFd;

use rustls::server::Acceptor;
use rustls::ServerConnection;

use std::io::Read;
use std::sync::Arc;

use super::{Stage, Step, TlsRoutes, WsEndpoint};
use crate::addr::ClientAddr;
use crate::metrics::Rejection;
use crate::relay::connection::Side;
use crate::tls::{FdIo, TlsEndpoint, ACCESS_DENIED_ALERT, UNRECOGNIZED_NAME_ALERT};

/// Reads the ClientHello and routes by its SNI. `Ok(None)`: need more bytes. A client that
/// the mapping's `allow` refuses is refused here, before any handshake work.
pub(super) fn read_hello(
    client: &mut Side,
    peer: ClientAddr,
    acceptor: &mut Acceptor,
    endpoint: &TlsEndpoint,
    ws: Option<Arc<WsEndpoint>>,
    tls_routes: &TlsRoutes,
) -> Result<Option<Stage>, Step> {
    let fd = client.fd.as_raw_fd();
    let tls_reject = |detail: String| Step::Reject {
        why: Rejection::Tls,
        route: None,
        detail,
        graceful: false,
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
    // The bare suffix routes by the WebSocket request's path, when WebSocket is served.
    let bare_suffix = ws.is_some()
        && sni
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case(&endpoint.sni_suffix));
    if route.is_none() && !bare_suffix {
        let _ = FdIo(fd).write(&UNRECOGNIZED_NAME_ALERT);
        return Err(Step::Reject {
            why: Rejection::NoRoute,
            route: None,
            detail: format!("no mapping for SNI {:?}", sni.unwrap_or_default()),
            graceful: false,
        });
    }
    if let Some((_, route)) = route {
        if !route.mapping.allows(peer.0.ip()) {
            let _ = FdIo(fd).write(&ACCESS_DENIED_ALERT);
            return Err(Step::Reject {
                why: Rejection::Acl,
                route: Some(route.clone()),
                detail: String::new(),
                graceful: false,
            });
        }
    }
    match accepted.into_connection(endpoint.config.clone()) {
        Ok(tls) => Ok(Some(Stage::TlsHandshake {
            tls: Box::new(tls),
            route: route.map(|(_, r)| r.clone()),
            name: route.map(|(n, _)| n.clone()),
            ws,
        })),
        Err((e, mut alert)) => {
            let _ = alert.write(&mut FdIo(fd));
            Err(tls_reject(format!("handshake: {e}")))
        }
    }
}

/// Drives the handshake; `Ok(true)` once it is complete.
pub(super) fn handshake(client: &mut Side, tls: &mut ServerConnection) -> Result<bool, String> {
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

/// After the handshake, on an entry that serves WebSocket too: `Some(true)` once the first
/// plaintext bytes are `GET ` (a WebSocket request), `Some(false)` once they are anything
/// else (SSH: its banner starts `SSH-`); `None` until enough has come. Nothing is consumed.
pub(super) fn first_bytes(
    client: &mut Side,
    tls: &mut ServerConnection,
) -> Result<Option<bool>, String> {
    const GET: &[u8] = b"GET ";
    let fd = client.fd.as_raw_fd();
    loop {
        let mut reader = tls.reader();
        match reader.fill_buf() {
            Ok(bytes) if bytes.len() >= GET.len() || !GET.starts_with(bytes) => {
                return Ok(Some(bytes.starts_with(GET)));
            }
            Ok([]) => return Err("closed after the handshake".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("after the handshake: {e}")),
        }
        let _ = reader.read(&mut [0u8; 0]);
        if !client.readable {
            return Ok(None);
        }
        match tls.read_tls(&mut FdIo(fd)) {
            Ok(0) => return Err("closed after the handshake".into()),
            Ok(_) => {
                if let Err(e) = tls.process_new_packets() {
                    let _ = tls.write_tls(&mut FdIo(fd));
                    return Err(format!("TLS: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.readable = false,
            Err(e) => return Err(format!("after the handshake: {e}")),
        }
    }
}
