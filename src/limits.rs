//! Per-source limits: how many connections one client source may have open at once, and
//! how fast it may open new ones. One table for the whole process, shared by every loop
//! (a per-loop count would let a client have the cap once per loop).
//!
//! - A *source* is the real client's IPv4 address, or its IPv6 /64 (one host rotates its
//!   addresses within a /64); an IPv4-mapped IPv6 address is its IPv4 address.
//! - The table is 64 shards, each a `Mutex<HashMap>`, taken only when a connection is
//!   admitted and when it ends, never on the data path. An entry holds the source's live
//!   connections and its rate state: 32 bytes with its key.
//! - Memory is bounded: at most [`CAPACITY`] entries. An entry that says nothing (no live
//!   connection, a full bucket) is removed when its last connection ends, or by a sweep of
//!   its shard (at most once a second per shard, bounded by the shard's size). When a shard
//!   is full of entries that still say something, a new source is admitted untracked and
//!   counted in `portrelay_per_source_table_full_total` (fail open).
//! - The rate is a token bucket of BURST refilled over PERIOD, kept as a GCRA "theoretical
//!   arrival time" (one number per entry): each connection moves it PERIOD/BURST on, and a
//!   connection is refused while that would put it more than PERIOD ahead of now.
//! - A refusal is logged on its own only when none was logged for a while; the others are
//!   summed up in one line every [`SUMMARY_EVERY`] (how many, by reason, from how many
//!   sources), so a scan cannot flood the log.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;

use crate::control::{RelaySettings, SourceRate};
use crate::metrics::{Rejection, PER_SOURCE_TABLE_FULL};

const SHARDS: usize = 64;
/// Entries one shard may hold: 7/8 of 4096, so that a full shard's map never grows past
/// 4096 buckets.
const SHARD_CAPACITY: usize = 3584;
/// Entries the whole table may hold (229,376: about 8 MiB when full).
pub const CAPACITY: usize = SHARDS * SHARD_CAPACITY;
/// How often a shard is swept of entries that say nothing, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often refusals are summed up in the log, while there are any.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A client source: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    v6: bool,
    /// The IPv4 address, or the IPv6 address's first 64 bits.
    bits: u64,
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => SourceKey {
                v6: false,
                bits: u64::from(u32::from(a)),
            },
            IpAddr::V6(a) => SourceKey {
                v6: true,
                bits: (u128::from(a) >> 64) as u64,
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/64", Ipv6Addr::from(u128::from(self.bits) << 64))
        } else {
            Ipv4Addr::from(self.bits as u32).fmt(f)
        }
    }
}

/// What applies to one connection: the relay-wide cap per source (0: none), a mapping's
/// own cap per source (the mapping's scope and its cap), and the rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub max: u32,
    pub map: Option<(MapScope, u32)>,
    pub rate: Option<SourceRate>,
}

/// Which mapping a per-mapping count belongs to: a number that stays the same while the
/// mapping is changed in place by a reload, and is never that of another live mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapScope(pub usize);

impl Policy {
    /// The policy of the relay's settings and a mapping's own cap (`None` or 0: none), for a
    /// client at `ip`; `None` when nothing applies (off, or `ip` is exempt).
    pub fn of(
        settings: &RelaySettings,
        map: Option<(MapScope, u32)>,
        ip: IpAddr,
    ) -> Option<Policy> {
        let policy = Policy {
            max: settings.per_source_max_connections,
            map: map.filter(|(_, max)| *max > 0),
            rate: settings.per_source_rate,
        };
        if policy == Policy::default() {
            return None;
        }
        let ip = ip.to_canonical();
        let exempt = settings
            .per_source_exempt
            .iter()
            .chain(&settings.trusted_proxies)
            .any(|net| net.contains(&ip));
        (!exempt).then_some(policy)
    }
}

/// Whether a rejection is one of this module's (closed gracefully, logged in summary).
pub fn is_source_refusal(why: Rejection) -> bool {
    matches!(why, Rejection::PerSource | Rejection::Rate)
}

