//! One event loop: owns its driver, its connections, its pipe pool and its timers; runs on
//! one thread and never takes a lock on the data path (the mailbox lock is taken only when
//! the control thread has woken the loop).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::Acceptor;
use socket2::{SockRef, Socket};

use super::admission::{
    AdmissionPermit, MappingPermit, Pending, Permit, Stage, Step, TlsRoutes, WsRequest,
};
use super::backend::driver::{Driver, Event, Key, PeerAddr, Tag, ATTEMPTS};
use super::codec::Codec;
use super::connection::{Admitted, CloseReason, Connection, Done, Side, Turn};
use super::hold::Holding;
use super::listeners::Listeners;
use super::pipe::PipePool;
use super::reserve::Reserve;
use super::route::{socket_options, Route};
use super::slab::Slab;
use super::timers::{Timer, Timers};
use super::wake::{self, Wake};
use super::{Command, Entrance, Mailbox, Shared};
use crate::addr::ClientAddr;
use crate::control::{RelaySettings, RemovedMapping};
use crate::limits::{self, Policy, SourcePermit};
use crate::metrics::{self, ConnectFailure, Rejection, Via};

mod admin;
mod handover;

/// How long a listener rests after an accept error such as EMFILE before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections a loop takes from one listener before it turns to its other work.
const ACCEPT_BATCH: usize = 64;
/// How long a client at a TLS entry has to send its ClientHello and finish the handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds the change from `published` to `now` (in use, idle) to the two gauges.
fn publish(now: (usize, usize), published: &mut (usize, usize), gauges: [&::metrics::Gauge; 2]) {
    if now != *published {
        gauges[0].increment(now.0 as f64 - published.0 as f64);
        gauges[1].increment(now.1 as f64 - published.1 as f64);
        *published = now;
    }
}

/// A slot of the loop's table: a client socket being admitted, or a relayed connection.
/// Unboxed: boxing the connection would cost an allocation per connection, to save space
/// only in slots of pending admissions (which `max_pending_admissions` bounds).
#[allow(clippy::large_enum_variant)]
enum Entry {
    Pending(Pending),
    Relay(Connection),
    /// Only while an entry changes from one to the other, inside one call.
    Moving,
}

pub struct EventLoop<D: Driver> {
    driver: D,
    shared: Arc<Shared>,
    settings: Arc<RelaySettings>,
    mailbox: Arc<Mailbox>,
    entries: Slab<Entry>,
    listeners: Listeners,
    tls_routes: Arc<TlsRoutes>,
    /// The route of each mapped host port in force (for connections finishing admission).
    routes: Arc<HashMap<u16, Arc<Route>>>,
    /// Rejection counters of TLS entry ports (mapped ports count through their route).
    tls_rejected: HashMap<u16, metrics::RejectedCounters>,
    pool: PipePool,
    timers: Timers,
    /// Connections that used up their turn with work left.
    pending: Vec<Key>,
    events: Vec<Event>,
    now: Instant,
    /// Set once shutdown began: when the grace period ends.
    drain_until: Option<Instant>,
    /// This loop's pipe counts as last added to the relay-wide gauges.
    published_pipes: (usize, usize),
    /// The same for its copy buffers.
    published_chunks: (usize, usize),
    /// The next upstream sockets, made before their clients are accepted.
    reserve: Reserve,
    /// An upgrade asked this loop to freeze: done at the end of the turn, once every event
    /// of the turn (an accepted connection above all) is an entry.
    freeze_asked: Option<(
        std::sync::mpsc::Sender<super::Frozen>,
        std::sync::mpsc::Receiver<super::Verdict>,
    )>,
    /// After an upgrade: the new process has the rest; this loop serves what stayed (TLS
    /// sessions) and ends with the last.
    handed_over: bool,
    /// The new process: entries adopted but not started yet (nothing is watched, timed or
    /// connected before the old process has let go).
    adopting: Vec<(Key, handover::Start)>,
    /// Debug builds only: a fault to inject once a connection is in the loop.
    #[cfg(debug_assertions)]
    fault: Option<String>,
}

impl<D: Driver> EventLoop<D> {
    pub fn new(
        driver: D,
        shared: Arc<Shared>,
        settings: Arc<RelaySettings>,
        mailbox: Arc<Mailbox>,
        max_pipes: usize,
    ) -> io::Result<Self> {
        let pipe_size = settings.pipe_size;
        Ok(EventLoop {
            driver,
            shared,
            settings,
            mailbox,
            entries: Slab::new(),
            listeners: Listeners::default(),
            tls_routes: Arc::default(),
            routes: Arc::default(),
            tls_rejected: HashMap::new(),
            pool: PipePool::new(max_pipes, pipe_size),
            timers: Timers::default(),
            pending: Vec::new(),
            events: Vec::with_capacity(1024),
            now: Instant::now(),
            drain_until: None,
            published_pipes: (0, 0),
            published_chunks: (0, 0),
            reserve: Reserve::new()?,
            freeze_asked: None,
            handed_over: false,
            adopting: Vec::new(),
            #[cfg(debug_assertions)]
            fault: std::env::var("PORTRELAY_TEST_FAULT").ok(),
        })
    }

