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
//! calls pending on the lost connection fail (they may or may not have run)
//! unless they were marked idempotent ([`CallOptions::idempotent`],
//! [`ClientBuilder::resend_lost_calls`]), in which case they are sent again.
//! [`ClientBuilder::connect_lazy`] waits for a server that is not up yet.
//!
//! Each call travels on a QUIC stream of its own, so a large call or reply
//! delays no other. A [`ClientProtocol`](teleport_protocol::client::ClientProtocol)
//! makes every decision about deadlines, pings and failures; this crate drives
//! it with tokio and the transport.

mod blocking;
mod client;

pub use blocking::BlockingClient;
pub use client::{CallOptions, Client, ClientBuilder, Error, PendingCall};
pub use teleport_protocol::client::CallError;
pub use teleport_protocol::{ErrorKind, RemoteError};
pub use teleport_quic::{ClientTls, Fingerprint, Identity, TransportConfig};
