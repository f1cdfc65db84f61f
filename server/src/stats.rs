//! What a server has done: counters its connections update as the machine's
//! outputs are carried out, and the snapshot [`Server::stats`](crate::Server::stats)
//! returns.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use teleport_protocol::ErrorKind;
use teleport_quic::Traffic;

/// The counters, shared by every connection of one server.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls_received: AtomicU64,
    calls_succeeded: AtomicU64,
    calls_stopped: AtomicU64,
    /// By error code (the kind's wire code), so the map's order is stable.
    calls_failed: Mutex<BTreeMap<u8, u64>>,
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    /// The traffic of connections that ended (open ones are read live).
    ended_traffic: Mutex<Traffic>,
}

impl Counters {
    pub(crate) fn call_received(&self) {
        self.calls_received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reply(&self, result: Result<(), ErrorKind>) {
        match result {
            Ok(()) => {
                self.calls_succeeded.fetch_add(1, Ordering::Relaxed);
            }
            Err(kind) => {
                let mut failed = self.calls_failed.lock().unwrap_or_else(|p| p.into_inner());
                *failed.entry(kind.code()).or_default() += 1;
            }
        }
    }

    pub(crate) fn call_stopped(&self) {
        self.calls_stopped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_accepted(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_ended(&self, traffic: Traffic) {
        *self.ended_traffic.lock().unwrap_or_else(|p| p.into_inner()) += traffic;
    }

    /// A snapshot, with the live figures given by the caller.
    pub(crate) fn snapshot(
        &self,
        in_flight: usize,
        connections_open: usize,
        live_traffic: Traffic,
    ) -> ServerStats {
        let mut traffic = *self.ended_traffic.lock().unwrap_or_else(|p| p.into_inner());
        traffic += live_traffic;
        ServerStats {
            calls_received: self.calls_received.load(Ordering::Relaxed),
            calls_succeeded: self.calls_succeeded.load(Ordering::Relaxed),
            calls_failed: self
                .calls_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(&code, &n)| (ErrorKind::from_code(code), n))
                .collect(),
            calls_stopped: self.calls_stopped.load(Ordering::Relaxed),
            in_flight,
            connections_open,
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            receive_memory: 0,
            bytes_received: traffic.bytes_received,
            bytes_sent: traffic.bytes_sent,
            packets_lost: traffic.packets_lost,
            congestion_events: traffic.congestion_events,
        }
    }
}

/// What a server has done since it started; see
/// [`Server::stats`](crate::Server::stats). `Display` prints it on one line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Call streams clients opened (every call, served or refused).
    pub calls_received: u64,
    /// Calls answered with a result.
    pub calls_succeeded: u64,
    /// Calls answered with an error, by kind (a function's error, an unknown
    /// method, a refusal as overloaded or shutting down, ...).
    pub calls_failed: Vec<(ErrorKind, u64)>,
    /// Calls that ended without a reply: cancelled by the client, past their
    /// deadline, or stopped at the end of a shutdown.
    pub calls_stopped: u64,
    /// Calls running now.
    pub in_flight: usize,
    /// Connections open now (handshakes in progress included).
    pub connections_open: usize,
    /// Connections accepted since the start.
    pub connections_accepted: u64,
    /// Connection attempts refused at the connection limits
    /// ([`max_connections`](crate::ServerBuilder::max_connections),
    /// [`max_unauthenticated`](crate::ServerBuilder::max_unauthenticated)).
    pub connections_refused: u64,
    /// Bytes of the receive memory budget reserved now by data sections
    /// arriving or held (see [`receive_memory`](crate::ServerBuilder::receive_memory)).
    pub receive_memory: usize,
    /// UDP payload bytes received (QUIC overhead included).
    pub bytes_received: u64,
    /// UDP payload bytes sent (QUIC overhead included).
    pub bytes_sent: u64,
    /// Packets the server sent that were declared lost and retransmitted.
    pub packets_lost: u64,
    /// Times the server's congestion controllers cut their sending windows.
    pub congestion_events: u64,
}

impl ServerStats {
    /// Calls answered with an error of `kind`.
    pub fn failed(&self, kind: ErrorKind) -> u64 {
        self.calls_failed
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }

    /// Calls answered with any error.
    pub fn failed_total(&self) -> u64 {
        self.calls_failed.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "calls: {} received, {} ok, {} failed",
            self.calls_received,
            self.calls_succeeded,
            self.failed_total()
        )?;
        if !self.calls_failed.is_empty() {
            let kinds: Vec<String> = self
                .calls_failed
                .iter()
                .map(|(kind, n)| format!("{kind:?} {n}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        write!(
            f,
            ", {} stopped, {} running; connections: {} open, {} accepted, {} refused; receive memory: {}; bytes: {} in, {} out; packets lost: {} ({} congestion events)",
            self.calls_stopped,
            self.in_flight,
            self.connections_open,
            self.connections_accepted,
            self.connections_refused,
            self.receive_memory,
            self.bytes_received,
            self.bytes_sent,
            self.packets_lost,
            self.congestion_events
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_adds_live_traffic_to_ended() {
        let c = Counters::default();
        c.call_received();
        c.call_received();
        c.call_received();
        c.reply(Ok(()));
        c.reply(Err(ErrorKind::Handler));
        c.reply(Err(ErrorKind::Handler));
        c.call_stopped();
        c.connection_accepted();
        c.connection_ended(Traffic {
            bytes_sent: 10,
            bytes_received: 20,
            packets_lost: 3,
            congestion_events: 1,
        });
        let s = c.snapshot(
            1,
            2,
            Traffic {
                bytes_sent: 1,
                bytes_received: 2,
                packets_lost: 4,
                congestion_events: 2,
            },
        );
        assert_eq!(s.calls_received, 3);
        assert_eq!(s.calls_succeeded, 1);
        assert_eq!(s.failed(ErrorKind::Handler), 2);
        assert_eq!(s.failed(ErrorKind::Panic), 0);
        assert_eq!(s.calls_stopped, 1);
        assert_eq!((s.in_flight, s.connections_open), (1, 2));
        assert_eq!((s.bytes_sent, s.bytes_received), (11, 22));
        assert_eq!((s.packets_lost, s.congestion_events), (7, 3));
        let line = s.to_string();
        assert!(
            line.contains("3 received, 1 ok, 2 failed (Handler 2)"),
            "{line}"
        );
    }
}
