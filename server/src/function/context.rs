//! What a function may know about the call it serves: a [`Context`].

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use teleport_quic::Fingerprint;
use tokio::sync::Notify;

/// The call a function serves: who made it, until when the caller waits, and
/// whether it still does.
///
/// A function gets one by taking it as its second argument (see
/// [`Function`](crate::Function)); deferred and queue functions find it on
/// their [`Responder`](crate::Responder). It is cheap to clone, and a clone
/// held anywhere (another thread, a task) sees the call's cancellation.
///
/// ```
/// use teleport_protocol::{tree, Tree};
/// use teleport_server::{Context, Function, Server};
///
/// let builder = Server::builder()
///     .bind("whoami", |_: Tree, ctx: Context| async move {
///         Ok(tree!({"addr": (ctx.peer_addr().to_string()), "agent": (ctx.agent())}))
///     })
///     .bind(
///         "crunch",
///         Function::blocking(|args: Tree, ctx: Context| {
///             for _ in 0..100 {
///                 if ctx.is_cancelled() {
///                     break; // nobody waits for the result any more
///                 }
///                 // ... a slice of the work
///             }
///             Ok(args)
///         }),
///     );
/// # let _ = builder;
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    peer: SocketAddr,
    agent: Arc<str>,
    deadline: Option<Instant>,
    cancelled: AtomicBool,
    notify: Notify,
    connection: Arc<ConnectionLife>,
}

/// Whether one connection has ended, shared by the connection and the
/// contexts of its calls (which may outlive it).
#[derive(Debug)]
pub(crate) struct ConnectionLife {
    id: u64,
    ended: AtomicBool,
    notify: Notify,
    /// The client certificate's fingerprint, set once the handshake is done
    /// (before any call can arrive) if the client presented one.
    peer_fingerprint: OnceLock<Fingerprint>,
}

impl ConnectionLife {
    pub(crate) fn new(id: u64) -> Arc<ConnectionLife> {
        Arc::new(ConnectionLife {
            id,
            ended: AtomicBool::new(false),
            notify: Notify::new(),
            peer_fingerprint: OnceLock::new(),
        })
    }

    /// Records the certificate the client presented in the handshake.
    pub(crate) fn set_peer_fingerprint(&self, fingerprint: Fingerprint) {
        let _ = self.peer_fingerprint.set(fingerprint);
    }

    /// Marks the connection ended and wakes whoever awaits it; once.
    pub(crate) fn end(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    async fn ended(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ended() {
                return;
            }
            notified.await;
        }
    }
}

impl Context {
    pub(crate) fn new(
        peer: SocketAddr,
        agent: Arc<str>,
        deadline: Option<Instant>,
        connection: Arc<ConnectionLife>,
    ) -> Context {
        Context {
            inner: Arc::new(Inner {
                peer,
                agent,
                deadline,
                cancelled: AtomicBool::new(false),
                notify: Notify::new(),
                connection,
            }),
        }
    }

    /// A context that belongs to no call, for functions that never see it.
    /// Its "connection" (number `u64::MAX`, which no connection gets) never
    /// ends.
    pub(crate) fn detached() -> Context {
        Context::new(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            Arc::from(""),
            None,
            ConnectionLife::new(u64::MAX),
        )
    }

    /// The number of the caller's connection, unique among the connections
    /// this server has had since it started: calls with the same number came
    /// over the same connection. A client that reconnects gets a new number.
    pub fn connection_id(&self) -> u64 {
        self.inner.connection.id
    }

    /// Whether the caller's connection has ended (closed by either side, or
    /// lost). Unlike [`is_cancelled`](Self::is_cancelled), this is about the
    /// connection, not the call: it stays false after the call was answered
    /// while the connection lives on, and turns true when the connection ends
    /// even if the call finished long before.
    pub fn is_connection_closed(&self) -> bool {
        self.inner.connection.is_ended()
    }

    /// Completes once the caller's connection has ended (see
    /// [`is_connection_closed`](Self::is_connection_closed)). The future owns
    /// what it needs, so it can be moved into a task that outlives the call,
    /// for example to take back what the call handed out when its client
    /// disappears:
    ///
    /// ```
    /// use teleport_protocol::{tree, Tree};
    /// use teleport_server::{Context, Server};
    ///
    /// let builder = Server::builder().bind("lease", |_: Tree, ctx: Context| async move {
    ///     let gone = ctx.connection_closed();
    ///     tokio::spawn(async move {
    ///         gone.await;
    ///         // ... give the lease back
    ///     });
    ///     Ok(tree!(null))
    /// });
    /// # let _ = builder;
    /// ```
    pub fn connection_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let connection = self.inner.connection.clone();
        async move { connection.ended().await }
    }

    /// The caller's address (its QUIC connection's remote address).
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// The SHA-256 fingerprint of the certificate the caller presented in
    /// the TLS handshake, or `None` if it presented none. Clients present a
    /// certificate only when the server asks for one, that is with
    /// [`ServerBuilder::client_auth`](crate::ServerBuilder::client_auth) set
    /// (`ClientAuth::AnyCertificate` asks for any certificate and leaves the
    /// decision to the function). The handshake proves the caller holds the
    /// certificate's key, so the fingerprint identifies it.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.inner.connection.peer_fingerprint.get().copied()
    }

    /// The agent string the client sent in its `Hello` (the client's
    /// `ClientConfig::agent`; `teleport_protocol::client::DEFAULT_AGENT` for
    /// this crate's client).
    pub fn agent(&self) -> &str {
        &self.inner.agent
    }

    /// When the caller gives up, from the call's timeout; `None` if it has
    /// none. Past it, the call is stopped and [`is_cancelled`](Self::is_cancelled)
    /// turns true.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// The time left until the [`deadline`](Self::deadline) (zero once
    /// passed); `None` without one.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the call was stopped: cancelled by the client, expired, its
    /// connection ended, or its reply could not be written. Its result, if
    /// any, is discarded, so a long function may check this and give up
    /// early; one that handed its answer over already (a deferred function's
    /// [`Responder::try_respond`](crate::Responder::try_respond)) learns from
    /// it that the answer was not delivered after all (except for a
    /// connection that ends just as the reply is written: it may turn true
    /// then too). Once the server is done with a written reply it stays
    /// false, even if the connection ends later.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Completes once the call is stopped (see
    /// [`is_cancelled`](Self::is_cancelled)). An async function's future is
    /// dropped when its call stops, so this serves work the function handed
    /// elsewhere (a spawned task, say).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Marks the call stopped and wakes whoever awaits [`cancelled`](Self::cancelled).
    pub(crate) fn cancel(&self) {
        if !self.inner.cancelled.swap(true, Ordering::AcqRel) {
            self.inner.notify.notify_waiters();
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("peer_addr", &self.inner.peer)
            .field("agent", &self.inner.agent)
            .field("peer_fingerprint", &self.peer_fingerprint())
            .field("deadline", &self.inner.deadline)
            .field("cancelled", &self.is_cancelled())
            .field("connection_id", &self.inner.connection.id)
            .field("connection_closed", &self.is_connection_closed())
            .finish()
    }
}
