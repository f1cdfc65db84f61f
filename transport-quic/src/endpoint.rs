//! Listening for and making connections.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use teleport_protocol::{CloseCode, Limits};

use crate::memory::{LargeMessageMemory, MemoryBudget};
use crate::recycle::{KeptMemory, Recycler};
use crate::socket::{enlarge_buffers, ObservedSocket, Released, SocketBuffers, SOCKET_BUFFER};
use crate::{
    ClientTls, Fingerprint, RecvStream, SendStream, ServerTls, TransportConfig, TransportError,
};

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

/// Builds quinn's endpoint configuration: the largest UDP payload accepted
/// ([`TransportConfig::max_udp_payload`]). For benchmarks against bare quinn.
pub fn quinn_endpoint_config(transport: &TransportConfig) -> quinn::EndpointConfig {
    transport.endpoint_config()
}

pub(crate) fn bind(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    transport: &TransportConfig,
) -> Result<quinn::Endpoint, TransportError> {
    bind_observed(addr, server, transport).map(|(endpoint, _, _)| endpoint)
}

/// [`bind`], with the signal of the socket's release and the socket's buffers.
pub(crate) fn bind_observed(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    transport: &TransportConfig,
) -> Result<(quinn::Endpoint, Released, SocketBuffers), TransportError> {
    let bind_error = |error| TransportError::Bind { addr, error };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
    let buffers = enlarge_buffers(&socket, SOCKET_BUFFER);
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
        addr,
        error: std::io::Error::other("no async runtime: call this inside a tokio runtime"),
    })?;
    let (socket, released) =
        ObservedSocket::new(runtime.wrap_udp_socket(socket).map_err(bind_error)?);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        transport.endpoint_config(),
        server,
        socket,
        runtime,
    )
    .map_err(bind_error)?;
    Ok((endpoint, released, buffers))
}

/// Whether `addr` is on this host (an IPv4-mapped IPv6 address counts as
/// its IPv4 address).
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The settings for peers on this host, where they differ from `transport`.
fn loopback_transport(transport: &TransportConfig) -> Option<TransportConfig> {
    let loopback = transport.for_peer(Ipv4Addr::LOCALHOST.into());
    (loopback != *transport).then_some(loopback)
}

/// Bytes a connection moved, as [`Connection::traffic`] reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// Packets this side sent that QUIC declared lost (and so retransmitted
    /// what they carried): on a clean path, 0.
    pub packets_lost: u64,
    /// Times the congestion controller cut its window for a loss or a
    /// congestion mark: each one slows the sender for a while.
    pub congestion_events: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.packets_lost += other.packets_lost;
        self.congestion_events += other.congestion_events;
    }
}

