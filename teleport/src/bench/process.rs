//! The server side of the bench in a process of its own (`teleport bench-server`,
//! hidden), so that each side's peak memory can be read apart, and reading
//! and resetting a process's peak resident memory (Linux `/proc`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use teleport::quic::reference::ReferenceServer;
use teleport::{Function, Identity, Server, ServerTls, TransportConfig};
use tokio::io::AsyncReadExt;

use super::model::{self, BATCH_POLICY};
use super::references::{self, TcpServer};
use crate::builtins::bind_builtins;

/// Calls in flight the bench's server admits per connection (the most the
/// bench keeps in flight is 256).
pub(crate) const MAX_IN_FLIGHT: usize = 512;

/// Which servers a child runs: Teleport's, or the references (bare quinn,
/// TLS over TCP, TCP). Apart, so that the references' memory does not count
/// as Teleport's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Teleport,
    References,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Teleport => "teleport",
            Role::References => "references",
        }
    }
}

/// A running `teleport bench-server` child. Dropping it ends the child.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    /// What it printed on its first line: where each server listens.
    addresses: serde_json::Value,
}

impl ServerProcess {
    /// Starts this executable as `teleport bench-server ROLE DIR` (the
    /// identity in DIR, as `Identity::save_pem_files` wrote it) and reads
    /// where it listens.
    pub(crate) fn spawn(
        role: Role,
        identity_dir: &Path,
        tuning: &super::Tuning,
    ) -> anyhow::Result<ServerProcess> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = Command::new(exe);
        command
            .arg("bench-server")
            .arg(role.name())
            .arg(identity_dir);
        command.args(tuning.args());
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `teleport bench-server`")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut process = ServerProcess {
            child,
            stdin,
            addresses: serde_json::Value::Null,
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the bench server's addresses")?;
        process.addresses = serde_json::from_str(line.trim())
            .with_context(|| format!("the bench server said {line:?}"))?;
        Ok(process)
    }

    /// Where its server `key` listens.
    pub(crate) fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        self.addresses[key]
            .as_str()
            .with_context(|| format!("no {key} address"))?
            .parse()
            .with_context(|| format!("the {key} address"))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Closing its stdin asks the child to stop; it is killed (by its own
        // handle) if it has not within a second.
        drop(self.stdin.take());
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `teleport bench-server teleport|references DIR`: the Teleport server
/// (built-ins and the batching model), or bare quinn, TLS over TCP and plain
/// TCP, with the identity in DIR, on loopback; prints their addresses as one
/// JSON line and serves until its stdin closes.
pub(crate) async fn serve(
    role: &str,
    identity_dir: &Path,
    transport: TransportConfig,
) -> anyhow::Result<()> {
    let identity =
        Identity::from_pem_files(identity_dir.join("cert.pem"), identity_dir.join("key.pem"))?;
    if role == Role::Teleport.name() {
        let server = bind_builtins(Server::builder())
            .bind("model", Function::blocking(|x| model::model(&x)))
            .bind(
                "model_batched",
                Function::blocking(|x| model::model(&x)).batch(BATCH_POLICY),
            )
            .identity(identity.clone())
            .transport(transport.clone())
            .max_in_flight(MAX_IN_FLIGHT)
            .listen("127.0.0.1:0")
            .await?;
        println!(
            "{}",
            serde_json::json!({"teleport": server.local_addr().to_string()})
        );
        wait_for_stdin_to_close().await;
        server.shutdown(Duration::from_millis(200)).await;
    } else if role == Role::References.name() {
        let quinn = ReferenceServer::start(
            "127.0.0.1:0".parse()?,
            &ServerTls::new(identity.clone()),
            &transport,
        )?;
        let tls = TcpServer::start(Some(Arc::new(references::server_tls(&identity)?))).await?;
        let tcp = TcpServer::start(None).await?;
        println!(
            "{}",
            serde_json::json!({
                "quinn": quinn.local_addr()?.to_string(),
                "tls": tls.local_addr().to_string(),
                "tcp": tcp.local_addr().to_string(),
            })
        );
        wait_for_stdin_to_close().await;
        quinn.close();
    } else {
        bail!("bench-server runs `teleport` or `references`, not {role:?}");
    }
    Ok(())
}

async fn wait_for_stdin_to_close() {
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
}

/// The resident memory (`VmRSS`) of process `pid` now, in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The peak resident memory (`VmHWM`) of process `pid`, in bytes, since it
/// started or since the last [`reset_peak`].
pub(crate) fn peak_rss(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// The CPU time process `pid` (all its threads) has used so far, user and
/// system together, at the 10 ms resolution Linux reports it in.
pub(crate) fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it don't.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // utime and stime are fields 14 and 15, in ticks of USER_HZ (100 on Linux).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis((utime + stime) * 10))
}

/// UDP datagrams this host has received so far (`InDatagrams` of
/// `/proc/net/snmp`): on a host running only the bench, both sides' packets.
pub(crate) fn udp_datagrams_received() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(name, _)| *name == "InDatagrams")
        .and_then(|(_, value)| value.parse().ok())
}

/// Sets the peak resident memory of `pid` back to what it holds now.
pub(crate) fn reset_peak(pid: u32) -> anyhow::Result<()> {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        bail!("resetting the peak memory of process {pid}: {e}");
    }
    Ok(())
}
