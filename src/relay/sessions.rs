//! The live connections as the admin socket sees them: each loop is asked through its
//! mailbox (so that no lock is taken on the data path) and answers on a channel; the
//! answers are gathered under one deadline.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{Command, Mailbox};
use crate::admin::protocol::{Selector, Session};

/// How long the loops have to answer one request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on the loops for listing and ending live connections; cheap to clone, usable
/// from any thread.
#[derive(Clone)]
pub struct Sessions {
    pub(super) mailboxes: Vec<Arc<Mailbox>>,
}

/// A loop did not answer in time (it may be stuck; the watchdog will see it too).
#[derive(Debug, thiserror::Error)]
#[error(
    "{missing} of {loops} event loops did not answer within {:?}",
    ANSWER_TIMEOUT
)]
pub struct NoAnswer {
    pub missing: usize,
    pub loops: usize,
}

impl Sessions {
    /// Every live connection (of the mapping `map`, if given), oldest first.
    pub fn list(&self, map: Option<&str>) -> Result<Vec<Session>, NoAnswer> {
        let mut all: Vec<Session> = self
            .ask(Command::Sessions)?
            .into_iter()
            .flatten()
            .filter(|s| map.map_or(true, |m| s.map == m))
            .collect();
        all.sort_by_key(|s| s.id);
        Ok(all)
    }

    /// Ends (resets both sides of) the connections `selector` names; returns their ids.
    pub fn kill(&self, selector: Selector) -> Result<Vec<u64>, NoAnswer> {
        let selector = Arc::new(selector);
        let mut ids: Vec<u64> = self
            .ask(|tx| Command::Kill(selector.clone(), tx))?
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Sends each loop the command `make` builds and gathers one answer from each.
    fn ask<T>(
        &self,
        make: impl Fn(mpsc::Sender<Vec<T>>) -> Command,
    ) -> Result<Vec<Vec<T>>, NoAnswer> {
        let (tx, rx) = mpsc::channel();
        for mb in &self.mailboxes {
            mb.send([make(tx.clone())]);
        }
        drop(tx);
        let until = Instant::now() + ANSWER_TIMEOUT;
        let mut answers = Vec::with_capacity(self.mailboxes.len());
        while answers.len() < self.mailboxes.len() {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(a) => answers.push(a),
                Err(_) => {
                    return Err(NoAnswer {
                        missing: self.mailboxes.len() - answers.len(),
                        loops: self.mailboxes.len(),
                    })
                }
            }
        }
        Ok(answers)
    }
}
