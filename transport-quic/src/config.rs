//! QUIC settings for large transfers over long links.

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};

/// Flow-control windows, stream limits and timers of a connection.
///
/// The defaults are sized for arrays of hundreds of MiB over links with a large
/// bandwidth-delay product (10 Gbit/s × 50 ms ≈ 60 MiB in flight). quinn's own
/// defaults (1.25 MB per stream, 10 MB send buffer) are sized for 100 Mbit/s ×
/// 100 ms: a stream can have at most 1.25 MB unacknowledged, which caps it at
/// 1.25 MB per round trip (25 MB/s at 50 ms). Even on loopback, where the round
/// trip is a fraction of a millisecond, `teleport bench` measured bare quinn
/// moving 256 MiB one way at 0.95 GB/s with these windows and 0.85 GB/s with
/// quinn's (1.11x, see `docs/performance.md`). A window is only credit, not
/// memory: memory is used only when the receiving application falls behind.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Bytes one stream may have in flight before the receiver reads them.
    pub stream_receive_window: u64,
    /// Bytes all streams of a connection may have in flight together.
    pub receive_window: u64,
    /// Bytes this side buffers for sending across all streams.
    pub send_window: u64,
    /// Streams the peer may have open at once: the number of calls in flight
    /// on one connection, plus one control stream.
    pub max_concurrent_streams: u32,
    /// A connection with no packets for this long is closed.
    pub idle_timeout: Duration,
    /// Send a keep-alive packet after this much silence so a quiet connection
    /// survives NATs and the idle timeout. `None` sends none.
    pub keep_alive: Option<Duration>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            stream_receive_window: 32 << 20,
            receive_window: 128 << 20,
            send_window: 128 << 20,
            max_concurrent_streams: 1024,
            idle_timeout: Duration::from_secs(60),
            keep_alive: Some(Duration::from_secs(15)),
        }
    }
}

impl TransportConfig {
    /// quinn's settings as they come, for comparison in benchmarks.
    pub fn quinn_defaults() -> TransportConfig {
        TransportConfig {
            stream_receive_window: 1_250_000,
            receive_window: u32::MAX.into(),
            send_window: 10_000_000,
            max_concurrent_streams: 100,
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
        }
    }

    pub(crate) fn to_quinn(&self) -> Arc<quinn::TransportConfig> {
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(self.stream_receive_window))
            .receive_window(varint(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(self.max_concurrent_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(self.keep_alive)
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        Arc::new(t)
    }
}
