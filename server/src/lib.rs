//! The Teleport server: bind named functions on array trees, serve them over QUIC.
//!
//! ```no_run
//! use teleport_server::{HandlerError, Server};
//! use teleport_protocol::{tree, Tree};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .bind("add", |args: Tree| async move {
//!         // Any error converts with `?`; the caller sees its type and message.
//!         let (a, b) = (args.get("a")?.as_int()?, args.get("b")?.as_int()?);
//!         Ok(tree!((a + b)))
//!     })
//!     .bind_blocking("fail", |_| Err(HandlerError::with_type("ValueError", "always fails")))
//!     .listen("127.0.0.1:4433".parse()?)
//!     .await?;
//! println!("fingerprint: {}", server.fingerprint());
//! server.wait().await;
//! # Ok(()) }
//! ```
//!
//! Each connection is driven by a
//! [`ServerProtocol`](teleport_protocol::server::ServerProtocol): the client's
//! first stream is the control stream (the `Hello`s, then pings, cancels and
//! goodbyes), and every call comes on a stream of its own, answered on the same
//! stream. Functions run concurrently; a slow or large call delays no other.

mod batched;
mod connection;
mod deferred;
mod functions;
mod handler;
mod queue;
mod server;

pub use deferred::Responder;
pub use functions::{FunctionOptions, Workers};
pub use handler::HandlerError;
pub use queue::{stack_calls, CallQueue, QueuedCall, StackedCalls};
pub use server::{HandlerFailure, Server, ServerBuilder, ServerError};
pub use teleport_protocol::batcher::{BatchPolicy, BatchPolicyError};
pub use teleport_quic::{ClientAuth, Fingerprint, Identity, TransportConfig};
