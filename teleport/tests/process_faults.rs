//! Process faults, with every peer at its default settings: a server killed
//! with SIGKILL during calls (its client fails the pending calls as not alive
//! within max_age, and reconnects once the server is back on its port with the
//! same identity), and a client killed with SIGKILL while a large reply is on
//! its way to it (the server notices within its peer timeout, frees the
//! reply's memory and serves other clients throughout).
//!
//! The peers are `teleport` processes (`teleport serve`, `teleport call`).
//! Every wait is bounded; the figures printed are measurements, not checks.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use teleport_client::{CallError, Client, Error};
use teleport_netsim::{LinkConfig, Relay};
use teleport_protocol::tree;
use teleport_quic::Fingerprint;

/// The bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A port on loopback that nothing listens on now.
fn free_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

fn scratch_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("teleport-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process, killed with SIGKILL when dropped.
struct Process {
    child: Child,
    /// Every line it printed on stdout so far.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (what `Child::kill` sends on Unix), and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[&str]) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_teleport"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the teleport binary starts");
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn({
        let lines = lines.clone();
        move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                lines.lock().unwrap().push(line);
            }
        }
    });
    Process { child, lines }
}

/// `teleport serve` on `addr` with the identity kept in `dir`; returns the
/// process and the fingerprint it prints once it listens.
async fn serve(addr: SocketAddr, dir: &Path, extra: &[&str]) -> (Process, Fingerprint) {
    let listen = addr.to_string();
    let dir = dir.to_str().unwrap();
    let mut args = vec!["serve", "--listen", &listen, "--identity-dir", dir];
    args.extend_from_slice(extra);
    let server = spawn(&args);
    let mut fingerprint = None;
    wait_until("the server prints its fingerprint", || {
        fingerprint = server
            .lines()
            .iter()
            .find_map(|l| l.strip_prefix("fingerprint: ").map(str::to_owned));
        fingerprint.is_some()
    })
    .await;
    (server, fingerprint.unwrap().parse().unwrap())
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_pending_calls_within_max_age_and_the_client_reconnects() {
    let addr = free_port();
    let dir = scratch_dir("killed-server");
    let (mut server, fingerprint) = serve(addr, &dir, &[]).await;
    // Default ping interval (1 s), max_age (5 s) and reconnection; room for
    // 16 pending calls and one more.
    let client = within(
        "connecting",
        Client::builder(addr)
            .pin(fingerprint)
            .max_in_flight(32)
            .connect(),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..16).map(|_| client.call("sleep", tree!(60.0))).collect();
    // Admitted in order: once this answers, the 16 calls run on the server.
    within("a call behind them", client.call("info", tree!(null)))
        .await
        .unwrap();
    server.kill();
    let killed = Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(10), join_all(calls))
        .await
        .expect("every pending call fails within 10 s of the kill");
    let noticed = killed.elapsed();
    let mut not_alive = 0;
    for result in results {
        match result {
            Err(Error::Call(CallError::NotAlive { .. })) => not_alive += 1,
            Err(e) if e.is_connection_error() => {}
            other => panic!("expected the call to fail with the connection, got {other:?}"),
        }
    }
    eprintln!(
        "SIGKILLed server: 16 pending calls failed {noticed:?} after the kill \
         ({not_alive} as NotAlive)"
    );
    // Back on the same port with the same identity: the client's pin holds
    // and its next call reconnects.
    let (_server, again) = serve(addr, &dir, &[]).await;
    assert_eq!(again, fingerprint, "the identity was kept");
    let restarted = Instant::now();
    let info = within("a call after the restart", client.call("info", tree!(null)))
        .await
        .expect("the client reconnects to the restarted server");
    assert!(info.get("methods").is_ok(), "{info:?}");
    eprintln!(
        "the first call after the restart succeeded {:?} after the server was back",
        restarted.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's last `--stats` line.
fn last_stats(server: &Process) -> Option<String> {
    server
        .lines()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("calls:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_during_a_large_reply_is_dropped_and_the_memory_freed() {
    const MIB: u64 = 1 << 20;
    let addr = free_port();
    let dir = scratch_dir("killed-client");
    let (server, fingerprint) = serve(addr, &dir, &["--stats", "0.2"]).await;
    let baseline = rss(server.pid());
    // The reply comes back at 16 MB/s, so the client is killed mid-reply.
    let relay = Relay::start(
        addr,
        LinkConfig::default(),
        LinkConfig::default().with_rate(16_000_000, 1 << 20),
        7,
    )
    .unwrap();
    let connect = relay.addr().to_string();
    let pin = fingerprint.to_string();
    // An echo of 128 MiB of f64 ones (touched memory, unlike zeros).
    let args = r#"{"__array__": {"dtype": "f64", "shape": [16777216], "fill": 1.0}}"#;
    let mut client = spawn(&["call", "--connect", &connect, "--pin", &pin, "echo", args]);
    wait_until("the reply is on its way", || {
        relay.stats().down.forwarded_bytes > 8 * MIB
    })
    .await;
    let holding = rss(server.pid());
    client.kill();
    let killed = Instant::now();
    eprintln!(
        "server memory: {} MiB before, {} MiB holding the echo",
        baseline / MIB,
        holding / MIB
    );
    assert!(holding > baseline + 100 * MIB, "the server holds the echo");
    // Other clients are served throughout.
    let other = within(
        "another client connects",
        Client::builder(addr).pin(fingerprint).connect(),
    )
    .await
    .unwrap();
    let mut served = 0;
    within(
        "the server drops the dead client and frees the echo",
        async {
            loop {
                let answer = other.call("echo", tree!(1)).await.unwrap();
                assert_eq!(answer, tree!(1));
                served += 1;
                let stats = last_stats(&server).unwrap_or_default();
                // Three quarters of the 128 MiB echo given back to the
                // system (the allocator keeps some of what it once held).
                if holding.saturating_sub(rss(server.pid())) >= 96 * MIB
                    && stats.contains(" 0 running; connections: 1 open")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    eprintln!(
        "SIGKILLed client: the server freed its reply {:?} after the kill \
         ({} MiB resident; {served} calls of another client served meanwhile; {})",
        killed.elapsed(),
        rss(server.pid()) / MIB,
        last_stats(&server).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
