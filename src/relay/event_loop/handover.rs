//! A loop's side of an upgrade. In the old process: freeze (stop accepting, call back the
//! accepts in the kernel, let connects in flight finish for a moment, record every entry
//! that can move), then wait for the verdict: commit (let go of the moved entries without
//! a byte or a FIN: the new process holds the same sockets) or roll back (go on as if
//! nothing happened). In the new process: adopt the records handed to this loop, and once
//! every loop has, kick every entry once.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Entry, EventLoop, Key, Tag, TLS_HANDSHAKE_TIMEOUT};
use crate::addr::{ClientAddr, UpstreamAddr};
use crate::control::RemovedMapping;
use crate::limits::{Policy, SourcePermit};
use crate::metrics;
use crate::relay::admission::{AdmissionPermit, MappingPermit, Pending, Permit, Stage, WsRequest};
use crate::relay::backend::driver::Driver;
use crate::relay::connection::{CloseReason, Connection, Side};
use crate::relay::route::{MappingState, Route};
use crate::relay::timers::Timer;
use crate::relay::{Entrance, Frozen, Verdict};
use crate::upgrade::state::{ConnRecord, PendingRecord, RelayRecord};

/// How long a freeze lets accepts already in the kernel and connects in flight finish.
const SETTLE: Duration = Duration::from_secs(2);

impl<D: Driver> EventLoop<D> {
    pub(super) fn freeze(&mut self, reply: mpsc::Sender<Frozen>, verdict: mpsc::Receiver<Verdict>) {
        self.listeners.hold(&mut self.driver);
        // No byte may be taken in (into this process's memory) or sent from here once the
        // new process holds the sockets: every copy-path receive and send is called back,
        // and what they took in or sent is settled into the records.
        let mut events = Vec::new();
        self.driver.call_back_transfers(&mut events);
        for ev in events {
            self.handle(ev);
        }
        self.settle();
        let mut records = Vec::new();
        let mut moved = Vec::new();
        let mut stayed = 0;
        for (slot, generation) in self.entries.keys().collect::<Vec<_>>() {
            let record = match self.entries.get(slot, generation) {
                Some(Entry::Relay(c)) => c.save(self.now).map(|r| ConnRecord::Relay(Box::new(r))),
                Some(Entry::Pending(p)) => pending_record(p).map(ConnRecord::Pending),
                _ => continue,
            };
            match record {
                Some(r) => {
                    records.push(r);
                    moved.push(Key::new(Tag::Client, slot, generation));
                }
                None => stayed += 1,
            }
        }
        self.driver.flush();
        if reply.send(Frozen { records, stayed }).is_err() {
            return self.thaw();
        }
        // Frozen: no byte moves here until the verdict.
        match verdict.recv() {
            Ok(Verdict::Commit) => self.let_go(moved),
            Ok(Verdict::Rollback) | Err(_) => self.thaw(),
        }
    }

    /// Runs the loop (accepting nothing, receiving and sending nothing on the copy path)
    /// until no accept, copy-path operation or connect is in flight, for at most
    /// [`SETTLE`].
    fn settle(&mut self) {
        let until = Instant::now() + SETTLE;
        let mut events = Vec::new();
        loop {
            let connecting = self.entries.keys().any(|(s, g)| {
                matches!(self.entries.get(s, g), Some(Entry::Relay(c))
                    if !c.connected && !c.hold.as_ref().is_some_and(|h| h.waiting))
            });
            let busy =
                connecting || self.driver.accepts_in_flight() || self.driver.transfers_in_flight();
            if !busy || Instant::now() >= until {
                return;
            }
            if self
                .driver
                .wait(Some(Duration::from_millis(5)), &mut events)
                .is_err()
            {
                return;
            }
            self.now = Instant::now();
            for ev in events.drain(..) {
                self.handle(ev);
            }
            for key in std::mem::take(&mut self.pending) {
                self.service(key);
            }
        }
    }

