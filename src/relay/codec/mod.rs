//! The client end of a connection, as a codec: how the bytes of each direction are framed
//! on the client's socket. The connection state machine (directions, half-close, resets,
//! counting) is the same for every codec; it asks its codec to move a direction's bytes.
//!
//! - `plain`: bytes as they are (direct and PROXY entrances): both directions splice once
//!   they stream, and go through the driver's copy path (receive, send) while they carry
//!   small messages.
//! - `tls`: records through rustls (the TLS entrance): both directions copy.
//! - `websocket`: frames, on `ws://` or inside TLS (`wss://`): client → upstream copies
//!   (masked), upstream → client splices on `ws://`.

mod plain;
mod tls;
mod websocket;

pub use websocket::WsCodec;

use rustls::ServerConnection;

use super::backend::driver::Driver;
use super::connection::{Copier, Dir, Direction, Failure, Side, Turn};
use super::pipe::PipePool;

/// How the client end of a connection carries its bytes.
pub enum Codec {
    Plain,
    /// SSH wrapped in TLS: the session decrypts what the client sends and encrypts what it
    /// is sent.
    Tls(Box<ServerConnection>),
    /// SSH in WebSocket frames (with its TLS session on `wss://`).
    WebSocket(Box<WsCodec>),
}

impl Codec {
    /// Moves the bytes of direction `d` from `src` to `dst` until a socket blocks, the
    /// direction ends or its turn is used up. `last`: the other direction has ended, so the
    /// close that follows sends the FIN. `copier`: the copy path (plain bytes only).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pump<D: Driver>(
        &mut self,
        d: Dir,
        src: &mut Side,
        dst: &mut Side,
        dir: &mut Direction,
        last: bool,
        pool: &mut PipePool,
        copier: Copier<'_, D>,
    ) -> Result<Turn, Failure> {
        match (self, d) {
            (Codec::Plain, _) => plain::move_bytes(src, dst, dir, last, pool, copier),
            (Codec::Tls(tls), Dir::ToUpstream) => tls::decrypt(src, dst, dir, last, tls, pool),
            (Codec::Tls(tls), Dir::ToClient) => tls::encrypt(src, dst, dir, last, tls),
            (Codec::WebSocket(ws), Dir::ToUpstream) => {
                ws.pump_to_upstream(src, dst, dir, last, pool)
            }
            (Codec::WebSocket(ws), Dir::ToClient) => ws.pump_to_client(src, dst, dir, last, pool),
        }
    }
}
