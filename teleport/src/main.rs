//! The `teleport` command: serve the built-in functions, call a function from
//! the shell, run the end-to-end demo, or benchmark against bare quinn.

mod bench;
mod builtins;
mod demo;
mod json;
mod queue_cli;
mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use teleport::{Address, Client, Fingerprint, Host, Identity, Server};

#[derive(Debug, Parser)]
#[command(
    name = "teleport",
    version,
    about = "Send trees of n-dimensional arrays over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the built-in functions: echo, info, sink, sleep, source, sum, zeros.
    Serve(ServeArgs),
    /// Call a function on a server, with arguments as JSON; print the result as JSON.
    Call(CallArgs),
    /// Named queues: `teleport queue serve` runs a queue server.
    Queue(queue_cli::QueueArgs),
    /// Push an item, written as JSON, to the back of a queue on a queue server.
    Push(queue_cli::PushArgs),
    /// Pull the item at the front of a queue on a queue server; print it as JSON.
    Pull(queue_cli::PullArgs),
    /// Run everything on loopback in one process and check it works (no setup).
    Demo,
    /// Measure Teleport against bare quinn, TLS over TCP, plain TCP and memcpy, on loopback.
    Bench(BenchArgs),
    /// A server for pools (`teleport::Pool`): the built-in functions and `add2`.
    Worker(worker::WorkerArgs),
    /// The servers `teleport bench` measures, in a process of their own.
    #[command(hide = true)]
    BenchServer {
        /// `teleport` or `references`.
        role: String,
        /// Directory holding cert.pem and key.pem.
        identity_dir: PathBuf,
        /// As `teleport bench --mtu`.
        #[arg(long)]
        mtu: Option<u16>,
        /// As `teleport bench --recycled-receive-memory`.
        #[arg(long)]
        recycled_receive_memory: Option<usize>,
        /// As `teleport bench --worker-threads`.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (UDP): `4433` (every IPv4 interface),
    /// `127.0.0.1:4433`, `[::]:4433`, `localhost:0`, ...
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: Address,
    /// Shared token clients must present.
    #[arg(long, env = "TELEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Certificate chain (PEM), leaf first.
    #[arg(long, requires = "key", conflicts_with = "identity_dir")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Directory holding a self-signed certificate, made on first use, so the
    /// fingerprint clients pin stays the same across restarts. Without this or
    /// --cert, each start makes a new certificate (and a new fingerprint).
    #[arg(long)]
    identity_dir: Option<PathBuf>,
    /// Print the server's figures (calls by outcome, connections, bytes)
    /// every this many seconds.
    #[arg(long, value_name = "SECONDS")]
    stats: Option<f64>,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// Server address: `4433` (this machine), `host:4433`, `[::1]:4433`,
    /// `quic://host:4433` (names are resolved).
    #[arg(long)]
    connect: String,
    /// SHA-256 fingerprint of the server's certificate (what `teleport serve` prints).
    #[arg(long)]
    pin: Fingerprint,
    /// Shared token the server requires.
    #[arg(long, env = "TELEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Fail if no reply arrives within this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Name of the function.
    method: String,
    /// Arguments as JSON. `{"__array__": {"dtype": "f32", "shape": [2, 3], "fill": 1.0}}`
    /// makes an array (or `"data": [...]` instead of "fill"). Default: null.
    args: Option<String>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Fewer sizes (up to 16 MiB) and shorter measurements: under a minute.
    #[arg(long)]
    quick: bool,
    /// One JSON object per line instead of tables.
    #[arg(long)]
    json: bool,
    /// Measure against a `teleport serve` at this address instead (Teleport
    /// only: no references, no server memory, no batching).
    #[arg(long, requires = "pin")]
    connect: Option<String>,
    /// The fingerprint `teleport serve` printed (with --connect).
    #[arg(long)]
    pin: Option<Fingerprint>,
    /// The largest UDP payload in bytes, for every stack and every path,
    /// loopback included (`max_udp_payload` and `mtu_upper_bound`). Without
    /// it: 1,452, and up to 65,527 on loopback (`loopback_udp_payload`).
    /// MTU discovery still starts at 1,200.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1200..=65527))]
    mtu: Option<u16>,
    /// Bytes of large receive buffers each endpoint keeps for reuse
    /// (`TransportConfig::recycled_receive_memory`, default 1 GiB); 0 to
    /// measure without reuse.
    #[arg(long)]
    recycled_receive_memory: Option<usize>,
    /// Worker threads of the async runtime of every process the bench runs
    /// (the client, Teleport's server, the references' servers). Without it:
    /// half the cores, at least one, when the bench starts its own servers
    /// (client and server share the machine, as two hosts would not); every
    /// core with --connect.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// Only these groups of cases, comma-separated: large (echo, upload and
    /// download of one array per size), small, clients, batched, pool.
    #[arg(long, value_delimiter = ',', value_parser = ["large", "small", "clients", "batched", "pool"])]
    only: Vec<String>,
}

