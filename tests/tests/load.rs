//! Load: many clients at once, each with a few calls in flight mixing small
//! and large arrays, for a few rounds; every result checked, no error allowed,
//! the server's memory flat across rounds; and the same clients all connecting
//! through a lossy link.
//!
//! The short version runs in the test suite. The long one (500 clients, 16 MiB
//! calls) is one command away:
//!
//! ```sh
//! TELEPORT_LOAD_CLIENTS=500 TELEPORT_LOAD_BIG=16777216 \
//!     cargo test --release -p teleport-integration-tests --test load -- --nocapture
//! ```

mod common;

use std::time::{Duration, Instant};

use common::{within, Fixture};
use teleport_client::Client;
use teleport_netsim::{LinkConfig, Relay};
use teleport_protocol::{tree, Array, Tree};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's resident memory, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A large array whose bytes say which client and round sent it.
fn big_array(bytes: usize, client: usize, round: usize) -> Array {
    let data: Vec<u8> = (0..bytes)
        .map(|i| (i as u64 * 31 + client as u64 * 7 + round as u64) as u8)
        .collect();
    Array::new(teleport_protocol::DType::U8, [bytes], data).unwrap()
}

/// One client's round: connect, three small calls and one large one in
/// flight at once, every result compared with what was sent. Returns how
/// long connecting took.
async fn one_client(
    builder: teleport_client::ClientBuilder,
    client_no: usize,
    round: usize,
    big: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let client: Client = builder.connect().await.map_err(|e| e.to_string())?;
    let connected = started.elapsed();
    let array = big_array(big, client_no, round);
    let large = client.call("echo", tree!({"a": (array.clone())}));
    let small: Vec<_> = (0..3)
        .map(|i| (i, client.call("echo", tree!({"client": client_no, "i": i}))))
        .collect();
    for (i, call) in small {
        let reply = call.await.map_err(|e| e.to_string())?;
        if reply != tree!({"client": client_no, "i": i}) {
            return Err(format!(
                "client {client_no}: small call {i} came back as {reply}"
            ));
        }
    }
    let reply: Tree = large.await.map_err(|e| e.to_string())?;
    let back = reply
        .get("a")
        .map_err(|e| e.to_string())?
        .as_array()
        .map_err(|e| e.to_string())?;
    if back.data() != array.data() {
        return Err(format!(
            "client {client_no}: the large array came back changed"
        ));
    }
    client.close();
    Ok(connected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_mixed_calls_no_errors_and_memory_flat_across_rounds() {
    let clients = setting("TELEPORT_LOAD_CLIENTS", 60);
    let big = setting("TELEPORT_LOAD_BIG", 1 << 20);
    let rounds = setting("TELEPORT_LOAD_ROUNDS", 8).max(4);
    let fixture = Fixture::start_with(|b| b.max_in_flight_total(usize::MAX)).await;
    let tasks_at_start = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut after_round = Vec::new();
    for round in 0..rounds {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                // Liveness is not what this test measures: 60 handshakes at
                // once in a debug build can starve the server's answers to an
                // established client for longer than the default 5 s on a
                // slow 2-core VM (seen in CI: connects at p50 3.5 s). Still
                // under the round's own bound (`within`, 20 s).
                let builder = fixture
                    .client_builder()
                    .max_age(Some(Duration::from_secs(15)));
                tokio::spawn(one_client(builder, c, round, big))
            })
            .collect();
        let mut connects = Vec::new();
        for task in tasks {
            match within("a client's round", task).await.unwrap() {
                Ok(connect) => connects.push(connect),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        connects.sort();
        common::wait_until("the clients' connections close", || {
            fixture.server.connections() == 0
        })
        .await;
        // Every client's tasks end once its endpoint has drained (QUIC keeps a
        // closed connection for a few round trips).
        common::wait_until("the clients' tasks end", || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                <= tasks_at_start
        })
        .await;
        after_round.push(resident());
        eprintln!(
            "round {round}: {clients} clients x (3 small + 1 of {big} bytes) ok; connect p50 {:?} \
             p99 {:?} max {:?}; resident {} MiB",
            percentile(&connects, 0.5),
            percentile(&connects, 0.99),
            connects.last().copied().unwrap_or_default(),
            after_round[round] >> 20
        );
    }
    let stats = fixture.server.stats();
    assert_eq!(stats.failed_total(), 0, "{stats}");
    assert_eq!(
        stats.calls_succeeded,
        (clients * 4 * rounds) as u64,
        "{stats}"
    );
    // Flat: after the first rounds, the allocator holds its working set
    // (glibc raises its mmap threshold once 1 MiB blocks are freed, so later
    // ones come from, and stay in, its heap), and how much of it is resident
    // swings with the order frees happen in: measured 43, 129, 266, 376,
    // 374, 372, 372, 373 MiB over 8 rounds, and 43, 140, 58, 139, 144, 200
    // over 6, and in a slow CI phase 58, 104, 101, 104, 105, 105, 199, 145.
    // A leak keeps growing instead. So the median of the second half of the
    // rounds may not exceed the most any round of the first half held, plus
    // slack (a quarter of that, at least 64 MiB): keeping each round's large
    // arrays (60 MiB a round) fails it, the allocator's swings do not.
    // Smaller leaks are for a heap profiler, not for resident memory.
    let half = rounds / 2;
    let mut later: Vec<u64> = after_round[half..].to_vec();
    later.sort_unstable();
    let later_median = later[later.len() / 2];
    let earlier = after_round[..half].iter().copied().max().unwrap_or(0);
    let slack = (64 << 20).max(earlier / 4);
    assert!(
        later_median <= earlier + slack,
        "resident memory still grows: {:?} MiB after each round",
        after_round.iter().map(|r| r >> 20).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_connects_and_is_served_through_a_lossy_link() {
    let clients = setting("TELEPORT_LOAD_LOSSY_CLIENTS", 20);
    let fixture = Fixture::start().await;
    let lossy = LinkConfig::default()
        .with_loss(0.01)
        .with_delay(Duration::from_millis(5));
    let relay = Relay::start(fixture.server.local_addr(), lossy.clone(), lossy, 7).unwrap();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let builder = Client::builder(relay.addr()).pin(fixture.server.fingerprint());
            tokio::spawn(one_client(builder, c, 0, 64 << 10))
        })
        .collect();
    let mut connects = Vec::new();
    for task in tasks {
        connects.push(
            within("a client through the lossy link", task)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    connects.sort();
    let stats = relay.stats();
    eprintln!(
        "{clients} clients through 1% loss each way: all connected and served; connect p50 {:?} \
         p99 {:?}; datagrams lost up {} down {}",
        percentile(&connects, 0.5),
        percentile(&connects, 0.99),
        stats.up.dropped_loss,
        stats.down.dropped_loss
    );
    assert_eq!(connects.len(), clients);
}
