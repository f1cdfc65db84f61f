//! The driver of a client's [`ClientProtocol`]: it opens the connections the
//! machine asks for, carries its messages and calls, feeds back what arrives,
//! and wakes the callers whose calls completed. It decides nothing itself.
//!
//! The machine sits behind one lock with, per call, the slot its caller's
//! future polls, and per connection, the transport handles. Every input (a
//! call started, a reply read, a timer firing) is fed under the lock and
//! followed by [`pump`](Driver::pump), which carries out the outputs.

use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use teleport_protocol::client::{
    CallError, CallOptions, ClientConfig, ClientOutput, ClientProtocol, ConnId, ConnectError,
    ConnectFailure, ReplyFailure, StartCallError,
};
use teleport_protocol::{Call, Limits, Message, Reply, RequestId, StreamCode, Timestamp, Tree};
use teleport_quic::driver::{read_control, spawn_control_writer, Clock, ControlSender, Timer};
use teleport_quic::{
    Address, AddressError, ClientTls, Connection, Connector, Identity, RecvStream, SendStream,
    Traffic, TransportConfig, TransportError,
};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::call_io::{self, CallIo, Sent};

/// What opening a connection needs.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// The server's address as written, for messages.
    pub(crate) target: String,
    /// The server's address, or why what was written is not one (reported
    /// by the first connection attempt).
    pub(crate) address: Result<Address, AddressError>,
    pub(crate) server_name: Option<String>,
    pub(crate) tls: Option<ClientTls>,
    pub(crate) identity: Option<Identity>,
    pub(crate) transport: TransportConfig,
    pub(crate) limits: Limits,
    /// The server dialled this side: its one connection attempt, taken by the
    /// first connection (see [`Client::dialed_in`](crate::Client::dialed_in)).
    pub(crate) dialed_in: Option<crate::dialed::DialedIn>,
}

/// One call as its caller's future sees it.
#[derive(Default)]
struct CallSlot {
    result: Option<Result<Tree, CallError>>,
    /// The method, kept only with an error result, for reporting it if the
    /// caller drops the future without reading it.
    method: Option<String>,
    waker: Option<Waker>,
    /// The work left on the call's stream, while nobody polls it.
    io: Option<CallIo>,
    /// Abandons the call's stream.
    stop: Option<oneshot::Sender<StreamCode>>,
    /// The caller dropped its future.
    abandoned: bool,
}

/// One connection's transport handles.
#[derive(Default)]
struct ConnIo {
    connection: Option<Connection>,
    control: Option<ControlSender>,
    /// The task opening it, until it is open.
    opening: Option<JoinHandle<()>>,
    /// Calls waiting for stream credit, in order, and whether a task opens
    /// streams for them.
    waiting: VecDeque<(Call, oneshot::Receiver<StreamCode>)>,
    opener: bool,
}

struct State {
    machine: ClientProtocol,
    calls: HashMap<RequestId, CallSlot>,
    conns: HashMap<ConnId, ConnIo>,
    /// The answers to `connect()`, numbered so each waiter takes its own.
    connect_results: u64,
    last_connect_result: Option<Result<(), ConnectError>>,
    connector: Option<Arc<Connector>>,
    /// Why the last connection closed, for `Client::closed`.
    last_close: Option<String>,
    /// What the connections that ended moved, for `Client::stats`.
    ended_traffic: Traffic,
}

