//! Property tests: client frame streams decoded at any split, the server's frame headers,
//! upgrade requests at any split, routes and token comparison.

use proptest::prelude::*;

use super::frame::{self, client_frame, ControlPayload, Decoder, FrameError, Item};
use super::handshake::{self, parse_request, Parsed};
use super::tokens;

/// What a decoded stream amounts to: data merged up to the next control item.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

fn push_data(events: &mut Vec<Event>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if let Some(Event::Data(d)) = events.last_mut() {
        d.extend_from_slice(bytes);
    } else {
        events.push(Event::Data(bytes.to_vec()));
    }
}

/// Decodes `stream` fed in chunks that end at `cuts`, checking what every call answers;
/// the events until the end or the first error.
fn decode_split(stream: &[u8], cuts: &[usize]) -> (Vec<Event>, Option<FrameError>) {
    let mut bytes = stream.to_vec();
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    bounds.push(bytes.len());
    bounds.sort_unstable();
    let mut start = 0;
    for end in bounds {
        let mut pos = start;
        while pos < end {
            let input = &mut bytes[pos..end];
            let len = input.len();
            let (used, item) = match decoder.decode(input) {
                Ok(answer) => answer,
                Err(e) => return (events, Some(e)),
            };
            assert!(used > 0 && used <= len, "consumed {used} of {len}");
            match item {
                Item::NeedMore => assert_eq!(used, len),
                Item::Data(r) => {
                    assert!(!r.is_empty() && r.end <= used, "{r:?} of {used}");
                    push_data(&mut events, &bytes[pos + r.start..pos + r.end]);
                }
                Item::Ping(p) => events.push(Event::Ping(p.as_bytes().to_vec())),
                Item::Pong => events.push(Event::Pong),
                Item::Close(c) => events.push(Event::Close(c)),
            }
            pos += used;
        }
        start = end;
    }
    (events, None)
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..20),
        3 => proptest::collection::vec(any::<u8>(), 100..300),
        1 => proptest::collection::vec(any::<u8>(), 65530..65600),
    ]
}

fn control() -> impl Strategy<Value = (bool, Vec<u8>, [u8; 4])> {
    (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..=125),
        any::<[u8; 4]>(),
    )
}

/// One message: text or binary, its fragments with their keys, and the control frames
/// (ping or pong) that come before each fragment after the first.
type Message = (bool, Vec<(Vec<u8>, [u8; 4], Vec<(bool, Vec<u8>, [u8; 4])>)>);

fn message() -> impl Strategy<Value = Message> {
    let fragment = (
        payload(),
        any::<[u8; 4]>(),
        proptest::collection::vec(control(), 0..3),
    );
    (any::<bool>(), proptest::collection::vec(fragment, 1..4))
}

/// A stream of messages and maybe a Close at the end, encoded as a client would, and the
/// events it should decode to.
fn client_stream() -> impl Strategy<Value = (Vec<u8>, Vec<Event>)> {
    let close = prop_oneof![
        Just(None),
        Just(Some(None)),
        prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999].prop_map(|c| Some(Some(c))),
    ];
    (
        proptest::collection::vec(message(), 0..5),
        close,
        any::<[u8; 4]>(),
    )
        .prop_map(|(messages, close, close_key)| {
            let (mut bytes, mut events) = (Vec::new(), Vec::new());
            for (text, fragments) in messages {
                let last = fragments.len() - 1;
                for (i, (data, key, controls)) in fragments.into_iter().enumerate() {
                    if i > 0 {
                        for (is_ping, p, k) in controls {
                            let opcode = if is_ping { 0x89 } else { 0x8a };
                            bytes.extend(client_frame(opcode, &p, k));
                            events.push(if is_ping { Event::Ping(p) } else { Event::Pong });
                        }
                    }
                    let opcode = match (i, text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    let fin = if i == last { 0x80 } else { 0 };
                    bytes.extend(client_frame(fin | opcode, &data, key));
                    push_data(&mut events, &data);
                }
            }
            if let Some(code) = close {
                let payload = code.map(u16::to_be_bytes).unwrap_or_default();
                let payload = &payload[..if code.is_some() { 2 } else { 0 }];
                bytes.extend(client_frame(0x88, payload, close_key));
                events.push(Event::Close(code));
            }
            (bytes, events)
        })
}

fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    proptest::collection::vec(any::<prop::sample::Index>(), 0..10)
}

fn indices(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
    cuts.iter().map(|c| c.index(len + 1)).collect()
}

/// A valid upgrade request with random header case, order, extra headers and key, and
/// the path, host, token and key it carries.
fn upgrade_request() -> impl Strategy<Value = (String, String, Option<String>, String)> {
    (
        "/[a-z]{1,8}/[A-Za-z0-9.-]{1,16}(\\?[a-z=&]{0,10})?",
        "[a-z]{1,12}(:[0-9]{2,5})?",
        proptest::option::of("[A-Za-z0-9._~+/-]{1,40}"),
        any::<[u8; 16]>(),
        any::<bool>(),
        proptest::collection::vec(("X-[A-Za-z]{1,10}", "[ -~]{0,30}"), 0..5),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(path, host, token, key, lower, extra, at)| {
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            let name = |n: &str| {
                if lower {
                    n.to_ascii_lowercase()
                } else {
                    n.to_string()
                }
            };
            let mut headers = vec![
                format!("{}: {host}", name("Host")),
                format!("{}: websocket", name("Upgrade")),
                format!("{}: keep-alive, Upgrade", name("Connection")),
                format!("{}: {key}", name("Sec-WebSocket-Key")),
                format!("{}: 13", name("Sec-WebSocket-Version")),
            ];
            if let Some(t) = &token {
                headers.push(format!("{}: token {t}", name("Authorization")));
            }
            for (n, v) in extra {
                headers.insert(at.index(headers.len() + 1), format!("{n}: {v}"));
            }
            let text = format!("GET {path} HTTP/1.1\r\n{}\r\n\r\n", headers.join("\r\n"));
            (text, path, token, key)
        })
}

