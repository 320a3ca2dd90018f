//! The relay's `/metrics`, scraped over real TCP and parsed: one scraper and one parser
//! of the Prometheus text exposition for every test.
//!
//! A series that is not exposed is `None`, never 0: a test that wants "absent or zero"
//! says so at its call site.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use super::net::{read_to_end, LOCALHOST};
use super::poll;

/// One sample's identity: metric name and its labels (sorted), as exposed.
pub type Series = (String, BTreeMap<String, String>);

/// `GET /metrics` from 127.0.0.1:`port` over plain TCP: the body of a `200 OK` whose
/// content type is `text/plain`.
pub fn scrape(port: u16) -> String {
    let mut conn = TcpStream::connect((LOCALHOST, port))
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint :{port}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send the scrape request");
    let response = String::from_utf8(read_to_end(&mut conn)).expect("a UTF-8 exposition");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "status: {head}");
    assert!(
        head.lines().any(|l| l
            .to_ascii_lowercase()
            .starts_with("content-type: text/plain")),
        "content type of /metrics: {head}"
    );
    body.to_string()
}

fn bad(line: &str) -> ! {
    panic!("cannot read exposition line {line:?}")
}

/// The samples of a text exposition. Label values are read as quoted strings (with `\\`,
/// `\"` and `\n` escapes), so a `,`, `}` or `=` inside a value is part of it. Panics on a
/// line it cannot read, and on a series exposed twice.
pub fn parse_exposition(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad(line));
        let name = line[..name_end].to_string();
        if name.is_empty() {
            bad(line);
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut key = String::new();
            let end = loop {
                let Some((i, c)) = chars.next() else {
                    bad(line)
                };
                match c {
                    '}' if key.is_empty() => break i,
                    ',' | ' ' if key.is_empty() => {}
                    '=' => {
                        if chars.next().map(|(_, c)| c) != Some('"') {
                            bad(line);
                        }
                        let mut value = String::new();
                        loop {
                            match chars.next() {
                                Some((_, '"')) => break,
                                Some((_, '\\')) => match chars.next() {
                                    Some((_, 'n')) => value.push('\n'),
                                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                                    _ => bad(line),
                                },
                                Some((_, c)) => value.push(c),
                                None => bad(line),
                            }
                        }
                        let key = std::mem::take(&mut key);
                        if key.trim().is_empty() || labels.insert(key, value).is_some() {
                            bad(line);
                        }
                    }
                    c if c.is_ascii_alphanumeric() || c == '_' => key.push(c),
                    _ => bad(line),
                }
            };
            rest = &inner[end + 1..];
        }
        let mut fields = rest.split_whitespace();
        let value: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| bad(line));
        // An optional timestamp, then nothing.
        if fields.next().is_some_and(|t| t.parse::<i64>().is_err()) || fields.next().is_some() {
            bad(line);
        }
        if out.insert((name, labels), value).is_some() {
            panic!("series exposed twice: {line:?}");
        }
    }
    out
}

/// A scrape, parsed, with lookups by name and labels.
pub struct Scrape {
    pub samples: BTreeMap<Series, f64>,
    pub text: String,
}

impl Scrape {
    /// Scrapes 127.0.0.1:`port` now.
    pub fn take(port: u16) -> Scrape {
        Scrape::parse(scrape(port))
    }

    pub fn parse(text: String) -> Scrape {
        Scrape {
            samples: parse_exposition(&text),
            text,
        }
    }

    /// The value of the series `name{labels}` (exactly those labels), if exposed.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    /// Like [`Scrape::get`]; panics with the exposition when the series is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in the exposition:\n{}",
                self.text
            )
        })
    }

    /// The series of `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|((_, l), v)| (l, *v))
    }

    /// The value of the one series of `name` whose labels include `labels`: `None` when
    /// there is none; panics when several match.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self.matching(name, labels).map(|(_, v)| v).collect();
        assert!(
            found.len() <= 1,
            "{} series {name}{labels:?}, wanted one:\n{}",
            found.len(),
            self.text
        );
        found.first().copied()
    }

    /// The sum over every series of `name` whose labels include `labels` (0 when none
    /// does: a sum over nothing).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }
}

/// Scrapes 127.0.0.1:`port` until the one series of `name` whose labels include `labels`
/// reads `want` (for at most 10 s); panics with the last scrape otherwise.
pub fn wait_metric(port: u16, name: &str, labels: &[(&str, &str)], want: f64) -> Scrape {
    let mut last = None;
    let found = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let s = Scrape::take(port);
        let hit = s.find(name, labels) == Some(want);
        if hit {
            return Some(s);
        }
        last = Some(s);
        None
    });
    found.unwrap_or_else(|| {
        let last = last.expect("at least one scrape");
        panic!(
            "{name}{labels:?} is not {want}: {:?}\n{}",
            last.find(name, labels),
            last.text
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, labels: &[(&str, &str)]) -> Series {
        (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The exposition parser reads what the exporter writes, and values that hold the
    /// separators.
    #[test]
    fn parse_exposition_reads_labels_and_values() {
        let text = "# HELP x_total help\n# TYPE x_total counter\n\
                    x_total{map=\"C.1\",port=\"20544\",direction=\"client_to_upstream\"} 42\n\
                    y 1.5\nz_bucket{le=\"+Inf\",map=\"a\\\"b\"} 3\n\
                    w{map=\"a,b=c}d\",port=\"1\"} 7 1700000000000\n\
                    v{map=\"back\\\\slash\\nline\",} 0\n\
                    u{} +Inf\n";
        let samples = parse_exposition(text);
        assert_eq!(
            samples[&key(
                "x_total",
                &[
                    ("map", "C.1"),
                    ("port", "20544"),
                    ("direction", "client_to_upstream")
                ]
            )],
            42.0
        );
        assert_eq!(samples[&key("y", &[])], 1.5);
        assert_eq!(
            samples[&key("z_bucket", &[("le", "+Inf"), ("map", "a\"b")])],
            3.0
        );
        assert_eq!(
            samples[&key("w", &[("map", "a,b=c}d"), ("port", "1")])],
            7.0
        );
        assert_eq!(samples[&key("v", &[("map", "back\\slash\nline")])], 0.0);
        assert_eq!(samples[&key("u", &[])], f64::INFINITY);
        assert_eq!(samples.len(), 6);

        let s = Scrape::parse(text.to_string());
        // Not exposed is None, never 0; a zero that is exposed is Some(0).
        assert_eq!(s.get("x_total", &[("map", "C.1")]), None);
        assert_eq!(s.get("nosuch", &[]), None);
        assert_eq!(s.find("nosuch", &[]), None);
        assert_eq!(s.find("v", &[]), Some(0.0));
        assert_eq!(s.find("x_total", &[("port", "20544")]), Some(42.0));
        assert_eq!(s.find("w", &[("map", "a")]), None);
        assert_eq!(s.find("w", &[("map", "a,b=c}d")]), Some(7.0));
        assert_eq!(s.sum("x_total", &[("map", "C.2")]), 0.0);

        for bad in [
            "x{map=\"unterminated} 1",
            "x{map=unquoted} 1",
            "x{map=\"a\"} notanumber",
            "x 1 2 3",
            "x{map=\"a\",map=\"b\"} 1",
            "{map=\"a\"} 1",
            "x{map=\"bad\\escape\"} 1",
        ] {
            let parsed = std::panic::catch_unwind(|| parse_exposition(bad));
            assert!(parsed.is_err(), "parsed {bad:?}: {parsed:?}");
        }
    }
}