/// Closes a refused client with a FIN rather than a reset: the write side is shut, and
/// what the client already sent (an SSH client sends its banner at once) is read and
/// dropped, at most 16 KiB, so that the close itself does not turn into a reset.
pub fn close_gracefully(fd: &OwnedFd) {
    let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match crate::sys::recv(fd.as_raw_fd(), &mut buf) {
            Ok(n) if n == buf.len() => continue,
            _ => break,
        }
    }
}

/// An entry's key: its scope (0 for the relay-wide one, else a mapping's, whose lowest bit
/// is free), with the address family in the lowest bit, and the source's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    scope: usize,
    bits: u64,
}

impl Key {
    fn new(scope: usize, source: SourceKey) -> Key {
        debug_assert_eq!(scope & 1, 0, "a scope's lowest bit is the family's");
        Key {
            scope: scope | usize::from(source.v6),
            bits: source.bits,
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// The rate's theoretical arrival time, in microseconds of the table's clock: the
    /// bucket is full once the clock has passed it.
    tat: u64,
    /// Live connections of this source (in this scope).
    active: u32,
    /// The summary window in which it was last refused (to count distinct sources).
    noted: u32,
}

impl Entry {
    /// Says nothing: no live connection and a full bucket.
    fn idle(&self, now: u64) -> bool {
        self.active == 0 && self.tat <= now
    }
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Key, Entry>,
    /// When it was last swept (table clock).
    swept: u64,
}

impl Shard {
    /// Drops the entries that say nothing, and gives memory back once most are gone.
    fn sweep(&mut self, now: u64) {
        self.swept = now;
        self.entries.retain(|_, e| !e.idle(now));
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }
}

/// What taking a place in one scope came to.
enum Taken {
    Yes,
    /// The shard is full: admitted, not counted.
    Untracked,
    /// Refused; whether the source was not refused before in this summary window.
    Refused(Rejection, bool),
}

/// The process-wide table of sources.
pub struct PerSourceTable {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    start: Instant,
    full: Counter,
    refusals: Arc<Refusals>,
}

impl Default for PerSourceTable {
    fn default() -> Self {
        PerSourceTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            start: Instant::now(),
            full: metrics::counter!(PER_SOURCE_TABLE_FULL),
            refusals: Arc::default(),
        }
    }
}

impl PerSourceTable {
    /// Takes a place for a new connection from `ip` under `policy`, or says why not
    /// (`PerSource`: a cap is reached; `Rate`: the bucket is empty). `map` and `port` are
    /// for the log.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        policy: &Policy,
        map: &str,
        port: u16,
    ) -> Result<SourcePermit, Rejection> {
        self.admit_at(self.now(), ip, policy, map, port)
    }

    /// A place for a connection that is live already (adopted at an upgrade): counted in
    /// its source's live connections, never refused (neither a cap nor the rate applies to
    /// a connection that exists).
    pub fn adopt(self: &Arc<Self>, ip: IpAddr, policy: &Policy) -> SourcePermit {
        let now = self.now();
        let source = SourceKey::of(ip);
        let mut permit = SourcePermit {
            table: self.clone(),
            held: [None, None],
        };
        let scopes = [
            policy.map.map(|(scope, _)| Key::new(scope.0, source)),
            (policy.max > 0 || policy.rate.is_some()).then(|| Key::new(0, source)),
        ];
        for (i, key) in scopes.into_iter().enumerate() {
            let Some(key) = key else { continue };
            match self.take(key, now, 0, None) {
                Taken::Yes => permit.held[i] = Some(key),
                _ => self.full.increment(1),
            }
        }
        permit
    }

