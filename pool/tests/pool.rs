//! The pool against servers in this process: maps in and out of order over
//! finite and endless inputs, backpressure, lost and joining servers,
//! run_on_all, cancellation, chunking, errors and timeouts.
//!
//! Worker processes (started locally, over a fake ssh, dialling in) are
//! tested in `teleport/tests/pool_workers.rs`, next to the `teleport` binary.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use teleport_client::Fingerprint;
use teleport_pool::{Pool, PoolError};
use teleport_protocol::{tree, Array, Tree};
use teleport_server::{Context, HandlerError, Server};
use tokio::sync::watch;
use tokio::time::timeout;

use common::{until, LIMIT};

/// What one test server saw.
#[derive(Debug, Default)]
struct Probe {
    calls: AtomicUsize,
    running: AtomicUsize,
    cancelled: AtomicUsize,
}

/// A server with the test functions; `tag` names it in replies.
struct TestServer {
    server: Server,
    probe: Arc<Probe>,
}

impl TestServer {
    fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }
    fn fingerprint(&self) -> Fingerprint {
        self.server.fingerprint()
    }
}

/// Counts a running call; uncounts it (and counts a cancel) when dropped
/// unfinished.
struct Running {
    probe: Arc<Probe>,
    finished: bool,
}

impl Running {
    fn start(probe: &Arc<Probe>) -> Running {
        probe.calls.fetch_add(1, Ordering::SeqCst);
        probe.running.fetch_add(1, Ordering::SeqCst);
        Running {
            probe: probe.clone(),
            finished: false,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.probe.running.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.probe.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn test_server(tag: &str, gate: watch::Receiver<bool>) -> TestServer {
    let probe = Arc::new(Probe::default());
    let tag = tag.to_owned();
    let (p1, p2, p3, p4) = (probe.clone(), probe.clone(), probe.clone(), probe.clone());
    let tag1 = tag.clone();
    let server = Server::builder()
        .bind("g", move |x: Tree| {
            let probe = p1.clone();
            async move {
                let mut running = Running::start(&probe);
                let y = x.as_int()? + 2;
                running.finished = true;
                Ok(tree!((y)))
            }
        })
        // Takes x % 5 ms, so replies come back out of order.
        .bind("slow", move |x: Tree| {
            let probe = p2.clone();
            async move {
                let mut running = Running::start(&probe);
                let x = x.as_int()?;
                tokio::time::sleep(Duration::from_millis((x % 5) as u64)).await;
                running.finished = true;
                Ok(tree!((x + 2)))
            }
        })
        // Waits for the gate to open.
        .bind("gated", move |x: Tree, _ctx: Context| {
            let probe = p3.clone();
            let mut gate = gate.clone();
            async move {
                let mut running = Running::start(&probe);
                let _ = gate.wait_for(|open| *open).await;
                running.finished = true;
                Ok(tree!((x.as_int()? + 2)))
            }
        })
        .bind("tag", move |x: Tree| {
            let tag = tag1.clone();
            async move { Ok(tree!({"tag": (tag), "y": (x.as_int().unwrap_or(0) + 2)})) }
        })
        // A chunk: an int64 array, each element plus 2.
        .bind("add2_batch", move |x: Tree| {
            let probe = p4.clone();
            async move {
                let mut running = Running::start(&probe);
                let a = x.as_array()?;
                let y: Vec<i64> = a.as_slice::<i64>()?.iter().map(|v| v + 2).collect();
                running.finished = true;
                Ok(Tree::Array(Array::from_vec(a.shape().to_vec(), y)?))
            }
        })
        .bind("fail", |_: Tree| async move {
            Err::<Tree, _>(HandlerError::with_type("ValueError", "x must be positive"))
        })
        .bind("nap", |_: Tree| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(tree!(null))
        })
        .listen("127.0.0.1:0")
        .await
        .expect("a test server");
    TestServer { server, probe }
}

/// `n` servers (tags s0, s1, ...) and a gate for `gated` (closed).
async fn servers(n: usize) -> (Vec<TestServer>, watch::Sender<bool>) {
    let (open, gate) = watch::channel(false);
    let mut out = Vec::new();
    for i in 0..n {
        out.push(test_server(&format!("s{i}"), gate.clone()).await);
    }
    (out, open)
}

fn builder_for(servers: &[TestServer]) -> teleport_pool::PoolBuilder {
    let mut builder = Pool::builder()
        .connect_timeout(Duration::from_secs(5))
        .server_wait(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    for s in servers {
        builder = builder.server(s.addr(), s.fingerprint());
    }
    builder
}

async fn pool_of(servers: &[TestServer], qsize: usize) -> Pool {
    let pool = timeout(LIMIT, builder_for(servers).qsize(qsize).start())
        .await
        .expect("started in time")
        .expect("a pool");
    timeout(LIMIT, pool.wait_for_servers(servers.len(), LIMIT))
        .await
        .unwrap()
        .unwrap();
    pool
}

/// An iterator over 0.. that counts how many inputs were read.
fn counted(read: &Arc<AtomicUsize>) -> impl Iterator<Item = i64> + Send + 'static {
    let read = read.clone();
    (0i64..).inspect(move |_| {
        read.fetch_add(1, Ordering::SeqCst);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_map_over_a_finite_input() {
    let (servers, _gate) = servers(3).await;
    let pool = pool_of(&servers, 4).await;
    let results: Vec<_> = timeout(LIMIT, pool.map("slow", 0i64..200).collect())
        .await
        .unwrap();
    let results: Vec<i64> = results
        .into_iter()
        .map(|r| r.unwrap().as_int().unwrap())
        .collect();
    assert_eq!(results, (2..202).collect::<Vec<i64>>());
    // Every server took a share.
    for s in &servers {
        assert!(s.probe.calls.load(Ordering::SeqCst) > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_map_over_a_finite_input() {
    let (servers, _gate) = servers(2).await;
    let pool = pool_of(&servers, 4).await;
    let results: Vec<_> = timeout(LIMIT, pool.map_unordered("slow", 0i64..200).collect())
        .await
        .unwrap();
    let got: BTreeSet<i64> = results
        .into_iter()
        .map(|r| r.unwrap().as_int().unwrap())
        .collect();
    assert_eq!(got, (2..202).collect::<BTreeSet<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_over_an_endless_input_and_a_stream() {
    let (servers, _gate) = servers(2).await;
    let pool = pool_of(&servers, 8).await;
    let read = Arc::new(AtomicUsize::new(0));
    let first: Vec<i64> = timeout(
        LIMIT,
        pool.map("g", counted(&read))
            .take(1000)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(first, (2..1002).collect::<Vec<i64>>());
    // Bounded read-ahead: in input order, at most twice the slots (2
    // servers x 8) of calls running or done and waiting for an earlier one.
    let ahead = read.load(Ordering::SeqCst) - 1000;
    assert!(ahead <= 32, "read {ahead} inputs ahead");

    // An async stream, unordered, endless.
    let inputs = futures_util::stream::iter(0i64..).then(|i| async move {
        tokio::task::yield_now().await;
        i
    });
    let got: BTreeSet<i64> = timeout(
        LIMIT,
        pool.map_stream_unordered("g", inputs)
            .take(500)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(got.len(), 500);
    assert!(
        got.iter().all(|y| (2..2 + 500 + 16).contains(y)),
        "unordered reads at most the slots ahead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_read_only_as_slots_free_up() {
    let (servers, gate) = servers(2).await;
    let pool = pool_of(&servers, 3).await;
    let read = Arc::new(AtomicUsize::new(0));
    let mut map = pool.map_unordered("gated", counted(&read));
    // Poll the map in the background; every call blocks at the gate.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(r) = map.next().await {
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    let running = || {
        servers
            .iter()
            .map(|s| s.probe.running.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    until("6 calls run", || running() == 6).await;
    // Give the map time to read ahead if it were going to.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(read.load(Ordering::SeqCst), 6, "2 servers x qsize 3");
    for s in &servers {
        assert_eq!(
            s.probe.running.load(Ordering::SeqCst),
            3,
            "least outstanding first"
        );
    }
    // Open the gate: results flow, and more inputs are read.
    gate.send(true).unwrap();
    for _ in 0..50 {
        let r = timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
        r.unwrap();
    }
    assert!(read.load(Ordering::SeqCst) >= 50);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_map_stops_reading_and_cancels_calls() {
    let (servers, _gate) = servers(2).await;
    let pool = pool_of(&servers, 4).await;
    let read = Arc::new(AtomicUsize::new(0));
    let mut map = pool.map("gated", counted(&read));
    let running = || {
        servers
            .iter()
            .map(|s| s.probe.running.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    // Poll until all 8 slots are busy (nothing completes: the gate is shut).
    let polled = timeout(Duration::from_millis(300), map.next()).await;
    assert!(polled.is_err(), "no result while the gate is shut");
    until("8 calls run", || running() == 8).await;
    drop(map);
    until("the servers drop every call", || running() == 0).await;
    let cancelled: usize = servers
        .iter()
        .map(|s| s.probe.cancelled.load(Ordering::SeqCst))
        .sum();
    assert_eq!(cancelled, 8);
    assert_eq!(read.load(Ordering::SeqCst), 8);
    // The pool is fine afterwards.
    let y = timeout(LIMIT, pool.submit("g", 40i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(y.as_int().unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_fails_its_calls_or_they_go_elsewhere_if_idempotent() {
    for idempotent in [true, false] {
        let (mut servers, gate) = servers(2).await;
        let pool = pool_of(&servers, 4).await;
        let lost_name = pool
            .servers()
            .into_iter()
            .find(|s| s.addr == servers[1].addr())
            .unwrap()
            .name;
        let map = pool.map("gated", 0i64..100).idempotent(idempotent);
        let collector = tokio::spawn(map.collect::<Vec<_>>());
        until("both servers have calls", || {
            servers
                .iter()
                .all(|s| s.probe.running.load(Ordering::SeqCst) == 4)
        })
        .await;
        // Kill server 1 with its 4 calls in flight, then let the rest run.
        drop(servers.remove(1));
        until("the pool takes the server out", || {
            pool.servers().iter().filter(|s| s.up).count() == 1
        })
        .await;
        gate.send(true).unwrap();
        let results = timeout(LIMIT, collector).await.unwrap().unwrap();
        assert_eq!(results.len(), 100);
        let failed: Vec<(usize, &PoolError)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
            .collect();
        if idempotent {
            assert!(failed.is_empty(), "{failed:?}");
        } else {
            assert_eq!(failed.len(), 4, "{failed:?}");
            for (_, e) in &failed {
                assert!(matches!(e, PoolError::ServerLost { .. }), "{e}");
                assert_eq!(e.server(), Some(lost_name.as_str()));
                assert!(e.to_string().contains("idempotent"), "{e}");
            }
        }
        for (i, r) in results.iter().enumerate() {
            if let Ok(y) = r {
                assert_eq!(y.as_int().unwrap(), i as i64 + 2);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_joining_mid_map_gets_work() {
    let (servers, gate) = servers(2).await;
    // Start with server 0 only.
    let pool = pool_of(&servers[..1], 2).await;
    let read = Arc::new(AtomicUsize::new(0));
    let map = pool.map_unordered("gated", counted(&read)).take(40);
    let collector = tokio::spawn(map.collect::<Vec<_>>());
    until("server 0 is full", || {
        servers[0].probe.running.load(Ordering::SeqCst) == 2
    })
    .await;
    pool.add_server(servers[1].addr(), servers[1].fingerprint());
    until("server 1 gets calls", || {
        servers[1].probe.running.load(Ordering::SeqCst) == 2
    })
    .await;
    gate.send(true).unwrap();
    let results = timeout(LIMIT, collector).await.unwrap().unwrap();
    assert_eq!(results.len(), 40);
    assert!(results.iter().all(Result::is_ok));
    assert!(servers[1].probe.calls.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_all_reaches_every_server_once() {
    let (servers, _gate) = servers(3).await;
    let pool = pool_of(&servers, 2).await;
    let results = timeout(LIMIT, pool.run_on_all("tag", 1i64)).await.unwrap();
    assert_eq!(results.len(), 3);
    let tags: BTreeSet<String> = results
        .iter()
        .map(|(_, r)| {
            r.as_ref()
                .unwrap()
                .get("tag")
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tags, ["s0", "s1", "s2"].map(String::from).into());
    let names: BTreeSet<&str> = results.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_stack_inputs_and_split_results() {
    let (servers, _gate) = servers(2).await;
    let pool = pool_of(&servers, 2).await;
    let results: Vec<_> = timeout(
        LIMIT,
        pool.map("add2_batch", 0i64..100).chunksize(8).collect(),
    )
    .await
    .unwrap();
    let ys: Vec<i64> = results
        .into_iter()
        .map(|r| r.unwrap().as_int().expect("scalars in, scalars out"))
        .collect();
    assert_eq!(ys, (2..102).collect::<Vec<i64>>());
    let calls: usize = servers
        .iter()
        .map(|s| s.probe.calls.load(Ordering::SeqCst))
        .sum();
    assert!(
        (13..=50).contains(&calls),
        "{calls} calls for 100 inputs in chunks of 8"
    );

    // Arrays stack along a new axis and come back as arrays.
    let inputs: Vec<Tree> = (0..10)
        .map(|i| Tree::Array(Array::from_vec([3], vec![i as i64; 3]).unwrap()))
        .collect();
    let results: Vec<_> = timeout(LIMIT, pool.map("add2_batch", inputs).chunksize(4).collect())
        .await
        .unwrap();
    for (i, r) in results.into_iter().enumerate() {
        let y = r.unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[i as i64 + 2; 3]);
    }

    // Rank-0 arrays are arrays, not scalars: they come back as rank-0 arrays.
    let inputs: Vec<Tree> = (0..10)
        .map(|i| Tree::Array(Array::from_vec([], vec![i as i64]).unwrap()))
        .collect();
    let results: Vec<_> = timeout(LIMIT, pool.map("add2_batch", inputs).chunksize(4).collect())
        .await
        .unwrap();
    for (i, r) in results.into_iter().enumerate() {
        let y = r.unwrap();
        let y = y.as_array().expect("arrays in, arrays out");
        assert!(y.shape().is_empty(), "{:?}", y.shape());
        assert_eq!(y.as_slice::<i64>().unwrap(), &[i as i64 + 2]);
    }

    // Inputs that do not stack fail with a typed error.
    let mixed: Vec<Tree> = vec![tree!(1i64), tree!("two")];
    let results: Vec<_> = timeout(LIMIT, pool.map("add2_batch", mixed).chunksize(2).collect())
        .await
        .unwrap();
    assert!(
        matches!(&results[0], Err(PoolError::Stack { .. })),
        "{results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_errors_and_timeouts_name_the_server() {
    let (servers, _gate) = servers(1).await;
    let pool = pool_of(&servers, 2).await;
    let name = pool.servers()[0].name.clone();
    let e = timeout(LIMIT, pool.submit("fail", 1i64))
        .await
        .unwrap()
        .unwrap_err();
    let remote = e.remote().expect("the function's error");
    assert_eq!(remote.type_name, "ValueError");
    assert_eq!(remote.message, "x must be positive");
    assert_eq!(e.server(), Some(name.as_str()));
    assert!(e.to_string().contains(&name), "{e}");

    let results: Vec<_> = timeout(
        LIMIT,
        pool.map("nap", 0i64..2)
            .timeout(Duration::from_millis(100))
            .collect(),
    )
    .await
    .unwrap();
    for r in results {
        match r {
            Err(PoolError::Timeout { server, .. }) => assert_eq!(server, name),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_server_left_calls_fail_after_the_wait() {
    let (mut servers, _gate) = servers(1).await;
    let pool = timeout(
        LIMIT,
        builder_for(&servers)
            .server_wait(Duration::from_millis(300))
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    drop(servers.remove(0));
    // The first call may be lost with the server; after that, none is up.
    let _ = timeout(LIMIT, pool.submit("g", 1i64)).await.unwrap();
    until("the server is out", || pool.servers().iter().all(|s| !s.up)).await;
    let e = timeout(LIMIT, pool.submit("g", 1i64))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, PoolError::NoServers { .. }), "{e}");
    assert!(e.to_string().contains("down"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_servers_is_a_source() {
    // Servers sharing one certificate, as replicas behind a name would.
    let identity = teleport_client::Identity::self_signed(["localhost"]).unwrap();
    let server = Server::builder()
        .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) })
        .identity(identity.clone())
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let pool = timeout(
        LIMIT,
        Pool::builder()
            .resolve(format!("127.0.0.1:{}", server.local_addr().port()))
            .resolve_every(Duration::from_millis(50))
            .pin(identity.fingerprint())
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    let y = timeout(LIMIT, pool.submit("g", 1i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(y.as_int().unwrap(), 3);
    // Re-resolving keeps the one server (no duplicates).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.servers().len(), 1);
}

#[test]
fn the_blocking_pool_maps_without_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (servers, _gate) = runtime.block_on(servers(2));
    let builder = builder_for(&servers).qsize(4);
    let pool = teleport_pool::BlockingPool::start(builder).unwrap();
    pool.wait_for_servers(2, LIMIT).unwrap();
    let ys: Vec<i64> = pool
        .map("g", 0i64..50)
        .map(|r| r.unwrap().as_int().unwrap())
        .collect();
    assert_eq!(ys, (2..52).collect::<Vec<i64>>());
    assert_eq!(pool.submit("g", 5i64).unwrap().as_int().unwrap(), 7);
    assert_eq!(pool.run_on_all("tag", 0i64).len(), 2);
    drop(pool);
    drop(servers);
}
