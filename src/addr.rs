//! Address newtypes: a signature says which end of a connection it means.

use std::fmt;
use std::net::SocketAddr;

/// The address of the client as the relay sees it: the peer of an accepted socket, or the
/// real client named in a PROXY header from a trusted proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// A local address on which the relay listens for one mapped host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

/// The instance endpoint a connection is forwarded to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(ClientAddr, ListenAddr, UpstreamAddr);
