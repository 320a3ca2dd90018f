//! Metric names, the registry (the `metrics` crate with the Prometheus recorder), the
//! handles the data path counts with, and the `/metrics` endpoint.
//!
//! The hot path never looks a metric up: a route gets its counter handles once, when it is
//! built, and counting is one relaxed atomic add on a handle.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
pub const LISTEN_FAILURES: &str = "portrelay_listen_failures_total";

/// Upstream connects take microseconds on a host bridge and seconds when an instance boots.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// SSH sessions last from a second (a failed login) to days.
const SESSION_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0, 259200.0, 604800.0,
];

/// Why an accepted connection was refused (the `reason` label of [`REJECTED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Acl,
    Limit,
    ProxyHeader,
    NoRoute,
    Tls,
    Shutdown,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Acl,
        Rejection::Limit,
        Rejection::ProxyHeader,
        Rejection::NoRoute,
        Rejection::Tls,
        Rejection::Shutdown,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Acl => "acl",
            Rejection::Limit => "limit",
            Rejection::ProxyHeader => "proxy_header",
            Rejection::NoRoute => "no_route",
            Rejection::Tls => "tls",
            Rejection::Shutdown => "shutdown",
        }
    }
}

/// How a connection reached the relay (the `via` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Proxy,
    Tls,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Proxy => "proxy",
            Via::Tls => "tls",
        }
    }
}

/// Why an upstream connect failed (the `reason` label of [`CONNECT_FAILURES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    Unreachable,
    Other,
}

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
    fn label(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Other => "other",
        }
    }
}

/// The handles one host port counts with, labelled by its mapping's name and the port.
#[derive(Debug)]
pub struct PortMetrics {
    accepted: [Counter; 3],
    pub active: Gauge,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    connect_failures: [Counter; 4],
    rejected: [Counter; 6],
    pub session: Histogram,
}

impl PortMetrics {
    pub fn new(map: &str, port: u16) -> PortMetrics {
        let (m, p) = (map.to_string(), port.to_string());
        let accepted = [Via::Direct, Via::Proxy, Via::Tls].map(
            |v| counter!(ACCEPTED, "map" => m.clone(), "port" => p.clone(), "via" => v.label()),
        );
        let connect_failures = [
            ConnectFailure::Refused,
            ConnectFailure::Timeout,
            ConnectFailure::Unreachable,
            ConnectFailure::Other,
        ]
        .map(|r| counter!(CONNECT_FAILURES, "map" => m.clone(), "port" => p.clone(), "reason" => r.label()));
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

/// The rejection counters of one host port (`port`, `reason`).
pub fn rejected_counters(port: u16) -> [Counter; 6] {
    let p = port.to_string();
    Rejection::ALL.map(|r| counter!(REJECTED, "port" => p.clone(), "reason" => r.label()))
}

/// Relay-wide handles.
pub struct Global {
    pub connect_duration: Histogram,
    pub pipes_in_use: Gauge,
    pub pipes_idle: Gauge,
}

pub fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(|| Global {
        connect_duration: histogram!(CONNECT_DURATION),
        pipes_in_use: gauge!(PIPES, "state" => "in_use"),
        pipes_idle: gauge!(PIPES, "state" => "idle"),
    })
}

pub fn reload(success: bool) {
    counter!(RELOADS, "result" => if success { "success" } else { "failure" }).increment(1);
}

pub fn set_generation(generation: u64, mappings: usize) {
    gauge!(GENERATION).set(generation as f64);
    gauge!(MAPPINGS).set(mappings as f64);
}

pub fn set_backend(name: &'static str) {
    gauge!(BACKEND_INFO, "backend" => name).set(1.0);
}

/// Installs the Prometheus recorder for the process, with help text and buckets.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CONNECT_DURATION.into()), CONNECT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SESSION_DURATION.into()), SESSION_BUCKETS)?
        .install_recorder()?;
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
    describe_counter!(
        LISTEN_FAILURES,
        "Listeners that could not be opened (bind or listen failed); the log names the port."
    );
    // Series that must exist before their first event, so that increase() and alerts see
    // the first one.
    for result in ["success", "failure"] {
        counter!(RELOADS, "result" => result).absolute(0);
    }
    counter!(LISTEN_FAILURES).absolute(0);
    let g = global();
    g.pipes_in_use.set(0.0);
    g.pipes_idle.set(0.0);
    Ok(handle)
}

/// The process's own figures, read from /proc at scrape time and written in the standard
/// `process_*` form (CPU seconds as a float counter, which the registry cannot hold).
fn process_exposition() -> String {
    let (page, ticks) = crate::sys::page_size_and_ticks();
    let (page, ticks) = (page as f64, ticks as f64);
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
    };
    let stat = self_stat();
    put(
        "process_cpu_seconds_total",
        "counter",
        "CPU time used, user and system, in seconds.",
        stat.as_ref().map(|f| (f[11] + f[12]) / ticks),
    );
    put(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64),
    );
    put(
        "process_max_fds",
        "gauge",
        "The open-file limit.",
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .split_whitespace()
                    .nth(3)?
                    .parse()
                    .ok()
            }),
    );
    put(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory in bytes.",
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|m| m.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|pages| pages * page),
    );
    put(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process, seconds since the epoch.",
        start_time(stat.as_deref(), ticks),
    );
    out
}

/// Fields of /proc/self/stat after the command name, as numbers (index 0 is `state`).
fn self_stat() -> Option<Vec<f64>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect(),
    )
}

fn start_time(stat: Option<&[f64]>, ticks: f64) -> Option<f64> {
    let start = stat?.get(19).copied()? / ticks;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some(now - uptime + start)
}

/// Serves `GET /metrics` on `addr` from a thread of its own. Returns once it is listening.
pub fn serve(addr: SocketAddr, handle: PrometheusHandle) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = respond(stream, &handle) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })?;
    Ok(local)
}

/// One request, one response, then close: all a scraper needs.
fn respond(stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?.take_limit());
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers: a scrape has no body.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method == "GET" && path == "/metrics" {
        handle.run_upkeep();
        ("200 OK", handle.render() + &process_exposition())
    } else {
        (
            "404 Not Found",
            "portrelay serves GET /metrics\n".to_string(),
        )
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Caps what a request may make us read (8 KiB).
trait TakeLimit: io::Read + Sized {
    fn take_limit(self) -> io::Take<Self> {
        self.take(8192)
    }
}
impl<R: io::Read> TakeLimit for R {}

#[cfg(test)]
mod tests {
    use super::*;

    /// What counting costs the data path: per turn of a connection it adds the bytes moved
    /// to two per-port counter handles. Run with
    /// `cargo test --release --lib counting_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn counting_cost() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let port = PortMetrics::new("m", 1);
            let turns: u64 = 50_000_000;
            let started = std::time::Instant::now();
            for i in 0..turns {
                port.bytes_to_upstream
                    .increment(std::hint::black_box(i & 1));
                port.bytes_to_client.increment(std::hint::black_box(1));
            }
            let ns = started.elapsed().as_nanos() as f64 / turns as f64;
            println!("counting: {ns:.2} ns per turn (two counter adds)");
        });
        assert!(handle.render().contains("portrelay_bytes_total"));
    }
}