    /// [`Self::admit`] at `now` on the table's clock (microseconds).
    fn admit_at(
        self: &Arc<Self>,
        now: u64,
        ip: IpAddr,
        policy: &Policy,
        map: &str,
        port: u16,
    ) -> Result<SourcePermit, Rejection> {
        let source = SourceKey::of(ip);
        let mut permit = SourcePermit {
            table: self.clone(),
            held: [None, None],
        };
        let mut scopes = [None, None];
        if let Some((scope, max)) = policy.map {
            scopes[0] = Some((Key::new(scope.0, source), max, None));
        }
        if policy.max > 0 || policy.rate.is_some() {
            scopes[1] = Some((Key::new(0, source), policy.max, policy.rate));
        }
        for (i, (key, max, rate)) in scopes.into_iter().flatten().enumerate() {
            match self.take(key, now, max, rate) {
                Taken::Yes => permit.held[i] = Some(key),
                Taken::Untracked => self.full.increment(1),
                Taken::Refused(why, new_source) => {
                    self.refusals.record(why, new_source, source, ip, map, port);
                    // Dropping the permit gives back what it took in the other scope.
                    return Err(why);
                }
            }
        }
        Ok(permit)
    }

    fn take(&self, key: Key, now: u64, max: u32, rate: Option<SourceRate>) -> Taken {
        let mut shard = self.shard(&key);
        if now.saturating_sub(shard.swept) >= SWEEP_EVERY.as_micros() as u64 {
            shard.sweep(now);
        }
        if shard.entries.len() >= SHARD_CAPACITY && !shard.entries.contains_key(&key) {
            return Taken::Untracked;
        }
        let e = shard.entries.entry(key).or_insert(Entry {
            tat: 0,
            active: 0,
            noted: u32::MAX,
        });
        let refused = if max > 0 && e.active >= max {
            Some(Rejection::PerSource)
        } else if let Some(rate) = rate {
            let (step, period) = rate_micros(rate);
            // A bucket left emptier by an earlier, stricter rate is as empty as the
            // rate in force allows, no emptier.
            e.tat = e.tat.min(now + period);
            let tat = e.tat.max(now) + step;
            if tat - now > period {
                Some(Rejection::Rate)
            } else {
                e.tat = tat;
                None
            }
        } else {
            None
        };
        match refused {
            Some(why) => {
                let window = self.refusals.window.load(Ordering::Relaxed);
                let new_source = e.noted != window;
                e.noted = window;
                Taken::Refused(why, new_source)
            }
            None => {
                e.active += 1;
                Taken::Yes
            }
        }
    }

    fn release(&self, key: Key) {
        let now = self.now();
        let mut shard = self.shard(&key);
        if let Some(e) = shard.entries.get_mut(&key) {
            e.active = e.active.saturating_sub(1);
            if e.idle(now) {
                shard.entries.remove(&key);
            }
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding a shard cannot leave an entry half-changed.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Microseconds since the table was made.
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Entries held now (tests and benchmarks).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the shards' maps have allocated (tests and benchmarks): buckets of key and
    /// entry, plus a control byte each.
    pub fn allocated_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(Key, Entry)>() + 1;
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entries
                    .capacity()
            })
            .map(|cap| {
                if cap == 0 {
                    0
                } else {
                    (cap * 8 / 7).next_power_of_two() * bucket
                }
            })
            .sum()
    }
}

/// A rate's step (PERIOD/BURST) and period, in microseconds.
fn rate_micros(rate: SourceRate) -> (u64, u64) {
    let period = rate.period.as_micros().min(u128::from(u64::MAX / 4)) as u64;
    ((period / u64::from(rate.burst.max(1))).max(1), period)
}

/// A connection's places in the per-source counts (none, one or two scopes), given back
/// when dropped.
pub struct SourcePermit {
    table: Arc<PerSourceTable>,
    held: [Option<Key>; 2],
}

impl SourcePermit {
    /// A permit that holds no place (nothing applies to the connection).
    pub fn none(table: &Arc<PerSourceTable>) -> SourcePermit {
        SourcePermit {
            table: table.clone(),
            held: [None, None],
        }
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        for key in self.held.iter_mut().filter_map(Option::take) {
            self.table.release(key);
        }
    }
}

