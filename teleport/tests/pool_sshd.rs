//! The pool's ssh source against a real `sshd` on loopback: the test starts
//! its own sshd on 127.0.0.1 (a free port, a host key and authorized_keys it
//! makes in a temporary directory), and the pool runs two `teleport worker`s
//! through the system's `ssh` as `ssh://USER@127.0.0.1:PORT/2`.
//!
//! Skipped, saying why, where no sshd is installed (`.ci/run` installs
//! openssh-server when it runs as root with apt-get).
//!
//! Every wait is bounded.

#![cfg(unix)]

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use teleport::Pool;

use common::alive;

const WAIT: Duration = Duration::from_secs(30);
const TELEPORT: &str = env!("CARGO_BIN_EXE_teleport");

/// Kills the sshd it holds when dropped, so a failing test leaves none.
struct Sshd {
    child: Child,
    log: PathBuf,
}

impl Sshd {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_sshd() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts sshd on 127.0.0.1:`port` with keys in `dir`; returns it once it
/// accepts TCP connections.
fn start_sshd(sshd: &Path, dir: &Path, port: u16) -> Sshd {
    let host_key = dir.join("host_key");
    let user_key = dir.join("user_key");
    for key in [&host_key, &user_key] {
        let key = key.to_str().unwrap();
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", key]);
    }
    let authorized = dir.join("authorized_keys");
    std::fs::copy(dir.join("user_key.pub"), &authorized).unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display(),
        ),
    )
    .unwrap();
    // sshd run by root wants its privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let log = dir.join("sshd.log");
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .arg("-E")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
    let sshd = Sshd { child, log };
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not listen on 127.0.0.1:{port} within {WAIT:?}: {}",
            sshd.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sshd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_ssh_with_a_real_sshd() {
    let Some(sshd) = find_sshd() else {
        eprintln!(
            "skipped: no sshd installed (apt-get install openssh-server; .ci/run does so as root)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("teleport-pool-sshd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_tcp_port();
    let sshd = start_sshd(&sshd, &dir, port);
    let key = dir.join("user_key");
    let key = key.to_str().unwrap();
    let user = user_name();
    let source = format!("ssh://{user}@127.0.0.1:{port}/2");
    let started = tokio::time::timeout(
        WAIT,
        Pool::builder()
            .ssh(source.as_str())
            .ssh_command(
                "ssh",
                [
                    "-F",
                    "/dev/null",
                    "-i",
                    key,
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "LogLevel=ERROR",
                ],
            )
            .remote_worker_command([TELEPORT, "worker"])
            .connect_timeout(Duration::from_secs(20))
            .start(),
    )
    .await
    .expect("the pool starts in time");
    let pool = started.unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", sshd.log()));
    tokio::time::timeout(WAIT, pool.wait_for_servers(2, WAIT))
        .await
        .unwrap()
        .unwrap();
    for server in pool.servers() {
        assert!(server.name.starts_with(&source), "{}", server.name);
        assert_eq!(server.addr.ip().to_string(), "127.0.0.1");
    }
    let ys: Vec<i64> = tokio::time::timeout(
        WAIT,
        pool.map("add2", 0i64..200)
            .map(|r| r.unwrap().as_int().unwrap())
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(ys, (2..202).collect::<Vec<i64>>());
    let infos = tokio::time::timeout(WAIT, pool.run_on_all("info", ()))
        .await
        .unwrap();
    let pids: Vec<u32> = infos
        .into_iter()
        .map(|(name, r)| {
            let info = r.unwrap_or_else(|e| panic!("info on {name}: {e}"));
            info.get("pid").unwrap().as_int().unwrap() as u32
        })
        .collect();
    assert_eq!(pids.len(), 2);
    // The token went through the session's stdin, not the command line.
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--token-stdin"), "{cmdline}");
        assert!(!cmdline.contains(pool.token()), "{cmdline}");
    }
    // Closing the pool closes the sessions, which stops the workers.
    drop(pool);
    let deadline = Instant::now() + WAIT;
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "the workers outlived the pool by {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sshd);
    let _ = std::fs::remove_dir_all(&dir);
}
