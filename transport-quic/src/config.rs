//! QUIC settings for large transfers over long links.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, VarInt};

/// The congestion controller a sender uses: how fast it sends into a path
/// it shares with others, and how it reacts to loss.
///
/// Loss-based controllers (Cubic, NewReno) read every lost packet as
/// congestion and halve (NewReno) or cut by 30% (Cubic) their window, so on a
/// path with random loss they crawl. BBR models the path's bandwidth and
/// round trip instead and ignores random loss, at the cost of more packets
/// lost and more pressure on flows it shares a queue with. The figures behind
/// the default are in `docs/reliability.md`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CongestionControl {
    /// CUBIC (RFC 9438), quinn's default and the Internet's usual one.
    #[default]
    Cubic,
    /// NewReno (RFC 9002), the simplest loss-based controller.
    NewReno,
    /// quinn's BBR (version 1, marked experimental by quinn). Measured here:
    /// about 95% of a 10 MB/s link at 1% and 5% random loss where Cubic gets
    /// 1-5%, but it loses a third to two thirds of what it sends, leaves a
    /// Cubic flow on the same bottleneck under 1% of the link, and at 100 ms
    /// its receiver aborted it whenever the receiver's stream window was
    /// 16 MiB or more. Only for a path Teleport has to itself, with a stream
    /// receive window of at most 8 MiB on the receiving side.
    Bbr,
}

impl CongestionControl {
    /// Every controller, for benchmarks and tests.
    pub const ALL: [CongestionControl; 3] = [
        CongestionControl::Cubic,
        CongestionControl::NewReno,
        CongestionControl::Bbr,
    ];

    /// A short lowercase name: `cubic`, `newreno` or `bbr`.
    pub fn name(self) -> &'static str {
        match self {
            CongestionControl::Cubic => "cubic",
            CongestionControl::NewReno => "newreno",
            CongestionControl::Bbr => "bbr",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            CongestionControl::Cubic => Arc::new(CubicConfig::default()),
            CongestionControl::NewReno => Arc::new(NewRenoConfig::default()),
            CongestionControl::Bbr => Arc::new(BbrConfig::default()),
        }
    }
}

impl std::fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CongestionControl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CongestionControl::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown congestion controller {s:?} (cubic, newreno, bbr)"))
    }
}

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
    /// A connection with no packets for this long is closed (the shorter of
    /// the two sides' values applies). Default 30 s: it only decides for a
    /// peer that is gone while nothing is awaited from it, since the
    /// application's own rules act sooner while something is (the client's
    /// `max_age`, 5 s, and the server's `peer_timeout`, 10 s); it must stay
    /// above both so that they, with their clearer errors, fire first.
    pub idle_timeout: Duration,
    /// Send a keep-alive packet after this much silence so a quiet connection
    /// survives NATs and the idle timeout. `None` sends none. Default 10 s: a
    /// live idle peer survives two lost keep-alives in a row.
    pub keep_alive: Option<Duration>,
    /// The congestion controller of what this side sends. Cubic by default:
    /// quinn's BBR keeps under random loss the throughput Cubic loses, but
    /// starves flows sharing its path and, against a receiver with a large
    /// [`stream_receive_window`](Self::stream_receive_window), gets its
    /// connection aborted ("too many gaps in stream buffer"); see
    /// [`CongestionControl`] and `docs/reliability.md`.
    pub congestion: CongestionControl,
    /// The largest UDP payload, in bytes, this side's endpoint accepts: sized
    /// into its receive buffers and announced to the peer (QUIC's
    /// `max_udp_payload_size`), so the peer sends no packet bigger. quinn's
    /// default is 1,472 (an Ethernet frame), which keeps packets at 1,452
    /// bytes or less whatever the path could carry. Applied where the
    /// endpoint is bound ([`Listener::bind`](crate::Listener::bind), the first
    /// connection of a [`Connector`](crate::Connector)).
    pub max_udp_payload: u16,
    /// The largest UDP payload, in bytes, MTU discovery probes for.
    /// Connections always start at 1,200 bytes (the size every QUIC path
    /// must carry) and probe upward from there; a probe the path drops only
    /// stops the search, and a path that starts dropping big packets is
    /// detected as a black hole and falls back to 1,200. The size used is
    /// also bounded by the peer's [`max_udp_payload`](Self::max_udp_payload).
    ///
    /// Each packet costs quinn about the same whatever its size, so on paths
    /// with a large MTU (loopback, jumbo-frame LANs) bigger packets move more
    /// bytes per CPU second: see "Packet size" in `docs/performance.md`.
    /// Endpoints split quinn's segmentation-offload batches (up to 10
    /// packets) into `sendmsg` calls of at most 65,507 bytes: the kernel
    /// refuses bigger ones, and quinn-udp drops them silently.
    pub mtu_upper_bound: u16,
    /// Whether quinn hands the kernel batches of packets (Linux UDP GSO)
    /// instead of one packet per system call. On by default.
    pub segmentation_offload: bool,
    /// The packet size for a peer at a loopback address (this host): it
    /// replaces [`max_udp_payload`](Self::max_udp_payload) and
    /// [`mtu_upper_bound`](Self::mtu_upper_bound) where larger, for
    /// connections to and from `127.0.0.0/8` and `::1`. Loopback carries
    /// datagrams of up to 65,527 bytes and quinn's cost is per packet, so
    /// processes on one host move 2-3x the bytes per CPU second with big
    /// packets (`docs/performance.md`, "Packet size"). MTU discovery still
    /// starts at 1,200 and probes up. Default `Some(65_527)`; `None` treats
    /// loopback like any other path.
    pub loopback_udp_payload: Option<u16>,
    /// Bytes of receive buffers (data sections of more than 64 KiB) the
    /// connections of this process keep, all together (every endpoint's,
    /// every client's), once a message's arrays are dropped, for their next
    /// message of about the same size; a connection keeps a buffer only
    /// while the process's total stays within its own configuration's
    /// bound. Writing into memory
    /// already mapped skips a page fault and a cleared page for every page
    /// the message fills: a 256 MiB echo on loopback measured 1.5x faster,
    /// and steady instead of swinging with where the kernel found pages
    /// (`docs/performance.md`, "Reused receive memory"). What a connection
    /// keeps goes back to the system when the connection ends; a kept buffer
    /// reused is charged whole to the receive memory budget. Default 1 GiB;
    /// 0 returns every buffer to the system at once.
    pub recycled_receive_memory: usize,
}

