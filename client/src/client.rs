//! Connecting, calling, and the tasks that drive one connection.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use teleport_protocol::client::{CallError, ClientConfig, ClientOutput, ClientProtocol};
use teleport_protocol::{Call, Limits, Message, RemoteError, Reply, RequestId, Timestamp, Tree};
use teleport_quic::{
    ClientTls, CloseCode, Connection, Connector, Fingerprint, Identity, Outgoing, RecvStream,
    SendStream, StreamCode, TransportConfig, TransportError,
};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

/// How long a Goodbye waits for replies still being read on other streams.
const GOODBYE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// Why connecting or calling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made: the address, the network, or TLS (an
    /// untrusted or unpinned certificate shows here).
    // The cause is part of the message and deliberately not `source()`, so a
    // printer of the error chain does not show it twice.
    #[error("cannot connect to {target}: {error}")]
    Connect {
        target: String,
        error: TransportError,
    },
    /// The server's name could not be resolved to an address.
    #[error("cannot resolve {target:?} (expected host:port): {reason}")]
    Resolve { target: String, reason: String },
    /// The server did not answer the connection in time.
    #[error("no answer from {target} within {timeout:?} (is a server running there, and is UDP let through?)")]
    ConnectTimeout { target: String, timeout: Duration },
    /// An earlier call failed while nobody awaited it (its [`PendingCall`] was
    /// dropped). Reported once, by the next call, which was not sent.
    #[error("an earlier call of {method:?}, whose result was never awaited, failed: {error}")]
    Unobserved { method: String, error: CallError },
    /// The server refused the connection after the handshake (a wrong or missing
    /// token, a client certificate it does not accept, a version it does not speak).
    #[error("the server refused the connection: {0}")]
    Rejected(String),
    /// The call waited for a connection (the client was connecting or
    /// reconnecting) until its deadline, or for the connect timeout if it has
    /// none, and was not sent.
    #[error(
        "not connected to {target}: no connection within {waited:?}, so the call was not sent \
         (last error: {last_error}; is the server up, and are the pin and token right?)"
    )]
    NotConnected {
        target: String,
        waited: Duration,
        last_error: String,
    },
    /// The blocking client's runtime could not be started.
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The call failed: the function's own error ([`CallError::Remote`]), a
    /// deadline, a cancel, or the connection.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Error {
    /// True if the call failed for want of a working connection (it was lost,
    /// closed, or could not be made): see [`CallError::is_connection_error`].
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Call(e) => e.is_connection_error(),
            Error::NotConnected { .. } => true,
            _ => false,
        }
    }

    /// The server's error, if the function failed or the server refused the call.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Call(e) => e.remote(),
            _ => None,
        }
    }
}

/// Settings of a connection. Start from [`Client::builder`].
#[derive(Debug)]
pub struct ClientBuilder {
    settings: ConnectSettings,
    raise_unobserved: bool,
    reconnect: Option<Backoff>,
    resend_lost_calls: bool,
}

/// What opening a connection needs; kept by the client to open the next one
/// after a loss.
#[derive(Clone, Debug)]
struct ConnectSettings {
    target: String,
    server_name: Option<String>,
    tls: Option<ClientTls>,
    identity: Option<Identity>,
    protocol: ClientConfig,
    transport: TransportConfig,
    limits: Limits,
    connect_timeout: Duration,
}

/// How long to wait between connection attempts: `initial`, doubling after
/// each failure up to `max`.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
}

impl ClientBuilder {
    /// Trust only the server whose certificate has this SHA-256 fingerprint
    /// (what a server with a self-signed certificate prints).
    pub fn pin(mut self, fingerprint: Fingerprint) -> Self {
        self.settings.tls = Some(ClientTls::pinned(fingerprint));
        self
    }