    /// Commit: the new process has every moved socket. Their copies here are closed
    /// without a shutdown or a linger (no FIN, no reset: the new process holds them), the
    /// listeners are given up, and the loop serves what stayed until it ends.
    fn let_go(&mut self, moved: Vec<Key>) {
        // A loop that keeps nothing ends next, and its driver's end unregisters everything
        // at once (io_uring: one cancel of all; epoll: its set goes with its descriptor).
        // Unregistering each socket first would cost more than the rest of the hand-over:
        // io_uring looks a poll up for each cancel by key among all of them (0.7 s for
        // 18,000 sockets here, `perf`: `io_cancel_req_match`), on cores the new process
        // needs meanwhile.
        let keeps = self.entries.keys().count() > moved.len();
        for key in moved {
            match self.entries.remove(key.slot(), key.generation()) {
                Some(Entry::Relay(c)) => {
                    if keeps {
                        self.driver.forget(key, c.client.fd.as_raw_fd());
                        self.driver.forget(
                            key.with_tag(Tag::Upstream).with_attempt(c.attempt),
                            c.upstream.fd.as_raw_fd(),
                        );
                    }
                    for fd in c.forget(&mut self.pool) {
                        self.driver.retire(fd);
                    }
                }
                Some(Entry::Pending(p)) => {
                    metrics::pending_admission().decrement(1.0);
                    if keeps {
                        self.driver.forget(key, p.client.fd.as_raw_fd());
                    }
                    self.driver.retire(p.client.fd);
                }
                _ => {}
            }
        }
        for addr in self.listeners.addrs() {
            self.listeners.remove(&mut self.driver, addr);
        }
        self.driver.flush();
        self.handed_over = true;
    }

    /// Rollback: accept again and give every entry a turn (what arrived meanwhile waits in
    /// the kernel and is reported anyway; the kick is for certainty).
    fn thaw(&mut self) {
        self.driver.resume_transfers();
        for key in self.listeners.release(&mut self.driver) {
            self.timers
                .add(self.now, super::ACCEPT_BACKOFF, Timer::ResumeAccept(key));
        }
        self.kick();
    }

    /// Every entry once, as if each of its sockets had just been reported ready.
    pub(super) fn kick(&mut self) {
        for (slot, generation) in self.entries.keys().collect::<Vec<_>>() {
            let key = Key::new(Tag::Client, slot, generation);
            match self.entries.get_mut(slot, generation) {
                Some(Entry::Relay(c)) => {
                    for side in [&mut c.client, &mut c.upstream] {
                        side.readable = true;
                        side.writable = true;
                    }
                    self.pending.push(key);
                }
                Some(Entry::Pending(_)) => self.advance(key),
                _ => {}
            }
        }
    }

    /// The new process: takes over the records given to this loop. Nothing is watched,
    /// read, written, timed or connected here (the old process may still roll back);
    /// [`Self::start_adopted`] starts them once it has let go.
    /// Returns how many were adopted, or the first record that does not check out.
    pub(super) fn adopt(
        &mut self,
        records: Vec<ConnRecord>,
        mut fds: HashMap<RawFd, OwnedFd>,
    ) -> Result<usize, String> {
        let mut n = 0;
        for record in records {
            match record {
                ConnRecord::Relay(r) => self.adopt_relay(&r, &mut fds)?,
                ConnRecord::Pending(p) => self.adopt_pending(&p, &mut fds)?,
            }
            n += 1;
        }
        Ok(n)
    }

