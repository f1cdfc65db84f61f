//! A fault-injecting datagram layer for Teleport's tests and benchmarks.
//!
//! The kernel of the machines this project runs on has no `netem`, and tests
//! must not need root, so bad networks are made in user space: a [`Relay`]
//! listens on a loopback port, forwards UDP datagrams to an upstream address
//! and back, and on the way loses, delays, jitters, reorders, duplicates and
//! rate-limits them through a bounded drop-tail queue, each direction as its
//! [`LinkConfig`] says. Decisions come from a seeded generator, so a failing
//! run can be replayed; [`RelayStats`] counts what was done.
//!
//! ```no_run
//! # async fn example(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use teleport_netsim::{LinkConfig, Relay};
//!
//! // 10 MB/s, 256 KiB queue, 40 ms round trip, 1% loss each way.
//! let link = LinkConfig::default()
//!     .with_rate(10_000_000, 256 << 10)
//!     .with_delay(Duration::from_millis(20))
//!     .with_loss(0.01);
//! let relay = Relay::start(server, link.clone(), link, 1)?;
//! // ... connect to relay.addr() instead of server ...
//! relay.set(LinkConfig::cut(), LinkConfig::cut()); // the peer goes dark
//! println!("{:?}", relay.stats());
//! # Ok(()) }
//! ```
//!
//! The crate knows nothing of QUIC: it moves datagrams. Tests of quinn
//! through it live in `teleport-quic`.

mod link;
mod relay;

pub use link::{DropReason, Link, LinkConfig, LinkStats, Verdict};
pub use relay::{Relay, RelayStats};
