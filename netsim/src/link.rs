//! One direction of a simulated link, as a pure state machine.
//!
//! [`Link::decide`] takes the time a datagram arrives and its length and says
//! what happens to it: dropped (by random loss or by a full queue) or
//! delivered at a later instant, perhaps twice. No IO, no clock of its own:
//! the [`Relay`](crate::Relay) feeds it real time, the unit tests feed it
//! invented time.
//!
//! The model, in the order a datagram meets it:
//!
//! 1. **Random loss** with probability [`LinkConfig::loss`].
//! 2. **Bottleneck**: with a [`rate`](LinkConfig::rate), datagrams leave one
//!    after another at that many bytes per second, through a drop-tail queue
//!    of [`queue`](LinkConfig::queue) bytes (counting the datagram being
//!    sent). A datagram that does not fit is dropped. Without a rate there is
//!    no queue and datagrams leave at once.
//! 3. **Propagation**: a fixed [`delay`](LinkConfig::delay) plus a uniform
//!    random [`jitter`](LinkConfig::jitter) in `[0, jitter)`. Jitter larger
//!    than the spacing of datagrams reorders them, as on a real path.
//! 4. **Reordering**: with probability [`reorder`](LinkConfig::reorder) a
//!    datagram is held [`reorder_delay`](LinkConfig::reorder_delay) longer.
//! 5. **Duplication**: with probability [`duplicate`](LinkConfig::duplicate)
//!    a second copy is delivered, with its own jitter.
//!
//! Every datagram draws the same five random numbers from the seeded
//! generator whatever the configuration, so the n-th datagram's random
//! decisions depend only on the seed and n: a failing run can be replayed
//! with its seed. (Queue drops depend on timing as well, so they replay only
//! under the same timing.)

use std::time::{Duration, Instant};

/// The conditions of one direction of a link. [`LinkConfig::default`] is a
/// perfect link: no loss, no delay, no rate limit.
///
/// ```
/// use std::time::Duration;
/// use teleport_netsim::LinkConfig;
///
/// // 10 MB/s through a 256 KiB queue, 20 ms one way, 1% loss.
/// let link = LinkConfig::default()
///     .with_rate(10_000_000, 256 << 10)
///     .with_delay(Duration::from_millis(20))
///     .with_loss(0.01);
/// assert_eq!(link.rate, Some(10_000_000));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LinkConfig {
    /// Probability that a datagram is lost, in `[0, 1]`. 1 cuts the link.
    pub loss: f64,
    /// Fixed one-way propagation delay.
    pub delay: Duration,
    /// Upper bound of a uniform random delay added to `delay`.
    pub jitter: Duration,
    /// Probability that a datagram is held back by `reorder_delay`.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Bottleneck rate in bytes of UDP payload per second; `None` for none.
    pub rate: Option<u64>,
    /// Bytes the bottleneck queue holds (drop-tail), including the datagram
    /// being sent. Used only with a `rate`; must exceed the largest datagram.
    pub queue: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
            rate: None,
            queue: 0,
        }
    }
}

impl LinkConfig {
    /// A link that loses everything (a dead peer, a pulled cable).
    pub fn cut() -> LinkConfig {
        LinkConfig::default().with_loss(1.0)
    }

    /// With random loss of probability `loss` (clamped to `[0, 1]`).
    pub fn with_loss(mut self, loss: f64) -> LinkConfig {
        self.loss = loss.clamp(0.0, 1.0);
        self
    }

    /// With a fixed one-way delay.
    pub fn with_delay(mut self, delay: Duration) -> LinkConfig {
        self.delay = delay;
        self
    }

    /// With a uniform random extra delay in `[0, jitter)`.
    pub fn with_jitter(mut self, jitter: Duration) -> LinkConfig {
        self.jitter = jitter;
        self
    }

    /// Holding back a fraction `probability` of datagrams by `by`.
    pub fn with_reorder(mut self, probability: f64, by: Duration) -> LinkConfig {
        self.reorder = probability.clamp(0.0, 1.0);
        self.reorder_delay = by;
        self
    }

    /// Delivering a fraction `probability` of datagrams twice.
    pub fn with_duplicate(mut self, probability: f64) -> LinkConfig {
        self.duplicate = probability.clamp(0.0, 1.0);
        self
    }

    /// With a bottleneck of `bytes_per_second` and a drop-tail queue of
    /// `queue_bytes`.
    pub fn with_rate(mut self, bytes_per_second: u64, queue_bytes: usize) -> LinkConfig {
        self.rate = Some(bytes_per_second.max(1));
        self.queue = queue_bytes;
        self
    }
}

