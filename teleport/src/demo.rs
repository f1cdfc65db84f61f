//! `teleport demo`: a server and a pinned client on loopback in one process,
//! showing what users rely on and checking each point.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use teleport::{tree, Array, CallError, Client, ClientError, DType, ErrorKind, Server, Tree};

use crate::builtins::bind_builtins;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The largest array, as in the design's performance targets.
const BIG: usize = 256 * MIB;

/// Tallies checks and prints each as it is made.
#[derive(Debug, Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            println!("  ok    {what}");
        } else {
            self.failed.push(what.to_owned());
            println!("  FAIL  {what}");
        }
    }
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let server = bind_builtins(Server::builder())
        .listen("127.0.0.1:0")
        .await
        .context("starting the server")?;
    println!(
        "server on {} (self-signed certificate)",
        server.local_addr()
    );
    println!("fingerprint {}", server.fingerprint());
    let client = Client::builder(server.local_addr())
        .pin(server.fingerprint())
        .max_in_flight(64)
        .connect()
        .await
        .context("connecting the pinned client")?;
    println!("client connected, trusting only that fingerprint\n");

    let mut checks = Checks::default();
    latency(&client, &mut checks).await?;
    echo_sizes(&client, &mut checks).await?;
    no_head_of_line_blocking(&client, &mut checks).await?;
    errors(&client, &mut checks).await;
    deadline(&client, &mut checks).await;

    client.close();
    server.shutdown(Duration::from_secs(2)).await;
    println!(
        "\n{} checks passed, {} failed, in {:.1} s",
        checks.passed,
        checks.failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !checks.failed.is_empty() {
        bail!("failed: {}", checks.failed.join("; "));
    }
    Ok(())
}

/// Sequential tiny calls: the round trip a user pays per call.
async fn latency(client: &Client, checks: &mut Checks) -> anyhow::Result<()> {
    println!("1. round trip of a tiny call (echo of {{\"step\": i}}, one at a time)");
    for i in 0..50 {
        client.call("echo", tree!({ "step": i })).await?;
    }
    let mut times = Vec::with_capacity(500);
    let mut correct = true;
    for i in 0..500i64 {
        let t = Instant::now();
        let reply = client.call("echo", tree!({ "step": i })).await?;
        times.push(t.elapsed());
        correct &= reply.get("step").and_then(Tree::as_int) == Ok(i);
    }
    times.sort();
    println!(
        "   500 calls: median {}, p99 {}",
        micros(percentile(&times, 0.5)),
        micros(percentile(&times, 0.99))
    );
    checks.check(correct, "every tiny call came back with its own value");
    Ok(())
}

