//! Teleport: send trees of n-dimensional arrays between machines over QUIC.
//!
//! A server binds named functions; clients call them and get futures of the
//! results. Arguments and results are [`Tree`]s: maps and lists whose leaves
//! are [`Array`]s and small scalars. Array bytes are never serialised: they go
//! on the wire as they are and land in 64-byte-aligned memory.
//!
//! This crate gathers the API of the workspace under one roof:
//!
//! - [`Server`], [`Client`], [`BlockingClient`] and the values they carry
//!   ([`Tree`], [`Array`], [`DType`], [`tree!`]) at the top level, and
//!   [`to_tree`] and [`from_tree`] to turn your own serde types into trees
//!   and back (see [`protocol::serde`]; [`Client::call_as`] uses them);
//! - [`Peer`]: a process that is server and client at once and calls other
//!   peers by name, finding them through the peers it knows (see [`peer`]);
//! - [`Pool`]: one function mapped over many servers ([`pool`]);
//! - the whole of each crate as a module: [`server`], [`client`], [`peer`],
//!   [`pool`], [`protocol`] (the sans-IO core), [`quic`] (the transport) and
//!   [`queue`] (named FIFO queues served as reserved functions).
//!
//! ```no_run
//! use std::time::Duration;
//! use teleport::{tree, Array, Client, HandlerError, Server, Tree};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // A server with one function: the sum of a float32 array.
//! let server = Server::builder()
//!     .bind("sum", |args: Tree| async move {
//!         let x: &[f32] = args.get("x")?.as_slice()?;
//!         Ok::<Tree, HandlerError>(tree!({"sum": (x.iter().sum::<f32>())}))
//!     })
//!     .listen("127.0.0.1:0")
//!     .await?;
//!
//! // A client that trusts exactly this server's certificate.
//! let client = Client::builder(server.local_addr())
//!     .pin(server.fingerprint())
//!     .connect()
//!     .await?;
//! let x = Array::from_vec([2, 3], vec![0.5f32; 6])?;
//! let reply = client.call("sum", tree!({"x": (x)})).await?;
//! assert_eq!(reply.get("sum")?.as_float()?, 3.0);
//!
//! server.shutdown(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! Functions of your own types, a function that reads its call's context, a
//! blocking function on a pool of its own, and addresses written as people
//! write them:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use teleport::{tree, typed, Array, Client, Context, Function, Server, Tree, Workers};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Batch { images: Array, labels: Vec<String> }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     // Arrays in a struct pass through without a copy.
//!     .bind("count", typed(|b: Batch| async move { Ok(b.labels.len()) }))
//!     .bind("who", |_: Tree, ctx: Context| async move {
//!         Ok(tree!({"peer": ctx.peer_addr().to_string(), "agent": ctx.agent()}))
//!     })
//!     .bind("solve", Function::blocking(|args: Tree| Ok(args)).workers(Workers::Own(4)))
//!     .listen(4433) // every IPv4 interface; or "localhost:0", "[::]:4433", ...
//!     .await?;
//!
//! let client = Client::builder("localhost:4433") // or 4433, "quic://host:4433", ...
//!     .pin(server.fingerprint())
//!     .connect()
//!     .await?;
//! let batch = Batch {
//!     images: Array::from_vec([2, 4], vec![0u8; 8])?,
//!     labels: vec!["cat".into(), "dog".into()],
//! };
//! let n: usize = client.call_as("count", &batch).await?;
//! assert_eq!(n, 2);
//! println!("{}", server.stats());
//! # Ok(()) }
//! ```
//!
//! The `teleport` command in this package (feature `cli`, on by default) runs a
//! server with built-in functions, calls functions from the shell, and runs the
//! end-to-end demo and benchmark: `cargo run --release -p teleport -- demo`.

pub use teleport_client as client;
pub use teleport_peer as peer;
pub use teleport_pool as pool;
pub use teleport_protocol as protocol;
pub use teleport_queue as queue;
pub use teleport_quic as quic;
pub use teleport_server as server;

pub use teleport_client::{
    BlockingClient, CallError, CallOptions, Client, ClientBuilder, ClientStats, PendingCall,
};
pub use teleport_peer::{Peer, PeerBuilder, PeerError};
pub use teleport_pool::{BlockingPool, MapStream, Pool, PoolBuilder, PoolError};
pub use teleport_protocol::{
    from_tree, to_tree, tree, Array, DType, Element, ErrorKind, Limits, Map, RemoteError,
    SerdeError, Tree, TreeError,
};
pub use teleport_quic::{
    Address, AddressError, ClientAuth, ClientTls, Fingerprint, Host, Identity, ServerTls,
    ToAddress, TransportConfig, TransportError,
};
pub use teleport_server::{
    typed, typed_blocking, BatchPolicy, Context, Function, HandlerError, HandlerFailure, Server,
    ServerBuilder, ServerError, ServerStats, Workers,
};

/// Why connecting or calling failed (the client's error type).
pub type ClientError = teleport_client::Error;
