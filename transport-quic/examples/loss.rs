//! Throughput of bare quinn under random loss, per congestion controller.
//!
//! Moves `--mib` MiB one way over one quinn stream through a
//! [`teleport_netsim::Relay`] that caps the link (`--rate`, default 10 MB/s,
//! through a `--queue` of 256 KiB) and adds half the round trip of delay and
//! the given random loss to each direction, then prints goodput, the fraction
//! of the link rate, and the packets quinn declared lost. A run that has not
//! finished after `--time-limit` seconds is stopped and its goodput is what
//! arrived by then (marked `*`).
//!
//! With `--compete A:B,...` it instead runs two transfers at once through the
//! one relay (one bottleneck, one queue) for `--compete-secs` and prints what
//! each got: what controller A costs a flow of controller B.
//!
//! `--cc bbr-paced` is an experiment kept for its finding: quinn's BBR with
//! the window its pacer sees bounded so that the pacer follows BBR's own
//! pacing rate ([`PacedBbr`]); it prints that rate at the end of each run.
//!
//! ```text
//! cargo run --release -p teleport-quic --example loss -- --mib 64
//! cargo run --release -p teleport-quic --example loss -- --compete cubic:cubic,bbr:cubic
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use teleport_netsim::{LinkConfig, Relay, RelayStats};
use teleport_quic::{
    quinn_client_config, quinn_server_config, ClientTls, CongestionControl, Identity, ServerTls,
    TransportConfig,
};

#[derive(Debug, Parser)]
#[command(about = "bare quinn through a lossy, rate-capped relay, per congestion controller")]
struct Args {
    /// MiB to move one way per run.
    #[arg(long, default_value_t = 8)]
    mib: u64,
    /// Round trips to simulate, in milliseconds (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "40,100")]
    rtt_ms: Vec<u64>,
    /// Random loss in percent, applied to each direction (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss: Vec<f64>,
    /// Congestion controllers of the sender (comma separated): cubic,
    /// newreno, bbr, or bbr-paced (an experiment of this example, see [`PacedBbr`]).
    #[arg(long, value_delimiter = ',', default_value = "cubic,newreno,bbr")]
    cc: Vec<Cc>,
    /// Link rate in bytes of UDP payload per second, each direction.
    #[arg(long, default_value_t = 10_000_000)]
    rate: u64,
    /// Bottleneck queue in bytes (drop-tail).
    #[arg(long, default_value_t = 256 << 10)]
    queue: usize,
    /// Stop a run after this many seconds.
    #[arg(long, default_value_t = 30)]
    time_limit: u64,
    /// Per-stream receive window in bytes (default: TransportConfig's).
    #[arg(long)]
    stream_window: Option<u64>,
    /// Seed of the relay's random decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pairs of controllers to run against each other, as `a:b` (comma
    /// separated); replaces the single-flow table.
    #[arg(long, value_delimiter = ',')]
    compete: Vec<String>,
    /// How long each competition runs, in seconds.
    #[arg(long, default_value_t = 20)]
    compete_secs: u64,
}

/// What a server endpoint has received, per flow (the first byte of each
/// stream names its flow).
#[derive(Debug, Default)]
struct Received {
    flows: [AtomicU64; 4],
}

struct Server {
    endpoint: quinn::Endpoint,
    received: Arc<Received>,
    fingerprint: teleport_quic::Fingerprint,
}

