//! Where log lines go: stderr, one write per line, except on an event loop's thread, where
//! the lines of one turn of the loop are written together when the turn ends (one write
//! instead of one per closed connection). A line is never lost: a batch is written when the
//! loop is about to wait, when it grows past [`BATCH_MAX`], and when the loop's thread ends,
//! by returning or by unwinding from a panic.

use std::cell::RefCell;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes a batch may hold before it is written out at once.
pub const BATCH_MAX: usize = 64 * 1024;

thread_local! {
    /// This thread's batch, if it batches (an event loop's thread).
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// The `tracing` writer: one [`Line`] per event.
pub struct Writer;

impl<'a> MakeWriter<'a> for Writer {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One event's text, handed on whole when the event is written.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.0);
        let rest = BATCH.with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return Some(line);
            };
            let Some(batch) = b.as_mut() else {
                return Some(line);
            };
            batch.extend_from_slice(&line);
            if batch.len() >= BATCH_MAX {
                write_out(batch);
            }
            None
        });
        if let Some(line) = rest {
            let _ = io::stderr().lock().write_all(&line);
        }
    }
}

fn write_out(batch: &mut Vec<u8>) {
    if !batch.is_empty() {
        let _ = io::stderr().lock().write_all(batch);
        batch.clear();
    }
}

/// Makes this thread batch its lines until the guard is dropped (which writes what is left).
pub fn batch_here() -> Batch {
    BATCH.with(|b| *b.borrow_mut() = Some(Vec::new()));
    Batch(())
}

/// Writes out this thread's batch, if it has one with lines in it.
pub fn flush() {
    BATCH.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(batch) = b.as_mut() {
                write_out(batch);
            }
        }
    });
}

/// See [`batch_here`].
pub struct Batch(());

impl Drop for Batch {
    fn drop(&mut self) {
        flush();
        BATCH.with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                *b = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batched() -> Vec<u8> {
        BATCH.with(|b| b.borrow().clone().unwrap_or_default())
    }

    #[test]
    fn a_batching_thread_keeps_whole_lines_until_flushed() {
        std::thread::spawn(|| {
            let guard = batch_here();
            let mut line = Writer.make_writer();
            line.write_all(b"first ").unwrap();
            line.write_all(b"half\n").unwrap();
            assert_eq!(batched(), b"", "nothing before the line is complete");
            drop(line);
            assert_eq!(batched(), b"first half\n");
            let mut big = Writer.make_writer();
            big.write_all(&vec![b'x'; BATCH_MAX]).unwrap();
            drop(big);
            assert_eq!(batched(), b"", "a batch past BATCH_MAX is written at once");
            drop(guard);
            assert!(
                BATCH.with(|b| b.borrow().is_none()),
                "not batching after the guard"
            );
        })
        .join()
        .unwrap();
    }
}
