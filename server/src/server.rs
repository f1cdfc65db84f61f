//! A running server: its address, its first failure, and its shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use teleport_protocol::{CloseCode, Limits};
use teleport_quic::{
    ClientTls, Connection, Connector, Fingerprint, Listener, ToAddress, Traffic, TransportConfig,
};
use tokio::task::JoinHandle;

use crate::shared::ServerShared;
use crate::{connection, HandlerFailure, ServerBuilder, ServerError, ServerStats};

/// A running server.
///
/// Dropping it stops it at once, like a shutdown with no grace period: running
/// calls are stopped, clients are told the server is shutting down (close code
/// 3; their pending calls fail with a connection error) and the port is
/// released once the socket's tasks end. To let running calls finish, call
/// [`shutdown`](Server::shutdown) first; to serve until the process ends,
/// keep the handle (for example, await [`wait`](Server::wait)).
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    fingerprint: Fingerprint,
    /// Taken at shutdown, so the socket (and the port) is released.
    listener: Mutex<Option<Listener>>,
    shared: Arc<ServerShared>,
    accept: Mutex<Option<JoinHandle<()>>>,
    /// The tasks of the batched functions, stopped once the calls have drained.
    batchers: Mutex<Vec<JoinHandle<()>>>,
    /// For [`dial`](Server::dial): the transport settings and limits of the
    /// listener, and the connections dialled with the connector each went
    /// out through (closed when the server is dropped, waited for at
    /// shutdown: the listener's close and release do not reach them).
    transport: TransportConfig,
    limits: Limits,
    dialed: Mutex<Vec<(Connection, Connector)>>,
}

impl Server {
    /// A builder with no functions bound, a self-signed certificate, no client
    /// authentication and the default limits.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    pub(crate) fn start(
        listener: Listener,
        fingerprint: Fingerprint,
        shared: Arc<ServerShared>,
        batchers: Vec<JoinHandle<()>>,
        (transport, limits): (TransportConfig, Limits),
    ) -> Server {
        let local_addr = listener.local_addr();
        let accept = tokio::spawn(accept_loop(listener.clone(), shared.clone()));
        tracing::info!(%local_addr, %fingerprint, "serving");
        Server {
            local_addr,
            fingerprint,
            listener: Mutex::new(Some(listener)),
            shared,
            accept: Mutex::new(Some(accept)),
            batchers: Mutex::new(batchers),
            transport,
            limits,
            dialed: Mutex::new(Vec::new()),
        }
    }

    /// Dials a client that listens for servers (`ServerListener` in
    /// teleport-client; a pool's `accept_workers`) and serves it over that
    /// connection as if it had connected here: only the client's side must
    /// be reachable, so a server behind a firewall or NAT that lets it dial
    /// out can be called. `tls` says how to trust the client's certificate
    /// (pin it: anyone can listen); `token` is the shared secret this server
    /// presents in its `Hello`, the client's proof that it is not talking to
    /// whoever dialled in. The client's own token is not required of it
    /// here: the certificate, checked before a byte of the protocol, is its
    /// proof. The connection counts toward
    /// [`max_connections`](crate::ServerBuilder::max_connections) and drains
    /// with the server at shutdown.
    pub async fn dial(
        &self,
        addr: impl ToAddress,
        tls: ClientTls,
        token: impl Into<String>,
    ) -> Result<DialedClient, ServerError> {
        let address = addr.to_address()?;
        let addrs = address.resolve_for_client().await?;
        // Admitted before the handshake, as a client that connects is.
        let Some(slot) = self.shared.admit_connection() else {
            return Err(ServerError::ConnectionLimit);
        };
        let connector = Connector::new(&tls, &self.transport, self.limits.clone())?;
        let server_name = address.host_name();
        let mut first_error = None;
        let mut connection = None;
        for addr in addrs {
            match connector.connect(addr, &server_name).await {
                Ok(made) => {
                    connection = Some(made);
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(connection) = connection else {
            return Err(first_error.map(ServerError::from).unwrap_or_else(|| {
                ServerError::Address(teleport_quic::AddressError::Unresolved {
                    name: address.to_string(),
                    reason: "it resolved to no address".to_owned(),
                })
            }));
        };
        let budgets = &self.shared.budgets;
        let connection = connection.with_memory_budget(
            budgets
                .memory
                .child("connection", budgets.connection_memory),
        );
        let mut config = self.shared.protocol.clone();
        config.token = None;
        config.present_token = Some(token.into());
        {
            let mut dialed = self.dialed.lock().unwrap_or_else(|p| p.into_inner());
            // Those that ended need no closing at drop.
            dialed.retain(|(c, _)| c.close_reason().is_none());
            dialed.push((connection.clone(), connector));
        }
        tracing::info!(peer = %connection.remote_addr(), "dialled a client; serving it");
        connection::spawn(
            connection::Start::Dialed(connection.clone()),
            slot,
            self.shared.clone(),
            config,
        );
        Ok(DialedClient { connection })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The SHA-256 fingerprint of the server's certificate, for clients to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The names of the bound functions, sorted.
    pub fn methods(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.functions.keys().cloned().collect();
        names.sort();
        names
    }

    /// The first error a bound function returned or panic it raised since the
    /// server started, if any. The caller got it too; this is for the
    /// application serving, which otherwise would not hear of it.
    pub fn check(&self) -> Result<(), HandlerFailure> {
        match self.shared.first_failure() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Calls running now, across connections.
    pub fn running(&self) -> usize {
        self.shared
            .protocol
            .capacity
            .as_ref()
            .map_or(0, |c| c.in_use())
    }

    /// What the server has done since it started: calls received, answered
    /// (by outcome) and stopped, calls running, connections, bytes in and
    /// out. `Display` prints it on one line.
    pub fn stats(&self) -> ServerStats {
        let mut traffic = Traffic::default();
        for conn in self.shared.connections() {
            traffic += conn.traffic();
        }
        let mut stats = self
            .shared
            .stats
            .snapshot(self.running(), self.connections(), traffic);
        stats.receive_memory = self.receive_memory();
        stats
    }

    /// Bytes of the server's receive memory budget reserved now: data
    /// sections arriving, and those received whose arrays are still held.
    pub fn receive_memory(&self) -> usize {
        self.shared.budgets.memory.reserved()
    }

    /// Connections currently open (handshakes in progress included).
    pub fn connections(&self) -> usize {
        self.shared.live_connections()
    }

    /// Waits until [`shutdown`](Self::shutdown) begins, from another task. A
    /// program that serves until it is killed awaits this.
    pub async fn wait(&self) {
        self.shared.shutdown_signal().await;
    }

    /// Stops gracefully: takes no new connections or calls (new calls get a
    /// `ShuttingDown` error), lets running calls finish and their replies go
    /// out for up to `grace`, then says goodbye to every client, gives each
    /// the server's close timeout (2 s by default) to read its replies and
    /// close, and releases the port. The clients it [dialled](Self::dial)
    /// are closed the same way, and their closes are sent before it returns.
    /// Calling it again does nothing more.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = self.shared.clock.now() + grace;
        self.shared.begin_shutdown(deadline);
        let accept = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(accept) = accept {
            let _ = accept.await;
        }
        // Each connection's state machine drains it and bounds how long that
        // takes; nothing here sets a time limit of its own.
        for conn in self.shared.connections() {
            conn.begin_shutdown(deadline);
        }
        self.shared.all_closed().await;
        // Calls still waiting for a batch have drained with their connections.
        for batcher in self
            .batchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            batcher.abort();
        }
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(listener) = listener {
            listener.close(CloseCode::ShuttingDown, "the server is shutting down");
            // Returns once the socket is closed: a server started on this port
            // right after `shutdown` returns can bind it.
            listener.release().await;
        }
        // The clients the server dialled were said goodbye to and closed
        // with the rest (closing again does nothing; it only matters for
        // one whose task ended without closing it, which would otherwise
        // keep its endpoint busy for ever); their closes are on the wire
        // once this returns, however soon the process exits after it.
        let dialed: Vec<_> = self
            .dialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for (connection, connector) in dialed {
            connection.close(CloseCode::ShuttingDown, "the server is shutting down");
            drop(connection);
            connector.wait_idle().await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // `None`: shut down already.
        let Some(listener) = listener else { return };
        let now = self.shared.clock.now();
        self.shared.begin_shutdown(now);
        if let Some(accept) = self
            .accept
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            accept.abort();
        }
        // No goodbye on each connection first: there is no time for it to
        // arrive, and a goodbye just sent with the close below at once often
        // kept the client from seeing the close at all (it then waited for
        // its idle timeout). The close ends every connection, and each
        // machine stops its calls as its connection is lost.
        for batcher in self
            .batchers
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            batcher.abort();
        }
        listener.close(CloseCode::ShuttingDown, "the server was dropped");
        for (connection, _) in self
            .dialed
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            connection.close(CloseCode::ShuttingDown, "the server was dropped");
        }
    }
}

