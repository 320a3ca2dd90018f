//! The data plane: N event loops (one per core by default), each with its own io backend,
//! connections, pipe pool and timers, fed by the control thread through a mailbox.
//!
//! - `backend`: the readiness interface (`driver`); `uring` and `epoll` implement it.
//! - `event_loop`: wait, dispatch, the connection lifecycle, shutdown drain.
//! - `listeners`, `timers`: a loop's listeners, and its deadlines.
//! - `admission`: what a connection passes before it is relayed (one file per entrance),
//!   and the caps as permits.
//! - `codec`: the client end of a connection (plain, TLS).
//! - `connection`: one connection's two directions and the splice/copy data path.
//! - `pipe`: pipes and buffers lent to directions while bytes are in flight.
//! - `route`: listeners and where each host port leads.
//! - `plan`: what applying a control file does, decided apart from doing it (pure).
//! - `hold`, `wake`: held connections while an instance boots, and its wake command.
//! - `sessions`: listing and ending live connections for the admin socket.
//! - the upgrade (freeze, commit, rollback, adopt): `Relay::freeze` and `Relay::adopt`
//!   here, each loop's side in `event_loop/handover.rs`, the state in `crate::upgrade`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::addr::UpstreamAddr;
use crate::control::{Config, RelaySettings};
use crate::limits::PerSourceTable;
use crate::tls::{self, TlsEndpoint};
use crate::upgrade::state::ConnRecord;

mod admission;
mod backend;
mod codec;
mod connection;
mod event_loop;
mod hold;
mod listeners;
mod pipe;
pub mod plan;
mod reserve;
mod route;
mod sessions;
mod slab;
mod timers;
mod transparent;
mod wake;

use crate::sys;
use backend::{epoll, uring};
use plan::{EntranceKind, RouteStep};

pub use connection::{continue_ids_from, next_id};
pub use route::{InheritError, Listener, MappingState, Route};
pub use sessions::{NoAnswer, Sessions};

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

/// `now + d`, saturating: a deadline that would pass `Instant`'s range is as far away as
/// the clock allows (never a panic in a loop).
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(u32::MAX as u64)))
        .unwrap_or(now)
}

/// What the loops share: the relay-wide connection count and its cap, and the count of
/// connections in admission (each also counted in `active`) and theirs.
pub struct Shared {
    active: AtomicU32,
    max_connections: AtomicU32,
    pending: AtomicU32,
    max_pending: AtomicU32,
    /// Live connections and rates per client source (`per_source_*`).
    sources: Arc<PerSourceTable>,
}

/// What a listener leads to: one mapped host port, a TLS entry routing by SNI (and, with
/// a `[[ws]]` entry, serving WebSocket requests inside TLS), or a WebSocket entry routing
/// by path.
#[derive(Clone)]
pub enum Entrance {
    Mapped(Arc<Route>),
    Tls(Arc<TlsEndpoint>, Option<Arc<admission::WsEndpoint>>),
    Ws(Arc<admission::WsEndpoint>),
}

