//! WebSocket frames (RFC 6455 §5): an incremental decoder for the client's frames that
//! unmasks payload in place and streams it, and encoders for the server's frames.
//!
//! # Decoding
//!
//! A [`Decoder`] lives as long as the connection. Each call to [`Decoder::decode`] takes the
//! bytes read so far that it has not consumed yet and answers `(consumed, item)`:
//!
//! - [`Item::Data`]: a range of `input` that holds payload bytes of a binary or text frame
//!   or of a continuation, already unmasked in place. The range is never empty and lies
//!   within `input[..consumed]`. A frame's payload is never buffered: a 16 MiB frame read in
//!   16 KiB reads comes out as about a thousand ranges, and any length up to 2^63 - 1 works.
//!   Text frames carry bytes like binary ones: UTF-8 is not checked (a client without
//!   `--binary` sends SSH in text frames; jupyter-server-proxy does the same).
//! - [`Item::Ping`], [`Item::Pong`], [`Item::Close`]: a whole control frame. Its payload
//!   (at most 125 bytes) is kept in the decoder until the frame is complete.
//! - [`Item::NeedMore`]: every byte of `input` went into the decoder's state (a partial
//!   header or control frame) or was an empty data frame: read more.
//!
//! Call `decode` again on `input[consumed..]` until it answers `NeedMore`. `consumed` is
//! more than 0 whenever `input` is not empty, so the loop always ends. How the bytes were
//! split into reads does not matter: a header split into 1-byte reads works, and the mask
//! offset carries over from one call to the next. The items of any split are the same as
//! those of the whole stream, except that one frame's payload may come in more ranges.
//!
//! After a Close, the decoder takes every further byte as consumed and answers `NeedMore`:
//! the client may send nothing after it (§5.5.1). After a [`FrameError`] the connection is
//! failed: send [`close`] with [`FrameError::close_code`] and drop the decoder.
//!
//! Deliberately not checked: that lengths use the shortest encoding (a MUST for the sender
//! only), UTF-8 in text frames and in a Close frame's reason.
//!
//! # Encoding
//!
//! Server frames are never masked. [`data_header`] gives the header of one binary frame
//! with FIN set; the payload follows it unchanged (the relay splices it from a pipe). It
//! answers `None` for an empty payload, since websocat takes an empty message for EOF: never
//! send an empty data frame. [`ping`], [`pong`] and [`close`] give whole control frames.

use std::fmt;
use std::ops::Range;

/// The largest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The longest frame header: 2 bytes, a 64-bit length, a masking key.
pub const MAX_HEADER_LEN: usize = 14;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASK: u8 = 0x80;

/// What the decoder found: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Payload bytes of a data frame, unmasked in place: `input[range]`.
    Data(Range<usize>),
    /// A Ping: answer it with [`pong`] of the same payload.
    Ping(ControlPayload),
    /// A Pong, solicited or not. Its payload is dropped.
    Pong,
    /// A Close, with its status code if it carried one. The reason is dropped.
    Close(Option<u16>),
    /// All of `input` went into the decoder's state: read more.
    NeedMore,
}

