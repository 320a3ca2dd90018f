//! What a direction holds while bytes are in flight: a pipe (spliced, zero-copy) or, when
//! the loop's pipe pool is dry, a buffer (recv/send). Both are lent by a per-loop pool and
//! given back empty; a pipe that still holds bytes when its connection dies is closed,
//! never pooled, so one tenant's bytes can never reach another's connection.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Size of a copy-path buffer.
const BUFFER_SIZE: usize = 64 * 1024;
/// Empty buffers a loop keeps for reuse; more are freed.
const IDLE_BUFFERS: usize = 64;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe of `size` bytes if the kernel allows, else of its default size.
    fn new(size: u32) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        if let Err(e) = sys::set_pipe_capacity(&write, size) {
            tracing::debug!(error = %e, size, "pipe size refused; keeping the default");
        }
        let capacity = sys::pipe_capacity(&write)?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

pub struct Buffer {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A direction's in-flight bytes live in exactly one of these.
pub enum Hold {
    Pipe(Pipe),
    Buffer(Buffer),
}

impl Hold {
    /// How many bytes the hold takes when empty.
    pub fn capacity(&self) -> usize {
        match self {
            Hold::Pipe(p) => p.capacity,
            Hold::Buffer(b) => b.data.len(),
        }
    }

    /// Moves bytes from socket `src` into the hold. Only called when the hold is empty, so
    /// `EAGAIN` means the socket is empty, never that the pipe is full.
    pub fn fill_from(&mut self, src: RawFd) -> io::Result<usize> {
        match self {
            Hold::Pipe(p) => sys::splice(src, p.write.as_raw_fd(), p.capacity),
            Hold::Buffer(b) => {
                b.start = 0;
                let n = sys::recv(src, &mut b.data)?;
                b.end = n;
                Ok(n)
            }
        }
    }

    /// Fills an empty buffer hold from `read` (e.g. a TLS session's plaintext).
    pub fn fill_with(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        match self {
            Hold::Pipe(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a pipe holds spliced bytes",
            )),
            Hold::Buffer(b) => {
                b.start = 0;
                let n = read(&mut b.data)?;
                b.end = n;
                Ok(n)
            }
        }
    }

    /// Moves up to `len` held bytes into socket `dst`.
    pub fn drain_to(&mut self, dst: RawFd, len: usize) -> io::Result<usize> {
        match self {
            Hold::Pipe(p) => sys::splice(p.read.as_raw_fd(), dst, len),
            Hold::Buffer(b) => {
                let n = sys::send(dst, &b.data[b.start..b.end])?;
                b.start += n;
                Ok(n)
            }
        }
    }
}

/// Per-loop pool of pipes (bounded) and buffers.
pub struct PipePool {
    idle: Vec<Pipe>,
    buffers: Vec<Buffer>,
    /// Pipes lent out and not yet returned or discarded.
    in_use: usize,
    /// Pipes this loop may hold at once, idle or in use.
    max: usize,
    /// Capacity asked of each new pipe.
    size: u32,
}

impl PipePool {
    pub fn new(max: usize, size: u32) -> PipePool {
        PipePool {
            idle: Vec::new(),
            buffers: Vec::new(),
            in_use: 0,
            max,
            size,
        }
    }

    /// A pipe if the pool allows one, else a buffer. Never fails: the copy path is the floor.
    pub fn take(&mut self) -> Hold {
        if let Some(p) = self.idle.pop() {
            self.in_use += 1;
            return Hold::Pipe(p);
        }
        if self.in_use < self.max {
            match Pipe::new(self.size) {
                Ok(p) => {
                    self.in_use += 1;
                    return Hold::Pipe(p);
                }
                Err(e) => tracing::debug!(error = %e, "pipe creation failed; copying instead"),
            }
        }
        self.take_buffer()
    }

    /// A buffer, for bytes that cannot be spliced (they pass through user space).
    pub fn take_buffer(&mut self) -> Hold {
        Hold::Buffer(self.buffers.pop().unwrap_or_else(|| Buffer {
            data: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
        }))
    }

    /// Returns an empty hold.
    pub fn give_back(&mut self, hold: Hold) {
        match hold {
            Hold::Pipe(p) => {
                self.in_use -= 1;
                self.idle.push(p);
            }
            Hold::Buffer(b) => {
                if self.buffers.len() < IDLE_BUFFERS {
                    self.buffers.push(b);
                }
            }
        }
    }

    /// Drops a hold that may still contain bytes: a pipe is closed, not pooled.
    pub fn discard(&mut self, hold: Hold) {
        if let Hold::Pipe(_) = hold {
            self.in_use -= 1;
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}

/// Held bytes across an upgrade: a pipe goes over as its two descriptors (its bytes stay in
/// the kernel), a buffer's bytes are copied into the state.
impl Hold {
    pub fn save(&self, in_flight: usize) -> crate::upgrade::state::HeldBytes {
        use crate::upgrade::state::HeldBytes;
        match self {
            Hold::Pipe(p) => HeldBytes::Pipe {
                read: p.read.as_raw_fd(),
                write: p.write.as_raw_fd(),
                in_flight: in_flight as u64,
            },
            Hold::Buffer(b) => HeldBytes::Buffer(b.data[b.start..b.end].to_vec()),
        }
    }
}

impl PipePool {
    /// An inherited pipe holding `in_flight` bytes, counted as lent out. The kernel's count
    /// must agree with the record's.
    pub fn adopt_pipe(
        &mut self,
        read: OwnedFd,
        write: OwnedFd,
        in_flight: usize,
    ) -> io::Result<Hold> {
        let capacity = sys::pipe_capacity(&write)?;
        let queued = sys::fionread(read.as_raw_fd())?;
        if queued != in_flight {
            return Err(io::Error::other(format!(
                "an inherited pipe holds {queued} bytes, its record says {in_flight}"
            )));
        }
        self.in_use += 1;
        Ok(Hold::Pipe(Pipe {
            read,
            write,
            capacity,
        }))
    }

    /// A buffer holding `bytes` (at most a buffer's size).
    pub fn adopt_bytes(&mut self, bytes: &[u8]) -> io::Result<Hold> {
        if bytes.len() > BUFFER_SIZE {
            return Err(io::Error::other("held bytes longer than a buffer"));
        }
        let Hold::Buffer(mut b) = self.take_buffer() else {
            unreachable!("take_buffer gives a buffer")
        };
        b.data[..bytes.len()].copy_from_slice(bytes);
        b.start = 0;
        b.end = bytes.len();
        Ok(Hold::Buffer(b))
    }
}
