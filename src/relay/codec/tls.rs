//! The TLS codec: the client end of a connection that came through a TLS entry. Its client side carries
//! TLS records, so neither direction can splice: client→upstream decrypts through rustls
//! into a buffer and sends it; upstream→client reads plaintext and encrypts it into rustls,
//! which writes records to the client. Same states, counting and half-close as the splice
//! path; a TLS `close_notify` (or a bare TCP FIN) from the client is its EOF.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use rustls::ServerConnection;

use crate::relay::connection::{
    deliver, end_of_stream, pass_eof, would_block, Direction, Failure, HalfState, Side, Turn,
    ROUNDS_PER_TURN,
};
use crate::relay::pipe::PipePool;
use crate::sys;
use crate::tls::FdIo;

/// Plaintext read from the upstream per record (the TLS maximum record payload).
const RECORD: usize = 16 * 1024;

/// client (TLS) → upstream (plain).
pub(super) fn decrypt(
    client: &mut Side,
    upstream: &mut Side,
    dir: &mut Direction,
    last: bool,
    tls: &mut ServerConnection,
    pool: &mut PipePool,
) -> Result<Turn, Failure> {
    for _ in 0..ROUNDS_PER_TURN {
        if deliver(upstream, dir, last, pool)? {
            return Ok(Turn::Wait);
        }
        let mut hold = pool.take_buffer();
        match hold.fill_with(|buf| tls.reader().read(buf)) {
            // close_notify: the client's clean EOF.
            Ok(0) => {
                pool.give_back(hold);
                end_of_stream(client, dir)?;
            }
            Ok(n) => {
                dir.in_flight = n;
                dir.hold = Some(hold);
            }
            // A TCP FIN without close_notify: an EOF all the same for SSH inside.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                pool.give_back(hold);
                end_of_stream(client, dir)?;
            }
            Err(e) if would_block(&e) => {
                pool.give_back(hold);
                if !client.readable {
                    return Ok(Turn::Wait);
                }
                match tls.read_tls(&mut FdIo(client.fd.as_raw_fd())) {
                    Ok(_) => {
                        if let Err(e) = tls.process_new_packets() {
                            // Send the alert rustls queued (best effort: the connection
                            // ends now, so it cannot wait for the socket to be writable).
                            let _ = tls.write_tls(&mut FdIo(client.fd.as_raw_fd()));
                            return Err(Failure::Read(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("TLS: {e}"),
                            )));
                        }
                    }
                    Err(e) if would_block(&e) => {
                        client.readable = false;
                        return Ok(Turn::Wait);
                    }
                    Err(e) => return Err(Failure::Read(e)),
                }
            }
            Err(e) => {
                pool.give_back(hold);
                return Err(Failure::Read(e));
            }
        }
    }
    Ok(Turn::Yield)
}

/// upstream (plain) → client (TLS).
pub(super) fn encrypt(
    upstream: &mut Side,
    client: &mut Side,
    dir: &mut Direction,
    last: bool,
    tls: &mut ServerConnection,
) -> Result<Turn, Failure> {
    let mut buf = [0u8; RECORD];
    for _ in 0..ROUNDS_PER_TURN {
        if dir.ended() {
            return Ok(Turn::Wait);
        }
        if !flush(tls, client)? {
            return Ok(Turn::Wait);
        }
        if dir.state == HalfState::Eof {
            pass_eof(client, dir, last);
            return Ok(Turn::Wait);
        }
        if !upstream.readable {
            return Ok(Turn::Wait);
        }
        match sys::recv(upstream.fd.as_raw_fd(), &mut buf) {
            Ok(0) => {
                end_of_stream(upstream, dir)?;
                tls.send_close_notify();
            }
            Ok(n) => {
                // rustls's send buffer is empty here (flushed above), so it takes it all.
                tls.writer().write_all(&buf[..n]).map_err(Failure::Write)?;
                dir.bytes += n as u64;
            }
            Err(e) if would_block(&e) => {
                upstream.readable = false;
                return Ok(Turn::Wait);
            }
            Err(e) => return Err(Failure::Read(e)),
        }
    }
    Ok(Turn::Yield)
}

/// Writes what the TLS session has queued (records, alerts) to the client. `false`: the
/// client is not writable now.
pub(super) fn flush(tls: &mut ServerConnection, client: &mut Side) -> Result<bool, Failure> {
    while tls.wants_write() {
        if !client.writable {
            return Ok(false);
        }
        match tls.write_tls(&mut FdIo(client.fd.as_raw_fd())) {
            Ok(_) => {}
            Err(e) if would_block(&e) => {
                client.writable = false;
                return Ok(false);
            }
            Err(e) => return Err(Failure::Write(e)),
        }
    }
    Ok(true)
}