/// The payload of a control frame: at most [`MAX_CONTROL_PAYLOAD`] bytes, kept inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControlPayload {
    bytes: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlPayload {
    /// No payload: what a keepalive ping carries.
    pub const EMPTY: ControlPayload = ControlPayload {
        bytes: [0; MAX_CONTROL_PAYLOAD],
        len: 0,
    };

    /// A payload of these bytes; `None` past [`MAX_CONTROL_PAYLOAD`] bytes.
    pub fn new(payload: &[u8]) -> Option<ControlPayload> {
        let mut bytes = [0; MAX_CONTROL_PAYLOAD];
        bytes.get_mut(..payload.len())?.copy_from_slice(payload);
        Some(ControlPayload {
            bytes,
            len: payload.len() as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl Default for ControlPayload {
    fn default() -> Self {
        ControlPayload::EMPTY
    }
}

impl fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlPayload({:02x?})", self.as_bytes())
    }
}

/// Why the client's frames break the protocol. Every one fails the connection with close
/// code 1002 (protocol error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The MASK bit is clear (§5.1: the server must fail such a connection).
    #[error("WebSocket frame from the client is not masked")]
    Unmasked,
    /// RSV1, RSV2 or RSV3 is set; no extension is ever negotiated. Holds the bits, RSV1 high.
    #[error("WebSocket frame with reserved bits {0:#05b} set, and no extension negotiated")]
    ReservedBits(u8),
    /// Opcodes 0x3-0x7 and 0xB-0xF.
    #[error("WebSocket frame with reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A Close, Ping or Pong whose length field says 126 or more.
    #[error("WebSocket control frame (opcode {0:#x}) longer than 125 bytes")]
    ControlTooLong(u8),
    /// A Close, Ping or Pong with FIN clear.
    #[error(
        "WebSocket control frame (opcode {0:#x}) without FIN: control frames cannot be fragmented"
    )]
    ControlFragmented(u8),
    /// A 64-bit length with its most significant bit set.
    #[error("WebSocket frame length has the most significant bit set")]
    LengthTooLarge,
    /// Opcode 0x0 while no fragmented message is open.
    #[error("WebSocket continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is still open.
    #[error(
        "WebSocket data frame (opcode {0:#x}) inside a fragmented message, expected a continuation"
    )]
    DataInsideMessage(u8),
    /// A Close frame with a 1-byte payload: a status code takes 2.
    #[error("WebSocket Close frame with a 1-byte payload")]
    CloseOneByte,
    /// A status code that may not be sent (§7.4): not 1000-1003, 1007-1014 or 3000-4999.
    #[error("WebSocket Close frame with invalid status code {0}")]
    CloseCode(u16),
}