    /// Trust servers as `tls` says (CA roots, pins, ...).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.settings.tls = Some(tls);
        self
    }

    /// Trust any server. The connection is encrypted but not authenticated:
    /// anyone on the path can impersonate the server. Tests only.
    pub fn insecure_skip_verification(mut self) -> Self {
        self.settings.tls = Some(ClientTls::insecure_skip_verification());
        self
    }

    /// Present this certificate to servers that require one (mutual TLS).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.settings.identity = Some(identity);
        self
    }

    /// The name the server's certificate must carry when trusting CA roots.
    /// Default: the host of the target (`"example.com"` for
    /// `"example.com:4433"`, the IP address for an address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.settings.server_name = Some(name.into());
        self
    }

    /// Whether the error of a call whose [`PendingCall`] was dropped without
    /// being awaited is returned by the next call made, as
    /// [`Error::Unobserved`], so failures are not lost. Default true.
    pub fn raise_unobserved_errors(mut self, raise: bool) -> Self {
        self.raise_unobserved = raise;
        self
    }

    /// The shared token the server requires.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.protocol.token = Some(token.into());
        self
    }

    /// Calls in flight at once; more wait their turn in order. Default 16.
    /// The limit holds across reconnections.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.settings.protocol.max_in_flight = max_in_flight.max(1);
        self
    }

    /// The timeout of calls made without one. Default none.
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.settings.protocol.default_timeout = timeout;
        self
    }

    /// Ping a server silent this long while calls are pending. Default 5 s;
    /// `None` never pings.
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.settings.protocol.ping_interval = interval;
        self
    }

    /// Declare a server silent this long while calls are pending dead and fail
    /// its calls. Default 30 s; `None` never declares it dead (deadlines still
    /// apply). Keep it well above `ping_interval`: a live server answers pings
    /// even while its functions run long.
    pub fn max_age(mut self, max_age: Option<Duration>) -> Self {
        self.settings.protocol.max_age = max_age;
        self
    }

    /// QUIC windows and timers.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.settings.transport = transport;
        self
    }

    /// Bounds on every reply received.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.settings.limits = limits;
        self
    }

    /// How long one connection attempt may take, and how long a call made
    /// while the client is not connected (and that has no timeout of its own)
    /// waits for a connection. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Whether the client opens a new connection after losing one (the server
    /// restarted, the network failed, the server fell silent past `max_age`).
    /// Default true. Calls made while it reconnects wait for the new
    /// connection (see [`connect_timeout`](Self::connect_timeout)). With
    /// `false`, every call after the loss fails with the error the
    /// connection ended with.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect.then_some(self.reconnect.unwrap_or(DEFAULT_BACKOFF));
        self
    }

    /// The wait between connection attempts: `initial` after a loss, doubling
    /// after each failed attempt up to `max`. Default 50 ms up to 5 s. Implies
    /// [`reconnect(true)`](Self::reconnect).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect = Some(Backoff {
            initial,
            max: max.max(initial),
        });
        self
    }

    /// Whether calls pending when the connection is lost are sent again on the
    /// next connection, as if every method of the server were idempotent.
    /// Default false: calls are at-most-once, and a lost connection fails the
    /// calls pending on it with a connection error (they may or may not have
    /// run). Choose per call with [`CallOptions::idempotent`]. A re-sent call
    /// keeps its original deadline.
    pub fn resend_lost_calls(mut self, resend: bool) -> Self {
        self.resend_lost_calls = resend;
        self
    }

    /// Connects, completes the TLS handshake and the `Hello` exchange, and
    /// fails at once if that does not work (a wrong pin or token, no server).
    /// Must be called inside a tokio runtime. To wait for a server that is not
    /// up yet, use [`connect_lazy`](Self::connect_lazy).
    pub async fn connect(self) -> Result<Client, Error> {
        let shared = self.into_shared();
        let inner = open_connection(&shared).await?;
        if !shared.publish(Link::Up(inner.clone())) {
            inner.close();
        }
        tokio::spawn(supervise(shared.clone(), Some(inner)));
        Ok(Client {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Returns a client at once and connects in the background, retrying
    /// (with the reconnect backoff) until the server answers: for a server
    /// that may not be up yet. Calls made meanwhile wait for the connection up
    /// to their timeout (or the connect timeout), then fail with
    /// [`Error::NotConnected`], which carries the last attempt's error (a
    /// wrong pin or token shows there). Must be called inside a tokio runtime.
    pub fn connect_lazy(self) -> Client {
        let shared = self.into_shared();
        tokio::spawn(supervise(shared.clone(), None));
        Client {
            handle: Arc::new(Handle { shared }),
        }
    }

    fn into_shared(self) -> Arc<Shared> {
        let max_in_flight = self.settings.protocol.max_in_flight.max(1);
        let (link, _) = watch::channel(Link::Connecting { last_error: None });
        Arc::new(Shared {
            settings: self.settings,
            reconnect: self.reconnect,
            resend_lost_calls: self.resend_lost_calls,
            raise_unobserved: self.raise_unobserved,
            has_unobserved: AtomicBool::new(false),
            unobserved: Mutex::new(None),
            capacity: Arc::new(Semaphore::new(max_in_flight)),
            link,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

/// 50 ms, doubling up to 5 s: fast after a brief blip, gentle on a server
/// that stays down.
const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(50),
    max: Duration::from_secs(5),
};

/// The connection a client uses now.
#[derive(Clone, Debug)]
enum Link {
    /// No connection yet, or the last one was lost and a new one is being
    /// opened. Holds why the last connection or attempt failed, for callers who give up.
    Connecting { last_error: Option<Arc<str>> },
    /// A connection; it may have ended, which the supervisor notices and
    /// replaces (if reconnecting is enabled).
    Up(Arc<Inner>),
    /// The client was closed. Keeps the last connection, for
    /// [`Client::closed`] to wait until the server was told.
    Closed { last: Option<Arc<Inner>> },
}

/// What every connection of one client shares: the settings, the in-flight
/// limit, unobserved errors, and the current connection.
#[derive(Debug)]
struct Shared {
    settings: ConnectSettings,
    /// `None`: a lost connection is not replaced.
    reconnect: Option<Backoff>,
    resend_lost_calls: bool,
    raise_unobserved: bool,
    /// Whether `unobserved` holds an error: spares each call the lock.
    has_unobserved: AtomicBool,
    /// The first failure of a call nobody awaited, for the next call to report.
    unobserved: Mutex<Option<(String, CallError)>>,
    /// Client-wide, not per connection, so that the limit holds across
    /// reconnections (a re-sent call keeps its permit).
    capacity: Arc<Semaphore>,
    link: watch::Sender<Link>,
    /// Where tasks of this client run, also when spawned from a drop.
    runtime: tokio::runtime::Handle,
}

impl Shared {
    /// Makes `link` the current one, unless the client was closed.
    fn publish(&self, link: Link) -> bool {
        self.link.send_if_modified(|current| {
            if matches!(current, Link::Closed { .. }) {
                return false;
            }
            *current = link;
            true
        })
    }

    fn is_closed(&self) -> bool {
        matches!(*self.link.borrow(), Link::Closed { .. })
    }

    /// The current connection if it takes calls (or, without reconnecting,
    /// the ended one, whose calls fail with the reason it ended).
    fn usable(&self, link: &Link) -> Option<Arc<Inner>> {
        match link {
            Link::Up(inner) if self.reconnect.is_none() || !inner.is_finished() => {
                Some(inner.clone())
            }
            _ => None,
        }
    }

    fn close(&self) {
        let mut last = None;
        self.link.send_modify(|link| {
            let previous = std::mem::replace(link, Link::Closed { last: None });
            if let Link::Up(inner) | Link::Closed { last: Some(inner) } = previous {
                last = Some(inner.clone());
                *link = Link::Closed { last: Some(inner) };
            }
        });
        // Outside the link's lock: closing takes the connection's lock.
        if let Some(inner) = last {
            inner.close();
        }
    }

    fn take_unobserved(&self) -> Option<(String, CallError)> {
        if !self.has_unobserved.load(Ordering::Acquire) {
            return None;
        }
        self.has_unobserved.store(false, Ordering::Release);
        self.unobserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn keep_unobserved(&self, method: String, error: CallError) {
        if !self.raise_unobserved {
            return;
        }
        let mut unobserved = self.unobserved.lock().unwrap_or_else(|p| p.into_inner());
        if unobserved.is_none() {
            *unobserved = Some((method, error));
            self.has_unobserved.store(true, Ordering::Release);
        }
    }
}

/// Keeps the client connected: waits for the current connection to end and
/// opens the next one, with backoff, until the client is closed. Without
/// reconnecting it only makes the first connection (for `connect_lazy`).
async fn supervise(shared: Arc<Shared>, mut current: Option<Arc<Inner>>) {
    let backoff = shared.reconnect.unwrap_or(DEFAULT_BACKOFF);
    let mut closed = shared.link.subscribe();
    let mut wait = Duration::ZERO;
    loop {
        if let Some(inner) = current.take() {
            tokio::select! {
                _ = inner.ended() => {}
                _ = closed.wait_for(|link| matches!(link, Link::Closed { .. })) => return,
            }
            if shared.reconnect.is_none() {
                // The ended connection stays current: calls fail with its cause.
                return;
            }
            // A connection that ends soon after it was made (a server that
            // accepts and then fails) must not be retried at the initial
            // pace forever: the backoff only starts over after a connection
            // that lasted.
            let lasted = inner.origin.elapsed() >= backoff.max;
            let cause = inner.end_cause();
            tracing::debug!(server = %shared.settings.target, %cause, "connection lost; reconnecting");
            if !shared.publish(Link::Connecting {
                last_error: Some(cause.into()),
            }) {
                return;
            }
            wait = if lasted {
                backoff.initial
            } else {
                (wait * 2).clamp(backoff.initial, backoff.max)
            };
        }
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = closed.wait_for(|link| matches!(link, Link::Closed { .. })) => return,
            }
        }
        let attempt = tokio::select! {
            attempt = open_connection(&shared) => attempt,
            _ = closed.wait_for(|link| matches!(link, Link::Closed { .. })) => return,
        };
        match attempt {
            Ok(inner) => {
                if !shared.publish(Link::Up(inner.clone())) {
                    inner.close();
                    return;
                }
                current = Some(inner);
            }
            Err(e) => {
                tracing::debug!(server = %shared.settings.target, error = %e, "connection attempt failed");
                if !shared.publish(Link::Connecting {
                    last_error: Some(e.to_string().into()),
                }) {
                    return;
                }
                wait = (wait * 2).clamp(backoff.initial, backoff.max);
            }
        }
    }
}

/// Opens one connection as `shared.settings` say, within the connect timeout.
async fn open_connection(shared: &Arc<Shared>) -> Result<Arc<Inner>, Error> {
    let target = shared.settings.target.clone();
    let timeout = shared.settings.connect_timeout;
    let addrs = resolve(&target).await?;
    match tokio::time::timeout(timeout, connect_to(shared, addrs)).await {
        Ok(result) => result,
        Err(_) => Err(Error::ConnectTimeout { target, timeout }),
    }
}

async fn connect_to(shared: &Arc<Shared>, addrs: Vec<SocketAddr>) -> Result<Arc<Inner>, Error> {
    let settings = &shared.settings;
    let target = settings.target.clone();
    let fail = |error| Error::Connect {
        target: target.clone(),
        error,
    };
    let server_name = settings
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&settings.target));
    let mut tls = settings.tls.clone().ok_or_else(|| {
        fail(TransportError::Tls(
            "no way to trust the server was chosen: pin its fingerprint, give CA roots, or \
             (tests only) skip verification"
                .into(),
        ))
    })?;
    if let Some(identity) = settings.identity.clone() {
        tls = tls.with_identity(identity);
    }
    let connector =
        Connector::new(&tls, &settings.transport, settings.limits.clone()).map_err(fail)?;
    // A name may resolve to several addresses (IPv4 and IPv6 for
    // `localhost`): try them all at once and keep the first that answers.
    let attempts = addrs
        .iter()
        .map(|&addr| Box::pin(connector.connect(addr, &server_name)));
    let connection = match futures_util::future::select_ok(attempts).await {
        Ok((connection, _slower)) => connection,
        Err(e) => return Err(fail(e)),
    };
    let origin = Instant::now();
    let mut protocol = ClientProtocol::new(settings.protocol.clone(), Timestamp::ZERO);
    let (mut control_send, mut control_recv) = connection.open_stream().await.map_err(fail)?;
    // The Hello opens the control stream; the server reads no call before it.
    while let Some(output) = protocol.poll_output() {
        if let ClientOutput::Transmit(message) = output {
            control_send
                .send(&message)
                .await
                .map_err(|e| rejected(&connection, e))?;
        }
    }
    let answer = control_recv
        .receive(|_| {})
        .await
        .map_err(|e| rejected(&connection, e))?;
    let now = Timestamp::from_duration(origin.elapsed());
    match answer {
        Some(message) => {
            let _ = protocol.handle_message(now, message);
        }
        None => protocol.protocol_violation(now, "the server ended the control stream"),
    }
    if let Some(cause) = protocol.close_cause() {
        let reason = cause.to_string();
        connection.close(CloseCode::Normal, "refused");
        return Err(Error::Rejected(reason));
    }
    // Nothing else is queued after the handshake.
    while protocol.poll_output().is_some() {}
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            protocol,
            waiters: HashMap::new(),
            streams: HashMap::new(),
            timer_armed: None,
            claim_calls: false,
            claimed: None,
        }),
        client: Arc::downgrade(shared),
        runtime: shared.runtime.clone(),
        connection: connection.clone(),
        _connector: connector,
        origin,
        last_heard: AtomicU64::new(0),
        control: control_tx,
        timer: Notify::new(),
        completed: Notify::new(),
        finished: Notify::new(),
    });
    tokio::spawn(write_control(control_send, control_rx, connection.clone()));
    tokio::spawn(read_control(control_recv, inner.clone()));
    tokio::spawn(run_timer(inner.clone()));
    tokio::spawn(watch_connection(inner.clone()));
    Ok(inner)
}

