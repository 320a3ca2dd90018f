//! Version 1: one line of US-ASCII,
//! `PROXY <TCP4|TCP6> <source> <destination> <source port> <destination port>\r\n`, or
//! `PROXY UNKNOWN<anything>\r\n`, at most [`MAX_V1_LEN`] bytes.

use std::net::{IpAddr, SocketAddr};

use super::{same_family, Command, Parsed, ProxyHeader, ProxyHeaderError, MAX_V1_LEN};

/// The first bytes of every v1 header.
pub(super) const SIGNATURE: &[u8] = b"PROXY ";

/// Parses a v1 header; `buf` starts like [`SIGNATURE`].
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.len() < SIGNATURE.len() {
        return Ok(Parsed::Incomplete);
    }
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    match line_end(window) {
        LineEnd::Crlf(cr) => {
            let line = check_fields(&window[SIGNATURE.len()..cr], true)?;
            let (source, destination) = match line {
                Line::Partial => unreachable!("a whole line is never partial"),
                Line::Unknown => (None, None),
                Line::Tcp(source, destination) => (Some(source), Some(destination)),
            };
            let header = ProxyHeader {
                version: 1,
                command: Command::Proxy,
                source,
                destination,
            };
            Ok(Parsed::Complete {
                header,
                consumed: cr + 2,
            })
        }
        LineEnd::Bare(offset) => {
            // Judge the fields before the bad byte first, as a shorter read would have.
            check_fields(&window[SIGNATURE.len()..offset], false)?;
            Err(ProxyHeaderError::V1LineEnding { offset })
        }
        LineEnd::NotYet => {
            check_fields(&window[SIGNATURE.len()..], false)?;
            if window.len() >= MAX_V1_LEN {
                Err(ProxyHeaderError::V1TooLong)
            } else {
                Ok(Parsed::Incomplete)
            }
        }
    }
}

/// Encodes `header` as a v1 line: `TCP4` or `TCP6` when both addresses are there and of one
/// family, else `UNKNOWN` (v1 has no `LOCAL`; the spec's stand-in is `UNKNOWN`). The
/// `version` field is not looked at.
pub fn encode(header: &ProxyHeader) -> Vec<u8> {
    let addresses = match header.command {
        Command::Proxy => same_family(header),
        Command::Local => None,
    };
    let line = match addresses {
        Some((source, destination)) => {
            let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {protocol} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
        }
        None => "PROXY UNKNOWN\r\n".to_owned(),
    };
    line.into_bytes()
}

/// Where the line in a window ends, if it does.
enum LineEnd {
    /// At a CRLF; the index of the CR.
    Crlf(usize),
    /// At a CR not followed by LF, or an LF not preceded by CR; its index.
    Bare(usize),
    /// No CR or LF yet (a CR may be the last byte).
    NotYet,
}

fn line_end(window: &[u8]) -> LineEnd {
    for (i, &byte) in window.iter().enumerate() {
        match byte {
            b'\n' => return LineEnd::Bare(i),
            b'\r' => {
                return match window.get(i + 1) {
                    Some(b'\n') => LineEnd::Crlf(i),
                    Some(_) => LineEnd::Bare(i),
                    None => LineEnd::NotYet,
                }
            }
            _ => {}
        }
    }
    LineEnd::NotYet
}

/// What the fields of a line say so far.
enum Line {
    /// Every field judged so far is fine, but the line is not complete.
    Partial,
    /// `UNKNOWN`: the rest of the line is ignored.
    Unknown,
    /// `TCP4` or `TCP6` with its addresses.
    Tcp(SocketAddr, SocketAddr),
}

