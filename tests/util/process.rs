//! Running commands under a deadline, and children that are killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with stdin closed; kills it and panics (with what it printed) when
/// it is still running after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Finished {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child, timeout);
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let err = stderr.join().unwrap_or_default();
        panic!("{what} still running after {timeout:?}; stderr:\n{err}");
    };
    Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` to exit, polling every 10 ms; `None` when `timeout` passes first.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    super::poll(timeout, Duration::from_millis(10), || {
        child.try_wait().expect("try_wait")
    })
}

/// Reads `pipe` line by line on a thread: each line is echoed to the test's stderr with
/// `prefix` (for debugging a failure) and handed to `sink`.
pub fn tee_lines(
    pipe: impl Read + Send + 'static,
    prefix: &'static str,
    mut sink: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    eprintln!("{prefix} {line}");
                    sink(line);
                }
            }
        }
    })
}

/// A child process that is killed (SIGKILL) and reaped when dropped, with its stderr kept.
pub struct KillOnDrop {
    pub child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl KillOnDrop {
    /// Spawns `cmd` with stdin closed, stdout discarded and stderr collected (and echoed with
    /// `prefix`).
    pub fn spawn(cmd: &mut Command, prefix: &'static str) -> KillOnDrop {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        tee_lines(child.stderr.take().unwrap(), prefix, move |l| {
            sink.lock().unwrap().push(l)
        });
        KillOnDrop { child, stderr }
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
