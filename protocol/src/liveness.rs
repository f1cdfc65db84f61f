//! Is the peer alive? Pings while waiting, and a dead peer declared after
//! `max_age` of silence.
//!
//! Only silence while something is awaited counts: an idle connection sends
//! nothing and is never declared dead (the transport's keep-alives and idle
//! timeout look after it). Any bytes from the peer count as a sign of life, so
//! a large reply still arriving keeps a connection alive however long it takes.

use core::time::Duration;

use crate::Timestamp;

/// What [`Liveness::on_timeout`] found due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LivenessEvent {
    /// Send a ping with this nonce.
    Ping(u64),
    /// The peer has been silent for `silent_for`, past `max_age`.
    Dead {
        silent_for: Duration,
        max_age: Duration,
    },
}

/// The ping and dead-peer timers of one connection.
#[derive(Clone, Debug)]
pub(crate) struct Liveness {
    ping_interval: Option<Duration>,
    max_age: Option<Duration>,
    last_heard: Timestamp,
    /// When the connection last went from awaiting nothing to awaiting
    /// something; `None` while it awaits nothing.
    busy_since: Option<Timestamp>,
    /// The last ping of the current busy period.
    last_ping: Option<Timestamp>,
    next_nonce: u64,
}

impl Liveness {
    pub(crate) fn new(
        now: Timestamp,
        ping_interval: Option<Duration>,
        max_age: Option<Duration>,
    ) -> Liveness {
        Liveness {
            ping_interval: ping_interval.map(|d| d.max(Duration::from_millis(1))),
            max_age,
            last_heard: now,
            busy_since: None,
            last_ping: None,
            next_nonce: 1,
        }
    }

    /// Bytes arrived from the peer.
    pub(crate) fn heard(&mut self, now: Timestamp) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Whether something is awaited from the peer now.
    pub(crate) fn set_busy(&mut self, now: Timestamp, busy: bool) {
        match (busy, self.busy_since) {
            (true, None) => {
                self.busy_since = Some(now);
                self.last_ping = None;
            }
            (false, Some(_)) => {
                self.busy_since = None;
                self.last_ping = None;
            }
            _ => {}
        }
    }

    /// Silence is measured from the later of the last time the peer was heard
    /// and the moment the connection became busy.
    fn silence_start(&self) -> Option<Timestamp> {
        self.busy_since.map(|b| b.max(self.last_heard))
    }

    fn next_ping_at(&self, since: Timestamp) -> Option<Timestamp> {
        let interval = self.ping_interval?;
        let base = self.last_ping.map_or(since, |p| p.max(since));
        Some(base + interval)
    }

    /// When [`on_timeout`](Self::on_timeout) is next due, if ever.
    pub(crate) fn next_timeout(&self) -> Option<Timestamp> {
        let since = self.silence_start()?;
        let dead_at = self.max_age.map(|a| since + a);
        [dead_at, self.next_ping_at(since)]
            .into_iter()
            .flatten()
            .min()
    }

    /// What is due at `now`: the peer's death takes precedence over a ping.
    pub(crate) fn on_timeout(&mut self, now: Timestamp) -> Option<LivenessEvent> {
        let since = self.silence_start()?;
        if let Some(max_age) = self.max_age {
            if now >= since + max_age {
                return Some(LivenessEvent::Dead {
                    silent_for: now - since,
                    max_age,
                });
            }
        }
        let at = self.next_ping_at(since)?;
        if now < at {
            return None;
        }
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.last_ping = Some(now);
        Some(LivenessEvent::Ping(nonce))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_secs(n)
    }

    fn liveness() -> Liveness {
        Liveness::new(
            at(0),
            Some(Duration::from_secs(1)),
            Some(Duration::from_secs(5)),
        )
    }

    #[test]
    fn idle_needs_no_timer() {
        let mut l = liveness();
        assert_eq!(l.next_timeout(), None);
        assert_eq!(l.on_timeout(at(100)), None);
    }

    #[test]
    fn pings_once_per_interval_then_declares_dead() {
        let mut l = liveness();
        l.set_busy(at(10), true);
        assert_eq!(l.next_timeout(), Some(at(11)));
        assert_eq!(l.on_timeout(at(11)), Some(LivenessEvent::Ping(1)));
        assert_eq!(l.on_timeout(at(11)), None, "one ping per interval");
        assert_eq!(l.next_timeout(), Some(at(12)));
        l.heard(at(12));
        assert_eq!(l.next_timeout(), Some(at(13)), "silence restarts");
        assert_eq!(
            l.on_timeout(at(17)),
            Some(LivenessEvent::Dead {
                silent_for: Duration::from_secs(5),
                max_age: Duration::from_secs(5)
            })
        );
    }

    #[test]
    fn idle_time_does_not_count_as_silence() {
        let mut l = liveness();
        l.set_busy(at(3600), true);
        assert_eq!(l.on_timeout(at(3604)), Some(LivenessEvent::Ping(1)));
        assert!(matches!(
            l.on_timeout(at(3605)),
            Some(LivenessEvent::Dead { .. })
        ));
        l.set_busy(at(3605), false);
        assert_eq!(l.next_timeout(), None);
    }
}
