//! One event loop: owns its driver, its connections, its pipe pool and its timers; runs on
//! one thread and never takes a lock on the data path (the mailbox lock is taken only when
//! the control thread has woken the loop).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};

use super::connection::{Connection, Turn};
use super::driver::{Driver, Event, Key, Tag};
use super::pipe::PipePool;
use super::route::{Listener, Route};
use super::slab::Slab;
use super::{Command, Mailbox, Shared};
use crate::addr::ClientAddr;
use crate::control::RelaySettings;
use crate::metrics::{self, ConnectFailure, Rejection, Via};

/// How long a listener rests after an accept error such as EMFILE before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

struct LoopListener {
    listener: Arc<Listener>,
    route: Arc<Route>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Idle(u64),
    ResumeAccept(u64),
}

pub struct EventLoop<D: Driver> {
    driver: D,
    shared: Arc<Shared>,
    settings: Arc<RelaySettings>,
    mailbox: Arc<Mailbox>,
    conns: Slab<Connection>,
    listeners: Slab<LoopListener>,
    listener_keys: HashMap<SocketAddr, (u32, u32)>,
    pool: PipePool,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Connections that used up their turn with work left.
    pending: Vec<Key>,
    events: Vec<Event>,
    now: Instant,
    /// Set once shutdown began: when the grace period ends.
    drain_until: Option<Instant>,
    /// This loop's pipe counts as last added to the relay-wide gauges.
    published_pipes: (usize, usize),
}

impl<D: Driver> EventLoop<D> {
    pub fn new(
        driver: D,
        shared: Arc<Shared>,
        settings: Arc<RelaySettings>,
        mailbox: Arc<Mailbox>,
        max_pipes: usize,
    ) -> Self {
        EventLoop {
            driver,
            shared,
            settings,
            mailbox,
            conns: Slab::new(),
            listeners: Slab::new(),
            listener_keys: HashMap::new(),
            pool: PipePool::new(max_pipes),
            timers: BinaryHeap::new(),
            pending: Vec::new(),
            events: Vec::with_capacity(1024),
            now: Instant::now(),
            drain_until: None,
            published_pipes: (0, 0),
        }
    }

    /// Runs until shutdown has finished draining.
    pub fn run(mut self) -> io::Result<()> {
        let result = self.serve();
        self.driver.close();
        self.pool = PipePool::new(0);
        self.publish_pipes();
        result
    }

    fn serve(&mut self) -> io::Result<()> {
        self.take_commands();
        loop {
            if let Some(until) = self.drain_until {
                if self.conns.is_empty() {
                    return Ok(());
                }
                if self.now >= until {
                    self.close_all("shutdown");
                    return Ok(());
                }
            }
            let timeout = if self.pending.is_empty() {
                self.next_timeout()
            } else {
                Some(Duration::ZERO)
            };
            let mut events = std::mem::take(&mut self.events);
            self.driver.wait(timeout, &mut events)?;
            self.now = Instant::now();
            for ev in events.drain(..) {
                self.handle(ev);
            }
            self.events = events;
            self.run_timers();
            for key in std::mem::take(&mut self.pending) {
                self.service(key);
            }
            self.publish_pipes();
        }
    }

