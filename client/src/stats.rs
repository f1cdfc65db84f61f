//! What a client has done: [`ClientStats`], from [`Client::stats`](crate::Client::stats).

use std::fmt;

/// What a client's calls and connections came to since it was built.
/// `Display` prints it on one line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Calls started.
    pub calls_started: u64,
    /// Calls completed with a result.
    pub calls_succeeded: u64,
    /// Calls completed with an error (the function's, the server's, the
    /// connection's; cancelled and timed-out calls included).
    pub calls_failed: u64,
    /// Sends of idempotent calls after their first, on a new connection.
    pub calls_resent: u64,
    /// Calls sent and not yet answered.
    pub in_flight: usize,
    /// Calls waiting for a slot or for a connection.
    pub queued: usize,
    /// Whether a connection takes calls now.
    pub connected: bool,
    /// Connections that completed their Hello exchange (1 + reconnections).
    pub connections: u64,
    /// UDP payload bytes sent (QUIC overhead included).
    pub bytes_sent: u64,
    /// UDP payload bytes received (QUIC overhead included).
    pub bytes_received: u64,
    /// Packets this client sent that were declared lost and retransmitted.
    pub packets_lost: u64,
    /// Times the client's congestion controller cut its sending window.
    pub congestion_events: u64,
}

impl fmt::Display for ClientStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "calls: {} started, {} ok, {} failed, {} resent, {} in flight, {} queued; \
             {} ({} connections); bytes: {} out, {} in; packets lost: {} \
             ({} congestion events)",
            self.calls_started,
            self.calls_succeeded,
            self.calls_failed,
            self.calls_resent,
            self.in_flight,
            self.queued,
            if self.connected {
                "connected"
            } else {
                "not connected"
            },
            self.connections,
            self.bytes_sent,
            self.bytes_received,
            self.packets_lost,
            self.congestion_events
        )
    }
}
