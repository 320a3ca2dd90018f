//! The counters of a process as values, and their binary form: what a live upgrade hands
//! to the new process, so that its counters go on from the old one's (a Prometheus
//! `rate()` sees no reset). Gauges are not in it: the new process recomputes them.
//!
//! The form, all integers little-endian. Every string (names, label keys and values, which
//! repeat over thousands of series) is written once, in a table the entries index:
//!
//! ```text
//! snapshot  = version:u8 (1)  strings:u32  str*  entries:u32  entry*
//! str       = len:u16  UTF-8 bytes
//! entry     = kind:u8  name:u32  labels:u8  (key:u32 value:u32)*  value
//! value     = count:u64                                      kind 1, a counter
//!           | bounds:u8  bound:f64*  count:u64*(bounds+1)  sum:f64   kind 2, a histogram
//! ```
//!
//! A histogram's counts are per bucket (not cumulative), the last one above every bound.

use std::cmp::Ordering;
use std::collections::HashMap;

use thiserror::Error;

/// The version of the form this build writes and reads.
pub const FORMAT: u8 = 1;
/// Entries a snapshot may hold (a 10 000-port file has about 200 000 series), and strings.
pub const MAX_ENTRIES: u32 = 1 << 24;
/// Bytes of a name, label key or label value.
pub const MAX_STR: usize = u16::MAX as usize;
/// Labels of one series.
pub const MAX_LABELS: usize = u8::MAX as usize;
/// Bounds of one histogram.
pub const MAX_BOUNDS: usize = u8::MAX as usize;

const COUNTER: u8 = 1;
const HISTOGRAM: u8 = 2;

/// One series' count: its metric name, its labels in order, and what it counted.
#[derive(Clone, Debug, PartialEq)]
pub struct CounterValue {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: Counted,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Counted {
    Counter(u64),
    Histogram(HistogramCounts),
}

/// What a histogram counted.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramCounts {
    /// Upper bounds of the buckets, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative): one per bound, then those above them all.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
}

impl HistogramCounts {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Why bytes are not a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("counter snapshot: format version {0}, this build reads version {FORMAT}")]
    Version(u8),
    #[error("counter snapshot truncated: {what} at byte {at} needs {need} bytes, {left} left")]
    Truncated {
        what: &'static str,
        at: usize,
        need: usize,
        left: usize,
    },
    #[error("counter snapshot: {what} at byte {at} is {len}, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        at: usize,
        len: usize,
        max: usize,
    },
    #[error("counter snapshot: entry kind {kind} at byte {at} is unknown")]
    UnknownKind { kind: u8, at: usize },
    #[error("counter snapshot: {what} at byte {at} is not UTF-8")]
    NotUtf8 { what: &'static str, at: usize },
    #[error("counter snapshot: {what} at byte {at} is string {index}, of {strings}")]
    NoString {
        what: &'static str,
        at: usize,
        index: u32,
        strings: usize,
    },
    #[error("counter snapshot: a histogram at byte {at} has bounds that do not ascend")]
    Bounds { at: usize },
    #[error("counter snapshot: {left} bytes after the last entry")]
    Trailing { left: usize },
}