    /// Adds this loop's change in pipe counts to the relay-wide gauges (no atomics when
    /// nothing changed).
    fn publish_pipes(&mut self) {
        let now = (self.pool.in_use(), self.pool.idle());
        if now != self.published_pipes {
            let g = metrics::global();
            g.pipes_in_use
                .increment(now.0 as f64 - self.published_pipes.0 as f64);
            g.pipes_idle
                .increment(now.1 as f64 - self.published_pipes.1 as f64);
            self.published_pipes = now;
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let next = match (timer, self.drain_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Wake => self.take_commands(),
            Event::Accepted(key, fd) => self.accepted(key, fd),
            Event::AcceptFailed(key, e) => {
                if let Some(l) = self.listeners.get(key.slot(), key.generation()) {
                    tracing::warn!(listen = %l.listener.addr, error = %e, "accept failed; backing off");
                    self.timers.push(Reverse((
                        self.now + ACCEPT_BACKOFF,
                        Timer::ResumeAccept(key.0),
                    )));
                }
            }
            Event::Connected(key, result) => self.connected(key, result),
            Event::Ready {
                key,
                readable,
                writable,
            } => {
                let Some(c) = self.conns.get_mut(key.slot(), key.generation()) else {
                    return;
                };
                let side = if key.tag() == Tag::Client {
                    &mut c.client
                } else {
                    &mut c.upstream
                };
                side.readable |= readable;
                side.writable |= writable;
                if c.connected {
                    self.service(key);
                }
            }
            Event::Unwatched(key) => {
                let Some(c) = self.conns.get_mut(key.slot(), key.generation()) else {
                    return;
                };
                let side = if key.tag() == Tag::Client {
                    &mut c.client
                } else {
                    &mut c.upstream
                };
                side.readable = true;
                side.writable = true;
                let fd = side.fd.as_raw_fd();
                let _ = self.driver.watch(key, fd);
                if c.connected {
                    self.service(key);
                }
            }
        }
    }

    fn take_commands(&mut self) {
        for cmd in self.mailbox.take() {
            match cmd {
                Command::Settings(settings) => self.settings = settings,
                Command::Listen(listener, route) => {
                    let addr = listener.addr.0;
                    let slot = self.listeners.insert(LoopListener {
                        listener: listener.clone(),
                        route,
                    });
                    let key = Key::new(Tag::Listener, slot.0, slot.1);
                    if let Err(e) = self.driver.accept(key, listener.fd()) {
                        tracing::error!(listen = %listener.addr, error = %e, "cannot accept");
                        self.listeners.remove(slot.0, slot.1);
                    } else {
                        self.listener_keys.insert(addr, slot);
                    }
                }
                Command::Reroute(route) => {
                    for ip in self.bind_ips_of(route.port) {
                        let addr = SocketAddr::new(ip, route.port);
                        if let Some(&(slot, generation)) = self.listener_keys.get(&addr) {
                            if let Some(l) = self.listeners.get_mut(slot, generation) {
                                l.route = route.clone();
                            }
                        }
                    }
                }
                Command::Unlisten(addr) => self.unlisten(addr),
                Command::CloseRoutes(routes) => {
                    let doomed: HashSet<*const Route> = routes.iter().map(Arc::as_ptr).collect();
                    let keys: Vec<_> = self.conns.keys().collect();
                    for (slot, generation) in keys {
                        let c = self.conns.get_mut(slot, generation).expect("listed");
                        if doomed.contains(&Arc::as_ptr(&c.route)) {
                            c.abort("reload".to_string(), &mut self.pool);
                            self.finish(Key::new(Tag::Client, slot, generation));
                        }
                    }
                }
                Command::Barrier(ack) => {
                    self.driver.flush();
                    let _ = ack.send(());
                }
                Command::Shutdown { grace } => {
                    let addrs: Vec<_> = self.listener_keys.keys().copied().collect();
                    for addr in addrs {
                        self.unlisten(addr);
                    }
                    self.drain_until = Some(self.now + grace);
                }
            }
        }
    }

    /// The addresses this loop listens on for `port` (the bind addresses of the file).
    fn bind_ips_of(&self, port: u16) -> Vec<std::net::IpAddr> {
        self.listener_keys
            .keys()
            .filter(|a| a.port() == port)
            .map(|a| a.ip())
            .collect()
    }

    fn unlisten(&mut self, addr: SocketAddr) {
        if let Some((slot, generation)) = self.listener_keys.remove(&addr) {
            if let Some(l) = self.listeners.remove(slot, generation) {
                let key = Key::new(Tag::Listener, slot, generation);
                self.driver.stop_accept(key, l.listener.fd());
            }
        }
    }

    fn accepted(&mut self, key: Key, fd: OwnedFd) {
        let Some(l) = self.listeners.get(key.slot(), key.generation()) else {
            return;
        };
        let route = l.route.clone();
        let client = Socket::from(fd);
        let Ok(Some(peer)) = client.peer_addr().map(|a| a.as_socket()) else {
            return; // gone already
        };
        let client_addr = ClientAddr(peer);
        if self.drain_until.is_some() {
            return reject(client, client_addr, &route, Rejection::Shutdown);
        }
        if !route.mapping.allows(peer.ip()) {
            return reject(client, client_addr, &route, Rejection::Acl);
        }
        if !self.shared.try_acquire() {
            return reject(client, client_addr, &route, Rejection::Limit);
        }
        if !route.mapping.try_acquire() {
            self.shared.release();
            return reject(client, client_addr, &route, Rejection::Limit);
        }
        let upstream = match self.upstream_socket(&route.upstream.0) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client = %client_addr, port = route.port, error = %e, "cannot create upstream socket");
                route.mapping.release();
                self.shared.release();
                return;
            }
        };
        self.tune(&client);
        route.metrics.accepted(Via::Direct);
        let conn = Connection::new(
            client.into(),
            upstream.into(),
            route.clone(),
            client_addr,
            self.now,
        );
        let (slot, generation) = self.conns.insert(conn);
        let c = self.conns.get_mut(slot, generation).expect("just inserted");
        let client_key = Key::new(Tag::Client, slot, generation);
        let upstream_key = Key::new(Tag::Upstream, slot, generation);
        if let Err(e) = self.driver.watch(client_key, c.client.fd.as_raw_fd()) {
            tracing::warn!(error = %e, "cannot watch client socket");
        }
        let fd = c.upstream.fd.as_raw_fd();
        self.driver.connect(
            upstream_key,
            fd,
            &route.upstream_sockaddr,
            self.settings.connect_timeout,
        );
        if let Some(idle) = self.settings.idle_timeout {
            self.timers
                .push(Reverse((self.now + idle, Timer::Idle(client_key.0))));
        }
    }

    fn upstream_socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let s = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM.nonblocking().cloexec(),
            None,
        )?;
        self.tune(&s);
        Ok(s)
    }

    /// TCP_NODELAY (no Nagle delay on keystrokes) and keepalive, on both sides.
    fn tune(&self, s: &Socket) {
        let _ = s.set_nodelay(true);
        if let Some(t) = self.settings.tcp_keepalive {
            let ka = TcpKeepalive::new()
                .with_time(t)
                .with_interval(t.min(Duration::from_secs(10)));
            let _ = s.set_tcp_keepalive(&ka);
        }
    }

    fn connected(&mut self, key: Key, result: io::Result<()>) {
        let Some(c) = self.conns.get_mut(key.slot(), key.generation()) else {
            return;
        };
        match result {
            Ok(()) => {
                c.connected = true;
                c.upstream.writable = true;
                metrics::global()
                    .connect_duration
                    .record(c.duration(self.now).as_secs_f64());
                self.service(key);
            }
            Err(e) => {
                c.route.metrics.connect_failed(ConnectFailure::of(&e));
                let reason = if e.kind() == io::ErrorKind::TimedOut {
                    "error: connect: timed out".to_string()
                } else {
                    format!("error: connect: {e}")
                };
                c.abort(reason, &mut self.pool);
                self.finish(key);
            }
        }
    }

    /// Gives a connection a turn: moves bytes, then finishes it or queues it again.
    fn service(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(key.slot(), key.generation()) else {
            return;
        };
        if !c.connected {
            return;
        }
        let before = (c.to_upstream.bytes, c.to_client.bytes);
        let turn = c.pump(&mut self.pool);
        c.last_active = self.now;
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

    /// Removes a done connection: unwatch, close, log.
    fn finish(&mut self, key: Key) {
        let Some(c) = self.conns.remove(key.slot(), key.generation()) else {
            return;
        };
        let client_key = Key::new(Tag::Client, key.slot(), key.generation());
        let upstream_key = Key::new(Tag::Upstream, key.slot(), key.generation());
        self.driver.unwatch(client_key, c.client.fd.as_raw_fd());
        self.driver.unwatch(upstream_key, c.upstream.fd.as_raw_fd());
        let r = &c.route;
        tracing::info!(
            client = %c.client_addr,
            via = "direct",
            port = r.port,
            map = %r.mapping.name,
            upstream = %r.upstream,
            bytes_client_to_upstream = c.to_upstream.bytes,
            bytes_upstream_to_client = c.to_client.bytes,
            duration_ms = c.duration(self.now).as_millis() as u64,
            reason = c.reason(),
            "connection closed"
        );
        r.metrics.active.decrement(1.0);
        r.metrics.session.record(c.duration(self.now).as_secs_f64());
        r.mapping.release();
        self.shared.release();
        c.close(&mut self.pool);
    }

    fn run_timers(&mut self) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Idle(k) => {
                    let key = Key(k);
                    let Some(idle) = self.settings.idle_timeout else {
                        continue;
                    };
                    let Some(c) = self.conns.get_mut(key.slot(), key.generation()) else {
                        continue;
                    };
                    let due = c.last_active + idle;
                    if due <= self.now {
                        c.abort("idle".to_string(), &mut self.pool);
                        self.finish(key);
                    } else {
                        self.timers.push(Reverse((due, Timer::Idle(k))));
                    }
                }
                Timer::ResumeAccept(k) => {
                    let key = Key(k);
                    if let Some(l) = self.listeners.get(key.slot(), key.generation()) {
                        let fd = l.listener.fd();
                        if let Err(e) = self.driver.accept(key, fd) {
                            tracing::warn!(error = %e, "cannot resume accepting");
                            self.timers
                                .push(Reverse((self.now + ACCEPT_BACKOFF, Timer::ResumeAccept(k))));
                        }
                    }
                }
            }
        }
    }

    fn close_all(&mut self, reason: &str) {
        let keys: Vec<_> = self.conns.keys().collect();
        for (slot, generation) in keys {
            if let Some(c) = self.conns.get_mut(slot, generation) {
                c.abort(reason.to_string(), &mut self.pool);
                self.finish(Key::new(Tag::Client, slot, generation));
            }
        }
    }
}

/// Refuses a connection at once: a reset, so the client does not wait; counted and logged.
fn reject(client: Socket, client_addr: ClientAddr, route: &Route, why: Rejection) {
    let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
    route.metrics.rejected(why);
    tracing::info!(
        client = %client_addr,
        port = route.port,
        map = %route.mapping.name,
        reason = why.label(),
        "connection rejected"
    );
}
