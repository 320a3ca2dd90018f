//! `proxy_protocol::parse` on arbitrary bytes: it never panics, and its answers hold
//! together.
//!
//! - `Incomplete` only below `MAX_HEADER_LEN` bytes, so a capped reader always gets a verdict.
//! - A complete header is at most the buffer and the cap; every shorter prefix is
//!   `Incomplete` and every longer one gives the same header.
//! - An error: every prefix is `Incomplete` or the same error (the verdict does not depend on
//!   how reads split the bytes).
//! - A parsed header encodes back, in its own version, to bytes that parse to the same
//!   header; a PROXY header also survives the other version.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portrelay::proxy_protocol::{
    encode_v1, encode_v2, parse, Command, Parsed, ProxyHeader, MAX_HEADER_LEN, MAX_V1_LEN,
};

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    if verdict == Ok(Parsed::Incomplete) {
        assert!(
            data.len() < MAX_HEADER_LEN,
            "Incomplete at {} bytes",
            data.len()
        );
    }
    for n in 0..data.len() {
        let part = parse(&data[..n]);
        match &verdict {
            Ok(Parsed::Complete { consumed, .. }) if n < *consumed => {
                assert_eq!(part, Ok(Parsed::Incomplete), "prefix of {n} bytes");
            }
            _ => assert!(
                part == Ok(Parsed::Incomplete) || part == verdict,
                "prefix of {n} bytes: {part:?}, whole: {verdict:?}"
            ),
        }
    }

    let Ok(Parsed::Complete { header, consumed }) = verdict else {
        return;
    };
    assert!(consumed <= data.len() && consumed <= MAX_HEADER_LEN);
    match header.version {
        1 => {
            assert!(consumed <= MAX_V1_LEN);
            assert_eq!(header.command, Command::Proxy);
        }
        2 => assert!(consumed >= 16),
        other => panic!("version {other}"),
    }
    assert_eq!(header.source.is_some(), header.destination.is_some());

    round_trip(&header, header.version);
    if header.command == Command::Proxy {
        round_trip(&header, 3 - header.version);
    }
});

/// Encodes `header` in `version` and parses it back: the same header, in that version.
fn round_trip(header: &ProxyHeader, version: u8) {
    let bytes = if version == 1 {
        encode_v1(header)
    } else {
        encode_v2(header)
    };
    let expected = ProxyHeader { version, ..*header };
    assert_eq!(
        parse(&bytes),
        Ok(Parsed::Complete {
            header: expected,
            consumed: bytes.len()
        }),
        "{header:?} as v{version}: {bytes:02x?}"
    );
}
