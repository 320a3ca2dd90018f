//! Watching the control file: inotify on its directory, so that the host agent's
//! write-to-temp-then-rename is seen as well as an in-place rewrite. A file is applied only
//! once its writer has closed it (`IN_CLOSE_WRITE`) or it was renamed into place
//! (`IN_MOVED_TO`): a file still being written (created, truncated or written to, and not
//! yet closed) is never read, however long its writer takes. Bursts are coalesced: one
//! reload follows a quick series of complete writes.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchMask};

use crate::sys;

/// How long after a complete write more changes are waited for before one reload.
const SETTLE: Duration = Duration::from_millis(50);

/// What the events seen so far say about the control file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FileState {
    /// A writer closed it, or it was renamed into place, since the last reload.
    complete: bool,
    /// It was created, truncated or written to after that, and not closed since.
    writing: bool,
}

impl FileState {
    /// Takes one event about the control file into account.
    fn see(&mut self, mask: EventMask) {
        if mask.intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO) {
            self.complete = true;
            self.writing = false;
        } else if mask.intersects(EventMask::CREATE | EventMask::MODIFY) {
            self.writing = true;
        }
    }

    /// Whether the file is whole and changed: time to reload (and start afresh).
    fn take_ready(&mut self) -> bool {
        let ready = self.complete && !self.writing;
        if ready {
            self.complete = false;
        }
        ready
    }
}

/// Starts a thread that calls `changed` after the file at `path` was rewritten or replaced,
/// while `enabled` is true (the file's `watch` key).
pub fn spawn(
    path: &Path,
    enabled: Arc<AtomicBool>,
    changed: impl Fn() + Send + 'static,
) -> io::Result<()> {
    let path = std::path::absolute(path)?;
    let dir: PathBuf = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name: OsString = path.file_name().unwrap_or_default().to_os_string();
    let mut inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::MODIFY,
    )?;
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut state = FileState::default();
            let ours = |n: Option<&std::ffi::OsStr>| n == Some(name.as_os_str());
            loop {
                // Wait, then read without blocking: the crate's blocking read switches the
                // fd's O_NONBLOCK off and on again around every read (4 fcntl per event).
                if let Err(e) = sys::wait_readable(inotify.as_raw_fd()) {
                    tracing::error!(error = %e, dir = %dir.display(), "watching the control file failed; SIGHUP still reloads");
                    return;
                }
                match inotify.read_events(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Ok(events) => events
                        .filter(|e| ours(e.name))
                        .for_each(|e| state.see(e.mask)),
                    Err(e) => {
                        tracing::error!(error = %e, dir = %dir.display(), "watching the control file failed; SIGHUP still reloads");
                        return;
                    }
                }
                if !state.take_ready() {
                    continue;
                }
                if !enabled.load(Ordering::Relaxed) {
                    continue;
                }
                // Coalesce a burst: let it settle, then take in what else arrived meanwhile;
                // a writer that began again in that time is waited for.
                std::thread::sleep(SETTLE);
                while let Ok(mut events) = inotify.read_events(&mut buf) {
                    let mut any = false;
                    for e in events.by_ref() {
                        any = true;
                        if ours(e.name) {
                            state.see(e.mask);
                        }
                    }
                    if !any {
                        break;
                    }
                }
                if state.writing {
                    // Its CLOSE_WRITE (or a rename) comes later and triggers the reload.
                    state.complete = true;
                    continue;
                }
                state.complete = false;
                changed();
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(events: &[EventMask]) -> FileState {
        let mut s = FileState::default();
        for e in events {
            s.see(*e);
        }
        s
    }

    #[test]
    fn only_a_closed_or_renamed_file_is_ready() {
        use EventMask as E;
        // Created and partly written, still open: never ready, however long it takes.
        assert!(!after(&[E::CREATE, E::MODIFY, E::MODIFY]).take_ready());
        // Truncated in place and written: not before its close.
        assert!(!after(&[E::MODIFY]).take_ready());
        assert!(after(&[E::MODIFY, E::MODIFY, E::CLOSE_WRITE]).take_ready());
        assert!(after(&[E::CREATE, E::MODIFY, E::CLOSE_WRITE]).take_ready());
        // Renamed into place.
        assert!(after(&[E::MOVED_TO]).take_ready());
        // Complete, then a new writer began: wait for that one.
        assert!(!after(&[E::CLOSE_WRITE, E::CREATE, E::MODIFY]).take_ready());
        let mut s = after(&[E::CLOSE_WRITE]);
        assert!(s.take_ready());
        // Taken: not ready again until the next complete write.
        assert!(!s.take_ready());
    }
}
