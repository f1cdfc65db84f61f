//! The pool with worker processes: `teleport worker` started and stopped by
//! the pool, a worker killed with SIGKILL mid-map, workers started through a
//! fake `ssh` (a script that runs the remote command here) and through a
//! real `sshd` on loopback (`pool_sshd.rs`), and a worker that dials its
//! pool with `--connect` (and one with the wrong token, refused).
//!
//! Every wait is bounded.

#![cfg(unix)]

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use teleport::{tree, Pool, PoolError, Tree};

use common::alive;

const WAIT: Duration = Duration::from_secs(20);
const TELEPORT: &str = env!("CARGO_BIN_EXE_teleport");

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
    .await
}

/// The pids of the pool's workers, from `info` on each.
async fn worker_pids(pool: &Pool) -> Vec<u32> {
    pids_by_name(pool)
        .await
        .into_iter()
        .map(|(_, pid)| pid)
        .collect()
}

/// Each server's name in the pool and its pid (from `info`).
async fn pids_by_name(pool: &Pool) -> Vec<(String, u32)> {
    let results = within("info on every worker", pool.run_on_all("info", ())).await;
    results
        .into_iter()
        .map(|(name, r)| {
            let info = r.unwrap_or_else(|e| panic!("info on {name}: {e}"));
            let pid = info.get("pid").unwrap().as_int().unwrap() as u32;
            (name, pid)
        })
        .collect()
}

