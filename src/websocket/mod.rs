//! SSH over WebSocket (RFC 6455): the pure parts of the entry, with no sockets and no I/O.
//!
//! - [`handshake`]: the client's upgrade request (capped, incomplete as a value, exact
//!   errors with their HTTP status), the 101 and error answers, `Sec-WebSocket-Accept`,
//!   and the path template that routes a request to a mapping.
//! - [`frame`]: the client's frames, decoded incrementally and unmasked in place, payload
//!   streamed and never buffered; the server's frame headers and control frames.
//! - [`tokens`]: the token file (`<mapping name> <token>` per line) and a constant-time
//!   comparison.
//!
//! A connection goes through them in this order:
//!
//! 1. Read into a buffer of at most [`handshake::MAX_HEAD_LEN`] bytes and call
//!    [`handshake::parse_request`] until it is not `Incomplete`. On an error, send
//!    [`handshake::HandshakeError::response`] and close.
//! 2. [`handshake::route`] the path to a mapping name (else 404), check the token with
//!    [`tokens::Tokens::allows`] if the listener has a token file (else 401), check `allow`
//!    (else 403); send [`handshake::response_error`] for each refusal.
//! 3. Send [`handshake::response_101`]. The bytes after `head_len` are the first input of
//!    a [`frame::Decoder`].
//! 4. Client to upstream: [`frame::Decoder::decode`] each read until `NeedMore`; send the
//!    `Data` ranges to the upstream, answer a `Ping` with [`frame::pong`], take a `Close`
//!    like a FIN; on a [`frame::FrameError`] send [`frame::close`] with its code.
//! 5. Upstream to client: each chunk of payload goes out behind [`frame::data_header`]
//!    (never an empty frame); control frames go out only between data frames.

pub mod frame;
pub mod handshake;
pub mod tokens;

#[cfg(test)]
mod proptests;