/// Resolves `host:port` (a name or an address) to its addresses.
async fn resolve(target: &str) -> Result<Vec<SocketAddr>, Error> {
    let unresolved = |reason: String| Error::Resolve {
        target: target.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| unresolved(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(unresolved("the name has no addresses".to_owned()));
    }
    Ok(addrs)
}

/// The host part of `host:port` or `[v6]:port`, for the TLS server name.
fn host_of(target: &str) -> String {
    let host = match target.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => target,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// The handshake failed after TLS: the server's close reason says why.
fn rejected(connection: &Connection, e: TransportError) -> Error {
    match connection.close_reason().unwrap_or(e) {
        TransportError::ClosedByPeer { reason, .. } => Error::Rejected(reason),
        other => Error::Rejected(other.to_string()),
    }
}

/// A client of one server. Cheap to clone; every clone shares the
/// connection, which closes when the last clone is dropped (or on
/// [`close`](Client::close)). After losing the server it reconnects for new
/// calls (see [`ClientBuilder::reconnect`]).
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Dropped when the last `Client` clone is: closes the connection and stops
/// reconnecting. The driving tasks hold `Shared` or `Inner`, not this, so they
/// do not keep it alive.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// How one call is made. Start from [`CallOptions::new`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallOptions {
    timeout: Option<Duration>,
    idempotent: Option<bool>,
}

impl CallOptions {
    /// The client's defaults: its default timeout, and re-sent after a lost
    /// connection only if [`ClientBuilder::resend_lost_calls`] is set.
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Fail with [`CallError::DeadlineExceeded`] if no reply arrives within
    /// `timeout` (the server is told the deadline too, and drops the call when
    /// it passes). Waiting for a turn or a connection counts against it; a
    /// call still waiting for a connection when it passes fails with
    /// [`Error::NotConnected`].
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Whether running the call twice is harmless. If so and the connection
    /// is lost while the call is pending, the call is sent again on the next
    /// connection (within its deadline) instead of failing; otherwise it fails
    /// with a connection error, as it may or may not have run.
    pub fn idempotent(mut self, idempotent: bool) -> CallOptions {
        self.idempotent = Some(idempotent);
        self
    }
}

impl Client {
    /// A builder for a connection to `target`: `"host:port"` (names are
    /// resolved), `"[::1]:4433"`, or a `SocketAddr`. Choose how to trust the server
    /// ([`pin`](ClientBuilder::pin) or [`tls`](ClientBuilder::tls)) before
    /// connecting.
    pub fn builder(target: impl std::fmt::Display) -> ClientBuilder {
        ClientBuilder {
            settings: ConnectSettings {
                target: target.to_string(),
                server_name: None,
                tls: None,
                identity: None,
                protocol: ClientConfig::default(),
                transport: TransportConfig::default(),
                limits: Limits::default(),
                connect_timeout: Duration::from_secs(10),
            },
            raise_unobserved: true,
            reconnect: Some(DEFAULT_BACKOFF),
            resend_lost_calls: false,
        }
    }

    /// Calls the function bound as `method` on `args`, with the default timeout.
    ///
    /// The call is sent at once (or as soon as fewer than `max_in_flight` calls
    /// are pending and the client is connected); the returned future resolves
    /// to the result. Dropping the future does not stop the call (use
    /// [`PendingCall::cancel`]); if it then fails, the next call returns
    /// [`Error::Unobserved`].
    pub fn call(&self, method: impl Into<String>, args: Tree) -> PendingCall {
        self.start(method.into(), args, CallOptions::default())
    }

    /// Like [`call`](Self::call), failing with
    /// [`CallError::DeadlineExceeded`] if no reply arrives within `timeout`
    /// (the server is told the deadline too, and drops the call when it passes).
    pub fn call_with_timeout(
        &self,
        method: impl Into<String>,
        args: Tree,
        timeout: Duration,
    ) -> PendingCall {
        self.start(method.into(), args, CallOptions::new().timeout(timeout))
    }

    /// Like [`call`](Self::call), as `options` say (timeout, idempotence).
    pub fn call_with_options(
        &self,
        method: impl Into<String>,
        args: Tree,
        options: CallOptions,
    ) -> PendingCall {
        self.start(method.into(), args, options)
    }

    fn start(&self, method: String, args: Tree, options: CallOptions) -> PendingCall {
        let shared = &self.handle.shared;
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(Mutex::new(Slot::Queued));
        if let Some((method, error)) = shared.take_unobserved() {
            return PendingCall {
                result: rx,
                slot,
                early: Some(Error::Unobserved { method, error }),
                cancelled_unsent: AtomicBool::new(false),
                driver: None,
            };
        }
        let request = CallRequest {
            method,
            args,
            timeout: options.timeout,
            deadline: None,
            idempotent: options.idempotent.unwrap_or(shared.resend_lost_calls),
            slot: slot.clone(),
            result: tx,
        };
        // `start_call` checks under its lock whether the connection still
        // takes calls; checking here too would cost a second lock per call.
        let inner = match &*shared.link.borrow() {
            Link::Up(inner) => Some(inner.clone()),
            _ => None,
        };
        let ready = match (inner, shared.capacity.clone().try_acquire_owned()) {
            (Some(inner), Ok(permit)) => Ok((inner, permit)),
            (_, permit) => Err(permit.ok()),
        };
        let driver = match ready {
            Ok((inner, permit)) => match inner.start_call(request, permit) {
                Started::ReadReply(driver) => Some(driver),
                Started::Done => None,
                // The connection ended just now: wait for the next one.
                Started::ConnectionEnded(request, permit) => {
                    start_later(
                        shared.clone(),
                        request.with_deadline(shared.settings.protocol.default_timeout),
                        Some(permit),
                    );
                    None
                }
            },
            // At capacity or not connected: wait in a task, so the call still
            // goes out whether or not the future is polled.
            Err(permit) => {
                start_later(
                    shared.clone(),
                    request.with_deadline(shared.settings.protocol.default_timeout),
                    permit,
                );
                None
            }
        };
        PendingCall {
            result: rx,
            slot,
            early: None,
            cancelled_unsent: AtomicBool::new(false),
            driver,
        }
    }

    /// Calls pending now on the current connection (sent and not yet answered).
    pub fn in_flight(&self) -> usize {
        self.current()
            .map_or(0, |inner| inner.lock().protocol.in_flight())
    }

    /// True while the client has a connection that takes calls; false while it
    /// connects or reconnects, and after it was closed or lost the server for
    /// good.
    pub fn connected(&self) -> bool {
        self.current().is_some_and(|inner| !inner.is_finished())
    }

    /// The server's agent string from its `Hello`, if connected.
    pub fn server_agent(&self) -> Option<String> {
        self.current()?
            .lock()
            .protocol
            .peer_agent()
            .map(str::to_owned)
    }

    /// The current round-trip time estimate (zero when not connected).
    pub fn rtt(&self) -> Duration {
        self.current()
            .map_or(Duration::ZERO, |inner| inner.connection.rtt())
    }

    /// True once the client takes no more calls: it was closed, or it lost the
    /// server with reconnecting disabled. A client that is reconnecting is not
    /// closed.
    pub fn is_closed(&self) -> bool {
        match &*self.handle.shared.link.borrow() {
            Link::Closed { .. } => true,
            Link::Up(inner) => self.handle.shared.reconnect.is_none() && inner.is_finished(),
            Link::Connecting { .. } => false,
        }
    }

    /// Closes the connection and stops reconnecting: pending calls fail with
    /// [`CallError::Closed`], the server is told goodbye. Returns at once;
    /// await [`closed`](Self::closed) to know the server was told.
    pub fn close(&self) {
        self.handle.shared.close();
    }

    /// Waits until the current connection is closed (by [`close`](Self::close),
    /// by the server, or by a failure) and says why. While the client is
    /// connecting, waits for the connection first; a client closed before it
    /// had one returns [`TransportError::ClosedLocally`].
    pub async fn closed(&self) -> TransportError {
        let mut link = self.handle.shared.link.subscribe();
        let inner = {
            let ready = link
                .wait_for(|link| !matches!(link, Link::Connecting { .. }))
                .await;
            match ready.as_deref() {
                Ok(Link::Up(inner) | Link::Closed { last: Some(inner) }) => inner.clone(),
                _ => return TransportError::ClosedLocally,
            }
        };
        inner.connection.closed().await
    }

    fn current(&self) -> Option<Arc<Inner>> {
        match &*self.handle.shared.link.borrow() {
            Link::Up(inner) => Some(inner.clone()),
            _ => None,
        }
    }
}

/// What `Inner::start_call` did with a call.
enum Started {
    /// Sent from the caller's task: this reads the reply.
    ReadReply(Driver),
    /// Nothing for the caller to drive: a task carries the call, or it
    /// failed (the caller has the error), or the caller cancelled it first.
    Done,
    /// Not sent: the connection has ended and the client reconnects, so the
    /// call waits for the next connection.
    ConnectionEnded(CallRequest, OwnedSemaphorePermit),
}

/// A call not started yet, or to be started again on a new connection.
#[derive(Debug)]
struct CallRequest {
    method: String,
    args: Tree,
    /// The call's own timeout (`None`: the client's default applies).
    timeout: Option<Duration>,
    /// When the call fails, if it has a timeout; set once the call has to wait
    /// (for a turn or a connection), so that the wait counts against it.
    deadline: Option<tokio::time::Instant>,
    idempotent: bool,
    slot: Arc<Mutex<Slot>>,
    result: oneshot::Sender<Result<Tree, Error>>,
}

impl CallRequest {
    /// Fixes the deadline now, from the call's timeout or the default.
    fn with_deadline(mut self, default_timeout: Option<Duration>) -> CallRequest {
        if self.deadline.is_none() {
            self.deadline = self
                .timeout
                .or(default_timeout)
                .map(|t| tokio::time::Instant::now() + t);
        }
        self
    }

    /// The timeout to start the call with now: what is left of its deadline.
    fn remaining(&self) -> Option<Duration> {
        match self.deadline {
            Some(deadline) => Some(deadline.saturating_duration_since(tokio::time::Instant::now())),
            None => self.timeout,
        }
    }
}

/// Starts `request` in a task once it has a turn (`permit`) and a connection,
/// or fails it when its deadline (or, without one, the connect timeout)
/// passes first.
fn start_later(shared: Arc<Shared>, request: CallRequest, permit: Option<OwnedSemaphorePermit>) {
    let runtime = shared.runtime.clone();
    runtime.spawn(async move {
        let permit = match permit {
            Some(permit) => permit,
            None => match shared.capacity.clone().acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        if matches!(
            *request.slot.lock().unwrap_or_else(|p| p.into_inner()),
            Slot::Abandoned
        ) {
            return;
        }
        let waited_from = tokio::time::Instant::now();
        let give_up = request
            .deadline
            .unwrap_or(waited_from + shared.settings.connect_timeout);
        let mut link = shared.link.subscribe();
        let connected = tokio::time::timeout_at(
            give_up,
            link.wait_for(|link| {
                matches!(link, Link::Closed { .. }) || shared.usable(link).is_some()
            }),
        )
        .await
        .map(|ready| ready.ok().and_then(|link| shared.usable(&link)));
        let inner = match connected {
            Ok(Some(inner)) => inner,
            Ok(None) => {
                let _ = request.result.send(Err(Error::Call(CallError::Closed)));
                return;
            }
            Err(_) => {
                let last_error = match &*link.borrow() {
                    Link::Connecting {
                        last_error: Some(error),
                    } => error.to_string(),
                    _ => "no attempt has finished yet".to_owned(),
                };
                let error = Error::NotConnected {
                    target: shared.settings.target.clone(),
                    waited: waited_from.elapsed(),
                    last_error,
                };
                let _ = request.result.send(Err(error));
                return;
            }
        };
        match inner.start_call(request, permit) {
            Started::ReadReply(driver) => driver.await,
            Started::Done => {}
            // Lost again before the call went out: wait for the next one.
            Started::ConnectionEnded(request, permit) => start_later(shared, request, Some(permit)),
        }
    });
}

/// Where a call is: waiting for a turn or a connection, started with an id
/// on a connection, or abandoned by its caller before it started.
#[derive(Debug)]
enum Slot {
    Queued,
    Started(std::sync::Weak<Inner>, RequestId),
    Abandoned,
}

/// A call in flight: a future of its result.
///
/// Dropping it does not stop the call: it runs to the end, and if it fails,
/// the next call on the client reports the error (see
/// [`ClientBuilder::raise_unobserved_errors`]). To stop it, [`cancel`](Self::cancel).
pub struct PendingCall {
    result: oneshot::Receiver<Result<Tree, Error>>,
    slot: Arc<Mutex<Slot>>,
    /// An error to return without waiting (an earlier call's unobserved failure).
    early: Option<Error>,
    /// Set when the call was cancelled before it was sent: the future resolves
    /// at once, rather than when the task holding the call next looks (which,
    /// for a call waiting for a connection, may be its deadline).
    cancelled_unsent: AtomicBool,
    /// Reads the reply when the call was sent from the caller's task: it runs
    /// when the future is polled (or in a task, if the future is dropped).
    driver: Option<Driver>,
}

/// The rest of a call's work, as a future of its own.
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

impl fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingCall")
            .field("id", &self.id())
            .field("early", &self.early)
            .field("reads_its_reply", &self.driver.is_some())
            .finish_non_exhaustive()
    }
}

