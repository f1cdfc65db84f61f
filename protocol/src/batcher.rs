//! The batching policy of batched functions: when a batch is ready.
//!
//! A [`Batcher`] queues items (requests, typically) in arrival order and says
//! when to hand a batch to the handler: as soon as [`BatchPolicy::max_batch`]
//! items are queued, or when the oldest queued item has waited
//! [`BatchPolicy::max_wait`], whichever comes first. So no item waits longer than
//! `max_wait` for its batch to start, and a full batch never waits at all. It
//! knows nothing of trees or of stacking them.
//!
//! # Run-loop contract
//!
//! 1. [`push`](Batcher::push) each item with the current time.
//! 2. After every push, and whenever the timer fires, call
//!    [`poll_batch`](Batcher::poll_batch) with the current time until it returns
//!    `None`, and run each batch it returns.
//! 3. Then ask [`poll_timeout`](Batcher::poll_timeout): `Some(t)` means call
//!    `poll_batch` again at `t` (unless a push comes first); `None` means the
//!    queue is empty and no timer is needed.
//! 4. At shutdown, call [`flush`](Batcher::flush) until it returns `None`.
//!
//! # Example
//!
//! ```
//! use core::time::Duration;
//! use teleport_protocol::batcher::{BatchPolicy, Batcher};
//! use teleport_protocol::Timestamp;
//!
//! let mut b = Batcher::new(BatchPolicy { max_batch: 2, max_wait: Duration::from_millis(5) }).unwrap();
//! let t0 = Timestamp::ZERO;
//! b.push("a", t0);
//! assert_eq!(b.poll_batch(t0), None);
//! b.push("b", t0);
//! assert_eq!(b.poll_batch(t0), Some(vec!["a", "b"])); // full
//! b.push("c", t0);
//! let t = b.poll_timeout().unwrap();
//! assert_eq!(t, t0 + Duration::from_millis(5));
//! assert_eq!(b.poll_batch(t), Some(vec!["c"])); // waited long enough
//! assert_eq!(b.poll_timeout(), None);
//! ```

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::time::Duration;

use crate::Timestamp;

/// When a batch is handed to the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// The most items in one batch; a batch is handed over as soon as it is full.
    /// At least 1; 1 disables batching (every item is its own batch, at once).
    pub max_batch: usize,
    /// The longest the oldest queued item waits before a partial batch is handed
    /// over. Zero hands over whatever is queued at every poll.
    pub max_wait: Duration,
}

/// A [`BatchPolicy`] that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchPolicyError {
    /// `max_batch` was 0.
    #[error("max_batch must be at least 1 (1 disables batching)")]
    ZeroMaxBatch,
}

/// Queues items and releases them in batches. See the [module docs](self).
#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    queue: VecDeque<(Timestamp, T)>,
}

impl<T> Batcher<T> {
    /// An empty batcher. Fails if `policy.max_batch` is 0.
    pub fn new(policy: BatchPolicy) -> Result<Batcher<T>, BatchPolicyError> {
        if policy.max_batch == 0 {
            return Err(BatchPolicyError::ZeroMaxBatch);
        }
        Ok(Batcher {
            policy,
            queue: VecDeque::new(),
        })
    }

    /// The policy in use.
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues `item`, which arrived at `now`.
    pub fn push(&mut self, item: T, now: Timestamp) {
        // Keep arrival times non-decreasing even if the caller's clock is not,
        // so the front item is always the one that has waited longest.
        let now = self.queue.back().map_or(now, |&(last, _)| last.max(now));
        self.queue.push_back((now, item));
    }

    /// The next batch, if one is due at `now`: the oldest `max_batch` items if
    /// that many are queued, else every queued item if the oldest has waited
    /// `max_wait`. Items keep their arrival order.
    pub fn poll_batch(&mut self, now: Timestamp) -> Option<Vec<T>> {
        let &(oldest, _) = self.queue.front()?;
        if self.queue.len() >= self.policy.max_batch || now >= oldest + self.policy.max_wait {
            return self.take();
        }
        None
    }

