//! Metric names, the handles the data path counts with, the registry behind them, and the
//! `/metrics` endpoint.
//!
//! - [`registry`]: the `metrics` facade's recorder: series as shared atomics, the text
//!   format, and the rule that drops the series of mappings that are gone.
//! - [`http`]: the endpoint, which no client can stall.
//! - `process`: the `process_*` figures, from /proc.
//! - [`snapshot`]: the counters as values and their binary form, for a live upgrade.
//!
//! The hot path never looks a metric up: a route gets its handles once, when it is built,
//! and counting is one relaxed atomic operation on a handle. Connections hold their route,
//! so a removed mapping's series live (and count) until its last connection has ended.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

pub mod http;
mod process;
pub mod registry;
pub mod snapshot;

pub use registry::{Live, Registry};
pub use snapshot::{Counted, CounterValue, HistogramCounts};

pub const ACCEPTED: &str = "portrelay_connections_accepted_total";
pub const ACTIVE: &str = "portrelay_connections_active";
pub const REJECTED: &str = "portrelay_connections_rejected_total";
pub const CONNECT_FAILURES: &str = "portrelay_upstream_connect_failures_total";
pub const BYTES: &str = "portrelay_bytes_total";
pub const SESSION_DURATION: &str = "portrelay_session_duration_seconds";
pub const CONNECT_DURATION: &str = "portrelay_upstream_connect_duration_seconds";
pub const RELOADS: &str = "portrelay_reloads_total";
pub const GENERATION: &str = "portrelay_config_generation";
pub const MAPPINGS: &str = "portrelay_mappings";
pub const BACKEND_INFO: &str = "portrelay_io_backend_info";
pub const PIPES: &str = "portrelay_pipes";
pub const COPY_BUFFERS: &str = "portrelay_copy_buffers";
pub const LISTEN_FAILURES: &str = "portrelay_listen_failures_total";
pub const PENDING: &str = "portrelay_connections_pending";
pub const LOOP_LAST_TURN: &str = "portrelay_loop_last_turn_seconds";
pub const HELD: &str = "portrelay_connections_held";
pub const WAKES: &str = "portrelay_wakes_total";
pub const ADMIN_REQUESTS: &str = "portrelay_admin_requests_total";
pub const UPGRADES: &str = "portrelay_upgrades_total";
pub const PER_SOURCE_TABLE_FULL: &str = "portrelay_per_source_table_full_total";
pub const TRANSPARENT_FALLBACKS: &str = "portrelay_transparent_fallbacks_total";

/// Upstream connects take microseconds on a host bridge and seconds when an instance boots.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// SSH sessions last from a second (a failed login) to days.
const SESSION_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0, 259200.0, 604800.0,
];

/// A closed set of label values: the enum, its values in order (`ALL`), their number
/// (`COUNT`, which sizes the per-value handle arrays) and each value's label text. A new
/// value is one line here; every array of handles follows.
macro_rules! label_set {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const ALL: [$name; [$($name::$variant),+].len()] = [$($name::$variant),+];
            pub const COUNT: usize = Self::ALL.len();

            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }
    };
}

label_set! {
    /// Why an accepted connection was refused (the `reason` label of [`REJECTED`]).
    Rejection {
        Acl => "acl",
        Limit => "limit",
        ProxyHeader => "proxy_header",
        NoRoute => "no_route",
        Tls => "tls",
        Shutdown => "shutdown",
        Ws => "ws",
        Auth => "auth",
        PerSource => "per_source",
        Rate => "rate",
    }
}

label_set! {
    /// How a connection reached the relay (the `via` label).
    Via {
        Direct => "direct",
        Proxy => "proxy",
        Tls => "tls",
        Ws => "ws",
    }
}

label_set! {
    /// Why an upstream connect failed (the `reason` label of [`CONNECT_FAILURES`]).
    ConnectFailure {
        Refused => "refused",
        Timeout => "timeout",
        Unreachable => "unreachable",
        Other => "other",
    }
}

label_set! {
    /// Why a connection of a `source = "client"` mapping used the relay's address (the
    /// `reason` label of [`TRANSPARENT_FALLBACKS`]).
    Fallback {
        Loopback => "loopback",
        Family => "family",
        Local => "local",
        Permission => "permission",
        Bind => "bind",
    }
}

/// The fallback counters of one `source = "client"` mapping, one per [`Fallback`]: made
/// with the mapping, so that its series show 0 before the first fallback.
pub fn fallback_counters(map: &str) -> [Counter; Fallback::COUNT] {
    let m = map.to_string();
    Fallback::ALL
        .map(|r| counter!(TRANSPARENT_FALLBACKS, "map" => m.clone(), "reason" => r.label()))
}

/// The rejection counters of one port, one per [`Rejection`].
pub type RejectedCounters = [Counter; Rejection::COUNT];

