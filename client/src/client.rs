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
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

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
    /// The blocking client's runtime could not be started.
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The call failed: the function's own error ([`CallError::Remote`]), a
    /// deadline, a cancel, or the connection.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Error {
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
    target: String,
    server_name: Option<String>,
    tls: Option<ClientTls>,
    identity: Option<Identity>,
    protocol: ClientConfig,
    transport: TransportConfig,
    limits: Limits,
    connect_timeout: Duration,
    raise_unobserved: bool,
}

impl ClientBuilder {
    /// Trust only the server whose certificate has this SHA-256 fingerprint
    /// (what a server with a self-signed certificate prints).
    pub fn pin(mut self, fingerprint: Fingerprint) -> Self {
        self.tls = Some(ClientTls::pinned(fingerprint));
        self
    }

    /// Trust servers as `tls` says (CA roots, pins, ...).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Trust any server. The connection is encrypted but not authenticated:
    /// anyone on the path can impersonate the server. Tests only.
    pub fn insecure_skip_verification(mut self) -> Self {
        self.tls = Some(ClientTls::insecure_skip_verification());
        self
    }

    /// Present this certificate to servers that require one (mutual TLS).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The name the server's certificate must carry when trusting CA roots.
    /// Default: the host of the target (`"example.com"` for
    /// `"example.com:4433"`, the IP address for an address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
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
        self.protocol.token = Some(token.into());
        self
    }

    /// Calls in flight at once; more wait their turn in order. Default 16.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.protocol.max_in_flight = max_in_flight.max(1);
        self
    }

    /// The timeout of calls made without one. Default none.
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.protocol.default_timeout = timeout;
        self
    }

    /// Ping a server silent this long while calls are pending. Default 5 s.
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.protocol.ping_interval = interval;
        self
    }

    /// Declare a server silent this long while calls are pending dead and fail
    /// its calls. Default 30 s.
    pub fn max_age(mut self, max_age: Option<Duration>) -> Self {
        self.protocol.max_age = max_age;
        self
    }

    /// QUIC windows and timers.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = transport;
        self
    }

    /// Bounds on every reply received.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long connecting may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects, completes the TLS handshake and the `Hello` exchange. Must be
    /// called inside a tokio runtime.
    pub async fn connect(self) -> Result<Client, Error> {
        let target = self.target.clone();
        let timeout = self.connect_timeout;
        let addrs = resolve(&target).await?;
        match tokio::time::timeout(timeout, self.connect_to(addrs)).await {
            Ok(result) => result,
            Err(_) => Err(Error::ConnectTimeout { target, timeout }),
        }
    }

    async fn connect_to(self, addrs: Vec<SocketAddr>) -> Result<Client, Error> {
        let target = self.target.clone();
        let fail = |error| Error::Connect {
            target: target.clone(),
            error,
        };
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&self.target));
        let mut tls = self.tls.ok_or_else(|| {
            fail(TransportError::Tls(
                "no way to trust the server was chosen: pin its fingerprint, give CA roots, or \
                 (tests only) skip verification"
                    .into(),
            ))
        })?;
        if let Some(identity) = self.identity {
            tls = tls.with_identity(identity);
        }
        let connector = Connector::new(&tls, &self.transport, self.limits).map_err(fail)?;
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
        let mut protocol = ClientProtocol::new(self.protocol, Timestamp::ZERO);
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
        let max_in_flight = protocol.config().max_in_flight;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                protocol,
                waiters: HashMap::new(),
                streams: HashMap::new(),
                unobserved: None,
                timer_armed: None,
                claim_calls: false,
                claimed: None,
            }),
            runtime: tokio::runtime::Handle::current(),
            raise_unobserved: self.raise_unobserved,
            has_unobserved: AtomicBool::new(false),
            connection: connection.clone(),
            _connector: connector,
            origin,
            last_heard: AtomicU64::new(0),
            control: control_tx,
            timer: Notify::new(),
            completed: Notify::new(),
            capacity: Arc::new(Semaphore::new(max_in_flight)),
        });
        tokio::spawn(write_control(control_send, control_rx, connection.clone()));
        tokio::spawn(read_control(control_recv, inner.clone()));
        tokio::spawn(run_timer(inner.clone()));
        tokio::spawn(watch_connection(inner.clone()));
        Ok(Client {
            handle: Arc::new(Handle { inner }),
        })
    }
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