/// A change the control thread asks of a loop.
pub enum Command {
    /// Settings for connections accepted from now on.
    Settings(Arc<RelaySettings>),
    /// Where TLS entries route each SNI name, from now on.
    TlsRoutes(Arc<admission::TlsRoutes>),
    /// The route of every mapped host port in force: a connection that finishes its
    /// admission (PROXY header) takes the route its port has then.
    Routes(Arc<HashMap<u16, Arc<Route>>>),
    /// Accept on this listener.
    Listen(Arc<Listener>, Entrance),
    /// New connections of the listener at this address go this way (same listener).
    Enter(SocketAddr, Entrance),
    /// Stop accepting on the listener at this address.
    Unlisten(SocketAddr),
    /// Close live connections of these host ports (`removed_mapping = "close"`): all of a
    /// port's connections for `None` (the port is gone), or those whose upstream is not
    /// `Some(new)` (the port was retargeted). Matched by port and upstream, not by route
    /// object: a connection keeps the route it was admitted with, across renames.
    CloseConnections(Arc<HashMap<u16, Option<UpstreamAddr>>>),
    /// Reply once every command before this one is applied and submitted to the kernel.
    Barrier(mpsc::Sender<()>),
    /// Stop accepting; let connections finish for up to `grace`, then close them.
    Shutdown { grace: Duration },
    /// Answer with a snapshot of the loop's live connections.
    Sessions(mpsc::Sender<Vec<crate::admin::protocol::Session>>),
    /// End the live connections the selector names (reason `killed`); answer with their ids.
    Kill(
        Arc<crate::admin::protocol::Selector>,
        mpsc::Sender<Vec<u64>>,
    ),
    /// An upgrade: stop accepting, record every connection that can move, answer, and
    /// wait (moving no byte) for the verdict. Sent to each loop with channels of its own.
    Freeze(mpsc::Sender<Frozen>, mpsc::Receiver<Verdict>),
    /// The new process: take over these connections (their descriptors in the map); answer
    /// how many, or why one cannot be. Sent to each loop with its own share.
    Adopt(
        Vec<ConnRecord>,
        HashMap<RawFd, OwnedFd>,
        mpsc::Sender<Result<usize, String>>,
    ),
    /// The new process, once the old one has let go: start what was adopted, accept
    /// again, and give every connection a turn.
    Kick,
    /// The new process, from its start: accept nothing until `Kick`.
    HoldAccepts,
}

/// What a frozen loop hands over: the records of the connections that can move, and how
/// many stay (TLS sessions).
pub struct Frozen {
    pub records: Vec<ConnRecord>,
    pub stayed: usize,
}

/// Every loop frozen: the records of all, how many stay, and each loop's verdict channel.
pub struct FrozenRelay {
    pub records: Vec<ConnRecord>,
    pub stayed: usize,
    pub loops: Vec<mpsc::Sender<Verdict>>,
}

/// The end of an upgrade, for a frozen loop.
pub enum Verdict {
    /// The new process has adopted everything recorded: let go of it.
    Commit,
    /// The upgrade failed: go on as before.
    Rollback,
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

    /// Queues commands and wakes the loop once.
    fn send(&self, cmds: impl IntoIterator<Item = Command>) {
        self.commands.lock().expect("mailbox lock").extend(cmds);
        sys::eventfd_signal(self.wake.as_raw_fd());
    }

    fn take(&self) -> Vec<Command> {
        sys::eventfd_clear(self.wake.as_raw_fd());
        std::mem::take(&mut *self.commands.lock().expect("mailbox lock"))
    }
}

/// What applying a control file did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Ports whose handling changed (opened, closed, retargeted, updated).
    pub changed_ports: usize,
    /// Listeners that could not be opened: address and why. Retried at the next apply.
    pub failed: Vec<(SocketAddr, io::Error)>,
}

/// A running relay: its loops, and the listeners and routes of the file in force.
pub struct Relay {
    pub backend: Backend,
    mailboxes: Vec<Arc<Mailbox>>,
    loops: Vec<JoinHandle<io::Result<()>>>,
    shared: Arc<Shared>,
    config: Option<Config>,
    listeners: HashMap<SocketAddr, Arc<Listener>>,
    /// Listening sockets handed over by the process before (a live upgrade), until the
    /// first apply takes those its file asks for and closes the others.
    inherited: HashMap<SocketAddr, Listener>,
    routes: Arc<HashMap<u16, Arc<Route>>>,
    /// `pipe_size` and `max_pipes` the pools were made with: they change at restart only.
    pipes: (u32, u32),
}

impl Relay {
    /// Starts `threads` loops on `backend`, then applies `config`: returns once every loop
    /// is accepting on every listener that could be opened (the others are logged).
    pub fn start(config: Config, backend: Backend, threads: usize) -> anyhow::Result<Relay> {
        Relay::start_inheriting(config, backend, threads, HashMap::new())
    }

    /// [`Relay::start`], taking the listening sockets of `inherited` (from the process
    /// before, see [`Listener::from_fd`]) instead of binding their addresses: those the
    /// file asks for are accepted on as they are (their queued connections included), the
    /// others are closed.
    pub fn start_inheriting(
        config: Config,
        backend: Backend,
        threads: usize,
        inherited: HashMap<SocketAddr, Listener>,
    ) -> anyhow::Result<Relay> {
        Relay::start_with(config, backend, threads, inherited, false)
    }