proptest! {
    /// Any split of a valid stream decodes to the same events: the data bytes as sent,
    /// controls in place, including pings between fragments.
    #[test]
    fn client_streams_decode_at_any_split((stream, expected) in client_stream(), cuts in cuts()) {
        prop_assert_eq!(decode_split(&stream, &[]), (expected.clone(), None));
        let cuts = indices(&cuts, stream.len());
        prop_assert_eq!(decode_split(&stream, &cuts), (expected.clone(), None));
    }

    /// 1-byte reads: headers split at every byte, the mask offset carried over.
    #[test]
    fn client_streams_decode_byte_by_byte((stream, expected) in client_stream()) {
        prop_assume!(stream.len() <= 4096);
        let every: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(decode_split(&stream, &every), (expected, None));
    }

    /// Damaged streams: whatever the verdict, it is the same at every split.
    #[test]
    fn verdicts_do_not_depend_on_reads(
        (mut stream, _) in client_stream(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cuts in cuts(),
    ) {
        prop_assume!(!stream.is_empty());
        for (at, byte) in edits {
            let at = at.index(stream.len());
            stream[at] = byte;
        }
        let whole = decode_split(&stream, &[]);
        prop_assert_eq!(decode_split(&stream, &indices(&cuts, stream.len())), whole);
    }

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), cuts in cuts()) {
        let whole = decode_split(&bytes, &[]);
        prop_assert_eq!(decode_split(&bytes, &indices(&cuts, bytes.len())), whole);
    }

    /// `data_header` never makes an empty data frame, and its frames (masked the way a
    /// client would) decode to the payload.
    #[test]
    fn data_headers(len in prop_oneof![0usize..300, 65530usize..65540, 0usize..200_000], key in any::<[u8; 4]>()) {
        let Some(header) = frame::data_header(len) else {
            prop_assert_eq!(len, 0);
            return Ok(());
        };
        let h = header.as_bytes();
        prop_assert_eq!(h[0], 0x82);
        prop_assert_eq!(h.len(), match len { 1..=125 => 2, 126..=65535 => 4, _ => 10 });
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let masked = client_frame(h[0], &payload, key);
        prop_assert_eq!(&masked[2..h.len()], &h[2..]);
        prop_assert_eq!(decode_split(&masked, &[]), (vec![Event::Data(payload)], None));
    }

    #[test]
    fn control_frames_round_trip(p in proptest::collection::vec(any::<u8>(), 0..=125), key in any::<[u8; 4]>()) {
        let p = ControlPayload::new(&p).unwrap();
        for (frame, event) in [
            (frame::ping(&p), Event::Ping(p.as_bytes().to_vec())),
            (frame::pong(&p), Event::Pong),
        ] {
            let bytes = frame.as_bytes();
            prop_assert_eq!(bytes.len(), 2 + p.as_bytes().len());
            let masked = client_frame(bytes[0], &bytes[2..], key);
            prop_assert_eq!(decode_split(&masked, &[]), (vec![event], None));
        }
    }

    /// Every prefix of a valid request is `Incomplete`, the whole is the request, and the
    /// bytes after it are left to the stream.
    #[test]
    fn requests_at_any_split((text, path, token, key) in upgrade_request(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
        let buf = [text.as_bytes(), &tail].concat();
        for n in 0..text.len() {
            prop_assert_eq!(parse_request(&buf[..n]), Ok(Parsed::Incomplete), "prefix of {}", n);
        }
        for n in [text.len(), buf.len()] {
            let Ok(Parsed::Complete(r)) = parse_request(&buf[..n]) else {
                return Err(TestCaseError::fail(format!("{:?}", parse_request(&buf[..n]))));
            };
            prop_assert_eq!(r.path, path.as_str());
            prop_assert_eq!(r.token, token.as_deref());
            prop_assert_eq!(&r.accept, &handshake::accept_key(&key));
            prop_assert_eq!(r.head_len, text.len());
        }
    }

    /// Damaged requests: every prefix answers `Incomplete` or the verdict on the whole.
    #[test]
    fn request_verdicts_do_not_depend_on_reads(
        (text, ..) in upgrade_request(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let mut buf = text.into_bytes();
        for (at, byte) in edits {
            let at = at.index(buf.len());
            buf[at] = byte;
        }
        let whole = parse_request(&buf);
        for n in 0..buf.len() {
            let part = parse_request(&buf[..n]);
            match &whole {
                Ok(Parsed::Complete(r)) if n < r.head_len => prop_assert_eq!(part, Ok(Parsed::Incomplete)),
                _ => prop_assert!(part == Ok(Parsed::Incomplete) || part == whole, "prefix of {}: {:?}", n, part),
            }
        }
    }

    #[test]
    fn routes_give_the_name(
        name in "[A-Za-z0-9._-]{1,20}",
        template in prop_oneof![Just("/ssh/{name}"), Just("/user/{name}/sshd/"), Just("/{name}")],
        slash in any::<bool>(),
        query in "(\\?[a-z=/]{0,8})?",
    ) {
        prop_assert_eq!(handshake::validate_template(template), Ok(()));
        let mut path = template.replace("{name}", &name);
        if slash {
            if path.ends_with('/') { path.pop(); } else { path.push('/'); }
        }
        path.push_str(&query);
        prop_assert_eq!(handshake::route(template, &path), Some(name.as_str()));
    }

    #[test]
    fn token_comparison_is_equality(a in proptest::collection::vec(any::<u8>(), 0..40), b in proptest::collection::vec(any::<u8>(), 0..40)) {
        prop_assert_eq!(tokens::matches(&a, &b), a == b);
        prop_assert!(tokens::matches(&a, &a.clone()));
    }
}
