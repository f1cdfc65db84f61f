//! The cases the bench runs, in order, each with its references beside it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use indicatif::ProgressBar;
use teleport::quic::reference::ReferenceClient;
use teleport::{Array, Client, DType, Fingerprint};

use super::measure::{drive, drive_op, memcpy_gbps, Link, Op, Sample};
use super::model::{self, BATCH_IN_FLIGHT};
use super::process::{self, peak_rss, reset_peak, rss};
use super::report::{ratio, size, Reference, Row};
use crate::demo::pattern_array;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// A case keeps at most this much payload in flight at once (each side may
/// hold it twice): 1 GiB with 8 in flight would need 8-16 GiB per process.
const MAX_IN_FLIGHT_BYTES: usize = 2 * GIB;

/// Which cases, and for how long each.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) sizes: Vec<usize>,
    pub(crate) inflights: Vec<usize>,
    /// Each large-array measurement runs at least this long.
    pub(crate) at_least: Duration,
    pub(crate) small_inflights: Vec<usize>,
    pub(crate) small_for: Duration,
    pub(crate) client_counts: Vec<usize>,
    /// Sequential calls timed for each client count.
    pub(crate) latency_calls: usize,
    pub(crate) batch_for: Duration,
    /// Whether the batched-against-unbatched case runs (if the server binds it).
    pub(crate) batched: bool,
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sizes: vec![KIB, 64 * KIB, MIB, 16 * MIB],
                inflights: vec![1, 8],
                at_least: Duration::from_millis(150),
                small_inflights: vec![1, 16, 64, 256],
                small_for: Duration::from_millis(300),
                client_counts: vec![1, 100],
                latency_calls: 1_000,
                batch_for: Duration::from_millis(300),
                batched: true,
            }
        } else {
            Plan {
                sizes: vec![KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, GIB],
                inflights: vec![1, 8],
                at_least: Duration::from_secs(1),
                small_inflights: vec![1, 16, 64, 256],
                small_for: Duration::from_secs(2),
                client_counts: vec![1, 100, 500],
                latency_calls: 5_000,
                batch_for: Duration::from_secs(2),
                batched: true,
            }
        }
    }

    /// The plan without the groups of cases `options` leaves out.
    pub(crate) fn only(mut self, options: &super::Options) -> Plan {
        if !options.runs("large") {
            self.sizes.clear();
        }
        if !options.runs("small") {
            self.small_inflights.clear();
        }
        if !options.runs("clients") {
            self.client_counts.clear();
        }
        self.batched = options.runs("batched");
        self
    }

    fn large_cases(&self) -> impl Iterator<Item = (usize, Op, usize)> + '_ {
        self.sizes.iter().flat_map(move |&size| {
            [Op::Echo, Op::Upload, Op::Download]
                .into_iter()
                .flat_map(move |op| {
                    self.inflights
                        .iter()
                        .filter(move |&&k| size * k <= MAX_IN_FLIGHT_BYTES)
                        .map(move |&k| (size, op, k))
                })
        })
    }

    /// How many rows the plan makes (for the progress bar).
    pub(crate) fn steps(&self, batching: bool) -> u64 {
        (self.large_cases().count()
            + self.small_inflights.len()
            + self.client_counts.len()
            + usize::from(batching && self.batched)) as u64
    }
}

/// Everything the cases call over.
#[derive(Debug)]
pub(crate) struct Stacks {
    pub(crate) teleport: Client,
    pub(crate) teleport_addr: String,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) quinn: Option<Arc<ReferenceClient>>,
    /// One TLS-over-TCP connection per call in flight.
    pub(crate) tls: Vec<Link>,
    /// One plain TCP connection per call in flight.
    pub(crate) tcp: Vec<Link>,
    /// The server process, when it is ours (its memory can be read).
    pub(crate) server_pid: Option<u32>,
    /// The references' server process (its CPU time can be read).
    pub(crate) references_pid: Option<u32>,
    /// Whether the server binds the batching model.
    pub(crate) batching: bool,
}

pub(crate) async fn run(
    plan: &Plan,
    stacks: &Stacks,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    large(plan, stacks, bar, &mut rows).await?;
    small(plan, stacks, bar, &mut rows).await?;
    clients(plan, stacks, bar, &mut rows).await?;
    if stacks.batching && plan.batched {
        rows.push(batching(plan, stacks, bar).await?);
    }
    Ok(rows)
}

