//! The PROXY protocol header (haproxy's `doc/proxy-protocol.txt`), version 1 (text) and
//! version 2 (binary): a pure, incremental parser with hard size caps, and encoders.
//!
//! A connection from a trusted proxy starts with one header that carries the real client
//! address. Call [`parse`] on the bytes read so far; it answers one of three things:
//!
//! - [`Parsed::Incomplete`]: the bytes so far can still start a valid header: read more.
//!   This answer never comes for [`MAX_HEADER_LEN`] bytes or more, so a reader that buffers
//!   at most that much always gets a verdict.
//! - [`Parsed::Complete`]: the header and its length in bytes. The bytes after it belong to
//!   the client's stream and are forwarded first.
//! - [`ProxyHeaderError`]: these bytes can never start a valid header: close the connection.
//!   A buffer that cannot be the start of either version fails at once (three bytes `SSH`
//!   already do); it does not wait for more bytes.
//!
//! The verdict does not depend on how the bytes were split into reads: on any prefix of a
//! buffer, `parse` answers either `Incomplete` or the same as on the whole buffer. For v1
//! this means that a field is judged only once the space or CRLF after it has arrived, and
//! an error names the whole field.
//!
//! Version 1 accepts `TCP4`, `TCP6` and `UNKNOWN` (no addresses; the rest of the line is
//! ignored). Version 2 accepts the `PROXY` command with TCP over IPv4 or IPv6, or with
//! `AF_UNSPEC` (no addresses), and the `LOCAL` command, whose address block the spec says
//! to discard, family included. TLVs are skipped; the length field bounds them.
//! With the `PROXY` command, `AF_UNIX` and UDP are rejected: a relay of TCP ports has no
//! use for them (the spec would also allow treating them as `AF_UNSPEC`).

mod v1;
mod v2;

#[cfg(test)]
mod proptests;

use std::net::{AddrParseError, IpAddr, SocketAddr};

pub use v1::encode as encode_v1;
pub use v2::encode as encode_v2;

/// The longest v1 header, CRLF included (the spec's worst case, `UNKNOWN` with two full
/// IPv6 addresses and ports).
pub const MAX_V1_LEN: usize = 107;

/// Our cap on a v2 header: the 16-byte fixed part plus 512 bytes of addresses and TLVs. The
/// protocol allows 16 + 65535; a TCP4 or TCP6 header without TLVs needs 28 or 52.
pub const MAX_V2_LEN: usize = 16 + 512;

/// The most bytes a reader may need to buffer to get a verdict from [`parse`].
pub const MAX_HEADER_LEN: usize = if MAX_V1_LEN > MAX_V2_LEN {
    MAX_V1_LEN
} else {
    MAX_V2_LEN
};

/// A parsed PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// 1 (text) or 2 (binary).
    pub version: u8,
    /// What the proxy says the connection is. Always [`Command::Proxy`] in version 1.
    pub command: Command,
    /// The client's address, as the proxy saw it. `None` for v1 `UNKNOWN`, v2 `AF_UNSPEC`
    /// and v2 `LOCAL`: then the header names no client.
    pub source: Option<SocketAddr>,
    /// The address the client connected to on the proxy. `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
}

/// The command of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// The proxy relays a client's connection (v2 `PROXY`; every v1 header).
    Proxy,
    /// The proxy opened the connection on its own behalf, e.g. a health check (v2 `LOCAL`).
    Local,
}

/// The answer of [`parse`] when the bytes so far are not invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parsed {
    /// Every byte so far fits a valid header, but the header is not complete: read more.
    Incomplete,
    /// A whole header. `buf[consumed..]` belongs to the client's stream.
    Complete {
        header: ProxyHeader,
        /// The header's length in bytes.
        consumed: usize,
    },
}