/// Refusals not yet summed up in the log. The first refusal after a quiet spell is logged
/// at once; a reporter thread then logs one summary per [`SUMMARY_EVERY`] while there are
/// refusals, and goes quiet when a window had none.
#[derive(Default)]
struct Refusals {
    per_source: AtomicU64,
    rate: AtomicU64,
    sources: AtomicU64,
    /// The current summary window's number.
    window: AtomicU32,
    /// A spell of refusals is under way: the reporter is summing them up.
    spell: AtomicBool,
    reporter: OnceLock<Thread>,
}

impl Refusals {
    fn record(
        self: &Arc<Self>,
        why: Rejection,
        new_source: bool,
        source: SourceKey,
        ip: IpAddr,
        map: &str,
        port: u16,
    ) {
        let counter = match why {
            Rejection::Rate => &self.rate,
            _ => &self.per_source,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if new_source {
            self.sources.fetch_add(1, Ordering::Relaxed);
        }
        if self.spell.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(
            client = %ip,
            source = %source,
            port,
            map,
            reason = why.label(),
            "connection rejected by a per-source limit; further ones are summed up every {}s",
            SUMMARY_EVERY.as_secs()
        );
        self.reporter().unpark();
    }

    fn reporter(self: &Arc<Self>) -> &Thread {
        self.reporter.get_or_init(|| {
            let me = self.clone();
            std::thread::Builder::new()
                .name("limits-log".into())
                .spawn(move || me.report())
                .map(|h| h.thread().clone())
                // Without the thread, refusals are still counted in the metrics.
                .unwrap_or_else(|_| std::thread::current())
        })
    }

    fn report(&self) {
        loop {
            while !self.spell.load(Ordering::Acquire) {
                std::thread::park();
            }
            std::thread::sleep(SUMMARY_EVERY);
            self.window.fetch_add(1, Ordering::Relaxed);
            let per_source = self.per_source.swap(0, Ordering::Relaxed);
            let rate = self.rate.swap(0, Ordering::Relaxed);
            let sources = self.sources.swap(0, Ordering::Relaxed);
            if per_source + rate == 0 {
                self.spell.store(false, Ordering::Release);
                continue;
            }
            tracing::info!(
                per_source,
                rate,
                sources,
                seconds = SUMMARY_EVERY.as_secs(),
                "connections rejected by per-source limits in the last {}s: {} from {} sources",
                SUMMARY_EVERY.as_secs(),
                per_source + rate,
                sources
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(burst: u32, period: Duration) -> Option<SourceRate> {
        Some(SourceRate { burst, period })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let k = |s| SourceKey::of(ip(s));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
        assert_ne!(k("10.0.0.1"), k("10.0.0.2"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        // An IPv4 address is never the same source as an IPv6 /64 with the same bits.
        assert_ne!(k("0.0.0.1"), k("0:0:0:1::"));
        assert_eq!(k("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(k("10.0.0.1").to_string(), "10.0.0.1");
    }

    #[test]
    fn the_cap_counts_live_connections_and_frees_on_drop() {
        let t = Arc::new(PerSourceTable::default());
        let p = Policy {
            max: 2,
            ..Policy::default()
        };
        let a = t.admit(ip("10.0.0.1"), &p, "m", 1).unwrap();
        let _b = t.admit(ip("10.0.0.1"), &p, "m", 1).unwrap();
        assert_eq!(
            t.admit(ip("10.0.0.1"), &p, "m", 1).err(),
            Some(Rejection::PerSource)
        );
        assert!(t.admit(ip("10.0.0.2"), &p, "m", 1).is_ok());
        drop(a);
        let _c = t.admit(ip("10.0.0.1"), &p, "m", 1).unwrap();
    }

    /// Connections adopted at an upgrade are live: they are counted even past the cap
    /// (never refused), and a new one is refused while they are there.
    #[test]
    fn adopted_connections_count_against_the_cap() {
        let t = Arc::new(PerSourceTable::default());
        let p = Policy {
            max: 1,
            map: Some((MapScope(8), 1)),
            rate: None,
        };
        let a = t.adopt(ip("10.0.0.1"), &p);
        let b = t.adopt(ip("10.0.0.1"), &p);
        assert_eq!(
            t.admit(ip("10.0.0.1"), &p, "m", 1).err(),
            Some(Rejection::PerSource)
        );
        drop(a);
        assert_eq!(
            t.admit(ip("10.0.0.1"), &p, "m", 1).err(),
            Some(Rejection::PerSource),
            "one adopted connection is still there"
        );
        drop(b);
        assert!(t.admit(ip("10.0.0.1"), &p, "m", 1).is_ok());
    }

    #[test]
    fn a_mapping_cap_counts_only_its_mapping_and_a_refusal_gives_back_the_other_place() {
        let t = Arc::new(PerSourceTable::default());
        let map = |scope| Policy {
            max: 3,
            map: Some((MapScope(scope), 1)),
            rate: None,
        };
        let _a = t.admit(ip("10.0.0.1"), &map(8), "a", 1).unwrap();
        assert_eq!(
            t.admit(ip("10.0.0.1"), &map(8), "a", 1).err(),
            Some(Rejection::PerSource)
        );
        let _b = t.admit(ip("10.0.0.1"), &map(16), "b", 2).unwrap();
        // The relay-wide count is 2 of 3: the mapping's refusal took nothing.
        let _c = t.admit(ip("10.0.0.1"), &map(24), "c", 3).unwrap();
        assert_eq!(
            t.admit(ip("10.0.0.1"), &map(32), "d", 4).err(),
            Some(Rejection::PerSource)
        );
        // And the relay-wide refusal gave back mapping d's place.
        drop(_c);
        let _d = t.admit(ip("10.0.0.1"), &map(32), "d", 4).unwrap();
    }

    #[test]
    fn the_rate_admits_the_burst_then_refills() {
        let t = Arc::new(PerSourceTable::default());
        let p = Policy {
            rate: rate(3, Duration::from_millis(300)),
            ..Policy::default()
        };
        let at = |ms: u64, a: &str| t.admit_at(ms * 1000, ip(a), &p, "m", 1).map(drop);
        for _ in 0..3 {
            at(1000, "10.0.0.1").unwrap();
        }
        assert_eq!(at(1000, "10.0.0.1"), Err(Rejection::Rate));
        assert!(at(1000, "10.0.0.2").is_ok());
        // One token per 100 ms.
        assert_eq!(at(1099, "10.0.0.1"), Err(Rejection::Rate));
        assert!(at(1100, "10.0.0.1").is_ok());
        assert_eq!(at(1150, "10.0.0.1"), Err(Rejection::Rate));
        // After a whole period the burst is back, and no more.
        for _ in 0..3 {
            at(1500, "10.0.0.1").unwrap();
        }
        assert_eq!(at(1500, "10.0.0.1"), Err(Rejection::Rate));
        // A looser rate after a reload applies at once: one token per 10 ms now.
        let looser = Policy {
            rate: rate(3, Duration::from_millis(30)),
            ..Policy::default()
        };
        let at = |ms: u64| {
            t.admit_at(ms * 1000, ip("10.0.0.1"), &looser, "m", 1)
                .map(drop)
        };
        assert_eq!(at(1500), Err(Rejection::Rate));
        assert!(at(1510).is_ok());
    }

    #[test]
    fn entries_that_say_nothing_go_away() {
        let t = Arc::new(PerSourceTable::default());
        let p = Policy {
            max: 5,
            ..Policy::default()
        };
        let a = t.admit(ip("10.0.0.1"), &p, "m", 1).unwrap();
        assert_eq!(t.len(), 1);
        drop(a);
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_admits_untracked() {
        let t = Arc::new(PerSourceTable::default());
        let p = Policy {
            max: 1,
            ..Policy::default()
        };
        let mut held = Vec::new();
        for i in 0..(CAPACITY as u32 + 1000) {
            let a = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            held.push(t.admit(a, &p, "m", 1).unwrap());
        }
        assert!(t.len() <= CAPACITY);
        assert!(t.len() > CAPACITY - SHARDS * 200, "{}", t.len());
        assert!(t.allocated_bytes() <= 9 << 20, "{}", t.allocated_bytes());
        drop(held);
        assert!(t.is_empty());
    }
}
