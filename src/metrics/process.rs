//! The process's own figures (`process_*`), read from /proc at scrape time.

use std::time::{SystemTime, UNIX_EPOCH};

/// The process's own figures, read from /proc at scrape time and written in the standard
/// `process_*` form (CPU seconds as a float counter, which the registry cannot hold).
pub fn exposition() -> String {
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