    /// [`Relay::start_inheriting`] for a process taking over at an upgrade: it accepts
    /// nothing until [`Relay::kick`] (the old process may still roll back until then).
    pub fn start_adopting(
        config: Config,
        backend: Backend,
        threads: usize,
        inherited: HashMap<SocketAddr, Listener>,
    ) -> anyhow::Result<Relay> {
        Relay::start_with(config, backend, threads, inherited, true)
    }

    fn start_with(
        config: Config,
        backend: Backend,
        threads: usize,
        inherited: HashMap<SocketAddr, Listener>,
        hold: bool,
    ) -> anyhow::Result<Relay> {
        transparent::probe(&config.mappings);
        let nofile = sys::raise_nofile_limit().unwrap_or(0);
        // Each connection holds 2 fds (one in admission holds 1, and counts in the cap
        // too), each pipe 2; leave room for listeners and the rest.
        let pipe_fds = 2 * u64::from(config.relay.max_pipes);
        let fit = nofile.saturating_sub(256).saturating_sub(pipe_fds) / 2;
        if (config.relay.max_connections as u64) > fit {
            tracing::warn!(
                max_connections = config.relay.max_connections,
                open_files = nofile,
                fits = fit,
                "max_connections does not fit in the open-file limit; accepts will back off at the limit"
            );
        }
        let shared = Arc::new(Shared {
            active: AtomicU32::new(0),
            max_connections: AtomicU32::new(config.relay.max_connections),
            pending: AtomicU32::new(0),
            max_pending: AtomicU32::new(config.relay.max_pending_admissions),
            sources: Arc::default(),
        });
        let threads = threads.max(1);
        let max_pipes = (config.relay.max_pipes as usize).div_ceil(threads);
        let settings = Arc::new(config.relay.clone());
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut mailboxes = Vec::new();
        let mut loops = Vec::new();
        for i in 0..threads {
            let mailbox = Arc::new(Mailbox::new()?);
            let (mb, sh, st, tx) = (
                mailbox.clone(),
                shared.clone(),
                settings.clone(),
                ready_tx.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("loop-{i}"))
                .spawn(move || run_loop(i, backend, sh, st, mb, max_pipes, tx))?;
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
        let mut relay = Relay {
            backend,
            mailboxes,
            loops,
            shared,
            config: None,
            listeners: HashMap::new(),
            inherited,
            routes: Arc::default(),
            pipes: (config.relay.pipe_size, config.relay.max_pipes),
        };
        if hold {
            relay.broadcast(vec![Command::HoldAccepts]);
        }
        relay.apply(config)?;
        Ok(relay)
    }

    /// A handle for listing and ending live connections (the admin socket's).
    pub fn sessions(&self) -> Sessions {
        Sessions {
            mailboxes: self.mailboxes.clone(),
        }
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// Applies a validated control file by difference: opens listeners of new ports,
    /// closes those of removed ones, reroutes changed ports in place (their listeners stay
    /// open, so no connection is refused meanwhile), and applies `removed_mapping` to the
    /// connections of removed and retargeted ports. Ports that do not change, and their
    /// connections, are not touched. Returns once every loop has applied it.
    pub fn apply(&mut self, new: Config) -> anyhow::Result<Applied> {
        transparent::probe(&new.mappings);
        // Everything that can fail on the file's account fails here, before any change.
        let mut ws_endpoints = Vec::new();
        for entry in &new.ws {
            let endpoint = admission::WsEndpoint::load(entry)
                .with_context(|| format!("[[ws]] listen = \"{}\"", entry.listen))?;
            ws_endpoints.push(Arc::new(endpoint));
        }
        // `wss://` on the TLS entries is served as the first `[[ws]]` says.
        let wss = ws_endpoints.first().cloned();
        let mut endpoints = Vec::new();
        for entry in &new.tls {
            let endpoint = TlsEndpoint::load(entry)
                .with_context(|| format!("[[tls]] listen = \"{}\"", entry.listen))?;
            endpoints.push(Arc::new(endpoint));
        }
        let plan = plan::plan(&self.running(), &new);

        // Routes: kept ones are the same objects; built ones share one MappingState per
        // [[map]] entry.
        let mut states: HashMap<usize, Arc<MappingState>> = HashMap::new();
        let mut routes: HashMap<u16, Arc<Route>> = HashMap::new();
        for (port, step) in &plan.routes {
            let route = match *step {
                RouteStep::Keep => self.routes[port].clone(),
                RouteStep::Build {
                    upstream,
                    mapping,
                    carry,
                } => {
                    let m = &new.mappings[mapping];
                    let state = states.entry(mapping).or_insert_with(|| {
                        let carried = carry
                            .then(|| self.routes.get(m.ports.start()))
                            .flatten()
                            .map(|r| r.mapping.active.clone());
                        Arc::new(MappingState::new(m, carried))
                    });
                    Arc::new(Route::new(*port, upstream, state.clone()))
                }
            };
            routes.insert(*port, route);
        }
        let entrance = |kind: EntranceKind| match kind {
            EntranceKind::Mapped(p) => Entrance::Mapped(routes[&p].clone()),
            EntranceKind::Tls(i) => Entrance::Tls(endpoints[i].clone(), wss.clone()),
            EntranceKind::Ws(i) => Entrance::Ws(ws_endpoints[i].clone()),
        };

        if let Some(asked) = plan.pipes_ignored {
            tracing::warn!(
                pipe_size = asked.0,
                max_pipes = asked.1,
                running_pipe_size = self.pipes.0,
                running_max_pipes = self.pipes.1,
                "pipe_size and max_pipes take effect at the next restart; the running pools keep theirs"
            );
        }
        let mut cmds = vec![Command::Settings(Arc::new(new.relay.clone()))];
        self.shared
            .max_connections
            .store(new.relay.max_connections, Ordering::Relaxed);
        self.shared
            .max_pending
            .store(new.relay.max_pending_admissions, Ordering::Relaxed);

        let mut applied = Applied {
            changed_ports: plan.changed_ports,
            ..Applied::default()
        };
        // Changed ports keep their listeners and take the new route; TLS entries take their
        // reloaded certificates.
        for (addr, kind) in &plan.enter {
            cmds.push(Command::Enter(*addr, entrance(*kind)));
        }
        // Accepted sockets inherit TCP_NODELAY and keepalive from their listener: set them
        // on new listeners, and on all of them when the keepalive setting changed.
        let keepalive = new.relay.tcp_keepalive;
        if plan.retune {
            for l in self.listeners.values() {
                route::tune(l.fd(), keepalive);
            }
        }
        for addr in &plan.discard {
            if let Some(l) = self.inherited.remove(addr) {
                tracing::info!(listen = %addr, "closing an inherited listener the control file no longer asks for");
                drop(l);
            }
        }
        for open in &plan.open {
            let (addr, entrance) = (open.addr, entrance(open.entrance));
            let socket = match open.socket {
                plan::Socket::Inherited => self.inherited.remove(&addr).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no inherited listener")
                }),
                plan::Socket::Bind => Listener::bind(addr),
            };
            match socket {
                Ok(l) => {
                    route::tune(l.fd(), keepalive);
                    let l = Arc::new(l);
                    cmds.push(Command::Listen(l.clone(), entrance));
                    self.listeners.insert(addr, l);
                }
                Err(e) => {
                    metrics::counter!(crate::metrics::LISTEN_FAILURES).increment(1);
                    let what = match &entrance {
                        Entrance::Mapped(r) => r.mapping.name.clone(),
                        Entrance::Tls(..) => "[[tls]]".to_string(),
                        Entrance::Ws(_) => "[[ws]]".to_string(),
                    };
                    tracing::error!(listen = %addr, map = %what, error = %e, "cannot listen; will retry at the next reload");
                    applied.failed.push((addr, e));
                }
            }
        }
        // The name table serves SNI (TLS) and path (WebSocket) routing.
        if plan.name_routes {
            cmds.push(Command::TlsRoutes(Arc::new(tls_routes(&new, &routes))));
        }
        for addr in &plan.close {
            cmds.push(Command::Unlisten(*addr));
        }

        // Live connections of removed and retargeted ports follow `removed_mapping`.
        if !plan.close_connections.is_empty() {
            let doomed: HashMap<u16, Option<UpstreamAddr>> = plan
                .close_connections
                .iter()
                .map(|(p, u)| (*p, *u))
                .collect();
            cmds.push(Command::CloseConnections(Arc::new(doomed)));
        }

        let routes = Arc::new(routes);
        cmds.push(Command::Routes(routes.clone()));
        self.broadcast(cmds);
        self.barrier();
        for addr in &plan.close {
            self.listeners.remove(addr);
        }
        self.routes = routes;
        self.config = Some(new);
        Ok(applied)
    }

