//! A slab whose slots carry a generation, so that a key kept for a freed slot (an event
//! already in flight for a closed connection) is recognised as stale after reuse.

pub struct Slab<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Slab<T> {
        Slab::new()
    }
}

impl<T> Slab<T> {
    pub fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `value`; returns its (slot, generation).
    pub fn insert(&mut self, value: T) -> (u32, u32) {
        self.len += 1;
        if let Some(slot) = self.free.pop() {
            let e = &mut self.entries[slot as usize];
            e.1 = Some(value);
            (slot, e.0)
        } else {
            self.entries.push((0, Some(value)));
            ((self.entries.len() - 1) as u32, 0)
        }
    }

    pub fn get(&self, slot: u32, generation: u32) -> Option<&T> {
        match self.entries.get(slot as usize) {
            Some((g, Some(v))) if *g == generation => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        match self.entries.get_mut(slot as usize) {
            Some((g, Some(v))) if *g == generation => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, slot: u32, generation: u32) -> Option<T> {
        let e = self.entries.get_mut(slot as usize)?;
        if e.0 != generation || e.1.is_none() {
            return None;
        }
        // Generations wrap at 24 bits, the width a key keeps.
        e.0 = (e.0 + 1) & 0xff_ffff;
        self.free.push(slot);
        self.len -= 1;
        e.1.take()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (slot, generation) of every occupied slot.
    pub fn keys(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.1.is_some())
            .map(|(i, e)| (i as u32, e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_key_after_reuse_is_refused() {
        let mut s = Slab::new();
        let (a, ga) = s.insert("a");
        assert_eq!(s.remove(a, ga), Some("a"));
        let (b, gb) = s.insert("b");
        assert_eq!(a, b);
        assert_ne!(ga, gb);
        assert!(s.get(a, ga).is_none());
        assert_eq!(s.get(b, gb), Some(&"b"));
        assert!(s.remove(a, ga).is_none());
        assert!(!s.is_empty());
    }
}
