//! One timer set for everything a state machine waits for.
//!
//! Both state machines wait for many things at once (each call's deadline, the
//! Hello, a drain, a reconnection). Each is a key with at most one due time;
//! [`Deadlines::next`] is what `poll_timeout` reports and
//! [`Deadlines::pop_due`] what `handle_timeout` works through, earliest first.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::Timestamp;

/// Due times by key, earliest first; at most one per key.
#[derive(Clone, Debug)]
pub(crate) struct Deadlines<K> {
    by_time: BTreeSet<(Timestamp, K)>,
    by_key: BTreeMap<K, Timestamp>,
}

impl<K: Ord + Copy> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines {
            by_time: BTreeSet::new(),
            by_key: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Deadlines<K> {
    /// Sets (or moves) `key`'s due time.
    pub(crate) fn set(&mut self, key: K, at: Timestamp) {
        if let Some(old) = self.by_key.insert(key, at) {
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
    }

    /// Clears `key`'s due time, if it has one.
    pub(crate) fn remove(&mut self, key: K) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key));
        }
    }

    /// The due time of `key`.
    pub(crate) fn get(&self, key: K) -> Option<Timestamp> {
        self.by_key.get(&key).copied()
    }

    /// The earliest due time.
    pub(crate) fn next(&self) -> Option<Timestamp> {
        self.by_time.first().map(|&(at, _)| at)
    }

    /// Removes and returns the earliest key due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Timestamp) -> Option<K> {
        let &(at, key) = self.by_time.first()?;
        if at > now {
            return None;
        }
        self.by_time.pop_first();
        self.by_key.remove(&key);
        Some(key)
    }

    /// Removes every due time.
    pub(crate) fn clear(&mut self) {
        self.by_time.clear();
        self.by_key.clear();
    }

    /// Removes the due times of the keys `keep` refuses.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.by_key.retain(|k, _| keep(k));
        self.by_time.retain(|(_, k)| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;

    fn at(n: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_secs(n)
    }

    #[test]
    fn earliest_first_one_per_key() {
        let mut d = Deadlines::default();
        d.set('a', at(5));
        d.set('b', at(3));
        d.set('a', at(1));
        assert_eq!(d.next(), Some(at(1)));
        assert_eq!(d.pop_due(at(0)), None);
        assert_eq!(d.pop_due(at(4)), Some('a'));
        assert_eq!(d.pop_due(at(4)), Some('b'));
        assert_eq!(d.pop_due(at(4)), None);
        assert_eq!(d.next(), None);
    }

    #[test]
    fn remove_and_retain() {
        let mut d = Deadlines::default();
        d.set(1, at(1));
        d.set(2, at(2));
        d.set(3, at(3));
        d.remove(1);
        d.remove(2);
        assert_eq!(d.get(3), Some(at(3)));
        d.retain(|k| *k != 3);
        assert_eq!(d.next(), None);
    }
}