    /// What runs, as [`plan::plan`] sees it.
    fn running(&self) -> plan::Running<'_> {
        plan::Running {
            config: self.config.as_ref(),
            listening: self.listeners.keys().copied().collect(),
            inherited: self.inherited.keys().copied().collect(),
            routes: self.routes.iter().map(|(p, r)| (*p, r.upstream)).collect(),
            pipes: self.pipes,
        }
    }

    /// Sends every loop the same commands (each loop gets its own clone of the Arcs).
    fn broadcast(&self, cmds: Vec<Command>) {
        for mb in &self.mailboxes {
            mb.send(cmds.iter().map(Command::share));
        }
    }

    /// Waits until every loop has applied what it was sent (bounded: a loop that does not
    /// answer in 5 s is reported, not waited for forever).
    fn barrier(&self) {
        if !self.ping(Duration::from_secs(5)) {
            tracing::error!("an event loop did not confirm a change within 5 s");
        }
    }

    /// Whether every loop answers within `timeout` (the systemd watchdog's health check).
    pub fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        for mb in &self.mailboxes {
            mb.send([Command::Barrier(tx.clone())]);
        }
        let until = deadline(Instant::now(), timeout);
        self.mailboxes.iter().all(|_| {
            rx.recv_timeout(until.saturating_duration_since(Instant::now()))
                .is_ok()
        })
    }

    /// Stops accepting at once (listeners close), lets live connections finish for up to
    /// `shutdown_grace`, then closes the rest. Returns when every loop has ended.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        let grace = self
            .config
            .as_ref()
            .map_or(Duration::ZERO, |c| c.relay.shutdown_grace);
        self.broadcast(vec![Command::Shutdown { grace }]);
        self.listeners.clear();
        // Every loop is joined, whatever an earlier one returned: each drains its own
        // connections. The first failure is reported.
        let mut first_error = None;
        for (i, h) in self.loops.drain(..).enumerate() {
            let result = match h.join() {
                Ok(r) => r.with_context(|| format!("event loop {i} failed")),
                Err(_) => Err(anyhow::anyhow!("event loop {i} panicked")),
            };
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "event loop failed during shutdown");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The upgrade's side of a running relay.
impl Relay {
    /// Freezes every loop. On success: the records of every loop, how many connections
    /// stay, and the loops' verdict channels (each loop is frozen until it hears).
    pub fn freeze(&self, timeout: Duration) -> Result<FrozenRelay, String> {
        let (tx, rx) = mpsc::channel();
        let mut verdicts = Vec::new();
        for mb in &self.mailboxes {
            let (vtx, vrx) = mpsc::channel();
            verdicts.push(vtx);
            mb.send([Command::Freeze(tx.clone(), vrx)]);
        }
        let until = deadline(Instant::now(), timeout);
        let mut records = Vec::new();
        let mut stayed = 0;
        for _ in &self.mailboxes {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(f) => {
                    records.extend(f.records);
                    stayed += f.stayed;
                }
                Err(_) => {
                    Relay::verdict(&verdicts, Verdict::Rollback);
                    return Err("an event loop did not freeze in time".into());
                }
            }
        }
        Ok(FrozenRelay {
            records,
            stayed,
            loops: verdicts,
        })
    }

    pub fn verdict(loops: &[mpsc::Sender<Verdict>], verdict: Verdict) {
        for l in loops {
            let _ = l.send(match verdict {
                Verdict::Commit => Verdict::Commit,
                Verdict::Rollback => Verdict::Rollback,
            });
        }
    }

    /// The listening sockets to hand over, by address.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, RawFd)> {
        self.listeners.iter().map(|(a, l)| (*a, l.fd())).collect()
    }

    /// After a commit: the loops have let go of the listeners; so does this.
    pub fn let_go_of_listeners(&mut self) {
        self.listeners.clear();
    }

    /// The new process: hands the records out to the loops (round robin) with their
    /// descriptors; returns how many were adopted, or the first failure.
    pub fn adopt(
        &self,
        records: Vec<ConnRecord>,
        mut fds: HashMap<RawFd, OwnedFd>,
    ) -> Result<usize, String> {
        let n = self.mailboxes.len();
        let mut shares: Vec<(Vec<ConnRecord>, HashMap<RawFd, OwnedFd>)> =
            (0..n).map(|_| Default::default()).collect();
        for (i, r) in records.into_iter().enumerate() {
            let share = &mut shares[i % n];
            for fd in record_fds(&r) {
                if let Some(owned) = fds.remove(&fd) {
                    share.1.insert(fd, owned);
                }
            }
            share.0.push(r);
        }
        let (tx, rx) = mpsc::channel();
        for (mb, (records, fds)) in self.mailboxes.iter().zip(shares) {
            mb.send([Command::Adopt(records, fds, tx.clone())]);
        }
        drop(tx);
        let mut adopted = 0;
        for _ in 0..n {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(k)) => adopted += k,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("an event loop did not adopt in time".into()),
            }
        }
        Ok(adopted)
    }

    /// After an adoption: every adopted connection starts, accepting starts, every
    /// connection gets a turn.
    pub fn kick(&self) {
        self.broadcast(vec![Command::Kick]);
    }

    /// Whether every loop has ended (after a commit, a loop ends with its last stayed
    /// connection).
    pub fn loops_done(&self) -> bool {
        self.loops.iter().all(|h| h.is_finished())
    }
}

