//! One timer set for everything a state machine waits for.
//!
//! Both state machines wait for many things at once (each call's deadline, the
//! Hello, a drain, a reconnection). Each is a key with at most one due time;
//! [`Deadlines::next`] is what `poll_timeout` reports and
//! [`Deadlines::pop_due`] what `handle_timeout` works through, earliest first.
//!
//! Every call sets and clears a due time or two, so this is on the path of
//! every call: the due times are a binary heap whose outdated entries (a key
//! moved or cleared) are dropped lazily, when they reach the top or when they
//! outnumber the live ones, instead of a second ordered set kept exact on
//! every change (`docs/performance.md`, "Cheaper bookkeeping per call").

use alloc::collections::{BTreeMap, BinaryHeap};
use core::cmp::Reverse;

use crate::Timestamp;

/// Due times by key, earliest first; at most one per key.
#[derive(Clone, Debug)]
pub(crate) struct Deadlines<K> {
    /// Every key's due time: what is true.
    by_key: BTreeMap<K, Timestamp>,
    /// `(due, key)`, earliest on top; an entry whose key is no longer due
    /// then is outdated. The top is never outdated (see `settle`).
    by_time: BinaryHeap<Reverse<(Timestamp, K)>>,
}

impl<K: Ord + Copy> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines {
            by_key: BTreeMap::new(),
            by_time: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> Deadlines<K> {
    /// Sets (or moves) `key`'s due time.
    pub(crate) fn set(&mut self, key: K, at: Timestamp) {
        if self.by_key.insert(key, at) == Some(at) {
            return;
        }
        self.by_time.push(Reverse((at, key)));
        self.settle();
    }

    /// Clears `key`'s due time, if it has one.
    pub(crate) fn remove(&mut self, key: K) {
        if self.by_key.remove(&key).is_some() {
            self.settle();
        }
    }

    /// The due time of `key`.
    pub(crate) fn get(&self, key: K) -> Option<Timestamp> {
        self.by_key.get(&key).copied()
    }

    /// The earliest due time.
    pub(crate) fn next(&self) -> Option<Timestamp> {
        self.by_time.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns the earliest key due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Timestamp) -> Option<K> {
        let &Reverse((at, key)) = self.by_time.peek()?;
        if at > now {
            return None;
        }
        self.by_time.pop();
        self.by_key.remove(&key);
        self.settle();
        Some(key)
    }

    /// Removes every due time.
    pub(crate) fn clear(&mut self) {
        self.by_key.clear();
        self.by_time.clear();
    }

    /// Removes the due times of the keys `keep` refuses.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.by_key.retain(|k, _| keep(k));
        self.rebuild();
    }

    fn is_current(&self, at: Timestamp, key: K) -> bool {
        self.by_key.get(&key) == Some(&at)
    }

    /// Restores the two invariants after a change: the top entry is
    /// current, and outdated entries are at most about as many as current
    /// ones (a key moved on every call would otherwise grow the heap
    /// without bound).
    fn settle(&mut self) {
        if self.by_time.len() > 2 * self.by_key.len() + 16 {
            return self.rebuild();
        }
        while let Some(&Reverse((at, key))) = self.by_time.peek() {
            if self.is_current(at, key) {
                break;
            }
            self.by_time.pop();
        }
    }

    /// The heap again from the current due times alone.
    fn rebuild(&mut self) {
        self.by_time = self
            .by_key
            .iter()
            .map(|(&key, &at)| Reverse((at, key)))
            .collect();
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

    #[test]
    fn a_key_moved_again_and_again_keeps_the_heap_small() {
        let mut d = Deadlines::default();
        d.set('z', at(1_000_000));
        for n in 0..10_000 {
            d.set('a', at(n + 1));
            assert_eq!(d.next(), Some(at(n + 1)));
        }
        // One key moved 10,000 times, never due: its outdated entries were
        // dropped along the way.
        assert!(
            d.by_time.len() <= 2 * d.by_key.len() + 17,
            "{}",
            d.by_time.len()
        );
        assert_eq!(d.pop_due(at(10_000)), Some('a'));
        assert_eq!(d.next(), Some(at(1_000_000)));
        assert_eq!(d.pop_due(at(10_000)), None);
    }

    #[test]
    fn a_key_moved_later_is_not_due_at_its_old_time() {
        let mut d = Deadlines::default();
        d.set('a', at(1));
        d.set('b', at(2));
        d.set('a', at(3));
        assert_eq!(d.next(), Some(at(2)));
        assert_eq!(d.pop_due(at(2)), Some('b'));
        assert_eq!(d.pop_due(at(2)), None);
        d.set('a', at(1));
        d.set('a', at(3));
        assert_eq!(d.pop_due(at(3)), Some('a'));
        assert_eq!(d.pop_due(at(3)), None);
        assert_eq!(d.next(), None);
    }

    /// The same operations on `Deadlines` and on an exact model (every
    /// key's time, the earliest found by a scan) give the same answers.
    mod against_a_model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Set(u8, u64),
            Remove(u8),
            PopDue(u64),
            Retain(u8),
            Clear,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                8 => (0u8..12, 0u64..40).prop_map(|(k, t)| Op::Set(k, t)),
                3 => (0u8..12).prop_map(Op::Remove),
                4 => (0u64..40).prop_map(Op::PopDue),
                1 => (0u8..12).prop_map(Op::Retain),
                1 => Just(Op::Clear),
            ]
        }

        fn earliest(model: &BTreeMap<u8, Timestamp>) -> Option<(Timestamp, u8)> {
            model.iter().map(|(&k, &t)| (t, k)).min()
        }

        proptest! {
            #[test]
            fn same_answers(ops in proptest::collection::vec(op(), 0..300)) {
                let mut d = Deadlines::default();
                let mut model: BTreeMap<u8, Timestamp> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Set(k, t) => {
                            d.set(k, at(t));
                            model.insert(k, at(t));
                        }
                        Op::Remove(k) => {
                            d.remove(k);
                            model.remove(&k);
                        }
                        Op::PopDue(now) => {
                            // Keys due at the same time come in key order.
                            let expected = earliest(&model)
                                .filter(|&(t, _)| t <= at(now))
                                .map(|(_, k)| k);
                            prop_assert_eq!(d.pop_due(at(now)), expected);
                            if let Some(k) = expected {
                                model.remove(&k);
                            }
                        }
                        Op::Retain(k) => {
                            d.retain(|&x| x != k);
                            model.remove(&k);
                        }
                        Op::Clear => {
                            d.clear();
                            model.clear();
                        }
                    }
                    prop_assert_eq!(d.next(), earliest(&model).map(|(t, _)| t));
                    for k in 0u8..12 {
                        prop_assert_eq!(d.get(k), model.get(&k).copied());
                    }
                    prop_assert!(d.by_time.len() <= 2 * d.by_key.len() + 17);
                }
            }
        }
    }
}
