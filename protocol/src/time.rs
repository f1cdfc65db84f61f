//! Time as the caller passes it in.
//!
//! The protocol crate has no clock. Callers pick any monotonic origin (the
//! process start, say) and pass `Timestamp`s measured from it; only differences
//! between timestamps matter.

use core::ops::{Add, Sub};
use core::time::Duration;

/// A point in time, as a duration since a caller-chosen origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(Duration);

impl Timestamp {
    /// The origin.
    pub const ZERO: Timestamp = Timestamp(Duration::ZERO);

    pub const fn from_duration(since_origin: Duration) -> Timestamp {
        Timestamp(since_origin)
    }

    pub const fn from_micros(micros: u64) -> Timestamp {
        Timestamp(Duration::from_micros(micros))
    }

    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn checked_add(self, d: Duration) -> Option<Timestamp> {
        self.0.checked_add(d).map(Timestamp)
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    /// Saturates instead of overflowing: a deadline past the end of time never fires.
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d))
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = Duration;
    fn sub(self, earlier: Timestamp) -> Duration {
        self.saturating_duration_since(earlier)
    }
}