/// The runtime's worker threads where a command sets them (tokio's default,
/// one per core, otherwise).
fn runtime_threads(command: &Command) -> Option<usize> {
    match command {
        Command::Bench(args) => match (args.worker_threads, &args.connect) {
            (Some(threads), _) => Some(threads.into()),
            // The bench's own servers share the machine with its client.
            (None, None) => Some(bench::default_worker_threads()),
            (None, Some(_)) => None,
        },
        Command::BenchServer { worker_threads, .. } => worker_threads.map(usize::from),
        _ => None,
    }
}

/// Prints a line to stdout for whoever reads it, and carries on if nobody
/// does: a server whose stdout was closed (a pipe to a reader that exited)
/// keeps serving, where `println!` would panic at its next line.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The bench's processes also tell their servers (`Tuning`) what they got.
    let worker_threads = runtime_threads(&cli.command);
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Call(args) => call(args).await,
            Command::Queue(args) => queue_cli::queue(args).await,
            Command::Push(args) => queue_cli::push(args).await,
            Command::Pull(args) => queue_cli::pull(args).await,
            Command::Demo => demo::run().await,
            Command::Bench(args) => {
                bench::run(bench::Options {
                    quick: args.quick,
                    json: args.json,
                    connect: args.connect,
                    pin: args.pin,
                    only: args.only,
                    tuning: bench::Tuning {
                        mtu: args.mtu,
                        recycled_receive_memory: args.recycled_receive_memory,
                        worker_threads,
                    },
                })
                .await
            }
            Command::Worker(args) => worker::run(args).await,
            Command::BenchServer {
                role,
                identity_dir,
                mtu,
                recycled_receive_memory,
                ..
            } => {
                let tuning = bench::Tuning {
                    mtu,
                    recycled_receive_memory,
                    worker_threads,
                };
                bench::serve(&role, &identity_dir, &tuning).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: some errors already include their
/// cause's text in their own message, and printing the chain would repeat it.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    serve_functions(
        args,
        builtins::bind_builtins(Server::builder()),
        "call",
        "info",
    )
    .await
}