/// The most UDP payload one segmentation-offload batch may carry: an IPv4
/// datagram's 65,535 bytes less 20 bytes of IP header and 8 of UDP header.
/// Linux refuses a bigger `sendmsg` with `UDP_SEGMENT` (EMSGSIZE), and
/// quinn-udp treats EMSGSIZE as a lost MTU probe and drops the whole batch
/// without a word.
pub(crate) const MAX_GSO_BATCH: usize = 65_535 - 20 - 8;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            stream_receive_window: 32 << 20,
            receive_window: 128 << 20,
            send_window: 128 << 20,
            max_concurrent_streams: 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(10)),
            congestion: CongestionControl::default(),
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            mtu_upper_bound: DEFAULT_MTU_UPPER_BOUND,
            segmentation_offload: true,
            loopback_udp_payload: Some(LOOPBACK_UDP_PAYLOAD),
            recycled_receive_memory: 1 << 30,
        }
    }
}

/// Default of [`TransportConfig::max_udp_payload`]: quinn's.
const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1_472;
/// Default of [`TransportConfig::mtu_upper_bound`]: quinn's 1,452, the size
/// the internet carries. Jumbo bounds (8,972) measured 2.6x the goodput on
/// loopback and 2.3x across a 9,000-MTU veth pair (`docs/performance.md`,
/// "Packet size"), but 0.82x across a 1,500-byte path while discovery
/// searched down from them; so larger packets are opt-in on other paths
/// (`mtu_upper_bound` and `max_udp_payload` 8,972 for a jumbo-frame data
/// centre) and automatic only on loopback
/// ([`loopback_udp_payload`](TransportConfig::loopback_udp_payload)).
const DEFAULT_MTU_UPPER_BOUND: u16 = 1_452;
/// Default of [`TransportConfig::loopback_udp_payload`]: the largest UDP
/// payload over IPv6 (65,535 less UDP's 8-byte header). Over IPv4 the limit
/// is 65,507; MTU discovery finds it (a probe the kernel refuses counts as
/// lost, and the search goes on below).
const LOOPBACK_UDP_PAYLOAD: u16 = 65_527;

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
            congestion: CongestionControl::Cubic,
            max_udp_payload: 1_472,
            mtu_upper_bound: 1_452,
            segmentation_offload: true,
            loopback_udp_payload: None,
            // quinn has nothing like it.
            recycled_receive_memory: 0,
        }
    }

    /// These settings for a connection with a peer at `peer`: on loopback,
    /// packets up to [`loopback_udp_payload`](Self::loopback_udp_payload).
    pub fn for_peer(&self, peer: IpAddr) -> TransportConfig {
        let mut config = self.clone();
        if let Some(loopback) = self.loopback_udp_payload {
            if peer.to_canonical().is_loopback() {
                config.mtu_upper_bound = config.mtu_upper_bound.max(loopback);
                config.max_udp_payload = config.max_udp_payload.max(loopback);
            }
        }
        config
    }

    /// quinn's endpoint configuration for these settings.
    pub(crate) fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::default();
        // An endpoint may serve loopback peers and others alike, so it accepts
        // the larger of the two sizes; each connection's MTU discovery bound
        // (`for_peer`) decides what is sent. Below 1,200 quinn refuses the
        // value; QUIC needs 1,200 anyway.
        let accepted = self
            .max_udp_payload
            .max(self.loopback_udp_payload.unwrap_or(0));
        let _ = config.max_udp_payload_size(accepted.max(1_200));
        config
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
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .congestion_controller_factory(self.congestion.factory())
            .enable_segmentation_offload(self.segmentation_offload);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound);
        t.mtu_discovery_config(Some(mtu));
        Arc::new(t)
    }
}
