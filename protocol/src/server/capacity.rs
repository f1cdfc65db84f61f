//! A bound on calls admitted at once, shared by many connections.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Counts the calls admitted across every connection that shares it (one per
/// server, typically), so that a server as a whole runs at most
/// [`max`](Capacity::max) calls at once however its load is spread over
/// clients. Give each connection's [`ServerConfig`](super::ServerConfig) the
/// same `Arc<Capacity>`; the state machines take and return places
/// themselves.
#[derive(Debug)]
pub struct Capacity {
    max: usize,
    used: AtomicUsize,
}

impl Capacity {
    /// Room for `max` calls (at least 1).
    pub fn new(max: usize) -> Capacity {
        Capacity {
            max: max.max(1),
            used: AtomicUsize::new(0),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Calls admitted now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes a place, if one is free.
    pub(crate) fn try_acquire(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }

    /// Gives a place back.
    pub(crate) fn release(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_sub(1)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_never_below_zero() {
        let c = Capacity::new(2);
        assert!(c.try_acquire() && c.try_acquire());
        assert!(!c.try_acquire());
        c.release();
        assert_eq!(c.in_use(), 1);
        c.release();
        c.release();
        assert_eq!(c.in_use(), 0);
    }
}
