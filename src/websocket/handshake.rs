//! The opening handshake (RFC 6455 §4.2): the client's upgrade request, parsed with
//! `httparse` under a hard cap; the answers; and the path template that routes a request
//! to a mapping.
//!
//! Call [`parse_request`] on the bytes read so far. It answers one of three things:
//!
//! - [`Parsed::Incomplete`]: no whole request head yet: read more. This answer never comes
//!   for [`MAX_HEAD_LEN`] bytes or more, so a reader that buffers at most that much always
//!   gets a verdict.
//! - [`Parsed::Complete`]: a valid upgrade request. `buf[head_len..]` already belongs to the
//!   WebSocket stream (the RFC says a client waits for the 101; some do not).
//! - [`HandshakeError`]: answer [`HandshakeError::response`] and close the connection.
//!
//! As with the PROXY parser, the verdict does not depend on how the bytes were split into
//! reads: on any prefix of a buffer `parse_request` answers `Incomplete` or the same as on
//! the whole.
//!
//! The checks, in this order (§4.2.1): a well-formed HTTP/1.1 head, the method `GET`, a
//! `Host`, `Upgrade: websocket`, `Connection` listing `Upgrade`, a `Sec-WebSocket-Key` that
//! is 16 bytes in base64, `Sec-WebSocket-Version: 13` (another version gets 426 and the
//! version we speak). `Sec-WebSocket-Extensions` is ignored, so permessage-deflate is never
//! accepted; an offered `Sec-WebSocket-Protocol` is ignored too, and the 101 names none.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};
use std::fmt;

/// The cap on a request head, the request line and the blank line included.
pub const MAX_HEAD_LEN: usize = 8 * 1024;

/// The cap on header fields; more get 431 like a long head.
pub const MAX_HEADERS: usize = 64;

/// What §1.3 appends to the key before hashing it.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The answer of [`parse_request`] when the bytes so far are not invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// No whole request head yet: read more.
    Incomplete,
    /// A valid upgrade request.
    Complete(Request<'a>),
}

/// A valid upgrade request, borrowing from the buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request target as sent, query string included: see [`route`].
    pub path: &'a str,
    /// The `Host` header, port included if the client sent one.
    pub host: &'a str,
    /// The credential of `Authorization: Bearer <token>` or `Authorization: token <token>`
    /// (the scheme in any case); `None` without that header or with another scheme.
    pub token: Option<&'a str>,
    /// The `Sec-WebSocket-Accept` value for [`response_101`].
    pub accept: String,
    /// The length of the head; the bytes after it belong to the WebSocket stream.
    pub head_len: usize,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("path", &self.path)
            .field("host", &self.host)
            .field("token", &self.token.map(|_| "***"))
            .field("accept", &self.accept)
            .field("head_len", &self.head_len)
            .finish()
    }
}

/// Why a request is not a valid upgrade request. [`status`](HandshakeError::status) is the
/// HTTP status of the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// `httparse` rejects the head (the text is its own).
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
    /// No end of the head within [`MAX_HEAD_LEN`] bytes (431).
    #[error("HTTP request head longer than 8192 bytes")]
    HeadTooLong,
    /// More than [`MAX_HEADERS`] header fields (431).
    #[error("HTTP request with more than 64 header fields")]
    TooManyHeaders,
    /// HTTP/1.0: the handshake needs 1.1.
    #[error("HTTP/1.0 request, a WebSocket upgrade needs HTTP/1.1")]
    Http10,
    /// Not `GET`. Holds the method, cut to 32 bytes.
    #[error("HTTP method {0:?}, a WebSocket upgrade is a GET")]
    Method(String),
    #[error("no Host header")]
    MissingHost,
    /// A header that must appear once appears more than once.
    #[error("more than one {0} header")]
    Duplicate(&'static str),
    /// A header this parser reads is not UTF-8.
    #[error("{0} header is not UTF-8")]
    NotUtf8(&'static str),
    /// No `Upgrade` header listing `websocket`: a plain HTTP request.
    #[error("not a WebSocket upgrade: no \"Upgrade: websocket\" header")]
    NotUpgrade,
    #[error("Connection header does not list \"Upgrade\"")]
    ConnectionNotUpgrade,
    #[error("no Sec-WebSocket-Key header")]
    MissingKey,
    /// Not base64, or not 16 bytes once decoded.
    #[error("Sec-WebSocket-Key is not 16 bytes in base64")]
    BadKey,
    #[error("no Sec-WebSocket-Version header")]
    MissingVersion,
    /// A version other than 13 (426). Holds it, cut to 32 bytes.
    #[error("Sec-WebSocket-Version {0:?}, only 13 is supported")]
    UnsupportedVersion(String),
}

impl HandshakeError {
    /// 431 for a head over the caps, 426 for another WebSocket version, else 400.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::HeadTooLong | HandshakeError::TooManyHeaders => 431,
            HandshakeError::UnsupportedVersion(_) => 426,
            _ => 400,
        }
    }

    /// The whole HTTP answer to send before closing: [`response_error`] of the status.
    pub fn response(&self) -> Vec<u8> {
        response_error(self.status(), &[])
    }
}