impl PendingCall {
    /// The call's request id on the connection it was last sent on, once it
    /// has been sent.
    pub fn id(&self) -> Option<RequestId> {
        match *self.slot.lock().unwrap_or_else(|p| p.into_inner()) {
            Slot::Started(_, id) => Some(id),
            _ => None,
        }
    }

    /// Cancels the call: the future resolves to [`CallError::Cancelled`] (unless
    /// the result was already in), the server is told to drop it, and a call
    /// still waiting for its turn or a connection is never sent.
    pub fn cancel(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Slot::Started(inner, id) => {
                let (inner, id) = (inner.upgrade(), *id);
                drop(slot);
                if let Some(inner) = inner {
                    inner.cancel(id);
                }
            }
            Slot::Queued => {
                *slot = Slot::Abandoned;
                self.cancelled_unsent.store(true, Ordering::Relaxed);
            }
            Slot::Abandoned => {}
        }
    }

    /// The connection the call was sent on (while it is sent there).
    fn inner(&self) -> Option<Arc<Inner>> {
        match &*self.slot.lock().unwrap_or_else(|p| p.into_inner()) {
            Slot::Started(inner, _) => inner.upgrade(),
            _ => None,
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // Nobody will poll the reply in: a task finishes the call. (A driver
        // exists only for a call sent from the caller's task, whose slot
        // names its connection; the driver holds that connection alive.)
        if let Some(driver) = self.driver.take() {
            match self.inner() {
                Some(inner) => drop(inner.runtime.spawn(driver)),
                None => drop(tokio::spawn(driver)),
            }
        }
    }
}