fn start_server(transport: &TransportConfig) -> anyhow::Result<Server> {
    let identity = Identity::self_signed(["localhost"])?;
    let fingerprint = identity.fingerprint();
    let config = quinn_server_config(&ServerTls::new(identity), transport)?;
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
    let received = Arc::new(Received::default());
    let accept = endpoint.clone();
    let counters = received.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let counters = counters.clone();
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((_send, mut recv)) = connection.accept_bi().await {
                    let counters = counters.clone();
                    tokio::spawn(async move {
                        let mut flow = None;
                        while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                            let mut bytes = chunk.bytes;
                            if flow.is_none() && !bytes.is_empty() {
                                flow = Some(usize::from(bytes[0]) % 4);
                                bytes = bytes.slice(1..);
                            }
                            if let Some(flow) = flow {
                                counters.flows[flow]
                                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
        }
    });
    Ok(Server {
        endpoint,
        received,
        fingerprint,
    })
}

/// A sending connection: writes `total` bytes on one stream tagged `flow`.
async fn sender(
    relay: SocketAddr,
    fingerprint: teleport_quic::Fingerprint,
    transport: &TransportConfig,
    cc: Cc,
    flow: u8,
    total: u64,
) -> anyhow::Result<(
    quinn::Endpoint,
    quinn::Connection,
    tokio::task::JoinHandle<()>,
)> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut config = quinn_client_config(&ClientTls::pinned(fingerprint), transport)?;
    if cc == Cc::PacedBbr {
        config.transport_config(Arc::new(quinn_transport(
            transport,
            Arc::new(PacedBbrConfig),
        )));
    }
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(relay, "localhost")?.await?;
    // Bidirectional: TransportConfig allows no unidirectional streams.
    let (mut send, _recv) = connection.open_bi().await?;
    let write = tokio::spawn(async move {
        let block = Bytes::from(vec![0x5a; 1 << 20]);
        if send.write_all(&[flow]).await.is_err() {
            return;
        }
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if send.write_chunk(block.slice(..n)).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    });
    Ok((endpoint, connection, write))
}

fn link(args: &Args, rtt_ms: u64, loss_percent: f64) -> LinkConfig {
    LinkConfig::default()
        .with_rate(args.rate, args.queue)
        .with_delay(Duration::from_micros(rtt_ms * 500))
        .with_loss(loss_percent / 100.0)
}

fn transport(args: &Args, cc: Cc) -> TransportConfig {
    let mut transport = TransportConfig::default();
    // The relay stands for a path between hosts: internet-sized packets.
    transport.loopback_udp_payload = None;
    transport.congestion = match cc {
        Cc::Quinn(cc) => cc,
        // Set on the client's quinn config by `sender`.
        Cc::PacedBbr => CongestionControl::Cubic,
    };
    if let Some(window) = args.stream_window {
        transport.stream_receive_window = window;
    }
    transport
}

struct Outcome {
    goodput: f64,
    finished: bool,
    lost_packets: u64,
    sent_packets: u64,
    relay: RelayStats,
    error: Option<String>,
}

