//! The byte layout of the hand-over state: little-endian integers, length-prefixed byte
//! strings, nothing implicit. A reader checks every length against what is left, so a
//! truncated or corrupt state is an error, never a panic or a huge allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("the state ends early ({what})")]
    Truncated { what: &'static str },
    #[error("bad {what}: {value}")]
    Bad { what: &'static str, value: u64 },
}

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub fn addr(&mut self, a: SocketAddr) {
        match a {
            SocketAddr::V4(a) => {
                self.u8(4);
                self.0.extend_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                self.u8(6);
                self.0.extend_from_slice(&a.ip().octets());
                self.u32(a.scope_id());
            }
        }
        self.u16(a.port());
    }
    /// A length-prefixed record written by `f`.
    pub fn record(&mut self, f: impl FnOnce(&mut Writer)) {
        let at = self.0.len();
        self.u32(0);
        f(self);
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated { what });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::Bad {
                what,
                value: v.into(),
            }),
        }
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    pub fn i32(&mut self, what: &'static str) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    pub fn str(&mut self, what: &'static str) -> Result<String, WireError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Bad {
            what,
            value: b.len() as u64,
        })
    }
    pub fn addr(&mut self, what: &'static str) -> Result<SocketAddr, WireError> {
        let ip = match self.u8(what)? {
            4 => {
                let o: [u8; 4] = self.take(4, what)?.try_into().unwrap();
                IpAddr::V4(Ipv4Addr::from(o))
            }
            6 => {
                let o: [u8; 16] = self.take(16, what)?.try_into().unwrap();
                let scope = self.u32(what)?;
                let port = self.u16(what)?;
                return Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(o),
                    port,
                    0,
                    scope,
                )));
            }
            v => {
                return Err(WireError::Bad {
                    what,
                    value: v.into(),
                })
            }
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }
    /// The next length-prefixed record, as a reader of its own.
    pub fn record(&mut self, what: &'static str) -> Result<Reader<'a>, WireError> {
        Ok(Reader(self.bytes(what)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_and_truncation_is_an_error() {
        let mut w = Writer::default();
        w.u8(7);
        w.bool(true);
        w.u64(u64::MAX - 1);
        w.str("C.1");
        w.addr("127.0.0.1:22".parse().unwrap());
        w.addr("[::1]:2222".parse().unwrap());
        w.record(|w| w.u32(9));
        w.i32(-3);
        let bytes = w.0;
        let mut r = Reader(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert!(r.bool("b").unwrap());
        assert_eq!(r.u64("c").unwrap(), u64::MAX - 1);
        assert_eq!(r.str("d").unwrap(), "C.1");
        assert_eq!(r.addr("e").unwrap(), "127.0.0.1:22".parse().unwrap());
        assert_eq!(r.addr("f").unwrap(), "[::1]:2222".parse().unwrap());
        assert_eq!(r.record("g").unwrap().u32("h").unwrap(), 9);
        assert_eq!(r.i32("i").unwrap(), -3);
        assert!(r.is_empty());
        for cut in 0..bytes.len() {
            let mut r = Reader(&bytes[..cut]);
            let all = (|| {
                r.u8("a")?;
                r.bool("b")?;
                r.u64("c")?;
                r.str("d")?;
                r.addr("e")?;
                r.addr("f")?;
                r.record("g")?.u32("h")?;
                r.i32("i")
            })();
            assert!(
                matches!(all, Err(WireError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let mut huge = Writer::default();
        huge.u32(u32::MAX);
        assert!(Reader(&huge.0).bytes("x").is_err());
    }
}
