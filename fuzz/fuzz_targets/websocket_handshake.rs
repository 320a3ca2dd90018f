//! `websocket::handshake::parse_request` on arbitrary bytes: it never panics, and its
//! answers hold together.
//!
//! - `Incomplete` only below `MAX_HEAD_LEN` bytes, so a capped reader always gets a verdict.
//! - A complete request is at most the buffer and the cap; shorter prefixes are
//!   `Incomplete`, longer ones give the same request.
//! - An error: every prefix is `Incomplete` or the same error.
//! - The answers built from a request or an error are HTTP heads; `route` on its path
//!   gives a name without `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portrelay::websocket::handshake::{
    parse_request, response_101, route, Parsed, MAX_HEAD_LEN,
};

fuzz_target!(|data: &[u8]| {
    let verdict = parse_request(data);
    if verdict == Ok(Parsed::Incomplete) {
        assert!(data.len() < MAX_HEAD_LEN, "Incomplete at {} bytes", data.len());
    }
    // Every prefix of a short input, a sample of a long one.
    let step = (data.len() / 512).max(1);
    for n in (0..data.len()).step_by(step) {
        let part = parse_request(&data[..n]);
        match &verdict {
            Ok(Parsed::Complete(r)) if n < r.head_len => {
                assert_eq!(part, Ok(Parsed::Incomplete), "prefix of {n} bytes");
            }
            _ => assert!(
                part == Ok(Parsed::Incomplete) || part == verdict,
                "prefix of {n} bytes: {part:?}, whole: {verdict:?}"
            ),
        }
    }

    let answer = match &verdict {
        Ok(Parsed::Incomplete) => return,
        Ok(Parsed::Complete(r)) => {
            assert!(r.head_len <= data.len() && r.head_len <= MAX_HEAD_LEN);
            assert_eq!(r.accept.len(), 28);
            for template in ["/ssh/{name}", "/user/{name}/sshd/", "/{name}"] {
                if let Some(name) = route(template, r.path) {
                    assert!(!name.is_empty() && !name.contains('/'), "{name:?}");
                }
            }
            response_101(&r.accept)
        }
        Err(e) => e.response(),
    };
    let text = String::from_utf8(answer).expect("answers are ASCII");
    let (head, _body) = text.split_once("\r\n\r\n").expect("a blank line ends the head");
    let mut lines = head.split("\r\n");
    assert!(lines.next().unwrap().starts_with("HTTP/1.1 "), "{text}");
    for line in lines {
        assert!(line.split_once(": ").is_some_and(|(n, _)| !n.is_empty()), "{text}");
    }
});