/// A server's endpoint: accepts connections on one UDP socket.
#[derive(Clone, Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    /// The server configuration for peers on this host, where its packet
    /// size differs ([`TransportConfig::for_peer`]).
    loopback: Option<Arc<quinn::ServerConfig>>,
    limits: Limits,
    per_connection: PerConnection,
    released: Arc<Mutex<Option<Released>>>,
    buffers: SocketBuffers,
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
        let loopback = loopback_transport(transport).map(|loopback| {
            let mut config = config.clone();
            config.transport_config(loopback.to_quinn());
            Arc::new(config)
        });
        let (endpoint, released, buffers) = bind_observed(addr, Some(config), transport)?;
        Ok(Listener {
            endpoint,
            loopback,
            limits,
            per_connection: PerConnection::of(transport),
            released: Arc::new(Mutex::new(Some(released))),
            buffers,
        })
    }

    /// Binds the first of `addrs` that can be bound (a name may resolve to
    /// an IPv6 and an IPv4 address, and only one may be available), or fails
    /// with the first address's error.
    pub fn bind_first(
        addrs: &[SocketAddr],
        tls: &ServerTls,
        transport: &TransportConfig,
        limits: &Limits,
    ) -> Result<Listener, TransportError> {
        let mut first_error = None;
        for &addr in addrs {
            match Listener::bind(addr, tls, transport, limits.clone()) {
                Ok(listener) => return Ok(listener),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| TransportError::Bind {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind"),
        }))
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound UDP socket has an address")
    }

    /// The kernel buffers of the listening socket, as granted at bind time
    /// (see [`SocketBuffers`]; a warning is logged when the kernel capped them).
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Waits for the next connection attempt (its first packet). `None` once
    /// the listener is closed. Nothing waits for the handshake here: accept
    /// (or refuse) each [`Incoming`] in a task of its own, so that a client
    /// whose handshake stalls delays nobody else.
    pub async fn accept(&self) -> Option<Incoming> {
        let incoming = self.endpoint.accept().await?;
        Some(Incoming {
            inner: incoming,
            loopback: self.loopback.clone(),
            limits: self.limits.clone(),
            per_connection: self.per_connection.clone(),
        })
    }

    /// Stops accepting and closes every connection with `code`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.endpoint.close(close_code(code), reason.as_bytes());
    }

    /// Waits until every connection is fully closed (so the peers were told).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    /// Drops this handle and waits until the UDP socket is closed, so its port
    /// can be bound again. Completes once every other handle (clones of this
    /// listener, connections from it) is gone too; the first caller gets the
    /// wait, later ones return at once.
    pub async fn release(self) {
        let released = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(self);
        if let Some(released) = released {
            released.wait().await;
        }
    }
}

/// A connection attempt that reached a [`Listener`]: accept it (and await
/// the handshake) or refuse it.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    loopback: Option<Arc<quinn::ServerConfig>>,
    limits: Limits,
    per_connection: PerConnection,
}

impl Incoming {
    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Accepts the attempt; the handshake proceeds as the returned
    /// [`Connecting`] is awaited.
    pub fn accept(self) -> Result<Connecting, TransportError> {
        let connecting = match self.loopback {
            Some(config) if is_loopback(self.inner.remote_address()) => {
                self.inner.accept_with(config)?
            }
            _ => self.inner.accept()?,
        };
        Ok(Connecting {
            inner: connecting,
            limits: self.limits,
            per_connection: self.per_connection.clone(),
        })
    }

    /// Refuses the attempt: the peer is told at once (a QUIC
    /// `CONNECTION_REFUSED`), without the cost of a handshake.
    pub fn refuse(self) {
        self.inner.refuse();
    }
}

/// A server-side handshake in progress. Await it for the [`Connection`];
/// dropping it abandons the handshake.
#[derive(Debug)]
pub struct Connecting {
    inner: quinn::Connecting,
    limits: Limits,
    per_connection: PerConnection,
}

impl Connecting {
    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }
}

impl IntoFuture for Connecting {
    type Output = Result<Connection, TransportError>;
    type IntoFuture = Handshake;

    fn into_future(self) -> Handshake {
        Handshake {
            inner: self.inner,
            limits: Some(self.limits),
            per_connection: self.per_connection.clone(),
        }
    }
}

/// The future of a [`Connecting`].
#[derive(Debug)]
pub struct Handshake {
    inner: quinn::Connecting,
    limits: Option<Limits>,
    per_connection: PerConnection,
}

impl Future for Handshake {
    type Output = Result<Connection, TransportError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let connection = std::task::ready!(Pin::new(&mut self.inner).poll(cx))?;
        let limits = self.limits.take().unwrap_or_default();
        Poll::Ready(Ok(Connection::new(
            connection,
            limits,
            &self.per_connection,
        )))
    }
}

