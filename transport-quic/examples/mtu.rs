//! Throughput of bare quinn per MTU discovery upper bound.
//!
//! Moves `--mib` MiB one way over one quinn stream for each upper bound of
//! `--bounds` and each way of building the endpoints of `--modes`, and prints
//! goodput, the packets the sender sent and lost, the MTU the path ended at,
//! the MTU probes lost and the black holes quinn detected,
//! and the ratio to the 1,452-byte baseline of the same mode measured in the
//! same run. Each setting runs `--repeat` times, interleaved, and the median
//! is printed.
//!
//! Modes:
//! * `teleport`: the crate's endpoints ([`teleport_quic::reference`]), which
//!   cap a segmentation-offload batch at 65,507 bytes;
//! * `plain`: quinn's own endpoints with the same transport settings, no cap
//!   (quinn hands the kernel up to 10 packets per `sendmsg`);
//! * `nogso`: the crate's endpoints with segmentation offload off.
//!
//! `--listen ADDR` runs only a receiving server (and prints its certificate's
//! fingerprint); `--connect ADDR --fingerprint F` runs only the senders. That
//! is how `mtu-netns.sh` runs it across two network namespaces.
//!
//! ```text
//! cargo run --release -p teleport-quic --example mtu -- --mib 256
//! cargo run --release -p teleport-quic --example mtu -- --bounds 1452,6550,9000 --modes teleport,plain
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use teleport_quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport_quic::{
    quinn_client_config, quinn_endpoint_config, quinn_server_config, ClientTls, Fingerprint,
    Identity, ServerTls, TransportConfig,
};

#[derive(Debug, Parser)]
#[command(about = "bare quinn one way, per MTU discovery upper bound")]
struct Args {
    /// MiB to move one way per run.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// MTU discovery upper bounds in bytes of UDP payload (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1452,3000,6000,6550,7000,9000,16384"
    )]
    bounds: Vec<u16>,
    /// Ways to build the endpoints (comma separated): teleport, plain, nogso.
    #[arg(long, value_delimiter = ',', default_value = "teleport,plain")]
    modes: Vec<Mode>,
    /// Runs per setting (interleaved); the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Stop a run after this many seconds.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Only serve, on this address (prints the certificate fingerprint).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Only send, to the server on this address (see --listen).
    #[arg(long, requires = "fingerprint")]
    connect: Option<SocketAddr>,
    /// The server's certificate fingerprint, with --connect.
    #[arg(long)]
    fingerprint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Teleport,
    Plain,
    Nogso,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Teleport => "teleport",
            Mode::Plain => "plain",
            Mode::Nogso => "nogso",
        }
    }
}

/// The transport settings of one run.
fn transport(mode: Mode, bound: u16) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.mtu_upper_bound = bound;
    t.max_udp_payload = bound.max(1_472);
    t.segmentation_offload = mode != Mode::Nogso;
    // The bound under test applies on loopback too.
    t.loopback_udp_payload = None;
    t
}

/// A server's settings: accepts any packet size, so the client's bound decides.
fn server_transport(mode: Mode) -> TransportConfig {
    let mut t = transport(mode, 1_452);
    t.max_udp_payload = 65_527;
    t
}

#[derive(Clone, Copy, Debug)]
struct Run {
    secs: f64,
    sent: u64,
    lost: u64,
    mtu: u16,
    probes_lost: u64,
    black_holes: u64,
    complete: bool,
}

