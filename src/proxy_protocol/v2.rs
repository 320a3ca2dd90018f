//! Version 2: a 16-byte fixed part (signature, version and command, family and protocol,
//! length), then `length` bytes of addresses and TLVs, at most [`MAX_V2_LEN`] in all.

use std::net::{IpAddr, SocketAddr};

use super::{same_family, Command, Parsed, ProxyHeader, ProxyHeaderError, MAX_V2_LEN};

/// The first 12 bytes of every v2 header.
pub(super) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The length of the fixed part.
const FIXED_LEN: usize = 16;

/// Byte 14 for the families we accept.
const UNSPEC: u8 = 0x00;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The length of the addresses of TCP over IPv4 and IPv6: two addresses, two ports.
const TCP4_LEN: usize = 2 * 4 + 2 * 2;
const TCP6_LEN: usize = 2 * 16 + 2 * 2;

/// Parses a v2 header; `buf` starts like [`SIGNATURE`]. Each byte of the fixed part is
/// judged as soon as it arrives.
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::V2Version(version_command >> 4));
    }
    let command = match version_command & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(ProxyHeaderError::V2Command(other)),
    };

    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL: "discard the protocol block including the family which is ignored" (spec).
    let (family_name, need) = match (command, family) {
        (Command::Local, _) | (Command::Proxy, UNSPEC) => ("AF_UNSPEC", 0),
        (Command::Proxy, TCP4) => ("TCP over IPv4", TCP4_LEN),
        (Command::Proxy, TCP6) => ("TCP over IPv6", TCP6_LEN),
        (Command::Proxy, other) => return Err(ProxyHeaderError::V2AddressFamily(other)),
    };

    let Some(&[high, low]) = buf.get(14..16) else {
        return Ok(Parsed::Incomplete);
    };
    let len = u16::from_be_bytes([high, low]);
    let total = FIXED_LEN + usize::from(len);
    if total > MAX_V2_LEN {
        return Err(ProxyHeaderError::V2TooLong(total));
    }
    if usize::from(len) < need {
        return Err(ProxyHeaderError::V2TooShort {
            len,
            family: family_name,
            need,
        });
    }
    let Some(block) = buf.get(FIXED_LEN..total) else {
        return Ok(Parsed::Incomplete);
    };

    // The addresses come first, then their ports; any bytes after them up to `total` are
    // TLVs, skipped.
    let addresses = match (command, family) {
        (Command::Proxy, TCP4) => {
            let ip = |at: usize| IpAddr::from(array::<4>(block, at));
            Some((ip(0), ip(4), 8))
        }
        (Command::Proxy, TCP6) => {
            let ip = |at: usize| IpAddr::from(array::<16>(block, at));
            Some((ip(0), ip(16), 32))
        }
        _ => None,
    };
    let (source, destination) = match addresses {
        Some((source, destination, ports)) => (
            Some(SocketAddr::new(source, port(block, ports))),
            Some(SocketAddr::new(destination, port(block, ports + 2))),
        ),
        None => (None, None),
    };
    let header = ProxyHeader {
        version: 2,
        command,
        source,
        destination,
    };
    Ok(Parsed::Complete {
        header,
        consumed: total,
    })
}

/// `N` bytes of `block` from `at`; the caller has checked the length.
fn array<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut bytes = [0; N];
    bytes.copy_from_slice(&block[at..at + N]);
    bytes
}

fn port(block: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array::<2>(block, at))
}

