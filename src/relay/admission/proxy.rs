//! The PROXY entrance: a connection from a trusted proxy must begin with a PROXY v1 or v2
//! header naming the real client.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::Step;
use crate::addr::ClientAddr;
use crate::metrics::{Rejection, Via};
use crate::proxy_protocol::{self, Parsed};
use crate::relay::codec::Codec;
use crate::relay::connection::Side;
use crate::relay::route::Route;
use crate::sys;

/// Peeks at the socket until a whole PROXY header is there, then consumes exactly the
/// header: the bytes after it stay in the socket and are relayed like any others.
pub(super) fn read_header(client: &mut Side, route: &Arc<Route>) -> Step {
    let reject = |detail: String| Step::Reject {
        why: Rejection::ProxyHeader,
        route: Some(route.clone()),
        detail,
        graceful: false,
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