/// A plain-quinn sink server (mode `plain`).
fn plain_server(
    addr: SocketAddr,
    tls: &ServerTls,
    t: &TransportConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let socket = big_socket(addr)?;
    let endpoint = quinn::Endpoint::new(
        quinn_endpoint_config(t),
        Some(quinn_server_config(tls, t)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        let mut received = 0u64;
                        while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, false).await {
                            received += chunk.bytes.len() as u64;
                        }
                        // Same reply as the reference sink: the count less the mode byte.
                        let count = received.saturating_sub(1);
                        let _ = send.write_all(&count.to_le_bytes()).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    Ok(endpoint)
}

/// A UDP socket with 8 MiB buffers, as the crate's endpoints have.
fn big_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let raw = socket2::SockRef::from(&socket);
    raw.set_recv_buffer_size(teleport_quic::SOCKET_BUFFER)?;
    raw.set_send_buffer_size(teleport_quic::SOCKET_BUFFER)?;
    Ok(socket)
}

/// One transfer of `payload` to the server at `addr`.
async fn run_once(
    mode: Mode,
    bound: u16,
    addr: SocketAddr,
    fingerprint: Fingerprint,
    payload: Bytes,
    limit: Duration,
) -> anyhow::Result<Run> {
    let t = transport(mode, bound);
    let tls = ClientTls::pinned(fingerprint);
    let expected = payload.len() as u64;
    let (stats, secs, complete) = match mode {
        Mode::Teleport | Mode::Nogso => {
            let client = ReferenceClient::connect(addr, "localhost", &tls, &t).await?;
            let start = Instant::now();
            let reply =
                tokio::time::timeout(limit, client.request(ReferenceMode::Sink, payload)).await;
            let secs = start.elapsed().as_secs_f64();
            let complete = matches!(&reply, Ok(Ok(r)) if r[..] == expected.to_le_bytes());
            let stats = client.stats();
            client.close().await;
            (stats, secs, complete)
        }
        Mode::Plain => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let endpoint = quinn::Endpoint::new(
                quinn_endpoint_config(&t),
                None,
                big_socket(local)?,
                Arc::new(quinn::TokioRuntime),
            )?;
            let connection = endpoint
                .connect_with(quinn_client_config(&tls, &t)?, addr, "localhost")?
                .await?;
            let start = Instant::now();
            let transfer = async {
                let (mut send, mut recv) = connection.open_bi().await?;
                send.write_all(&[ReferenceMode::Sink as u8]).await?;
                send.write_chunk(payload).await?;
                send.finish()?;
                let reply = recv.read_to_end(8).await?;
                anyhow::Ok(reply)
            };
            let reply = tokio::time::timeout(limit, transfer).await;
            let secs = start.elapsed().as_secs_f64();
            let complete = matches!(&reply, Ok(Ok(r)) if r[..] == expected.to_le_bytes());
            let stats = connection.stats();
            connection.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
            (stats, secs, complete)
        }
    };
    Ok(Run {
        secs,
        sent: stats.path.sent_packets,
        lost: stats.path.lost_packets,
        mtu: stats.path.current_mtu,
        probes_lost: stats.path.lost_plpmtud_probes,
        black_holes: stats.path.black_holes_detected,
        complete,
    })
}

/// The servers of one process: one per mode.
struct Servers {
    teleport: ReferenceServer,
    nogso: ReferenceServer,
    plain: quinn::Endpoint,
}

impl Servers {
    fn start(addr: SocketAddr, tls: &ServerTls, port_step: bool) -> anyhow::Result<Servers> {
        // With a fixed address, the three servers sit on three ports in a row.
        let at = |i: u16| {
            let mut a = addr;
            if port_step && a.port() != 0 {
                a.set_port(a.port() + i);
            }
            a
        };
        Ok(Servers {
            teleport: ReferenceServer::start(at(0), tls, &server_transport(Mode::Teleport))?,
            nogso: ReferenceServer::start(at(1), tls, &server_transport(Mode::Nogso))?,
            plain: plain_server(at(2), tls, &server_transport(Mode::Plain))?,
        })
    }

    fn addr(&self, mode: Mode) -> anyhow::Result<SocketAddr> {
        Ok(match mode {
            Mode::Teleport => self.teleport.local_addr()?,
            Mode::Nogso => self.nogso.local_addr()?,
            Mode::Plain => self.plain.local_addr()?,
        })
    }
}

