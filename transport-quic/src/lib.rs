//! The QUIC transport of Teleport, on quinn and rustls.
//!
//! This is the only crate that knows quinn. It gives the server and the client
//! a small interface:
//!
//! - [`Listener`] and [`Connector`] make [`Connection`]s, always over TLS 1.3
//!   with the ALPN id [`ALPN`];
//! - a connection opens and accepts bidirectional streams, each a
//!   [`SendStream`] that writes [`Message`](teleport_protocol::Message)s as
//!   gather lists (array bytes are not copied) and a [`RecvStream`] that decodes
//!   them into 64-byte-aligned memory;
//! - [`Identity`], [`Fingerprint`], [`ClientTls`], [`ServerTls`] and
//!   [`ClientAuth`] say who each side is and whom it trusts;
//! - [`TransportConfig`] holds the windows and timers;
//! - [`Address`] parses addresses as people write them (`4433`,
//!   `"host:4433"`, `"quic://[::1]:4433"`) and resolves them.
//!
//! [`reference`](mod@reference) is bare quinn with the same settings, for benchmarks only.
//!
//! One stream per call is what keeps a large reply from delaying a small one:
//! QUIC streams are flow controlled and delivered independently.

pub mod address;
mod config;
pub mod driver;
mod endpoint;
mod error;
mod memory;
mod recycle;
pub mod reference;
mod socket;
mod stream;
mod tls;

pub use address::{Address, AddressError, Host, ToAddress};
pub use config::{CongestionControl, TransportConfig};
pub use endpoint::{
    quinn_client_config, quinn_endpoint_config, quinn_server_config, Connecting, Connection,
    Connector, Handshake, Incoming, Listener, Traffic,
};
pub use error::TransportError;
pub use memory::MemoryBudget;
pub use socket::{SocketBuffers, SOCKET_BUFFER};
pub use stream::{Outgoing, Progress, RecvStream, SendStream};
pub use teleport_protocol::{CloseCode, StreamCode};
pub use tls::{
    ClientAuth, ClientTls, Fingerprint, Identity, ParseFingerprintError, ServerTls, ALPN,
};