/// Appends the binary form of `values` to `out`. A series this form cannot carry (a
/// string over [`MAX_STR`] bytes, more than [`MAX_LABELS`] labels or [`MAX_BOUNDS`]
/// bounds, counts that do not match its bounds) is left out, with a warning.
pub fn encode(values: &[CounterValue], out: &mut Vec<u8>) {
    let fits = |v: &&CounterValue| {
        let strs = std::iter::once(&v.name).chain(v.labels.iter().flat_map(|(k, v)| [k, v]));
        let ok = strs.into_iter().all(|s| s.len() <= MAX_STR)
            && v.labels.len() <= MAX_LABELS
            && match &v.value {
                Counted::Counter(_) => true,
                Counted::Histogram(h) => {
                    h.bounds.len() <= MAX_BOUNDS && h.counts.len() == h.bounds.len() + 1
                }
            };
        if !ok {
            tracing::warn!(metric = %v.name, "a series too large for the counter snapshot is left out");
        }
        ok
    };
    let kept: Vec<&CounterValue> = values
        .iter()
        .filter(fits)
        .take(MAX_ENTRIES as usize)
        .collect();
    // The table: each string once, in the order the entries first name it.
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut table: Vec<&str> = Vec::new();
    for v in &kept {
        for s in std::iter::once(&v.name).chain(v.labels.iter().flat_map(|(k, v)| [k, v])) {
            index.entry(s.as_str()).or_insert_with(|| {
                table.push(s);
                table.len() as u32 - 1
            });
        }
    }
    out.push(FORMAT);
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for s in &table {
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
    let put_str = |out: &mut Vec<u8>, s: &str| out.extend_from_slice(&index[s].to_le_bytes());
    for v in kept {
        out.push(match v.value {
            Counted::Counter(_) => COUNTER,
            Counted::Histogram(_) => HISTOGRAM,
        });
        put_str(out, &v.name);
        out.push(v.labels.len() as u8);
        for (key, value) in &v.labels {
            put_str(out, key);
            put_str(out, value);
        }
        match &v.value {
            Counted::Counter(n) => out.extend_from_slice(&n.to_le_bytes()),
            Counted::Histogram(h) => {
                out.push(h.bounds.len() as u8);
                for b in &h.bounds {
                    out.extend_from_slice(&b.to_bits().to_le_bytes());
                }
                for c in &h.counts {
                    out.extend_from_slice(&c.to_le_bytes());
                }
                out.extend_from_slice(&h.sum.to_bits().to_le_bytes());
            }
        }
    }
}

/// The snapshot `bytes` hold, all of them.
pub fn decode(bytes: &[u8]) -> Result<Vec<CounterValue>, DecodeError> {
    let mut r = Reader {
        bytes,
        at: 0,
        table: Vec::new(),
    };
    let version = r.u8("the format version")?;
    if version != FORMAT {
        return Err(DecodeError::Version(version));
    }
    let strings = r.count("the string count")?;
    let mut table = Vec::with_capacity(strings.min(r.left() / 2));
    for _ in 0..strings {
        table.push(r.str("a string")?);
    }
    r.table = table;
    let entries = r.count("the entry count")?;
    // Never more room than the bytes left could fill (an entry takes at least 14).
    let mut values = Vec::with_capacity(entries.min(r.left() / 14));
    for _ in 0..entries {
        let at = r.at;
        let kind = r.u8("an entry kind")?;
        if kind != COUNTER && kind != HISTOGRAM {
            return Err(DecodeError::UnknownKind { kind, at });
        }
        let name = r.string("a metric name")?;
        let n = r.u8("a label count")?;
        let mut labels = Vec::with_capacity(n.into());
        for _ in 0..n {
            labels.push((r.string("a label key")?, r.string("a label value")?));
        }
        let value = if kind == COUNTER {
            Counted::Counter(r.u64("a counter value")?)
        } else {
            let at = r.at;
            let n = usize::from(r.u8("a bound count")?);
            let bounds = (0..n)
                .map(|_| r.u64("a bucket bound").map(f64::from_bits))
                .collect::<Result<Vec<f64>, _>>()?;
            if bounds
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(Ordering::Less))
            {
                return Err(DecodeError::Bounds { at });
            }
            let counts = (0..=n)
                .map(|_| r.u64("a bucket count"))
                .collect::<Result<Vec<u64>, _>>()?;
            let sum = f64::from_bits(r.u64("a histogram sum")?);
            Counted::Histogram(HistogramCounts {
                bounds,
                counts,
                sum,
            })
        };
        values.push(CounterValue {
            name,
            labels,
            value,
        });
    }
    match r.left() {
        0 => Ok(values),
        left => Err(DecodeError::Trailing { left }),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The strings the entries index.
    table: Vec<String>,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, what: &'static str, need: usize) -> Result<&[u8], DecodeError> {
        if self.left() < need {
            return Err(DecodeError::Truncated {
                what,
                at: self.at,
                need,
                left: self.left(),
            });
        }
        let taken = &self.bytes[self.at..self.at + need];
        self.at += need;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(what, N)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of strings or entries, at most [`MAX_ENTRIES`].
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = self.u32(what)?;
        if n > MAX_ENTRIES {
            return Err(DecodeError::TooLong {
                what,
                at,
                len: n as usize,
                max: MAX_ENTRIES as usize,
            });
        }
        Ok(n as usize)
    }

    /// A string of the table, by its index.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let at = self.at;
        let index = self.u32(what)?;
        self.table
            .get(index as usize)
            .cloned()
            .ok_or(DecodeError::NoString {
                what,
                at,
                index,
                strings: self.table.len(),
            })
    }

    fn str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(u16::from_le_bytes(self.array(what)?));
        let at = self.at;
        let bytes = self.take(what, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { what, at })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use metrics::{counter, gauge, histogram};

    use super::*;
    use crate::metrics::registry::{Live, Recorder, Registry};

    fn counter_value(name: &str, labels: &[(&str, &str)], n: u64) -> CounterValue {
        CounterValue {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: Counted::Counter(n),
        }
    }

    fn sample() -> Vec<CounterValue> {
        vec![
            counter_value("portrelay_listen_failures_total", &[], 3),
            counter_value(
                "portrelay_bytes_total",
                &[
                    ("map", "C.1 \"ü\""),
                    ("port", "2000"),
                    ("direction", "client_to_upstream"),
                ],
                u64::MAX,
            ),
            CounterValue {
                name: "portrelay_session_duration_seconds".into(),
                labels: vec![("map".into(), "a".into())],
                value: Counted::Histogram(HistogramCounts {
                    bounds: vec![1.0, 10.0],
                    counts: vec![2, 0, 1],
                    sum: 31.5,
                }),
            },
        ]
    }

    fn encoded(values: &[CounterValue]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(values, &mut out);
        out
    }

    #[test]
    fn round_trip() {
        for values in [vec![], sample()] {
            assert_eq!(decode(&encoded(&values)).unwrap(), values);
        }
        // Appends: what was in the buffer stays.
        let mut out = vec![0xAA];
        encode(&sample(), &mut out);
        assert_eq!(out[0], 0xAA);
        assert_eq!(decode(&out[1..]).unwrap(), sample());
    }

    /// Every cut of a snapshot is refused, never read as a shorter one.
    #[test]
    fn truncated_input_is_an_error() {
        let bytes = encoded(&sample());
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
        assert_eq!(
            decode(&bytes[..6]).unwrap_err().to_string(),
            "counter snapshot truncated: a string at byte 5 needs 2 bytes, 1 left"
        );
        assert_eq!(
            decode(&[]).unwrap_err().to_string(),
            "counter snapshot truncated: the format version at byte 0 needs 1 bytes, 0 left"
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let good = encoded(&[counter_value("c_total", &[], 1)]);
        let with = |at: usize, byte: u8| {
            let mut b = good.clone();
            b[at] = byte;
            decode(&b).unwrap_err().to_string()
        };
        assert_eq!(
            with(0, 9),
            "counter snapshot: format version 9, this build reads version 1"
        );
        // version, 1 string (bytes 1..5), "c_total" (5..14), 1 entry (14..18), kind (18),
        // name (19..23), no labels (23), the count (24..32).
        assert_eq!(good.len(), 32);
        assert_eq!(
            with(18, 7),
            "counter snapshot: entry kind 7 at byte 18 is unknown"
        );
        assert_eq!(
            with(7, 0xFF),
            "counter snapshot: a string at byte 7 is not UTF-8"
        );
        assert_eq!(
            with(19, 5),
            "counter snapshot: a metric name at byte 19 is string 5, of 1"
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode(&trailing).unwrap_err().to_string(),
            "counter snapshot: 1 bytes after the last entry"
        );
        // A huge entry count in a few bytes: refused, or read until the bytes run out,
        // without making room for the count first.
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&huge).unwrap_err().to_string(),
            format!("counter snapshot: the string count at byte 1 is {}, more than the {MAX_ENTRIES} allowed", u32::MAX)
        );
        let mut many = vec![FORMAT];
        many.extend_from_slice(&MAX_ENTRIES.to_le_bytes());
        assert!(matches!(
            decode(&many).unwrap_err(),
            DecodeError::Truncated { at: 5, .. }
        ));
        // Bounds that do not ascend.
        let mut h = sample();
        if let Counted::Histogram(c) = &mut h[2].value {
            c.bounds = vec![10.0, 1.0];
        }
        assert!(matches!(
            decode(&encoded(&h)).unwrap_err(),
            DecodeError::Bounds { .. }
        ));
    }

    #[test]
    fn what_the_form_cannot_carry_is_left_out() {
        let mut values = sample();
        values.push(counter_value("x", &[("map", &"n".repeat(MAX_STR + 1))], 1));
        values.push(CounterValue {
            name: "h".into(),
            labels: vec![],
            value: Counted::Histogram(HistogramCounts {
                bounds: vec![1.0],
                counts: vec![1],
                sum: 1.0,
            }),
        });
        assert_eq!(decode(&encoded(&values)).unwrap(), sample());
    }

    /// A new process that restores the old one's snapshot scrapes what the old one did
    /// (counters and histograms; gauges are its own); a series registered after the
    /// restore, and one that had counted before it, count on from the old values.
    #[test]
    fn restore_then_scrape_shows_the_old_values() {
        let buckets: &[(&'static str, &'static [f64])] = &[("h_seconds", &[1.0, 10.0])];
        let old = Arc::new(Registry::new(buckets));
        let held = metrics::with_local_recorder(&Recorder(old.clone()), || {
            counter!("a_total").increment(5);
            counter!("b_total", "map" => "m", "port" => "1", "via" => "direct").increment(7);
            histogram!("h_seconds", "map" => "m").record(0.5);
            histogram!("h_seconds", "map" => "m").record(20.0);
            gauge!("g").set(4.0);
            // A handle held, as a route holds its mapping's.
            counter!("b_total", "map" => "m", "port" => "1", "via" => "direct")
        });
        let snapshot = old.counters();
        assert!(
            snapshot.iter().all(|v| v.name != "g"),
            "gauges are left out"
        );
        let bytes = encoded(&snapshot);

        let new = Arc::new(Registry::new(buckets));
        // The mapping is in force in the new process too (else its series would go at the
        // first scrape, as any series of a mapping that is gone and not held).
        new.set_live(Live::new([("m".to_string(), 1)], []));
        let recorder = Recorder(new.clone());
        // Counted in the new process before the restore.
        metrics::with_local_recorder(&recorder, || counter!("a_total").increment(1));
        new.restore(&decode(&bytes).unwrap());
        let text = new.render();
        let want = "# TYPE a_total counter\na_total 6\n\n\
             # TYPE b_total counter\nb_total{map=\"m\",port=\"1\",via=\"direct\"} 7\n\n\
             # TYPE h_seconds histogram\n\
             h_seconds_bucket{map=\"m\",le=\"1\"} 1\nh_seconds_bucket{map=\"m\",le=\"10\"} 1\n\
             h_seconds_bucket{map=\"m\",le=\"+Inf\"} 2\nh_seconds_sum{map=\"m\"} 20.5\n\
             h_seconds_count{map=\"m\"} 2\n";
        assert_eq!(text, want);

        // Registered after the restore (a mapping's handles, made when its route is
        // built): it counts on from the restored value.
        let later = metrics::with_local_recorder(
            &recorder,
            || counter!("b_total", "map" => "m", "port" => "1", "via" => "direct"),
        );
        later.increment(1);
        assert!(new
            .render()
            .contains("b_total{map=\"m\",port=\"1\",via=\"direct\"} 8\n"));
        drop(held);
    }

    /// A histogram whose bounds changed between the builds keeps its count and sum; each
    /// old bucket lands in the new bucket holding its bound.
    #[test]
    fn restore_into_other_bounds() {
        let new = Arc::new(Registry::new(&[("h", &[5.0, 50.0])]));
        new.restore(&[CounterValue {
            name: "h".into(),
            labels: vec![],
            value: Counted::Histogram(HistogramCounts {
                bounds: vec![1.0, 10.0, 100.0],
                counts: vec![1, 2, 3, 4],
                sum: 500.0,
            }),
        }]);
        assert_eq!(
            new.render(),
            "# TYPE h histogram\nh_bucket{le=\"5\"} 1\nh_bucket{le=\"50\"} 3\n\
             h_bucket{le=\"+Inf\"} 10\nh_sum 500\nh_count 10\n"
        );
    }

    /// A value whose series is of another kind in the new process is left out.
    #[test]
    fn restore_skips_a_kind_mismatch() {
        let new = Arc::new(Registry::new(&[]));
        let g = metrics::with_local_recorder(&Recorder(new.clone()), || gauge!("x"));
        g.set(2.0);
        new.restore(&[counter_value("x", &[], 9)]);
        assert_eq!(new.render(), "# TYPE x gauge\nx 2\n");
    }
}