/// Where the server of `mode` listens when the server is another process.
fn remote_addr(base: SocketAddr, mode: Mode) -> SocketAddr {
    let mut a = base;
    let step = match mode {
        Mode::Teleport => 0,
        Mode::Nogso => 1,
        Mode::Plain => 2,
    };
    a.set_port(base.port() + step);
    a
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if let Some(listen) = args.listen {
        let identity = Identity::self_signed(["localhost"])?;
        println!("fingerprint {}", identity.fingerprint());
        let _servers = Servers::start(listen, &ServerTls::new(identity), true)?;
        println!("listening on {listen} (+1 nogso, +2 plain)");
        std::future::pending::<()>().await;
    }

    let (local, fingerprint) = if args.connect.is_some() {
        let f = args.fingerprint.as_deref().context("--fingerprint")?;
        (None, f.parse::<Fingerprint>().map_err(anyhow::Error::msg)?)
    } else {
        let identity = Identity::self_signed(["localhost"])?;
        let fingerprint = identity.fingerprint();
        let servers = Servers::start("127.0.0.1:0".parse()?, &ServerTls::new(identity), false)?;
        (Some(servers), fingerprint)
    };
    let addr = |mode| match (&local, args.connect) {
        (Some(servers), _) => servers.addr(mode),
        (None, Some(base)) => Ok(remote_addr(base, mode)),
        (None, None) => unreachable!(),
    };

    let payload: Bytes = (0..args.mib << 20).map(|i| (i % 251) as u8).collect();
    let limit = Duration::from_secs(args.time_limit);
    let settings: Vec<(Mode, u16)> = args
        .modes
        .iter()
        .flat_map(|&m| args.bounds.iter().map(move |&b| (m, b)))
        .collect();
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); settings.len()];
    for _ in 0..args.repeat {
        for (i, &(mode, bound)) in settings.iter().enumerate() {
            let run = run_once(
                mode,
                bound,
                addr(mode)?,
                fingerprint,
                payload.clone(),
                limit,
            )
            .await
            .with_context(|| format!("{} bound {bound}", mode.name()))?;
            runs[i].push(run);
        }
    }

    let mib = args.mib;
    println!(
        "{mib} MiB one way, median of {} runs; ratio: to bound 1452 of the same mode",
        args.repeat
    );
    println!(
        "{:<9} {:>6} {:>7} {:>6} {:>9} {:>8} {:>6} {:>7} {:>6}",
        "mode", "bound", "GB/s", "ratio", "sent", "lost", "mtu", "probes", "holes"
    );
    let goodput = |r: &Run| (mib << 20) as f64 / r.secs / 1e9;
    let gbps: Vec<f64> = runs
        .iter()
        .map(|rs| median(rs.iter().map(goodput).collect()))
        .collect();
    for (i, &(mode, bound)) in settings.iter().enumerate() {
        let baseline = settings
            .iter()
            .position(|&(m, b)| m == mode && b == 1_452)
            .map(|j| gbps[j]);
        let ratio = baseline.map_or("-".to_string(), |b| format!("{:.2}", gbps[i] / b));
        let rs = &runs[i];
        let med = |f: fn(&Run) -> u64| median(rs.iter().map(|r| f(r) as f64).collect()) as u64;
        let incomplete = rs.iter().filter(|r| !r.complete).count();
        println!(
            "{:<9} {:>6} {:>7.3} {:>6} {:>9} {:>8} {:>6} {:>7} {:>6}{}",
            mode.name(),
            bound,
            gbps[i],
            ratio,
            med(|r| r.sent),
            med(|r| r.lost),
            med(|r| r.mtu.into()),
            med(|r| r.probes_lost),
            med(|r| r.black_holes),
            if incomplete > 0 {
                format!("  ({incomplete} runs stopped at the time limit)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
