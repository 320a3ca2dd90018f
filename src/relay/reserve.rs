//! The next upstream socket, made before the client it is for is accepted.
//!
//! A connection takes two descriptors: the client's, made by accept, and the upstream's.
//! Made in that order, the second can fail at the open-file limit for a client already taken
//! from the listen queue, which could then only be refused. So each loop makes its next
//! upstream socket in advance, and a connection takes the one made for it and makes the
//! next. When that next one cannot be made, the loop takes no new clients (they wait in the
//! listen queue, where nothing is lost) until it can, at each accept back-off tick. No other
//! loop can take the descriptor a loop holds in reserve, and io_uring's accepts, which the
//! kernel runs whenever a descriptor is free, find none free that a connection still needs.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

pub struct Reserve {
    /// The next upstream socket of each address family in use: IPv4, IPv6.
    next: [Option<Socket>; 2],
    /// The families a connection has wanted (IPv4 from the start).
    in_use: [bool; 2],
}

fn family(addr: &SocketAddr) -> usize {
    usize::from(addr.is_ipv6())
}

fn new_socket(family: usize) -> io::Result<Socket> {
    let domain = [Domain::IPV4, Domain::IPV6][family];
    Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)
}

impl Reserve {
    pub fn new() -> io::Result<Reserve> {
        Ok(Reserve {
            next: [Some(new_socket(0)?), None],
            in_use: [true, false],
        })
    }

    /// Whether every family in use has its next socket (the loop may take new clients).
    pub fn held(&self) -> bool {
        (0..2).all(|f| !self.in_use[f] || self.next[f].is_some())
    }

    /// A socket for a connection to `addr`: the one made in advance, then the next made.
    pub fn socket(&mut self, addr: &SocketAddr) -> io::Result<Socket> {
        let f = family(addr);
        self.in_use[f] = true;
        let socket = match self.next[f].take() {
            Some(s) => s,
            None => new_socket(f)?,
        };
        self.next[f] = new_socket(f).ok();
        Ok(socket)
    }

    /// Makes the next socket of each family in use that lacks one; whether all are held.
    pub fn refill(&mut self) -> bool {
        for f in 0..2 {
            if self.in_use[f] && self.next[f].is_none() {
                self.next[f] = new_socket(f).ok();
            }
        }
        self.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_connection_takes_the_socket_made_before_it() {
        let v4: SocketAddr = "127.0.0.1:22".parse().unwrap();
        let v6: SocketAddr = "[::1]:22".parse().unwrap();
        let mut r = Reserve::new().unwrap();
        assert!(r.held());
        let made = r.next[0].as_ref().unwrap().as_raw_fd();
        let s = r.socket(&v4).unwrap();
        assert_eq!(s.as_raw_fd(), made, "the socket made in advance");
        assert!(r.next[0].is_some() && r.held(), "and the next one made");
        let s6 = r.socket(&v6).unwrap();
        assert_eq!(s6.domain().unwrap(), Domain::IPV6);
        assert!(
            r.next[1].is_some(),
            "IPv6 in use: its next socket is made too"
        );
        r.next[1] = None;
        assert!(!r.held(), "a family in use without its next socket");
        assert!(r.refill());
    }
}
