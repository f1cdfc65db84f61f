//! Servers that dial their client: a [`ServerListener`] takes the
//! connections of servers started elsewhere (`Server::dial` in
//! teleport-server; `teleport worker --connect`), and a client made from each
//! ([`Client::dialed_in`]) calls it like any other. Only the listening side
//! needs to be reachable: a server behind a firewall or NAT that lets it dial
//! out can still be called.
//!
//! QUIC roles and Teleport roles part here: the server is the QUIC client
//! (it checks this side's certificate, pinned), the client is the QUIC
//! server. Anyone can dial a listener, so a dialled-in server must prove
//! itself: its `Hello` carries the shared token
//! ([`ClientConfig::server_token`](teleport_protocol::client::ClientConfig::server_token)),
//! and this side sends its own `Hello` without any secret and no call before
//! that proof arrives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use teleport_protocol::Limits;
use teleport_quic::{
    Fingerprint, Identity, Incoming, Listener, ServerTls, ToAddress, TransportConfig,
    TransportError,
};

use crate::ClientBuilder;

/// Why a [`ServerListener`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address does not parse or resolve.
    #[error("cannot listen for servers: {0}")]
    Address(#[source] teleport_quic::AddressError),
    /// The socket could not be bound (the port is taken, the address is not
    /// this host's), or the identity cannot serve TLS.
    #[error("cannot listen for servers at {addr}: {error}")]
    Bind {
        /// The address as given.
        addr: String,
        /// What the transport said.
        error: TransportError,
    },
}

/// Accepts the connections of servers that dial this side (`Server::dial`
/// in teleport-server); make a client of each with
/// [`Client::dialed_in`](crate::Client::dialed_in). Only this side must be
/// reachable. Anyone can dial it: a dialled-in server proves itself with the
/// shared token in its `Hello` before any call, or any secret, goes to it.
#[derive(Debug)]
pub struct ServerListener {
    listener: Listener,
    fingerprint: Fingerprint,
}

impl ServerListener {
    /// Listens at `addr` (port 0 picks a free port) with `identity`, whose
    /// fingerprint the servers pin. Must be called inside a tokio runtime.
    pub async fn bind(
        addr: impl ToAddress,
        identity: Identity,
        transport: &TransportConfig,
    ) -> Result<ServerListener, ListenError> {
        let address = addr.to_address().map_err(ListenError::Address)?;
        let text = address.to_string();
        let addrs = address
            .resolve_for_server()
            .await
            .map_err(ListenError::Address)?;
        let fingerprint = identity.fingerprint();
        let tls = ServerTls::new(identity);
        let listener = Listener::bind_first(&addrs, &tls, transport, &Limits::default())
            .map_err(|error| ListenError::Bind { addr: text, error })?;
        Ok(ServerListener {
            listener,
            fingerprint,
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The fingerprint of this side's certificate, for servers to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The next server that dialled in (its first packet; the handshake
    /// completes when a client made from it connects). `None` once closed.
    pub async fn accept(&self) -> Option<DialedServer> {
        let incoming = self.listener.accept().await?;
        Some(DialedServer {
            remote_addr: incoming.remote_addr(),
            incoming: Arc::new(Mutex::new(Some(incoming))),
        })
    }

    /// Stops accepting and closes every connection made through it (their
    /// clients' calls fail). Await [`wait_idle`](Self::wait_idle) after, or
    /// keep the listener until then, so the servers are told.
    pub fn close(&self) {
        self.listener
            .close(teleport_quic::CloseCode::Normal, "the listener was closed");
    }

    /// Waits until every connection made through the listener is fully
    /// closed (its server was told).
    pub async fn wait_idle(&self) {
        self.listener.wait_idle().await;
    }
}

/// A server that dialled a [`ServerListener`]: make a client of it with
/// [`Client::dialed_in`](crate::Client::dialed_in), or refuse it.
#[derive(Debug)]
pub struct DialedServer {
    remote_addr: SocketAddr,
    incoming: Arc<Mutex<Option<Incoming>>>,
}

impl DialedServer {
    /// Where it dialled from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// Turns it away at once, without a handshake.
    pub fn refuse(self) {
        if let Some(incoming) = take(&self.incoming) {
            incoming.refuse();
        }
    }

    pub(crate) fn into_builder(self, server_token: String) -> ClientBuilder {
        ClientBuilder::dialed_in(self.remote_addr, DialedIn(self.incoming), server_token)
    }
}

/// The one connection attempt a dialled-in client may use: its first
/// connection takes it, and there is none after (the server must dial again).
#[derive(Clone, Debug)]
pub(crate) struct DialedIn(Arc<Mutex<Option<Incoming>>>);

impl DialedIn {
    pub(crate) fn take(&self) -> Option<Incoming> {
        take(&self.0)
    }
}

fn take(slot: &Mutex<Option<Incoming>>) -> Option<Incoming> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}