/// Judges the fields after `PROXY `, in order. With `whole`, `body` is the whole line before
/// the CRLF; without, the line goes on and only fields followed by a space are judged, so
/// that a field cut by a read is not taken for a bad one.
fn check_fields(body: &[u8], whole: bool) -> Result<Line, ProxyHeaderError> {
    let fields: Vec<&[u8]> = body.split(|&b| b == b' ').collect();
    let judged = if whole {
        &fields[..]
    } else {
        &fields[..fields.len() - 1]
    };
    // Counts `PROXY` too, as the error message does.
    let missing = || {
        if whole {
            Err(ProxyHeaderError::V1FieldCount {
                found: fields.len() + 1,
            })
        } else {
            Ok(Line::Partial)
        }
    };

    let Some(&protocol) = judged.first() else {
        return missing();
    };
    let ipv4 = match protocol {
        b"TCP4" => true,
        b"TCP6" => false,
        b"UNKNOWN" => {
            return Ok(if whole { Line::Unknown } else { Line::Partial });
        }
        other => return Err(ProxyHeaderError::V1Protocol(lossy(other))),
    };
    let Some(&source) = judged.get(1) else {
        return missing();
    };
    let source = address(source, ipv4)?;
    let Some(&destination) = judged.get(2) else {
        return missing();
    };
    let destination = address(destination, ipv4)?;
    let Some(&source_port) = judged.get(3) else {
        return missing();
    };
    let source_port = port(source_port)?;
    let Some(&destination_port) = judged.get(4) else {
        return missing();
    };
    let destination_port = port(destination_port)?;
    if !whole {
        // Any further field is reported once the CRLF shows how many there are.
        return Ok(Line::Partial);
    }
    if fields.len() != 5 {
        return missing();
    }
    Ok(Line::Tcp(
        SocketAddr::new(source, source_port),
        SocketAddr::new(destination, destination_port),
    ))
}

/// An address of the family of the protocol (`TCP4` when `ipv4`, else `TCP6`). Bytes that
/// are not UTF-8 become U+FFFD, which no address contains.
fn address(field: &[u8], ipv4: bool) -> Result<IpAddr, ProxyHeaderError> {
    let text = lossy(field);
    match text.parse::<IpAddr>() {
        Ok(address) if address.is_ipv4() == ipv4 => Ok(address),
        Ok(address) => Err(ProxyHeaderError::V1FamilyMismatch {
            protocol: if ipv4 { "TCP4" } else { "TCP6" },
            address,
        }),
        Err(source) => Err(ProxyHeaderError::V1Address {
            field: text,
            source,
        }),
    }
}