/// Parses an upgrade request at the start of `buf`: see the module docs.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<'_>, HandshakeError> {
    // Past the cap, only what lies within it counts: the verdict on a long buffer is the
    // one its first MAX_HEAD_LEN bytes get, whatever comes later.
    let head = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if head.len() == MAX_HEAD_LEN => {
            return Err(HandshakeError::HeadTooLong)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Incomplete),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    if req.version != Some(1) {
        return Err(HandshakeError::Http10);
    }
    let (method, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
    if method != "GET" {
        return Err(HandshakeError::Method(cut(method)));
    }
    let headers = req.headers;
    let host = single(headers, "Host")?.ok_or(HandshakeError::MissingHost)?;
    if !lists(headers, "Upgrade", "websocket")? {
        return Err(HandshakeError::NotUpgrade);
    }
    if !lists(headers, "Connection", "Upgrade")? {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    let key = single(headers, "Sec-WebSocket-Key")?.ok_or(HandshakeError::MissingKey)?;
    if !matches!(BASE64.decode(key), Ok(k) if k.len() == 16) {
        return Err(HandshakeError::BadKey);
    }
    match single(headers, "Sec-WebSocket-Version")? {
        None => return Err(HandshakeError::MissingVersion),
        Some("13") => {}
        Some(other) => return Err(HandshakeError::UnsupportedVersion(cut(other))),
    }
    let token = single(headers, "Authorization")?.and_then(bearer_token);
    Ok(Parsed::Complete(Request {
        path,
        host,
        token,
        accept: accept_key(key),
        head_len,
    }))
}

/// The value of the header `name` (trimmed), if it appears; an error if it appears twice.
fn single<'a>(
    headers: &[httparse::Header<'a>],
    name: &'static str,
) -> Result<Option<&'a str>, HandshakeError> {
    let mut found = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        if found.is_some() {
            return Err(HandshakeError::Duplicate(name));
        }
        let value = std::str::from_utf8(h.value).map_err(|_| HandshakeError::NotUtf8(name))?;
        found = Some(value.trim());
    }
    Ok(found)
}