/// What one direction of a link did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Datagrams that arrived at the link.
    pub received: u64,
    /// Datagrams passed on (not counting duplicates).
    pub forwarded: u64,
    /// Bytes passed on (not counting duplicates).
    pub forwarded_bytes: u64,
    /// Datagrams dropped by random loss.
    pub dropped_loss: u64,
    /// Datagrams dropped because the bottleneck queue was full.
    pub dropped_queue: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams that the relay failed to send on (socket errors).
    pub send_errors: u64,
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The bottleneck queue was full.
    Queue,
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not delivered.
    Dropped(DropReason),
    /// Delivered at `at`, and a second copy at `duplicate` if set.
    Deliver {
        /// When the datagram reaches the far side.
        at: Instant,
        /// When a duplicate reaches it, if one is made.
        duplicate: Option<Instant>,
    },
}

/// One direction of a link: configuration, random generator, bottleneck
/// state and counters.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    rng: fastrand::Rng,
    /// When the bottleneck finishes sending everything it accepted.
    busy_until: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    /// A link with `config`, its random decisions drawn from `seed`.
    pub fn new(config: LinkConfig, seed: u64) -> Link {
        Link {
            config,
            rng: fastrand::Rng::with_seed(seed),
            busy_until: None,
            stats: LinkStats::default(),
        }
    }

    /// The conditions in force.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Changes the conditions from now on. Datagrams already accepted keep
    /// their delivery time; the random generator and the counters go on.
    pub fn set(&mut self, config: LinkConfig) {
        self.config = config;
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Counts a datagram the relay could not send.
    pub fn count_send_error(&mut self) {
        self.stats.send_errors += 1;
    }

    /// Bytes waiting in the bottleneck queue at `now`.
    pub fn backlog(&self, now: Instant) -> usize {
        match (self.config.rate, self.busy_until) {
            (Some(rate), Some(busy)) => {
                let waiting = busy.saturating_duration_since(now).as_secs_f64();
                (waiting * rate as f64).round() as usize
            }
            _ => 0,
        }
    }

    /// Decides the fate of a datagram of `len` bytes arriving at `now`.
    pub fn decide(&mut self, now: Instant, len: usize) -> Verdict {
        // Always the same draws, in the same order: see the module docs.
        let loss = self.rng.f64();
        let duplicate = self.rng.f64();
        let reorder = self.rng.f64();
        let jitter = self.rng.f64();
        let duplicate_jitter = self.rng.f64();

        self.stats.received += 1;
        if loss < self.config.loss {
            self.stats.dropped_loss += 1;
            return Verdict::Dropped(DropReason::Loss);
        }
        let departs = match self.config.rate {
            Some(rate) => {
                if self.backlog(now) + len > self.config.queue {
                    self.stats.dropped_queue += 1;
                    return Verdict::Dropped(DropReason::Queue);
                }
                let start = self.busy_until.map_or(now, |busy| busy.max(now));
                let done = start + Duration::from_secs_f64(len as f64 / rate as f64);
                self.busy_until = Some(done);
                done
            }
            None => now,
        };
        let mut at = departs + self.config.delay + self.config.jitter.mul_f64(jitter);
        if reorder < self.config.reorder {
            at += self.config.reorder_delay;
        }
        let duplicate = (duplicate < self.config.duplicate).then(|| {
            self.stats.duplicated += 1;
            departs + self.config.delay + self.config.jitter.mul_f64(duplicate_jitter)
        });
        self.stats.forwarded += 1;
        self.stats.forwarded_bytes += len as u64;
        Verdict::Deliver { at, duplicate }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(config: &LinkConfig, seed: u64, n: usize) -> Vec<bool> {
        let mut link = Link::new(config.clone(), seed);
        let start = Instant::now();
        (0..n)
            .map(|i| {
                let now = start + Duration::from_micros(i as u64 * 100);
                matches!(link.decide(now, 1200), Verdict::Deliver { .. })
            })
            .collect()
    }

    #[test]
    fn same_seed_same_drops_other_seed_other_drops() {
        let config = LinkConfig::default().with_loss(0.05);
        let a = verdicts(&config, 7, 10_000);
        assert_eq!(a, verdicts(&config, 7, 10_000));
        assert_ne!(a, verdicts(&config, 8, 10_000));
    }

    #[test]
    fn drop_decisions_do_not_depend_on_the_other_settings() {
        let plain = LinkConfig::default().with_loss(0.1);
        let busy = plain
            .clone()
            .with_jitter(Duration::from_millis(5))
            .with_duplicate(0.3)
            .with_reorder(0.2, Duration::from_millis(3));
        assert_eq!(verdicts(&plain, 42, 5_000), verdicts(&busy, 42, 5_000));
    }

    #[test]
    fn loss_rate_is_about_the_configured_one() {
        let delivered = verdicts(&LinkConfig::default().with_loss(0.05), 1, 100_000);
        let lost = delivered.iter().filter(|d| !**d).count();
        assert!((4_000..6_000).contains(&lost), "lost {lost} of 100000");
        assert!(verdicts(&LinkConfig::cut(), 1, 1000).iter().all(|d| !d));
        assert!(verdicts(&LinkConfig::default(), 1, 1000).iter().all(|d| *d));
    }

    #[test]
    fn rate_cap_holds_and_delivery_is_paced() {
        // Offer 2 MB/s for one second to a 1 MB/s link with a 64 KiB queue.
        let rate = 1_000_000u64;
        let queue = 64 << 10;
        let mut link = Link::new(LinkConfig::default().with_rate(rate, queue), 3);
        let start = Instant::now();
        let mut last_at = start;
        let mut delivered_by_1s = 0u64;
        for i in 0..2_000u64 {
            let now = start + Duration::from_micros(i * 500);
            if let Verdict::Deliver { at, .. } = link.decide(now, 1000) {
                assert!(at >= last_at, "a link without jitter keeps order");
                // Each datagram leaves at least 1 ms (1000 bytes at 1 MB/s)
                // after the one before it.
                if last_at != start {
                    assert!(at - last_at >= Duration::from_micros(999));
                }
                last_at = at;
                if at <= start + Duration::from_secs(1) {
                    delivered_by_1s += 1000;
                }
            }
        }
        assert!(delivered_by_1s <= rate, "{delivered_by_1s} bytes in 1 s");
        assert!(delivered_by_1s >= rate * 95 / 100, "{delivered_by_1s}");
        let stats = link.stats();
        assert!(stats.dropped_queue > 900, "{stats:?}");
        assert_eq!(stats.dropped_loss, 0);
        assert_eq!(stats.forwarded + stats.dropped_queue, 2_000);
    }

    #[test]
    fn queue_is_bounded_drop_tail() {
        let queue = 10_000;
        let mut link = Link::new(LinkConfig::default().with_rate(1_000_000, queue), 3);
        let now = Instant::now();
        // A burst at one instant: only what fits in the queue is accepted.
        let accepted: Vec<bool> = (0..50)
            .map(|_| matches!(link.decide(now, 1000), Verdict::Deliver { .. }))
            .collect();
        assert_eq!(accepted.iter().filter(|a| **a).count(), 10);
        assert!(accepted[..10].iter().all(|a| *a), "the head is kept");
        assert!(link.backlog(now) <= queue);
        // 5 ms later 5000 bytes have left: room for five more.
        let later = now + Duration::from_millis(5);
        assert!((4_990..=5_010).contains(&link.backlog(later)));
        let more = (0..10)
            .filter(|_| matches!(link.decide(later, 1000), Verdict::Deliver { .. }))
            .count();
        assert_eq!(more, 5);
        assert_eq!(link.stats().dropped_queue, 45);
    }

    #[test]
    fn delay_jitter_reorder_and_duplicates() {
        let config = LinkConfig::default()
            .with_delay(Duration::from_millis(20))
            .with_jitter(Duration::from_millis(4))
            .with_reorder(0.5, Duration::from_millis(10))
            .with_duplicate(0.5);
        let mut link = Link::new(config, 9);
        let now = Instant::now();
        let (mut held, mut dups) = (0, 0);
        for _ in 0..1000 {
            let Verdict::Deliver { at, duplicate } = link.decide(now, 100) else {
                panic!("no loss configured");
            };
            let delay = at - now;
            assert!(delay >= Duration::from_millis(20));
            assert!(delay < Duration::from_millis(34));
            if delay >= Duration::from_millis(24) {
                held += 1;
            }
            if let Some(dup) = duplicate {
                dups += 1;
                assert!(dup - now >= Duration::from_millis(20));
                assert!(dup - now < Duration::from_millis(24));
            }
        }
        assert!((400..600).contains(&held), "{held}");
        assert!((400..600).contains(&dups), "{dups}");
        assert_eq!(link.stats().duplicated, dups);
    }

    #[test]
    fn set_changes_conditions_and_keeps_counting() {
        let mut link = Link::new(LinkConfig::default(), 5);
        let now = Instant::now();
        assert!(matches!(link.decide(now, 10), Verdict::Deliver { .. }));
        link.set(LinkConfig::cut());
        assert_eq!(link.decide(now, 10), Verdict::Dropped(DropReason::Loss));
        link.set(LinkConfig::default());
        assert!(matches!(link.decide(now, 10), Verdict::Deliver { .. }));
        let stats = link.stats();
        assert_eq!(
            (stats.received, stats.forwarded, stats.dropped_loss),
            (3, 2, 1)
        );
    }
}