impl FrameError {
    /// The status code of the Close frame that fails the connection: 1002.
    pub fn close_code(&self) -> u16 {
        1002
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading a header; `filled` bytes of it are in `buf`.
    Header,
    /// Streaming `remaining` payload bytes of a data frame.
    Data,
    /// Collecting `remaining` more payload bytes of a control frame into `buf[..filled]`.
    Control,
    /// A Close came: discard everything.
    Closed,
}

/// The decoder of one connection's client frames: see the module docs. About 144 bytes,
/// most of them the buffer for a partial header or a control frame's payload.
#[derive(Clone)]
pub struct Decoder {
    /// A partial header (at most 14 bytes), then a control frame's payload.
    buf: [u8; MAX_CONTROL_PAYLOAD],
    filled: u8,
    stage: Stage,
    /// The opcode of the current frame.
    opcode: u8,
    key: [u8; 4],
    /// Which byte of `key` unmasks the next payload byte.
    key_offset: u8,
    /// A text or binary frame without FIN came, and no continuation with FIN yet.
    in_message: bool,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("stage", &self.stage)
            .field("opcode", &self.opcode)
            .field("remaining", &self.remaining)
            .field("in_message", &self.in_message)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: [0; MAX_CONTROL_PAYLOAD],
            filled: 0,
            stage: Stage::Header,
            opcode: 0,
            key: [0; 4],
            key_offset: 0,
            in_message: false,
            remaining: 0,
        }
    }

    /// Whether the decoder sits between frames, outside any fragmented message: a client
    /// that closes the TCP connection here has sent only whole messages.
    pub fn at_message_boundary(&self) -> bool {
        self.stage == Stage::Header && self.filled == 0 && !self.in_message
    }

    /// Decodes the next item from `input`, unmasking data in place: see the module docs.
    pub fn decode(&mut self, input: &mut [u8]) -> Result<(usize, Item), FrameError> {
        let mut pos = 0;
        loop {
            match self.stage {
                Stage::Closed => return Ok((input.len(), Item::NeedMore)),
                Stage::Header => {
                    if pos == input.len() {
                        return Ok((pos, Item::NeedMore));
                    }
                    pos += self.read_header(&input[pos..])?;
                    if self.stage == Stage::Control && self.remaining == 0 {
                        return Ok((pos, self.finish_control()?));
                    }
                }
                Stage::Data => {
                    let n = (input.len() - pos).min(self.remaining.min(usize::MAX as u64) as usize);
                    if n == 0 {
                        return Ok((pos, Item::NeedMore));
                    }
                    let range = pos..pos + n;
                    unmask(
                        &mut input[range.clone()],
                        self.key,
                        self.key_offset as usize,
                    );
                    self.key_offset = ((self.key_offset as usize + n) & 3) as u8;
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        self.stage = Stage::Header;
                    }
                    return Ok((range.end, Item::Data(range)));
                }
                Stage::Control => {
                    let n = (input.len() - pos).min(self.remaining as usize);
                    let start = self.filled as usize;
                    self.buf[start..start + n].copy_from_slice(&input[pos..pos + n]);
                    self.filled += n as u8;
                    self.remaining -= n as u64;
                    pos += n;
                    if self.remaining > 0 {
                        return Ok((pos, Item::NeedMore));
                    }
                    return Ok((pos, self.finish_control()?));
                }
            }
        }
    }

    /// Takes header bytes from `bytes` until the header is complete or `bytes` runs out,
    /// checking each byte as it arrives; answers how many it took. A complete header starts
    /// its frame: the stage moves on from `Header`, unless the frame is an empty data frame.
    fn read_header(&mut self, bytes: &[u8]) -> Result<usize, FrameError> {
        let mut used = 0;
        while used < bytes.len() {
            let byte = bytes[used];
            self.buf[self.filled as usize] = byte;
            self.filled += 1;
            used += 1;
            match self.filled {
                1 => self.check_first_byte(byte)?,
                2 => self.check_second_byte(byte)?,
                3 if self.buf[1] & 0x7f == 127 && byte & 0x80 != 0 => {
                    return Err(FrameError::LengthTooLarge)
                }
                _ => {}
            }
            if self.filled >= 2 && self.filled as usize == header_len(self.buf[1]) {
                self.start_frame()?;
                break;
            }
        }
        Ok(used)
    }

    fn check_first_byte(&self, byte: u8) -> Result<(), FrameError> {
        if byte & RSV != 0 {
            return Err(FrameError::ReservedBits((byte & RSV) >> 4));
        }
        let opcode = byte & 0x0f;
        match opcode {
            CONTINUATION if !self.in_message => Err(FrameError::UnexpectedContinuation),
            TEXT | BINARY if self.in_message => Err(FrameError::DataInsideMessage(opcode)),
            CONTINUATION | TEXT | BINARY => Ok(()),
            CLOSE | PING | PONG if byte & FIN == 0 => Err(FrameError::ControlFragmented(opcode)),
            CLOSE | PING | PONG => Ok(()),
            _ => Err(FrameError::ReservedOpcode(opcode)),
        }
    }

    fn check_second_byte(&self, byte: u8) -> Result<(), FrameError> {
        if byte & MASK == 0 {
            return Err(FrameError::Unmasked);
        }
        let opcode = self.buf[0] & 0x0f;
        if is_control(opcode) && (byte & 0x7f) as usize > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::ControlTooLong(opcode));
        }
        Ok(())
    }

    /// The header in `buf[..filled]` is complete and checked: start its frame.
    fn start_frame(&mut self) -> Result<(), FrameError> {
        let (b0, len7) = (self.buf[0], self.buf[1] & 0x7f);
        let len = match len7 {
            126 => u16::from_be_bytes([self.buf[2], self.buf[3]]) as u64,
            127 => u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        let key_at = self.filled as usize - 4;
        self.key = self.buf[key_at..key_at + 4].try_into().expect("4 bytes");
        self.key_offset = 0;
        self.opcode = b0 & 0x0f;
        self.remaining = len;
        self.filled = 0;
        if is_control(self.opcode) {
            if self.opcode == CLOSE && len == 1 {
                return Err(FrameError::CloseOneByte);
            }
            self.stage = Stage::Control;
        } else {
            // A text or binary frame opens a message unless it has FIN; a continuation with
            // FIN ends it.
            self.in_message = b0 & FIN == 0;
            self.stage = if len == 0 { Stage::Header } else { Stage::Data };
        }
        Ok(())
    }

    /// The control frame's payload is all in `buf[..filled]`: unmask it and deliver it.
    fn finish_control(&mut self) -> Result<Item, FrameError> {
        let len = self.filled as usize;
        unmask(&mut self.buf[..len], self.key, 0);
        self.filled = 0;
        self.stage = Stage::Header;
        Ok(match self.opcode {
            PING => Item::Ping(ControlPayload::new(&self.buf[..len]).expect("at most 125")),
            PONG => Item::Pong,
            _ => {
                let code = match len {
                    0 => None,
                    _ => {
                        let code = u16::from_be_bytes([self.buf[0], self.buf[1]]);
                        if !valid_close_code(code) {
                            return Err(FrameError::CloseCode(code));
                        }
                        Some(code)
                    }
                };
                self.stage = Stage::Closed;
                Item::Close(code)
            }
        })
    }
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// The length of a client header (masked) from its second byte.
fn header_len(second: u8) -> usize {
    match second & 0x7f {
        126 => 2 + 2 + 4,
        127 => 2 + 8 + 4,
        _ => 2 + 4,
    }
}

/// The codes an endpoint may send (§7.4.1, and 1012-1014 from the IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `buf` with `key`, starting at byte `offset` of the key (§5.3).
fn unmask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let k: [u8; 4] = std::array::from_fn(|i| key[(offset + i) & 3]);
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i & 3];
    }
}