/// A client's endpoint: makes connections to servers.
#[derive(Debug)]
pub struct Connector {
    client_config: quinn::ClientConfig,
    /// The configuration for servers on this host, where its packet size
    /// differs ([`TransportConfig::for_peer`]).
    loopback_config: Option<quinn::ClientConfig>,
    /// For the endpoints: their largest UDP payload and batch size.
    transport: TransportConfig,
    limits: Limits,
    per_connection: PerConnection,
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
        let loopback_config = match loopback_transport(transport) {
            Some(loopback) => Some(quinn_client_config(tls, &loopback)?),
            None => None,
        };
        Ok(Connector {
            client_config: quinn_client_config(tls, transport)?,
            loopback_config,
            transport: transport.clone(),
            limits,
            per_connection: PerConnection::of(transport),
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
        let endpoint = bind(local, None, &self.transport)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Waits until every connection made through this connector is fully
    /// closed (so its peer was told), as [`Listener::wait_idle`] does.
    pub async fn wait_idle(&self) {
        let endpoints: Vec<quinn::Endpoint> = [&self.v4, &self.v6]
            .into_iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        for endpoint in endpoints {
            endpoint.wait_idle().await;
        }
    }

    /// Connects to `addr` and completes the TLS handshake. `server_name` is the
    /// name checked against the certificate when trusting CA roots.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, TransportError> {
        let endpoint = self.endpoint_for(addr)?;
        let config = match &self.loopback_config {
            Some(config) if is_loopback(addr) => config,
            _ => &self.client_config,
        };
        let connecting = endpoint
            .connect_with(config.clone(), addr, server_name)
            .map_err(|e| TransportError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let connection = connecting.await?;
        Ok(Connection::new(
            connection,
            self.limits.clone(),
            &self.per_connection,
        ))
    }
}

/// A QUIC connection: opens and accepts the streams calls travel on.
#[derive(Clone, Debug)]
pub struct Connection {
    inner: quinn::Connection,
    limits: Limits,
    windows: Windows,
    memory: Option<Arc<MemoryBudget>>,
    /// With a memory budget: the flow-control credit of calls waiting for it.
    credit: Option<Arc<WaitingCredit>>,
    /// Large receive mappings kept for this connection's next messages.
    recycler: Arc<Recycler>,
    /// Where streams without a budget receive large data sections: one for
    /// the connection, not one per stream.
    unbudgeted: Arc<LargeMessageMemory>,
}

/// What every connection of an endpoint starts from: its windows, and the
/// bound on the receive memory connections keep for reuse.
#[derive(Clone, Debug)]
struct PerConnection {
    windows: Windows,
    /// Shared by every connection of the process.
    kept: Arc<KeptMemory>,
    recycled_receive_memory: usize,
}

impl PerConnection {
    fn of(transport: &TransportConfig) -> PerConnection {
        PerConnection {
            windows: Windows::of(transport),
            kept: KeptMemory::process(),
            recycled_receive_memory: transport.recycled_receive_memory,
        }
    }
}

/// A connection's flow-control windows, as configured.
#[derive(Clone, Copy, Debug)]
struct Windows {
    connection: u64,
    stream: u64,
}

impl Windows {
    fn of(transport: &TransportConfig) -> Windows {
        Windows {
            connection: transport.receive_window,
            stream: transport.stream_receive_window,
        }
    }
}

impl Connection {
    fn new(inner: quinn::Connection, limits: Limits, settings: &PerConnection) -> Connection {
        let recycler = Recycler::new(settings.kept.clone(), settings.recycled_receive_memory);
        Connection {
            inner,
            limits,
            windows: settings.windows,
            memory: None,
            credit: None,
            recycler: recycler.clone(),
            unbudgeted: Arc::new(LargeMessageMemory::new(Some(recycler))),
        }
    }

    /// Checks messages received from now on against `limits` instead of the
    /// endpoint's (a connection accepted for a client, whose limits are its
    /// own).
    pub fn with_limits(mut self, limits: Limits) -> Connection {
        self.limits = limits;
        self
    }

    /// Charges the data sections received on streams accepted or opened
    /// from now on to `budget`: their memory is reserved as their bytes
    /// arrive, a stream whose next bytes do not fit waits (and so does its
    /// sender, through flow control), and a message larger than the budget
    /// fails at its header with [`TransportError::MemoryBudget`].
    ///
    /// A stream waiting for memory is not read, but its sender may still fill
    /// its stream's window (up to `stream_receive_window`), and that unread
    /// data counts against the connection's window: a few waiting calls
    /// could take all of it and starve the very call the budget lets
    /// through. So while calls wait, the connection's window grows by one
    /// stream window per waiting call, up to the budget's size; that data
    /// waits in the transport's buffers.
    pub fn with_memory_budget(mut self, budget: Arc<MemoryBudget>) -> Connection {
        self.credit = Some(Arc::new(WaitingCredit {
            connection: self.inner.clone(),
            windows: self.windows,
            most: budget.limit() as u64,
            waiting: Mutex::new(0),
        }));
        self.memory = Some(budget);
        self
    }

    fn recv_stream(&self, recv: quinn::RecvStream) -> RecvStream {
        RecvStream::new(
            recv,
            self.limits.clone(),
            self.memory.as_ref(),
            self.credit.clone(),
            &self.recycler,
            &self.unbudgeted,
        )
    }

    /// Opens a new stream in both directions. Waits while the peer's limit on
    /// concurrent streams is reached.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok((SendStream::new(send), self.recv_stream(recv)))
    }

    /// Opens a new stream if the peer's limit allows it now, without waiting.
    pub fn try_open_stream(&self) -> Option<Result<(SendStream, RecvStream), TransportError>> {
        let opened = self.inner.open_bi().now_or_never()?;
        Some(match opened {
            Ok((send, recv)) => Ok((SendStream::new(send), self.recv_stream(recv))),
            Err(e) => Err(e.into()),
        })
    }

    /// Waits for the peer to open a stream. Fails once the connection is gone.
    pub async fn accept_stream(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.accept_bi().await?;
        Ok((SendStream::new(send), self.recv_stream(recv)))
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

    /// The largest UDP payload this side currently sends on the path, as MTU
    /// discovery found it so far (1,200 at the start).
    pub fn path_mtu(&self) -> u16 {
        self.inner.stats().path.current_mtu
    }

    /// Bytes this connection sent and received so far, as UDP payload (QUIC
    /// headers, retransmissions and acknowledgements included), and the
    /// packets it lost.
    pub fn traffic(&self) -> Traffic {
        let stats = self.inner.stats();
        Traffic {
            bytes_sent: stats.udp_tx.bytes,
            bytes_received: stats.udp_rx.bytes,
            packets_lost: stats.path.lost_packets,
            congestion_events: stats.path.congestion_events,
        }
    }

    /// Closes the connection at once: streams are abandoned and the peer sees
    /// `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.inner.close(close_code(code), reason.as_bytes());
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

fn close_code(code: CloseCode) -> quinn::VarInt {
    quinn::VarInt::from_u64(code.code()).unwrap_or(quinn::VarInt::MAX)
}

/// The extra flow-control credit of a connection's calls waiting for
/// receive memory (see [`Connection::with_memory_budget`]).
#[derive(Debug)]
pub(crate) struct WaitingCredit {
    connection: quinn::Connection,
    windows: Windows,
    /// The most extra credit: the connection's memory budget.
    most: u64,
    waiting: Mutex<u64>,
}

impl WaitingCredit {
    /// One more call waits, until the guard is dropped.
    pub(crate) fn waiting(self: &Arc<Self>) -> WaitingGuard {
        self.change(1);
        WaitingGuard(self.clone())
    }

    fn change(&self, by: i64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        *waiting = waiting.saturating_add_signed(by);
        let extra = waiting.saturating_mul(self.windows.stream).min(self.most);
        let window = self.windows.connection.saturating_add(extra);
        self.connection
            .set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    }
}

/// A call waiting for receive memory; dropped when it stops waiting.
#[derive(Debug)]
pub(crate) struct WaitingGuard(Arc<WaitingCredit>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.change(-1);
    }
}
