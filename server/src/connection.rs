//! One client connection: its control stream, its call streams, and the
//! [`ServerProtocol`] that decides what happens to each call.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use teleport_protocol::server::{ServerConfig, ServerOutput, ServerProtocol, SERVER_ERROR_TYPE};
use teleport_protocol::{ErrorKind, Message, RemoteError, Reply, RequestId, Tree};
use teleport_quic::{CloseCode, Connection, RecvStream, SendStream, StreamCode, TransportError};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::server::{HandlerFailure, Shared};

/// How long a new connection may take to open its control stream and send its
/// `Hello` before the server gives up on it.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// How long a finished reply may take to be acknowledged by the client before
/// the server stops waiting (only matters when the connection closes next).
const REPLY_ACK_WAIT: Duration = Duration::from_secs(5);

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
    /// The running function of each open call, to stop it on cancel or expiry.
    running: HashMap<RequestId, AbortHandle>,
}

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
    /// Signalled whenever a call ends, for draining.
    call_ended: Notify,
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
                } => self.start(state, id, method, args),
                ServerOutput::Cancelled(id) | ServerOutput::Expired(id) => {
                    // Dropping the route resets the call's stream.
                    state.replies.remove(&id);
                    if let Some(task) = state.running.remove(&id) {
                        task.abort();
                    }
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
        self.timer.notify_one();
    }

    fn start(self: &Arc<Self>, state: &mut State, id: RequestId, method: String, args: Tree) {
        let Some(handler) = self.shared.handlers.get(&method).cloned() else {
            let mut names: Vec<&str> = self.shared.handlers.keys().map(String::as_str).collect();
            names.sort_unstable();
            let error = RemoteError::new(
                ErrorKind::UnknownMethod,
                SERVER_ERROR_TYPE,
                format!("no function is bound as {method:?}; bound: {names:?}"),
            );
            let now = self.shared.now();
            state.protocol.reply(id, Err(error), now);
            return; // the caller's loop in `pump` routes the queued reply
        };
        let shared = &self.shared;
        if shared.running_total.fetch_add(1, Ordering::AcqRel) >= shared.max_in_flight_total {
            shared.running_total.fetch_sub(1, Ordering::AcqRel);
            let error = RemoteError::new(
                ErrorKind::Overloaded,
                SERVER_ERROR_TYPE,
                format!(
                    "the server is running {} calls, its limit; retry later or on another server",
                    shared.max_in_flight_total
                ),
            );
            let now = shared.now();
            state.protocol.reply(id, Err(error), now);
            return;
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            // Counts the call as running until it ends, even if aborted.
            let _running = RunningGuard(this.shared.clone());
            let result = handler.call(&method, args, &this.shared.workers).await;
            if let Err(error) = &result {
                if matches!(error.kind, ErrorKind::Handler | ErrorKind::Panic) {
                    let mut first = this
                        .shared
                        .first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    first.get_or_insert_with(|| HandlerFailure {
                        method: method.clone(),
                        error: error.clone(),
                    });
                }
            }
            let mut state = this.lock();
            let now = this.shared.now();
            state.protocol.reply(id, result, now);
            this.pump(&mut state);
        });
        state.running.insert(id, task.abort_handle());
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
            if self.lock().protocol.is_drained() {
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
            running: HashMap::new(),
        }),
        shared: shared.clone(),
        control: control_tx,
        timer: Notify::new(),
        call_ended: Notify::new(),
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
                // Let the Goodbye arrive before the connection closes.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
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
        let next = handle.lock().protocol.poll_timeout();
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
    let id = call.request_id;
    let (reply_tx, reply_rx) = oneshot::channel();
    let in_use = {
        let mut state = handle.lock();
        let in_use = state.replies.contains_key(&id);
        if !in_use {
            state.replies.insert(id, reply_tx);
            let now = handle.shared.now();
            if let Err(e) = state.protocol.handle_message(now, Message::Call(call)) {
                tracing::info!(error = %e, "a call was refused");
            }
            handle.pump(&mut state);
        }
        in_use
    };
    if in_use {
        let error = format!("request id {id} is already in use by an open call");
        refuse(&mut send, &mut recv, ErrorKind::BadRequest, error).await;
        return;
    }
    match reply_rx.await {
        Ok(reply) => {
            if let Err(e) = send.send(&reply).await {
                tracing::debug!(error = %e, id, "the reply could not be sent");
                return;
            }
            send.finish();
            // Keep the stream until the client has the reply, so a graceful
            // shutdown does not cut it off.
            let _ = tokio::time::timeout(REPLY_ACK_WAIT, send.stopped()).await;
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
        let _ = tokio::time::timeout(REPLY_ACK_WAIT, send.stopped()).await;
    }
}
