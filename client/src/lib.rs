//! The Teleport client: call functions bound on a server with array trees and
//! get futures of the results.
//!
//! ```no_run
//! use teleport_client::Client;
//! use teleport_protocol::{tree, Array};
//!
//! # async fn run(fingerprint: teleport_client::Fingerprint) -> Result<(), teleport_client::Error> {
//! let client = Client::builder("127.0.0.1:4433")
//!     .pin(fingerprint)
//!     .connect()
//!     .await?;
//! let obs = Array::from_vec([2, 3], vec![0.5f32; 6]).unwrap();
//! // Calls start at once; await them in any order.
//! let a = client.call("act", tree!({"obs": (obs.clone())}));
//! let b = client.call("act", tree!({"obs": (obs)}));
//! let (a, b) = (a.await?, b.await?);
//! # Ok(()) }
//! ```
//!
//! After losing the server the client reconnects for new calls, with backoff;
//! calls in flight on the lost connection fail (they may or may not have run)
//! unless they were marked idempotent ([`CallOptions::idempotent`],
//! [`ClientBuilder::resend_lost_calls`]), in which case they are sent again.
//! [`ClientBuilder::connect_lazy`] waits for a server that is not up yet.
//!
//! Each call travels on a QUIC stream of its own, so a large call or reply
//! delays no other. A [`ClientProtocol`](teleport_protocol::client::ClientProtocol)
//! makes every decision (the order calls go out in, deadlines wherever a call
//! waits, pings and dead servers, connecting, reconnecting and re-sending);
//! this crate drives it with tokio and the transport.
//!
//! # How the crate is built
//!
//! - `builder`: the settings; `client`: the handle calls are made on;
//!   `pending`: the future of one call; `blocking`: the client for code
//!   without a runtime.
//! - `driver`: the state machine behind one lock, the connections it asks
//!   for, and the outputs it emits; `call_io`: carrying one call over its
//!   stream. Small calls are written from the caller's task and their replies
//!   read by the caller's future: no task per call.

mod blocking;
mod builder;
mod call_io;
mod client;
mod dialed;
mod driver;
mod error;
mod pending;
mod stats;

pub use blocking::BlockingClient;
pub use builder::ClientBuilder;
pub use client::Client;
pub use dialed::{DialedServer, ListenError, ServerListener};
pub use error::Error;
pub use pending::PendingCall;
pub use stats::ClientStats;
pub use teleport_protocol::client::{CallError, CallOptions, ConnectError};
pub use teleport_protocol::{ErrorKind, RemoteError};
pub use teleport_quic::{
    Address, AddressError, ClientTls, Fingerprint, Host, Identity, ToAddress, TransportConfig,
};