fn record_fds(r: &ConnRecord) -> Vec<RawFd> {
    use crate::upgrade::state::HeldBytes;
    match r {
        ConnRecord::Pending(p) => vec![p.client.fd],
        ConnRecord::Relay(r) => {
            let mut v = vec![r.client.fd, r.upstream_side.fd];
            for d in [&r.to_upstream, &r.to_client] {
                if let HeldBytes::Pipe { read, write, .. } = d.held {
                    v.extend([read, write]);
                }
            }
            v
        }
    }
}

impl Command {
    /// A copy of a broadcast command for one more loop.
    fn share(&self) -> Command {
        match self {
            Command::Settings(s) => Command::Settings(s.clone()),
            Command::TlsRoutes(r) => Command::TlsRoutes(r.clone()),
            Command::Routes(r) => Command::Routes(r.clone()),
            Command::Listen(l, e) => Command::Listen(l.clone(), e.clone()),
            Command::Enter(a, e) => Command::Enter(*a, e.clone()),
            Command::Unlisten(a) => Command::Unlisten(*a),
            Command::CloseConnections(c) => Command::CloseConnections(c.clone()),
            Command::Barrier(tx) => Command::Barrier(tx.clone()),
            Command::Shutdown { grace } => Command::Shutdown { grace: *grace },
            Command::Sessions(tx) => Command::Sessions(tx.clone()),
            Command::Kill(s, tx) => Command::Kill(s.clone(), tx.clone()),
            Command::Kick => Command::Kick,
            Command::HoldAccepts => Command::HoldAccepts,
            Command::Freeze(..) | Command::Adopt(..) => {
                unreachable!("sent to each loop on its own, never broadcast")
            }
        }
    }
}