async fn large(
    plan: &Plan,
    stacks: &Stacks,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut payload: Option<Array> = None;
    let mut memcpy = 0.0;
    for (bytes, op, k) in plan.large_cases() {
        bar.set_message(format!("{} {} x{k}", op.name(), size(bytes as u64)));
        if payload.as_ref().is_none_or(|p| p.nbytes() != bytes) {
            drop(payload.take()); // the old one freed before the new one is made
            let array = pattern_array(bytes, 1);
            memcpy = memcpy_gbps(
                array.data().clone(),
                plan.at_least.min(Duration::from_millis(500)),
            )
            .await?;
            payload = Some(array);
        }
        let payload = payload.as_ref().expect("just made");
        let moved = op.bytes_moved(bytes);

        let links = vec![Link::Teleport(stacks.teleport.clone()); k];
        // One untimed call first, on every stack: the figures are of calls
        // that follow others (the first large one into a fresh process also
        // pays for the memory it is the first to touch; see "Reused receive
        // memory" in docs/performance.md).
        links[0].call(op, payload).await?;
        let me = std::process::id();
        if let Some(pid) = stacks.server_pid {
            reset_peak(pid)?;
        }
        reset_peak(me)?;
        let server_rss_before = stacks.server_pid.and_then(rss);
        let client_rss_before = rss(me);
        let sample = drive_op(&links, k, op, payload, plan.at_least).await?;
        let server_peak_rss = stacks.server_pid.and_then(peak_rss);
        let client_peak_rss = peak_rss(me);
        release_source(op, &links[0]).await?;
        let gbps = Some(sample.gbps(moved));

        let mut references = Vec::new();
        let quinn: Vec<Link> = stacks
            .quinn
            .iter()
            .map(|q| Link::Quinn(q.clone()))
            .cycle()
            .take(k)
            .collect();
        for (name, links) in [
            ("quinn", &quinn[..]),
            ("tls-tcp", &stacks.tls),
            ("tcp", &stacks.tcp),
        ] {
            if links.len() < k {
                continue;
            }
            links[0].call(op, payload).await?;
            let sample = drive_op(links, k, op, payload, plan.at_least).await?;
            release_source(op, &links[0]).await?;
            let reference = Some(sample.gbps(moved));
            references.push(Reference {
                name,
                gbps: reference,
                ratio: ratio(gbps, reference),
                ..Reference::default()
            });
        }
        references.push(Reference {
            name: "memcpy",
            gbps: Some(memcpy),
            ratio: ratio(gbps, Some(memcpy)),
            ..Reference::default()
        });
        rows.push(Row {
            case: op.name(),
            payload_bytes: bytes as u64,
            inflight: k,
            clients: 1,
            gbps,
            calls_per_s: Some(sample.calls_per_s()),
            p50_us: Some(sample.clone().percentile_us(0.5)),
            p99_us: Some(sample.clone().percentile_us(0.99)),
            max_us: Some(sample.clone().percentile_us(1.0)),
            references,
            server_peak_rss,
            client_peak_rss,
            server_rss_before,
            client_rss_before,
            ..Row::default()
        });
        bar.inc(1);
    }
    Ok(())
}

/// After a download case, a download of nothing: the server's source lets
/// the payload it kept go, so the next cases' memory does not include it.
async fn release_source(op: Op, link: &Link) -> anyhow::Result<()> {
    if op == Op::Download {
        link.call(op, &Array::zeros(DType::U8, [0])?).await?;
    }
    Ok(())
}

async fn small(
    plan: &Plan,
    stacks: &Stacks,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let payload = pattern_array(KIB, 2);
    for &k in &plan.small_inflights {
        bar.set_message(format!("small calls, {k} in flight"));
        let links = vec![Link::Teleport(stacks.teleport.clone()); k];
        drive_op(&links, k, Op::Echo, &payload, Duration::from_millis(100)).await?;
        let cpu = CpuMeter::start(stacks.server_pid);
        let mut sample = drive_op(&links, k, Op::Echo, &payload, plan.small_for).await?;
        let (client_cpu, server_cpu) = cpu.per_call(sample.calls());
        let datagrams = cpu.datagrams_per_call(sample.calls());
        let mut row = Row {
            case: "small",
            payload_bytes: KIB as u64,
            inflight: k,
            clients: 1,
            calls_per_s: Some(sample.calls_per_s()),
            p50_us: Some(sample.percentile_us(0.5)),
            p99_us: Some(sample.percentile_us(0.99)),
            max_us: Some(sample.percentile_us(1.0)),
            client_cpu_us_per_call: client_cpu,
            server_cpu_us_per_call: server_cpu,
            datagrams_per_call: datagrams,
            ..Row::default()
        };
        if let Some(quinn) = &stacks.quinn {
            let links = vec![Link::Quinn(quinn.clone()); k];
            drive_op(&links, k, Op::Echo, &payload, Duration::from_millis(100)).await?;
            let cpu = CpuMeter::start(stacks.references_pid);
            let mut sample = drive_op(&links, k, Op::Echo, &payload, plan.small_for).await?;
            let (client_cpu, server_cpu) = cpu.per_call(sample.calls());
            let datagrams = cpu.datagrams_per_call(sample.calls());
            row.references.push(Reference {
                name: "quinn",
                calls_per_s: Some(sample.calls_per_s()),
                p50_us: Some(sample.percentile_us(0.5)),
                p99_us: Some(sample.percentile_us(0.99)),
                ratio: ratio(row.calls_per_s, Some(sample.calls_per_s())),
                client_cpu_us_per_call: client_cpu,
                server_cpu_us_per_call: server_cpu,
                datagrams_per_call: datagrams,
                ..Reference::default()
            });
        }
        rows.push(row);
        bar.inc(1);
    }
    Ok(())
}

