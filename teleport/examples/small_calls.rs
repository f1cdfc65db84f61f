//! A fixed number of small calls (1 KiB echoes) with a fixed number in
//! flight, server and client in this one process on one tokio runtime (one
//! worker thread; `THREADS=N` for more), over Teleport or over bare quinn
//! with the same TLS and transport settings.
//!
//! It is the workload of `teleport bench`'s small calls made repeatable, for
//! counting instructions per call with callgrind, which counts the same for
//! the same binary and input whatever else the shared machine is doing
//! (`docs/performance.md`, "Cheaper bookkeeping per call"):
//!
//! ```sh
//! cargo build --release -p teleport --example small_calls
//! for n in 5000 25000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!     target/release/examples/small_calls teleport $n 64
//! done
//! ```
//!
//! The instructions of 20,000 calls are the difference of the two totals
//! (`callgrind_annotate`'s first line), which leaves out the handshake and
//! the certificate. Without valgrind it prints calls per second. How many
//! calls share a packet depends on the order the runtime polls things in,
//! which differs between this one process and the bench's two (and between
//! a current-thread and a one-worker runtime): compare builds with this,
//! stacks with `teleport bench`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use teleport::quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport::{Array, Client, ClientTls, Identity, Server, ServerTls, TransportConfig, Tree};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: small_calls teleport|quinn CALLS IN_FLIGHT";
    let (Some(stack), Some(calls), Some(in_flight)) = (args.get(1), args.get(2), args.get(3))
    else {
        bail!(usage);
    };
    let calls: usize = calls.parse().context(usage)?;
    let in_flight: usize = in_flight.parse().context(usage)?;
    if in_flight == 0 {
        bail!("IN_FLIGHT must be at least 1");
    }
    let threads = std::env::var("THREADS").map_or(Ok(1), |t| t.parse::<usize>());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.context("THREADS is a number of threads")?.max(1))
        .enable_all()
        .build()?
        .block_on(run(stack, calls, in_flight))
}

async fn run(stack: &str, calls: usize, in_flight: usize) -> anyhow::Result<()> {
    let identity = Identity::self_signed(["localhost"])?;
    let fingerprint = identity.fingerprint();
    let transport = TransportConfig::default();
    let payload = Array::from_vec([256], vec![1.0f32; 256])?;
    let elapsed = match stack {
        "teleport" => {
            let server = Server::builder()
                .bind("echo", |args: Tree| async move { Ok(args) })
                .identity(identity)
                .transport(transport.clone())
                .listen("127.0.0.1:0")
                .await?;
            let client = Client::builder(server.local_addr())
                .pin(fingerprint)
                .transport(transport)
                .max_in_flight(in_flight)
                .connect()
                .await?;
            let elapsed = echo_loops(calls, in_flight, || {
                let (client, payload) = (client.clone(), payload.clone());
                async move {
                    let reply = client.call("echo", Tree::Array(payload)).await?;
                    Ok(reply.into_array()?.nbytes())
                }
            })
            .await?;
            client.close();
            server.shutdown(Duration::from_millis(100)).await;
            elapsed
        }
        "quinn" => {
            let server = ReferenceServer::start(
                "127.0.0.1:0".parse()?,
                &ServerTls::new(identity),
                &transport,
            )?;
            let client = Arc::new(
                ReferenceClient::connect(
                    server.local_addr()?,
                    "localhost",
                    &ClientTls::pinned(fingerprint),
                    &transport,
                )
                .await?,
            );
            let bytes: Bytes = payload.data().clone();
            let elapsed = echo_loops(calls, in_flight, || {
                let (client, bytes) = (client.clone(), bytes.clone());
                async move { Ok(client.request(ReferenceMode::Echo, bytes).await?.len()) }
            })
            .await?;
            client.close().await;
            server.close();
            elapsed
        }
        other => bail!("{other:?}: the stack is teleport or quinn"),
    };
    println!(
        "{stack}: {calls} calls, {in_flight} in flight, {:.0} calls/s",
        calls as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Makes `calls` echoes with `in_flight` loops, each its share of them, and
/// returns how long they took. `echo` makes one and returns the bytes that
/// came back.
async fn echo_loops<F, Fut>(calls: usize, in_flight: usize, echo: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    let share = |worker: usize| calls / in_flight + usize::from(worker < calls % in_flight);
    let started = Instant::now();
    let loops = (0..in_flight).map(|worker| {
        let echo = &echo;
        async move {
            for _ in 0..share(worker) {
                anyhow::ensure!(echo().await? == 1024, "a short echo");
            }
            Ok(())
        }
    });
    for done in futures_util::future::join_all(loops).await {
        done?;
    }
    Ok(started.elapsed())
}
