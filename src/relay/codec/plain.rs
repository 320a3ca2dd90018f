//! The plain client end: bytes pass as they are, so both directions splice once they
//! stream (and copy through a buffer while they carry small messages or the pipe pool is
//! dry).

use std::os::fd::AsRawFd;

use crate::relay::connection::{
    deliver, end_of_stream, would_block, Direction, Failure, Side, Turn, ROUNDS_PER_TURN,
    STREAMING_READ,
};
use crate::relay::pipe::{Hold, PipePool};

/// The data path of one direction: drain what is held into `dst`, pass on EOF, refill from
/// `src`; repeat until a socket blocks or the turn is used up. A hold is filled only when
/// empty, so `EAGAIN` on a read always means "socket empty", never "pipe full".
pub(crate) fn move_bytes(
    src: &mut Side,
    dst: &mut Side,
    dir: &mut Direction,
    last: bool,
    pool: &mut PipePool,
) -> Result<Turn, Failure> {
    for _ in 0..ROUNDS_PER_TURN {
        if deliver(dst, dir, last, pool)? {
            return Ok(Turn::Wait);
        }
        if !src.readable {
            return Ok(Turn::Wait);
        }
        if !refill(src, dir, pool)? {
            return Ok(Turn::Wait);
        }
    }
    Ok(if dir.ended() { Turn::Wait } else { Turn::Yield })
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