/// Whether the comma lists of every `name` header hold `token`, in any case.
fn lists(
    headers: &[httparse::Header<'_>],
    name: &'static str,
    token: &str,
) -> Result<bool, HandshakeError> {
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        let value = std::str::from_utf8(h.value).map_err(|_| HandshakeError::NotUtf8(name))?;
        if value
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The credential of `Bearer <token>` or `token <token>`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token");
    (known && !token.is_empty()).then_some(token)
}

/// At most 32 bytes of `s`, for an error message.
fn cut(s: &str) -> String {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)) (§4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// The 101 answer that completes the handshake; `accept` is [`Request::accept`].
pub fn response_101(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// An error answer with `Connection: close` and the reason phrase as a short text body.
/// The headers a status needs are added: `Sec-WebSocket-Version: 13` to 426,
/// `WWW-Authenticate: Bearer` to 401. `extra_headers` follow them (e.g. `Retry-After`);
/// names and values must not hold CR or LF.
///
/// Meant for 400 (bad request), 401 (missing or wrong token), 403 (`allow` refuses the
/// client), 404 (no such mapping), 426, 429, 431 and 503 (instance down).
pub fn response_error(status: u16, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        reason.len() + 1
    );
    let needed: &[(&str, &str)] = match status {
        426 => &[("Sec-WebSocket-Version", "13")],
        401 => &[("WWW-Authenticate", "Bearer")],
        _ => &[],
    };
    for (name, value) in needed.iter().chain(extra_headers) {
        debug_assert!(!format!("{name}{value}").contains(['\r', '\n']));
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("\r\n{reason}\n"));
    head.into_bytes()
}

/// Checks a path template for the config loader: it starts with `/` and holds `{name}`
/// exactly once, and no other `{` or `}`, no `?` or `#`, no whitespace or control
/// characters. The error is a sentence about the template.
pub fn validate_template(template: &str) -> Result<(), String> {
    if !template.starts_with('/') {
        return Err(format!(
            "path template {template:?} does not start with \"/\""
        ));
    }
    let count = template.matches("{name}").count();
    if count != 1 {
        return Err(format!(
            "path template {template:?} must hold {{name}} exactly once, found {count}"
        ));
    }
    let rest = template.replacen("{name}", "", 1);
    if let Some(c) = rest
        .chars()
        .find(|c| matches!(c, '{' | '}' | '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "path template {template:?} holds {c:?}, which a path template cannot hold"
        ));
    }
    Ok(())
}