    /// The route of an adopted connection: its port's route in force, if it leads to the
    /// same upstream; else (its mapping was removed or retargeted meanwhile) a route of
    /// its own, and whether `removed_mapping = "close"` ends it once started.
    fn adopted_route(&self, r: &RelayRecord) -> (Arc<Route>, bool) {
        match self.routes.get(&r.port) {
            Some(route) if route.upstream.0 == r.upstream => (route.clone(), false),
            _ => {
                let mapping = crate::control::Mapping::detached(&r.map, r.port, r.upstream);
                let route = Arc::new(Route::new(
                    r.port,
                    UpstreamAddr(r.upstream),
                    Arc::new(MappingState::new(&mapping, None)),
                ));
                (
                    route,
                    self.settings.removed_mapping == RemovedMapping::Close,
                )
            }
        }
    }

    fn adopt_relay(
        &mut self,
        r: &RelayRecord,
        fds: &mut HashMap<RawFd, OwnedFd>,
    ) -> Result<(), String> {
        let why = |e: std::io::Error| format!("connection {}: {e}", r.id);
        let (route, doomed) = self.adopted_route(r);
        let ip = r.client_addr.ip();
        let sources = &self.shared.sources;
        let source_permit = match Policy::of(&self.settings, route.mapping.per_source(), ip) {
            Some(policy) => sources.adopt(ip, &policy),
            None => SourcePermit::none(sources),
        };
        let caps = (
            Permit::adopt(&self.shared),
            MappingPermit::adopt(&route.mapping),
            source_permit,
        );
        let c = Connection::adopt(r, fds, route, caps, &mut self.pool, self.now).map_err(why)?;
        c.route.metrics.active.increment(1.0);
        let start = if doomed {
            Start::Close
        } else if c.connected {
            Start::Relay
        } else if c.hold.as_ref().is_some_and(|h| h.waiting) {
            Start::Retry
        } else {
            Start::Reconnect
        };
        let (slot, generation) = self.entries.insert(Entry::Relay(c));
        self.adopting
            .push((Key::new(Tag::Client, slot, generation), start));
        Ok(())
    }

    /// Starts what [`Self::adopt`] took over: watches its sockets, arms its timers and
    /// connects, as if it had been accepted here. Then accepting starts.
    pub(super) fn start_adopted(&mut self) {
        for (key, start) in std::mem::take(&mut self.adopting) {
            let Some(entry) = self.entries.get(key.slot(), key.generation()) else {
                continue;
            };
            let attempt = match entry {
                Entry::Relay(c) => c.attempt,
                _ => 0,
            };
            match start {
                Start::Pending(timeout) => {
                    self.watch_client(key);
                    self.timers.add(self.now, timeout, Timer::Admission(key));
                }
                Start::Relay => {
                    self.watch_client(key);
                    let quiet = self.reads_quietly(key);
                    if let Some(Entry::Relay(c)) = self.entries.get(key.slot(), key.generation()) {
                        let fd = c.upstream.fd.as_raw_fd();
                        let ukey = key.with_tag(Tag::Upstream).with_attempt(attempt);
                        let watched = if quiet {
                            self.driver.watch_quietly(ukey, fd)
                        } else {
                            self.driver.watch(ukey, fd)
                        };
                        if let Err(e) = watched {
                            tracing::warn!(error = %e, "cannot watch an adopted upstream socket");
                        }
                    }
                    self.arm_idle_sweep();
                    self.arm_ping_sweep(key);
                }
                Start::Retry => {
                    self.watch_client(key);
                    self.timers.add(
                        self.now,
                        Duration::from_millis(50),
                        Timer::Retry(key.with_attempt(attempt)),
                    );
                }
                Start::Reconnect => {
                    self.watch_client(key);
                    self.reconnect_adopted(key);
                }
                Start::Close => {
                    // Its mapping was removed (or retargeted) while it moved, and
                    // `removed_mapping = "close"`: it ends as a reload would end it.
                    if let Some(Entry::Relay(c)) =
                        self.entries.get_mut(key.slot(), key.generation())
                    {
                        c.abort(CloseReason::Reload, &mut self.pool);
                    }
                    self.finish(key);
                }
            }
        }
        for key in self.listeners.release(&mut self.driver) {
            self.timers
                .add(self.now, super::ACCEPT_BACKOFF, Timer::ResumeAccept(key));
        }
    }