impl Future for PendingCall {
    type Output = Result<Tree, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(error) = self.early.take() {
            return Poll::Ready(Err(error));
        }
        if self.cancelled_unsent.load(Ordering::Relaxed) {
            return Poll::Ready(Err(Error::Call(CallError::Cancelled)));
        }
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
        match Pin::new(&mut self.result).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            // Never started: cancelled while waiting for its turn.
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Call(CallError::Cancelled))),
        }
    }
}

/// A started call's way back to its caller. Holding the permit is what keeps
/// the call counted against `max_in_flight`.
#[derive(Debug)]
struct Waiter {
    method: String,
    result: oneshot::Sender<Result<Tree, Error>>,
    permit: OwnedSemaphorePermit,
    slot: Arc<Mutex<Slot>>,
    /// Whether running the call twice is harmless (as the caller said).
    idempotent: bool,
    /// What sending the call again on a new connection needs, if the
    /// connection is lost while the call is pending and the client
    /// reconnects: set for idempotent calls, and for calls whose stream could
    /// not even be opened (they were never sent).
    resend: Option<Resend>,
}

#[derive(Debug)]
struct Resend {
    args: Tree,
    timeout: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
}

#[derive(Debug)]
struct State {
    protocol: ClientProtocol,
    waiters: HashMap<RequestId, Waiter>,
    /// Stops the task carrying a call's stream, with the code to reset it with.
    streams: HashMap<RequestId, oneshot::Sender<StreamCode>>,
    /// The time the timer task sleeps until (`None`: until woken).
    timer_armed: Option<Timestamp>,
    /// Set while `start_call` pumps: the call it started is handed back in
    /// `claimed` instead of to a task.
    claim_calls: bool,
    claimed: Option<(Call, oneshot::Receiver<StreamCode>)>,
}

