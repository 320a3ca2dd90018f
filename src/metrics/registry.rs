//! The registry behind the `metrics` facade: every series is an `Arc` of atomics that the
//! registry and the handles share, and the registry renders them in the Prometheus text
//! format.
//!
//! A series with a `map` or `port` label belongs to a mapping. It is dropped once both hold:
//! its labels name no mapping in force ([`Live`]), and no handle to it is held. A route
//! holds its port's handles, and every connection holds its route; so when a mapping is
//! removed or renamed, its series stay while any of its connections runs (and go on
//! counting exactly), and the first scrape or reload after the last one ended drops them.
//! No handle can count into a dropped series: none was left. A mapping in force keeps its
//! series even when no handle is held (a handle got for one event does not lose its count).
//! Series without those labels (reloads, pipes, the backend…) live for the whole process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Label, Metadata,
    SharedString, Unit,
};

use super::snapshot::{Counted, CounterValue, HistogramCounts};

/// Buckets of a histogram that was not given its own (Prometheus' defaults).
const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A counter (`u64`) or a gauge (the bits of an `f64`). Counting is one relaxed atomic
/// operation: the figures are read only when scraped, and order nothing else.
#[derive(Debug, Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl Cell {
    fn add_f64(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + delta).to_bits())
            });
    }

    fn get_f64(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.add_f64(value);
    }

    fn decrement(&self, value: f64) {
        self.add_f64(-value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// A histogram: a count per bucket (not cumulative) and the sum of what was recorded.
#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// One per bound, and the last for values above every bound.
    counts: Box<[AtomicU64]>,
    sum: Cell,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Buckets {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: Cell(AtomicU64::new(0f64.to_bits())),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.add_f64(value);
    }
}

#[derive(Clone, Debug)]
enum Series {
    Counter(Arc<Cell>),
    Gauge(Arc<Cell>),
    Histogram(Arc<Buckets>),
}

impl Series {
    /// Whether a handle to it is held outside the registry.
    fn held(&self) -> bool {
        match self {
            Series::Counter(c) | Series::Gauge(c) => Arc::strong_count(c) > 1,
            Series::Histogram(h) => Arc::strong_count(h) > 1,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Series::Counter(_) => "counter",
            Series::Gauge(_) => "gauge",
            Series::Histogram(_) => "histogram",
        }
    }
}

/// The mappings in force, as the labels of their series.
#[derive(Debug, Default)]
pub struct Live {
    /// Mapping name → its host ports.
    ports_of: HashMap<String, HashSet<String>>,
    /// Every host port in force (mapped, and others such as TLS entries).
    ports: HashSet<String>,
}

impl Live {
    /// From each mapping's `(name, port)` pairs, and ports that belong to no mapping.
    pub fn new(
        mappings: impl IntoIterator<Item = (String, u16)>,
        other_ports: impl IntoIterator<Item = u16>,
    ) -> Live {
        let mut live = Live::default();
        for (name, port) in mappings {
            live.ports.insert(port.to_string());
            live.ports_of
                .entry(name)
                .or_default()
                .insert(port.to_string());
        }
        live.ports
            .extend(other_ports.into_iter().map(|p| p.to_string()));
        live
    }

    /// Whether `key` is the series of a mapping in force, or of no mapping at all.
    fn holds(&self, key: &Key) -> bool {
        let label = |name| key.labels().find(|l| l.key() == name).map(|l| l.value());
        match (label("map"), label("port")) {
            (None, None) => true,
            (Some(m), Some(p)) => self.ports_of.get(m).is_some_and(|ps| ps.contains(p)),
            (Some(m), None) => self.ports_of.contains_key(m),
            (None, Some(p)) => self.ports.contains(p),
        }
    }
}

/// Every series of the process, and the help text of each metric.
#[derive(Debug)]
pub struct Registry {
    series: Mutex<BTreeMap<Key, Series>>,
    live: Mutex<Live>,
    help: Mutex<HashMap<String, String>>,
    buckets: Vec<(&'static str, &'static [f64])>,
}

impl Registry {
    /// A registry whose histograms named in `buckets` get those bounds.
    pub fn new(buckets: &[(&'static str, &'static [f64])]) -> Registry {
        Registry {
            series: Mutex::default(),
            live: Mutex::default(),
            help: Mutex::default(),
            buckets: buckets.to_vec(),
        }
    }

    fn describe(&self, name: KeyName, help: SharedString) {
        self.help
            .lock()
            .expect("metrics help lock")
            .insert(name.as_str().to_string(), help.to_string());
    }

    fn register(&self, key: &Key, make: impl FnOnce() -> Series) -> Series {
        self.series
            .lock()
            .expect("metrics registry lock")
            .entry(key.clone())
            .or_insert_with(make)
            .clone()
    }

    /// How many series there are.
    pub fn len(&self) -> usize {
        self.series.lock().expect("metrics registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mappings in force from now on (until then: none).
    pub fn set_live(&self, live: Live) {
        *self.live.lock().expect("metrics live lock") = live;
    }

    /// Drops the series of mappings no longer in force that no handle holds any more.
    pub fn prune(&self) {
        let live = self.live.lock().expect("metrics live lock");
        let mut series = self.series.lock().expect("metrics registry lock");
        // Under the lock no handle can be made (handles come from here, or are clones of a
        // handle that exists), so a series held by no one now stays so.
        series.retain(|key, s| s.held() || live.holds(key));
    }

    /// What every counter and histogram has counted (gauges are not: they are figures of
    /// now, which a new process recomputes), in series order.
    pub fn counters(&self) -> Vec<CounterValue> {
        let series = self.series.lock().expect("metrics registry lock");
        series
            .iter()
            .filter_map(|(key, s)| {
                let value = match s {
                    Series::Counter(c) => Counted::Counter(c.0.load(Ordering::Relaxed)),
                    Series::Gauge(_) => return None,
                    Series::Histogram(h) => Counted::Histogram(HistogramCounts {
                        bounds: h.bounds.to_vec(),
                        counts: h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
                        sum: h.sum.get_f64(),
                    }),
                };
                Some(CounterValue {
                    name: key.name().to_string(),
                    labels: key
                        .labels()
                        .map(|l| (l.key().to_string(), l.value().to_string()))
                        .collect(),
                    value,
                })
            })
            .collect()
    }

    /// Adds what `values` counted to the series they name, making those that do not exist
    /// yet (a handle registered later, such as a mapping's, then counts on from there).
    /// A histogram whose bounds changed adds each old bucket into the new bucket that
    /// holds its bound, so that its count and sum carry over exactly. A value of another
    /// kind than its series is left out, with a warning. Restored series follow the rule
    /// of [`Registry::prune`] like any other.
    pub fn restore(&self, values: &[CounterValue]) {
        for v in values {
            let labels: Vec<Label> = v
                .labels
                .iter()
                .map(|(k, l)| Label::new(k.clone(), l.clone()))
                .collect();
            let key = Key::from_parts(v.name.clone(), labels);
            let series = match &v.value {
                Counted::Counter(_) => self.register(&key, || Series::Counter(Arc::default())),
                Counted::Histogram(_) => self.register(&key, || {
                    Series::Histogram(Arc::new(Buckets::new(self.bounds(key.name()))))
                }),
            };
            match (&v.value, series) {
                (Counted::Counter(n), Series::Counter(c)) => {
                    c.0.fetch_add(*n, Ordering::Relaxed);
                }
                (Counted::Histogram(old), Series::Histogram(h)) => {
                    for (i, n) in old.counts.iter().enumerate() {
                        let bound = old.bounds.get(i).copied().unwrap_or(f64::INFINITY);
                        let j = h
                            .bounds
                            .iter()
                            .position(|b| bound <= *b)
                            .unwrap_or(h.bounds.len());
                        h.counts[j].fetch_add(*n, Ordering::Relaxed);
                    }
                    h.sum.add_f64(old.sum);
                }
                (_, other) => {
                    tracing::warn!(metric = %v.name, kind = other.kind(), "a restored count does not match its series' kind; left out");
                }
            }
        }
    }

    /// The bucket bounds of the histograms named `name`.
    fn bounds(&self, name: &str) -> &'static [f64] {
        self.buckets
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(DEFAULT_BUCKETS, |(_, b)| *b)
    }

    /// Every series in the text format, grouped by metric (each with its help and type),
    /// after dropping those of mappings that are gone (see [`Registry::prune`]).
    pub fn render(&self) -> String {
        self.prune();
        let snapshot: Vec<(Key, Series)> = self
            .series
            .lock()
            .expect("metrics registry lock")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let help = self.help.lock().expect("metrics help lock").clone();
        let mut out = String::new();
        let mut family = "";
        for (key, series) in &snapshot {
            let name = key.name();
            if name != family {
                if !family.is_empty() {
                    out.push('\n');
                }
                family = name;
                if let Some(h) = help.get(name) {
                    let _ = writeln!(out, "# HELP {name} {}", escape_help(h));
                }
                let _ = writeln!(out, "# TYPE {name} {}", series.kind());
            }
            let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
            match series {
                Series::Counter(c) => {
                    sample(&mut out, name, "", &labels, None);
                    let _ = writeln!(out, " {}", c.0.load(Ordering::Relaxed));
                }
                Series::Gauge(g) => {
                    sample(&mut out, name, "", &labels, None);
                    let _ = writeln!(out, " {}", number(g.get_f64()));
                }
                Series::Histogram(h) => {
                    let mut total = 0;
                    for (i, count) in h.counts.iter().enumerate() {
                        total += count.load(Ordering::Relaxed);
                        let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| number(*b));
                        sample(&mut out, name, "_bucket", &labels, Some(&le));
                        let _ = writeln!(out, " {total}");
                    }
                    sample(&mut out, name, "_sum", &labels, None);
                    let _ = writeln!(out, " {}", number(h.sum.get_f64()));
                    sample(&mut out, name, "_count", &labels, None);
                    let _ = writeln!(out, " {total}");
                }
            }
        }
        out
    }
}

/// `name_suffix{labels,le="…"}`, without the value.
fn sample(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], le: Option<&str>) {
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|v| ("le", v));
    let mut all = labels.iter().copied().chain(le).peekable();
    if all.peek().is_none() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in all.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
}

