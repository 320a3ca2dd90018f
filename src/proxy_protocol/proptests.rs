//! Property tests: encode → parse round trips of both versions, prefixes of valid headers,
//! and arbitrary bytes.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::*;

/// Two addresses of one family, as a proxy of TCP over IPv4 or IPv6 would send.
fn addresses() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    let v4 =
        (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
    let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>())
        .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
    (prop_oneof![v4, v6], any::<u16>(), any::<u16>())
        .prop_map(|((s, d), sp, dp)| (SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
}

fn tcp(version: u8, (source, destination): (SocketAddr, SocketAddr)) -> ProxyHeader {
    ProxyHeader {
        version,
        command: Command::Proxy,
        source: Some(source),
        destination: Some(destination),
    }
}

/// Any header either version can carry, encoded by one of them, possibly with TLVs (v2) or
/// optional fields after `UNKNOWN` (v1), and the header `parse` should return.
fn encoded() -> impl Strategy<Value = (Vec<u8>, ProxyHeader)> {
    let v1 = addresses().prop_map(|a| (encode_v1(&tcp(1, a)), tcp(1, a)));
    let v1_unknown = "( [0-9a-f:.]{0,39}){0,4}".prop_map(|mut rest| {
        rest.truncate(MAX_V1_LEN - "PROXY UNKNOWN\r\n".len());
        let line = format!("PROXY UNKNOWN{rest}\r\n").into_bytes();
        let header = ProxyHeader {
            version: 1,
            command: Command::Proxy,
            source: None,
            destination: None,
        };
        (line, header)
    });
    let v2 = (addresses(), tlvs())
        .prop_map(|(a, tlvs)| (with_tlvs(encode_v2(&tcp(2, a)), &tlvs), tcp(2, a)));
    let v2_bare = (any::<bool>(), tlvs()).prop_map(|(local, tlvs)| {
        let header = ProxyHeader {
            version: 2,
            command: if local {
                Command::Local
            } else {
                Command::Proxy
            },
            source: None,
            destination: None,
        };
        (with_tlvs(encode_v2(&header), &tlvs), header)
    });
    prop_oneof![v1, v1_unknown, v2, v2_bare]
}

/// TLV bytes that fit the v2 cap after the largest address block.
fn tlvs() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=(MAX_V2_LEN - 16 - 36))
}

/// `header` (v2) with `tlvs` after its addresses, and its length field grown to match.
fn with_tlvs(mut header: Vec<u8>, tlvs: &[u8]) -> Vec<u8> {
    let len = u16::from_be_bytes([header[14], header[15]]) as usize + tlvs.len();
    header[14..16].copy_from_slice(&(len as u16).to_be_bytes());
    header.extend_from_slice(tlvs);
    header
}

/// Bytes that start like a header more often than not, to get past the signatures.
fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..700);
    let mutated = (
        encoded(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    )
        .prop_map(|((mut buf, _), edits)| {
            for (at, byte) in edits {
                let at = at.index(buf.len());
                buf[at] = byte;
            }
            buf
        });
    prop_oneof![
        tail.clone(),
        tail.clone().prop_map(|t| [v1::SIGNATURE, &t].concat()),
        tail.prop_map(|t| [&v2::SIGNATURE[..], &t].concat()),
        mutated,
    ]
}

proptest! {
    #[test]
    fn v1_round_trip(a in addresses()) {
        let header = tcp(1, a);
        let bytes = encode_v1(&header);
        prop_assert!(bytes.len() <= MAX_V1_LEN);
        prop_assert_eq!(parse(&bytes), Ok(Parsed::Complete { header, consumed: bytes.len() }));
    }

    #[test]
    fn v2_round_trip(a in addresses()) {
        let header = tcp(2, a);
        let bytes = encode_v2(&header);
        prop_assert_eq!(parse(&bytes), Ok(Parsed::Complete { header, consumed: bytes.len() }));

        // LOCAL drops the addresses, on the way out and on the way in.
        let header = ProxyHeader { command: Command::Local, ..header };
        let bytes = encode_v2(&header);
        let expected = ProxyHeader { source: None, destination: None, ..header };
        prop_assert_eq!(parse(&bytes), Ok(Parsed::Complete { header: expected, consumed: 16 }));
    }

    #[test]
    fn round_trip_with_trailing_bytes((bytes, header) in encoded(), stream in proptest::collection::vec(any::<u8>(), 0..64)) {
        let consumed = bytes.len();
        let buf = [bytes, stream].concat();
        prop_assert_eq!(parse(&buf), Ok(Parsed::Complete { header, consumed }));
    }

    #[test]
    fn any_prefix_of_a_valid_header_is_incomplete((bytes, _) in encoded()) {
        for n in 0..bytes.len() {
            prop_assert_eq!(parse(&bytes[..n]), Ok(Parsed::Incomplete), "prefix of {} bytes", n);
        }
    }

    #[test]
    fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse(&buf);
    }

    /// On every prefix, `parse` answers `Incomplete` or what it answers on the whole buffer;
    /// it never answers `Incomplete` on `MAX_HEADER_LEN` bytes; and what it parses, it
    /// encodes back to the same header.
    #[test]
    fn verdicts_do_not_depend_on_reads(buf in header_like_bytes()) {
        let whole = parse(&buf);
        if whole == Ok(Parsed::Incomplete) {
            prop_assert!(buf.len() < MAX_HEADER_LEN);
        }
        for n in 0..buf.len() {
            let part = parse(&buf[..n]);
            match &whole {
                Ok(Parsed::Complete { consumed, .. }) if n < *consumed => {
                    prop_assert_eq!(part, Ok(Parsed::Incomplete), "prefix of {} bytes", n);
                }
                _ => prop_assert!(part == Ok(Parsed::Incomplete) || part == whole, "prefix of {} bytes: {:?}", n, part),
            }
        }
        if let Ok(Parsed::Complete { header, consumed }) = whole {
            prop_assert!(consumed <= buf.len());
            let again = if header.version == 1 { encode_v1(&header) } else { encode_v2(&header) };
            prop_assert_eq!(parse(&again), Ok(Parsed::Complete { header, consumed: again.len() }));
        }
    }
}