#[derive(Debug)]
enum Control {
    Send(Message),
    Close,
}

/// One connection's shared state, held by the driving tasks.
#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    connection: Connection,
    /// Keeps the client's UDP endpoint open while the connection lives.
    _connector: Connector,
    origin: Instant,
    /// When bytes last arrived from the server (µs since `origin`). Written
    /// per received chunk without the lock, folded into the state machine
    /// before it looks at time.
    last_heard: AtomicU64,
    control: mpsc::UnboundedSender<Control>,
    timer: Notify,
    /// Signalled whenever a call completes.
    completed: Notify,
    /// Signalled (once, with a stored permit) when the state machine finishes
    /// the connection, so the supervisor replaces it without waiting for the
    /// transport to close.
    finished: Notify,
    /// The client, for unobserved errors and re-sent calls. Weak: the client
    /// holds its current connection, not the other way round.
    client: std::sync::Weak<Shared>,
    /// Where tasks of this connection run, also when spawned from a drop.
    runtime: tokio::runtime::Handle,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.origin.elapsed())
    }

    fn heard(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_heard.fetch_max(micros, Ordering::Relaxed);
    }

    fn fold_heard(&self, state: &mut State) {
        let micros = self.last_heard.load(Ordering::Relaxed);
        state
            .protocol
            .heard_from_peer(Timestamp::from_micros(micros));
    }

    /// Starts a call that has its turn. Returns the future that reads its
    /// reply if the call was sent from here; otherwise a task carries it.
    fn start_call(self: &Arc<Self>, request: CallRequest, permit: OwnedSemaphorePermit) -> Started {
        let slot_handle = request.slot.clone();
        let mut slot = slot_handle.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*slot, Slot::Abandoned) {
            return Started::Done;
        }
        let mut state = self.lock();
        // Looked at only when needed: a successful ordinary call pays nothing.
        let reconnects = || {
            self.client
                .upgrade()
                .is_some_and(|client| client.reconnect.is_some() && !client.is_closed())
        };
        if state.protocol.is_closed() && reconnects() {
            // Checked under the lock, so no call is lost to a connection
            // that ended between choosing it and starting the call here.
            return Started::ConnectionEnded(request, permit);
        }
        let timeout = request.remaining();
        let CallRequest {
            method,
            args,
            deadline,
            idempotent,
            result,
            ..
        } = request;
        // Only a call that may be re-sent pays for keeping its arguments
        // (a clone of the tree: array data is shared, not copied).
        let resend = (idempotent && reconnects()).then(|| Resend {
            args: args.clone(),
            timeout,
            deadline: deadline.or_else(|| {
                timeout
                    .or(state.protocol.config().default_timeout)
                    .map(|t| tokio::time::Instant::now() + t)
            }),
        });
        let now = self.now();
        match state
            .protocol
            .start_call(now, method.clone(), args, timeout)
        {
            Ok(id) => {
                *slot = Slot::Started(Arc::downgrade(self), id);
                drop(slot);
                state.waiters.insert(
                    id,
                    Waiter {
                        method,
                        result,
                        permit,
                        slot: slot_handle.clone(),
                        idempotent,
                        resend,
                    },
                );
                state.claim_calls = true;
                self.pump(&mut state);
                state.claim_calls = false;
                let claimed = state.claimed.take();
                drop(state);
                match claimed.and_then(|(call, stop)| self.clone().send_now(call, stop)) {
                    Some(driver) => Started::ReadReply(driver),
                    None => Started::Done,
                }
            }
            Err(e) => {
                let cause = match e {
                    teleport_protocol::client::StartCallError::Closed { cause } => cause,
                    _ => CallError::Closed,
                };
                let _ = result.send(Err(Error::Call(cause)));
                Started::Done
            }
        }
    }

    fn is_finished(&self) -> bool {
        self.lock().protocol.is_closed()
    }

    /// Why the connection ended, for logs and for callers waiting for the next.
    fn end_cause(&self) -> String {
        match self.lock().protocol.close_cause() {
            Some(cause) => cause.to_string(),
            None => "the connection ended".to_owned(),
        }
    }

    /// Resolves once the state machine has finished the connection.
    async fn ended(self: &Arc<Self>) {
        tokio::select! {
            _ = self.finished.notified() => {}
            _ = self.connection.closed() => {}
        }
        // The transport may close before the readers have told the state
        // machine; make sure it knows, so `is_finished` holds from here on.
        let reason = self.connection.close_reason();
        if let Some(reason) = reason {
            self.connection_lost(reason.to_string());
        }
    }

    /// Sends `call` from the caller's task if a stream is free and the message
    /// fits in the send buffer now (the common case for small calls), and
    /// returns the future that reads the reply: no task, and no hand-over
    /// between tasks, per call. Otherwise a task carries the call. Either way
    /// the call goes out at once, whether or not anyone polls for its result.
    fn send_now(
        self: Arc<Self>,
        call: Call,
        mut stop: oneshot::Receiver<StreamCode>,
    ) -> Option<Driver> {
        let id = call.request_id;
        let (mut send, mut recv) = match self.connection.try_open_stream() {
            Some(Ok(streams)) => streams,
            Some(Err(e)) => {
                self.open_failed(call, e);
                return None;
            }
            None => {
                tokio::spawn(run_call(self, call, stop));
                return None;
            }
        };
        let mut outgoing = match Outgoing::new(&Message::Call(call)) {
            Ok(outgoing) => outgoing,
            Err(e) => {
                self.on_reply(id, Err(e));
                return None;
            }
        };
        match send.try_send_now(&mut outgoing) {
            Ok(true) => send.finish(),
            Ok(false) => {
                // A large call: finish writing it in a task.
                tokio::spawn(async move {
                    let received = {
                        let exchange = exchange(&self, &mut send, &mut recv, outgoing);
                        tokio::pin!(exchange);
                        tokio::select! {
                            received = &mut exchange => Ok(received),
                            code = &mut stop => Err(code),
                        }
                    };
                    match received {
                        Ok(received) => self.on_reply(id, received),
                        Err(code) => abandon(&mut send, &mut recv, code),
                    }
                });
                return None;
            }
            // The server refused the call before reading it all; its reply says why.
            Err(TransportError::StreamStopped(_)) => {}
            Err(e) => {
                self.on_reply(id, Err(e));
                return None;
            }
        }
        Some(Box::pin(read_reply(self, id, send, recv, stop)))
    }

    fn cancel(self: &Arc<Self>, id: RequestId) {
        let mut state = self.lock();
        let now = self.now();
        if state.protocol.cancel(id, now) {
            self.pump(&mut state);
        }
    }

    fn close(self: &Arc<Self>) {
        let mut state = self.lock();
        let now = self.now();
        state.protocol.close(now);
        self.pump(&mut state);
    }

    /// Waits until no call is pending, or `limit` has passed.
    async fn await_replies(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let completed = self.completed.notified();
            tokio::pin!(completed);
            completed.as_mut().enable();
            if self.lock().protocol.in_flight() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, completed).await.is_err() {
                return;
            }
        }
    }

    fn connection_lost(self: &Arc<Self>, reason: String) {
        let mut state = self.lock();
        state.protocol.connection_lost(reason);
        self.pump(&mut state);
    }

    /// Carries out the state machine's outputs. Called after every input, with
    /// the lock held; never blocks.
    fn pump(self: &Arc<Self>, state: &mut State) {
        while let Some(output) = state.protocol.poll_output() {
            match output {
                ClientOutput::Transmit(Message::Call(call)) => {
                    let (stop_tx, stop_rx) = oneshot::channel();
                    state.streams.insert(call.request_id, stop_tx);
                    if state.claim_calls && state.claimed.is_none() {
                        // `start_call` sends it from the caller, after the lock.
                        state.claimed = Some((call, stop_rx));
                    } else {
                        tokio::spawn(run_call(self.clone(), call, stop_rx));
                    }
                }
                ClientOutput::Transmit(message) => {
                    let _ = self.control.send(Control::Send(message));
                }
                ClientOutput::Completed { id, result } => {
                    if let Some(stream) = state.streams.remove(&id) {
                        let code = match &result {
                            Err(CallError::DeadlineExceeded { .. }) => StreamCode::Expired,
                            _ => StreamCode::Cancelled,
                        };
                        let _ = stream.send(code);
                    }
                    self.completed.notify_waiters();
                    if let Some(waiter) = state.waiters.remove(&id) {
                        self.deliver(waiter, result);
                    }
                }
                ClientOutput::Close => {
                    let _ = self.control.send(Control::Close);
                    self.finished.notify_one();
                    self.timer.notify_one();
                }
                _ => {}
            }
        }
        // Wake the timer only if it must fire earlier than it is set to: a
        // wake-up per call would cost a context switch per call.
        let next = state.protocol.poll_timeout();
        if next.is_some_and(|next| state.timer_armed.is_none_or(|armed| next < armed)) {
            state.timer_armed = next;
            self.timer.notify_one();
        }
    }

    /// Hands a completed call's result to its caller, or, for a call lost
    /// with its connection that may be sent again (idempotent, or never
    /// sent), starts it again on the next connection.
    /// Called from `pump`, with the state lock held. (It takes the call's slot
    /// lock; only `start_call` holds a slot lock while taking a state lock,
    /// and it has released this call's slot by the time the call is a waiter.)
    fn deliver(&self, mut waiter: Waiter, result: Result<Tree, CallError>) {
        let result = match result {
            Err(error) if waiter.resend.is_some() && lost_with_connection(&error) => {
                let client = self
                    .client
                    .upgrade()
                    .filter(|client| client.reconnect.is_some() && !client.is_closed());
                match (client, waiter.resend.take()) {
                    (Some(client), Some(resend)) => {
                        tracing::debug!(method = %waiter.method, %error, "sending a lost call again on the next connection");
                        *waiter.slot.lock().unwrap_or_else(|p| p.into_inner()) = Slot::Queued;
                        let request = CallRequest {
                            method: waiter.method,
                            args: resend.args,
                            timeout: resend.timeout,
                            deadline: resend.deadline,
                            idempotent: waiter.idempotent,
                            slot: waiter.slot,
                            result: waiter.result,
                        };
                        start_later(client, request, Some(waiter.permit));
                        return;
                    }
                    _ => Err(error),
                }
            }
            result => result,
        };
        drop(waiter.permit);
        if let Err(Err(Error::Call(error))) = waiter.result.send(result.map_err(Error::Call)) {
            // Nobody awaits this call: keep its failure for the next call (a
            // cancel or this client's own close is not a failure).
            let expected = matches!(error, CallError::Cancelled | CallError::Closed);
            if let (false, Some(client)) = (expected, self.client.upgrade()) {
                client.keep_unobserved(waiter.method, error);
            }
        }
    }

    /// The stream of `call` could not be opened, so the call was never sent:
    /// if the connection is gone and the client reconnects, the call is sent
    /// on the next connection whether or not it is idempotent.
    fn open_failed(self: &Arc<Self>, call: Call, error: TransportError) {
        let id = call.request_id;
        if error.is_connection_error() {
            let mut state = self.lock();
            if let Some(waiter) = state.waiters.get_mut(&id) {
                if waiter.resend.is_none() {
                    // The deadline counts from now rather than from the
                    // call's start: later by the microseconds in between.
                    waiter.resend = Some(Resend {
                        deadline: call.timeout.map(|t| tokio::time::Instant::now() + t),
                        timeout: call.timeout,
                        args: call.args,
                    });
                }
            }
        }
        self.on_reply(id, Err(error));
    }

    /// A reply (or its absence) arrived on the stream of call `id`.
    fn on_reply(
        self: &Arc<Self>,
        id: RequestId,
        received: Result<Option<Message>, TransportError>,
    ) {
        let mut state = self.lock();
        state.streams.remove(&id);
        let now = self.now();
        match received {
            Ok(Some(Message::Reply(reply))) if reply.request_id == id => {
                let _ = state.protocol.handle_message(now, Message::Reply(reply));
            }
            // The server could not read the call, so it did not know its id.
            Ok(Some(Message::Reply(Reply {
                request_id: 0,
                result: Err(error),
            }))) => {
                let reply = Reply {
                    request_id: id,
                    result: Err(error),
                };
                let _ = state.protocol.handle_message(now, Message::Reply(reply));
            }
            Ok(Some(other)) => {
                let what = match &other {
                    Message::Reply(r) => format!("a reply for request {}", r.request_id),
                    m => format!("a {:?} message", m.kind()),
                };
                state
                    .protocol
                    .protocol_violation(now, format!("the stream of call {id} carried {what}"));
            }
            Ok(None) => {
                state.protocol.reply_failed(
                    id,
                    now,
                    "the server finished the call's stream without a reply",
                );
            }
            Err(e) if e.is_connection_error() => {
                state.protocol.connection_lost(e.to_string());
            }
            Err(e) => {
                state.protocol.reply_failed(id, now, e.to_string());
            }
        }
        self.pump(&mut state);
    }
}

