//! `teleport queue serve`, `teleport push` and `teleport pull`: named queues
//! from the shell.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use teleport::queue::{QueueClient, QueueConfig, QueueService};
use teleport::{Client, Fingerprint, Server};

use crate::{builtins, json, serve_functions, ServeArgs};

#[derive(Debug, Args)]
pub(crate) struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Serve named queues (and the built-in functions of `teleport serve`).
    Serve(QueueServeArgs),
}

#[derive(Debug, Args)]
struct QueueServeArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Items a queue holds before pushes wait or fail (for queues made by
    /// their first use; `declare` sets others). 0: as many as
    /// --max-capacity.
    #[arg(long, default_value_t = teleport::queue::DEFAULT_CAPACITY)]
    capacity: usize,
    /// The most items any queue may be declared to hold.
    #[arg(long, default_value_t = teleport::queue::DEFAULT_MAX_CAPACITY)]
    max_capacity: usize,
    /// The most bytes the items of one queue may take; larger items are
    /// refused, and a push that would take a queue over waits or fails as
    /// for a full queue.
    #[arg(long, value_name = "BYTES", default_value_t = teleport::queue::DEFAULT_MAX_QUEUE_BYTES)]
    max_queue_bytes: usize,
    /// The most bytes the items of all queues may take together.
    #[arg(long, value_name = "BYTES", default_value_t = teleport::queue::DEFAULT_MAX_TOTAL_BYTES)]
    max_total_bytes: usize,
}

/// Where the queue server is and how to trust it (as for `teleport call`).
#[derive(Debug, Args)]
struct ConnectArgs {
    /// Server address: `4433` (this machine), `host:4433`, `[::1]:4433`,
    /// `quic://host:4433` (names are resolved).
    #[arg(long)]
    connect: String,
    /// SHA-256 fingerprint of the server's certificate (what `teleport queue
    /// serve` prints).
    #[arg(long)]
    pin: Fingerprint,
    /// Shared token the server requires.
    #[arg(long, env = "TELEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    #[command(flatten)]
    server: ConnectArgs,
    /// If the queue is full, wait up to this many seconds for room instead
    /// of failing at once.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<f64>,
    /// Name of the queue.
    queue: String,
    /// The item as JSON (`{"__array__": {"dtype": "f32", "shape": [2, 3],
    /// "fill": 1.0}}` makes an array, as for `teleport call`).
    item: String,
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    #[command(flatten)]
    server: ConnectArgs,
    /// Wait up to this many seconds for an item if the queue is empty.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    timeout: f64,
    /// Name of the queue.
    queue: String,
}

pub(crate) async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    match args.command {
        QueueCommand::Serve(args) => {
            let capacity = match args.capacity {
                0 => args.max_capacity,
                capacity => capacity,
            };
            let config = QueueConfig::default()
                .with_default_capacity(capacity)
                .with_max_capacity(args.max_capacity)
                .with_max_queue_bytes(args.max_queue_bytes)
                .with_max_total_bytes(args.max_total_bytes);
            let queues = QueueService::with_config(config)
                .context("the queue settings (--capacity, --max-*) do not fit together")?;
            let builder = builtins::bind_builtins(queues.install(Server::builder()));
            serve_functions(
                args.serve,
                builder,
                "push",
                "QUEUE '{\"hello\": [1, 2, 3]}'",
            )
            .await
        }
    }
}

fn seconds(flag: &str, seconds: f64) -> anyhow::Result<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) => Ok(duration),
        Err(_) => bail!("{flag} takes a non-negative number of seconds, got {seconds}"),
    }
}

async fn connect(args: ConnectArgs) -> anyhow::Result<QueueClient> {
    let mut builder = Client::builder(&args.connect).pin(args.pin);
    if let Some(token) = args.token {
        builder = builder.token(token);
    }
    Ok(QueueClient::new(builder.connect().await?))
}

pub(crate) async fn push(args: PushArgs) -> anyhow::Result<()> {
    let value: serde_json::Value =
        serde_json::from_str(&args.item).context("the item is not valid JSON")?;
    let item = json::tree_from_json(&value)?;
    let wait = args.wait.map(|s| seconds("--wait", s)).transpose()?;
    let queues = connect(args.server).await?;
    let pushed = match wait {
        Some(wait) => queues.push_wait(&args.queue, item, wait).await,
        None => queues.push(&args.queue, item).await,
    };
    queues.client().close();
    let len = pushed.with_context(|| format!("pushing to the queue {:?}", args.queue))?;
    println!("pushed to {:?}: {len} queued", args.queue);
    Ok(())
}

pub(crate) async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let timeout = seconds("--timeout", args.timeout)?;
    let queues = connect(args.server).await?;
    let pulled = queues.pull(&args.queue, timeout).await;
    queues.client().close();
    let pulled = pulled.with_context(|| format!("pulling from the queue {:?}", args.queue))?;
    let Some(item) = pulled else {
        bail!("the queue {:?} had no item within {timeout:?}", args.queue);
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json::tree_to_json(&item))?
    );
    Ok(())
}