    /// Debug builds only (the tests' binary): with `PORTRELAY_TEST_FAULT=panic` or `=error`
    /// the loop fails as a bug would, once it holds a connection, so that the tests can
    /// check what the process does then. Release builds have no such switch.
    #[cfg(debug_assertions)]
    fn inject_fault(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        match self.fault.take().as_deref() {
            Some("panic") => panic!("injected fault"),
            Some("error") => Err(io::Error::other("injected fault")),
            _ => Ok(()),
        }
    }

    /// Runs until shutdown has finished draining.
    pub fn run(mut self) -> io::Result<()> {
        let result = self.serve();
        if self.handed_over {
            self.driver.abandon();
        } else {
            self.driver.close();
        }
        self.pool = PipePool::new(0, 0);
        self.publish_pipes();
        // This loop's copy buffers leave the gauges with it.
        let g = metrics::global();
        g.copy_buffers_in_use
            .decrement(self.published_chunks.0 as f64);
        g.copy_buffers_idle
            .decrement(self.published_chunks.1 as f64);
        result
    }

    fn serve(&mut self) -> io::Result<()> {
        let health = metrics::loop_health();
        self.take_commands();
        loop {
            if self.handed_over && self.entries.is_empty() {
                return Ok(());
            }
            if let Some(until) = self.drain_until {
                if self.entries.is_empty() {
                    return Ok(());
                }
                if self.now >= until {
                    self.close_all(CloseReason::Shutdown);
                    return Ok(());
                }
            }
            let timeout = if self.pending.is_empty() {
                self.next_timeout()
            } else {
                Some(Duration::ZERO)
            };
            let timeout =
                Some(timeout.map_or(metrics::LOOP_TURN_MAX, |t| t.min(metrics::LOOP_TURN_MAX)));
            let mut events = std::mem::take(&mut self.events);
            // This turn's log lines, in one write, before the loop may sleep.
            crate::logging::flush();
            self.driver.wait(timeout, &mut events)?;
            self.now = Instant::now();
            health.turned();
            for ev in events.drain(..) {
                self.handle(ev);
            }
            self.events = events;
            #[cfg(debug_assertions)]
            self.inject_fault()?;
            self.run_timers();
            for key in std::mem::take(&mut self.pending) {
                self.service(key);
            }
            if let Some((reply, verdict)) = self.freeze_asked.take() {
                self.freeze(reply, verdict);
            }
            self.publish_pipes();
        }
    }

    /// Adds this loop's change in pipe counts to the relay-wide gauges (no atomics when
    /// nothing changed).
    fn publish_pipes(&mut self) {
        let g = metrics::global();
        let pipes = (self.pool.in_use(), self.pool.idle());
        publish(
            pipes,
            &mut self.published_pipes,
            [&g.pipes_in_use, &g.pipes_idle],
        );
        let chunks = self.driver.chunks();
        let chunks = (chunks.in_use(), chunks.idle());
        publish(
            chunks,
            &mut self.published_chunks,
            [&g.copy_buffers_in_use, &g.copy_buffers_idle],
        );
    }

    fn next_timeout(&self) -> Option<Duration> {
        let timer = self.timers.next();
        let next = match (timer, self.drain_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Wake => self.take_commands(),
            Event::Accepted(key, fd, peer) => {
                // The listener's other waiting connections one at a time, each admitted
                // (its upstream socket taken, the next one made) before the next is taken,
                // and none once the next upstream socket cannot be made: at the fd limit a
                // client waits in the listen queue rather than being taken without one.
                self.accepted(key, fd, peer);
                for _ in 1..ACCEPT_BATCH {
                    if !self.listeners.accepting() {
                        break;
                    }
                    match self.driver.accept_next(key) {
                        Some(Event::Accepted(key, fd, peer)) => self.accepted(key, fd, peer),
                        Some(other) => return self.handle(other),
                        None => break,
                    }
                }
            }
            Event::AcceptFailed(key, e) => {
                if let Some(l) = self.listeners.get(key) {
                    tracing::warn!(listen = %l.listener.addr, error = %e, "accept failed; backing off");
                    self.timers
                        .add(self.now, ACCEPT_BACKOFF, Timer::ResumeAccept(key));
                }
            }
            Event::Connected(key, result) => self.connected(key, result),
            Event::Ready {
                key,
                readable,
                writable,
                hup,
                error,
            } => {
                if let Some(side) = self.side(key) {
                    side.readable |= readable;
                    side.writable |= writable;
                    side.hup |= hup;
                    side.error |= error;
                    // The peer's FIN, told from a reset whose error a write already took
                    // (splice can take it and still return a count): only CLOSE_WAIT.
                    if hup && !error && !side.fin {
                        side.fin = crate::sys::tcp_close_wait(side.fd.as_raw_fd());
                    }
                    self.progress(key);
                }
            }
            Event::Received(key, result) => self.copied(key, Done::Received(result)),
            Event::Sent(key, chunk, result) => self.copied(key, Done::Sent((chunk, result))),
            Event::Unwatched(key) => {
                if let Some(side) = self.side(key) {
                    side.readable = true;
                    side.writable = true;
                    side.hup = true;
                    let fd = side.fd.as_raw_fd();
                    let _ = self.driver.watch(key, fd);
                    self.progress(key);
                }
            }
        }
    }