/// Carries one call in a task of its own: opens its stream (waiting for the
/// server's stream limit), writes the call, reads the reply.
async fn run_call(inner: Arc<Inner>, call: Call, mut stop: oneshot::Receiver<StreamCode>) {
    let id = call.request_id;
    let opened = tokio::select! {
        opened = inner.connection.open_stream() => opened,
        _ = &mut stop => return,
    };
    let (mut send, mut recv) = match opened {
        Ok(streams) => streams,
        Err(e) => return inner.open_failed(call, e),
    };
    let outgoing = match Outgoing::new(&Message::Call(call)) {
        Ok(outgoing) => outgoing,
        Err(e) => return inner.on_reply(id, Err(e)),
    };
    let received = {
        let exchange = exchange(&inner, &mut send, &mut recv, outgoing);
        tokio::pin!(exchange);
        tokio::select! {
            received = &mut exchange => Ok(received),
            code = &mut stop => Err(code),
        }
    };
    match received {
        Ok(received) => inner.on_reply(id, received),
        Err(code) => abandon(&mut send, &mut recv, code),
    }
}

/// Reads the reply of a call already sent.
async fn read_reply(
    inner: Arc<Inner>,
    id: RequestId,
    mut send: SendStream,
    mut recv: RecvStream,
    mut stop: oneshot::Receiver<StreamCode>,
) {
    let received = {
        let reading = receive_reply(&inner, &mut recv);
        tokio::pin!(reading);
        tokio::select! {
            received = &mut reading => Ok(received),
            code = &mut stop => Err(code),
        }
    };
    match received {
        Ok(received) => inner.on_reply(id, received),
        Err(code) => abandon(&mut send, &mut recv, code),
    }
}

