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
//!     .bind("fail", |_: Tree| async { Err(HandlerError::with_type("ValueError", "always fails")) })
//!     .listen("127.0.0.1:4433".parse()?)
//!     .await?;
//! println!("fingerprint: {}", server.fingerprint());
//! server.wait().await;
//! # Ok(()) }
//! ```
//!
//! Each connection is driven by a
//! [`ServerProtocol`](teleport_protocol::server::ServerProtocol), which makes
//! every decision about it: the client's first stream is the control stream
//! (the `Hello`s, then pings, cancels and goodbyes), and every call comes on a
//! stream of its own, answered on the same stream. Calls of one connection are
//! admitted in the order the client made them, as soon as their header has
//! arrived; functions run concurrently, so a slow or large call delays no
//! other.
//!
//! # How the crate is built
//!
//! - `builder`: binding functions and settings; `server`: the running server
//!   and its shutdown; `shared`: what all connections of a server share.
//! - `connection`: the driver of one connection's state machine (handshake,
//!   control stream, accept loop) and `connection::call`, the task serving one
//!   call stream. The driver holds the machine behind one lock and decides
//!   nothing itself; see `teleport_quic::driver` for the parts it shares with
//!   the client.
//! - `function`: the kinds of bound functions and how a call reaches one, in
//!   admission order.

mod builder;
mod connection;
mod error;
mod function;
mod server;
mod shared;

pub use builder::ServerBuilder;
pub use error::{HandlerError, HandlerFailure, ServerError};
pub use function::{
    marker, stack_calls, AsyncHandler, Binding, BlockingHandler, CallQueue, Context, Function,
    FunctionOutput, IntoFunction, QueuedCall, Responder, StackedCalls, Workers,
};
pub use server::Server;
pub use teleport_protocol::batcher::{BatchPolicy, BatchPolicyError};
pub use teleport_quic::{ClientAuth, Fingerprint, Identity, TransportConfig};
