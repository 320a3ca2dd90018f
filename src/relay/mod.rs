//! The data plane: N event loops (one per core by default), each with its own io backend,
//! connections, pipe pool and timers, fed by the control thread through a mailbox.
//!
//! - `driver`: the readiness interface; `uring` and `epoll` implement it.
//! - `event_loop`: accept, connect, dispatch readiness, timers, shutdown drain.
//! - `connection`: one connection's two directions and the splice/copy data path.
//! - `pipe`: pipes and buffers lent to directions while bytes are in flight.
//! - `route`: listeners and where each host port leads.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::control::{Config, RelaySettings};

mod connection;
mod driver;
mod epoll;
mod event_loop;
mod pipe;
mod route;
mod slab;
mod sys;
mod uring;

pub use route::{Listener, MappingState, Route};

/// Which io backend the loops use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Uring,
    Epoll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Picks the backend: `auto` uses io_uring when the kernel and seccomp allow the exact
/// opcodes we submit, and says why when it falls back.
pub fn choose_backend(choice: BackendChoice) -> anyhow::Result<Backend> {
    match choice {
        BackendChoice::Epoll => Ok(Backend::Epoll),
        BackendChoice::Uring => {
            uring::probe().context("io_uring backend requested but unavailable")?;
            Ok(Backend::Uring)
        }
        BackendChoice::Auto => match uring::probe() {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; using the epoll backend");
                Ok(Backend::Epoll)
            }
        },
    }
}

/// What the loops share: settings and the relay-wide connection count.
pub struct Shared {
    pub settings: RelaySettings,
    active: AtomicU32,
}

impl Shared {
    fn try_acquire(&self) -> bool {
        let max = self.settings.max_connections;
        self.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A change the control thread asks of a loop.
pub enum Command {
    /// Accept on this listener, routing its connections by `Route`.
    Listen(Arc<Listener>, Arc<Route>),
    /// Stop accepting; let connections finish for up to `grace`, then close them.
    Shutdown { grace: Duration },
}

/// A loop's inbox: commands behind a lock, and an eventfd that wakes the loop.
pub struct Mailbox {
    commands: Mutex<Vec<Command>>,
    wake: OwnedFd,
}

impl Mailbox {
    fn new() -> io::Result<Mailbox> {
        Ok(Mailbox {
            commands: Mutex::new(Vec::new()),
            wake: sys::eventfd()?,
        })
    }

    pub fn send(&self, cmd: Command) {
        self.commands.lock().expect("mailbox lock").push(cmd);
        sys::eventfd_signal(self.wake.as_raw_fd());
    }

    fn take(&self) -> Vec<Command> {
        sys::eventfd_clear(self.wake.as_raw_fd());
        std::mem::take(&mut *self.commands.lock().expect("mailbox lock"))
    }
}

/// A running relay: its loops and what they listen on.
pub struct Relay {
    pub backend: Backend,
    mailboxes: Vec<Arc<Mailbox>>,
    loops: Vec<JoinHandle<io::Result<()>>>,
    listeners: Vec<Arc<Listener>>,
    grace: Duration,
}

impl Relay {
    /// Opens every listener of `config`, starts `threads` loops on `backend`, and returns
    /// once every loop is accepting. A port that cannot be opened is logged and skipped.
    pub fn start(config: &Config, backend: Backend, threads: usize) -> anyhow::Result<Relay> {
        let nofile = sys::raise_nofile_limit().unwrap_or(0);
        // Each connection holds 2 fds; leave room for listeners, pipes and the rest.
        let fit = nofile.saturating_sub(256) / 2;
        if (config.relay.max_connections as u64) > fit {
            tracing::warn!(
                max_connections = config.relay.max_connections,
                open_files = nofile,
                fits = fit,
                "max_connections does not fit in the open-file limit; accepts will back off at the limit"
            );
        }
        let shared = Arc::new(Shared {
            settings: config.relay.clone(),
            active: AtomicU32::new(0),
        });
        let threads = threads.max(1);
        let max_pipes = (config.relay.max_pipes as usize).div_ceil(threads);
        let mut listeners = Vec::new();
        let mut routes = Vec::new();
        for m in &config.mappings {
            let state = Arc::new(MappingState::new(m));
            for port in m.ports.clone() {
                let upstream = m.upstream_for(port);
                let route = Arc::new(Route::new(port, upstream, state.clone()));
                for ip in &config.relay.bind {
                    let addr = SocketAddr::new(*ip, port);
                    match Listener::bind(addr) {
                        Ok(l) => {
                            let l = Arc::new(l);
                            listeners.push(l.clone());
                            routes.push((l, route.clone()));
                        }
                        Err(e) => {
                            metrics::counter!(crate::metrics::LISTEN_FAILURES, "port" => port.to_string()).increment(1);
                            tracing::error!(listen = %addr, map = %m.name, error = %e, "cannot listen")
                        }
                    }
                }
            }
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut mailboxes = Vec::new();
        let mut loops = Vec::new();
        for i in 0..threads {
            let mailbox = Arc::new(Mailbox::new()?);
            for (l, r) in &routes {
                mailbox.send(Command::Listen(l.clone(), r.clone()));
            }
            let (mb, sh, tx) = (mailbox.clone(), shared.clone(), ready_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("loop-{i}"))
                .spawn(move || run_loop(backend, sh, mb, max_pipes, tx))?;
            mailboxes.push(mailbox);
            loops.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            ready_rx
                .recv()
                .context("an event loop exited during start")?
                .context("an event loop failed to start")?;
        }
        Ok(Relay {
            backend,
            mailboxes,
            loops,
            listeners,
            grace: config.relay.shutdown_grace,
        })
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// Stops accepting at once (listeners close), lets live connections finish for up to
    /// `shutdown_grace`, then closes the rest. Returns when every loop has ended.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        for mb in &self.mailboxes {
            mb.send(Command::Shutdown { grace: self.grace });
        }
        self.listeners.clear();
        for h in self.loops.drain(..) {
            h.join()
                .map_err(|_| anyhow::anyhow!("an event loop panicked"))?
                .context("event loop failed")?;
        }
        Ok(())
    }
}

fn run_loop(
    backend: Backend,
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox>,
    max_pipes: usize,
    ready: mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let wake = mailbox.wake.as_raw_fd();
    let result = match backend {
        Backend::Uring => uring::Uring::new(wake).map(|d| {
            let l = event_loop::EventLoop::new(d, shared, mailbox, max_pipes);
            Box::new(move || l.run()) as Box<dyn FnOnce() -> io::Result<()>>
        }),
        Backend::Epoll => epoll::Epoll::new(wake).map(|d| {
            let l = event_loop::EventLoop::new(d, shared, mailbox, max_pipes);
            Box::new(move || l.run()) as Box<dyn FnOnce() -> io::Result<()>>
        }),
    };
    match result {
        Ok(run) => {
            let _ = ready.send(Ok(()));
            run()
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            Err(e)
        }
    }
}