    /// A copy-path completion on the socket `key` names: taken in at its direction's turn,
    /// now. One for a connection gone (or an earlier attempt's socket) is dropped, and its
    /// chunk goes back with it.
    fn copied(&mut self, key: Key, done: Done) {
        let received = matches!(done, Done::Received(_));
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        let Some(dir) = c.copying_of(key, received) else {
            return;
        };
        if received {
            dir.copying.receiving = false;
        } else {
            dir.copying.sending = false;
        }
        dir.copying.done = Some(done);
        self.service(key.with_tag(Tag::Client).with_attempt(0));
    }

    /// The socket an event key names, if its entry is still there.
    fn side(&mut self, key: Key) -> Option<&mut Side> {
        match (
            self.entries.get_mut(key.slot(), key.generation())?,
            key.tag(),
        ) {
            (Entry::Pending(p), Tag::Client) => Some(&mut p.client),
            (Entry::Relay(c), Tag::Client) => Some(&mut c.client),
            // An earlier attempt's socket is gone: its events are stale.
            (Entry::Relay(c), Tag::Upstream) if key.attempt() == c.attempt => Some(&mut c.upstream),
            _ => None,
        }
    }

    /// Moves an entry on after a readiness change: admission or bytes.
    fn progress(&mut self, key: Key) {
        match self.entries.get(key.slot(), key.generation()) {
            Some(Entry::Pending(_)) => self.advance(key),
            Some(Entry::Relay(_)) => self.service(key),
            _ => {}
        }
    }

    fn take_commands(&mut self) {
        for cmd in self.mailbox.take() {
            match cmd {
                Command::Settings(settings) => self.settings = settings,
                Command::TlsRoutes(routes) => self.tls_routes = routes,
                Command::Routes(routes) => self.routes = routes,
                Command::Listen(listener, entrance) => {
                    let addr = listener.addr.0;
                    if let Entrance::Tls(..) | Entrance::Ws(_) = entrance {
                        self.tls_rejected
                            .entry(addr.port())
                            .or_insert_with(|| metrics::rejected_counters(addr.port()));
                    }
                    if let Err(e) = self
                        .listeners
                        .add(&mut self.driver, listener.clone(), entrance)
                    {
                        tracing::error!(listen = %listener.addr, error = %e, "cannot accept");
                    }
                }
                Command::Enter(addr, entrance) => self.listeners.enter(addr, entrance),
                Command::Unlisten(addr) => self.listeners.remove(&mut self.driver, addr),
                Command::CloseConnections(doomed) => {
                    let keys: Vec<_> = self.entries.keys().collect();
                    for (slot, generation) in keys {
                        let key = Key::new(Tag::Client, slot, generation);
                        let c = match self.entries.get_mut(slot, generation) {
                            Some(Entry::Relay(c)) => c,
                            // Still in admission, for a port that is gone: refused now. (One
                            // whose port was retargeted takes the new route when admitted.)
                            Some(Entry::Pending(p)) => {
                                if p.mapped_port()
                                    .is_some_and(|port| doomed.get(&port) == Some(&None))
                                {
                                    self.refuse_pending(
                                        key,
                                        Rejection::NoRoute,
                                        "its mapping was removed during admission",
                                    );
                                }
                                continue;
                            }
                            _ => continue,
                        };
                        let close = match doomed.get(&c.route.port) {
                            Some(None) => true,
                            Some(Some(new_upstream)) => c.route.upstream != *new_upstream,
                            None => false,
                        };
                        if close {
                            c.abort(CloseReason::Reload, &mut self.pool);
                            self.finish(Key::new(Tag::Client, slot, generation));
                        }
                    }
                }
                Command::Sessions(answer) => {
                    let _ = answer.send(self.sessions());
                }
                Command::Kill(selector, answer) => {
                    let _ = answer.send(self.kill(&selector));
                }
                Command::Freeze(reply, verdict) => self.freeze_asked = Some((reply, verdict)),
                Command::HoldAccepts => self.listeners.hold(&mut self.driver),
                Command::Adopt(records, fds, answer) => {
                    let _ = answer.send(self.adopt(records, fds));
                }
                Command::Kick => {
                    self.start_adopted();
                    self.kick();
                }
                Command::Barrier(ack) => {
                    self.driver.flush();
                    let _ = ack.send(());
                }
                Command::Shutdown { grace } => {
                    for addr in self.listeners.addrs() {
                        self.listeners.remove(&mut self.driver, addr);
                    }
                    self.drain_until = Some(super::deadline(self.now, grace));
                    // No connection still in admission opens an upstream connection now, and
                    // held connections end at once (their instance may take long to boot).
                    let keys: Vec<_> = self.entries.keys().collect();
                    for (slot, generation) in keys {
                        let key = Key::new(Tag::Client, slot, generation);
                        self.expire_pending(key);
                        if let Some(Entry::Relay(c)) = self.entries.get_mut(slot, generation) {
                            if c.hold.as_ref().is_some_and(|h| h.held || h.waiting) {
                                c.abort(CloseReason::Shutdown, &mut self.pool);
                                self.finish(key);
                            }
                        }
                    }
                }
            }
        }
    }