/// Encodes `header` as v2, without TLVs: `LOCAL` with no addresses; `PROXY` with TCP over
/// IPv4 or IPv6 when both addresses are there and of one family, else with `AF_UNSPEC`. The
/// `version` field is not looked at.
pub fn encode(header: &ProxyHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + TCP6_LEN);
    out.extend_from_slice(&SIGNATURE);
    let addresses = match header.command {
        Command::Local => {
            out.push(0x20);
            None
        }
        Command::Proxy => {
            out.push(0x21);
            same_family(header)
        }
    };
    match addresses {
        None => out.extend_from_slice(&[UNSPEC, 0, 0]),
        Some((SocketAddr::V4(source), SocketAddr::V4(destination))) => {
            out.push(TCP4);
            out.extend_from_slice(&(TCP4_LEN as u16).to_be_bytes());
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
        Some((source, destination)) => {
            let v6 = |address: SocketAddr| match address {
                SocketAddr::V6(v6) => v6,
                SocketAddr::V4(_) => unreachable!("same_family gives one family"),
            };
            let (source, destination) = (v6(source), v6(destination));
            out.push(TCP6);
            out.extend_from_slice(&(TCP6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{encode_v2, parse};
    use std::net::Ipv6Addr;

    /// A header: the signature, then `rest`.
    fn header(rest: &[u8]) -> Vec<u8> {
        let mut buf = SIGNATURE.to_vec();
        buf.extend_from_slice(rest);
        buf
    }

    fn fails(buf: &[u8], message: &str) -> ProxyHeaderError {
        let err = match parse(buf) {
            Err(err) => err,
            Ok(parsed) => panic!("{buf:02x?}: expected an error, got {parsed:?}"),
        };
        assert_eq!(err.to_string(), message, "{buf:02x?}");
        err
    }

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("{buf:02x?}: expected a header, got {other:?}"),
        }
    }

    fn proxy(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader {
            version: 2,
            command: Command::Proxy,
            source: Some(source.parse().unwrap()),
            destination: Some(destination.parse().unwrap()),
        }
    }

    const NO_ADDRESS: ProxyHeader = ProxyHeader {
        version: 2,
        command: Command::Proxy,
        source: None,
        destination: None,
    };

    const LOCAL: ProxyHeader = ProxyHeader {
        version: 2,
        command: Command::Local,
        source: None,
        destination: None,
    };

    /// What haproxy's `send-proxy-v2` sent before an HTTP request (a capture of a TCP4
    /// connection from 172.19.0.1:42578 to 172.19.0.3:80).
    const HAPROXY_TCP4: &[u8] = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a\x21\x11\x00\x0c\
        \xac\x13\x00\x01\xac\x13\x00\x03\xa6\x52\x00\x50GET / HTTP/1.1\r\n";

    /// TCP over IPv6 from [2001:db8::1]:51000 to [2001:db8::2]:22, with two TLVs:
    /// PP2_TYPE_AUTHORITY "ssh.example.com" and a PP2_TYPE_NOOP of 3 bytes.
    fn tcp6_with_tlvs() -> Vec<u8> {
        let mut buf = header(&[0x21, 0x21, 0, 36 + 18 + 6]);
        buf.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        buf.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        buf.extend_from_slice(&51000u16.to_be_bytes());
        buf.extend_from_slice(&22u16.to_be_bytes());
        buf.extend_from_slice(b"\x02\x00\x0fssh.example.com");
        buf.extend_from_slice(b"\x04\x00\x03\x00\x00\x00");
        buf
    }

    #[test]
    fn haproxy_tcp4() {
        assert_eq!(
            complete(HAPROXY_TCP4),
            (proxy("172.19.0.1:42578", "172.19.0.3:80"), 28)
        );
        assert_eq!(&HAPROXY_TCP4[28..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn tcp6_with_tlvs_skips_them() {
        let mut buf = tcp6_with_tlvs();
        let header_len = buf.len();
        assert_eq!(header_len, 16 + 36 + 18 + 6);
        buf.extend_from_slice(b"SSH-2.0-OpenSSH_9.2p1\r\n");
        assert_eq!(
            complete(&buf),
            (proxy("[2001:db8::1]:51000", "[2001:db8::2]:22"), header_len)
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let mut longest = header(&[0x21, 0x11, 0x02, 0x00]);
        longest.resize(MAX_V2_LEN, 0xee);
        for buf in [
            HAPROXY_TCP4[..28].to_vec(),
            tcp6_with_tlvs(),
            encode_v2(&LOCAL),
            encode_v2(&NO_ADDRESS),
            longest,
        ] {
            for n in 0..buf.len() {
                assert_eq!(
                    parse(&buf[..n]),
                    Ok(Parsed::Incomplete),
                    "{:02x?}",
                    &buf[..n]
                );
            }
            assert!(
                matches!(parse(&buf), Ok(Parsed::Complete { consumed, .. }) if consumed == buf.len())
            );
        }
    }

    #[test]
    fn the_longest_header_we_take() {
        let mut buf = header(&[0x21, 0x11, 0x02, 0x00]);
        buf.extend_from_slice(&[127, 0, 0, 3, 127, 0, 0, 1, 0x9c, 0x40, 0, 22]);
        buf.resize(MAX_V2_LEN, 0x04);
        buf.extend_from_slice(b"SSH-2.0-");
        assert_eq!(
            complete(&buf),
            (proxy("127.0.0.3:40000", "127.0.0.1:22"), MAX_V2_LEN)
        );
    }

    #[test]
    fn too_long() {
        for (len, total) in [(513u16, 529usize), (0x1000, 4112), (u16::MAX, 65551)] {
            let [high, low] = len.to_be_bytes();
            // Rejected from the length field alone, before the TLVs arrive.
            let err = fails(
                &header(&[0x21, 0x21, high, low]),
                &format!("PROXY v2 header too long: {total} bytes"),
            );
            assert_eq!(err, ProxyHeaderError::V2TooLong(total));
            // For LOCAL and AF_UNSPEC too.
            fails(
                &header(&[0x20, 0x00, high, low]),
                &format!("PROXY v2 header too long: {total} bytes"),
            );
            fails(
                &header(&[0x21, 0x00, high, low]),
                &format!("PROXY v2 header too long: {total} bytes"),
            );
        }
    }

    #[test]
    fn too_short() {
        for (rest, len, family, need) in [
            (&[0x21, 0x11, 0, 0][..], 0, "TCP over IPv4", 12),
            (&[0x21, 0x11, 0, 11], 11, "TCP over IPv4", 12),
            (&[0x21, 0x21, 0, 12], 12, "TCP over IPv6", 36),
            (&[0x21, 0x21, 0, 35], 35, "TCP over IPv6", 36),
        ] {
            let err = fails(
                &header(rest),
                &format!(
                    "PROXY v2 header: length {len} too short for {family} addresses ({need} bytes)"
                ),
            );
            assert_eq!(err, ProxyHeaderError::V2TooShort { len, family, need });
        }
    }

    #[test]
    fn bad_version() {
        for (byte, version) in [(0x11, 1), (0x01, 0), (0x31, 3), (0xf1, 0xf), (0x10, 1)] {
            let err = fails(
                &header(&[byte]),
                &format!("PROXY v2 header: bad version {version:#x}, expected 0x2"),
            );
            assert_eq!(err, ProxyHeaderError::V2Version(version));
        }
        fails(
            &header(&[0x11, 0x11, 0, 12]),
            "PROXY v2 header: bad version 0x1, expected 0x2",
        );
    }

    #[test]
    fn bad_command() {
        for command in 2..=0xf {
            let err = fails(
                &header(&[0x20 | command]),
                &format!(
                    "PROXY v2 header: bad command {command:#x}, expected 0x0 (LOCAL) or 0x1 (PROXY)"
                ),
            );
            assert_eq!(err, ProxyHeaderError::V2Command(command));
        }
    }

    #[test]
    fn unsupported_family() {
        // UDP, AF_UNIX, and the values the spec leaves undefined, judged on arrival.
        for family in [0x12, 0x22, 0x31, 0x32, 0x01, 0x10, 0x20, 0x13, 0x41, 0xff] {
            let err = fails(
                &header(&[0x21, family]),
                &format!("PROXY v2 header: unsupported address family/protocol {family:#04x}"),
            );
            assert_eq!(err, ProxyHeaderError::V2AddressFamily(family));
        }
        fails(
            &header(&[0x21, 0x31, 0, 216]),
            "PROXY v2 header: unsupported address family/protocol 0x31",
        );
        fails(
            &header(&[0x21, 0x12, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]),
            "PROXY v2 header: unsupported address family/protocol 0x12",
        );
    }

    #[test]
    fn local_discards_the_address_block() {
        assert_eq!(complete(&header(&[0x20, 0x00, 0, 0])), (LOCAL, 16));
        // A LOCAL header may still carry addresses, of any family: they are skipped.
        let buf = header(&[0x20, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(complete(&buf), (LOCAL, 28));
        let mut buf = header(&[0x20, 0x31, 0, 216]);
        buf.resize(16 + 216, 0);
        assert_eq!(complete(&buf), (LOCAL, 232));
        // Even a length too short for the family it names.
        assert_eq!(complete(&header(&[0x20, 0x21, 0, 3, 9, 9, 9])), (LOCAL, 19));
    }

    #[test]
    fn unspec_has_no_address() {
        assert_eq!(complete(&header(&[0x21, 0x00, 0, 0])), (NO_ADDRESS, 16));
        assert_eq!(
            complete(&header(&[0x21, 0x00, 0, 4, 1, 2, 3, 4, 5])),
            (NO_ADDRESS, 20)
        );
    }

    #[test]
    fn encode() {
        let header_bytes = encode_v2(&proxy("172.19.0.1:42578", "172.19.0.3:80"));
        assert_eq!(header_bytes, &HAPROXY_TCP4[..28]);
        let mut tcp6 = tcp6_with_tlvs();
        tcp6.truncate(16 + 36);
        tcp6[15] = 36;
        assert_eq!(
            encode_v2(&proxy("[2001:db8::1]:51000", "[2001:db8::2]:22")),
            tcp6
        );
        assert_eq!(encode_v2(&LOCAL), header(&[0x20, 0x00, 0, 0]));
        let local_with_addresses = ProxyHeader {
            command: Command::Local,
            ..proxy("1.2.3.4:1", "5.6.7.8:2")
        };
        assert_eq!(
            encode_v2(&local_with_addresses),
            header(&[0x20, 0x00, 0, 0])
        );
        assert_eq!(encode_v2(&NO_ADDRESS), header(&[0x21, 0x00, 0, 0]));
        let mixed = proxy("1.2.3.4:1", "[::1]:2");
        assert_eq!(encode_v2(&mixed), header(&[0x21, 0x00, 0, 0]));
    }
}
