//! `teleport bench`: the full Teleport stack against the stacks a user would
//! compare it with, measured in the same run on loopback: bare quinn with the
//! same TLS and transport settings, TLS 1.3 over TCP (rustls, same
//! certificate), plain TCP, and memcpy.
//!
//! The servers run in a child process (`teleport bench-server`), so that the
//! peak memory of each side can be read apart; `--connect` measures against a
//! `teleport serve` elsewhere instead (Teleport only: no references, no
//! server memory, no batching).
//!
//! A measurement, not a test: it prints numbers and asserts nothing about them
//! beyond the size of each reply.

mod cases;
mod measure;
mod model;
mod pool;
mod process;
mod references;
mod report;

use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use teleport::quic::reference::ReferenceClient;
use teleport::{Client, ClientTls, Fingerprint, Identity, TransportConfig};
use tokio::sync::Mutex;

use cases::{Plan, Stacks};
use measure::Link;

/// Connections opened per TCP reference: the most calls in flight of a
/// large-array case.
const TCP_CONNECTIONS: usize = 8;

/// What `teleport bench` was asked for.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    pub(crate) quick: bool,
    pub(crate) json: bool,
    pub(crate) connect: Option<String>,
    pub(crate) pin: Option<Fingerprint>,
    pub(crate) tuning: Tuning,
    /// `--only`: the groups of cases to run; empty for all.
    pub(crate) only: Vec<String>,
}

impl Options {
    /// Whether the group of cases `name` runs.
    pub(crate) fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

/// Transport settings of every stack in a run, where they differ from the
/// defaults; the server children get them on their command line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tuning {
    /// `--mtu`: the largest UDP payload of every stack, on every path.
    pub(crate) mtu: Option<u16>,
    /// `--recycled-receive-memory`.
    pub(crate) recycled_receive_memory: Option<usize>,
    /// `--worker-threads`, as the runtime of this process was built with it.
    pub(crate) worker_threads: Option<usize>,
}

impl Tuning {
    /// The defaults (which on loopback allow packets up to
    /// `loopback_udp_payload`), with what was asked for instead: with `mtu`,
    /// the bound of MTU discovery on every path, loopback included.
    pub(crate) fn transport(&self) -> TransportConfig {
        let mut transport = TransportConfig::default();
        if let Some(mtu) = self.mtu {
            transport.max_udp_payload = mtu;
            transport.mtu_upper_bound = mtu;
            transport.loopback_udp_payload = None;
        }
        if let Some(bytes) = self.recycled_receive_memory {
            transport.recycled_receive_memory = bytes;
        }
        transport
    }

    /// The same settings as `teleport bench-server` arguments.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(mtu) = self.mtu {
            args.extend(["--mtu".to_owned(), mtu.to_string()]);
        }
        if let Some(bytes) = self.recycled_receive_memory {
            args.extend(["--recycled-receive-memory".to_owned(), bytes.to_string()]);
        }
        if let Some(threads) = self.worker_threads {
            args.extend(["--worker-threads".to_owned(), threads.to_string()]);
        }
        args
    }
}

/// Worker threads of each process when the bench runs its own servers: half
/// the cores (at least one). Client and server share this machine; with
/// tokio's default (a worker per core in each process) their runtimes had
/// twice as many threads as cores, and a connection's work spread over them
/// (docs/performance.md, "Runtime threads").
pub(crate) fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// `teleport bench-server` (hidden): the servers the bench measures.
pub(crate) async fn serve(
    role: &str,
    identity_dir: &std::path::Path,
    tuning: &Tuning,
) -> anyhow::Result<()> {
    process::serve(role, identity_dir, tuning.transport()).await
}