impl ConnectFailure {
    pub fn of(e: &io::Error) -> ConnectFailure {
        if e.kind() == io::ErrorKind::TimedOut {
            return ConnectFailure::Timeout;
        }
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectFailure::Refused,
            Some(libc::ETIMEDOUT) => ConnectFailure::Timeout,
            Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::EHOSTDOWN) => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        }
    }
}

/// The handles one host port counts with, labelled by its mapping's name and the port.
#[derive(Debug)]
pub struct PortMetrics {
    accepted: [Counter; Via::COUNT],
    pub active: Gauge,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    connect_failures: [Counter; ConnectFailure::COUNT],
    rejected: RejectedCounters,
    pub session: Histogram,
}

impl PortMetrics {
    pub fn new(map: &str, port: u16) -> PortMetrics {
        let (m, p) = (map.to_string(), port.to_string());
        let accepted = Via::ALL.map(
            |v| counter!(ACCEPTED, "map" => m.clone(), "port" => p.clone(), "via" => v.label()),
        );
        let connect_failures = ConnectFailure::ALL.map(|r| counter!(CONNECT_FAILURES, "map" => m.clone(), "port" => p.clone(), "reason" => r.label()));
        PortMetrics {
            accepted,
            active: gauge!(ACTIVE, "map" => m.clone(), "port" => p.clone()),
            bytes_to_upstream: counter!(BYTES, "map" => m.clone(), "port" => p.clone(), "direction" => "client_to_upstream"),
            bytes_to_client: counter!(BYTES, "map" => m.clone(), "port" => p.clone(), "direction" => "upstream_to_client"),
            connect_failures,
            rejected: rejected_counters(port),
            session: histogram!(SESSION_DURATION, "map" => m),
        }
    }

    pub fn accepted(&self, via: Via) {
        self.accepted[via as usize].increment(1);
        self.active.increment(1.0);
    }

    pub fn connect_failed(&self, why: ConnectFailure) {
        self.connect_failures[why as usize].increment(1);
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].increment(1);
    }
}

/// The handles one mapping counts with (all its ports and loops together), labelled by its
/// name: connections held while its instance boots, and its wake runs.
#[derive(Clone, Debug)]
pub struct MappingMetrics {
    pub held: Gauge,
    /// `result` `ok`, `failed`.
    wakes: [Counter; 2],
}

impl MappingMetrics {
    pub fn new(map: &str) -> MappingMetrics {
        let m = map.to_string();
        MappingMetrics {
            held: gauge!(HELD, "map" => m.clone()),
            wakes: ["ok", "failed"].map(|r| counter!(WAKES, "map" => m.clone(), "result" => r)),
        }
    }

    pub fn woke(&self, ok: bool) {
        self.wakes[usize::from(!ok)].increment(1);
    }
}

/// The rejection counters of one host port (`port`, `reason`).
pub fn rejected_counters(port: u16) -> RejectedCounters {
    let p = port.to_string();
    Rejection::ALL.map(|r| counter!(REJECTED, "port" => p.clone(), "reason" => r.label()))
}

/// Relay-wide handles.
pub struct Global {
    pub connect_duration: Histogram,
    pub pipes_in_use: Gauge,
    pub pipes_idle: Gauge,
    pub copy_buffers_in_use: Gauge,
    pub copy_buffers_idle: Gauge,
    pub pending_admission: Gauge,
}

pub fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(|| Global {
        connect_duration: histogram!(CONNECT_DURATION),
        pipes_in_use: gauge!(PIPES, "state" => "in_use"),
        pipes_idle: gauge!(PIPES, "state" => "idle"),
        copy_buffers_in_use: gauge!(COPY_BUFFERS, "state" => "in_use"),
        copy_buffers_idle: gauge!(COPY_BUFFERS, "state" => "idle"),
        pending_admission: gauge!(PENDING),
    })
}

/// Connections pending admission (a PROXY header or a TLS handshake is awaited), over all
/// loops: +1 when a loop takes one in, -1 when it is admitted or refused.
pub fn pending_admission() -> &'static Gauge {
    &global().pending_admission
}

