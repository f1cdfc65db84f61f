//! Named peers (moolib's `Rpc`): every process a server and a client at
//! once, calling the others by name and finding them through the peers it is
//! connected to.
//!
//! ```no_run
//! use std::time::Duration;
//! use teleport_peer::Peer;
//! use teleport_protocol::{tree, Tree};
//!
//! # async fn run() -> Result<(), teleport_peer::PeerError> {
//! // The learner serves "update"; an actor connects to it and calls it by name.
//! let learner = Peer::builder()
//!     .name("learner")
//!     .define("update", |args: Tree| async move { Ok(tree!({"version": 1})) })
//!     .listen("127.0.0.1:0")
//!     .await?;
//! let actor = Peer::builder()
//!     .name("actor-0")
//!     .trust("learner", learner.fingerprint()) // or accept_any()
//!     .timeout(Duration::from_secs(5))
//!     .listen("127.0.0.1:0")
//!     .await?;
//! actor.connect(learner.local_addr().unwrap()).await?;
//! let reply = actor.call("learner", "update", tree!({"steps": 100})).await?;
//! # let _ = reply;
//! # Ok(()) }
//! ```
//!
//! # What moolib's methods are here
//!
//! | moolib | here |
//! | --- | --- |
//! | `Rpc()`, `set_name`, `get_name` | [`Peer::builder`], [`PeerBuilder::name`], [`Peer::name`] |
//! | `define`, `define_deferred`, `define_queue` | [`PeerBuilder::define`] with a closure, [`Function::deferred`](teleport_server::Function::deferred), [`Function::queue`](teleport_server::Function::queue) (or [`PeerBuilder::define_queue`]) |
//! | `listen`, `connect` | [`PeerBuilder::listen`], [`Peer::connect`] |
//! | `async_`, `sync`, `async_callback` | [`Peer::call`], [`Peer::call_blocking`], [`Peer::call_with_callback`] |
//! | `set_timeout` | [`PeerBuilder::timeout`], [`Peer::set_timeout`] |
//!
//! # How it works
//!
//! A peer is a teleport server (the functions it defines, and three reserved
//! ones, `_peer.hello`, `_peer.lookup` and `_peer.refuse`) and, for each peer
//! it calls, a teleport client pinned to that peer's certificate. A
//! connection begins with a greeting: the connecting peer calls
//! `_peer.hello` with its name, certificate fingerprint and the addresses it
//! listens on, and gets the same back. Calling a name this peer has no
//! connection to asks the peers it knows (`_peer.lookup`, a few at a time,
//! in rounds with backoff, within the call's timeout); one that knows the
//! name answers with its fingerprint and addresses, and this peer connects
//! there directly. `docs/peers.md` in the repository describes the messages.
//!
//! Calls travel on this peer's own connection to the callee, so a peer that
//! does not listen can call others but cannot be called.
//!
//! # Trust
//!
//! Every connection is TLS 1.3, and every lasting connection is pinned to one
//! certificate. Which certificate a name is trusted with:
//!
//! - a name pinned with [`PeerBuilder::trust`]: only that one, whoever says
//!   otherwise;
//! - connecting to an address ([`Peer::connect`]): the pinned certificate
//!   of the name that answers; an unpinned name only with
//!   [`PeerBuilder::accept_any`] (trust on first use), never by default;
//! - a peer that greets this one (it connected here; the server's token
//!   applies, and its TLS handshake must present a client certificate):
//!   the certificate it presented, which must be the one its greeting
//!   names ([`Context::peer_fingerprint`]). Calls to it are pinned to that
//!   certificate too;
//! - a peer found by discovery: the certificate the peer that answered
//!   knows it by (trust on introduction: a cohort trusts its members'
//!   introductions).
//!
//! Names are unique among the peers each peer knows (there is no
//! cohort-wide registry): a greeting under a name this peer knows with
//! another certificate is refused ([`PeerError::NameClash`], on both
//! sides) while the holder of the name still answers; once the holder is
//! gone (its connection lost and not back within the
//! [liveness timeout](PeerBuilder::liveness_timeout), or it does not answer
//! when asked), a new certificate may take the name: that is how a
//! restarted peer is found again.
//!
//! Everything another peer can make this one hold is bounded (the number
//! of peers known, [`PeerBuilder::max_peers`]; one name per connection;
//! liveness probes; questions passed on); `docs/peers.md` lists the bounds
//! and what a hostile peer can and cannot do.

mod builder;
mod calls;
mod connect;
mod directory;
mod discovery;
mod error;
mod greeting;
mod incoming;
mod inner;
mod link;
mod peer;

pub use builder::{
    PeerBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS_TIMEOUT, DEFAULT_MAX_PEERS,
    DEFAULT_TIMEOUT,
};
pub use error::{PeerError, Refusal, RefusalKind};
pub use greeting::{HELLO, LOOKUP, REFUSE, RESERVED_PREFIX};
pub use peer::{KnownPeer, Peer, PeerCall};
pub use teleport_quic::{ClientAuth, Fingerprint, Identity};
pub use teleport_server::{CallQueue, Context, Function, HandlerError, QueuedCall, Responder};
