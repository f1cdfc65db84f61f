//! Listening for and making connections.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use teleport_protocol::Limits;

use crate::{
    ClientTls, Fingerprint, RecvStream, SendStream, ServerTls, TransportConfig, TransportError,
};

/// Application codes for closing a whole connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// Finished normally.
    Normal,
    /// The peer broke the protocol.
    ProtocolError,
    /// The peer failed authentication.
    Unauthenticated,
    /// The side is shutting down.
    ShuttingDown,
}

impl CloseCode {
    /// The code on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::ProtocolError => 1,
            CloseCode::Unauthenticated => 2,
            CloseCode::ShuttingDown => 3,
        }
    }
}

/// Builds quinn's server configuration (also for benchmarks against bare quinn).
pub fn quinn_server_config(
    tls: &ServerTls,
    transport: &TransportConfig,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(tls.rustls_config()?)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport.to_quinn());
    Ok(config)
}

/// Builds quinn's client configuration (also for benchmarks against bare quinn).
pub fn quinn_client_config(
    tls: &ClientTls,
    transport: &TransportConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = QuicClientConfig::try_from(tls.rustls_config()?)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport.to_quinn());
    Ok(config)
}

pub(crate) fn bind(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|error| TransportError::Bind { addr, error })?;
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
        addr,
        error: std::io::Error::other("no async runtime: call this inside a tokio runtime"),
    })?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
        .map_err(|error| TransportError::Bind { addr, error })
}

/// A server's endpoint: accepts connections on one UDP socket.
#[derive(Clone, Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    limits: Limits,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port). Must be called inside a tokio
    /// runtime. Messages received are checked against `limits`.
    pub fn bind(
        addr: SocketAddr,
        tls: &ServerTls,
        transport: &TransportConfig,
        limits: Limits,
    ) -> Result<Listener, TransportError> {
        let config = quinn_server_config(tls, transport)?;
        Ok(Listener {
            endpoint: bind(addr, Some(config))?,
            limits,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound UDP socket has an address")
    }

    /// Waits for the next connection and completes its handshake. `None` once
    /// the listener is closed. A handshake that fails (untrusted client
    /// certificate, wrong ALPN) is returned as an error; keep accepting.
    pub async fn accept(&self) -> Option<Result<Connection, TransportError>> {
        let incoming = self.endpoint.accept().await?;
        let limits = self.limits.clone();
        Some(
            async move {
                let connection = incoming.await?;
                Ok(Connection::new(connection, limits))
            }
            .await,
        )
    }

    /// Stops accepting and closes every connection with `code`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.endpoint.close(code.to_u32().into(), reason.as_bytes());
    }

    /// Waits until every connection is fully closed (so the peers were told).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// A client's endpoint: makes connections to servers.
#[derive(Debug)]
pub struct Connector {
    client_config: quinn::ClientConfig,
    limits: Limits,
    /// One endpoint per address family, made on first use.
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
}

impl Connector {
    /// A connector trusting servers as `tls` says. Messages received are
    /// checked against `limits`.
    pub fn new(
        tls: &ClientTls,
        transport: &TransportConfig,
        limits: Limits,
    ) -> Result<Connector, TransportError> {
        Ok(Connector {
            client_config: quinn_client_config(tls, transport)?,
            limits,
            v4: Mutex::new(None),
            v6: Mutex::new(None),
        })
    }

    fn endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
        let (slot, local): (_, SocketAddr) = if addr.is_ipv4() {
            (&self.v4, (Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&self.v6, (Ipv6Addr::UNSPECIFIED, 0).into())
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = slot.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint = bind(local, None)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Connects to `addr` and completes the TLS handshake. `server_name` is the
    /// name checked against the certificate when trusting CA roots.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, TransportError> {
        let endpoint = self.endpoint_for(addr)?;
        let connecting = endpoint
            .connect_with(self.client_config.clone(), addr, server_name)
            .map_err(|e| TransportError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let connection = connecting.await?;
        Ok(Connection::new(connection, self.limits.clone()))
    }
}

/// A QUIC connection: opens and accepts the streams calls travel on.
#[derive(Clone, Debug)]
pub struct Connection {
    inner: quinn::Connection,
    limits: Limits,
}

impl Connection {
    fn new(inner: quinn::Connection, limits: Limits) -> Connection {
        Connection { inner, limits }
    }

    /// Opens a new stream in both directions. Waits while the peer's limit on
    /// concurrent streams is reached.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok((
            SendStream::new(send),
            RecvStream::new(recv, self.limits.clone()),
        ))
    }

    /// Opens a new stream if the peer's limit allows it now, without waiting.
    pub fn try_open_stream(&self) -> Option<Result<(SendStream, RecvStream), TransportError>> {
        let opened = self.inner.open_bi().now_or_never()?;
        Some(match opened {
            Ok((send, recv)) => Ok((
                SendStream::new(send),
                RecvStream::new(recv, self.limits.clone()),
            )),
            Err(e) => Err(e.into()),
        })
    }

    /// Waits for the peer to open a stream. Fails once the connection is gone.
    pub async fn accept_stream(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.accept_bi().await?;
        Ok((
            SendStream::new(send),
            RecvStream::new(recv, self.limits.clone()),
        ))
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// The fingerprint of the certificate the peer presented, if any.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        let identity = self.inner.peer_identity()?;
        let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
        chain.first().map(|c| Fingerprint::of_der(c.as_ref()))
    }

    /// The current estimate of the round-trip time.
    pub fn rtt(&self) -> std::time::Duration {
        self.inner.rtt()
    }

    /// Closes the connection at once: streams are abandoned and the peer sees
    /// `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.inner.close(code.to_u32().into(), reason.as_bytes());
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> TransportError {
        self.inner.closed().await.into()
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<TransportError> {
        self.inner.close_reason().map(Into::into)
    }
}