/// What a snapshot costs at the size of a large host. Run with
/// `cargo test --release --lib snapshot_cost -- --ignored --nocapture`.
#[cfg(test)]
#[test]
#[ignore = "a measurement, not a check"]
fn snapshot_cost() {
    use std::sync::Arc;
    use std::time::Instant;

    use crate::metrics::registry::{Recorder, Registry};
    use crate::metrics::PortMetrics;

    let ports = 10_000u16;
    let old = Arc::new(Registry::new(&[]));
    let held: Vec<PortMetrics> = metrics::with_local_recorder(&Recorder(old.clone()), || {
        (0..ports)
            .map(|i| PortMetrics::new(&format!("C.{i:06}"), 20_000 + i))
            .collect()
    });
    let t = Instant::now();
    let values = old.counters();
    let taken = t.elapsed();
    let t = Instant::now();
    let mut bytes = Vec::new();
    encode(&values, &mut bytes);
    let encoded = t.elapsed();
    let t = Instant::now();
    let back = decode(&bytes).unwrap();
    let decoded = t.elapsed();
    let new = Arc::new(Registry::new(&[]));
    let t = Instant::now();
    new.restore(&back);
    let restored = t.elapsed();
    println!(
        "{} series ({ports} ports): snapshot {taken:?}, encode {encoded:?} ({} bytes), decode {decoded:?}, restore {restored:?}",
        values.len(),
        bytes.len()
    );
    drop(held);
}