/// One admin socket request answered: `ok`, or `error` (a bad or unanswerable request).
pub fn admin_request(ok: bool) {
    counter!(ADMIN_REQUESTS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// An upgrade ended: `success` (counted by the new process once it has adopted) or
/// `rollback` (by the old one, which goes on).
pub fn upgrade_done(success: bool) {
    counter!(UPGRADES, "result" => if success { "success" } else { "rollback" }).increment(1);
}

pub fn reload(success: bool) {
    counter!(RELOADS, "result" => if success { "success" } else { "failure" }).increment(1);
}

/// After a control file was applied: its generation and mapping count. Also drops the
/// series of mappings gone by now, so that they do not pile up on a host nobody scrapes.
pub fn set_generation(generation: u64, mappings: usize) {
    gauge!(GENERATION).set(generation as f64);
    gauge!(MAPPINGS).set(mappings as f64);
    if let Some(registry) = REGISTRY.get() {
        registry.prune();
    }
}

pub fn set_backend(name: &'static str) {
    gauge!(BACKEND_INFO, "backend" => name).set(1.0);
}

/// A loop turns (waits for events, handles them) at least this often, even with nothing
/// to do, so that [`LOOP_LAST_TURN`] above it means the loop is stuck or gone.
pub const LOOP_TURN_MAX: Duration = Duration::from_secs(1);

/// Each loop's number, and when it last turned (milliseconds since [`epoch`]).
type Loops = Mutex<Vec<(String, Arc<AtomicU64>)>>;

fn loops() -> &'static Loops {
    static LOOPS: OnceLock<Loops> = OnceLock::new();
    LOOPS.get_or_init(Mutex::default)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// What a loop stamps each turn: the scrape shows how long ago that was.
pub struct LoopHealth(Arc<AtomicU64>);

impl LoopHealth {
    pub fn turned(&self) {
        self.0.store(millis_since_epoch(), Ordering::Relaxed);
    }
}

/// The health handle of the loop on the calling thread (named `loop-N`: its series is
/// `{loop="N"}`), stamped as turned now.
pub fn loop_health() -> LoopHealth {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("");
    let label = name.strip_prefix("loop-").unwrap_or(name).to_string();
    let stamp = Arc::new(AtomicU64::new(millis_since_epoch()));
    let mut loops = loops().lock().expect("loops lock");
    loops.retain(|(l, _)| *l != label);
    loops.push((label, stamp.clone()));
    loops.sort_by_key(|(l, _)| (l.len(), l.clone()));
    LoopHealth(stamp)
}

fn loops_exposition() -> String {
    let loops = loops().lock().expect("loops lock");
    if loops.is_empty() {
        return String::new();
    }
    let now = millis_since_epoch();
    let mut out = format!(
        "# HELP {LOOP_LAST_TURN} Seconds since the loop last turned; it turns at least every \
         {}s, so more means stuck or gone.\n# TYPE {LOOP_LAST_TURN} gauge\n",
        LOOP_TURN_MAX.as_secs()
    );
    for (label, stamp) in loops.iter() {
        let age = now.saturating_sub(stamp.load(Ordering::Relaxed)) as f64 / 1000.0;
        out.push_str(&format!("{LOOP_LAST_TURN}{{loop=\"{label}\"}} {age}\n"));
    }
    out
}

/// The whole exposition: the registry's series, the loops' health, the process's figures.
pub fn exposition(registry: &Registry) -> String {
    let mut out = registry.render();
    for part in [loops_exposition(), process::exposition()] {
        if !part.is_empty() {
            out.push('\n');
            out.push_str(&part);
        }
    }
    out
}

/// The mappings of a control file, as the labels of their series (with its TLS entries'
/// ports, which count rejections).
pub fn live(config: &crate::control::Config) -> Live {
    Live::new(
        config
            .mappings
            .iter()
            .flat_map(|m| m.ports.clone().map(|p| (m.name.clone(), p))),
        config.tls.iter().map(|t| t.listen.port()),
    )
}

/// Once a control file is in force: the mappings whose series stay even when no handle
/// holds them (see [`registry`]).
pub fn set_live(live: Live) {
    if let Some(registry) = REGISTRY.get() {
        registry.set_live(live);
    }
}

/// What the process's counters and histograms have counted (see [`snapshot`]); empty
/// before [`install`].
pub fn counters_snapshot() -> Vec<CounterValue> {
    REGISTRY.get().map_or_else(Vec::new, |r| r.counters())
}

/// Adds `values` (the process before's [`counters_snapshot`]) to the process's series,
/// once, so that they count on from there (see [`Registry::restore`]). After [`install`].
pub fn restore_counters(values: &[CounterValue]) {
    if let Some(registry) = REGISTRY.get() {
        registry.restore(values);
    }
}

/// The process's registry, once [`install`]ed.
static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();

/// Installs the recorder for the process, with help text and buckets; returns the registry
/// that [`serve`] renders.
pub fn install() -> anyhow::Result<Arc<Registry>> {
    epoch();
    let registry = Arc::new(Registry::new(&[
        (CONNECT_DURATION, CONNECT_BUCKETS),
        (SESSION_DURATION, SESSION_BUCKETS),
    ]));
    metrics::set_global_recorder(registry::Recorder(registry.clone()))
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let _ = REGISTRY.set(registry.clone());
    describe_counter!(
        ACCEPTED,
        "Connections admitted (past allow and the caps) and sent upstream, by how they arrived."
    );
    describe_gauge!(ACTIVE, "Connections open now.");
    describe_counter!(REJECTED, "Connections refused at once, by reason.");
    describe_counter!(
        CONNECT_FAILURES,
        "Upstream connects that failed, by reason."
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes relayed, by direction; exact, spliced or copied."
    );
    describe_histogram!(
        SESSION_DURATION,
        Unit::Seconds,
        "How long connections lasted."
    );
    describe_histogram!(CONNECT_DURATION, Unit::Seconds, "Time to connect upstream.");
    describe_counter!(RELOADS, "Control-file reloads, by result.");
    describe_gauge!(
        GENERATION,
        "Generation of the control file in force (1 at start)."
    );
    describe_gauge!(MAPPINGS, "Mappings in force.");
    describe_gauge!(BACKEND_INFO, "The io backend in use (value 1).");
    describe_gauge!(
        PIPES,
        "Pipes held by the loops: in use (bytes in flight) or idle in the pool."
    );
    describe_gauge!(
        COPY_BUFFERS,
        "Copy buffers of the loops (small messages): in use (bytes held or being sent) or idle."
    );
    describe_gauge!(
        PENDING,
        "Connections pending admission: a PROXY header or a TLS handshake is awaited."
    );
    describe_gauge!(
        HELD,
        "Connections held while their upstream refuses or times out (its instance boots)."
    );
    describe_counter!(
        WAKES,
        "Wake commands run (once per waiting spell of a mapping), by result."
    );
    describe_counter!(
        ADMIN_REQUESTS,
        "Admin socket requests answered, by result (error: a bad request, or a loop that did not answer)."
    );
    describe_counter!(
        UPGRADES,
        "Upgrades in place, by result (rollback: the new binary failed before taking over; the old one went on)."
    );
    describe_counter!(
        TRANSPARENT_FALLBACKS,
        "Connections of source = \"client\" mappings that used the relay's address, by reason."
    );
    describe_counter!(
        LISTEN_FAILURES,
        "Listeners that could not be opened (bind or listen failed); the log names the port."
    );
    describe_counter!(
        PER_SOURCE_TABLE_FULL,
        "Connections admitted without a per-source count because the table of sources was full."
    );
    // Series that must exist before their first event, so that increase() and alerts see
    // the first one.
    for result in ["success", "failure"] {
        counter!(RELOADS, "result" => result).absolute(0);
    }
    counter!(LISTEN_FAILURES).absolute(0);
    counter!(PER_SOURCE_TABLE_FULL).absolute(0);
    let g = global();
    g.pipes_in_use.set(0.0);
    g.pipes_idle.set(0.0);
    g.copy_buffers_in_use.set(0.0);
    g.copy_buffers_idle.set(0.0);
    g.pending_admission.set(0.0);
    Ok(registry)
}

/// Serves `/metrics` on `addr` (see [`http`]) from a thread of its own. Returns once it is
/// listening.
pub fn serve(addr: SocketAddr, registry: Arc<Registry>) -> io::Result<SocketAddr> {
    http::serve(addr, move || exposition(&registry))
}

/// [`serve`] on an inherited listening socket (an upgrade).
pub fn serve_on(
    listener: std::net::TcpListener,
    registry: Arc<Registry>,
) -> io::Result<SocketAddr> {
    http::serve_on(listener, move || exposition(&registry))
}

/// The counters' values for an upgrade's state (the new process starts from them).
pub fn snapshot_state() -> Vec<u8> {
    let mut out = Vec::new();
    snapshot::encode(&counters_snapshot(), &mut out);
    out
}

/// Starts the counters from an old process's values ([`snapshot_state`]); values that do
/// not decode are logged and left out (the counters then start from zero, as at a start).
pub fn restore_state(state: &[u8]) {
    match snapshot::decode(state) {
        Ok(values) => restore_counters(&values),
        Err(e) => {
            tracing::warn!(error = %e, "the old process's counters do not decode; starting from zero")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What counting costs the data path: per turn of a connection it adds the bytes moved
    /// to two per-port counter handles. Run with
    /// `cargo test --release --lib counting_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn counting_cost() {
        let registry = Arc::new(Registry::new(&[]));
        let port = metrics::with_local_recorder(&registry::Recorder(registry.clone()), || {
            PortMetrics::new("m", 1)
        });
        {
            let turns: u64 = 50_000_000;
            let started = std::time::Instant::now();
            for i in 0..turns {
                port.bytes_to_upstream
                    .increment(std::hint::black_box(i & 1));
                port.bytes_to_client.increment(std::hint::black_box(1));
            }
            let ns = started.elapsed().as_nanos() as f64 / turns as f64;
            println!("counting: {ns:.2} ns per turn (two counter adds)");
        }
        assert!(registry.render().contains("portrelay_bytes_total"));
        drop(port);
        assert!(!registry.render().contains("portrelay_bytes_total"));
    }
}