/// SNI routing of the TLS entries: each mapping's name (and its `-` form) → the route of
/// its first port. The first mapping with a name wins.
fn tls_routes(config: &Config, routes: &HashMap<u16, Arc<Route>>) -> admission::TlsRoutes {
    let mut table = admission::TlsRoutes::new();
    for m in &config.mappings {
        if let Some(route) = routes.get(m.ports.start()) {
            for form in tls::sni_forms(&m.name) {
                table.entry(form).or_insert_with(|| route.clone());
            }
        }
    }
    table
}

/// A loop's thread: builds the loop, reports that it is ready, and runs it. A loop that
/// fails or panics takes the whole process down at once, with a log line saying why: half
/// a relay (a dead loop's connections cut without a log line, their places in the caps
/// never given back, every reload waiting on it) is worse than a restart by the supervisor,
/// which `Restart=on-failure` does within a second.
/// Copy buffers per loop. Debug builds (the tests' binary) take
/// `PORTRELAY_TEST_COPY_BUFFERS=N` (a power of two) to make the pool run dry; release builds
/// have no such switch.
fn copy_buffers() -> u16 {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("PORTRELAY_TEST_COPY_BUFFERS")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
    {
        return n.clamp(1, 1 << 15).next_power_of_two();
    }
    backend::driver::DEFAULT_CHUNKS
}

