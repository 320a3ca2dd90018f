//! Watching the control file: inotify on its directory, so that the host agent's
//! write-to-temp-then-rename is seen as well as an in-place rewrite. Bursts are coalesced:
//! one reload follows a quick series of writes.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inotify::{Inotify, WatchMask};

/// How long after a change more changes are waited for before one reload.
const SETTLE: Duration = Duration::from_millis(50);

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
        WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
    )?;
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let hit = match inotify.read_events_blocking(&mut buf) {
                    Ok(events) => events
                        .into_iter()
                        .any(|e| e.name.map(|n| n == name.as_os_str()).unwrap_or(false)),
                    Err(e) => {
                        tracing::error!(error = %e, dir = %dir.display(), "watching the control file failed; SIGHUP still reloads");
                        return;
                    }
                };
                if !hit || !enabled.load(Ordering::Relaxed) {
                    continue;
                }
                // Coalesce a burst: let it settle, then drop what else arrived meanwhile.
                std::thread::sleep(SETTLE);
                while let Ok(mut events) = inotify.read_events(&mut buf) {
                    if events.next().is_none() {
                        break;
                    }
                }
                changed();
            }
        })?;
    Ok(())
}
