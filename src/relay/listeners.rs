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
    /// New connections wait in the listen queues: no descriptor is free for their upstream
    /// sockets (see [`Listeners::pause`]).
    paused: bool,
    /// New connections wait in the listen queues: an upgrade is handing the listeners over
    /// (see [`Listeners::hold`]).
    held: bool,
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
        // Not accepting now: armed when accepting starts again (`resume`, `release`).
        if self.accepting() {
            if let Err(e) = driver.accept(key, fd) {
                self.slab.remove(slot, generation);
                return Err(e);
            }
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

    /// Takes no new connections, calling back accepts already in the kernel, until
    /// [`Listeners::release`] (an upgrade: no connection may be taken by this process once
    /// the new one accepts; in the new one, none before it has taken over).
    pub fn hold(&mut self, driver: &mut impl Driver) {
        self.held = true;
        for key in self.by_addr.values() {
            if let Some(l) = self.slab.get(key.slot(), key.generation()) {
                driver.hold_accept(*key, l.listener.fd());
            }
        }
    }

    /// Ends [`Listeners::hold`]: accepts again unless paused for descriptors. Those the
    /// driver refuses come back as keys, to try again later.
    pub fn release(&mut self, driver: &mut impl Driver) -> Vec<Key> {
        self.held = false;
        if self.paused {
            return Vec::new();
        }
        self.arm_all(driver)
    }

    /// Whether new connections are taken now.
    pub fn accepting(&self) -> bool {
        !self.paused && !self.held
    }

    /// The entrance a connection to `local` came through: the listener bound to that
    /// address, else the one bound to the unspecified address of its family on its port.
    pub fn entrance_for(&self, local: SocketAddr) -> Option<Entrance> {
        let any = match local {
            SocketAddr::V4(_) => {
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), local.port())
            }
            SocketAddr::V6(_) => {
                SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), local.port())
            }
        };
        [local, any]
            .iter()
            .find_map(|a| self.by_addr.get(a))
            .and_then(|k| self.slab.get(k.slot(), k.generation()))
            .map(|l| l.entrance.clone())
    }

    /// Accepts on every listener again; those the driver refuses come back as keys, to
    /// try again later.
    pub fn resume(&mut self, driver: &mut impl Driver) -> Vec<Key> {
        self.paused = false;
        if self.held {
            return Vec::new();
        }
        self.arm_all(driver)
    }

    fn arm_all(&mut self, driver: &mut impl Driver) -> Vec<Key> {
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