/// The header of one unmasked server frame: 2, 4 or 10 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

fn header(first: u8, len: u64) -> Header {
    let mut bytes = [0; 10];
    bytes[0] = first;
    let n = if len <= 125 {
        bytes[1] = len as u8;
        2
    } else if len <= 0xffff {
        bytes[1] = 126;
        bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        bytes[1] = 127;
        bytes[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    Header { bytes, len: n }
}

/// The header of a binary frame with FIN and `payload_len` bytes of payload; `None` for 0,
/// as an empty data frame must never be sent (see the module docs).
pub fn data_header(payload_len: usize) -> Option<Header> {
    (payload_len > 0).then(|| header(FIN | BINARY, payload_len as u64))
}

/// A whole unmasked control frame from the server: at most 2 + 125 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFrame {
    bytes: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

fn control(opcode: u8, payload: &[u8]) -> ControlFrame {
    let mut bytes = [0; 2 + MAX_CONTROL_PAYLOAD];
    bytes[0] = FIN | opcode;
    bytes[1] = payload.len() as u8;
    bytes[2..2 + payload.len()].copy_from_slice(payload);
    ControlFrame {
        bytes,
        len: 2 + payload.len() as u8,
    }
}

/// A Ping; a keepalive sends [`ControlPayload::EMPTY`].
pub fn ping(payload: &ControlPayload) -> ControlFrame {
    control(PING, payload.as_bytes())
}

/// The Pong that answers a Ping with this payload.
pub fn pong(payload: &ControlPayload) -> ControlFrame {
    control(PONG, payload.as_bytes())
}

/// A Close with this status code and no reason: 1000 normal, 1001 going away (shutdown,
/// mapping removed), 1002 protocol error, 1011 upstream error.
pub fn close(code: u16) -> ControlFrame {
    control(CLOSE, &code.to_be_bytes())
}

/// A client frame: `first` is FIN|RSV|opcode, the payload is masked with `key`. Tests only:
/// the relay never sends masked frames.
#[cfg(test)]
pub(crate) fn client_frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let h = header(first, payload.len() as u64);
    let mut frame = h.as_bytes().to_vec();
    frame[1] |= MASK;
    frame.extend_from_slice(&key);
    let start = frame.len();
    frame.extend_from_slice(payload);
    unmask(&mut frame[start..], key, 0);
    frame
}

/// The frame types' state across an upgrade, in the hand-over state's layout.
pub mod saved {
    use super::*;
    use crate::upgrade::wire::{Reader, WireError, Writer};

    fn bad(what: &'static str, value: usize) -> WireError {
        WireError::Bad {
            what,
            value: value as u64,
        }
    }

    fn fixed<const N: usize>(r: &mut Reader, what: &'static str) -> Result<[u8; N], WireError> {
        let b = r.bytes(what)?;
        b.try_into().map_err(|_| bad(what, b.len()))
    }

    pub fn decoder(d: &Decoder, w: &mut Writer) {
        w.bytes(&d.buf);
        w.u8(d.filled);
        w.u8(match d.stage {
            Stage::Header => 0,
            Stage::Data => 1,
            Stage::Control => 2,
            Stage::Closed => 3,
        });
        w.u8(d.opcode);
        w.bytes(&d.key);
        w.u8(d.key_offset);
        w.bool(d.in_message);
        w.u64(d.remaining);
    }

    pub fn load_decoder(r: &mut Reader) -> Result<Decoder, WireError> {
        let buf = fixed::<MAX_CONTROL_PAYLOAD>(r, "decoder buffer")?;
        let filled = r.u8("decoder filled")?;
        if filled as usize > MAX_CONTROL_PAYLOAD {
            return Err(bad("decoder filled", filled.into()));
        }
        let stage = match r.u8("decoder stage")? {
            0 => Stage::Header,
            1 => Stage::Data,
            2 => Stage::Control,
            3 => Stage::Closed,
            v => return Err(bad("decoder stage", v.into())),
        };
        let opcode = r.u8("decoder opcode")?;
        let key = fixed::<4>(r, "decoder key")?;
        let key_offset = r.u8("decoder key offset")? & 3;
        Ok(Decoder {
            buf,
            filled,
            stage,
            opcode,
            key,
            key_offset,
            in_message: r.bool("decoder in message")?,
            remaining: r.u64("decoder remaining")?,
        })
    }

    pub fn header(h: &Header, w: &mut Writer) {
        w.bytes(h.as_bytes());
    }

    /// Up to `N` bytes into a zeroed array, with their count.
    fn up_to<const N: usize>(
        r: &mut Reader,
        what: &'static str,
    ) -> Result<([u8; N], u8), WireError> {
        let b = r.bytes(what)?;
        let mut bytes = [0; N];
        bytes
            .get_mut(..b.len())
            .ok_or(bad(what, b.len()))?
            .copy_from_slice(b);
        Ok((bytes, b.len() as u8))
    }

    pub fn load_header(r: &mut Reader) -> Result<Header, WireError> {
        let (bytes, len) = up_to::<10>(r, "frame header")?;
        Ok(Header { bytes, len })
    }

    pub fn control_payload(p: &ControlPayload, w: &mut Writer) {
        w.bytes(p.as_bytes());
    }

    pub fn load_control_payload(r: &mut Reader) -> Result<ControlPayload, WireError> {
        let b = r.bytes("control payload")?;
        ControlPayload::new(b).ok_or(bad("control payload", b.len()))
    }

    pub fn control_frame(f: &ControlFrame, w: &mut Writer) {
        w.bytes(f.as_bytes());
    }

    pub fn load_control_frame(r: &mut Reader) -> Result<ControlFrame, WireError> {
        let (bytes, len) = up_to::<{ 2 + MAX_CONTROL_PAYLOAD }>(r, "control frame")?;
        Ok(ControlFrame { bytes, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Decodes `input` to the end: the items (data ranges as bytes), or the first error.
    fn decode_all(decoder: &mut Decoder, mut input: Vec<u8>) -> Result<Vec<Out>, FrameError> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (used, item) = decoder.decode(&mut input[pos..])?;
            let base = pos;
            pos += used;
            match item {
                Item::NeedMore => {
                    assert_eq!(pos, input.len());
                    return Ok(out);
                }
                Item::Data(r) => out.push(Out::Data(input[base + r.start..base + r.end].to_vec())),
                Item::Ping(p) => out.push(Out::Ping(p.as_bytes().to_vec())),
                Item::Pong => out.push(Out::Pong),
                Item::Close(c) => out.push(Out::Close(c)),
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Data(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn decode(bytes: &[u8]) -> Result<Vec<Out>, FrameError> {
        decode_all(&mut Decoder::new(), bytes.to_vec())
    }

    #[test]
    fn rfc_examples() {
        // §5.7: a masked "Hello" from a client.
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode(&hello), Ok(vec![Out::Data(b"Hello".to_vec())]));
        assert_eq!(client_frame(0x81, b"Hello", KEY), hello);
        // §5.7: unmasked server frames.
        assert_eq!(data_header(5).unwrap().as_bytes(), [0x82, 0x05]);
        assert_eq!(
            data_header(256).unwrap().as_bytes(),
            [0x82, 0x7e, 0x01, 0x00]
        );
        assert_eq!(
            data_header(65536).unwrap().as_bytes(),
            [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        let hello_ping = ping(&ControlPayload::new(b"Hello").unwrap());
        assert_eq!(hello_ping.as_bytes(), b"\x89\x05Hello");
    }

    #[test]
    fn header_sizes() {
        for (len, header_len) in [
            (1, 2),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (1 << 40, 10),
        ] {
            assert_eq!(
                data_header(len).unwrap().as_bytes().len(),
                header_len,
                "{len}"
            );
        }
        assert_eq!(data_header(0), None);
    }

    #[test]
    fn control_frames() {
        assert_eq!(ping(&ControlPayload::EMPTY).as_bytes(), [0x89, 0x00]);
        assert_eq!(
            pong(&ControlPayload::new(b"ab").unwrap()).as_bytes(),
            b"\x8a\x02ab"
        );
        assert_eq!(close(1000).as_bytes(), [0x88, 0x02, 0x03, 0xe8]);
        assert_eq!(close(1002).as_bytes(), [0x88, 0x02, 0x03, 0xea]);
        assert!(ControlPayload::new(&[0; 125]).is_some());
        assert!(ControlPayload::new(&[0; 126]).is_none());
        let full = ControlPayload::new(&[7; 125]).unwrap();
        assert_eq!(pong(&full).as_bytes().len(), 127);
    }

    #[test]
    fn control_items() {
        let mut bytes = client_frame(0x89, b"hi", KEY);
        bytes.extend(client_frame(0x8a, b"x", KEY));
        bytes.extend(client_frame(0x89, b"", KEY));
        bytes.extend(client_frame(0x88, &1001u16.to_be_bytes(), KEY));
        bytes.extend(client_frame(0x82, b"after close is discarded", KEY));
        assert_eq!(
            decode(&bytes),
            Ok(vec![
                Out::Ping(b"hi".to_vec()),
                Out::Pong,
                Out::Ping(vec![]),
                Out::Close(Some(1001)),
            ])
        );
        assert_eq!(
            decode(&client_frame(0x88, b"", KEY)),
            Ok(vec![Out::Close(None)])
        );
        let with_reason = client_frame(0x88, b"\x0f\xa0bye", KEY);
        assert_eq!(decode(&with_reason), Ok(vec![Out::Close(Some(4000))]));
    }

    #[test]
    fn fragments_with_a_ping_between() {
        let mut bytes = client_frame(0x01, b"one ", KEY); // text, no FIN
        bytes.extend(client_frame(0x89, b"p", KEY));
        bytes.extend(client_frame(0x00, b"", KEY)); // empty continuation: no item
        bytes.extend(client_frame(0x00, b"two ", KEY));
        bytes.extend(client_frame(0x80, b"three", KEY)); // continuation with FIN
        bytes.extend(client_frame(0x82, b"next", KEY));
        let mut decoder = Decoder::new();
        assert_eq!(
            decode_all(&mut decoder, bytes),
            Ok(vec![
                Out::Data(b"one ".to_vec()),
                Out::Ping(b"p".to_vec()),
                Out::Data(b"two ".to_vec()),
                Out::Data(b"three".to_vec()),
                Out::Data(b"next".to_vec()),
            ])
        );
        assert!(decoder.at_message_boundary());
    }

    #[test]
    fn one_byte_reads() {
        let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let mut bytes = client_frame(0x82, &payload, KEY);
        bytes.extend(client_frame(0x89, b"ping", KEY));
        let mut decoder = Decoder::new();
        let (mut data, mut pings) = (Vec::new(), Vec::new());
        for &b in &bytes {
            let mut one = [b];
            match decoder.decode(&mut one).unwrap() {
                (1, Item::Data(r)) => data.extend_from_slice(&one[r]),
                (1, Item::Ping(p)) => pings.push(p.as_bytes().to_vec()),
                (1, Item::NeedMore) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(data, payload);
        assert_eq!(pings, [b"ping".to_vec()]);
    }

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(Decoder::new().decode(&mut []), Ok((0, Item::NeedMore)));
    }

    #[test]
    fn large_length_streams() {
        // A frame announcing 2^63 - 1 bytes is accepted and streamed.
        let mut bytes = vec![0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        bytes.extend(KEY);
        bytes.extend(b"abc");
        let mut decoder = Decoder::new();
        let (used, item) = decoder.decode(&mut bytes).unwrap();
        assert_eq!((used, item), (17, Item::Data(14..17)));
        assert_eq!(decoder.remaining, (1 << 63) - 4);
        assert!(!decoder.at_message_boundary());
    }

    #[test]
    fn decoder_is_small() {
        assert!(
            std::mem::size_of::<Decoder>() <= 144,
            "{}",
            std::mem::size_of::<Decoder>()
        );
    }

    /// Every protocol violation, with its exact message.
    #[test]
    fn each_error_exact_message() {
        let unmasked = [0x82, 0x01, b'x'];
        let mut long64 = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0];
        long64.extend(KEY);
        let mut long_ping = vec![0x89, 0xfe, 0x00, 0x7e];
        long_ping.extend(KEY);
        let cases: &[(&str, Vec<u8>, FrameError, &str)] = &[
            ("unmasked", unmasked.to_vec(), FrameError::Unmasked,
             "WebSocket frame from the client is not masked"),
            ("rsv1", client_frame(0xc2, b"x", KEY), FrameError::ReservedBits(4),
             "WebSocket frame with reserved bits 0b100 set, and no extension negotiated"),
            ("rsv3", client_frame(0x92, b"x", KEY), FrameError::ReservedBits(1),
             "WebSocket frame with reserved bits 0b001 set, and no extension negotiated"),
            ("opcode 3", client_frame(0x83, b"", KEY), FrameError::ReservedOpcode(3),
             "WebSocket frame with reserved opcode 0x3"),
            ("opcode 0xb", client_frame(0x8b, b"", KEY), FrameError::ReservedOpcode(0xb),
             "WebSocket frame with reserved opcode 0xb"),
            ("long ping", long_ping, FrameError::ControlTooLong(9),
             "WebSocket control frame (opcode 0x9) longer than 125 bytes"),
            ("fragmented close", client_frame(0x08, b"", KEY), FrameError::ControlFragmented(8),
             "WebSocket control frame (opcode 0x8) without FIN: control frames cannot be fragmented"),
            ("64-bit msb", long64, FrameError::LengthTooLarge,
             "WebSocket frame length has the most significant bit set"),
            ("continuation", client_frame(0x80, b"x", KEY), FrameError::UnexpectedContinuation,
             "WebSocket continuation frame without a message to continue"),
            ("data in message",
             [client_frame(0x02, b"a", KEY), client_frame(0x81, b"b", KEY)].concat(),
             FrameError::DataInsideMessage(1),
             "WebSocket data frame (opcode 0x1) inside a fragmented message, expected a continuation"),
            ("close 1 byte", client_frame(0x88, b"\x03", KEY), FrameError::CloseOneByte,
             "WebSocket Close frame with a 1-byte payload"),
            ("close 1005", client_frame(0x88, &1005u16.to_be_bytes(), KEY), FrameError::CloseCode(1005),
             "WebSocket Close frame with invalid status code 1005"),
            ("close 999", client_frame(0x88, &999u16.to_be_bytes(), KEY), FrameError::CloseCode(999),
             "WebSocket Close frame with invalid status code 999"),
            ("close 5000", client_frame(0x88, &5000u16.to_be_bytes(), KEY), FrameError::CloseCode(5000),
             "WebSocket Close frame with invalid status code 5000"),
        ];
        let mut failures = Vec::new();
        for (what, bytes, error, text) in cases {
            let got = decode(bytes);
            if got.as_ref().err() != Some(error) || error.to_string() != *text {
                failures.push(format!("{what}: expected {text:?}, got {got:?} ({error})"));
            }
            assert_eq!(error.close_code(), 1002);
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn valid_close_codes() {
        for code in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            let frame = client_frame(0x88, &u16::to_be_bytes(code), KEY);
            assert_eq!(decode(&frame), Ok(vec![Out::Close(Some(code))]), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let frame = client_frame(0x88, &u16::to_be_bytes(code), KEY);
            assert_eq!(decode(&frame), Err(FrameError::CloseCode(code)), "{code}");
        }
    }
}