/// A port: decimal digits only (no sign), no leading zeros, at most 65535.
fn port(field: &[u8]) -> Result<u16, ProxyHeaderError> {
    let bad = || ProxyHeaderError::V1Port(lossy(field));
    let digits_only = !field.is_empty() && field.iter().all(u8::is_ascii_digit);
    let leading_zero = field.len() > 1 && field[0] == b'0';
    if !digits_only || leading_zero || field.len() > 5 {
        return Err(bad());
    }
    let value = field
        .iter()
        .fold(0u32, |n, &digit| n * 10 + u32::from(digit - b'0'));
    u16::try_from(value).map_err(|_| bad())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{encode_v1, parse};

    /// The error for `line`, and that its text is `message`.
    fn fails(line: &[u8], message: &str) -> ProxyHeaderError {
        let err = match parse(line) {
            Err(err) => err,
            Ok(parsed) => panic!("{:?}: expected an error, got {parsed:?}", lossy(line)),
        };
        assert_eq!(err.to_string(), message, "{:?}", lossy(line));
        err
    }

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("{:?}: expected a header, got {other:?}", lossy(buf)),
        }
    }

    fn tcp(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader {
            version: 1,
            command: Command::Proxy,
            source: Some(source.parse().unwrap()),
            destination: Some(destination.parse().unwrap()),
        }
    }

    const UNKNOWN: ProxyHeader = ProxyHeader {
        version: 1,
        command: Command::Proxy,
        source: None,
        destination: None,
    };

    #[test]
    fn spec_example_tcp4() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(
            complete(line),
            (tcp("192.168.0.1:56324", "192.168.0.11:443"), line.len())
        );
    }

    #[test]
    fn tcp6() {
        let line = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 65535 0\r\n";
        assert_eq!(
            complete(line),
            (
                tcp("[2001:db8::1]:65535", "[::ffff:10.0.0.1]:0"),
                line.len()
            )
        );
    }

    #[test]
    fn spec_maximal_lines() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(tcp4.len(), 56);
        assert_eq!(complete(tcp4).1, 56);

        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        assert_eq!(
            complete(tcp6.as_bytes()),
            (
                tcp(&format!("[{full}]:65535"), &format!("[{full}]:65535")),
                104
            )
        );

        let unknown = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(unknown.len(), MAX_V1_LEN);
        assert_eq!(complete(unknown.as_bytes()), (UNKNOWN, MAX_V1_LEN));
    }

    #[test]
    fn unknown_ignores_the_rest_of_the_line() {
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (UNKNOWN, 15));
        assert_eq!(complete(b"PROXY UNKNOWN \r\n"), (UNKNOWN, 16));
        assert_eq!(
            complete(b"PROXY UNKNOWN whatever  \x00\xff 1 2\r\n"),
            (UNKNOWN, 32)
        );
    }

    #[test]
    fn bytes_after_the_header_are_not_consumed() {
        let mut buf = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 22\r\n".to_vec();
        let header_len = buf.len();
        buf.extend_from_slice(b"SSH-2.0-OpenSSH_9.2p1\r\nPROXY TCP4 \n\n");
        assert_eq!(
            complete(&buf),
            (tcp("10.1.2.3:40000", "10.0.0.1:22"), header_len)
        );
        // Even when the stream's bytes are no text at all, or the header fills the cap.
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let mut buf = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n").into_bytes();
        buf.extend_from_slice(&[0xff; 300]);
        assert_eq!(complete(&buf), (UNKNOWN, MAX_V1_LEN));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        for line in [
            "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_owned(),
            "PROXY TCP6 ::1 ::2 0 1\r\n".to_owned(),
            "PROXY UNKNOWN\r\n".to_owned(),
            format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n"),
        ] {
            let line = line.as_bytes();
            for n in 0..line.len() {
                assert_eq!(
                    parse(&line[..n]),
                    Ok(Parsed::Incomplete),
                    "{:?}",
                    lossy(&line[..n])
                );
            }
            assert!(
                matches!(parse(line), Ok(Parsed::Complete { consumed, .. }) if consumed == line.len())
            );
        }
    }

    #[test]
    fn too_long() {
        let message = "PROXY v1 header too long: no CRLF within 107 bytes";
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        // 108 bytes: the LF is one past the cap.
        let line = format!("PROXY UNKNOWN {full} {full} 65535 655350\r\n");
        assert_eq!(fails(line.as_bytes(), message), ProxyHeaderError::V1TooLong);
        // The verdict comes at 107 bytes, without waiting for the rest.
        assert_eq!(parse(&line.as_bytes()[..106]), Ok(Parsed::Incomplete));
        // The CR is the 107th byte: its LF would be the 108th.
        fails(&line.as_bytes()[..107], message);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(4096, b'x');
        fails(&long, message);
    }

    #[test]
    fn bad_line_endings() {
        for (line, offset) in [
            (&b"PROXY UNKNOWN\n"[..], 13),
            (b"PROXY UNKNOWN\r\r\n", 13),
            (b"PROXY UNKNOWN\rx", 13),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 30),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r ", 30),
            (b"PROXY \n", 6),
            (b"PROXY UNKNOWN x\ny\r\n", 15),
        ] {
            let err = fails(
                line,
                &format!(
                    "PROXY v1 header: bare CR or LF at byte {offset}, the line must end with CRLF"
                ),
            );
            assert_eq!(err, ProxyHeaderError::V1LineEnding { offset });
        }
        // A CR that is the last byte so far may still be followed by its LF.
        assert_eq!(parse(b"PROXY UNKNOWN\r"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn bad_field_count() {
        for (line, found) in [
            (&b"PROXY TCP4\r\n"[..], 2),
            (b"PROXY TCP4 1.2.3.4\r\n", 3),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", 4),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 5),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 7),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", 7),
            (b"PROXY TCP6 ::1 ::2 1 2 x y z\r\n", 9),
        ] {
            let err = fails(
                line,
                &format!("PROXY v1 header: bad field count: {found} fields, expected 6"),
            );
            assert_eq!(err, ProxyHeaderError::V1FieldCount { found });
        }
    }

    #[test]
    fn bad_protocol() {
        for (line, protocol) in [
            (&b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..], "TCP5"),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "tcp4"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "UDP4"),
            (b"PROXY \r\n", ""),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", ""),
            (b"PROXY UNKNOWNX\r\n", "UNKNOWNX"),
            (b"PROXY UNKNOWN\t\r\n", "UNKNOWN\t"),
            // Judged as soon as the space after it arrives.
            (b"PROXY GET ", "GET"),
            (b"PROXY \xff\xfe ", "\u{fffd}\u{fffd}"),
        ] {
            let err = fails(
                line,
                &format!(
                    "PROXY v1 header: bad protocol {protocol:?}, expected TCP4, TCP6 or UNKNOWN"
                ),
            );
            assert_eq!(err, ProxyHeaderError::V1Protocol(protocol.to_owned()));
        }
    }

    #[test]
    fn bad_address() {
        for (line, field) in [
            (&b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"[..], "1.2.3"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "5.6.7.256"),
            // Leading zeros could be read as octal: the spec forbids them.
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "01.2.3.4"),
            (b"PROXY TCP4 1.2.3.4:5 5.6.7.8 1 2\r\n", "1.2.3.4:5"),
            (b"PROXY TCP4  5.6.7.8 1 2\r\n", ""),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "fe80::1%eth0"),
            (b"PROXY TCP6 [::1] ::1 1 2\r\n", "[::1]"),
            (b"PROXY TCP6 ::1 :::1 1 2\r\n", ":::1"),
            (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "localhost"),
            (b"PROXY TCP4 1.2.3.\xc0 5.6.7.8 1 2\r\n", "1.2.3.\u{fffd}"),
            // Judged as soon as the space after it arrives, before the count is known.
            (b"PROXY TCP4 bad ", "bad"),
            (b"PROXY TCP4 1.2.3.4 bad\r\n", "bad"),
        ] {
            let err = fails(line, &format!("PROXY v1 header: bad address {field:?}"));
            assert!(
                matches!(&err, ProxyHeaderError::V1Address { field: f, .. } if f == field),
                "{err:?}"
            );
            assert!(std::error::Error::source(&err).is_some());
        }
    }

    #[test]
    fn bad_port() {
        for (line, field) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"[..], "65536"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "99999"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 0022 2\r\n", "0022"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "00"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "+1"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "-1"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x16\r\n", "0x16"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000000000000000000\r\n",
                "100000000000000000000",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", ""),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", ""),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 22a ", "22a"),
        ] {
            let err = fails(
                line,
                &format!(
                    "PROXY v1 header: bad port {field:?}, expected 0..65535 without leading zeros"
                ),
            );
            assert_eq!(err, ProxyHeaderError::V1Port(field.to_owned()));
        }
        let (header, _) = complete(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n");
        assert_eq!(header, tcp("1.2.3.4:0", "5.6.7.8:65535"));
    }

    #[test]
    fn family_mismatch() {
        for (line, protocol, address) in [
            (&b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"[..], "TCP4", "::1"),
            (
                b"PROXY TCP4 1.2.3.4 ::ffff:5.6.7.8 1 2\r\n",
                "TCP4",
                "::ffff:5.6.7.8",
            ),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "TCP6", "1.2.3.4"),
            (b"PROXY TCP6 ::1 127.0.0.1 1 2\r\n", "TCP6", "127.0.0.1"),
        ] {
            let err = fails(
                line,
                &format!("PROXY v1 header: address {address} does not match protocol {protocol}"),
            );
            assert_eq!(
                err,
                ProxyHeaderError::V1FamilyMismatch {
                    protocol,
                    address: address.parse().unwrap()
                }
            );
        }
    }

    #[test]
    fn the_first_bad_field_is_reported() {
        // Fields are judged left to right, before the count and the line ending.
        fails(
            b"PROXY TCP4 1.2.3.4 ::1 x y z\r\n",
            "PROXY v1 header: address ::1 does not match protocol TCP4",
        );
        fails(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\n",
            "PROXY v1 header: bad port \"x\", expected 0..65535 without leading zeros",
        );
        let mut long = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ".to_vec();
        long.resize(200, b'x');
        fails(&long, "PROXY v1 header too long: no CRLF within 107 bytes");
        long[10] = b'X';
        fails(
            &long,
            "PROXY v1 header: bad protocol \"TCP4X1.2.3.4\", expected TCP4, TCP6 or UNKNOWN",
        );
    }

    #[test]
    fn a_cut_field_waits_for_the_rest() {
        for buf in [
            &b"PROXY TCP"[..],
            b"PROXY UNKNOW",
            b"PROXY TCP4 1.2.",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 6553",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
            // Too many fields shows only at the CRLF, when they can be counted.
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3 4",
            b"PROXY UNKNOWN \xff\x00 anything",
        ] {
            assert_eq!(parse(buf), Ok(Parsed::Incomplete), "{:?}", lossy(buf));
        }
    }

    #[test]
    fn encode() {
        let header = tcp("192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(
            encode_v1(&header),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let header = tcp("[2001:db8::1]:1", "[::1]:2");
        assert_eq!(encode_v1(&header), b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n");
        assert_eq!(encode_v1(&UNKNOWN), b"PROXY UNKNOWN\r\n");
        let local = ProxyHeader {
            command: Command::Local,
            ..tcp("1.2.3.4:1", "5.6.7.8:2")
        };
        assert_eq!(encode_v1(&local), b"PROXY UNKNOWN\r\n");
        let mixed = tcp("1.2.3.4:1", "[::1]:2");
        assert_eq!(encode_v1(&mixed), b"PROXY UNKNOWN\r\n");
    }
}
