//! `teleport bench`: the full Teleport stack against bare quinn with the same
//! TLS and transport settings, in the same process and run, on loopback.
//!
//! A measurement, not a test: it prints numbers and asserts nothing about them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use teleport::quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport::{
    tree, Array, BatchPolicy, Client, ClientTls, Function, HandlerError, Identity, Server,
    ServerTls, TransportConfig, Tree,
};

use crate::builtins::bind_builtins;
use crate::demo::pattern_array;

const SMALL: usize = 1 << 10;
const LARGE: usize = 256 << 20;
/// Calls in flight at once for the small-call and batching measurements.
const CONCURRENCY: usize = 64;
/// The batching measurement's function: `y = W x` with `W` of shape
/// `[MODEL_OUT, MODEL_IN]` and `x` a float32 vector of `MODEL_IN` values...
const MODEL_IN: usize = 256;
const MODEL_OUT: usize = 64;
/// ...plus this much fixed CPU work per invocation of the function, standing
/// for what a batch shares (loading weights, launching a GPU kernel): the
/// unbatched function pays it per call, the batched one per batch.
const INVOCATION_COST: Duration = Duration::from_micros(50);

/// One side of the comparison: something that can echo or sink bytes.
#[derive(Clone, Debug)]
enum Peer {
    Teleport(Client),
    Quinn(Arc<ReferenceClient>),
}

impl Peer {
    fn name(&self) -> &'static str {
        match self {
            Peer::Teleport(_) => "teleport",
            Peer::Quinn(_) => "bare quinn",
        }
    }

    /// Echoes `payload`; returns the bytes that came back.
    async fn echo(&self, payload: &Array) -> anyhow::Result<Bytes> {
        match self {
            Peer::Teleport(client) => {
                let reply = client.call("echo", Tree::Array(payload.clone())).await?;
                Ok(reply.into_array()?.into_data())
            }
            Peer::Quinn(client) => Ok(client
                .request(ReferenceMode::Echo, payload.data().clone())
                .await?),
        }
    }

    /// Sends `payload` one way; returns the byte count the server reports.
    async fn sink(&self, payload: &Array) -> anyhow::Result<u64> {
        match self {
            Peer::Teleport(client) => {
                let reply = client.call("sink", tree!({"x": (payload.clone())})).await?;
                Ok(u64::try_from(reply.get("bytes")?.as_int()?)?)
            }
            Peer::Quinn(client) => {
                let reply = client
                    .request(ReferenceMode::Sink, payload.data().clone())
                    .await?;
                let bytes: [u8; 8] = reply[..]
                    .try_into()
                    .context("the reference server's sink reply is not 8 bytes")?;
                Ok(u64::from_le_bytes(bytes))
            }
        }
    }
}