/// A sample value as Prometheus writes it.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The `metrics` recorder that registers into a [`Registry`].
pub struct Recorder(pub Arc<Registry>);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(key, help);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(key, help);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, help: SharedString) {
        self.0.describe(key, help);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.0.register(key, || Series::Counter(Arc::default())) {
            Series::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.0.register(key, || Series::Gauge(Arc::default())) {
            Series::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let bounds = self.0.bounds(key.name());
        match self
            .0
            .register(key, || Series::Histogram(Arc::new(Buckets::new(bounds))))
        {
            Series::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{counter, describe_counter, gauge, histogram};

    #[test]
    fn renders_counters_and_gauges() {
        let registry = Arc::new(Registry::new(&[]));
        let held = metrics::with_local_recorder(&Recorder(registry.clone()), || {
            describe_counter!("c_total", "A \\ counter.");
            counter!("c_total").absolute(7);
            gauge!("g").set(-1.5);
            gauge!("g2").increment(2.0);
            let held = counter!("c_total", "map" => "a\"b", "port" => "1");
            held.increment(3);
            held
        });
        assert_eq!(
            registry.render(),
            "# HELP c_total A \\\\ counter.\n# TYPE c_total counter\n\
             c_total 7\nc_total{map=\"a\\\"b\",port=\"1\"} 3\n\n\
             # TYPE g gauge\ng -1.5\n\n# TYPE g2 gauge\ng2 2\n"
        );
        drop(held);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let registry = Arc::new(Registry::new(&[("h", &[1.0, 2.5])]));
        let recorder = Recorder(registry.clone());
        let h = metrics::with_local_recorder(&recorder, || histogram!("h", "map" => "m"));
        for v in [0.5, 2.0, 9.0] {
            h.record(v);
        }
        assert_eq!(
            registry.render(),
            "# TYPE h histogram\n\
             h_bucket{map=\"m\",le=\"1\"} 1\nh_bucket{map=\"m\",le=\"2.5\"} 2\n\
             h_bucket{map=\"m\",le=\"+Inf\"} 3\nh_sum{map=\"m\"} 11.5\nh_count{map=\"m\"} 3\n"
        );
    }

    /// The series of a mapping no longer in force stay while a handle holds them, counting
    /// exactly, and go at the first scrape after the last handle is dropped; re-registering
    /// the same series while a handle lives gives the same series.
    #[test]
    fn mapping_series_live_as_long_as_their_handles() {
        let registry = Arc::new(Registry::new(&[]));
        let recorder = Recorder(registry.clone());
        let (a, again) = metrics::with_local_recorder(&recorder, || {
            counter!("global_total").increment(1);
            let a = counter!("bytes_total", "map" => "x", "port" => "1");
            a.increment(5);
            (a, counter!("bytes_total", "map" => "x", "port" => "1"))
        });
        again.increment(2);
        drop(again);
        assert!(registry
            .render()
            .contains("bytes_total{map=\"x\",port=\"1\"} 7\n"));
        a.increment(1);
        assert!(registry
            .render()
            .contains("bytes_total{map=\"x\",port=\"1\"} 8\n"));
        drop(a);
        assert_eq!(
            registry.render(),
            "# TYPE global_total counter\nglobal_total 1\n"
        );
        assert_eq!(registry.len(), 1);
    }

    /// Series of mappings in force stay without handles; those of a renamed mapping, a
    /// moved one and a removed port go.
    #[test]
    fn mapping_series_in_force_stay_without_handles() {
        let registry = Arc::new(Registry::new(&[]));
        registry.set_live(Live::new(
            [("a".to_string(), 1), ("b".to_string(), 2)],
            [443],
        ));
        metrics::with_local_recorder(&Recorder(registry.clone()), || {
            for (map, port) in [("a", "1"), ("b", "2"), ("old", "1"), ("a", "2")] {
                counter!("x_total", "map" => map, "port" => port).increment(1);
            }
            for port in ["1", "443", "9"] {
                counter!("rejected_total", "port" => port).increment(1);
            }
            for map in ["a", "old"] {
                histogram!("h", "map" => map).record(1.0);
            }
        });
        let text = registry.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .filter(|s| !s.starts_with("h_bucket"))
            .collect();
        assert_eq!(
            series,
            [
                "h_sum{map=\"a\"}",
                "h_count{map=\"a\"}",
                "rejected_total{port=\"1\"}",
                "rejected_total{port=\"443\"}",
                "x_total{map=\"a\",port=\"1\"}",
                "x_total{map=\"b\",port=\"2\"}",
            ],
            "{text}"
        );
    }
}
