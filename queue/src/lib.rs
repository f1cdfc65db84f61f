//! Named FIFO queues of array trees on a Teleport server, for many producers
//! and consumers in other processes and on other hosts (what Pype does for
//! Ray: "split a video stream to multiple remote worker processes").
//!
//! A [`QueueService`] installs its functions on a server's builder, beside
//! any other functions; a [`QueueClient`] calls them. The queue operations
//! are ordinary calls of functions with reserved names (`_queue.push`,
//! `_queue.pull`, ...: see [`wire`] and `docs/queues.md`), so they travel
//! like any call: TLS, tokens, deadlines, cancellation, and arrays that are
//! never re-encoded (an item's arrays are received into the server's memory
//! once and sent from there to its consumer).
//!
//! ```no_run
//! use std::time::Duration;
//! use teleport_client::Client;
//! use teleport_protocol::{tree, Array};
//! use teleport_queue::{QueueClient, QueueService};
//! use teleport_server::Server;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = QueueService::new().install(Server::builder()).listen("127.0.0.1:0").await?;
//!
//! let client = Client::builder(server.local_addr()).pin(server.fingerprint()).connect().await?;
//! let queues = QueueClient::new(client);
//! let frame = Array::from_vec([480, 640, 3], vec![0u8; 480 * 640 * 3])?;
//! queues.push("frames", tree!({"index": 0, "frame": (frame)})).await?;
//!
//! let item = queues.pull("frames", Duration::from_secs(1)).await?.expect("one was pushed");
//! assert_eq!(item.get("index")?.as_int()?, 0);
//! # Ok(()) }
//! ```
//!
//! # What a queue promises
//!
//! - **FIFO per queue, each item to one consumer.** Items leave a queue in
//!   the order they were pushed (pushes that arrive concurrently are ordered
//!   by their arrival at the server), and pulls waiting on an empty queue are
//!   served in the order they arrived.
//! - **Backpressure, in items and bytes.** A queue holds at most its
//!   capacity (the service's [`QueueConfig::default_capacity`] for a queue
//!   made by its first use, or what [`QueueClient::declare`] set, at most
//!   [`QueueConfig::max_capacity`]), and at most
//!   [`QueueConfig::max_queue_bytes`] of items; all queues together at most
//!   [`QueueConfig::max_total_bytes`]. An item larger than a queue may hold
//!   fails with [`QueueError::ItemTooLarge`]. A push to a full queue fails at once
//!   with `Overloaded` ([`QueueError::Full`]), or, if the pusher asks to
//!   wait ([`QueueClient::push_wait`]), waits for room up to its timeout: a
//!   slow consumer slows its producers instead of exhausting memory. Waiting
//!   pushes and pulls are deferred calls: they hold no thread.
//! - **At most once, by default.** A pulled item leaves the queue when the
//!   server hands it to the reply. A pull that is cancelled, expires or loses
//!   its connection before that takes nothing (the item stays at the front).
//!   But if the connection fails while the reply travels, or the consumer
//!   dies after receiving it, the item is gone.
//! - **At least once, when asked.** An acknowledged pull
//!   ([`QueueClient::pull_acked`]) leases the item to the consumer's
//!   connection until it calls [`QueueClient::ack`]. If that connection ends
//!   first (the consumer dies, its client is dropped, the network fails for
//!   longer than the QUIC idle timeout, the server closes it after its
//!   `idle_timeout` without calls) or the pull's ack timeout passes, the
//!   item goes back to the front of its queue for another consumer. So it
//!   does if the pull's reply never reaches its caller: the server gives
//!   the lease back when the call is stopped before the reply is written,
//!   and a caller that stops waiting (drops the future) releases it. An item
//!   processed but not acknowledged in time can so be processed twice.
//!   Leased items count against the capacity and the byte limits. A lease
//!   belongs to one connection of one server (a service may be installed
//!   on several).
//! - **Closing.** [`QueueClient::close`] makes pushes fail (waiting ones too);
//!   pulls take what is left, and once the queue is drained (and no lease is
//!   out that could bring an item back) they fail with
//!   [`QueueError::Closed`]. Closing makes no queue: a closed queue is
//!   forgotten once drained and its name remembered as closed, among at
//!   most [`QueueConfig::max_closed_names`] (the oldest forgotten first).
//! - **Stacking never loses items.** [`QueueClient::pull_stacked`] takes the
//!   run at the front that stacks (on a blocking thread on the server);
//!   what does not stack stays at the front, in order.
//!
//! Queues live in the server's memory: they do not survive its restart.
//!
//! # How the crate is built
//!
//! - `wire`: the reserved names, argument keys and error type names.
//! - `config`: [`QueueConfig`] and its validation.
//! - `state`: the queues behind one lock and the one place items move.
//! - `service`: the deferred functions, and the tasks of calls that wait.
//! - `client`: [`QueueClient`].

mod client;
mod config;
mod service;
mod state;
pub mod wire;

pub use client::{Lease, Leased, QueueClient, QueueError, Stacked, DEFAULT_CALL_GRACE};
pub use config::{
    QueueConfig, QueueConfigError, DEFAULT_CAPACITY, DEFAULT_MAX_BATCH, DEFAULT_MAX_CAPACITY,
    DEFAULT_MAX_CLOSED_NAMES, DEFAULT_MAX_QUEUES, DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_TOTAL_BYTES,
};
pub use service::{QueueInfo, QueueService};