/// The mapping name that `path` (a request target) gives in `template` (checked by
/// [`validate_template`]), if it matches: the part that stands for `{name}`, non-empty and
/// without `/`. The query string is ignored. The path may add or drop one trailing slash:
/// `/user/{name}/sshd/` matches `/user/alice/sshd`, and `/ssh/{name}` matches `/ssh/alice/`.
/// The name is not percent-decoded (mapping names need no escapes).
pub fn route<'p>(template: &str, path: &'p str) -> Option<&'p str> {
    let (prefix, suffix) = template.split_once("{name}")?;
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    let suffix = suffix.strip_suffix('/').unwrap_or(suffix);
    let name = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET /ssh/C-123456?x=1 HTTP/1.1\r\n\
        Host: relay.example:8080\r\n\
        Upgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
        Authorization: token s3cret\r\n\
        \r\n";

    fn request(buf: &[u8]) -> Request<'_> {
        match parse_request(buf) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_a_request_and_keeps_early_bytes() {
        let buf = [REQUEST.as_bytes(), b"\x82\x80early"].concat();
        let r = request(&buf);
        assert_eq!(r.path, "/ssh/C-123456?x=1");
        assert_eq!(r.host, "relay.example:8080");
        assert_eq!(r.token, Some("s3cret"));
        assert_eq!(r.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(r.head_len, REQUEST.len());
        assert_eq!(&buf[r.head_len..], b"\x82\x80early");
        assert!(!format!("{r:?}").contains("s3cret"), "{r:?}");
    }

    #[test]
    fn header_names_and_tokens_in_any_case() {
        let text = REQUEST
            .replace("Upgrade: websocket", "upgrade: WebSocket")
            .replace("Connection: keep-alive, Upgrade", "CONNECTION: upgrade")
            .replace("Authorization: token", "authorization: Bearer ");
        assert_eq!(request(text.as_bytes()).token, Some("s3cret"));
        // Connection split over two lines.
        let text = REQUEST.replace(
            "Connection: keep-alive, Upgrade\r\n",
            "Connection: keep-alive\r\nConnection: Upgrade\r\n",
        );
        request(text.as_bytes());
    }

    #[test]
    fn authorization_forms() {
        for (value, token) in [
            ("token abc", Some("abc")),
            ("Token abc", Some("abc")),
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic YWxhZGRpbjpvcGVu", None),
            ("Bearer", None),
            ("Bearer ", None),
        ] {
            let text = REQUEST.replace("token s3cret", value);
            assert_eq!(request(text.as_bytes()).token, token, "{value:?}");
        }
        let text = REQUEST.replace("Authorization: token s3cret\r\n", "");
        assert_eq!(request(text.as_bytes()).token, None);
    }

    #[test]
    fn prefixes_are_incomplete() {
        for n in 0..REQUEST.len() {
            assert_eq!(
                parse_request(&REQUEST.as_bytes()[..n]),
                Ok(Parsed::Incomplete),
                "{n}"
            );
        }
    }

    #[test]
    fn the_head_cap() {
        // A head of exactly MAX_HEAD_LEN bytes is fine; one more byte is 431.
        let filler = |n: usize| format!("X-Pad: {}\r\n", "a".repeat(n));
        let base = REQUEST.len() + filler(0).len();
        let exact = REQUEST.replacen(
            "\r\n\r\n",
            &format!("\r\n{}\r\n", filler(MAX_HEAD_LEN - base)),
            1,
        );
        assert_eq!(exact.len(), MAX_HEAD_LEN);
        assert_eq!(request(exact.as_bytes()).head_len, MAX_HEAD_LEN);
        let over = exact.replacen("X-Pad: ", "X-Pad: a", 1);
        assert_eq!(
            parse_request(over.as_bytes()),
            Err(HandshakeError::HeadTooLong)
        );
        assert_eq!(
            parse_request(&over.as_bytes()[..MAX_HEAD_LEN - 1]),
            Ok(Parsed::Incomplete)
        );
        assert_eq!(HandshakeError::HeadTooLong.status(), 431);
        let many = REQUEST.replacen("\r\n\r\n", &format!("\r\n{}\r\n", "A: b\r\n".repeat(60)), 1);
        assert_eq!(
            parse_request(many.as_bytes()),
            Err(HandshakeError::TooManyHeaders)
        );
    }

    /// Every way a request can fail, with its exact message and status.
    #[test]
    fn each_error_exact_message() {
        let r = |from: &str, to: &str| REQUEST.replacen(from, to, 1);
        let cases: &[(&str, String, u16, &str)] = &[
            (
                "garbage",
                "\x16\x03\x01\x02\x00\r\n\r\n".into(),
                400,
                "malformed HTTP request: invalid token",
            ),
            (
                "http/1.0",
                r("HTTP/1.1", "HTTP/1.0"),
                400,
                "HTTP/1.0 request, a WebSocket upgrade needs HTTP/1.1",
            ),
            (
                "post",
                r("GET", "POST"),
                400,
                "HTTP method \"POST\", a WebSocket upgrade is a GET",
            ),
            (
                "no host",
                r("Host: relay.example:8080\r\n", ""),
                400,
                "no Host header",
            ),
            (
                "two hosts",
                r("Host:", "Host: a\r\nHost:"),
                400,
                "more than one Host header",
            ),
            (
                "no upgrade",
                r("Upgrade: websocket\r\n", ""),
                400,
                "not a WebSocket upgrade: no \"Upgrade: websocket\" header",
            ),
            (
                "upgrade h2c",
                r("Upgrade: websocket", "Upgrade: h2c"),
                400,
                "not a WebSocket upgrade: no \"Upgrade: websocket\" header",
            ),
            (
                "connection",
                r("keep-alive, Upgrade", "keep-alive"),
                400,
                "Connection header does not list \"Upgrade\"",
            ),
            (
                "no key",
                r("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
                "no Sec-WebSocket-Key header",
            ),
            (
                "short key",
                r("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="),
                400,
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ),
            (
                "key not base64",
                r("dGhlIHNhbXBsZSBub25jZQ==", "not base64 at all!!!!!!"),
                400,
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ),
            (
                "no version",
                r("Sec-WebSocket-Version: 13\r\n", ""),
                400,
                "no Sec-WebSocket-Version header",
            ),
            (
                "version 8",
                r("Version: 13", "Version: 8"),
                426,
                "Sec-WebSocket-Version \"8\", only 13 is supported",
            ),
        ];
        let mut failures = Vec::new();
        for (what, text, status, message) in cases {
            match parse_request(text.as_bytes()) {
                Err(e) if e.to_string() == *message && e.status() == *status => {}
                other => failures.push(format!(
                    "{what}: expected {status} {message:?}, got {other:?}"
                )),
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn header_not_utf8() {
        let mut buf = REQUEST.as_bytes().to_vec();
        buf[REQUEST.find("relay.example").unwrap()] = 0xff;
        let e = parse_request(&buf).unwrap_err();
        assert_eq!(
            (e.status(), e.to_string()),
            (400, "Host header is not UTF-8".into())
        );
    }

    #[test]
    fn responses() {
        assert_eq!(
            String::from_utf8(response_101("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8(response_error(404, &[])).unwrap(),
            "HTTP/1.1 404 Not Found\r\nConnection: close\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 10\r\n\r\nNot Found\n"
        );
        let e = HandshakeError::UnsupportedVersion("8".into());
        let text = String::from_utf8(e.response()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
        let text = String::from_utf8(response_error(401, &[])).unwrap();
        assert!(text.contains("\r\nWWW-Authenticate: Bearer\r\n"), "{text}");
        let text = String::from_utf8(response_error(503, &[("Retry-After", "5")])).unwrap();
        assert!(
            text.contains("\r\nRetry-After: 5\r\n\r\nService Unavailable\n"),
            "{text}"
        );
        for status in [400, 401, 403, 404, 426, 429, 431, 503] {
            let bytes = response_error(status, &[]);
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            let len = resp.parse(&bytes).unwrap().unwrap();
            assert_eq!(resp.code, Some(status));
            let body_len: usize = resp
                .headers
                .iter()
                .find(|h| h.name == "Content-Length")
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap();
            assert_eq!(bytes.len() - len, body_len, "{status}");
        }
    }

    #[test]
    fn routes() {
        for (template, path, name) in [
            ("/ssh/{name}", "/ssh/C-123456", Some("C-123456")),
            ("/ssh/{name}", "/ssh/C.123456?token=x", Some("C.123456")),
            ("/ssh/{name}", "/ssh/alice/", Some("alice")),
            ("/ssh/{name}", "/ssh/", None),
            ("/ssh/{name}", "/ssh", None),
            ("/ssh/{name}", "/ssh//", None),
            ("/ssh/{name}", "/ssh/a/b", None),
            ("/ssh/{name}", "/ssh/alice//", None),
            ("/ssh/{name}", "/other/alice", None),
            ("/user/{name}/sshd/", "/user/alice/sshd/", Some("alice")),
            ("/user/{name}/sshd/", "/user/alice/sshd", Some("alice")),
            ("/user/{name}/sshd/", "/user/alice/sshd/?x", Some("alice")),
            ("/user/{name}/sshd/", "/user/alice/sshd/x", None),
            ("/user/{name}/sshd/", "/user//sshd/", None),
            ("/user/{name}/sshd/", "/user/a/b/sshd/", None),
            ("/{name}", "/alice", Some("alice")),
            ("/{name}", "/", None),
            ("/c-{name}", "/c-1", Some("1")),
        ] {
            assert_eq!(validate_template(template), Ok(()), "{template}");
            assert_eq!(route(template, path), name, "{template} {path}");
        }
    }

    #[test]
    fn template_errors() {
        for (template, message) in [
            (
                "ssh/{name}",
                r#"path template "ssh/{name}" does not start with "/""#,
            ),
            (
                "/ssh/",
                r#"path template "/ssh/" must hold {name} exactly once, found 0"#,
            ),
            (
                "/{name}/{name}",
                r#"path template "/{name}/{name}" must hold {name} exactly once, found 2"#,
            ),
            (
                "/{name}?x",
                r#"path template "/{name}?x" holds '?', which a path template cannot hold"#,
            ),
            (
                "/{user}/{name}",
                r#"path template "/{user}/{name}" holds '{', which a path template cannot hold"#,
            ),
            (
                "/a b/{name}",
                r#"path template "/a b/{name}" holds ' ', which a path template cannot hold"#,
            ),
        ] {
            assert_eq!(
                validate_template(template),
                Err(message.to_string()),
                "{template}"
            );
        }
    }
}
