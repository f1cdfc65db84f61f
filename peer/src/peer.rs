//! The peer's handle: its public API, and calls in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use teleport_protocol::Tree;
use teleport_quic::{Fingerprint, ToAddress};
use teleport_server::Server;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::{PeerError, Refusal};
use crate::inner::{deadline_in, lock, Inner};
use crate::link::LinkState;
use crate::PeerBuilder;

/// A peer: a server of the functions it defines and a client of the peers it
/// knows, which it calls by name. Cheap to clone; the peer stops when the
/// last clone is dropped (or at [`shutdown`](Peer::shutdown)).
///
/// See the [crate documentation](crate) for an example, the greeting,
/// discovery, and how peers are trusted.
#[derive(Clone, Debug)]
pub struct Peer {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

/// Dropped with the last `Peer` clone: closes the links and the server.
#[derive(Debug)]
struct Guard {
    inner: Arc<Inner>,
    server: Option<Server>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.close();
        // The server is dropped after this: it stops at once.
    }
}

/// What a peer knows about another (see [`Peer::peers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownPeer {
    /// Its name.
    pub name: String,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
    /// Whether this peer has a working connection to it now.
    pub connected: bool,
}

impl Peer {
    /// A builder: a random name, no functions, a self-signed certificate.
    pub fn builder() -> PeerBuilder {
        PeerBuilder::new()
    }

    pub(crate) fn new(inner: Arc<Inner>, server: Option<Server>) -> Peer {
        Peer {
            guard: Arc::new(Guard {
                inner: inner.clone(),
                server,
            }),
            inner,
        }
    }

    /// This peer's name, unique in its cohort.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The SHA-256 fingerprint of this peer's certificate: what other peers
    /// pin its name to ([`PeerBuilder::trust`]).
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint
    }

    /// The address this peer listens on, if it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.guard.server.as_ref().map(Server::local_addr)
    }

    /// The server underneath, if the peer listens: its statistics, its
    /// first function error ([`Server::check`]).
    pub fn server(&self) -> Option<&Server> {
        self.guard.server.as_ref()
    }

    /// Connects to the peer at `addr` (a port, `"host:port"`, a
    /// `SocketAddr`, ...), greets it, and returns its name. The connection is
    /// kept up: when lost, it is made again (to whichever peer then answers
    /// at the address). Tries for the connect timeout
    /// ([`PeerBuilder::connect_timeout`]).
    ///
    /// Whoever answers must be trusted (a name pinned with
    /// [`PeerBuilder::trust`], or [`PeerBuilder::accept_any`]) and must not
    /// clash with a name this peer knows ([`PeerError::NameClash`]).
    pub async fn connect(&self, addr: impl ToAddress) -> Result<String, PeerError> {
        let address = addr.to_address()?;
        let deadline = deadline_in(self.inner.settings.connect_timeout);
        self.inner.connect_address(address, deadline).await
    }

    /// Calls `method` on the peer called `peer` with the default timeout
    /// ([`set_timeout`](Self::set_timeout)), finding the peer through the
    /// peers this one knows if it has no connection to it. The call starts
    /// at once; the returned future gives its result. Dropping the future
    /// does not stop the call.
    pub fn call(&self, peer: impl Into<String>, method: impl Into<String>, args: Tree) -> PeerCall {
        self.call_with_timeout(peer, method, args, self.inner.timeout())
    }

    /// Like [`call`](Self::call), with a timeout for this call: finding the
    /// peer, connecting, and the call itself all fit in it.
    pub fn call_with_timeout(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
        timeout: Duration,
    ) -> PeerCall {
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, timeout);
        PeerCall {
            task: self.inner.runtime.spawn(call),
        }
    }

    /// Calls `method` on the peer called `peer` and waits for the result,
    /// for code that is not async. Must not be called on a thread that runs
    /// async tasks ([`PeerError::BlockingInRuntime`]); the runtime the peer
    /// was started in must keep running (a multi-threaded one, or one driven
    /// by another thread).
    pub fn call_blocking(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
    ) -> Result<Tree, PeerError> {
        if Handle::try_current().is_ok() {
            return Err(PeerError::BlockingInRuntime);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, self.inner.timeout());
        self.inner.runtime.spawn(async move {
            let _ = tx.send(call.await);
        });
        rx.recv().unwrap_or(Err(PeerError::Closed))
    }

    /// Calls `method` on the peer called `peer` and runs `callback` with
    /// the result (moolib's `async_callback`). Returns at once. The callback
    /// runs on the runtime's blocking pool, so it may take its time.
    pub fn call_with_callback<F>(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
        callback: F,
    ) where
        F: FnOnce(Result<Tree, PeerError>) + Send + 'static,
    {
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, self.inner.timeout());
        self.inner.runtime.spawn(async move {
            let result = call.await;
            if let Err(error) = tokio::task::spawn_blocking(move || callback(result)).await {
                tracing::error!(%error, "the callback of a peer call panicked");
            }
        });
    }

    /// Sets the default timeout of calls (moolib's `set_timeout`): finding
    /// the peer, connecting and the call itself fit in it.
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    /// The default timeout of calls.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// The peers this one knows, by name, sorted.
    pub fn peers(&self) -> Vec<KnownPeer> {
        let mut peers: Vec<KnownPeer> = lock(&self.inner.directory)
            .values()
            .filter(|e| !e.lost)
            .map(|e| KnownPeer {
                name: e.info.name.clone(),
                fingerprint: e.info.fingerprint,
                addrs: e.info.addrs.clone(),
                connected: e
                    .link
                    .as_ref()
                    .is_some_and(|l| l.state() == LinkState::Up && l.client.connected()),
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        peers
    }

    /// The greetings refused by this peer, or reported refused by the peer
    /// they were sent to, oldest first (the last 32).
    pub fn refusals(&self) -> Vec<Refusal> {
        lock(&self.inner.refusals).iter().cloned().collect()
    }

    /// Stops: closes every connection to other peers, then shuts the server
    /// down, letting running calls finish for up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.close();
        if let Some(server) = &self.guard.server {
            server.shutdown(grace).await;
        }
    }
}

/// A call to a peer in flight: a future of its result. Dropping it does not
/// stop the call.
pub struct PeerCall {
    task: JoinHandle<Result<Tree, PeerError>>,
}

impl std::fmt::Debug for PeerCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCall")
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

impl Future for PeerCall {
    type Output = Result<Tree, PeerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.task).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            // The runtime is shutting down (or the task panicked).
            Poll::Ready(Err(_)) => Poll::Ready(Err(PeerError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}