/// Echo of arrays from 1 KiB to 256 MiB, every byte compared.
async fn echo_sizes(client: &Client, checks: &mut Checks) -> anyhow::Result<()> {
    println!("\n2. echo of float32 arrays, every byte checked (GB/s counts both directions)");
    let sizes = [KIB, 64 * KIB, MIB, 16 * MIB, BIG];
    let bar = ProgressBar::new(sizes.len() as u64).with_style(
        ProgressStyle::with_template("   {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut all_equal = true;
    for (seed, &size) in sizes.iter().enumerate() {
        bar.set_message(human(size));
        let array = pattern_array(size, seed as u32);
        // Enough repeats that small sizes are not all fixed cost.
        let repeats = (64 * MIB / size).clamp(2, 200);
        let t = Instant::now();
        for _ in 0..repeats {
            let reply = client.call("echo", Tree::Array(array.clone())).await?;
            let back = reply.as_array()?;
            all_equal &= back.dtype() == array.dtype()
                && back.shape() == array.shape()
                && back.data() == array.data();
        }
        let per_call = t.elapsed() / repeats as u32;
        bar.suspend(|| {
            println!(
                "   {:>8}: {:>9} per echo, {:>6.2} GB/s  ({repeats} echoes)",
                human(size),
                millis(per_call),
                2.0 * size as f64 / per_call.as_secs_f64() / 1e9
            )
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    checks.check(
        all_equal,
        "every echoed byte equals the byte sent, 1 KiB to 256 MiB",
    );
    Ok(())
}

/// Small calls keep completing while a 256 MiB echo is on the same connection.
async fn no_head_of_line_blocking(client: &Client, checks: &mut Checks) -> anyhow::Result<()> {
    println!("\n3. small calls while a 256 MiB echo is in flight on the same connection");
    let big = pattern_array(BIG, 99);
    let spinner = ProgressBar::new_spinner().with_message("256 MiB echo in flight");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let done = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let big_call = client.call("echo", Tree::Array(big.clone()));
    // Four callers, each making one small call at a time until the big echo
    // is back (or 20 s pass, so a stuck transfer still ends the demo).
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                let mut finished = Vec::new();
                while !done.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(20) {
                    let s = Instant::now();
                    if client.call("echo", tree!({"ping": 1})).await.is_err() {
                        break;
                    }
                    finished.push((s.elapsed(), t.elapsed()));
                }
                finished
            })
        })
        .collect();
    let big_reply = big_call.await;
    let big_time = t.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut small_times = Vec::new();
    for caller in callers {
        small_times.extend(caller.await.unwrap_or_default());
    }
    spinner.finish_and_clear();
    let big_ok = big_reply
        .as_ref()
        .ok()
        .and_then(|r| r.as_array().ok())
        .is_some_and(|a| a.data() == big.data());
    // Only the calls that finished before the big echo did.
    let mut during: Vec<Duration> = small_times
        .iter()
        .filter(|(_, finished_at)| *finished_at <= big_time)
        .map(|(latency, _)| *latency)
        .collect();
    during.sort();
    println!("   256 MiB echo took {}", millis(big_time));
    if during.is_empty() {
        println!("   no small call finished during it");
    } else {
        println!(
            "   {} small calls finished during it: median {}, p99 {}, max {}",
            during.len(),
            millis(percentile(&during, 0.5)),
            millis(percentile(&during, 0.99)),
            millis(during[during.len() - 1]),
        );
    }
    checks.check(big_ok, "the 256 MiB echo came back intact");
    // Head-of-line blocking would make small calls wait for the big transfer;
    // without it they finish many times over while it runs.
    let median_ok = !during.is_empty() && percentile(&during, 0.5) * 4 < big_time;
    checks.check(
        during.len() >= 10 && median_ok,
        "at least 10 small calls finished during the big echo, median latency under 1/4 of its time",
    );
    Ok(())
}

/// A handler error and an unknown method fail their own calls only.
async fn errors(client: &Client, checks: &mut Checks) {
    println!("\n4. errors are per call; the connection carries on");
    let ints = Array::from_vec1(vec![1i32, 2, 3]);
    let handler = client.call("sum", tree!({"x": (ints)})).await;
    show("sum of an int32 array", &handler);
    checks.check(
        remote_kind(&handler) == Some(ErrorKind::Handler),
        "a handler's error reaches the caller as a Handler error",
    );
    let unknown = client.call("no_such_method", Tree::None).await;
    show("an unknown method", &unknown);
    checks.check(
        remote_kind(&unknown) == Some(ErrorKind::UnknownMethod),
        "an unknown method is an UnknownMethod error",
    );
    let ones = Array::from_vec1(vec![1.0f32; 1000]);
    let after = client.call("sum", tree!({"x": (ones)})).await;
    show("sum of 1000 ones, after the errors", &after);
    checks.check(
        after
            .as_ref()
            .ok()
            .and_then(|r| r.get("sum").ok()?.as_float().ok())
            == Some(1000.0),
        "the next call on the same connection succeeds",
    );
}

/// A call whose deadline passes fails on time and the server drops it.
async fn deadline(client: &Client, checks: &mut Checks) {
    println!("\n5. a call cancelled by its deadline");
    let t = Instant::now();
    let slow = client
        .call_with_timeout("sleep", tree!({"seconds": 10}), Duration::from_millis(200))
        .await;
    let waited = t.elapsed();
    show("sleep(10 s) with a 200 ms deadline", &slow);
    println!("   failed after {}", millis(waited));
    checks.check(
        matches!(
            slow,
            Err(ClientError::Call(CallError::DeadlineExceeded { .. }))
        ) && waited < Duration::from_secs(5),
        "the call fails with DeadlineExceeded at its deadline, not after the sleep",
    );
    let next = client.call("echo", tree!("still here")).await;
    checks.check(
        next.as_ref().ok().and_then(|r| r.as_str().ok()) == Some("still here"),
        "the connection carries on after the deadline",
    );
}

fn remote_kind(result: &Result<Tree, ClientError>) -> Option<ErrorKind> {
    result.as_ref().err()?.remote().map(|r| r.kind)
}

fn show(what: &str, result: &Result<Tree, ClientError>) {
    match result {
        Ok(tree) => println!("   {what}: {}", crate::json::tree_to_json(tree)),
        Err(e) => println!("   {what}: error: {e}"),
    }
}

/// A float32 array of `bytes` bytes whose every byte depends on its position
/// and `seed`, so a misplaced or dropped chunk shows in the comparison.
pub(crate) fn pattern_array(bytes: usize, seed: u32) -> Array {
    let mut data = vec![0u8; bytes];
    let mut state = 0x9E37_79B9u32 ^ seed.wrapping_mul(0x85EB_CA6B) | 1;
    for word in data.chunks_exact_mut(4) {
        // xorshift32: cheap, and no two nearby words are alike.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        word.copy_from_slice(&state.to_le_bytes());
    }
    Array::new(DType::F32, [bytes / 4], Bytes::from(data))
        .unwrap_or_else(|_| Array::from_vec1(Vec::<f32>::new()))
}

/// The value at fraction `p` of sorted `times` (nearest rank).
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn millis(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}

pub(crate) fn human(bytes: usize) -> String {
    if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    }
}