/// Serves the functions bound on `builder` as `args` say, until Ctrl-C;
/// suggests `teleport {command} --connect .. --pin .. {example}` to try it.
async fn serve_functions(
    args: ServeArgs,
    mut builder: teleport::ServerBuilder,
    command: &str,
    example: &str,
) -> anyhow::Result<()> {
    let mut names = vec!["localhost".to_owned()];
    match &args.listen.host {
        Host::Ip(ip) if !ip.is_unspecified() => names.push(ip.to_string()),
        Host::Name(name) => names.push(name.clone()),
        _ => {}
    }
    let ephemeral = match (&args.cert, &args.key, &args.identity_dir) {
        (Some(cert), Some(key), _) => {
            builder = builder.identity(Identity::from_pem_files(cert, key)?);
            false
        }
        (_, _, Some(dir)) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the identity directory {}", dir.display()))?;
            let identity = Identity::load_or_create_self_signed(
                dir.join("cert.pem"),
                dir.join("key.pem"),
                names,
            )?;
            builder = builder.identity(identity);
            false
        }
        // The server makes a fresh self-signed certificate.
        _ => true,
    };
    if let Some(token) = args.token {
        builder = builder.token(token);
    }
    let server = builder.listen(args.listen).await?;
    let addr = server.local_addr();
    let fingerprint = server.fingerprint();
    say!("teleport serving on {addr}");
    say!("fingerprint: {fingerprint}");
    say!("methods: {}", server.methods().join(", "));
    if ephemeral {
        say!("(a new certificate each start; use --identity-dir DIR to keep the fingerprint)");
    }
    let connect = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
    } else {
        addr
    };
    say!("try: teleport {command} --connect {connect} --pin {fingerprint} {example}");
    say!("stop with Ctrl-C");
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = match args.stats {
        Some(seconds) if seconds > 0.0 && seconds.is_finite() => {
            let period = Duration::from_secs_f64(seconds);
            Some(tokio::time::interval_at(
                tokio::time::Instant::now() + period,
                period,
            ))
        }
        Some(seconds) => anyhow::bail!("--stats takes a positive number of seconds, not {seconds}"),
        None => None,
    };
    loop {
        tokio::select! {
            done = &mut ctrl_c => {
                done.context("waiting for Ctrl-C")?;
                break;
            }
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() => {
                say!("{}", server.stats());
            }
        }
    }
    say!("shutting down (running calls get up to 5 s to finish)");
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

async fn call(args: CallArgs) -> anyhow::Result<()> {
    let value: serde_json::Value = match &args.args {
        Some(text) => serde_json::from_str(text).context("the arguments are not valid JSON")?,
        None => serde_json::Value::Null,
    };
    let tree = json::tree_from_json(&value)?;
    let mut builder = Client::builder(&args.connect).pin(args.pin);
    if let Some(token) = args.token {
        builder = builder.token(token);
    }
    let client = builder.connect().await?;
    let result = match args.timeout {
        Some(seconds) => {
            let Ok(timeout) = Duration::try_from_secs_f64(seconds) else {
                bail!("--timeout takes a non-negative number of seconds, got {seconds}");
            };
            client.call_with_timeout(args.method, tree, timeout).await
        }
        None => client.call(args.method, tree).await,
    };
    client.close();
    let reply = result?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json::tree_to_json(&reply))?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(args: &[&str]) -> Option<usize> {
        let cli = Cli::try_parse_from(args).expect("the arguments parse");
        runtime_threads(&cli.command)
    }

    #[test]
    fn the_bench_sizes_the_runtime_of_each_of_its_processes() {
        // Its own servers share the machine: half the cores, at least one.
        assert_eq!(
            threads(&["teleport", "bench"]),
            Some(bench::default_worker_threads())
        );
        assert!(bench::default_worker_threads() >= 1);
        assert_eq!(
            threads(&["teleport", "bench", "--worker-threads", "3"]),
            Some(3)
        );
        // A server elsewhere: the client keeps tokio's default.
        assert_eq!(
            threads(&[
                "teleport",
                "bench",
                "--connect",
                "127.0.0.1:4433",
                "--pin",
                &"ab".repeat(32)
            ]),
            None
        );
        // The children get the count on their command line.
        assert_eq!(
            threads(&[
                "teleport",
                "bench-server",
                "teleport",
                "/tmp",
                "--worker-threads",
                "1"
            ]),
            Some(1)
        );
        assert_eq!(threads(&["teleport", "serve"]), None);
        assert!(Cli::try_parse_from(["teleport", "bench", "--worker-threads", "0"]).is_err());
    }
}
