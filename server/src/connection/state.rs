//! One connection's state behind one lock: its state machine, the transport
//! handles, and a mailbox per call stream through which the machine's outputs
//! reach the task serving that stream.
//!
//! Every task of the connection (the accept loop, the control stream reader,
//! the timer, the stream tasks) feeds its input to the machine under the lock
//! and then [`pump`](Conn::pump)s: the outputs go where they belong, and the
//! calling stream task takes its own next action under the same lock, so the
//! common path of a small call crosses no task boundary.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use rustc_hash::FxHashMap as HashMap;
use teleport_protocol::server::{
    CallHead, CallStreamError, ServerOutput, ServerProtocol, StreamIndex,
};
use teleport_protocol::{
    Call, CloseCode, Message, RemoteError, Reply, RequestId, StreamCode, Timestamp, Tree,
};
use teleport_quic::driver::{ControlSender, Timer};
use teleport_quic::{Connection, TransportError};
use tokio::sync::Notify;

use crate::function::{BoundFunction, ConnectionLife, Context as CallContext, JobFuture};
use crate::shared::{AuthenticationSlot, ServerShared};

/// What a stream's task is asked to do next.
pub(crate) enum Action {
    /// Run the call and answer it with [`Conn::reply`].
    Run {
        id: RequestId,
        method: Arc<str>,
        job: JobFuture,
    },
    /// Stop the call's work (drop its job).
    Stop,
    /// Write this reply and finish the stream (stopping its reading side
    /// first, if given).
    Write {
        reply: Reply,
        stop_reading: Option<StreamCode>,
    },
    /// Abandon the stream both ways.
    Reset(StreamCode),
    /// The connection is over: nothing more will come.
    Ended,
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Run { id, .. } => write!(f, "Run({id})"),
            Action::Stop => f.write_str("Stop"),
            Action::Write { reply, .. } => write!(f, "Write({})", reply.request_id),
            Action::Reset(code) => write!(f, "Reset({code})"),
            Action::Ended => f.write_str("Ended"),
        }
    }
}

/// A stream's actions in order. Most streams have one waiting at a time, so
/// the first is kept inline and only a second takes the heap.
#[derive(Debug, Default)]
struct Actions {
    first: Option<Action>,
    rest: VecDeque<Action>,
}

impl Actions {
    fn push_back(&mut self, action: Action) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(action);
        } else {
            self.rest.push_back(action);
        }
    }

    fn pop_front(&mut self) -> Option<Action> {
        self.first.take().or_else(|| self.rest.pop_front())
    }
}

/// Outputs of the machine for one stream, waiting for its task.
#[derive(Debug, Default)]
struct Mailbox {
    actions: Actions,
    waker: Option<Waker>,
    /// The function of the stream's admitted call, until its arguments come.
    function: Option<(Arc<str>, BoundFunction)>,
    /// The admitted call's deadline, until its arguments come.
    deadline: Option<Timestamp>,
    /// The running call's context, to mark it stopped.
    context: Option<CallContext>,
}

impl Mailbox {
    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Debug)]
pub(crate) struct ConnState {
    pub(crate) machine: ServerProtocol,
    /// The QUIC connection, once the handshake is done.
    pub(crate) transport: Option<Connection>,
    /// The control stream's writer, once the client opened it.
    pub(crate) control: Option<ControlSender>,
    streams: HashMap<StreamIndex, Mailbox>,
    /// The machine closed the connection, or it was lost.
    pub(crate) ended: bool,
    /// A close the machine asked for before the handshake was done.
    pending_close: Option<(CloseCode, String)>,
    /// The client's agent string, once its `Hello` was accepted.
    agent: Option<Arc<str>>,
}

/// One connection of a server. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    /// The client's address.
    peer: SocketAddr,
    state: Mutex<ConnState>,
    pub(crate) timer: Timer,
    /// Signalled when the connection ends, for the handshake and the accept
    /// loop.
    ended: Notify,
    pub(crate) shared: Arc<ServerShared>,
    /// The connection's place among the unauthenticated ones.
    slot: AuthenticationSlot,
    /// Told when the connection ends, for the contexts of its calls
    /// ([`Context::connection_closed`](crate::Context::connection_closed)).
    life: Arc<ConnectionLife>,
    /// How many of the next calls start in a task of their own instead of
    /// the accept loop (see [`start`](super::call::start)).
    pub(crate) spawn_next: AtomicU32,
}