async fn single(args: &Args, rtt_ms: u64, loss: f64, cc: Cc) -> anyhow::Result<Outcome> {
    let transport = transport(args, cc);
    let server = start_server(&transport)?;
    let link = link(args, rtt_ms, loss);
    let relay = Relay::start(server.endpoint.local_addr()?, link.clone(), link, args.seed)?;
    let total = args.mib << 20;
    let (endpoint, connection, write) = match tokio::time::timeout(
        Duration::from_secs(3),
        sender(relay.addr(), server.fingerprint, &transport, cc, 0, total),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("connect timed out; relay {:?}", relay.stats()),
    };
    let start = Instant::now();
    let limit = Duration::from_secs(args.time_limit);
    let counter = &server.received.flows[0];
    let mut error = None;
    while counter.load(Ordering::Relaxed) < total && start.elapsed() < limit {
        if let Some(reason) = connection.close_reason() {
            error = Some(reason.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let received = counter.load(Ordering::Relaxed);
    let stats = connection.stats();
    if cc == Cc::PacedBbr {
        eprintln!(
            "bbr-paced at the end: pacing rate {:.2} MB/s, BBR window {} B, srtt {:?}, cwnd {}",
            LAST_PACING_RATE.load(Ordering::Relaxed) as f64 / 1e6,
            LAST_WINDOW.load(Ordering::Relaxed),
            stats.path.rtt,
            stats.path.cwnd,
        );
    }
    write.abort();
    connection.close(0u32.into(), b"done");
    server.endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
    Ok(Outcome {
        goodput: received as f64 / elapsed.as_secs_f64(),
        finished: received >= total,
        lost_packets: stats.path.lost_packets,
        sent_packets: stats.path.sent_packets,
        relay: relay.stats(),
        error,
    })
}

async fn compete(
    args: &Args,
    rtt_ms: u64,
    loss: f64,
    a: Cc,
    b: Cc,
) -> anyhow::Result<(f64, f64, u64, u64, String)> {
    // The receiver's windows are what `--stream-window` sets; its own
    // controller only paces acknowledgements.
    let server = start_server(&transport(args, Cc::Quinn(CongestionControl::Cubic)))?;
    let link = link(args, rtt_ms, loss);
    let relay = Relay::start(server.endpoint.local_addr()?, link.clone(), link, args.seed)?;
    let secs = args.compete_secs;
    // More than either flow can move in the time.
    let total = args.rate * secs * 2;
    let (ea, ca, wa) = sender(
        relay.addr(),
        server.fingerprint,
        &transport(args, a),
        a,
        0,
        total,
    )
    .await?;
    let (eb, cb, wb) = sender(
        relay.addr(),
        server.fingerprint,
        &transport(args, b),
        b,
        1,
        total,
    )
    .await?;
    // Skip the first fifth: slow start, and the second flow's handshake.
    let warmup = Duration::from_secs(secs) / 5;
    tokio::time::sleep(warmup).await;
    let base = [0, 1].map(|i| server.received.flows[i].load(Ordering::Relaxed));
    let measured = Duration::from_secs(secs) - warmup;
    tokio::time::sleep(measured).await;
    let now = [0, 1].map(|i| server.received.flows[i].load(Ordering::Relaxed));
    let rate = |i: usize| (now[i] - base[i]) as f64 / measured.as_secs_f64();
    let lost = (ca.stats().path.lost_packets, cb.stats().path.lost_packets);
    let errors: Vec<String> = [("A", &ca), ("B", &cb)]
        .into_iter()
        .filter_map(|(name, c)| c.close_reason().map(|e| format!(" {name} error: {e}")))
        .collect();
    for (e, c, w) in [(ea, ca, wa), (eb, cb, wb)] {
        w.abort();
        c.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(200), e.wait_idle()).await;
    }
    server.endpoint.close(0u32.into(), b"done");
    Ok((rate(0), rate(1), lost.0, lost.1, errors.concat()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mbps = |bytes_per_s: f64| bytes_per_s / 1e6;
    println!(
        "link {:.1} MB/s each way, queue {} KiB, seed {}, stream window {} B",
        mbps(args.rate as f64),
        args.queue >> 10,
        args.seed,
        transport(&args, Cc::Quinn(CongestionControl::Cubic)).stream_receive_window,
    );
    if !args.compete.is_empty() {
        println!();
        println!(
            "| RTT | loss | flow A | A MB/s | flow B | B MB/s | A+B / link | A lost | B lost |"
        );
        println!("|---:|---:|---|---:|---|---:|---:|---:|---:|");
        for &rtt in &args.rtt_ms {
            for &loss in &args.loss {
                for pair in &args.compete {
                    let (a, b) = pair
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("--compete wants a:b, got {pair:?}"))?;
                    let (a, b): (Cc, Cc) = (
                        a.parse().map_err(anyhow::Error::msg)?,
                        b.parse().map_err(anyhow::Error::msg)?,
                    );
                    let (ra, rb, la, lb, errors) = compete(&args, rtt, loss, a, b).await?;
                    println!(
                        "| {rtt} ms | {loss}% | {a} | {:.2} | {b} | {:.2} | {:.0}% | {la} | {lb} |{errors}",
                        mbps(ra),
                        mbps(rb),
                        100.0 * (ra + rb) / args.rate as f64,
                    );
                }
            }
        }
        return Ok(());
    }
    println!(
        "{} MiB per run, time limit {} s (* = stopped at the limit)",
        args.mib, args.time_limit
    );
    println!();
    println!("| RTT | loss | controller | goodput MB/s | of link | lost pkts | sent pkts | relay loss drops | relay queue drops |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for &rtt in &args.rtt_ms {
        for &loss in &args.loss {
            for &cc in &args.cc {
                let o = single(&args, rtt, loss, cc).await?;
                println!(
                    "| {rtt} ms | {loss}% | {cc} | {:.2}{} | {:.0}% | {} | {} | {} | {} |{}",
                    mbps(o.goodput),
                    if o.finished { "" } else { "*" },
                    100.0 * o.goodput / args.rate as f64,
                    o.lost_packets,
                    o.sent_packets,
                    o.relay.up.dropped_loss + o.relay.down.dropped_loss,
                    o.relay.up.dropped_queue + o.relay.down.dropped_queue,
                    o.error.map(|e| format!(" error: {e}")).unwrap_or_default(),
                );
            }
        }
    }
    Ok(())
}

/// A controller choice: one of the library's, or this example's experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cc {
    Quinn(CongestionControl),
    PacedBbr,
}

impl std::str::FromStr for Cc {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("bbr-paced") {
            return Ok(Cc::PacedBbr);
        }
        s.parse().map(Cc::Quinn)
    }
}

impl std::fmt::Display for Cc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cc::Quinn(cc) => cc.fmt(f),
            Cc::PacedBbr => f.write_str("bbr-paced"),
        }
    }
}