/// A client the server dialled ([`Server::dial`]) and serves.
#[derive(Debug)]
pub struct DialedClient {
    connection: Connection,
}

impl DialedClient {
    /// The client's address.
    pub fn remote_addr(&self) -> std::net::SocketAddr {
        self.connection.remote_addr()
    }

    /// Waits until the connection ends, and says how.
    pub async fn closed(&self) -> DialedEnd {
        match self.connection.closed().await {
            e @ teleport_quic::TransportError::ClosedByPeer {
                code: CloseCode::Unauthenticated,
                ..
            } => DialedEnd::Refused(e.to_string()),
            e
            @ (teleport_quic::TransportError::TimedOut | teleport_quic::TransportError::Reset) => {
                DialedEnd::Lost(e.to_string())
            }
            e => DialedEnd::Closed(e.to_string()),
        }
    }
}

/// How the connection of a [`DialedClient`] ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialedEnd {
    /// The client refused this server: the token it presented is not the
    /// one the client requires.
    #[error("the client refused this server's token: {0}")]
    Refused(String),
    /// The client fell silent past the idle timeout, or forgot the
    /// connection (it restarted): the path or the client failed, not the
    /// client's wish. Dialling again may work.
    #[error("the connection to the client was lost: {0}")]
    Lost(String),
    /// The client closed it, or this server did (it shut down).
    #[error("{0}")]
    Closed(String),
}

/// Takes connection attempts until shutdown begins; each is served in a task
/// of its own.
async fn accept_loop(listener: Listener, shared: Arc<ServerShared>) {
    let shutdown = shared.shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = listener.accept() => incoming,
            _ = &mut shutdown => return,
        };
        let Some(incoming) = incoming else { return };
        match shared.admit_connection() {
            Some(slot) => connection::spawn(
                connection::Start::Incoming(Box::new(incoming)),
                slot,
                shared.clone(),
                shared.protocol.clone(),
            ),
            None => {
                shared.stats.connection_refused();
                tracing::info!(
                    peer = %incoming.remote_addr(),
                    max_connections = shared.budgets.max_connections,
                    max_unauthenticated = shared.budgets.max_unauthenticated,
                    "a connection attempt was refused: the server is at its connection limit"
                );
                incoming.refuse();
            }
        }
    }
}
