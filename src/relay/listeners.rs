//! A loop's listeners: the shared listening sockets it accepts from, and where each leads.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use super::backend::driver::{Driver, Key, Tag};
use super::route::Listener;
use super::slab::Slab;
use super::Entrance;

pub struct LoopListener {
    pub listener: Arc<Listener>,
    pub entrance: Entrance,
}

#[derive(Default)]
pub struct Listeners {
    slab: Slab<LoopListener>,
    by_addr: HashMap<SocketAddr, Key>,
    /// New connections wait in the listen queues (see [`Listeners::pause`]).
    paused: bool,
}

impl Listeners {
    /// Starts accepting on `listener`; its connections take `entrance`.
    pub fn add(
        &mut self,
        driver: &mut impl Driver,
        listener: Arc<Listener>,
        entrance: Entrance,
    ) -> io::Result<()> {
        let addr = listener.addr.0;
        let fd = listener.fd();
        let (slot, generation) = self.slab.insert(LoopListener { listener, entrance });
        let key = Key::new(Tag::Listener, slot, generation);
        if let Err(e) = driver.accept(key, fd) {
            self.slab.remove(slot, generation);
            return Err(e);
        }
        if self.paused {
            driver.pause_accept(key, fd);
        }
        self.by_addr.insert(addr, key);
        Ok(())
    }

    /// Takes no new connections on any listener until [`Listeners::resume`]: they wait in
    /// the listen queues.
    pub fn pause(&mut self, driver: &mut impl Driver) {
        self.paused = true;
        for key in self.by_addr.values() {
            if let Some(l) = self.slab.get(key.slot(), key.generation()) {
                driver.pause_accept(*key, l.listener.fd());
            }
        }
    }

    /// [`Listeners::pause`], calling back accepts already in the kernel (an upgrade: no
    /// connection may be taken by this process once the new one accepts).
    pub fn hold(&mut self, driver: &mut impl Driver) {
        self.paused = true;
        for key in self.by_addr.values() {
            if let Some(l) = self.slab.get(key.slot(), key.generation()) {
                driver.hold_accept(*key, l.listener.fd());
            }
        }
    }

    /// The entrance of a listener on `port` (any bind address: they all lead the same way).
    pub fn entrance_of_port(&self, port: u16) -> Option<Entrance> {
        self.by_addr
            .iter()
            .find(|(a, _)| a.port() == port)
            .and_then(|(_, k)| self.slab.get(k.slot(), k.generation()))
            .map(|l| l.entrance.clone())
    }

    /// Accepts on every listener again; those the driver refuses come back as keys, to
    /// try again later.
    pub fn resume(&mut self, driver: &mut impl Driver) -> Vec<Key> {
        self.paused = false;
        let mut refused = Vec::new();
        for key in self.by_addr.values() {
            if let Some(l) = self.slab.get(key.slot(), key.generation()) {
                if let Err(e) = driver.accept(*key, l.listener.fd()) {
                    tracing::warn!(listen = %l.listener.addr, error = %e, "cannot resume accepting");
                    refused.push(*key);
                }
            }
        }
        refused
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// New connections of the listener at `addr` take `entrance` from now on.
    pub fn enter(&mut self, addr: SocketAddr, entrance: Entrance) {
        if let Some(key) = self.by_addr.get(&addr) {
            if let Some(l) = self.slab.get_mut(key.slot(), key.generation()) {
                l.entrance = entrance;
            }
        }
    }

    /// Stops accepting on the listener at `addr`.
    pub fn remove(&mut self, driver: &mut impl Driver, addr: SocketAddr) {
        if let Some(key) = self.by_addr.remove(&addr) {
            if let Some(l) = self.slab.remove(key.slot(), key.generation()) {
                driver.stop_accept(key, l.listener.fd());
            }
        }
    }

    /// The listener an accept event's key names, if it is still there.
    pub fn get(&self, key: Key) -> Option<&LoopListener> {
        self.slab.get(key.slot(), key.generation())
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.by_addr.keys().copied().collect()
    }
}