pub(crate) async fn run(quick: bool) -> anyhow::Result<()> {
    let rounds = if quick { 1 } else { 3 };
    let small_for = Duration::from_secs(if quick { 1 } else { 3 });
    let transport = TransportConfig::default();
    let identity = Identity::self_signed(["localhost"])?;
    let fingerprint = identity.fingerprint();

    let server = bind_builtins(Server::builder())
        .bind("sink", |args: Tree| async move {
            Ok(tree!({"bytes": (args.data_len() as i64)}))
        })
        .bind("model", Function::blocking(|x: Tree| model(&x)))
        .bind(
            "model_batched",
            Function::blocking(|x: Tree| model(&x)).batch(BatchPolicy {
                max_batch: CONCURRENCY,
                max_wait: Duration::from_millis(1),
            }),
        )
        .identity(identity.clone())
        .transport(transport.clone())
        .max_in_flight(CONCURRENCY * 2)
        .listen("127.0.0.1:0")
        .await?;
    let client = Client::builder(server.local_addr())
        .pin(fingerprint)
        .transport(transport.clone())
        .max_in_flight(CONCURRENCY * 2)
        .connect()
        .await?;
    let reference = ReferenceServer::start(
        "127.0.0.1:0".parse()?,
        &ServerTls::new(identity),
        &transport,
    )?;
    let reference_client = ReferenceClient::connect(
        reference.local_addr()?,
        "localhost",
        &ClientTls::pinned(fingerprint),
        &transport,
    )
    .await?;
    let peers = [
        Peer::Teleport(client.clone()),
        Peer::Quinn(Arc::new(reference_client)),
    ];

    println!(
        "teleport bench{}: loopback, same TLS (pinned self-signed, TLS 1.3) and TransportConfig \
         for both; {rounds} round(s), best of rounds shown",
        if quick { " --quick" } else { "" }
    );
    println!(
        "tokio multi-thread runtime, {} worker threads; client and server in this process\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // (a) small calls.
    let small = pattern_array(SMALL, 1);
    let mut best = [0.0f64; 2];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            // A short warm-up so connection windows and allocators settle.
            small_calls(peer, &small, Duration::from_millis(200)).await?;
            let rate = small_calls(peer, &small, small_for).await?;
            println!(
                "  round {}: {:<10} {:>9.0} calls/s (1 KiB echo, {CONCURRENCY} in flight)",
                round + 1,
                peer.name(),
                rate
            );
            best[i] = best[i].max(rate);
        }
    }
    report("(a) small calls/s", "calls/s", best);

    // (b) one way.
    let large = pattern_array(LARGE, 2);
    let mut best = [0.0f64; 2];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            let t = Instant::now();
            let received = peer.sink(&large).await?;
            let elapsed = t.elapsed();
            ensure!(
                received == LARGE as u64,
                "{}: the server received {received} bytes, not {LARGE}",
                peer.name()
            );
            let rate = LARGE as f64 / elapsed.as_secs_f64() / 1e9;
            println!(
                "  round {}: {:<10} {:>6.2} GB/s (256 MiB one way, {:.0} ms)",
                round + 1,
                peer.name(),
                rate,
                elapsed.as_secs_f64() * 1e3
            );
            best[i] = best[i].max(rate);
        }
    }
    report("(b) 256 MiB one way", "GB/s", best);

    // (c) echo.
    let mut best = [0.0f64; 2];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            let t = Instant::now();
            let back = peer.echo(&large).await?;
            let elapsed = t.elapsed();
            // Compared outside the timing; both sides are held to the same check.
            ensure!(
                back == large.data(),
                "{}: the echo differs from what was sent",
                peer.name()
            );
            let rate = 2.0 * LARGE as f64 / elapsed.as_secs_f64() / 1e9;
            println!(
                "  round {}: {:<10} {:>6.2} GB/s (256 MiB echo, both directions counted, {:.0} ms)",
                round + 1,
                peer.name(),
                rate,
                elapsed.as_secs_f64() * 1e3
            );
            best[i] = best[i].max(rate);
        }
    }
    report("(c) 256 MiB echo, both directions", "GB/s", best);

    // (d) the windows: bare quinn one way with quinn's own defaults against
    // the TransportConfig defaults, to back the choice made in teleport-quic.
    let mut best = [0.0f64; 2];
    let configs = [
        TransportConfig::default(),
        TransportConfig::quinn_defaults(),
    ];
    for round in 0..rounds {
        for (i, config) in configs.iter().enumerate() {
            let rate = reference_one_way(&large, config).await?;
            println!(
                "  round {}: bare quinn, {:<16} {:>6.2} GB/s (256 MiB one way)",
                round + 1,
                if i == 0 {
                    "our windows"
                } else {
                    "quinn's windows"
                },
                rate
            );
            best[i] = best[i].max(rate);
        }
    }
    println!(
        "(d) 256 MiB one way over bare quinn: TransportConfig defaults {:.2} GB/s, quinn's \
         defaults {:.2} GB/s, ratio {:.2}x\n",
        best[0],
        best[1],
        if best[1] > 0.0 {
            best[0] / best[1]
        } else {
            0.0
        }
    );

    // (e) batching: the same function bound unbatched and batched.
    let x = Array::from_vec1(
        (0..MODEL_IN)
            .map(|i| (i % 7) as f32 - 3.0)
            .collect::<Vec<_>>(),
    );
    let x = Tree::Array(x);
    let unbatched = client.call("model", x.clone()).await?;
    let batched = client.call("model_batched", x.clone()).await?;
    ensure!(
        unbatched == batched,
        "the batched model's result differs from the unbatched one's"
    );
    let mut best = [0.0f64; 2];
    for round in 0..rounds {
        for (i, method) in ["model", "model_batched"].into_iter().enumerate() {
            calls_per_second(&client, method, &x, Duration::from_millis(200)).await?;
            let rate = calls_per_second(&client, method, &x, small_for).await?;
            println!(
                "  round {}: {:<14} {:>9.0} calls/s ({MODEL_OUT}x{MODEL_IN} float32 \
                 matrix-vector product + {} µs per invocation, {CONCURRENCY} in flight)",
                round + 1,
                method,
                rate,
                INVOCATION_COST.as_micros()
            );
            best[i] = best[i].max(rate);
        }
    }
    println!(
        "(e) batching: batched {:.0} calls/s (max_batch {CONCURRENCY}, max_wait 1 ms), \
         unbatched {:.0} calls/s, ratio {:.2}x\n",
        best[1],
        best[0],
        if best[0] > 0.0 {
            best[1] / best[0]
        } else {
            0.0
        }
    );

    if let Peer::Quinn(reference_client) = &peers[1] {
        reference_client.close().await;
    }
    reference.close();
    client.close();
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// One 256 MiB transfer over a fresh bare-quinn connection using `config` on
/// both ends; returns GB/s.
async fn reference_one_way(payload: &Array, config: &TransportConfig) -> anyhow::Result<f64> {
    let identity = Identity::self_signed(["localhost"])?;
    let fingerprint = identity.fingerprint();
    let server = ReferenceServer::start("127.0.0.1:0".parse()?, &ServerTls::new(identity), config)?;
    let client = ReferenceClient::connect(
        server.local_addr()?,
        "localhost",
        &ClientTls::pinned(fingerprint),
        config,
    )
    .await?;
    let peer = Peer::Quinn(Arc::new(client));
    let t = Instant::now();
    let received = peer.sink(payload).await?;
    let elapsed = t.elapsed();
    ensure!(
        received == payload.nbytes() as u64,
        "the reference server received {received} bytes"
    );
    if let Peer::Quinn(client) = &peer {
        client.close().await;
    }
    server.close();
    Ok(payload.nbytes() as f64 / elapsed.as_secs_f64() / 1e9)
}