pub(crate) async fn run(options: Options) -> anyhow::Result<()> {
    let plan = Plan::new(options.quick).only(&options);
    let transport = options.tuning.transport();
    let mut _children = None;
    let stacks = match &options.connect {
        Some(addr) => {
            let pin = options.pin.context("--connect needs --pin FINGERPRINT")?;
            let teleport = Client::builder(addr.as_str())
                .pin(pin)
                .max_in_flight(process::MAX_IN_FLIGHT)
                .connect()
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let teleport_addr = addr.clone();
            Stacks {
                teleport,
                teleport_addr,
                fingerprint: pin,
                quinn: None,
                tls: Vec::new(),
                tcp: Vec::new(),
                server_pid: None,
                references_pid: None,
                batching: false,
            }
        }
        None => {
            // One certificate for every stack, handed to the children as PEM files.
            let identity = Identity::self_signed(["localhost"])?;
            let fingerprint = identity.fingerprint();
            let dir = std::env::temp_dir().join(format!("teleport-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir).context("a directory for the bench's certificate")?;
            identity.save_pem_files(dir.join("cert.pem"), dir.join("key.pem"))?;
            let spawned =
                process::ServerProcess::spawn(process::Role::Teleport, &dir, &options.tuning)
                    .and_then(|server| {
                        let references = process::ServerProcess::spawn(
                            process::Role::References,
                            &dir,
                            &options.tuning,
                        )?;
                        Ok((server, references))
                    });
            let _ = std::fs::remove_dir_all(&dir);
            let (server, reference_servers) = spawned?;
            let teleport_addr = server.addr("teleport")?;
            let teleport = Client::builder(teleport_addr)
                .pin(fingerprint)
                .transport(transport.clone())
                .max_in_flight(process::MAX_IN_FLIGHT)
                .connect()
                .await?;
            let quinn = ReferenceClient::connect(
                reference_servers.addr("quinn")?,
                "localhost",
                &ClientTls::pinned(fingerprint),
                &transport,
            )
            .await?;
            let tls_config = Arc::new(references::client_tls(fingerprint)?);
            let mut tls = Vec::new();
            let mut tcp = Vec::new();
            for _ in 0..TCP_CONNECTIONS {
                let stream =
                    references::connect(reference_servers.addr("tls")?, Some(tls_config.clone()))
                        .await?;
                tls.push(Link::Stream(Arc::new(Mutex::new(stream))));
                let stream = references::connect(reference_servers.addr("tcp")?, None).await?;
                tcp.push(Link::Stream(Arc::new(Mutex::new(stream))));
            }
            let stacks = Stacks {
                teleport,
                teleport_addr: teleport_addr.to_string(),
                fingerprint,
                quinn: Some(Arc::new(quinn)),
                tls,
                tcp,
                server_pid: Some(server.pid()),
                references_pid: Some(reference_servers.pid()),
                batching: true,
            };
            _children = Some((server, reference_servers));
            stacks
        }
    };

    let heading =
        format!(
        "teleport bench{}{}: {}; {} cores; servers {}",
        if options.quick { " --quick" } else { "" },
        options.tuning.args().iter().map(|a| format!(" {a}")).collect::<String>(),
        match &options.connect {
            Some(addr) => format!("against {addr}"),
            None =>
                "loopback, same certificate (pinned, TLS 1.3) and TransportConfig for every stack"
                    .to_owned(),
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if options.connect.is_some() {
            "elsewhere"
        } else {
            "in child processes (Teleport's apart from the references')"
        },
    );
    if !options.json {
        println!("{heading}\n");
    }
    let bar = ProgressBar::new(plan.steps(stacks.batching));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let rows = cases::run(&plan, &stacks, &bar).await;
    bar.finish_and_clear();
    let rows = rows?;

    if options.json {
        for row in &rows {
            for line in report::json_lines(row, options.tuning.worker_threads) {
                println!("{line}");
            }
        }
    } else {
        print!("{}", report::tables(&rows));
    }
    // The pool case: its own worker processes (not with --connect).
    if options.connect.is_none() && options.runs("pool") {
        let rows = pool::run().await?;
        if options.json {
            for line in pool::json_lines(&rows) {
                println!("{line}");
            }
        } else {
            print!("\n{}", pool::table(&rows));
        }
    }
    if let Some(quinn) = &stacks.quinn {
        quinn.close().await;
    }
    stacks.teleport.close();
    Ok(())
}
