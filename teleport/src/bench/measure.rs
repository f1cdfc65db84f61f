//! Driving calls and timing them: one way to call each stack ([`Link`]), k
//! calls in flight for at least a given time ([`drive`]), and memcpy.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use teleport::quic::reference::{ReferenceClient, ReferenceMode};
use teleport::{tree, Array, Client, Tree};
use tokio::sync::Mutex;

use super::references::{self, Io};

/// What a large-array case does with its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Send the array, get it back.
    Echo,
    /// Send the array, get a byte count back.
    Upload,
    /// Send a byte count, get an array of that size back.
    Download,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Echo => "echo",
            Op::Upload => "upload",
            Op::Download => "download",
        }
    }

    /// Payload bytes moved by one call: an echo counts both directions.
    pub(crate) fn bytes_moved(self, payload: usize) -> u64 {
        match self {
            Op::Echo => 2 * payload as u64,
            Op::Upload | Op::Download => payload as u64,
        }
    }
}

/// One way to reach a server: a call goes over it.
#[derive(Clone)]
pub(crate) enum Link {
    Teleport(Client),
    Quinn(Arc<ReferenceClient>),
    /// One TCP (or TLS over TCP) connection: one request at a time.
    Stream(Arc<Mutex<Box<dyn Io>>>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Teleport(_) => "Link::Teleport",
            Link::Quinn(_) => "Link::Quinn",
            Link::Stream(_) => "Link::Stream",
        })
    }
}

impl Link {
    /// One call of `op` on `payload`; checks the size of what came back.
    pub(crate) async fn call(&self, op: Op, payload: &Array) -> anyhow::Result<()> {
        let n = payload.nbytes();
        let got = match (self, op) {
            (Link::Teleport(client), Op::Echo) => {
                let reply = client.call("echo", Tree::Array(payload.clone())).await?;
                reply.into_array()?.nbytes()
            }
            (Link::Teleport(client), Op::Upload) => {
                let reply = client.call("sink", tree!({"x": (payload.clone())})).await?;
                usize::try_from(reply.get("bytes")?.as_int()?)?
            }
            (Link::Teleport(client), Op::Download) => client
                .call("source", tree!({"bytes": (n as i64)}))
                .await?
                .into_array()?
                .nbytes(),
            (Link::Quinn(client), Op::Echo) => client
                .request(ReferenceMode::Echo, payload.data().clone())
                .await?
                .len(),
            (Link::Quinn(client), Op::Upload) => {
                let reply = client
                    .request(ReferenceMode::Sink, payload.data().clone())
                    .await?;
                count(&reply)?
            }
            (Link::Quinn(client), Op::Download) => {
                let request = Bytes::copy_from_slice(&(n as u64).to_le_bytes());
                client.request(ReferenceMode::Source, request).await?.len()
            }
            (Link::Stream(stream), op) => {
                let mut stream = stream.lock().await;
                match op {
                    Op::Echo => references::request(&mut stream, references::ECHO, payload.data())
                        .await?
                        .len(),
                    Op::Upload => count(
                        &references::request(&mut stream, references::SINK, payload.data()).await?,
                    )?,
                    Op::Download => references::request(
                        &mut stream,
                        references::SOURCE,
                        &(n as u64).to_le_bytes(),
                    )
                    .await?
                    .len(),
                }
            }
        };
        ensure!(
            got == n,
            "{} of {n} bytes: {got} bytes came back",
            op.name()
        );
        Ok(())
    }
}

fn count(reply: &[u8]) -> anyhow::Result<usize> {
    let bytes: [u8; 8] = reply.try_into().context("a byte count is 8 bytes")?;
    Ok(usize::try_from(u64::from_le_bytes(bytes))?)
}

/// What [`drive`] saw: every call's time and the wall time of the whole.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) elapsed: Duration,
}

impl Sample {
    pub(crate) fn calls(&self) -> usize {
        self.latencies.len()
    }

    pub(crate) fn calls_per_s(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// GB/s (10^9 bytes) when each call moves `bytes_per_call`.
    pub(crate) fn gbps(&self, bytes_per_call: u64) -> f64 {
        self.calls_per_s() * bytes_per_call as f64 / 1e9
    }

    /// The latency at fraction `p` (nearest rank), in µs.
    pub(crate) fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let rank =
            ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1e6
    }
}

/// Runs `workers` loops of `one(worker)`, each until `at_least` has passed
/// (and at least one call each); returns every call's time and the total.
pub(crate) async fn drive<F, Fut>(
    workers: usize,
    at_least: Duration,
    one: F,
) -> anyhow::Result<Sample>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let deadline = started + at_least;
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let t = Instant::now();
                    one(worker).await?;
                    let now = Instant::now();
                    latencies.push(now - t);
                    if now >= deadline {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                }
            })
        })
        .collect();
    let mut sample = Sample::default();
    for task in tasks {
        sample
            .latencies
            .extend(task.await.context("a benchmark task panicked")??);
    }
    sample.elapsed = started.elapsed();
    Ok(sample)
}

/// `workers` loops of `op` on `payload` over `links` (worker i uses link i).
pub(crate) async fn drive_op(
    links: &[Link],
    workers: usize,
    op: Op,
    payload: &Array,
    at_least: Duration,
) -> anyhow::Result<Sample> {
    ensure!(
        links.len() >= workers,
        "{workers} calls in flight need as many links"
    );
    let links: Arc<Vec<Link>> = Arc::new(links[..workers].to_vec());
    let payload = payload.clone();
    drive(workers, at_least, move |worker| {
        let (links, payload) = (links.clone(), payload.clone());
        async move { links[worker].call(op, &payload).await }
    })
    .await
}

/// Copies `data` into fresh memory, over and over for at least `at_least`;
/// returns GB/s: the cost of the one copy a receiver makes.
pub(crate) async fn memcpy_gbps(data: Bytes, at_least: Duration) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut copies = 0u64;
        loop {
            let mut copy = Vec::with_capacity(data.len());
            copy.extend_from_slice(&data);
            std::hint::black_box(&copy);
            copies += 1;
            if started.elapsed() >= at_least {
                break;
            }
        }
        copies as f64 * data.len() as f64 / started.elapsed().as_secs_f64() / 1e9
    })
    .await
    .context("the memcpy task panicked")
}