/// Why some bytes can never start a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// Neither `PROXY ` (v1) nor the 12-byte v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxyHeader,

    /// The first [`MAX_V1_LEN`] bytes hold no CRLF.
    #[error("PROXY v1 header too long: no CRLF within 107 bytes")]
    V1TooLong,
    /// A CR not followed by LF, or an LF not preceded by CR; `offset` counts from the `P`.
    #[error("PROXY v1 header: bare CR or LF at byte {offset}, the line must end with CRLF")]
    V1LineEnding { offset: usize },
    /// Not `PROXY <protocol> <source> <destination> <source port> <destination port>`,
    /// each field separated by exactly one space. `found` counts `PROXY` too.
    #[error("PROXY v1 header: bad field count: {found} fields, expected 6")]
    V1FieldCount { found: usize },
    /// Not `TCP4`, `TCP6` or `UNKNOWN`.
    #[error("PROXY v1 header: bad protocol {0:?}, expected TCP4, TCP6 or UNKNOWN")]
    V1Protocol(String),
    /// Not an IPv4 or IPv6 address.
    #[error("PROXY v1 header: bad address {field:?}")]
    V1Address {
        field: String,
        #[source]
        source: AddrParseError,
    },
    /// Not a decimal number in 0..=65535 without leading zeros.
    #[error("PROXY v1 header: bad port {0:?}, expected 0..65535 without leading zeros")]
    V1Port(String),
    /// An IPv6 address after `TCP4`, or an IPv4 address after `TCP6`.
    #[error("PROXY v1 header: address {address} does not match protocol {protocol}")]
    V1FamilyMismatch {
        protocol: &'static str,
        address: IpAddr,
    },

    /// The high nibble of byte 13 is not 2.
    #[error("PROXY v2 header: bad version {0:#x}, expected 0x2")]
    V2Version(u8),
    /// The low nibble of byte 13 is neither 0 (LOCAL) nor 1 (PROXY).
    #[error("PROXY v2 header: bad command {0:#x}, expected 0x0 (LOCAL) or 0x1 (PROXY)")]
    V2Command(u8),
    /// Byte 14 (family and protocol) of a PROXY command is not 0x00 (UNSPEC), 0x11 (TCP over
    /// IPv4) or 0x21 (TCP over IPv6).
    #[error("PROXY v2 header: unsupported address family/protocol {0:#04x}")]
    V2AddressFamily(u8),
    /// The length field is smaller than the addresses of the family.
    #[error("PROXY v2 header: length {len} too short for {family} addresses ({need} bytes)")]
    V2TooShort {
        len: u16,
        family: &'static str,
        need: usize,
    },
    /// 16 + the length field is more than [`MAX_V2_LEN`].
    #[error("PROXY v2 header too long: {0} bytes")]
    V2TooLong(usize),
}

/// Parses a PROXY header, v1 or v2, at the start of `buf`: see the module docs.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if starts_like(buf, &v2::SIGNATURE) {
        v2::parse(buf)
    } else if starts_like(buf, v1::SIGNATURE) {
        v1::parse(buf)
    } else {
        Err(ProxyHeaderError::NotProxyHeader)
    }
}

/// Whether `buf` is a prefix of `signature` or starts with it.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

/// The two addresses of a header whose family both share, if they do.
fn same_family(header: &ProxyHeader) -> Option<(SocketAddr, SocketAddr)> {
    match (header.source?, header.destination?) {
        (s @ SocketAddr::V4(_), d @ SocketAddr::V4(_)) => Some((s, d)),
        (s @ SocketAddr::V6(_), d @ SocketAddr::V6(_)) => Some((s, d)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_header_len_is_the_v2_cap() {
        assert_eq!(MAX_HEADER_LEN, 528);
    }

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn other_protocols_fail_at_once() {
        for buf in [
            &b"S"[..],
            b"SSH",
            b"SSH-2.0-OpenSSH_9.2p1\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
            b"PROXY\t",
            b"proxy ",
            b"PROX ",
            b"\r\n\r\n\x00\r\nQUIT\r",
            b"\r\n\r\n\x01",
            b"\r\r",
            b"\x00",
        ] {
            assert_eq!(
                parse(buf),
                Err(ProxyHeaderError::NotProxyHeader),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        assert_eq!(
            ProxyHeaderError::NotProxyHeader.to_string(),
            "not a PROXY protocol header"
        );
    }

    #[test]
    fn signature_prefixes_are_incomplete() {
        for n in 0..v1::SIGNATURE.len() {
            assert_eq!(parse(&v1::SIGNATURE[..n]), Ok(Parsed::Incomplete), "v1 {n}");
        }
        for n in 0..=v2::SIGNATURE.len() {
            assert_eq!(parse(&v2::SIGNATURE[..n]), Ok(Parsed::Incomplete), "v2 {n}");
        }
    }
}
