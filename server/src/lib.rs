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
//!     .listen("127.0.0.1:4433")
//!     .await?;
//! println!("fingerprint: {}", server.fingerprint());
//! server.wait().await;
//! # Ok(()) }
//! ```
//!
//! # Binding functions
//!
//! There is one [`bind`](ServerBuilder::bind): it takes a name and anything
//! that is [`IntoFunction`]. The common case is a plain async closure, of the
//! arguments or of the arguments and the call's [`Context`]; everything else
//! is a [`Function`], made by its kind and refined by options that compose:
//!
//! ```no_run
//! use std::time::Duration;
//! use teleport_protocol::{tree, Tree};
//! use teleport_server::{BatchPolicy, Context, Function, HandlerError, Server, Workers};
//!
//! fn solve(args: Tree) -> Result<Tree, HandlerError> { Ok(args) }
//! fn step(args: Tree) -> Result<(Tree, u64), HandlerError> { Ok((args, 1)) }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = BatchPolicy { max_batch: 32, max_wait: Duration::from_millis(2) };
//! let server = Server::builder()
//!     .bind("echo", |args: Tree| async move { Ok(args) })
//!     .bind("who", |_: Tree, ctx: Context| async move {
//!         Ok(tree!((ctx.peer_addr().to_string())))
//!     })
//!     .bind("solve", Function::blocking(solve).workers(Workers::Own(4)).max_concurrent(2))
//!     .bind("step", Function::blocking(step).hook(|n: u64| println!("step {n} done")))
//!     .bind("norm", Function::blocking(solve).batch(policy))
//!     .bind("fetch", Function::new(|args: Tree| async move { Ok(args) }).max_concurrent(8))
//!     .bind("later", Function::deferred(|args, responder| responder.respond(Ok(args))))
//!     .listen("127.0.0.1:4433")
//!     .await?;
//! # let _ = server;
//! # Ok(()) }
//! ```
//!
//! Why this shape, and not one method per kind (the `bind_blocking_with_hook`
//! family this replaced) nor tower layers:
//!
//! - The name of the function comes first and what it is comes second, in
//!   one call, for every kind, so a list of bindings reads as a table. The
//!   common case (an async closure) needs no wrapper at all, as an axum route
//!   needs none for a handler; the closure may ask for the call's [`Context`]
//!   by taking it, the way axum handlers take extractors (a marker type
//!   parameter tells the shapes apart, and it is inferred).
//! - Options are methods of a value, so they compose in any order and any
//!   subset: an own pool, `max_concurrent` and a hook hold for async
//!   functions exactly as for blocking ones; adding one is one more method,
//!   not another `bind_*` variant multiplied by every other option. Tower
//!   layers compose too, but wrap a service from the outside: an option here
//!   changes how the server schedules the call (which pool, which admission
//!   queue, which hook turn), taken in admission order when the call is
//!   handed over, which a layer around a future could not keep.
//! - Types rule out what they can: a hook takes the function's by-product,
//!   so it only type-checks on a function that returns one, and a closure
//!   bound directly must return a plain result. The rest (a batched function
//!   asking for a `Context`, options on a deferred function) is refused by
//!   [`listen`](ServerBuilder::listen) with
//!   [`ServerError::InvalidFunction`] saying what clashes, rather than by
//!   a type state that would split `Function` into half a dozen types.
//!
//! A function that only ever fails needs its result type named, as
//! `Err::<Tree, _>(...)`: a `Function` may return a by-product, so the
//! compiler cannot tell otherwise.
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
mod stats;
mod typed;

pub use builder::{
    default_receive_memory, ServerBuilder, DEFAULT_CONNECTION_RECEIVE_MEMORY,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_UNAUTHENTICATED,
};
pub use error::{HandlerError, HandlerFailure, ServerError};
pub use function::{
    marker, stack_calls, AsyncHandler, Binding, BlockingHandler, CallQueue, Context, Function,
    FunctionOutput, IntoFunction, QueuedCall, Responder, StackedCalls, Workers,
};
pub use server::{DialedClient, DialedEnd, Server};
pub use stats::ServerStats;
pub use teleport_protocol::batcher::{BatchPolicy, BatchPolicyError};
pub use teleport_quic::{ClientAuth, Fingerprint, Identity, TransportConfig};
pub use typed::{typed, typed_blocking, TypedFuture};
