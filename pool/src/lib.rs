//! A pool of Teleport servers: map a function over a stream of inputs,
//! possibly endless, across many servers of the same functions.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use teleport_pool::Pool;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder()
//!     .local_workers(2)        // starts `teleport worker` twice, pins each
//!     .qsize(32)               // calls in flight per server
//!     .idempotent("echo")      // lost calls of echo go to another server
//!     .start()
//!     .await?;
//! let mut results = pool.map("echo", (0..1_000_000).map(|i| i as i64));
//! while let Some(y) = results.next().await {
//!     println!("{}", y?);
//! }
//! println!("{:?}", pool.run_on_all("info", ()).await);
//! # Ok(()) }
//! ```
//!
//! - Sources ([`PoolBuilder`]): servers by address, a name resolved again and
//!   again (a Kubernetes headless service), worker processes the pool starts
//!   on this machine or over `ssh://[user@]host[:port]/N`, and workers that
//!   dial the pool and are called over their own connection ([`worker`]:
//!   `--connect`). Every connection is TLS, pinned to the fingerprint each
//!   worker announces (or one given); a worker that dials in proves the
//!   pool's token instead.
//! - Scheduling: each server has up to `qsize` calls in flight; the next call
//!   goes to the server with the fewest outstanding; an input is read only
//!   when a slot is free.
//! - Faults: a server whose connection fails is taken out and retried with
//!   backoff; its calls in flight go to other servers if the method is
//!   idempotent, otherwise fail with [`PoolError::ServerLost`] naming it. A
//!   function's error keeps its type and message and names the server
//!   ([`PoolError::Remote`]). Servers that join later get work at once.
//! - [`MapStream::chunksize`] sends several inputs per call, stacked along a
//!   new axis and split back.
//! - [`BlockingPool`] serves programs without an async runtime.
//!
//! # How the crate is built
//!
//! `members`: the servers, their slots and leases, bringing lost ones back;
//! `pool`: one call and what to do when its server is lost; `map`: the map
//! stream; `sources`: worker processes, ssh, names, the endpoint workers dial;
//! `builder`: the settings; `worker`: the worker side's entry point.

mod blocking;
mod builder;
mod error;
mod map;
mod members;
mod pool;
mod sources;
pub mod worker;

pub use blocking::{BlockingMap, BlockingPool};
pub use builder::PoolBuilder;
pub use error::{PoolError, StartError};
pub use map::MapStream;
pub use pool::{Pool, Registration, ServerInfo};