    fn accepted(&mut self, key: Key, fd: OwnedFd, peer: PeerAddr) {
        let Some(l) = self.listeners.get(key) else {
            return;
        };
        let port = l.listener.port;
        let entrance = l.entrance.clone();
        let socket = Socket::from(fd);
        // The address accept gave; asked again only if it gave none.
        let Some(peer) = peer
            .socket_addr()
            .or_else(|| socket.peer_addr().ok()?.as_socket())
        else {
            return; // gone already
        };
        let peer = ClientAddr(peer);
        let client = Side::new(socket.into());
        if self.drain_until.is_some() {
            let route = match &entrance {
                Entrance::Mapped(r) => Some(r.clone()),
                Entrance::Tls(..) | Entrance::Ws(_) => None,
            };
            return self.reject(client, peer, port, route, Rejection::Shutdown, "");
        }
        let (stage, timeout) = match entrance {
            Entrance::Mapped(route) => {
                if !self.trusted(peer) {
                    return self.admit_new(client, route, peer, Via::Direct);
                }
                (
                    Stage::ProxyHeader { route },
                    self.settings.proxy_header_timeout,
                )
            }
            Entrance::Tls(endpoint, ws) => (
                Stage::TlsHello {
                    acceptor: Box::<Acceptor>::default(),
                    endpoint,
                    ws,
                },
                TLS_HANDSHAKE_TIMEOUT,
            ),
            Entrance::Ws(endpoint) => (
                Stage::WsRequest(WsRequest {
                    endpoint,
                    head: Vec::new(),
                    tls: None,
                    sni_route: None,
                }),
                TLS_HANDSHAKE_TIMEOUT,
            ),
        };
        // Before any admission work: a place among the pending admissions and in the
        // relay-wide cap, so that a flood of silent connections holds a bounded number of
        // fds and direct ports keep serving.
        let Some(permit) = AdmissionPermit::acquire(&self.shared) else {
            let route = match &stage {
                Stage::ProxyHeader { route } => Some(route.clone()),
                _ => None,
            };
            return self.reject(
                client,
                peer,
                port,
                route,
                Rejection::Limit,
                "too many connections in admission",
            );
        };
        let (slot, generation) = self.entries.insert(Entry::Pending(Pending {
            client,
            peer,
            port,
            stage,
            permit,
        }));
        metrics::pending_admission().increment(1.0);
        let key = Key::new(Tag::Client, slot, generation);
        self.watch_client(key);
        self.timers.add(self.now, timeout, Timer::Admission(key));
    }