/// Keeps `CONCURRENCY` 1 KiB echoes in flight for `duration`; returns calls/s.
async fn small_calls(peer: &Peer, payload: &Array, duration: Duration) -> anyhow::Result<f64> {
    let (peer, payload) = (peer.clone(), payload.clone());
    rate(duration, move || {
        let (peer, payload) = (peer.clone(), payload.clone());
        async move {
            let back = peer.echo(&payload).await?;
            ensure!(
                back.len() == payload.nbytes(),
                "a 1 KiB echo came back short"
            );
            Ok(())
        }
    })
    .await
}

/// Keeps `CONCURRENCY` calls of `method` on `args` in flight for `duration`;
/// returns calls/s.
async fn calls_per_second(
    client: &Client,
    method: &'static str,
    args: &Tree,
    duration: Duration,
) -> anyhow::Result<f64> {
    let (client, args) = (client.clone(), args.clone());
    rate(duration, move || {
        let call = client.call(method, args.clone());
        async move {
            call.await?;
            Ok(())
        }
    })
    .await
}

/// Runs `CONCURRENCY` loops of `one()` for `duration`; returns completions/s.
async fn rate<F, Fut>(duration: Duration, one: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let one = one.clone();
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    one().await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), anyhow::Error>(())
            })
        })
        .collect();
    let t = Instant::now();
    tokio::time::sleep(duration).await;
    let counted = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.context("a benchmark task panicked")??;
    }
    Ok(counted as f64 / elapsed.as_secs_f64())
}

/// The batching measurement's function, for one call (`x` of shape
/// `[MODEL_IN]`) or a batch (`[N, MODEL_IN]`): `W x` per row, with `W[o][i] =
/// ((o + i) % 5 - 2) / 4`, after [`INVOCATION_COST`] of fixed work.
fn model(x: &Tree) -> Result<Tree, HandlerError> {
    let x = x.as_array()?;
    let rows = match x.shape() {
        [n] if *n == MODEL_IN => None,
        [rows, n] if *n == MODEL_IN => Some(*rows),
        shape => {
            return Err(HandlerError::new(format!(
                "expected a float32 array of shape [{MODEL_IN}] (or [N, {MODEL_IN}] batched), \
                 got {shape:?}"
            )))
        }
    };
    let started = Instant::now();
    while started.elapsed() < INVOCATION_COST {
        std::hint::spin_loop();
    }
    let input = x.as_slice::<f32>()?;
    let mut out = Vec::with_capacity(rows.unwrap_or(1) * MODEL_OUT);
    for row in input.chunks_exact(MODEL_IN) {
        for o in 0..MODEL_OUT {
            let sum: f32 = row
                .iter()
                .enumerate()
                .map(|(i, v)| v * (((o + i) % 5) as f32 - 2.0) / 4.0)
                .sum();
            out.push(sum);
        }
    }
    let shape = match rows {
        None => vec![MODEL_OUT],
        Some(rows) => vec![rows, MODEL_OUT],
    };
    Ok(Tree::Array(Array::from_vec(shape, out)?))
}

fn report(what: &str, unit: &str, [teleport, quinn]: [f64; 2]) {
    let ratio = if quinn > 0.0 { teleport / quinn } else { 0.0 };
    let digits = if teleport >= 100.0 { 0 } else { 2 };
    println!(
        "{what}: teleport {teleport:.digits$} {unit}, bare quinn {quinn:.digits$} {unit}, \
         ratio {ratio:.2}x\n"
    );
}