/// A client's shared state and driver. See the [module docs](self).
pub(crate) struct Driver {
    state: Mutex<State>,
    timer: Timer,
    clock: Clock,
    settings: Settings,
    runtime: tokio::runtime::Handle,
    /// When bytes last arrived, in µs of the clock: written per chunk without
    /// the lock, folded into the machine before it looks at time.
    last_heard: AtomicU64,
    /// Signalled on every `connect()` answer and when the client is closed.
    changed: Notify,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("target", &self.settings.target)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver for a client that is not connected yet. Must be called inside
    /// a tokio runtime.
    pub(crate) fn new(settings: Settings, config: ClientConfig) -> Arc<Driver> {
        let clock = Clock::new();
        let driver = Arc::new(Driver {
            state: Mutex::new(State {
                machine: ClientProtocol::new(clock.now(), config),
                calls: HashMap::default(),
                conns: HashMap::default(),
                connect_results: 0,
                last_connect_result: None,
                connector: None,
                last_close: None,
                ended_traffic: Traffic::default(),
            }),
            timer: Timer::new(),
            clock,
            settings,
            runtime: tokio::runtime::Handle::current(),
            last_heard: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let timer = driver.clone();
        driver.runtime.spawn(async move {
            let driver = &timer;
            driver
                .timer
                .run(
                    &driver.clock,
                    &driver.state,
                    |state| state.machine.poll_timeout(),
                    |state, now| {
                        driver.fold_heard(state);
                        state.machine.handle_timeout(now);
                        driver.pump(state);
                    },
                )
                .await
        });
        driver
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The machine's counts and what the connections moved.
    pub(crate) fn stats(&self) -> crate::ClientStats {
        let state = self.lock();
        let mut traffic = state.ended_traffic;
        for io in state.conns.values() {
            if let Some(connection) = &io.connection {
                traffic += connection.traffic();
            }
        }
        let counts = state.machine.counts();
        crate::ClientStats {
            calls_started: counts.started,
            calls_succeeded: counts.succeeded,
            calls_failed: counts.failed,
            calls_resent: counts.resent,
            in_flight: state.machine.in_flight(),
            queued: state.machine.queued(),
            connected: state.machine.is_connected(),
            connections: counts.connections,
            bytes_sent: traffic.bytes_sent,
            bytes_received: traffic.bytes_received,
            packets_lost: traffic.packets_lost,
            congestion_events: traffic.congestion_events,
        }
    }

    pub(crate) fn target(&self) -> &str {
        &self.settings.target
    }

    /// Bytes arrived from the server.
    pub(crate) fn heard(&self) {
        let micros = u64::try_from(self.now().since_origin().as_micros()).unwrap_or(u64::MAX);
        self.last_heard.fetch_max(micros, Ordering::Relaxed);
    }

    fn fold_heard(&self, state: &mut State) {
        if let Some(conn) = state.machine.connection() {
            let micros = self.last_heard.load(Ordering::Relaxed);
            state
                .machine
                .heard_from_peer(Timestamp::from_micros(micros), conn);
        }
    }

    /// Feeds one input and carries out what follows.
    fn feed(self: &Arc<Self>, input: impl FnOnce(&mut ClientProtocol, Timestamp)) {
        let mut state = self.lock();
        let now = self.now();
        input(&mut state.machine, now);
        self.pump(&mut state);
    }

    // ----- the application -----

    /// Connects (if not connected) and waits for the machine's answer.
    pub(crate) async fn connect(self: &Arc<Self>) -> Result<(), ConnectError> {
        let asked = {
            let mut state = self.lock();
            let asked = state.connect_results;
            let now = self.now();
            state.machine.connect(now);
            self.pump(&mut state);
            asked
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.connect_results > asked {
                    if let Some(result) = &state.last_connect_result {
                        return result.clone();
                    }
                }
            }
            changed.await;
        }
    }

    /// Starts connecting in the background, without waiting.
    pub(crate) fn connect_in_background(self: &Arc<Self>) {
        self.feed(|machine, now| machine.connect(now));
    }

    pub(crate) fn start_call(
        self: &Arc<Self>,
        method: String,
        args: Tree,
        options: CallOptions,
    ) -> Result<RequestId, StartCallError> {
        let mut state = self.lock();
        let now = self.now();
        let id = state.machine.start_call(now, method, args, options)?;
        state.calls.insert(id, CallSlot::default());
        self.pump(&mut state);
        Ok(id)
    }

    /// Polls call `id` for its result, reading its reply here if it is
    /// this future's to read.
    pub(crate) fn poll_call(
        self: &Arc<Self>,
        id: RequestId,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Tree, CallError>> {
        loop {
            let mut io = {
                let mut state = self.lock();
                let Some(slot) = state.calls.get_mut(&id) else {
                    // Completed and taken: only an abandoned call's end.
                    return Poll::Ready(Err(CallError::Cancelled));
                };
                if let Some(result) = slot.result.take() {
                    state.calls.remove(&id);
                    return Poll::Ready(result);
                }
                slot.waker = Some(cx.waker().clone());
                match slot.io.take() {
                    Some(io) => io,
                    None => return Poll::Pending,
                }
            };
            if io.as_mut().poll(cx).is_ready() {
                // The reply was read and fed: the result is in the slot.
                continue;
            }
            // Back into the slot: whoever must make it progress finds it there.
            let mut state = self.lock();
            match state.calls.get_mut(&id) {
                Some(slot) if slot.result.is_none() => slot.io = Some(io),
                // Completed meanwhile (cancelled, expired): the stream still
                // has to be abandoned.
                _ => drop(self.runtime.spawn(io)),
            }
            return Poll::Pending;
        }
    }

    pub(crate) fn cancel(self: &Arc<Self>, id: RequestId) {
        self.feed(|machine, now| {
            machine.cancel(now, id);
        });
    }

    /// The caller's future of call `id` was dropped before it was read.
    pub(crate) fn abandon(self: &Arc<Self>, id: RequestId) {
        let mut state = self.lock();
        let now = self.now();
        let Some(slot) = state.calls.get_mut(&id) else {
            return;
        };
        if let Some(result) = slot.result.take() {
            // Completed, never read: an error is reported by the next call.
            let method = slot.method.take();
            state.calls.remove(&id);
            if let (Err(error), Some(method)) = (result, method) {
                state.machine.report_unobserved(now, method, error);
            }
            return;
        }
        slot.abandoned = true;
        slot.waker = None;
        if let Some(io) = slot.io.take() {
            drop(self.runtime.spawn(io));
        }
        state.machine.abandon(now, id);
        self.pump(&mut state);
    }

    pub(crate) fn close(self: &Arc<Self>) {
        self.feed(|machine, now| machine.close(now));
    }

    /// Waits until the client is closed and its connection with it; says why
    /// the last connection closed.
    pub(crate) async fn closed(&self) -> String {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.machine.is_finished() || state.machine.is_lost() {
                    return state
                        .last_close
                        .clone()
                        .unwrap_or_else(|| "the client was closed".to_owned());
                }
            }
            changed.await;
        }
    }

    pub(crate) fn with_machine<T>(&self, f: impl FnOnce(&ClientProtocol) -> T) -> T {
        f(&self.lock().machine)
    }

    /// The round-trip time of the connection in use.
    pub(crate) fn rtt(&self) -> std::time::Duration {
        let state = self.lock();
        state
            .machine
            .connection()
            .and_then(|conn| state.conns.get(&conn))
            .and_then(|io| io.connection.as_ref())
            .map_or(std::time::Duration::ZERO, Connection::rtt)
    }

    // ----- the transport -----

    fn connected(
        self: &Arc<Self>,
        conn: ConnId,
        connection: Connection,
        send: SendStream,
        recv: RecvStream,
    ) {
        let control = {
            // Weak: the driver holds the writer, not the other way round.
            let driver = Arc::downgrade(self);
            spawn_control_writer(send, move || {
                if let Some(driver) = driver.upgrade() {
                    driver.feed(|machine, now| machine.goodbye_acknowledged(now, conn));
                }
            })
        };
        {
            let mut state = self.lock();
            let Some(io) = state.conns.get_mut(&conn) else {
                // Abandoned while it opened.
                connection.close(teleport_protocol::CloseCode::Normal, "no longer wanted");
                return;
            };
            io.opening = None;
            io.connection = Some(connection.clone());
            io.control = Some(control);
            let now = self.now();
            state.machine.connected(now, conn);
            self.pump(&mut state);
        }
        let driver = self.clone();
        self.runtime.spawn(read_control(
            recv,
            {
                let driver = self.clone();
                move |_| driver.heard()
            },
            move |received| driver.control_received(conn, received),
        ));
        let driver = self.clone();
        self.runtime.spawn(async move {
            let reason = connection.closed().await;
            let mut state = driver.lock();
            state.last_close = Some(reason.to_string());
            // Its handles go with it.
            if let Some(connection) = state.conns.remove(&conn).and_then(|io| io.connection) {
                state.ended_traffic += connection.traffic();
            }
            let now = driver.now();
            state.machine.connection_lost(now, conn, reason.to_string());
            driver.pump(&mut state);
        });
    }

    fn connect_failed(self: &Arc<Self>, conn: ConnId, failure: ConnectFailure) {
        tracing::debug!(server = %self.settings.target, %failure, "connection attempt failed");
        let mut state = self.lock();
        state.conns.remove(&conn);
        let now = self.now();
        state.machine.connect_failed(now, conn, failure);
        self.pump(&mut state);
    }

    fn control_received(
        self: &Arc<Self>,
        conn: ConnId,
        received: Result<Option<Message>, TransportError>,
    ) -> bool {
        let mut state = self.lock();
        let now = self.now();
        let go_on = match received {
            Ok(Some(message)) => {
                if let Err(e) = state.machine.handle_message(now, conn, message) {
                    tracing::debug!(error = %e, "a server message was not accepted");
                }
                true
            }
            Ok(None) => {
                state.machine.control_ended(now, conn);
                false
            }
            // The watcher of the connection reports its loss.
            Err(e) if e.is_connection_error() => false,
            Err(e) => {
                state.machine.protocol_violation(
                    now,
                    conn,
                    format!("the control stream could not be read: {e}"),
                );
                false
            }
        };
        self.pump(&mut state);
        go_on && state.machine.connection() == Some(conn)
    }

    pub(crate) fn reply_received(self: &Arc<Self>, conn: ConnId, id: RequestId, reply: Reply) {
        self.feed(|machine, now| machine.reply_received(now, conn, id, reply));
    }

    pub(crate) fn reply_failed(
        self: &Arc<Self>,
        conn: ConnId,
        id: RequestId,
        failure: ReplyFailure,
    ) {
        self.feed(|machine, now| machine.reply_failed(now, conn, id, failure));
    }

    /// The stream of call `id` failed: a stream error fails the call alone, a
    /// connection error is the connection's loss.
    pub(crate) fn call_stream_failed(
        self: &Arc<Self>,
        conn: ConnId,
        id: RequestId,
        error: TransportError,
    ) {
        let failure = match error {
            e if e.is_connection_error() => {
                return self.feed(|machine, now| machine.connection_lost(now, conn, e.to_string()))
            }
            TransportError::StreamReset(code) | TransportError::StreamStopped(code) => {
                ReplyFailure::Reset(code)
            }
            TransportError::Decode(e) | TransportError::Truncated(e) if e.is_over_limit() => {
                ReplyFailure::OverLimit(e.to_string())
            }
            other => ReplyFailure::Malformed(other.to_string()),
        };
        self.reply_failed(conn, id, failure);
    }

    // ----- outputs -----

    /// Carries out the machine's outputs. Called after every input, with the
    /// lock held; never blocks.
    fn pump(self: &Arc<Self>, state: &mut State) {
        while let Some(output) = state.machine.poll_output() {
            match output {
                ClientOutput::Connect { conn } => {
                    let task = self.runtime.spawn(open_connection(self.clone(), conn));
                    state.conns.insert(
                        conn,
                        ConnIo {
                            opening: Some(task),
                            ..ConnIo::default()
                        },
                    );
                }
                ClientOutput::Transmit { conn, message } => {
                    if let Some(control) = state.conns.get(&conn).and_then(|io| io.control.as_ref())
                    {
                        control.send(message);
                    }
                }
                ClientOutput::Send { conn, call } => self.send(state, conn, call),
                ClientOutput::AbandonCall { id, code, .. } => {
                    if let Some(slot) = state.calls.get_mut(&id) {
                        if let Some(stop) = slot.stop.take() {
                            let _ = stop.send(code);
                        }
                        // Nobody may poll it now: run it, so it resets its stream.
                        if let Some(io) = slot.io.take() {
                            drop(self.runtime.spawn(io));
                        }
                    }
                }
                ClientOutput::CloseConnection { conn, code, reason } => {
                    if let Some(io) = state.conns.remove(&conn) {
                        if let Some(task) = io.opening {
                            task.abort();
                        }
                        if let Some(connection) = io.connection {
                            connection.close(code, &reason);
                            state.ended_traffic += connection.traffic();
                        }
                    }
                }
                ClientOutput::Completed { id, method, result } => {
                    let Some(slot) = state.calls.get_mut(&id) else {
                        continue;
                    };
                    if let Some(io) = slot.io.take() {
                        drop(self.runtime.spawn(io));
                    }
                    if slot.abandoned {
                        state.calls.remove(&id);
                        continue;
                    }
                    if result.is_err() {
                        slot.method = Some(method);
                    }
                    slot.result = Some(result);
                    if let Some(waker) = slot.waker.take() {
                        waker.wake();
                    }
                }
                ClientOutput::ConnectResult(result) => {
                    state.connect_results += 1;
                    state.last_connect_result = Some(result);
                    self.changed.notify_waiters();
                }
                _ => {}
            }
        }
        if state.machine.queued() > 0 {
            self.detach_unpolled(state);
        }
        if state.machine.is_finished() || state.machine.is_lost() {
            self.changed.notify_waiters();
        }
        if state.machine.is_finished() {
            self.timer.stop();
        } else {
            self.timer.rearm(state.machine.poll_timeout());
        }
    }

    /// Calls are waiting for a slot: replies that nobody is polling for now
    /// are read by tasks, so that results awaited in any order can never wait
    /// on each other.
    fn detach_unpolled(&self, state: &mut State) {
        for slot in state.calls.values_mut() {
            if let Some(io) = slot.io.take() {
                drop(self.runtime.spawn(io));
            }
        }
    }

    /// Sends `call` on `conn`: at once if a stream is free (its reply then
    /// read by the caller's future), otherwise in order once credit comes.
    fn send(self: &Arc<Self>, state: &mut State, conn: ConnId, call: Call) {
        let id = call.request_id;
        let (stop_tx, stop_rx) = oneshot::channel();
        if let Some(slot) = state.calls.get_mut(&id) {
            slot.stop = Some(stop_tx);
        }
        let Some(io) = state.conns.get_mut(&conn) else {
            return;
        };
        let Some(connection) = io.connection.clone() else {
            return;
        };
        let sent = if io.waiting.is_empty() {
            call_io::send_now(self, conn, &connection, call, stop_rx)
        } else {
            Sent::NoCredit(call, stop_rx)
        };
        match sent {
            Sent::ReadReply(reading) => {
                if let Some(slot) = state.calls.get_mut(&id) {
                    slot.io = Some(reading);
                    if let Some(waker) = slot.waker.take() {
                        waker.wake();
                    }
                }
            }
            Sent::Carry(carrying) => drop(self.runtime.spawn(carrying)),
            Sent::NoCredit(call, stop_rx) => {
                let io = state.conns.get_mut(&conn).expect("looked up above");
                io.waiting.push_back((call, stop_rx));
                if !io.opener {
                    io.opener = true;
                    self.runtime
                        .spawn(open_in_order(self.clone(), conn, connection));
                }
            }
        }
    }
}

/// Opens streams for the calls of `conn` that found no credit, one after
/// another in the order they were sent, and hands each to a task.
async fn open_in_order(driver: Arc<Driver>, conn: ConnId, connection: Connection) {
    loop {
        let next = {
            let mut state = driver.lock();
            let Some(io) = state.conns.get_mut(&conn) else {
                return;
            };
            match io.waiting.pop_front() {
                Some(next) => next,
                None => {
                    io.opener = false;
                    return;
                }
            }
        };
        let (call, stop) = next;
        let id = call.request_id;
        match connection.open_stream().await {
            Ok((send, recv)) => {
                drop(tokio::spawn(call_io::carry(
                    driver.clone(),
                    conn,
                    send,
                    recv,
                    call,
                    stop,
                )));
            }
            Err(e) => driver.call_stream_failed(conn, id, e),
        }
    }
}

/// Opens connection `conn`: resolves the name, connects (every address at
/// once; the first to answer wins), completes TLS and opens the control
/// stream. The machine bounds how long this may take.
async fn open_connection(driver: Arc<Driver>, conn: ConnId) {
    match open(&driver).await {
        Ok((connection, send, recv)) => driver.connected(conn, connection, send, recv),
        Err(failure) => driver.connect_failed(conn, failure),
    }
}

async fn open(
    driver: &Arc<Driver>,
) -> Result<(Connection, SendStream, RecvStream), ConnectFailure> {
    let settings = &driver.settings;
    if let Some(dialed_in) = &settings.dialed_in {
        return accept_dialed_in(dialed_in, &settings.limits).await;
    }
    // Resolved again by every attempt, so a server that moved is found.
    let address = settings
        .address
        .as_ref()
        .map_err(|e| ConnectFailure::Resolve(e.to_string()))?;
    let addrs = address
        .resolve_for_client()
        .await
        .map_err(|e| ConnectFailure::Resolve(e.to_string()))?;
    let connector = connector(driver)?;
    let server_name = settings
        .server_name
        .clone()
        .unwrap_or_else(|| address.host_name());
    let attempts = addrs
        .iter()
        .map(|&addr| Box::pin(connector.connect(addr, &server_name)));
    let connection = match futures_util::future::select_ok(attempts).await {
        Ok((connection, _slower)) => connection,
        Err(e) => return Err(connect_failure(e)),
    };
    let (send, recv) = connection.open_stream().await.map_err(connect_failure)?;
    Ok((connection, send, recv))
}

/// Completes the handshake of the server that dialled in and opens the
/// control stream; the server proves itself in its `Hello`.
async fn accept_dialed_in(
    dialed_in: &crate::dialed::DialedIn,
    limits: &Limits,
) -> Result<(Connection, SendStream, RecvStream), ConnectFailure> {
    let incoming = dialed_in.take().ok_or_else(|| {
        ConnectFailure::Spent(
            "the server that dialled in gave one connection, and it was refused or lost; \
             nothing can dial it back: it must dial again (a new client)"
                .to_owned(),
        )
    })?;
    let connection = incoming
        .accept()
        .map_err(connect_failure)?
        .await
        .map_err(connect_failure)?
        .with_limits(limits.clone());
    let (send, recv) = connection.open_stream().await.map_err(connect_failure)?;
    Ok((connection, send, recv))
}

/// The client's endpoint, made on first use and kept for every connection.
fn connector(driver: &Driver) -> Result<Arc<Connector>, ConnectFailure> {
    let mut state = driver.lock();
    if let Some(connector) = &state.connector {
        return Ok(connector.clone());
    }
    let settings = &driver.settings;
    let mut tls = settings.tls.clone().ok_or_else(|| {
        ConnectFailure::Tls(
            "no way to trust the server was chosen: pin its fingerprint, give CA roots, or \
             (tests only) skip verification"
                .into(),
        )
    })?;
    if let Some(identity) = settings.identity.clone() {
        tls = tls.with_identity(identity);
    }
    let connector = Connector::new(&tls, &settings.transport, settings.limits.clone())
        .map_err(connect_failure)?;
    let connector = Arc::new(connector);
    state.connector = Some(connector.clone());
    Ok(connector)
}

fn connect_failure(error: TransportError) -> ConnectFailure {
    if error.is_permanent() {
        ConnectFailure::Tls(error.to_string())
    } else {
        ConnectFailure::Unreachable(error.to_string())
    }
}