    fn reconnect_adopted(&mut self, key: Key) {
        let Some(Entry::Relay(c)) = self.entries.get(key.slot(), key.generation()) else {
            return;
        };
        let addr = c.route.upstream.0;
        let socket = match self.upstream_socket(&addr) {
            Ok(s) => s,
            Err(e) => {
                if let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) {
                    c.abort(CloseReason::connect(&e), &mut self.pool);
                }
                return self.finish(key);
            }
        };
        let Some(Entry::Relay(c)) = self.entries.get_mut(key.slot(), key.generation()) else {
            return;
        };
        // What a held connection replays goes to the new socket from its start.
        if let Some(r) = c.hold.as_mut().and_then(|h| h.replay.as_mut()) {
            r.restart();
        }
        let old = std::mem::replace(&mut c.upstream, Side::new(socket.into()));
        self.driver.retire(old.fd);
        self.start_connect(key);
    }

    fn adopt_pending(
        &mut self,
        p: &PendingRecord,
        fds: &mut HashMap<RawFd, OwnedFd>,
    ) -> Result<(), String> {
        let why = |e: std::io::Error| format!("connection in admission on port {}: {e}", p.port);
        let fd = fds
            .remove(&p.client.fd)
            .ok_or_else(|| format!("fd {} was not handed over", p.client.fd))?;
        let client = Side::adopt(&p.client, fd).map_err(why)?;
        let (stage, timeout) = match (self.listeners.entrance_for(p.listen), &p.ws_head) {
            (Some(Entrance::Mapped(route)), None) => (
                Stage::ProxyHeader { route },
                self.settings.proxy_header_timeout,
            ),
            (Some(Entrance::Ws(endpoint)), Some(head)) => (
                Stage::WsRequest(WsRequest {
                    endpoint,
                    head: head.clone(),
                    tls: None,
                    sni_route: None,
                }),
                TLS_HANDSHAKE_TIMEOUT,
            ),
            _ => {
                // Its entrance is gone (or is another kind now): refused as a connection to
                // a port no longer served this way is.
                tracing::info!(port = p.port, client = %p.peer, "connection in admission closed at adoption: its entrance is gone");
                return Ok(());
            }
        };
        let (slot, generation) = self.entries.insert(Entry::Pending(Pending {
            client,
            peer: ClientAddr(p.peer),
            port: p.port,
            stage,
            permit: AdmissionPermit::adopt(&self.shared),
        }));
        metrics::pending_admission().increment(1.0);
        self.adopting.push((
            Key::new(Tag::Client, slot, generation),
            Start::Pending(timeout),
        ));
        Ok(())
    }
}

/// How an adopted entry starts once the old process has let go.
pub(super) enum Start {
    /// Connected: watch both sockets.
    Relay,
    /// Held, waiting for its next attempt.
    Retry,
    /// Its connect was in flight: a new socket and a new connect (no byte went to the
    /// old one: bytes go only once connected).
    Reconnect,
    /// Its mapping is gone under `removed_mapping = "close"`.
    Close,
    /// In admission, with this timeout.
    Pending(Duration),
}

/// The record of a connection in admission, if it can move: one awaiting a PROXY header
/// (peeked only: nothing of it was read) or a `ws://` request. TLS handshakes stay.
fn pending_record(p: &Pending) -> Option<PendingRecord> {
    let ws_head = match &p.stage {
        Stage::ProxyHeader { .. } => None,
        Stage::WsRequest(r) if r.tls.is_none() => Some(r.head.clone()),
        _ => return None,
    };
    let client = p.client.save();
    Some(PendingRecord {
        listen: client.local?,
        client,
        peer: p.peer.0,
        port: p.port,
        ws_head,
        left_ms: 0,
    })
}
