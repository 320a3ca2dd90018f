//! The copy path's buffers: one block of memory per loop, cut into chunks of [`CHUNK_SIZE`].
//! A chunk is lent to one direction at a time (from its receive until its bytes are sent)
//! and comes back when it is dropped, on every path (sent, its connection gone, a stale
//! completion). With io_uring the idle chunks are the loop's provided-buffer ring: the
//! kernel picks one only when bytes arrive, so a waiting receive holds none. With epoll
//! they are a free list the backend takes from when it reads.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Bytes in one chunk. A receive that fills a whole chunk marks its direction as streaming
/// (splice takes over), like a full buffer on the readiness path.
pub const CHUNK_SIZE: usize = 16 * 1024;

/// Chunks per loop unless told otherwise: 2 MiB of memory, touched only as used.
pub const DEFAULT_CHUNKS: u16 = 128;

/// The chunks of one loop (cheap to clone: a handle on the same pool).
#[derive(Clone)]
pub struct Chunks(Rc<Pool>);

struct Pool {
    /// `count * CHUNK_SIZE` bytes; chunk `id` is at `id * CHUNK_SIZE`.
    base: *mut u8,
    count: u16,
    free: RefCell<Free>,
    in_use: Cell<usize>,
}

enum Free {
    /// epoll: the ids of the idle chunks.
    List(Vec<u16>),
    /// io_uring: the provided-buffer ring (registered by the backend), `count` entries; the
    /// kernel consumes from its head, idle chunks go back at `tail`.
    Ring {
        entries: *mut BufRingEntry,
        tail: u16,
    },
}

/// A chunk lent out: its bytes `start..end` are held (received, not yet sent).
pub struct Chunk {
    pool: Rc<Pool>,
    id: u16,
    start: u32,
    end: u32,
}

