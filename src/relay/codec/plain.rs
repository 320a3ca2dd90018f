//! The plain client end: bytes pass as they are. A direction that carries small messages
//! (keystrokes, SFTP requests, the first bytes of every connection) goes through the
//! driver's copy path: a receive into a chunk, then a send of it (io_uring: ring
//! operations submitted with the loop's next wait, no syscall of their own). One that
//! streams (a receive filled a whole chunk) splices, zero-copy, until a short read sends
//! it back. The two never overlap: the splice path takes a direction only when the copy
//! path holds nothing of it and has nothing in the driver, and the other way round.

use std::io;
use std::os::fd::AsRawFd;

use crate::relay::backend::driver::{Driver, Received, Sent, CHUNK_SIZE};
use crate::relay::connection::{
    deliver, end_of_stream, pass_eof, would_block, Copier, Direction, Done, Failure, HalfState,
    Side, Turn, ROUNDS_PER_TURN, STREAMING_READ,
};
use crate::relay::pipe::{Hold, PipePool};

/// The data path of one direction: drain what is held into `dst`, pass on EOF, refill from
/// `src`; repeat until a socket blocks or the turn is used up. A hold is filled only when
/// empty, so `EAGAIN` on a read always means "socket empty", never "pipe full".
pub(crate) fn move_bytes<D: Driver>(
    src: &mut Side,
    dst: &mut Side,
    dir: &mut Direction,
    last: bool,
    pool: &mut PipePool,
    mut copier: Copier<'_, D>,
) -> Result<Turn, Failure> {
    for _ in 0..ROUNDS_PER_TURN {
        if dir.copying.active() {
            match copy(src, dst, dir, last, &mut copier)? {
                Some(turn) => return Ok(turn),
                None => continue,
            }
        }
        if deliver(dst, dir, last, pool)? {
            return Ok(Turn::Wait);
        }
        // Nothing held, still open: small messages go through the copy path.
        if !dir.streaming && !dir.copying.starved {
            match copy(src, dst, dir, last, &mut copier)? {
                Some(turn) => return Ok(turn),
                None => continue,
            }
        }
        if !src.readable || !refill(src, dir, pool)? {
            // Found empty: a quietly watched socket says when it has bytes only if asked.
            copier.io.want_read(copier.keys.0, src.fd.as_raw_fd());
            return Ok(Turn::Wait);
        }
        dir.copying.starved = false;
    }
    Ok(if dir.ended() { Turn::Wait } else { Turn::Yield })
}

/// The copy path of a direction: takes in its completion, sends what it holds, passes an
/// EOF on, receives again. `Some`: its turn is over; `None`: it streams now (or found no
/// chunk), and the splice path (or the loop's own read) goes on from here.
fn copy<D: Driver>(
    src: &mut Side,
    dst: &mut Side,
    dir: &mut Direction,
    last: bool,
    copier: &mut Copier<'_, D>,
) -> Result<Option<Turn>, Failure> {
    let (src_key, dst_key) = copier.keys;
    if let Some(done) = dir.copying.done.take() {
        if dir.ended() {
            // A late completion of an aborted direction: its bytes go nowhere.
            dir.copying = Default::default();
            return Ok(Some(Turn::Wait));
        }
        let more = match done {
            Done::Received(r) => received(src, dir, r)?,
            Done::Sent(s) => sent(dir, s)?,
        };
        if !more {
            return Ok(Some(Turn::Wait));
        }
    }
    for _ in 0..ROUNDS_PER_TURN {
        if dir.ended() {
            dir.copying.chunk = None;
            return Ok(Some(Turn::Wait));
        }
        let c = &mut dir.copying;
        if c.receiving || c.sending {
            return Ok(Some(Turn::Wait));
        }
        if let Some(chunk) = c.chunk.take() {
            if !chunk.is_empty() {
                match copier.io.send(dst_key, dst.fd.as_raw_fd(), chunk) {
                    None => dir.copying.sending = true,
                    Some(s) => {
                        if !sent(dir, s)? {
                            return Ok(Some(Turn::Wait));
                        }
                    }
                }
                continue;
            }
        }
        if dir.state == HalfState::Eof {
            // Everything before the EOF is delivered: pass the half-close on.
            pass_eof(dst, dir, last);
            return Ok(Some(Turn::Wait));
        }
        if dir.streaming || dir.copying.starved {
            return Ok(None);
        }
        match copier.io.receive(src_key, src.fd.as_raw_fd(), src.readable) {
            None => {
                dir.copying.receiving = true;
                src.readable = false;
            }
            Some(r) => {
                if !received(src, dir, r)? {
                    return Ok(Some(Turn::Wait));
                }
            }
        }
    }
    Ok(Some(Turn::Yield))
}