    /// When the next batch is due: the oldest item's arrival plus `max_wait`, or
    /// its arrival alone if a full batch is queued (it is due at once). `None`
    /// when empty.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let &(oldest, _) = self.queue.front()?;
        if self.queue.len() >= self.policy.max_batch {
            Some(oldest)
        } else {
            Some(oldest + self.policy.max_wait)
        }
    }

    /// The oldest queued items (at most `max_batch`), whether due or not, for
    /// shutdown. Call until `None`.
    pub fn flush(&mut self) -> Option<Vec<T>> {
        self.take()
    }

    fn take(&mut self) -> Option<Vec<T>> {
        if self.queue.is_empty() {
            return None;
        }
        let n = self.queue.len().min(self.policy.max_batch);
        Some(self.queue.drain(..n).map(|(_, item)| item).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(n: u64) -> Timestamp {
        Timestamp::ZERO + ms(n)
    }

    fn batcher<T>(max_batch: usize, wait_ms: u64) -> Batcher<T> {
        Batcher::new(BatchPolicy {
            max_batch,
            max_wait: ms(wait_ms),
        })
        .unwrap()
    }

    #[test]
    fn zero_max_batch_is_rejected() {
        let err = Batcher::<u8>::new(BatchPolicy {
            max_batch: 0,
            max_wait: ms(1),
        })
        .unwrap_err();
        assert_eq!(err, BatchPolicyError::ZeroMaxBatch);
        assert!(alloc::format!("{err}").contains("at least 1"));
    }

    #[test]
    fn full_batch_is_released_at_once_in_fifo_order() {
        let mut b = batcher(3, 100);
        for i in 0..7 {
            b.push(i, at(0));
        }
        assert_eq!(b.poll_timeout(), Some(at(0)));
        assert_eq!(b.poll_batch(at(0)), Some(vec![0, 1, 2]));
        assert_eq!(b.poll_batch(at(0)), Some(vec![3, 4, 5]));
        assert_eq!(b.poll_batch(at(0)), None);
        assert_eq!(b.len(), 1);
        assert_eq!(b.poll_timeout(), Some(at(100)));
    }

    #[test]
    fn partial_batch_waits_for_its_oldest_item_only() {
        let mut b = batcher(4, 10);
        b.push('a', at(0));
        b.push('b', at(6));
        assert_eq!(b.poll_timeout(), Some(at(10)));
        assert_eq!(b.poll_batch(at(9)), None);
        assert_eq!(b.poll_batch(at(10)), Some(vec!['a', 'b']));
        assert_eq!(b.poll_timeout(), None);
        assert!(b.is_empty());
    }

    #[test]
    fn max_batch_one_disables_batching() {
        let mut b = batcher(1, 1000);
        b.push(1, at(0));
        b.push(2, at(0));
        assert_eq!(b.poll_timeout(), Some(at(0)));
        assert_eq!(b.poll_batch(at(0)), Some(vec![1]));
        assert_eq!(b.poll_batch(at(0)), Some(vec![2]));
        assert_eq!(b.poll_batch(at(0)), None);
    }

    #[test]
    fn zero_wait_releases_whatever_is_queued() {
        let mut b = batcher(8, 0);
        b.push(1, at(5));
        b.push(2, at(5));
        assert_eq!(b.poll_timeout(), Some(at(5)));
        assert_eq!(b.poll_batch(at(5)), Some(vec![1, 2]));
    }

    #[test]
    fn flush_drains_in_batches() {
        let mut b = batcher(2, 1000);
        for i in 0..5 {
            b.push(i, at(0));
        }
        // Not polled: more than max_batch queued.
        assert_eq!(b.flush(), Some(vec![0, 1]));
        assert_eq!(b.flush(), Some(vec![2, 3]));
        assert_eq!(b.flush(), Some(vec![4]));
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn clock_going_backwards_does_not_reorder_or_starve() {
        let mut b = batcher(10, 10);
        b.push(1, at(50));
        b.push(2, at(20)); // an earlier timestamp than the item before it
        assert_eq!(b.poll_timeout(), Some(at(60)));
        assert_eq!(b.poll_batch(at(60)), Some(vec![1, 2]));
    }

    #[test]
    fn deadline_past_the_end_of_time_does_not_overflow() {
        let mut b = Batcher::new(BatchPolicy {
            max_batch: 2,
            max_wait: Duration::MAX,
        })
        .unwrap();
        b.push(1, at(1));
        assert!(b.poll_timeout().is_some());
        assert_eq!(b.poll_batch(at(1_000_000)), None);
        assert_eq!(b.flush(), Some(vec![1]));
    }
}