/// The CPU time this process (the client) and a server process use over a
/// measurement, for the CPU cost of one call on each side.
struct CpuMeter {
    server_pid: Option<u32>,
    client: Option<Duration>,
    server: Option<Duration>,
    datagrams: Option<u64>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            server_pid,
            client: process::cpu_time(std::process::id()),
            server: server_pid.and_then(process::cpu_time),
            datagrams: process::udp_datagrams_received(),
        }
    }

    /// UDP datagrams received on this host per call, since `start`.
    fn datagrams_per_call(&self, calls: usize) -> Option<f64> {
        let before = self.datagrams?;
        let after = process::udp_datagrams_received()?;
        (calls > 0).then(|| after.saturating_sub(before) as f64 / calls as f64)
    }

    /// µs of CPU per call, client and server, since `start`.
    fn per_call(&self, calls: usize) -> (Option<f64>, Option<f64>) {
        let per_call = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
            (Some(before), Some(after)) if calls > 0 => {
                Some(after.saturating_sub(before).as_secs_f64() * 1e6 / calls as f64)
            }
            _ => None,
        };
        (
            per_call(self.client, process::cpu_time(std::process::id())),
            per_call(self.server, self.server_pid.and_then(process::cpu_time)),
        )
    }
}

/// Small-call latency with more and more clients connected: one call in
/// flight at a time, each on the next client in turn.
async fn clients(
    plan: &Plan,
    stacks: &Stacks,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let payload = pattern_array(KIB, 3);
    let mut all = vec![Link::Teleport(stacks.teleport.clone())];
    let mut one_client_p99 = None;
    for &n in &plan.client_counts {
        bar.set_message(format!("{n} clients connected"));
        while all.len() < n {
            let client = Client::builder(stacks.teleport_addr.as_str())
                .pin(stacks.fingerprint)
                .connect()
                .await?;
            all.push(Link::Teleport(client));
        }
        for link in &all[..n] {
            link.call(Op::Echo, &payload).await?;
        }
        let mut sample = Sample::default();
        let calls = plan.latency_calls;
        let started = std::time::Instant::now();
        for i in 0..calls {
            let t = std::time::Instant::now();
            all[i % n].call(Op::Echo, &payload).await?;
            sample.latencies.push(t.elapsed());
        }
        sample.elapsed = started.elapsed();
        let p99 = sample.percentile_us(0.99);
        let first = *one_client_p99.get_or_insert(p99);
        rows.push(Row {
            case: "clients",
            payload_bytes: KIB as u64,
            inflight: 1,
            clients: n,
            calls_per_s: Some(sample.calls_per_s()),
            p50_us: Some(sample.percentile_us(0.5)),
            p99_us: Some(p99),
            max_us: Some(sample.percentile_us(1.0)),
            references: vec![Reference {
                name: "1 client",
                p99_us: Some(first),
                ratio: ratio(Some(p99), Some(first)),
                ..Reference::default()
            }],
            ..Row::default()
        });
        bar.inc(1);
    }
    for link in &all[1..] {
        if let Link::Teleport(client) = link {
            client.close();
        }
    }
    Ok(())
}

/// The same function bound unbatched (`model`) and batched (`model_batched`).
async fn batching(plan: &Plan, stacks: &Stacks, bar: &ProgressBar) -> anyhow::Result<Row> {
    bar.set_message("batched against unbatched");
    let x = model::input();
    let client = &stacks.teleport;
    let unbatched = client.call("model", x.clone()).await?;
    let batched = client.call("model_batched", x.clone()).await?;
    ensure!(
        unbatched == batched,
        "the batched model's result differs from the unbatched one's"
    );
    let mut rates = [0.0; 2];
    for (i, method) in ["model", "model_batched"].into_iter().enumerate() {
        let run = |at_least| {
            let (client, x) = (client.clone(), x.clone());
            drive(BATCH_IN_FLIGHT, at_least, move |_| {
                let call = client.call(method, x.clone());
                async move {
                    call.await?;
                    Ok(())
                }
            })
        };
        run(Duration::from_millis(100)).await?;
        rates[i] = run(plan.batch_for).await?.calls_per_s();
    }
    bar.inc(1);
    Ok(Row {
        case: "batched",
        payload_bytes: (model::MODEL_IN * 4) as u64,
        inflight: BATCH_IN_FLIGHT,
        clients: 1,
        calls_per_s: Some(rates[1]),
        references: vec![Reference {
            name: "unbatched",
            calls_per_s: Some(rates[0]),
            ratio: ratio(Some(rates[1]), Some(rates[0])),
            ..Reference::default()
        }],
        ..Row::default()
    })
}