/// Takes in a receive's result. `false`: nothing more to do now (called back).
fn received(src: &mut Side, dir: &mut Direction, r: Received) -> Result<bool, Failure> {
    match r {
        Ok(Some(chunk)) => {
            if chunk.len() == CHUNK_SIZE {
                // A full chunk: more is likely waiting, and splice pays from here on.
                dir.streaming = true;
                src.readable = true;
            } else {
                // Stopped short: the socket is empty (unless a FIN waits behind).
                src.readable = src.hup;
            }
            dir.copying.chunk = Some(chunk);
            Ok(true)
        }
        Ok(None) => {
            end_of_stream(src, dir)?;
            Ok(true)
        }
        Err(e) => match e.raw_os_error() {
            // An upgrade's freeze called it back: its next turn receives again.
            Some(libc::ECANCELED) => Ok(false),
            // No idle chunk: this read is the loop's own (a buffer from the pool).
            Some(libc::ENOBUFS) => {
                dir.copying.starved = true;
                src.readable = true;
                Ok(true)
            }
            _ if would_block(&e) => {
                src.readable = false;
                Ok(false)
            }
            _ => Err(Failure::Read(e)),
        },
    }
}

/// Takes in a send's result: counts what went out, keeps the rest to send again.
/// `false`: nothing more to do now (called back).
fn sent(dir: &mut Direction, (chunk, result): Sent) -> Result<bool, Failure> {
    match result {
        Ok(n) => {
            dir.bytes += n as u64;
            if n == 0 && !chunk.is_empty() {
                return Err(Failure::Write(io::Error::from(io::ErrorKind::WriteZero)));
            }
            if !chunk.is_empty() {
                dir.copying.chunk = Some(chunk);
            }
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
            dir.copying.chunk = Some(chunk);
            Ok(false)
        }
        Err(e) => Err(Failure::Write(e)),
    }
}

/// Fills an empty direction from `src`: through a pipe once it streams, else through a
/// buffer (see `Direction::streaming`); a read of 0 is its end of stream. `false`: the
/// socket is empty.
pub(crate) fn refill(
    src: &mut Side,
    dir: &mut Direction,
    pool: &mut PipePool,
) -> Result<bool, Failure> {
    let mut hold = if dir.streaming {
        pool.take()
    } else {
        pool.take_buffer()
    };
    match hold.fill_from(src.fd.as_raw_fd()) {
        Ok(0) => {
            pool.give_back(hold);
            end_of_stream(src, dir)?;
        }
        Ok(n) => {
            match &hold {
                Hold::Buffer(_) if n == hold.capacity() => dir.streaming = true,
                // recv stopped short: the socket is empty (unless a FIN waits behind).
                Hold::Buffer(_) => src.readable = src.hup,
                Hold::Pipe(_) if n < STREAMING_READ => dir.streaming = false,
                Hold::Pipe(_) => {}
            }
            dir.in_flight = n;
            dir.hold = Some(hold);
        }
        Err(e) if would_block(&e) => {
            pool.give_back(hold);
            src.readable = false;
            return Ok(false);
        }
        Err(e) => {
            pool.give_back(hold);
            return Err(Failure::Read(e));
        }
    }
    Ok(true)
}
