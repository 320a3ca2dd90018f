//! Wake commands: a mapping's `wake` argv, run once per waiting spell (when the first held
//! connection's connect fails), never on a loop's thread. A loop hands the run to the wake
//! thread through a channel (one send, no wait); the wake thread starts each command from
//! a helper thread of its own, so a command that hangs (it is killed once the mapping's
//! `hold` has passed) never delays another mapping's.

use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::metrics::MappingMetrics;

/// How often a running command is checked for its exit.
const POLL: Duration = Duration::from_millis(20);

/// One run of a mapping's wake command.
pub struct Wake {
    pub map: String,
    /// Placeholders substituted.
    pub argv: Vec<String>,
    /// Killed once this has passed (the mapping's `hold`).
    pub limit: Duration,
    /// Set by the loop that asked (so no second run starts meanwhile); cleared at the end.
    pub running: Arc<AtomicBool>,
    pub metrics: MappingMetrics,
}

/// `argv` with `{name}`, `{port}` and `{upstream}` replaced.
pub fn substitute(argv: &[String], name: &str, port: u16, upstream: &str) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{name}", name)
                .replace("{port}", &port.to_string())
                .replace("{upstream}", upstream)
        })
        .collect()
}

/// Hands `wake` to the wake thread (started on first use).
pub fn request(wake: Wake) {
    static THREAD: OnceLock<Option<Sender<Wake>>> = OnceLock::new();
    let tx = THREAD.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Wake>();
        let spawned = std::thread::Builder::new()
            .name("wake".into())
            .spawn(move || {
                for wake in rx {
                    let name = format!("wake-{}", wake.map);
                    let running = wake.running.clone();
                    if let Err(e) = std::thread::Builder::new()
                        .name(name)
                        .spawn(move || run(wake))
                    {
                        tracing::warn!(error = %e, "cannot start a wake command's thread");
                        running.store(false, Ordering::Release);
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the wake thread; wake commands will not run");
                None
            }
        }
    });
    match tx {
        Some(tx) => {
            if let Err(mpsc::SendError(wake)) = tx.send(wake) {
                wake.running.store(false, Ordering::Release);
            }
        }
        None => wake.running.store(false, Ordering::Release),
    }
}

/// Runs one wake command to its end (or kills it at its limit); logs and counts it.
fn run(wake: Wake) {
    let started = Instant::now();
    let outcome = spawn_and_wait(&wake.argv, wake.limit);
    let duration_ms = started.elapsed().as_millis() as u64;
    let ok = matches!(&outcome, Ok(status) if status.success());
    wake.metrics.woke(ok);
    match outcome {
        Ok(status) if status.success() => {
            tracing::info!(map = %wake.map, command = ?wake.argv, duration_ms, status = %status, "wake command finished");
        }
        Ok(status) => {
            tracing::warn!(map = %wake.map, command = ?wake.argv, duration_ms, status = %status, "wake command failed");
        }
        Err(e) => {
            tracing::warn!(map = %wake.map, command = ?wake.argv, duration_ms, error = %e, "wake command failed");
        }
    }
    wake.running.store(false, Ordering::Release);
}

fn spawn_and_wait(argv: &[String], limit: Duration) -> Result<ExitStatus, String> {
    let (program, args) = argv.split_first().ok_or("no program")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "still running after {} ms (the hold); killed",
                    limit.as_millis()
                ));
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_substituted_in_every_argument() {
        let argv = ["/bin/start", "{name}", "--at={upstream}", "{port}{port}"].map(String::from);
        assert_eq!(
            substitute(&argv, "C.1", 20544, "172.17.0.5:22"),
            ["/bin/start", "C.1", "--at=172.17.0.5:22", "2054420544"]
        );
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_its_limit() {
        let argv = ["sleep", "30"].map(String::from);
        let started = Instant::now();
        let got = spawn_and_wait(&argv, Duration::from_millis(200));
        assert!(got.unwrap_err().contains("killed"));
        assert!(started.elapsed() < Duration::from_secs(5));
        let ok = spawn_and_wait(&["true".to_string()], Duration::from_secs(5));
        assert!(ok.unwrap().success());
        let failed = spawn_and_wait(&["false".to_string()], Duration::from_secs(5));
        assert!(!failed.unwrap().success());
        assert!(spawn_and_wait(&["/nonexistent/x".to_string()], Duration::from_secs(1)).is_err());
    }
}