/// A connection to a server. Cheap to clone; every clone shares the
/// connection, which closes when the last clone is dropped (or on
/// [`close`](Client::close)).
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Dropped when the last `Client` clone is: closes the connection. The driving
/// tasks hold `Inner`, not this, so they do not keep it alive.
#[derive(Debug)]
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Client {
    /// A builder for a connection to `target`: `"host:port"` (names are
    /// resolved), `"[::1]:4433"`, or a `SocketAddr`. Choose how to trust the server
    /// ([`pin`](ClientBuilder::pin) or [`tls`](ClientBuilder::tls)) before
    /// connecting.
    pub fn builder(target: impl std::fmt::Display) -> ClientBuilder {
        ClientBuilder {
            target: target.to_string(),
            server_name: None,
            raise_unobserved: true,
            tls: None,
            identity: None,
            protocol: ClientConfig::default(),
            transport: TransportConfig::default(),
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Calls the function bound as `method` on `args`, with the default timeout.
    ///
    /// The call is sent at once (or as soon as fewer than `max_in_flight` calls
    /// are pending); the returned future resolves to the result. Dropping the
    /// future does not stop the call (use [`PendingCall::cancel`]); if it then
    /// fails, the next call returns [`Error::Unobserved`].
    pub fn call(&self, method: impl Into<String>, args: Tree) -> PendingCall {
        self.start(method.into(), args, None)
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
        self.start(method.into(), args, Some(timeout))
    }

    fn start(&self, method: String, args: Tree, timeout: Option<Duration>) -> PendingCall {
        let inner = self.handle.inner.clone();
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(Mutex::new(Slot::Queued));
        let unobserved = if inner.has_unobserved.load(Ordering::Acquire) {
            inner.has_unobserved.store(false, Ordering::Release);
            inner.lock().unobserved.take()
        } else {
            None
        };
        if let Some((method, error)) = unobserved {
            return PendingCall {
                result: rx,
                slot,
                inner: Arc::downgrade(&inner),
                early: Some(Error::Unobserved { method, error }),
                driver: None,
            };
        }
        let driver = match inner.capacity.clone().try_acquire_owned() {
            Ok(permit) => inner.start_call(&slot, method, args, timeout, tx, permit),
            Err(_) => {
                // At capacity: wait for a turn in a task, so the call still goes
                // out whether or not the future is polled. The semaphore is fair.
                let (inner, slot) = (inner.clone(), slot.clone());
                tokio::spawn(async move {
                    let Ok(permit) = inner.capacity.clone().acquire_owned().await else {
                        return;
                    };
                    let started = inner.start_call(&slot, method, args, timeout, tx, permit);
                    if let Some(driver) = started {
                        driver.await;
                    }
                });
                None
            }
        };
        PendingCall {
            result: rx,
            slot,
            inner: Arc::downgrade(&self.handle.inner),
            early: None,
            driver,
        }
    }

    /// Calls pending now (sent and not yet answered).
    pub fn in_flight(&self) -> usize {
        self.handle.inner.lock().protocol.in_flight()
    }

    /// The server's agent string from its `Hello`.
    pub fn server_agent(&self) -> Option<String> {
        self.handle
            .inner
            .lock()
            .protocol
            .peer_agent()
            .map(str::to_owned)
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.handle.inner.connection.rtt()
    }

    /// True once the connection is finished (closed, lost, or the server left).
    pub fn is_closed(&self) -> bool {
        self.handle.inner.lock().protocol.is_closed()
    }

    /// Closes the connection: pending calls fail with [`CallError::Closed`],
    /// the server is told goodbye. Returns at once; await
    /// [`closed`](Self::closed) to know the server was told.
    pub fn close(&self) {
        self.handle.inner.close();
    }

    /// Waits until the connection is closed (by [`close`](Self::close), by the
    /// server, or by a failure) and says why.
    pub async fn closed(&self) -> TransportError {
        self.handle.inner.connection.closed().await
    }
}

/// Where a call is: waiting for a turn, started with an id, or abandoned by
/// its caller before it started.
#[derive(Debug)]
enum Slot {
    Queued,
    Started(RequestId),
    Abandoned,
}

/// A call in flight: a future of its result.
///
/// Dropping it does not stop the call: it runs to the end, and if it fails,
/// the next call on the client reports the error (see
/// [`ClientBuilder::raise_unobserved_errors`]). To stop it, [`cancel`](Self::cancel).
pub struct PendingCall {
    result: oneshot::Receiver<Result<Tree, CallError>>,
    slot: Arc<Mutex<Slot>>,
    inner: std::sync::Weak<Inner>,
    /// An error to return without waiting (an earlier call's unobserved failure).
    early: Option<Error>,
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
    /// The call's request id, once it has been sent.
    pub fn id(&self) -> Option<RequestId> {
        match *self.slot.lock().unwrap_or_else(|p| p.into_inner()) {
            Slot::Started(id) => Some(id),
            _ => None,
        }
    }

    /// Cancels the call: the future resolves to [`CallError::Cancelled`] (unless
    /// the result was already in), the server is told to drop it, and a call
    /// still waiting for its turn is never sent.
    pub fn cancel(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match *slot {
            Slot::Started(id) => {
                drop(slot);
                if let Some(inner) = self.inner.upgrade() {
                    inner.cancel(id);
                }
            }
            Slot::Queued => *slot = Slot::Abandoned,
            Slot::Abandoned => {}
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // Nobody will poll the reply in: a task finishes the call.
        if let (Some(driver), Some(inner)) = (self.driver.take(), self.inner.upgrade()) {
            inner.runtime.spawn(driver);
        }
    }
}

impl Future for PendingCall {
    type Output = Result<Tree, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(error) = self.early.take() {
            return Poll::Ready(Err(error));
        }
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
        match Pin::new(&mut self.result).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result.map_err(Error::Call)),
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
    result: oneshot::Sender<Result<Tree, CallError>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct State {
    protocol: ClientProtocol,
    waiters: HashMap<RequestId, Waiter>,
    /// Stops the task carrying a call's stream, with the code to reset it with.
    streams: HashMap<RequestId, oneshot::Sender<StreamCode>>,
    /// The first failure of a call nobody awaited, for the next call to report.
    unobserved: Option<(String, CallError)>,
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
    capacity: Arc<Semaphore>,
    raise_unobserved: bool,
    /// Whether `State::unobserved` holds an error: spares each call the lock.
    has_unobserved: AtomicBool,
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
    fn start_call(
        self: &Arc<Self>,
        slot: &Mutex<Slot>,
        method: String,
        args: Tree,
        timeout: Option<Duration>,
        result: oneshot::Sender<Result<Tree, CallError>>,
        permit: OwnedSemaphorePermit,
    ) -> Option<Driver> {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*slot, Slot::Abandoned) {
            return None;
        }
        let mut state = self.lock();
        let now = self.now();
        match state
            .protocol
            .start_call(now, method.clone(), args, timeout)
        {
            Ok(id) => {
                *slot = Slot::Started(id);
                drop(slot);
                state.waiters.insert(
                    id,
                    Waiter {
                        method,
                        result,
                        _permit: permit,
                    },
                );
                state.claim_calls = true;
                self.pump(&mut state);
                state.claim_calls = false;
                let claimed = state.claimed.take();
                drop(state);
                claimed.and_then(|(call, stop)| self.clone().send_now(call, stop))
            }
            Err(e) => {
                let cause = match e {
                    teleport_protocol::client::StartCallError::Closed { cause } => cause,
                    _ => CallError::Closed,
                };
                let _ = result.send(Err(cause));
                None
            }
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
                self.on_reply(id, Err(e));
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
                        if let Err(Err(error)) = waiter.result.send(result) {
                            // Nobody awaits this call: keep its failure for the
                            // next call (a cancel or this client's own close is
                            // not a failure).
                            let expected =
                                matches!(error, CallError::Cancelled | CallError::Closed);
                            if self.raise_unobserved && !expected && state.unobserved.is_none() {
                                state.unobserved = Some((waiter.method, error));
                                self.has_unobserved.store(true, Ordering::Release);
                            }
                        }
                    }
                }
                ClientOutput::Close => {
                    let _ = self.control.send(Control::Close);
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
        Err(e) => return inner.on_reply(id, Err(e)),
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

async fn watch_connection(inner: Arc<Inner>) {
    let reason = inner.connection.closed().await;
    inner.connection_lost(reason.to_string());
    // Wake the timer so it sees the closed state and ends.
    inner.timer.notify_one();
}