impl Drop for Conn {
    /// However the connection's tasks end (even with the runtime going away
    /// before [`Conn::end`] ran), the contexts of its calls learn it is over.
    fn drop(&mut self) {
        self.life.end();
    }
}

impl Conn {
    /// `config`: the machine's, the server's own unless the connection is one
    /// the server dialled.
    pub(crate) fn new(
        id: u64,
        peer: SocketAddr,
        shared: Arc<ServerShared>,
        slot: AuthenticationSlot,
        config: teleport_protocol::server::ServerConfig,
    ) -> Conn {
        let now = shared.clock.now();
        let machine = ServerProtocol::new(now, config);
        Conn {
            id,
            state: Mutex::new(ConnState {
                machine,
                transport: None,
                control: None,
                streams: HashMap::default(),
                ended: false,
                pending_close: None,
                agent: None,
            }),
            peer,
            timer: Timer::new(),
            ended: Notify::new(),
            shared,
            slot,
            life: ConnectionLife::new(id),
            spawn_next: AtomicU32::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn state(&self) -> &Mutex<ConnState> {
        &self.state
    }

    /// The handshake is done: the connection can be used (or closed, if the
    /// machine already decided so).
    pub(crate) fn handshake_done(&self, transport: Connection) -> bool {
        let mut state = self.lock();
        if let Some((code, reason)) = state.pending_close.take() {
            transport.close(code, &reason);
            return false;
        }
        self.shared.stats.connection_accepted();
        if let Some(fingerprint) = transport.peer_fingerprint() {
            self.life.set_peer_fingerprint(fingerprint);
        }
        state.transport = Some(transport);
        !state.ended
    }

    /// What the connection moved so far (nothing once it ended: its figures
    /// went to the server's totals then).
    pub(crate) fn traffic(&self) -> teleport_quic::Traffic {
        let state = self.lock();
        state
            .transport
            .as_ref()
            .map(Connection::traffic)
            .unwrap_or_default()
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    /// Waits until the connection has ended.
    pub(crate) async fn wait_ended(&self) {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().ended {
                return;
            }
            notified.await;
        }
    }

    /// Carries out the machine's outputs. Called after every input, with the
    /// lock held; never blocks. Deferred functions are called here, in
    /// admission order (they must return quickly).
    pub(crate) fn pump(&self, state: &mut ConnState) {
        while let Some(output) = state.machine.poll_output() {
            match output {
                ServerOutput::Transmit(message) => match &state.control {
                    Some(control) => {
                        control.send(message);
                    }
                    None => tracing::debug!(?message, "no control stream to send on"),
                },
                ServerOutput::Admitted {
                    stream,
                    method,
                    deadline,
                    ..
                } => {
                    // The machine admits only bound names.
                    let function = self.shared.functions.get(&method).cloned();
                    if let Some(mailbox) = state.streams.get_mut(&stream) {
                        mailbox.function = function;
                        mailbox.deadline = deadline;
                    }
                }
                ServerOutput::Arguments { stream, id, args } => {
                    let agent = self.agent(state);
                    let Some(mailbox) = state.streams.get_mut(&stream) else {
                        continue;
                    };
                    let Some((method, function)) = mailbox.function.take() else {
                        continue;
                    };
                    let deadline = mailbox
                        .deadline
                        .take()
                        .map(|d| self.shared.clock.instant(d).into_std());
                    let context = CallContext::new(self.peer, agent, deadline, self.life.clone());
                    mailbox.context = Some(context.clone());
                    let job = function.start(&method, args, context, &self.shared.workers);
                    mailbox.push(Action::Run { id, method, job });
                }
                ServerOutput::Stop { stream, .. } => {
                    if let Some(mailbox) = state.streams.get_mut(&stream) {
                        mailbox.function = None;
                        if let Some(context) = mailbox.context.take() {
                            context.cancel();
                        }
                        mailbox.push(Action::Stop);
                    }
                }
                ServerOutput::Reply {
                    stream,
                    reply,
                    stop_reading,
                } => {
                    self.shared
                        .stats
                        .reply(reply.result.as_ref().map(|_| ()).map_err(|e| e.kind));
                    if let Some(mailbox) = state.streams.get_mut(&stream) {
                        mailbox.push(Action::Write {
                            reply,
                            stop_reading,
                        });
                    }
                }
                ServerOutput::Reset { stream, code } => {
                    self.shared.stats.call_stopped();
                    if let Some(mailbox) = state.streams.get_mut(&stream) {
                        mailbox.push(Action::Reset(code));
                    }
                }
                ServerOutput::Close { code, reason } => {
                    tracing::debug!(%code, %reason, "closing the connection");
                    match &state.transport {
                        Some(transport) => transport.close(code, &reason),
                        None => state.pending_close = Some((code, reason)),
                    }
                    self.end(state);
                }
                _ => {}
            }
        }
        if state.machine.is_closed() && !state.ended {
            self.end(state);
        }
        self.timer.rearm(state.machine.poll_timeout());
    }

    /// The client's agent string, kept once so that each call's context
    /// shares it.
    fn agent(&self, state: &mut ConnState) -> Arc<str> {
        if let Some(agent) = &state.agent {
            return agent.clone();
        }
        let agent: Arc<str> = Arc::from(state.machine.peer_agent().unwrap_or(""));
        if state.machine.peer_agent().is_some() {
            state.agent = Some(agent.clone());
        }
        agent
    }

    /// Marks the connection over and wakes everything waiting on it. The
    /// handles to the transport go, so nothing keeps the connection (and the
    /// server's socket) alive after it ended.
    fn end(&self, state: &mut ConnState) {
        state.ended = true;
        state.control = None;
        if let Some(transport) = state.transport.take() {
            self.shared.stats.connection_ended(transport.traffic());
        }
        for mailbox in state.streams.values_mut() {
            if let Some(context) = mailbox.context.take() {
                context.cancel();
            }
            if let Some(waker) = mailbox.waker.take() {
                waker.wake();
            }
        }
        self.ended.notify_waiters();
        self.life.end();
    }

    /// Takes `stream`'s next action now, if one is waiting.
    fn take_action(state: &mut ConnState, stream: StreamIndex) -> Option<Action> {
        match state.streams.get_mut(&stream) {
            Some(mailbox) => mailbox.actions.pop_front(),
            None => Some(Action::Ended),
        }
        .or_else(|| state.ended.then_some(Action::Ended))
    }

    /// Waits for `stream`'s next action.
    pub(crate) async fn next_action(&self, stream: StreamIndex) -> Action {
        std::future::poll_fn(|cx: &mut Context<'_>| {
            let mut state = self.lock();
            if let Some(action) = Self::take_action(&mut state, stream) {
                return Poll::Ready(action);
            }
            if let Some(mailbox) = state.streams.get_mut(&stream) {
                mailbox.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Feeds an input about `stream` to the machine, pumps, and takes the
    /// stream's next action if one is ready.
    fn feed(
        &self,
        stream: StreamIndex,
        input: impl FnOnce(&mut ServerProtocol, Timestamp),
    ) -> Option<Action> {
        let mut state = self.lock();
        let now = self.now();
        input(&mut state.machine, now);
        self.pump(&mut state);
        Self::take_action(&mut state, stream)
    }

    // ----- inputs -----

    /// The client opened call stream `stream` (called in accept order).
    pub(crate) fn call_opened(&self, stream: StreamIndex) {
        let mut state = self.lock();
        let now = self.now();
        state.streams.insert(stream, Mailbox::default());
        self.shared.stats.call_received();
        state.machine.call_opened(now, stream);
        self.pump(&mut state);
    }

    /// The client showed it is alive in a way no other input reports (bytes
    /// of the control stream, progress of a reply being written).
    pub(crate) fn heard(&self) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.heard(now);
    }

    pub(crate) fn call_progress(&self, stream: StreamIndex) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.call_progress(now, stream);
        self.timer.rearm(state.machine.poll_timeout());
    }

    /// The header of the call on `stream` arrived before its arrays. What the
    /// machine does about it waits in the stream's mailbox.
    pub(crate) fn call_head(&self, stream: StreamIndex, head: CallHead) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.call_head(now, stream, head);
        self.pump(&mut state);
    }

    pub(crate) fn call_received(&self, stream: StreamIndex, call: Call) -> Option<Action> {
        self.feed(stream, |m, now| m.call_received(now, stream, call))
    }

    pub(crate) fn call_unreadable(
        &self,
        stream: StreamIndex,
        error: CallStreamError,
    ) -> Option<Action> {
        tracing::info!(stream, %error, "a call could not be read");
        self.feed(stream, |m, now| m.call_unreadable(now, stream, error))
    }

    /// The call `id` on `stream` finished with `outcome`.
    pub(crate) fn reply(
        &self,
        stream: StreamIndex,
        id: RequestId,
        method: &str,
        outcome: Result<Tree, RemoteError>,
    ) -> Option<Action> {
        if let Err(error) = &outcome {
            self.shared.record_failure(method, error);
        }
        self.feed(stream, |m, now| {
            m.reply(now, id, outcome);
        })
    }

    /// The stream's task is done with it: its reply was written (`sent`) or
    /// the stream was abandoned. A call whose answer was not delivered is
    /// marked stopped, so that a function that handed something over with
    /// its answer (a deferred one's `try_respond`) can take it back.
    pub(crate) fn stream_done(&self, stream: StreamIndex, sent: bool) {
        let mut state = self.lock();
        let now = self.now();
        if let Some(mailbox) = state.streams.remove(&stream) {
            if let (false, Some(context)) = (sent, mailbox.context) {
                context.cancel();
            }
        }
        if sent {
            state.machine.reply_sent(now, stream);
        } else {
            state.machine.stream_closed(now, stream);
        }
        self.pump(&mut state);
    }

    /// A message (or the end, or a failure) of the control stream. Returns
    /// whether to go on reading.
    pub(crate) fn control_received(
        &self,
        received: Result<Option<Message>, TransportError>,
    ) -> bool {
        let mut state = self.lock();
        let now = self.now();
        match received {
            Ok(Some(message)) => {
                if let Err(e) = state.machine.handle_message(now, message) {
                    tracing::info!(error = %e, "a client message was refused");
                }
                if state.machine.is_authenticated() {
                    self.slot.authenticated();
                }
            }
            Ok(None) => state
                .machine
                .protocol_violation(now, "the client finished its control stream"),
            // The accept loop sees the loss and reports it.
            Err(e) if e.is_connection_error() => return false,
            Err(e) => state
                .machine
                .protocol_violation(now, format!("the control stream could not be read: {e}")),
        }
        self.pump(&mut state);
        !state.machine.is_closed()
    }

    pub(crate) fn goodbye_acknowledged(&self) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.goodbye_acknowledged(now);
        self.pump(&mut state);
    }

    pub(crate) fn begin_shutdown(&self, deadline: Timestamp) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.begin_shutdown(now, deadline);
        self.pump(&mut state);
    }

    pub(crate) fn connection_lost(&self) {
        let mut state = self.lock();
        let now = self.now();
        state.machine.connection_lost(now);
        self.pump(&mut state);
        self.end(&mut state);
    }

    pub(crate) fn handle_timeout(&self, state: &mut ConnState, now: Timestamp) {
        state.machine.handle_timeout(now);
        self.pump(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_actions_come_out_in_the_order_they_went_in() {
        let mut actions = Actions::default();
        actions.push_back(Action::Stop);
        actions.push_back(Action::Reset(StreamCode::Cancelled));
        assert!(matches!(actions.pop_front(), Some(Action::Stop)));
        actions.push_back(Action::Ended);
        assert!(matches!(actions.pop_front(), Some(Action::Reset(_))));
        assert!(matches!(actions.pop_front(), Some(Action::Ended)));
        assert!(actions.pop_front().is_none());
        actions.push_back(Action::Stop);
        assert!(matches!(actions.pop_front(), Some(Action::Stop)));
        assert!(actions.pop_front().is_none());
    }
}