/// The call was cancelled or expired: abandon both directions of its stream so
/// neither side keeps moving bytes nobody wants.
fn abandon(
    send: &mut SendStream,
    recv: &mut RecvStream,
    code: Result<StreamCode, oneshot::error::RecvError>,
) {
    let code = code.unwrap_or(StreamCode::Cancelled);
    send.reset(code);
    recv.stop(code);
}

async fn exchange(
    inner: &Inner,
    send: &mut SendStream,
    recv: &mut RecvStream,
    mut outgoing: Outgoing,
) -> Result<Option<Message>, TransportError> {
    match send.send_outgoing(&mut outgoing).await {
        Ok(()) => send.finish(),
        // The server refused the call before reading it all; its reply says why.
        Err(TransportError::StreamStopped(_)) => {}
        Err(e) => return Err(e),
    }
    // The arguments' buffers are released as soon as they are sent.
    drop(outgoing);
    receive_reply(inner, recv).await
}

async fn receive_reply(
    inner: &Inner,
    recv: &mut RecvStream,
) -> Result<Option<Message>, TransportError> {
    let reply = recv.receive(|_| inner.heard()).await;
    recv.try_finish();
    reply
}

async fn write_control(
    mut send: SendStream,
    mut queue: mpsc::UnboundedReceiver<Control>,
    connection: Connection,
) {
    while let Some(item) = queue.recv().await {
        match item {
            Control::Send(message) => {
                if send.send(&message).await.is_err() {
                    return;
                }
            }
            Control::Close => {
                send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                connection.close(CloseCode::Normal, "the client closed the connection");
                return;
            }
        }
    }
}

async fn read_control(mut recv: RecvStream, inner: Arc<Inner>) {
    loop {
        let received = recv.receive(|_| inner.heard()).await;
        if let Ok(Some(Message::Goodbye(_))) = &received {
            // The server sent its replies before the Goodbye, but on other
            // streams: let their readers finish first (bounded).
            inner.await_replies(GOODBYE_REPLY_WAIT).await;
        }
        let mut state = inner.lock();
        let now = inner.now();
        match received {
            Ok(Some(message)) => {
                let _ = state.protocol.handle_message(now, message);
            }
            Ok(None) => {
                state
                    .protocol
                    .protocol_violation(now, "the server ended the control stream");
            }
            Err(e) if e.is_connection_error() => {
                state.protocol.connection_lost(e.to_string());
            }
            Err(e) => {
                state
                    .protocol
                    .protocol_violation(now, format!("the control stream failed: {e}"));
            }
        }
        inner.pump(&mut state);
        if state.protocol.is_closed() {
            return;
        }
    }
}

async fn run_timer(inner: Arc<Inner>) {
    loop {
        let notified = inner.timer.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut state = inner.lock();
            if state.protocol.is_closed() {
                return;
            }
            inner.fold_heard(&mut state);
            state.timer_armed = state.protocol.poll_timeout();
            state.timer_armed
        };
        match next {
            Some(at) => {
                let wait = at.since_origin().saturating_sub(inner.now().since_origin());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        let mut state = inner.lock();
                        inner.fold_heard(&mut state);
                        let now = inner.now();
                        state.protocol.handle_timeout(now);
                        inner.pump(&mut state);
                    }
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// True if `error` ended the call because its connection ended (not by this
/// client's own close): a call the next connection may carry again.
fn lost_with_connection(error: &CallError) -> bool {
    error.is_connection_error() && !matches!(error, CallError::Closed)
}

async fn watch_connection(inner: Arc<Inner>) {
    let reason = inner.connection.closed().await;
    inner.connection_lost(reason.to_string());
    // Wake the timer so it sees the closed state and ends.
    inner.timer.notify_one();
}
