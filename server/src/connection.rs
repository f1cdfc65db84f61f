//! One client connection: its control stream, its call streams, and the
//! [`ServerProtocol`] that decides what happens to each call.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use teleport_protocol::server::{ServerConfig, ServerOutput, ServerProtocol, SERVER_ERROR_TYPE};
use teleport_protocol::{ErrorKind, Message, RemoteError, Reply, RequestId, Timestamp, Tree};
use teleport_quic::{CloseCode, Connection, RecvStream, SendStream, StreamCode, TransportError};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

use crate::handler::Handler;
use crate::server::{HandlerFailure, Shared};

/// How long a new connection may take to open its control stream and send its
/// `Hello` before the server gives up on it.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// How long a graceful close waits for the client to close its side.
const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the control-stream writer is asked to do.
#[derive(Debug)]
enum Control {
    Send(Message),
    /// Finish the control stream, then close the connection.
    Close(CloseCode),
}

/// The state of one connection, behind one lock: the state machine plus the
/// routes from request ids to the streams and tasks serving them.
#[derive(Debug)]
struct State {
    protocol: ServerProtocol,
    /// Where each open call's reply goes: the task that owns its stream.
    replies: HashMap<RequestId, oneshot::Sender<Message>>,
    /// Calls the state machine admitted, waiting for their stream's task to
    /// run them (it runs the function itself: no extra task per call).
    admitted: HashMap<RequestId, (String, Tree)>,
    /// Dropping a call's sender stops its function (on cancel or expiry).
    running: HashMap<RequestId, oneshot::Sender<()>>,
    /// The time the timer task sleeps until (`None`: until woken).
    timer_armed: Option<Timestamp>,
}

/// A call ready to run: its function, its place in the server-wide count, and
/// the signal that stops it.
type Prepared = (Handler, RunningGuard, oneshot::Receiver<()>);

