//! Waiting between connection attempts.

use core::time::Duration;

/// How long a client waits between connection attempts: `initial` after the
/// first failure (or after losing a connection), doubling after each further
/// failure, up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms, doubling up to 5 s: quick after a brief blip, gentle on a server
    /// that stays down.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before attempt number `failures + 1`, after `failures`
    /// consecutive failures (0 means: connect at once).
    pub fn wait(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(32);
        self.initial
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max)
            .min(self.max.max(self.initial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff::default();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(b.wait(0), ms(0));
        assert_eq!(b.wait(1), ms(50));
        assert_eq!(b.wait(2), ms(100));
        assert_eq!(b.wait(3), ms(200));
        assert_eq!(b.wait(8), ms(5000));
        assert_eq!(b.wait(u32::MAX), ms(5000));
    }
}