    fn trusted(&self, peer: ClientAddr) -> bool {
        let ip = peer.0.ip().to_canonical();
        self.settings
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&ip))
    }

    fn watch_client(&mut self, key: Key) {
        let quiet = self.reads_quietly(key);
        let Some(side) = self.side(key) else { return };
        let fd = side.fd.as_raw_fd();
        let watched = if quiet {
            self.driver.watch_quietly(key, fd)
        } else {
            self.driver.watch(key, fd)
        };
        if let Err(e) = watched {
            tracing::warn!(error = %e, "cannot watch client socket");
        }
    }

    /// Whether the connection's sockets are read by the copy path
    /// ([`Connection::reads_quietly`]).
    fn reads_quietly(&self, key: Key) -> bool {
        matches!(self.entries.get(key.slot(), key.generation()),
            Some(Entry::Relay(c)) if c.reads_quietly())
    }

    /// Admits a direct connection at once.
    fn admit_new(&mut self, client: Side, route: Arc<Route>, addr: ClientAddr, via: Via) {
        let Some(permit) = Permit::acquire(&self.shared) else {
            let port = route.port;
            return self.reject(client, addr, port, Some(route), Rejection::Limit, "");
        };
        match self.admit(client, route, addr, via, Codec::Plain, permit) {
            Ok(conn) => {
                let (slot, generation) = self.entries.insert(Entry::Relay(conn));
                let key = Key::new(Tag::Client, slot, generation);
                self.watch_client(key);
                self.start_connect(key);
            }
            Err((client, route, why)) => {
                let port = route.port;
                self.reject(client, addr, port, Some(route), why, "")
            }
        }
    }

    /// Moves a pending entry on; admits, rejects or leaves it waiting.
    fn advance(&mut self, key: Key) {
        let Some(Entry::Pending(p)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        match p.advance(&self.tls_routes) {
            Step::Wait => {}
            Step::Reject {
                why,
                route,
                detail,
                graceful,
            } => {
                let p = self.remove_pending(key);
                self.refuse(p.client, p.peer, p.port, route, why, &detail, graceful);
            }
            Step::Admit {
                route,
                client_addr,
                via,
                codec,
                tls_name,
            } => {
                // The mapping in force now decides, not the one when admission began.
                let Some(route) = self.route_in_force(&route, tls_name.as_deref()) else {
                    return self.refuse_pending(
                        key,
                        Rejection::NoRoute,
                        "its mapping was removed during admission",
                    );
                };
                let p = self.take_pending(key);
                // Its place in the relay-wide cap passes to the connection.
                let permit = p.permit.admitted();
                match self.admit(p.client, route, client_addr, via, codec, permit) {
                    Ok(conn) => {
                        *self
                            .entries
                            .get_mut(key.slot(), key.generation())
                            .expect("taken above") = Entry::Relay(conn);
                        self.start_connect(key);
                    }
                    Err((client, route, why)) => {
                        self.entries.remove(key.slot(), key.generation());
                        // The kernel must let go of the socket for the reset to go out.
                        self.driver.unwatch(key, client.fd.as_raw_fd());
                        let port = route.port;
                        self.reject(client, client_addr, port, Some(route), why, "");
                    }
                }
            }
        }
    }

    /// Takes a pending entry out of its slot, leaving the slot (and its key) in place.
    /// A caller that does not put a connection back must remove the slot.
    fn take_pending(&mut self, key: Key) -> Pending {
        let entry = self
            .entries
            .get_mut(key.slot(), key.generation())
            .expect("pending entry");
        metrics::pending_admission().decrement(1.0);
        match std::mem::replace(entry, Entry::Moving) {
            Entry::Pending(p) => p,
            _ => unreachable!("take_pending on a pending entry"),
        }
    }

    /// Removes a pending entry for good, stops watching its socket and frees its places
    /// in the caps.
    fn remove_pending(&mut self, key: Key) -> Pending {
        let p = self.take_pending(key);
        self.entries.remove(key.slot(), key.generation());
        self.driver.unwatch(key, p.client.fd.as_raw_fd());
        p
    }

    /// Refuses a pending entry now, for `why`.
    fn refuse_pending(&mut self, key: Key, why: Rejection, detail: &str) {
        let p = self.remove_pending(key);
        let route = match p.stage {
            Stage::ProxyHeader { route } => Some(route),
            Stage::TlsHandshake { route, .. } | Stage::TlsFirstBytes { route, .. } => route,
            _ => None,
        };
        self.reject(p.client, p.peer, p.port, route, why, detail);
    }

    /// The route a connection that finishes admission now takes: its port's route in force
    /// (for TLS: the route its SNI name has now). When its mapping is gone, it keeps the
    /// route it began with under `removed_mapping = "keep"`, and has none under `close`.
    fn route_in_force(&self, began: &Arc<Route>, tls_name: Option<&str>) -> Option<Arc<Route>> {
        let now = match tls_name {
            Some(name) => self.tls_routes.get(name),
            None => self.routes.get(&began.port),
        };
        match now {
            Some(route) => Some(route.clone()),
            None if self.settings.removed_mapping == RemovedMapping::Keep => Some(began.clone()),
            None => None,
        }
    }

    /// The checks every connection passes before it is relayed: `allow` (against the real
    /// client address), then the per-mapping cap, then the per-source limits (against the
    /// real client too). Then the upstream socket. `permit` is its place in the relay-wide
    /// cap, given back with a refusal.
    #[allow(clippy::result_large_err)]
    fn admit(
        &mut self,
        client: Side,
        route: Arc<Route>,
        addr: ClientAddr,
        via: Via,
        codec: Codec,
        permit: Permit,
    ) -> Result<Connection, (Side, Arc<Route>, Rejection)> {
        if !route.mapping.allows(addr.0.ip()) {
            return Err((client, route, Rejection::Acl));
        }
        let Some(mapping_permit) = MappingPermit::acquire(&route.mapping) else {
            return Err((client, route, Rejection::Limit));
        };
        let ip = addr.0.ip();
        let sources = &self.shared.sources;
        let source_permit = match Policy::of(&self.settings, route.mapping.per_source(), ip) {
            None => SourcePermit::none(sources),
            Some(policy) => match sources.admit(ip, &policy, &route.mapping.name, route.port) {
                Ok(p) => p,
                Err(why) => return Err((client, route, why)),
            },
        };
        let upstream = match self.upstream_socket(&route.upstream.0) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client = %addr, port = route.port, error = %e, "cannot create upstream socket");
                return Err((client, route, Rejection::Limit));
            }
        };
        // TCP_NODELAY and keepalive came with the socket: it inherits the listener's.
        route.metrics.accepted(via);
        let hold = route.mapping.hold.unwrap_or(self.settings.hold);
        let replay = matches!(codec, Codec::Plain);
        let admitted = Admitted {
            route,
            client_addr: addr,
            via,
            codec,
            caps: (permit, mapping_permit, source_permit),
        };
        let mut conn = Connection::new(client, upstream.into(), admitted, self.now);
        if !hold.is_zero() {
            conn.hold = Some(Box::new(Holding::new(self.now, hold, replay)));
        }
        Ok(conn)
    }

    fn start_connect(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        let route = c.route.clone();
        if let Some(t) = &route.mapping.transparent {
            t.bind(
                &route.mapping.name,
                c.upstream.fd.as_fd(),
                c.client_addr.0,
                route.upstream.0,
            );
        }
        let fd = c.upstream.fd.as_raw_fd();
        // A held connection's attempt ends by its hold's end at the latest.
        let timeout = match &c.hold {
            Some(h) => self
                .settings
                .connect_timeout
                .min(h.until.saturating_duration_since(self.now))
                .max(Duration::from_millis(1)),
            None => self.settings.connect_timeout,
        };
        let quiet = c.reads_quietly();
        // TCP_NODELAY and keepalive, set by the driver with the connect (see `tune`).
        self.driver.connect(
            key.with_tag(Tag::Upstream).with_attempt(c.attempt),
            fd,
            &route.upstream_sockaddr,
            timeout,
            socket_options(self.settings.tcp_keepalive).as_slice(),
            quiet,
        );
        self.arm_idle_sweep();
        self.arm_ping_sweep(key);
    }

    /// A WebSocket connection with a `ping_interval` arms the loop's ping sweep, which
    /// runs at half the interval (one per loop, like the idle sweep).
    fn arm_ping_sweep(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get(key.slot(), key.generation()) else {
            return;
        };
        if let Codec::WebSocket(ws) = &c.codec {
            if let Some(every) = ws.ping_every {
                let every = (every / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
                self.timers.arm_sweep(self.now, every, Timer::PingSweep);
            }
        }
    }

    /// Owes a Ping to each WebSocket client whose connection moved nothing for its
    /// `ping_interval` (so that proxies and NATs in between keep it), and sends it.
    fn sweep_pings(&mut self) {
        let keys: Vec<_> = self.entries.keys().collect();
        let mut next: Option<Duration> = None;
        for (slot, generation) in keys {
            let Some(Entry::Relay(c)) = self.entries.get_mut(slot, generation) else {
                continue;
            };
            let quiet = self.now.saturating_duration_since(c.last_active);
            let Codec::WebSocket(ws) = &mut c.codec else {
                continue;
            };
            let Some(every) = ws.ping_every else {
                continue;
            };
            next = Some(next.map_or(every, |n| n.min(every)));
            if quiet >= every {
                ws.queue_ping();
                self.service(Key::new(Tag::Client, slot, generation));
            }
        }
        if let Some(every) = next {
            let every = (every / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
            self.timers.arm_sweep(self.now, every, Timer::PingSweep);
        }
    }

    /// With `idle_timeout` set, one sweep timer per loop (not one timer per connection,
    /// which would pile up in the heap for connections long closed).
    fn arm_idle_sweep(&mut self) {
        if let Some(idle) = self.settings.idle_timeout {
            let every = (idle / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
            self.timers.arm_sweep(self.now, every, Timer::IdleSweep);
        }
    }

    /// Closes connections idle for `idle_timeout` (late by at most an eighth of it, ≤ 5 s).
    fn sweep_idle(&mut self) {
        let Some(idle) = self.settings.idle_timeout else {
            return;
        };
        let keys: Vec<_> = self.entries.keys().collect();
        let mut any = false;
        for (slot, generation) in keys {
            if let Some(Entry::Relay(c)) = self.entries.get_mut(slot, generation) {
                any = true;
                // A held connection is bounded by its hold, not by idleness.
                if c.hold.is_some() && !c.connected {
                    continue;
                }
                if self.now.saturating_duration_since(c.last_active) >= idle {
                    c.abort(CloseReason::Idle, &mut self.pool);
                    self.finish(Key::new(Tag::Client, slot, generation));
                }
            }
        }
        if any {
            self.arm_idle_sweep();
        }
    }

    /// A socket for a connection to `addr` (made in advance, see [`Reserve`]). When the
    /// next one cannot be made, the loop takes no new clients until it can.
    fn upstream_socket(&mut self, addr: &SocketAddr) -> io::Result<Socket> {
        let s = self.reserve.socket(addr);
        if !self.reserve.held() && !self.listeners.paused() {
            tracing::warn!(
                "out of file descriptors: new clients wait in the listen queue until one \
                 is free for the next upstream socket"
            );
            self.listeners.pause(&mut self.driver);
            self.timers.add(self.now, ACCEPT_BACKOFF, Timer::Reserve);
        }
        s
    }

    fn connected(&mut self, key: Key, result: io::Result<()>) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        if key.attempt() != c.attempt {
            return; // an earlier attempt's socket, gone
        }
        let key = key.with_tag(Tag::Client);
        if let (Err(e), Some(t)) = (&result, &c.route.mapping.transparent) {
            t.connect_failed(
                &c.route.mapping.name,
                c.upstream.fd.as_fd(),
                c.client_addr.0,
                e,
            );
        }
        match result {
            Ok(()) => {
                if let Some(h) = c.hold.as_mut() {
                    if h.held {
                        h.release(&c.route.mapping);
                        tracing::info!(
                            client = %c.client_addr,
                            port = c.route.port,
                            map = %c.route.mapping.name,
                            upstream = %c.route.upstream,
                            attempts = h.attempts,
                            waited_ms = c.started.elapsed().as_millis() as u64,
                            "upstream connected after waiting"
                        );
                    }
                    if h.replay.is_none() {
                        c.hold = None;
                    }
                }
                c.connected = true;
                c.upstream.writable = true;
                metrics::global()
                    .connect_duration
                    .record(c.duration(self.now).as_secs_f64());
                self.service(key);
            }
            Err(e) if c.hold.is_some() => {
                let h = c.hold.as_mut().expect("checked");
                h.last_reason = Some(ConnectFailure::of(&e));
                self.upstream_failed(key, e);
            }
            Err(e) => {
                c.route.metrics.connect_failed(ConnectFailure::of(&e));
                c.abort(CloseReason::connect(&e), &mut self.pool);
                self.finish(key);
            }
        }
    }

    /// A held connection's attempt failed (its connect, or its upstream closed before its
    /// first byte): it waits and retries while its hold lasts, and gives up after.
    fn upstream_failed(&mut self, key: Key, e: io::Error) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        c.connected = false;
        let h = c.hold.as_mut().expect("a held connection");
        h.last_error = Some(e);
        if self.now >= h.until || self.drain_until.is_some() {
            return self.give_up(key);
        }
        let m = &c.route.mapping;
        if h.hold(m)
            && !m.wake.is_empty()
            && m.waking
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let upstream = c.route.upstream.to_string();
            wake::request(Wake {
                map: m.name.clone(),
                argv: wake::substitute(&m.wake, &m.name, c.route.port, &upstream),
                limit: h.until.saturating_duration_since(c.started),
                running: m.waking.clone(),
                metrics: m.metrics.clone(),
            });
        }
        h.waiting = true;
        let wait = h
            .next_backoff()
            .min(h.until.saturating_duration_since(self.now));
        let attempt = c.attempt;
        self.timers
            .add(self.now, wait, Timer::Retry(key.with_attempt(attempt)));
    }

    /// The retry timer of a held connection: a new upstream socket (one whose connect
    /// failed cannot connect again) and a new connect, or the end once the hold has passed.
    fn retry(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        let Some(h) = c.hold.as_mut() else { return };
        if key.attempt() != c.attempt || !h.waiting {
            return;
        }
        if self.now >= h.until || self.drain_until.is_some() {
            return self.give_up(key.with_attempt(0));
        }
        let addr = c.route.upstream.0;
        let socket = match self.upstream_socket(&addr) {
            Ok(s) => s,
            Err(e) => {
                if let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) {
                    if let Some(h) = c.hold.as_mut() {
                        h.last_reason = None;
                        h.last_error = Some(e);
                    }
                }
                return self.give_up(key.with_attempt(0));
            }
        };
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        let h = c.hold.as_mut().expect("checked above");
        h.waiting = false;
        h.attempts += 1;
        if let Some(r) = h.replay.as_mut() {
            r.restart();
        }
        let old_key = key.with_tag(Tag::Upstream).with_attempt(c.attempt);
        c.attempt = (c.attempt + 1) % ATTEMPTS;
        let old = std::mem::replace(&mut c.upstream, Side::new(socket.into()));
        self.driver.unwatch(old_key, old.fd.as_raw_fd());
        self.driver.retire(old.fd);
        self.start_connect(key.with_attempt(0));
    }

    /// A held connection's hold has passed (or the relay is shutting down): it ends as a
    /// connection whose upstream failed ends without one, counted once.
    fn give_up(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        let Some(mut h) = c.hold.take() else { return };
        h.release(&c.route.mapping);
        let e = h
            .last_error
            .take()
            .unwrap_or_else(|| io::Error::other("no attempt finished"));
        let reason = match h.last_reason {
            Some(why) => {
                c.route.metrics.connect_failed(why);
                CloseReason::connect(&e)
            }
            None => CloseReason::of(&e),
        };
        tracing::info!(
            client = %c.client_addr,
            port = c.route.port,
            map = %c.route.mapping.name,
            upstream = %c.route.upstream,
            attempts = h.attempts,
            waited_ms = self.now.saturating_duration_since(c.started).as_millis() as u64,
            error = %e,
            "gave up waiting for the upstream"
        );
        c.abort(reason, &mut self.pool);
        self.finish(key);
    }

    /// Gives a connection a turn: moves bytes, then finishes it or queues it again.
    fn service(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        if !c.connected {
            return;
        }
        if !c.quiet && c.reads_quietly() {
            // Read by the copy path from now on (a PROXY header taken, a hold ended): no
            // readability report per message. A side whose watch changed tries its next
            // read (the old watch's last report may have been taken already).
            c.quiet = true;
            let client = key.with_tag(Tag::Client);
            let upstream = key.with_tag(Tag::Upstream).with_attempt(c.attempt);
            if self.driver.quieten(client, c.client.fd.as_raw_fd()) {
                c.client.readable = true;
            }
            if self.driver.quieten(upstream, c.upstream.fd.as_raw_fd()) {
                c.upstream.readable = true;
            }
        }
        let before = (c.to_upstream.bytes, c.to_client.bytes);
        let turn = c.pump(key, &mut self.pool, &mut self.driver);
        c.last_active = self.now;
        if let Some(e) = c.hold.as_mut().and_then(|h| h.lost.take()) {
            return self.upstream_failed(key.with_tag(Tag::Client), e);
        }
        let m = &c.route.metrics;
        m.bytes_to_upstream
            .increment(c.to_upstream.bytes - before.0);
        m.bytes_to_client.increment(c.to_client.bytes - before.1);
        if c.is_done() {
            self.finish(key);
        } else if turn == Turn::Yield {
            self.pending.push(key);
        }
    }

    /// Removes a done connection: unwatch, close, count, log.
    fn finish(&mut self, key: Key) {
        let Some(entry) = self.entries.remove(key.slot(), key.generation()) else {
            return;
        };
        let Entry::Relay(mut c) = entry else {
            return;
        };
        self.driver
            .unwatch(key.with_tag(Tag::Client), c.client.fd.as_raw_fd());
        self.driver.unwatch(
            key.with_tag(Tag::Upstream).with_attempt(c.attempt),
            c.upstream.fd.as_raw_fd(),
        );
        if let Some(h) = c.hold.as_mut() {
            h.release(&c.route.mapping);
        }
        // Free the connection's place in the caps first: whoever learns of the close (the
        // log, the client) may connect again at once.
        c.caps = None;
        let r = &c.route;
        r.metrics.active.decrement(1.0);
        tracing::info!(
            id = c.id,
            client = %c.client_addr,
            via = c.via.label(),
            port = r.port,
            map = %r.mapping.name,
            upstream = %r.upstream,
            bytes_client_to_upstream = c.to_upstream.bytes,
            bytes_upstream_to_client = c.to_client.bytes,
            duration_ms = c.duration(self.now).as_millis() as u64,
            reason = %c.reason(),
            "connection closed"
        );
        r.metrics.session.record(c.duration(self.now).as_secs_f64());
        for fd in c.close(&mut self.pool) {
            self.driver.retire(fd);
        }
    }

    /// Refuses a connection at once: a reset, so the client does not wait; counted and
    /// logged. The client must not be watched (or its watch already cancelled).
    fn reject(
        &mut self,
        client: Side,
        addr: ClientAddr,
        port: u16,
        route: Option<Arc<Route>>,
        why: Rejection,
        detail: &str,
    ) {
        self.refuse(client, addr, port, route, why, detail, false)
    }

    /// [`Self::reject`]; `graceful`: an answer was sent, so close without a reset (which
    /// could throw it away before it is delivered).
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &mut self,
        client: Side,
        addr: ClientAddr,
        port: u16,
        route: Option<Arc<Route>>,
        why: Rejection,
        detail: &str,
        graceful: bool,
    ) {
        let by_source = limits::is_source_refusal(why);
        if by_source {
            // A FIN, as a server that is full would answer (limits logs it, in summary).
            limits::close_gracefully(&client.fd);
        } else if !graceful {
            let _ = SockRef::from(&client.fd).set_linger(Some(Duration::ZERO));
        }
        self.driver.retire(client.fd);
        match &route {
            Some(r) => r.metrics.rejected(why),
            None => {
                if let Some(c) = self.tls_rejected.get(&port) {
                    c[why as usize].increment(1);
                }
            }
        }
        if by_source {
            return;
        }
        tracing::info!(
            client = %addr,
            port,
            map = route.as_ref().map_or("", |r| r.mapping.name.as_str()),
            reason = why.label(),
            detail,
            "connection rejected"
        );
    }

    /// Ends an admission that ran out of time (or the relay is shutting down).
    fn expire_pending(&mut self, key: Key) {
        if !matches!(
            self.entries.get(key.slot(), key.generation()),
            Some(Entry::Pending(_))
        ) {
            return;
        }
        let p = self.remove_pending(key);
        let (why, route, detail) = match p.stage {
            Stage::ProxyHeader { route } => (
                Rejection::ProxyHeader,
                Some(route),
                "no PROXY header in time",
            ),
            Stage::TlsHandshake { route, .. } | Stage::TlsFirstBytes { route, .. } => {
                (Rejection::Tls, route, "TLS handshake timed out")
            }
            Stage::WsRequest(_) => (Rejection::Ws, None, "no WebSocket request in time"),
            _ => (Rejection::Tls, None, "TLS handshake timed out"),
        };
        let why = if self.drain_until.is_some() {
            Rejection::Shutdown
        } else {
            why
        };
        self.reject(p.client, p.peer, p.port, route, why, detail);
    }

    fn run_timers(&mut self) {
        while let Some(timer) = self.timers.pop_due(self.now) {
            match timer {
                Timer::IdleSweep => self.sweep_idle(),
                Timer::PingSweep => self.sweep_pings(),
                Timer::Admission(key) => self.expire_pending(key),
                Timer::Retry(key) => self.retry(key),
                Timer::Reserve => {
                    if self.reserve.refill() {
                        tracing::info!("file descriptors free again: accepting new clients");
                        for key in self.listeners.resume(&mut self.driver) {
                            self.timers
                                .add(self.now, ACCEPT_BACKOFF, Timer::ResumeAccept(key));
                        }
                    } else {
                        self.timers.add(self.now, ACCEPT_BACKOFF, Timer::Reserve);
                    }
                }
                // While paused, the refill resumes every listener (held: the upgrade's end).
                Timer::ResumeAccept(_) if !self.listeners.accepting() => {}
                Timer::ResumeAccept(key) => {
                    if let Some(l) = self.listeners.get(key) {
                        let fd = l.listener.fd();
                        if let Err(e) = self.driver.accept(key, fd) {
                            tracing::warn!(error = %e, "cannot resume accepting");
                            self.timers
                                .add(self.now, ACCEPT_BACKOFF, Timer::ResumeAccept(key));
                        }
                    }
                }
            }
        }
    }

    fn close_all(&mut self, reason: CloseReason) {
        let keys: Vec<_> = self.entries.keys().collect();
        for (slot, generation) in keys {
            let key = Key::new(Tag::Client, slot, generation);
            match self.entries.get_mut(slot, generation) {
                Some(Entry::Relay(c)) => {
                    c.abort(reason.clone(), &mut self.pool);
                    self.finish(key);
                }
                Some(Entry::Pending(_)) => self.expire_pending(key),
                _ => {}
            }
        }
    }
}