/// Holds one unit of the server-wide count of running calls.
struct RunningGuard(Arc<Shared>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running_total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The part of a connection the server holds, for shutdown.
#[derive(Debug)]
pub(crate) struct ConnectionHandle {
    state: Mutex<State>,
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    /// Wakes the timer task when the earliest deadline may have changed.
    timer: Notify,
    /// Signalled whenever a call ends or its reply is delivered, for draining.
    call_ended: Notify,
    /// Replies being written. A graceful close waits for them, so every reply
    /// is queued before the Goodbye.
    replies_in_transit: AtomicUsize,
    connection: Connection,
}

impl ConnectionHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds the state machine's outputs to the streams, tasks and timer.
    /// Called after every input, with the lock held.
    fn pump(self: &Arc<Self>, state: &mut State) {
        while let Some(output) = state.protocol.poll_output() {
            match output {
                ServerOutput::Transmit(Message::Reply(reply)) => {
                    let id = reply.request_id;
                    if let Some(route) = state.replies.remove(&id) {
                        let _ = route.send(Message::Reply(reply));
                    }
                    state.running.remove(&id);
                    self.call_ended.notify_waiters();
                }
                ServerOutput::Transmit(message) => {
                    let _ = self.control.send(Control::Send(message));
                }
                ServerOutput::Request {
                    id, method, args, ..
                } => {
                    state.admitted.insert(id, (method, args));
                }
                ServerOutput::Cancelled(id) | ServerOutput::Expired(id) => {
                    // Dropping the route resets the call's stream; dropping
                    // the stop sender ends the function.
                    state.replies.remove(&id);
                    state.admitted.remove(&id);
                    state.running.remove(&id);
                    self.call_ended.notify_waiters();
                }
                ServerOutput::Close => {
                    let code = if state.protocol.is_authenticated() {
                        CloseCode::Normal
                    } else {
                        CloseCode::Unauthenticated
                    };
                    let _ = self.control.send(Control::Close(code));
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

    /// Finds the function for an admitted call and counts it as running, or
    /// answers the call with why it cannot run.
    fn prepare(&self, state: &mut State, id: RequestId, method: &str) -> Option<Prepared> {
        let shared = &self.shared;
        let refusal = match shared.handlers.get(method) {
            None => {
                let mut names: Vec<&str> = shared.handlers.keys().map(String::as_str).collect();
                names.sort_unstable();
                RemoteError::new(
                    ErrorKind::UnknownMethod,
                    SERVER_ERROR_TYPE,
                    format!("no function is bound as {method:?}; bound: {names:?}"),
                )
            }
            Some(handler) => {
                if shared.running_total.fetch_add(1, Ordering::AcqRel) < shared.max_in_flight_total
                {
                    let guard = RunningGuard(shared.clone());
                    let (stop_tx, stop_rx) = oneshot::channel();
                    state.running.insert(id, stop_tx);
                    return Some((handler.clone(), guard, stop_rx));
                }
                shared.running_total.fetch_sub(1, Ordering::AcqRel);
                RemoteError::new(
                    ErrorKind::Overloaded,
                    SERVER_ERROR_TYPE,
                    format!(
                        "the server is running {} calls, its limit; retry later or on another \
                         server",
                        shared.max_in_flight_total
                    ),
                )
            }
        };
        let now = shared.now();
        state.protocol.reply(id, Err(refusal), now);
        None
    }

    /// Runs an admitted call's function and hands its result to the state
    /// machine, unless the call is cancelled or expires first.
    async fn run_function(
        self: &Arc<Self>,
        id: RequestId,
        method: String,
        args: Tree,
        (handler, _running, stop): Prepared,
    ) {
        let result = tokio::select! {
            result = handler.call(&method, args, &self.shared.workers) => result,
            // Cancelled or expired: dropping the function's future stops it.
            _ = stop => return,
        };
        if let Err(error) = &result {
            if matches!(error.kind, ErrorKind::Handler | ErrorKind::Panic) {
                let mut first = self
                    .shared
                    .first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| HandlerFailure {
                    method,
                    error: error.clone(),
                });
            }
        }
        let mut state = self.lock();
        let now = self.shared.now();
        state.protocol.reply(id, result, now);
        self.pump(&mut state);
    }

    /// Lets open calls finish until `deadline`, then closes the connection.
    pub(crate) async fn drain(self: &Arc<Self>, deadline: tokio::time::Instant) {
        {
            let mut state = self.lock();
            state.protocol.begin_shutdown();
        }
        loop {
            let ended = self.call_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let in_transit = self.replies_in_transit.load(Ordering::Acquire);
            if in_transit == 0 && self.lock().protocol.is_drained() {
                break;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        {
            let mut state = self.lock();
            let now = self.shared.now();
            state.protocol.close(now);
            self.pump(&mut state);
        }
        // Wait for the control writer to close the connection (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.closed()).await;
    }
}

pub(crate) async fn serve_connection(id: u64, connection: Connection, shared: Arc<Shared>) {
    let peer = connection.remote_addr();
    let span = tracing::info_span!("connection", id, %peer);
    match run(id, connection.clone(), shared.clone())
        .instrument(span)
        .await
    {
        Ok(()) => tracing::debug!(id, %peer, "connection finished"),
        Err(e) => tracing::info!(id, %peer, error = %e, "connection ended"),
    }
    shared
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

async fn run(id: u64, connection: Connection, shared: Arc<Shared>) -> Result<(), TransportError> {
    // The control stream is the first the client opens, and its first message
    // is the Hello: no call is read before the client is authenticated.
    let opened = tokio::time::timeout(HELLO_WAIT, async {
        let (send, mut recv) = connection.accept_stream().await?;
        let hello = recv.receive(|_| {}).await?;
        Ok::<_, TransportError>((send, recv, hello))
    })
    .await;
    let (control_send, control_recv, hello) = match opened {
        Ok(Ok(opened)) => opened,
        // Not a Hello this server can read (another protocol version, or not
        // Teleport at all): tell the peer why before hanging up.
        Ok(Err(e @ (TransportError::Decode(_) | TransportError::Truncated(_)))) => {
            connection.close(
                CloseCode::ProtocolError,
                &format!("the first message could not be read as a Hello: {e}"),
            );
            return Err(e);
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            connection.close(CloseCode::ProtocolError, "no Hello within 10 s");
            return Ok(());
        }
    };
    let mut protocol = ServerProtocol::new({
        let mut config = ServerConfig::default();
        config.max_in_flight = shared.max_in_flight;
        config.token = shared.token.clone();
        config
    });
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let handle = Arc::new(ConnectionHandle {
        state: Mutex::new(State {
            protocol: {
                let now = shared.now();
                match hello {
                    Some(message) => {
                        let _ = protocol.handle_message(now, message);
                    }
                    None => {
                        protocol.protocol_violation(now, "the control stream ended before a Hello")
                    }
                }
                protocol
            },
            replies: HashMap::new(),
            admitted: HashMap::new(),
            running: HashMap::new(),
            timer_armed: None,
        }),
        shared: shared.clone(),
        control: control_tx,
        timer: Notify::new(),
        call_ended: Notify::new(),
        replies_in_transit: AtomicUsize::new(0),
        connection: connection.clone(),
    });
    {
        let mut state = handle.lock();
        handle.pump(&mut state);
    }
    let writer = tokio::spawn(write_control(control_send, control_rx, connection.clone()));
    if !handle.lock().protocol.is_authenticated() {
        let _ = writer.await;
        return Ok(());
    }
    shared
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, handle.clone());
    // A server already shutting down refuses the calls of late connections.
    if *shared.shutdown.borrow() {
        handle.lock().protocol.begin_shutdown();
    }
    let reader = tokio::spawn(read_control(control_recv, handle.clone()));
    let timer = tokio::spawn(run_timer(handle.clone()));
    let result = loop {
        match connection.accept_stream().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_call(send, recv, handle.clone()));
            }
            Err(e) => break e,
        }
    };
    // The connection is gone: stop the functions still running for it.
    {
        let mut state = handle.lock();
        state.protocol.connection_lost();
        handle.pump(&mut state);
    }
    reader.abort();
    timer.abort();
    writer.abort();
    match result {
        TransportError::ClosedLocally => Ok(()),
        TransportError::ClosedByPeer { code: 0, .. } => Ok(()),
        e => Err(e),
    }
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
            Control::Close(code) => {
                send.finish();
                if matches!(code, CloseCode::Normal | CloseCode::ShuttingDown) {
                    // A client closes the connection once it has read the
                    // Goodbye and the replies before it; closing first could
                    // cut off replies it has received but not yet read.
                    let _ = tokio::time::timeout(CLIENT_CLOSE_WAIT, connection.closed()).await;
                } else {
                    // A refused peer gets the Goodbye, not time.
                    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                }
                connection.close(code, "connection closed by the server");
                return;
            }
        }
    }
}

