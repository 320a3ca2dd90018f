//! `websocket::frame::Decoder` on arbitrary bytes: it never panics, every answer keeps the
//! contract, and the verdict does not depend on how reads split the bytes.
//!
//! - `consumed` is more than 0 on non-empty input and at most its length; `NeedMore` means
//!   all of it; a `Data` range is non-empty and within the consumed bytes.
//! - The first byte picks a read size; the stream decoded in reads of that size gives the
//!   same data bytes, the same control items in the same places, and the same error as the
//!   stream decoded in one read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portrelay::websocket::frame::{Decoder, FrameError, Item};

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let whole = decode(stream, stream.len().max(1));
    let split = decode(stream, first as usize % 17 + 1);
    assert_eq!(whole, split, "reads of {} bytes", first as usize % 17 + 1);
});

/// Decodes `stream` in reads of `size` bytes: the events until the end or the first error.
fn decode(stream: &[u8], size: usize) -> (Vec<Event>, Option<FrameError>) {
    let mut bytes = stream.to_vec();
    let mut decoder = Decoder::new();
    let mut events: Vec<Event> = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + size).min(bytes.len());
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
                    let chunk = &bytes[pos + r.start..pos + r.end];
                    match events.last_mut() {
                        Some(Event::Data(d)) => d.extend_from_slice(chunk),
                        _ => events.push(Event::Data(chunk.to_vec())),
                    }
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