/// Kills process `pid` with SIGKILL.
fn kill9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `add2` over 0..100 through `pool`, unordered: the results.
async fn map_add2(pool: &Pool, what: &str) -> Vec<i64> {
    within(
        what,
        pool.map_unordered("add2", 0i64..100)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await
}

fn local_pool(n: usize) -> teleport::PoolBuilder {
    Pool::builder()
        .worker_command(TELEPORT, ["worker"])
        .local_workers(n)
        .connect_timeout(Duration::from_secs(10))
        .server_wait(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_workers_are_started_and_stopped_by_the_pool() {
    let pool = within("the pool starts", local_pool(2).qsize(8).start())
        .await
        .unwrap();
    within("both up", pool.wait_for_servers(2, WAIT))
        .await
        .unwrap();
    let ys: Vec<i64> = within(
        "a map",
        pool.map("add2", 0i64..500)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await;
    assert_eq!(ys, (2..502).collect::<Vec<i64>>());
    let chunked: Vec<i64> = within(
        "a chunked map",
        pool.map("add2", 0i64..500)
            .chunksize(16)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await;
    assert_eq!(chunked, (2..502).collect::<Vec<i64>>());
    let pids = worker_pids(&pool).await;
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1]);
    assert!(pids.iter().all(|&p| alive(p)));
    token_stays_off_command_lines(&pool, &pids).await;
    drop(pool);
    wait_until("the workers exit with the pool", || {
        pids.iter().all(|&p| !alive(p))
    })
    .await;
}

/// The workers got the pool's token on stdin: it is on no command line,
/// and a client without it is refused.
async fn token_stays_off_command_lines(pool: &Pool, pids: &[u32]) {
    let token = pool.token();
    assert_eq!(token.len(), 64, "a random 256-bit token");
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--token-stdin"), "{cmdline}");
        assert!(
            !cmdline.contains(token),
            "the token is visible in ps: {cmdline}"
        );
    }
    for server in pool.servers() {
        let refused = within(
            "a client without the token",
            teleport::Client::builder(server.addr)
                .insecure_skip_verification()
                .reconnect(false)
                .connect_timeout(Duration::from_secs(5))
                .connect(),
        )
        .await;
        let e = refused.expect_err("a worker takes no client without the token");
        assert!(e.to_string().contains("token"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_map() {
    // Idempotent calls with workers restarted (the default); others without.
    for idempotent in [true, false] {
        let pool = within(
            "the pool starts",
            local_pool(2).qsize(4).restart_workers(idempotent).start(),
        )
        .await
        .unwrap();
        within("both up", pool.wait_for_servers(2, WAIT))
            .await
            .unwrap();
        let pids = worker_pids(&pool).await;
        // 20 ms a call: the kill lands with calls in flight on both workers.
        let inputs = (0..200).map(|_| tree!({"seconds": 0.02}));
        let map = pool.map("sleep", inputs).idempotent(idempotent);
        let collector = tokio::spawn(map.collect::<Vec<_>>());
        wait_until("both workers busy", || {
            pool.servers().iter().all(|s| s.outstanding == 4)
        })
        .await;
        let victim = pids[1];
        kill9(victim);
        let results: Vec<Result<Tree, PoolError>> =
            within("the map ends", collector).await.unwrap();
        assert_eq!(results.len(), 200);
        let failed: Vec<&PoolError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if idempotent {
            assert!(
                failed.is_empty(),
                "idempotent calls go elsewhere: {failed:?}"
            );
        } else {
            assert!(!failed.is_empty() && failed.len() <= 4, "{failed:?}");
            for e in failed {
                assert!(matches!(e, PoolError::ServerLost { .. }), "{e}");
                let server = e.server().unwrap();
                assert!(server.contains(&format!("pid {victim}")), "{e}");
                assert!(e.to_string().contains("exited"), "{e}");
            }
        }
        let victim_name = format!("pid {victim})");
        if idempotent {
            // Another process takes the dead one's place, and gets work.
            wait_until("a new worker replaces the killed one", || {
                let servers = pool.servers();
                servers.len() == 2
                    && servers
                        .iter()
                        .all(|s| s.up && !s.name.contains(&victim_name))
            })
            .await;
            let pids_now = worker_pids(&pool).await;
            assert_eq!(pids_now.len(), 2);
            assert!(!pids_now.contains(&victim), "{pids_now:?}");
            let ys: Vec<Result<Tree, PoolError>> = within(
                "a map over both",
                pool.map("add2", (0..40i64).map(Tree::from))
                    .collect::<Vec<_>>(),
            )
            .await;
            assert!(ys.iter().all(Result::is_ok), "{ys:?}");
        } else {
            // Not restarted: the dead worker is out of the pool for good.
            wait_until("the killed worker is removed", || pool.servers().len() == 1).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(pool.servers().len(), 1);
        }
    }
}

/// A fake `ssh`: records its arguments, drops the options and the
/// destination, and runs the remote command with `sh -c` here.
fn fake_ssh(dir: &std::path::Path) -> PathBuf {
    let script = dir.join("fake-ssh");
    let log = dir.join("ssh-args");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\nwhile [ $# -gt 0 ]; do case \"$1\" in --) shift; break;; *) shift;; esac; done\nexec sh -c \"$*\"\n",
            log.display()
        ),
    )
    .unwrap();
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success());
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_ssh_with_a_fake_ssh() {
    let dir = std::env::temp_dir().join(format!("teleport-pool-ssh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ssh = fake_ssh(&dir);
    let pool = within(
        "the pool starts",
        Pool::builder()
            .ssh("ssh://tester@127.0.0.1:2222/2")
            .ssh_command(&ssh, ["-o", "BatchMode=yes"])
            .remote_worker_command([TELEPORT, "worker"])
            .connect_timeout(Duration::from_secs(10))
            .start(),
    )
    .await
    .unwrap();
    within("both up", pool.wait_for_servers(2, WAIT))
        .await
        .unwrap();
    let args = std::fs::read_to_string(dir.join("ssh-args")).unwrap();
    let lines: Vec<&str> = args.lines().collect();
    assert_eq!(lines.len(), 2, "{args}");
    for line in lines {
        assert!(
            line.starts_with("-o BatchMode=yes -p 2222 tester@127.0.0.1 -- "),
            "{line}"
        );
        assert!(
            line.ends_with(" worker --listen 0.0.0.0:0 --exit-on-stdin-close --token-stdin"),
            "{line}"
        );
    }
    for server in pool.servers() {
        assert!(
            server
                .name
                .starts_with("ssh://tester@127.0.0.1:2222/2 worker"),
            "{}",
            server.name
        );
        // Announced 0.0.0.0:PORT, dialled at the ssh host.
        assert_eq!(server.addr.ip().to_string(), "127.0.0.1");
    }
    assert_eq!(map_add2(&pool, "a map").await.len(), 100);
    let pids = worker_pids(&pool).await;
    token_stays_off_command_lines(&pool, &pids).await;
    // A worker killed is started again through ssh, as worker 1 of the source.
    let (victim, victim_pid) = pids_by_name(&pool)
        .await
        .into_iter()
        .find(|(name, _)| name.contains("/2 worker 1 at "))
        .expect("worker 1");
    kill9(victim_pid);
    wait_until("another ssh worker takes the killed one's place", || {
        let servers = pool.servers();
        servers.len() == 2
            && servers.iter().all(|s| s.up && s.name != victim)
            && servers.iter().any(|s| s.name.contains("/2 worker 1 at "))
    })
    .await;
    let args = std::fs::read_to_string(dir.join("ssh-args")).unwrap();
    assert_eq!(args.lines().count(), 3, "started again through ssh: {args}");
    assert_eq!(map_add2(&pool, "a map after the restart").await.len(), 100);
    let pids = worker_pids(&pool).await;
    assert!(!pids.contains(&victim_pid), "{pids:?}");
    drop(pool);
    wait_until("the ssh workers exit with the pool", || {
        pids.iter().all(|&p| !alive(p))
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `teleport worker --connect` to the pool `registration` names, its token
/// to come on stdin (never on the command line).
fn connecting_worker(registration: &teleport::pool::Registration) -> Command {
    let mut command = Command::new(TELEPORT);
    command
        .args([
            "worker",
            "--connect",
            &registration.addr.to_string(),
            "--pin",
            &registration.fingerprint.to_string(),
            "--token-stdin",
        ])
        .env_remove("TELEPORT_TOKEN")
        .stdin(Stdio::piped());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dials_its_pool_with_connect() {
    let pool = within(
        "the pool starts",
        Pool::builder()
            .accept_workers("127.0.0.1:0", None)
            .server_wait(Duration::from_secs(5))
            .start(),
    )
    .await
    .unwrap();
    let registration = pool.registration().unwrap();
    assert_eq!(registration.token, pool.token());
    // A worker with another token is refused, and says so in its exit.
    let mut impostor = connecting_worker(&registration)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(impostor.stdin.take().unwrap(), "not the pool's token").unwrap();
    let output = within(
        "the refused worker exits",
        tokio::task::spawn_blocking(move || impostor.wait_with_output()),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("refused this worker's token"), "{stderr}");
    assert!(pool.servers().is_empty());
    let mut child = connecting_worker(&registration)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The token on stdin, never on the command line; stdin stays open.
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", registration.token).unwrap();
    // The worker says when its connection to the pool is up.
    let stdout = child.stdout.take().unwrap();
    let registered = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.starts_with("teleport worker registered with "))
    });
    assert!(within("the worker's registration", registered)
        .await
        .unwrap());
    within("the worker joins", pool.wait_for_servers(1, WAIT))
        .await
        .unwrap();
    let y = within("a call", pool.submit("add2", 40i64)).await.unwrap();
    assert_eq!(y.as_int().unwrap(), 42);
    assert!(pool.servers()[0]
        .name
        .starts_with("worker dialled in from 127.0.0.1:"));
    // The worker stops when its pool goes.
    drop(pool);
    let exited = within("the worker exits with the pool", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(exited.success(), "{exited}");
}