async fn read_control(mut recv: RecvStream, handle: Arc<ConnectionHandle>) {
    loop {
        let received = recv.receive(|_| {}).await;
        let mut state = handle.lock();
        let now = handle.shared.now();
        match received {
            Ok(Some(message)) => {
                if let Err(e) = state.protocol.handle_message(now, message) {
                    tracing::info!(error = %e, "a client message was refused");
                }
            }
            Ok(None) => {
                state
                    .protocol
                    .protocol_violation(now, "the client finished its control stream");
            }
            Err(e) if e.is_connection_error() => return,
            Err(e) => {
                state
                    .protocol
                    .protocol_violation(now, format!("the control stream failed: {e}"));
            }
        }
        handle.pump(&mut state);
        if state.protocol.is_closed() {
            return;
        }
    }
}

async fn run_timer(handle: Arc<ConnectionHandle>) {
    loop {
        let notified = handle.timer.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut state = handle.lock();
            let next = state.protocol.poll_timeout();
            state.timer_armed = next;
            next
        };
        match next {
            Some(at) => {
                let wait = at
                    .since_origin()
                    .saturating_sub(handle.shared.now().since_origin());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        let mut state = handle.lock();
                        let now = handle.shared.now();
                        state.protocol.handle_timeout(now);
                        handle.pump(&mut state);
                    }
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Serves one call stream: reads the call, hands it to the state machine, and
/// writes the reply (or resets the stream if the call was cancelled or expired).
async fn serve_call(mut send: SendStream, mut recv: RecvStream, handle: Arc<ConnectionHandle>) {
    let call = match recv.receive(|_| {}).await {
        Ok(Some(Message::Call(call))) => call,
        Ok(Some(other)) => {
            let error = format!("a call stream must carry a Call, not {:?}", other.kind());
            refuse(&mut send, &mut recv, ErrorKind::BadRequest, error).await;
            return;
        }
        Ok(None) => return,
        Err(TransportError::Decode(e) | TransportError::Truncated(e)) => {
            let kind = if e.is_over_limit() {
                ErrorKind::OverLimit
            } else {
                ErrorKind::BadRequest
            };
            refuse(
                &mut send,
                &mut recv,
                kind,
                format!("the call could not be read: {e}"),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "a call stream failed before the call arrived");
            return;
        }
    };
    // The client finishes its side right after the call; usually the end has
    // arrived with it (checked again before the stream is dropped).
    let finished = recv.try_finish();
    let id = call.request_id;
    let (reply_tx, reply_rx) = oneshot::channel();
    let admitted = {
        let mut state = handle.lock();
        if let Entry::Vacant(route) = state.replies.entry(id) {
            route.insert(reply_tx);
            let now = handle.shared.now();
            if let Err(e) = state.protocol.handle_message(now, Message::Call(call)) {
                tracing::info!(error = %e, "a call was refused");
            }
            handle.pump(&mut state);
            // Admitted calls are prepared under the same lock.
            let admitted = state.admitted.remove(&id).and_then(|(method, args)| {
                let prepared = handle.prepare(&mut state, id, &method)?;
                Some((method, args, prepared))
            });
            handle.pump(&mut state);
            Ok(admitted)
        } else {
            Err(())
        }
    };
    match admitted {
        Ok(Some((method, args, prepared))) => {
            handle.run_function(id, method, args, prepared).await;
        }
        // Refused by the state machine or the server: its answer is routed.
        Ok(None) => {}
        Err(()) => {
            let error = format!("request id {id} is already in use by an open call");
            refuse(&mut send, &mut recv, ErrorKind::BadRequest, error).await;
            return;
        }
    }
    match reply_rx.await {
        Ok(reply) => {
            handle.replies_in_transit.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = send.send(&reply).await {
                tracing::debug!(error = %e, id, "the reply could not be sent");
            } else {
                // quinn delivers (and retransmits) the finished stream while
                // the connection lives; a graceful close leaves that to the
                // client, which closes once it has read its replies.
                send.finish();
                if !finished {
                    recv.try_finish();
                }
            }
            handle.replies_in_transit.fetch_sub(1, Ordering::AcqRel);
            handle.call_ended.notify_waiters();
        }
        Err(_) => {
            // Cancelled, expired, or the connection closed: no reply.
            send.reset(StreamCode::Cancelled);
            recv.stop(StreamCode::Cancelled);
        }
    }
}

/// Answers a call the server could not read. Its request id is unknown, so the
/// reply carries id 0: on a call stream, the reply belongs to that stream's call.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, kind: ErrorKind, message: String) {
    tracing::info!(%message, "a call was refused");
    recv.stop(StreamCode::Refused);
    let reply = Message::Reply(Reply {
        request_id: 0,
        result: Err(RemoteError::new(kind, SERVER_ERROR_TYPE, message)),
    });
    if send.send(&reply).await.is_ok() {
        send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
}
