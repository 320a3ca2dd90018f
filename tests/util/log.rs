//! The relay's `--log-format json` lines: one JSON object a line, event fields at top level.
//!
//! The tests have no serde_json, so this is a small, strict JSON parser (RFC 8259 values,
//! nesting capped) plus accessors for the few fields the tests read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A parsed JSON value. Numbers keep their text so that integers stay exact.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON value; surrounding whitespace is allowed, anything else is not.
    pub fn parse(text: &str) -> Option<Json> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let value = p.value(0)?;
        p.ws();
        (p.i == p.s.len()).then_some(value)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer number (not a string holding one).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

const MAX_DEPTH: usize = 32;

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'n' => self.eat(b"null").then_some(Json::Null),
            b't' => self.eat(b"true").then_some(Json::Bool(true)),
            b'f' => self.eat(b"false").then_some(Json::Bool(false)),
            b'"' => self.string().map(Json::Str),
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]") {
                    return Some(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b"]") {
                        return Some(Json::Arr(items));
                    }
                    if !self.eat(b",") {
                        return None;
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.eat(b"}") {
                    return Some(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return None;
                    }
                    let key = self.string()?;
                    self.ws();
                    if !self.eat(b":") {
                        return None;
                    }
                    fields.push((key, self.value(depth + 1)?));
                    self.ws();
                    if self.eat(b"}") {
                        return Some(Json::Obj(fields));
                    }
                    if !self.eat(b",") {
                        return None;
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                text.parse::<f64>().ok()?;
                Some(Json::Num(text.to_string()))
            }
            _ => None,
        }
    }

    /// At an opening quote: the decoded string.
    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let b = *self.s.get(self.i)?;
            self.i += 1;
            match b {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            if (0xD800..0xDC00).contains(&hi) {
                                if !self.eat(b"\\u") {
                                    return None;
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return None;
                                }
                                char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                            } else {
                                char::from_u32(hi)?
                            }
                        }
                        _ => return None,
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return None,
                _ => out.push(b),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.s.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    }
}

/// One line the relay wrote on stderr, and its JSON object when it is one.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub raw: String,
    pub json: Option<Json>,
}

impl LogLine {
    pub fn new(raw: impl Into<String>) -> LogLine {
        let raw = raw.into();
        let json = Json::parse(&raw).filter(|j| matches!(j, Json::Obj(_)));
        LogLine { raw, json }
    }

    /// A top-level field. Fields nested in `span`/`fields` objects do not count: the
    /// contract flattens them.
    pub fn get(&self, key: &str) -> Option<&Json> {
        self.json.as_ref()?.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// The `message` field, or `""`.
    pub fn msg(&self) -> &str {
        self.str("message").unwrap_or("")
    }

    /// Whether this is a `connection closed` line for host port `port`.
    pub fn is_closed_on(&self, port: u16) -> bool {
        self.msg() == "connection closed" && self.u64("port") == Some(port.into())
    }

    /// Whether this is a `connection rejected` line for host port `port`.
    pub fn is_rejected_on(&self, port: u16) -> bool {
        self.msg() == "connection rejected" && self.u64("port") == Some(port.into())
    }

    /// The `reason` field, or `""`.
    pub fn reason(&self) -> &str {
        self.str("reason").unwrap_or("")
    }

    /// A numeric field that the contract requires; panics naming the line otherwise.
    pub fn num(&self, key: &str) -> u64 {
        self.u64(key)
            .unwrap_or_else(|| panic!("log line has no numeric field {key:?}: {}", self.raw))
    }

    /// Checks every field the contract gives a `connection closed` line: from `client`
    /// (the real client's address), arrived `via`, on host port `port` of mapping `map`,
    /// to `upstream`. The one such check of the suite.
    pub fn assert_closed(
        &self,
        client: IpAddr,
        via: &str,
        port: u16,
        map: &str,
        upstream: SocketAddr,
    ) {
        assert_eq!(self.msg(), "connection closed", "{self}");
        let addr: SocketAddr = self
            .text("client")
            .parse()
            .unwrap_or_else(|e| panic!("client is not IP:PORT ({e}): {self}"));
        assert_eq!(addr.ip(), client, "client: {self}");
        assert_eq!(self.text("via"), via, "via: {self}");
        assert_eq!(self.num("port"), u64::from(port), "port: {self}");
        assert_eq!(self.text("map"), map, "map: {self}");
        assert_eq!(
            self.text("upstream"),
            upstream.to_string(),
            "upstream: {self}"
        );
        self.num("bytes_client_to_upstream");
        self.num("bytes_upstream_to_client");
        assert!(
            self.get("duration_ms").and_then(Json::as_f64).is_some(),
            "duration_ms must be a number: {self}"
        );
        assert!(!self.reason().is_empty(), "reason: {self}");
    }

    /// [`LogLine::assert_closed`] for a direct connection from 127.0.0.1.
    pub fn assert_closed_fields(&self, port: u16, map: &str, upstream: SocketAddr) {
        self.assert_closed(Ipv4Addr::LOCALHOST.into(), "direct", port, map, upstream);
    }

    /// A string field that the contract requires; panics naming the line otherwise.
    pub fn text(&self, key: &str) -> &str {
        self.str(key)
            .unwrap_or_else(|| panic!("log line has no string field {key:?}: {}", self.raw))
    }
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
