//! A loop's deadlines: one heap of (when, what). Connections have no timer of their own
//! (`idle_timeout` is one sweep per loop); admissions, accept back-offs and held connections' retries have one each.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::backend::driver::Key;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// Close the connections idle for `idle_timeout`.
    IdleSweep,
    /// Ping the WebSocket clients quiet for their `ping_interval`.
    PingSweep,
    /// The admission of the entry with this key has run out of time.
    Admission(Key),
    /// Accept again on the listener with this key, after an accept error.
    ResumeAccept(Key),
    /// Connect the held connection with this key again (its attempt in the key).
    Retry(Key),
    /// Take the loop's spare descriptor again, and accept again once it is held.
    Reserve,
}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// An `IdleSweep`, a `PingSweep` is in the heap.
    armed: [bool; 2],
}

impl Timers {
    /// `timer` fires once `after` has passed from `now` (saturating: never a panic).
    pub fn add(&mut self, now: Instant, after: Duration, timer: Timer) {
        self.heap
            .push(Reverse((super::deadline(now, after), timer)));
    }

    /// Arms a sweep (`IdleSweep` or `PingSweep`) `every` from `now`, unless it is armed.
    pub fn arm_sweep(&mut self, now: Instant, every: Duration, sweep: Timer) {
        let i = Self::sweep_index(sweep);
        if !self.armed[i] {
            self.add(now, every, sweep);
            self.armed[i] = true;
        }
    }

    fn sweep_index(sweep: Timer) -> usize {
        match sweep {
            Timer::IdleSweep => 0,
            Timer::PingSweep => 1,
            _ => unreachable!("not a sweep: {sweep:?}"),
        }
    }

    /// When the next timer fires.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next timer due at `now`, taken out.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => {}
            _ => return None,
        }
        let Reverse((_, timer)) = self.heap.pop()?;
        if matches!(timer, Timer::IdleSweep | Timer::PingSweep) {
            self.armed[Self::sweep_index(timer)] = false;
        }
        Some(timer)
    }
}