fn run_loop(
    index: usize,
    backend: Backend,
    shared: Arc<Shared>,
    settings: Arc<RelaySettings>,
    mailbox: Arc<Mailbox>,
    max_pipes: usize,
    ready: mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let wake = mailbox.wake.as_raw_fd();
    let chunks = copy_buffers();
    let result = match backend {
        Backend::Uring => uring::Uring::new(wake, chunks).and_then(|d| {
            let l = event_loop::EventLoop::new(d, shared, settings, mailbox, max_pipes)?;
            Ok(Box::new(move || l.run()) as Box<dyn FnOnce() -> io::Result<()>>)
        }),
        Backend::Epoll => epoll::Epoll::new(wake, chunks).and_then(|d| {
            let l = event_loop::EventLoop::new(d, shared, settings, mailbox, max_pipes)?;
            Ok(Box::new(move || l.run()) as Box<dyn FnOnce() -> io::Result<()>>)
        }),
    };
    let run = match result {
        Ok(run) => run,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(()));
    // Written out when the loop ends, however it ends (the guard also unwinds).
    let batch = crate::logging::batch_here();
    let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("{e}"),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            format!("panicked: {text}")
        }
    };
    tracing::error!(
        event_loop = index,
        error = %why,
        "an event loop failed; exiting so that the supervisor restarts the relay"
    );
    drop(batch); // exit runs no destructors
    std::process::exit(70)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// An upstream that echoes what each connection sends.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(8) {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    fn echoes(mut c: TcpStream) {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    /// A relay started on the listening sockets of the process before it: a connection
    /// queued on a wanted one before the start is relayed, a socket the file does not ask
    /// for is closed (its port refuses), and a reload later treats the inherited listener
    /// like any other (it stays open, no bind).
    #[test]
    fn start_inheriting_takes_the_listeners() {
        for backend in [Backend::Epoll, Backend::Uring] {
            if backend == Backend::Uring {
                if let Err(e) = uring::probe() {
                    eprintln!("skipping io_uring: {e}");
                    continue;
                }
            }
            let upstream = echo();
            let wanted = TcpListener::bind("127.0.0.1:0").unwrap();
            let unwanted = TcpListener::bind("127.0.0.1:0").unwrap();
            let (at, gone) = (wanted.local_addr().unwrap(), unwanted.local_addr().unwrap());
            let queued = TcpStream::connect(at).unwrap();
            let text = format!(
                "[relay]\nbind = [\"127.0.0.1\"]\n[[map]]\nport = {}\nto = \"{upstream}\"\nname = \"a\"\n",
                at.port()
            );
            let config = crate::control::parse_str("t.toml", &text).unwrap();
            let inherited = [(at, wanted), (gone, unwanted)]
                .into_iter()
                .map(|(a, l)| (a, Listener::from_fd(a, OwnedFd::from(l)).unwrap()))
                .collect();
            let mut relay = Relay::start_inheriting(config.clone(), backend, 1, inherited).unwrap();
            assert_eq!(relay.listener_count(), 1);
            echoes(queued);
            echoes(TcpStream::connect(at).unwrap());
            let refused = TcpStream::connect(gone).unwrap_err();
            assert_eq!(
                refused.kind(),
                io::ErrorKind::ConnectionRefused,
                "{backend:?}"
            );
            let applied = relay.apply(config).unwrap();
            assert!(applied.failed.is_empty() && applied.changed_ports == 0);
            echoes(TcpStream::connect(at).unwrap());
            relay.shutdown().unwrap();
        }
    }
}
