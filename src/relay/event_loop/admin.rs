//! A loop's side of the admin requests: a snapshot of its live connections, and ending
//! those a selector names.

use socket2::SockRef;

use super::{Entry, EventLoop, Key, Tag};
use crate::admin::protocol::{Selector, Session};
use crate::relay::backend::driver::Driver;
use crate::relay::connection::{CloseReason, Connection};

impl<D: Driver> EventLoop<D> {
    /// Every relayed connection of this loop, held ones included. Connections still in
    /// admission (awaiting a PROXY header, a TLS handshake or a WebSocket request) are not
    /// listed: they have no mapping yet, and their admission timeout bounds them.
    pub(super) fn sessions(&self) -> Vec<Session> {
        self.entries
            .keys()
            .filter_map(
                |(slot, generation)| match self.entries.get(slot, generation) {
                    Some(Entry::Relay(c)) => Some(self.session(c)),
                    _ => None,
                },
            )
            .collect()
    }

    fn session(&self, c: &Connection) -> Session {
        // Before the connect has bound it, the upstream socket's name is 0.0.0.0:0.
        let relay_local = SockRef::from(&c.upstream.fd)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .filter(|a| a.port() != 0);
        let held = c.hold.as_ref().is_some_and(|h| h.held);
        let state = match (c.connected, held) {
            (true, _) => "relayed",
            (false, true) => "held",
            (false, false) => "connecting",
        };
        Session {
            id: c.id,
            client: c.client_addr.0,
            via: c.via.label().to_string(),
            port: c.route.port,
            map: c.route.mapping.name.clone(),
            upstream: c.route.upstream.0,
            relay_local,
            state: state.to_string(),
            bytes_client_to_upstream: c.to_upstream.bytes,
            bytes_upstream_to_client: c.to_client.bytes,
            age_ms: c.duration(std::time::Instant::now()).as_millis() as u64,
        }
    }

    /// Ends the relayed connections `selector` names: both peers are reset (as any
    /// aborted connection's are) and each is logged with reason `killed`. Returns their ids.
    pub(super) fn kill(&mut self, selector: &Selector) -> Vec<u64> {
        let keys: Vec<_> = self.entries.keys().collect();
        let mut killed = Vec::new();
        for (slot, generation) in keys {
            let Some(Entry::Relay(c)) = self.entries.get_mut(slot, generation) else {
                continue;
            };
            if !selector.selects(c.id, &c.route.mapping.name, c.client_addr.0) {
                continue;
            }
            killed.push(c.id);
            c.abort(CloseReason::Killed, &mut self.pool);
            self.finish(Key::new(Tag::Client, slot, generation));
        }
        killed
    }
}