/// quinn's transport settings as `TransportConfig::to_quinn` makes them, with
/// another controller.
fn quinn_transport(
    t: &TransportConfig,
    controller: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>,
) -> quinn::TransportConfig {
    let varint = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    let mut q = quinn::TransportConfig::default();
    q.stream_receive_window(varint(t.stream_receive_window))
        .receive_window(varint(t.receive_window))
        .send_window(t.send_window)
        .max_concurrent_bidi_streams(t.max_concurrent_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(t.keep_alive)
        .max_idle_timeout(quinn::IdleTimeout::try_from(t.idle_timeout).ok())
        .congestion_controller_factory(controller);
    q
}

/// An experiment: quinn's BBR, with the window it shows quinn bounded so
/// that quinn's pacer (which spreads 1.25 x the window over the smoothed
/// round trip and ignores the controller's pacing rate) sends at BBR's own
/// pacing rate: window = min(BBR's window, pacing rate x srtt / 1.25).
/// What the last paced-BBR controller reported, for the table's last column.
static LAST_PACING_RATE: AtomicU64 = AtomicU64::new(0);
static LAST_WINDOW: AtomicU64 = AtomicU64::new(0);

struct PacedBbr {
    inner: Box<dyn quinn::congestion::Controller>,
    srtt: Duration,
    mtu: u16,
}

#[derive(Debug)]
struct PacedBbrConfig;

impl quinn::congestion::ControllerFactory for PacedBbrConfig {
    fn build(
        self: Arc<Self>,
        now: Instant,
        current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        let inner = Arc::new(quinn::congestion::BbrConfig::default()).build(now, current_mtu);
        Box::new(PacedBbr {
            inner,
            srtt: Duration::ZERO,
            mtu: current_mtu,
        })
    }
}

impl quinn::congestion::Controller for PacedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.srtt = rtt.get();
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.inner.window();
        // Bits per second; 0 until BBR's first rate sample.
        let rate = self.inner.metrics().pacing_rate.unwrap_or(0) / 8;
        LAST_PACING_RATE.store(rate, Ordering::Relaxed);
        LAST_WINDOW.store(window, Ordering::Relaxed);
        if rate == 0 || self.srtt.is_zero() {
            return window;
        }
        let paced = (rate as f64 * self.srtt.as_secs_f64() / 1.25) as u64;
        window.min(paced.max(4 * u64::from(self.mtu)))
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(PacedBbr {
            inner: self.inner.clone_box(),
            srtt: self.srtt,
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}