/// Memory the kernel may write (ring buffers) or that a ring points to: page-aligned,
/// zeroed, never unmapped (see `Drop for Pool`).
fn map(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping, no address hint: it aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl Chunks {
    /// `count` chunks on a free list (epoll).
    pub fn list(count: u16) -> std::io::Result<Chunks> {
        let base = map(count as usize * CHUNK_SIZE)?;
        Ok(Chunks(Rc::new(Pool {
            base,
            count,
            free: RefCell::new(Free::List((0..count).rev().collect())),
            in_use: Cell::new(0),
        })))
    }

    /// `count` chunks (a power of two) in a provided-buffer ring, every one of them idle.
    /// Returns the ring's address for `IORING_REGISTER_PBUF_RING`, which the caller
    /// registers with `count` entries; the ring stays valid for the life of the process.
    pub fn ring(count: u16) -> std::io::Result<(Chunks, u64)> {
        assert!(count.is_power_of_two(), "a buffer ring has 2^n entries");
        let base = map(count as usize * CHUNK_SIZE)?;
        let entries = map(count as usize * std::mem::size_of::<BufRingEntry>())?.cast();
        let pool = Pool {
            base,
            count,
            free: RefCell::new(Free::Ring { entries, tail: 0 }),
            in_use: Cell::new(0),
        };
        for id in 0..count {
            pool.give_back(id);
        }
        Ok((Chunks(Rc::new(pool)), entries as u64))
    }

    /// An idle chunk, empty (free list only; a ring's chunks are taken by the kernel).
    pub fn take(&self) -> Option<Chunk> {
        let id = match &mut *self.0.free.borrow_mut() {
            Free::List(ids) => ids.pop()?,
            Free::Ring { .. } => return None,
        };
        Some(self.lent(id, 0))
    }

    /// The chunk the kernel filled with `len` bytes (a ring buffer id from a completion).
    pub fn filled(&self, id: u16, len: usize) -> Option<Chunk> {
        (id < self.0.count && len <= CHUNK_SIZE).then(|| self.lent(id, len))
    }

    fn lent(&self, id: u16, len: usize) -> Chunk {
        self.0.in_use.set(self.0.in_use.get() + 1);
        Chunk {
            pool: self.0.clone(),
            id,
            start: 0,
            end: len as u32,
        }
    }

    pub fn in_use(&self) -> usize {
        self.0.in_use.get()
    }

    pub fn idle(&self) -> usize {
        self.0.count as usize - self.0.in_use.get()
    }
}

impl Pool {
    fn give_back(&self, id: u16) {
        match &mut *self.free.borrow_mut() {
            Free::List(ids) => ids.push(id),
            Free::Ring { entries, tail } => {
                let mask = self.count - 1;
                // SAFETY: `entries` has `count` entries and `tail & mask` is below it; the
                // kernel reads an entry only once the tail store below has published it.
                let e = unsafe { &mut *entries.add((*tail & mask) as usize) };
                e.set_addr(self.base as u64 + id as u64 * CHUNK_SIZE as u64);
                e.set_len(CHUNK_SIZE as u32);
                e.set_bid(id);
                *tail = tail.wrapping_add(1);
                // SAFETY: the ring's tail is the `resv` field of its first entry, a u16
                // the kernel reads with acquire ordering (`BufRingEntry::tail`).
                let t = unsafe { &*(BufRingEntry::tail(*entries).cast::<AtomicU16>()) };
                t.store(*tail, Ordering::Release);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A ring's memory is never unmapped: the kernel may hold it until its ring is torn
        // down, which happens after the loop ends. A free list's memory is only ours.
        if let Free::List(_) = *self.free.borrow() {
            // SAFETY: mapped by `map` with this length; no chunk is left (each holds the Rc).
            unsafe { libc::munmap(self.base.cast(), self.count as usize * CHUNK_SIZE) };
        }
    }
}

impl Chunk {
    /// The held bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: chunk `id`'s memory is lent to this chunk alone (the kernel writes a ring
        // buffer only while it is idle, and reads it for a send while the backend keeps
        // this chunk); `start..end` lies within it.
        unsafe {
            std::slice::from_raw_parts(
                self.pool
                    .base
                    .add(self.id as usize * CHUNK_SIZE + self.start as usize),
                (self.end - self.start) as usize,
            )
        }
    }

    /// The whole chunk to fill, emptied first (epoll's receive; `set_len` after).
    pub fn space(&mut self) -> &mut [u8] {
        self.start = 0;
        self.end = 0;
        // SAFETY: as in `bytes`; `&mut self` makes this the only view of the chunk.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.base.add(self.id as usize * CHUNK_SIZE),
                CHUNK_SIZE,
            )
        }
    }

    pub fn set_len(&mut self, n: usize) {
        self.start = 0;
        self.end = n.min(CHUNK_SIZE) as u32;
    }

    /// `n` held bytes went out.
    pub fn advance(&mut self, n: usize) {
        self.start = (self.start + n as u32).min(self.end);
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({}: {} bytes)", self.id, self.len())
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.in_use.set(self.pool.in_use.get() - 1);
        self.pool.give_back(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_comes_back_once_dropped() {
        let chunks = Chunks::list(2).unwrap();
        let mut a = chunks.take().unwrap();
        let b = chunks.take().unwrap();
        assert!(chunks.take().is_none(), "only two");
        assert_eq!((chunks.in_use(), chunks.idle()), (2, 0));
        a.space()[..3].copy_from_slice(b"abc");
        a.set_len(3);
        a.advance(1);
        assert_eq!(a.bytes(), b"bc");
        drop(a);
        drop(b);
        assert_eq!((chunks.in_use(), chunks.idle()), (0, 2));
    }

    #[test]
    fn a_ring_publishes_every_idle_chunk() {
        let (chunks, ring) = Chunks::ring(4).unwrap();
        // SAFETY: the ring has 4 entries; nothing else writes them in this test.
        let tail = unsafe { *BufRingEntry::tail(ring as *const BufRingEntry) };
        assert_eq!(tail, 4);
        let c = chunks.filled(3, 10).unwrap();
        assert_eq!((c.len(), chunks.in_use()), (10, 1));
        drop(c);
        // SAFETY: as above.
        let tail = unsafe { *BufRingEntry::tail(ring as *const BufRingEntry) };
        assert_eq!((tail, chunks.in_use()), (5, 0));
        assert!(chunks.filled(4, 1).is_none(), "no such chunk");
    }
}
