//! The server side of one client connection: the handshake, admission of calls
//! in the order the client made them, deadlines, cancellation, draining and
//! closing.
//!
//! A [`ServerProtocol`] decides, for one connected client, which calls reach the
//! application, in which order, and which are refused and how; when the
//! connection is closed and with which code. It reads no clock, owns no socket
//! and spawns no task: the driver passes bytes' meaning in and carries out what
//! it asks.
//!
//! # Streams and order
//!
//! Over QUIC every call travels on a stream of its own; the driver numbers the
//! call streams 0, 1, 2, ... in the order the client opened them (QUIC stream id
//! order; the control stream is not numbered) and reports each with
//! [`call_opened`](ServerProtocol::call_opened) as it accepts it. Calls are
//! *admitted* in that order, as soon as their header has arrived, whatever
//! order their tasks happen to run in: a call is never admitted before every
//! call the client opened earlier is admitted or refused. Admission happens at
//! the header, not at the last byte, so a large call does not hold up the
//! small calls behind it; its arguments are handed over when complete.
//!
//! Over a single ordered byte stream, each `Call` message is its own "stream":
//! number them in arrival order, report `call_opened` then `call_received`, and
//! write every output on the one stream.
//!
//! # Run-loop contract
//!
//! 1. Create it with [`ServerProtocol::new`] when the first packet of a client
//!    arrives: the Hello deadline covers the TLS handshake too.
//! 2. Feed inputs as they happen, each with the current time first:
//!    - [`handle_message`](ServerProtocol::handle_message) for each message
//!      decoded from the control stream;
//!    - for each call stream: [`call_opened`](ServerProtocol::call_opened) when
//!      it is accepted, [`call_progress`](ServerProtocol::call_progress) as bytes
//!      arrive, then [`call_head`](ServerProtocol::call_head) and
//!      [`call_args`](ServerProtocol::call_args) (or
//!      [`call_received`](ServerProtocol::call_received) for both at once), or
//!      [`call_unreadable`](ServerProtocol::call_unreadable);
//!      [`reply_sent`](ServerProtocol::reply_sent) once a reply is written and
//!      its stream finished, [`stream_closed`](ServerProtocol::stream_closed)
//!      if a stream failed;
//!    - [`heard`](ServerProtocol::heard) whenever the client shows it is
//!      alive in a way no other input reports: bytes of the control stream
//!      before a whole message, progress of a reply being written (QUIC
//!      accepts a reply's bytes only as far as the client's flow-control
//!      credit reaches, so progress means the client is reading);
//!    - [`reply`](ServerProtocol::reply) when the application finishes a call;
//!    - [`begin_shutdown`](ServerProtocol::begin_shutdown),
//!      [`close`](ServerProtocol::close) as the server decides;
//!      [`protocol_violation`](ServerProtocol::protocol_violation),
//!      [`goodbye_acknowledged`](ServerProtocol::goodbye_acknowledged) and
//!      [`connection_lost`](ServerProtocol::connection_lost) as the transport
//!      finds out.
//! 3. After every input, drain [`poll_output`](ServerProtocol::poll_output)
//!    until it returns `None` and carry out each [`ServerOutput`] in order.
//! 4. Then ask [`poll_timeout`](ServerProtocol::poll_timeout). If it returns
//!    `Some(t)`, call [`handle_timeout`](ServerProtocol::handle_timeout) at (or
//!    after) `t` unless another input comes first, and go back to step 3.
//!    `None` means no timer is needed. Calling `handle_timeout` early, late or
//!    more often is harmless.
//!
//! # Guarantees
//!
//! - Until the client's `Hello` carries the right token, no call reaches the
//!   application.
//! - Calls are admitted in stream order (see above).
//! - At most [`ServerConfig::max_in_flight`] calls of this connection are open
//!   at once (and at most what the shared [`Capacity`] allows across
//!   connections); calls beyond that are answered with an error without
//!   reaching the application.
//! - Every [`ServerOutput::Admitted`] call ends exactly once: by a
//!   [`reply`](ServerProtocol::reply), or by a [`ServerOutput::Stop`] (cancel,
//!   expiry, a stalled upload, shutdown, or the connection's end).
//! - Every call stream the driver reports ends with exactly one
//!   [`ServerOutput::Reply`] or [`ServerOutput::Reset`], unless the connection
//!   ends first.
//! - A graceful shutdown sends its `Goodbye` only after every reply was
//!   written (or the grace period ended), so no reply is overtaken by it.
//! - A client that gives no sign of life for [`ServerConfig::peer_timeout`]
//!   while the server holds a call of its (arriving, running or being
//!   replied to) is presumed dead: its calls are stopped and the connection
//!   closed with [`CloseCode::PeerTimeout`], without a Goodbye.
//! - Nothing the client sends makes this code panic.

mod admission;
mod capacity;
mod config;
mod error;
#[cfg(test)]
mod tests;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use subtle::ConstantTimeEq;

use crate::deadlines::Deadlines;
use crate::id_map::IdMap;
use crate::{
    Call, CloseCode, ErrorKind, Goodbye, GoodbyeReason, Hello, Message, RemoteError, Reply,
    RequestId, StreamCode, Timestamp, Tree,
};
use admission::Gate;

pub use capacity::Capacity;
pub use config::{ServerConfig, DEFAULT_AGENT};
pub use error::{CallStreamError, ServerMessageError};

/// The `type_name` of the errors the server state machine raises itself.
pub const SERVER_ERROR_TYPE: &str = "teleport";

/// The number of a call stream: 0 for the first the client opened, then 1, 2,
/// ... (see the [module docs](self)).
pub type StreamIndex = u64;

/// The header of a `Call`: what admission needs, before the arguments arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallHead {
    /// The client's id for the call.
    pub request_id: RequestId,
    /// The bound function's name.
    pub method: String,
    /// Time the caller will still wait, as sent.
    pub timeout: Option<Duration>,
}

/// What the state machine asks its driver to do. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerOutput {
    /// Send this message on the control stream.
    Transmit(Message),
    /// A call was admitted: reserve its place (worker queue, hook order) now,
    /// in this order. Its arguments follow in [`ServerOutput::Arguments`].
    Admitted {
        /// Its stream.
        stream: StreamIndex,
        /// The client's id for the call; pass it to `reply`.
        id: RequestId,
        /// The bound function's name.
        method: String,
        /// When the client gives up, on this side's clock. `None`: never.
        deadline: Option<Timestamp>,
    },
    /// The arguments of an admitted call are complete: run it, and answer with
    /// [`ServerProtocol::reply`].
    Arguments {
        /// Its stream.
        stream: StreamIndex,
        /// The call's id.
        id: RequestId,
        /// The arguments.
        args: Tree,
    },
    /// Stop the work of this admitted call and discard its result (it was
    /// cancelled, expired, stalled, or the connection ended). Not answered.
    Stop {
        /// Its stream.
        stream: StreamIndex,
        /// The call's id.
        id: RequestId,
    },
    /// Write this reply on the stream and finish it; then report
    /// [`reply_sent`](ServerProtocol::reply_sent).
    Reply {
        /// The call's stream.
        stream: StreamIndex,
        /// What to write.
        reply: Reply,
        /// `Some`: the call was not read to its end; stop reading the stream
        /// with this code.
        stop_reading: Option<StreamCode>,
    },
    /// Abandon the stream in both directions (reset its sending side, stop
    /// its receiving side) with this code. Nothing more happens on it.
    Reset {
        /// The stream.
        stream: StreamIndex,
        /// Why.
        code: StreamCode,
    },
    /// Close the connection now with this code and reason. Emitted once, last.
    Close {
        /// The application close code.
        code: CloseCode,
        /// For people, not programs.
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Open,
    /// Shutting down: new calls are refused, open ones finish.
    Draining,
    /// Our Goodbye is out; waiting for the client to close (or the Goodbye to
    /// be acknowledged, after a refusal).
    Closing {
        code: CloseCode,
        reason: String,
    },
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Hello,
    Drain,
    Close,
    Idle,
    Call(RequestId),
    Progress(StreamIndex),
}

#[derive(Debug)]
enum Stream {
    /// Not yet admitted or refused.
    Arriving {
        head: Option<CallHead>,
        args: Option<Tree>,
    },
    /// Admitted as call `id`; `args_done` once its arguments were handed over.
    Admitted { id: RequestId, args_done: bool },
    /// A reply was emitted; waiting for it to be written.
    Replying,
}

#[derive(Debug)]
struct Open {
    stream: StreamIndex,
    deadline: Option<Timestamp>,
}

/// The server side of one client connection. See the [module docs](self) for
/// the run-loop contract.
#[derive(Debug)]
pub struct ServerProtocol {
    config: ServerConfig,
    phase: Phase,
    /// Call streams reported and not yet finished.
    streams: IdMap<StreamIndex, Stream>,
    /// Streams not yet admitted or refused, in order: the admission gate.
    gate: Gate,
    /// Admitted calls not yet answered.
    open: BTreeMap<RequestId, Open>,
    timers: Deadlines<Timer>,
    peer_agent: Option<String>,
    /// The last thing the client did, for the idle timeout.
    last_activity: Timestamp,
    /// The last sign of life from the client, for the peer timeout.
    last_heard: Timestamp,
    out: VecDeque<ServerOutput>,
}

impl Drop for ServerProtocol {
    fn drop(&mut self) {
        // A machine dropped with calls open (its task was aborted) gives their
        // places in the shared capacity back.
        if let Some(capacity) = &self.config.capacity {
            for _ in 0..self.open.len() {
                capacity.release();
            }
        }
    }
}

impl ServerProtocol {
    /// The server side of a new connection at `now`, waiting for the client's
    /// `Hello` until `now + hello_timeout`.
    pub fn new(now: Timestamp, mut config: ServerConfig) -> ServerProtocol {
        config.max_in_flight = config.max_in_flight.max(1);
        let mut timers = Deadlines::default();
        timers.set(Timer::Hello, now + config.hello_timeout);
        ServerProtocol {
            config,
            phase: Phase::AwaitingHello,
            streams: IdMap::default(),
            gate: Gate::default(),
            open: BTreeMap::new(),
            timers,
            peer_agent: None,
            last_activity: now,
            last_heard: now,
            out: VecDeque::new(),
        }
    }

    /// The configuration in use (`max_in_flight` at least 1).
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// True once the client's `Hello` was accepted (until the connection ends).
    pub fn is_authenticated(&self) -> bool {
        self.peer_agent.is_some() && !self.is_closed()
    }

    /// True once the connection is finished (the transport is, or is to be,
    /// closed).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The agent string of the client's accepted `Hello`.
    pub fn peer_agent(&self) -> Option<&str> {
        self.peer_agent.as_deref()
    }

    /// Calls admitted and not yet answered.
    pub fn open_requests(&self) -> usize {
        self.open.len()
    }

    /// True if call `id` is open (a reply would be sent).
    pub fn is_open(&self, id: RequestId) -> bool {
        self.open.contains_key(&id)
    }

    /// Call streams reported and not yet finished (arriving, running or
    /// replying).
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// True after [`begin_shutdown`](Self::begin_shutdown).
    pub fn is_shutting_down(&self) -> bool {
        !matches!(self.phase, Phase::AwaitingHello | Phase::Open)
    }

    /// The next thing for the driver to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, or
    /// `None` if no timer is needed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [self.timers.next(), self.peer_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When the client, silent since it was last heard, is presumed dead: only
    /// while the server holds a call of its (see
    /// [`ServerConfig::peer_timeout`]).
    fn peer_deadline(&self) -> Option<Timestamp> {
        let timeout = self.config.peer_timeout?;
        let holding =
            matches!(self.phase, Phase::Open | Phase::Draining) && !self.streams.is_empty();
        // A stream is only ever reported with a sign of life, so the silence
        // of a connection that just became busy counts from then.
        holding.then(|| self.last_heard + timeout)
    }

    /// The client showed it is alive (see the [module docs](self)): bytes of
    /// any stream arrived, or a reply being written made progress.
    pub fn heard(&mut self, now: Timestamp) {
        self.last_heard = self.last_heard.max(now);
    }

    // ----- the control stream -----

    /// Handles one message decoded from the control stream.
    ///
    /// Errors are for logging: the state machine has already acted on them.
    /// Messages arriving after the connection finished are ignored.
    pub fn handle_message(
        &mut self,
        now: Timestamp,
        message: Message,
    ) -> Result<(), ServerMessageError> {
        if matches!(self.phase, Phase::Closed | Phase::Closing { .. }) {
            return Ok(());
        }
        self.touch(now);
        if self.phase == Phase::AwaitingHello {
            return self.handle_first(now, message);
        }
        match message {
            Message::Cancel { request_id } => {
                if let Some(open) = self.open.remove(&request_id) {
                    self.end_open(request_id);
                    self.streams.remove(&open.stream);
                    self.timers.remove(Timer::Progress(open.stream));
                    self.out.push_back(ServerOutput::Stop {
                        stream: open.stream,
                        id: request_id,
                    });
                    self.out.push_back(ServerOutput::Reset {
                        stream: open.stream,
                        code: StreamCode::Cancelled,
                    });
                    self.after_call_ended(now);
                }
                Ok(())
            }
            Message::Ping { nonce } => {
                self.out
                    .push_back(ServerOutput::Transmit(Message::Pong { nonce }));
                Ok(())
            }
            // The server sends no pings; a pong is harmless.
            Message::Pong { .. } => Ok(()),
            Message::Goodbye(_) => {
                // The client wants nothing more: stop its work and hang up.
                self.stop_all();
                self.close_now(CloseCode::Normal, "the client said goodbye");
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.protocol_violation(
                    now,
                    format!("a client must not send {kind:?} messages on its control stream"),
                );
                Err(ServerMessageError::Unexpected { kind })
            }
        }
    }

    fn handle_first(&mut self, now: Timestamp, message: Message) -> Result<(), ServerMessageError> {
        match message {
            Message::Hello(hello) => {
                if !token_matches(self.config.token.as_deref(), hello.token.as_deref()) {
                    self.say_goodbye(
                        now,
                        GoodbyeReason::Unauthenticated,
                        CloseCode::Unauthenticated,
                        "authentication failed: missing or wrong token",
                    );
                    return Err(ServerMessageError::Unauthenticated);
                }
                self.timers.remove(Timer::Hello);
                self.phase = Phase::Open;
                self.peer_agent = Some(hello.agent);
                self.out
                    .push_back(ServerOutput::Transmit(Message::Hello(Hello {
                        agent: self.config.agent.clone(),
                        token: self.config.present_token.clone(),
                    })));
                self.run_gate(now);
                self.arm_idle(now);
                Ok(())
            }
            Message::Goodbye(_) => {
                self.close_now(CloseCode::Normal, "the client said goodbye");
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.say_goodbye(
                    now,
                    GoodbyeReason::ProtocolError,
                    CloseCode::ProtocolError,
                    "the first message on the control stream must be a Hello",
                );
                Err(ServerMessageError::NoHello { kind })
            }
        }
    }

    // ----- call streams -----

    /// The client opened call stream `stream` (report them in the order they
    /// are accepted). Its call waits for admission until its header arrives.
    /// A stream opened once the Goodbye is out is reset at once (code 4,
    /// shutting down): every stream gets an answer from the machine.
    pub fn call_opened(&mut self, now: Timestamp, stream: StreamIndex) {
        if self.streams.contains_key(&stream) {
            return;
        }
        if matches!(self.phase, Phase::Closed | Phase::Closing { .. }) {
            // Too late for a call: the stream is abandoned at once, so
            // nothing waits on it (the Goodbye already told the client).
            self.out.push_back(ServerOutput::Reset {
                stream,
                code: StreamCode::ShuttingDown,
            });
            return;
        }
        self.touch(now);
        self.streams.insert(
            stream,
            Stream::Arriving {
                head: None,
                args: None,
            },
        );
        self.gate.insert(stream);
        self.arm_progress(now, stream);
        self.timers.remove(Timer::Idle);
    }

    /// Bytes of call stream `stream` arrived: it is making progress.
    pub fn call_progress(&mut self, now: Timestamp, stream: StreamIndex) {
        self.heard(now);
        let arriving = match self.streams.get(&stream) {
            Some(Stream::Arriving { .. }) => true,
            Some(Stream::Admitted { args_done, .. }) => !args_done,
            _ => false,
        };
        if arriving {
            self.arm_progress(now, stream);
        }
    }

    /// The header of the call on `stream` was decoded; its arguments are still
    /// arriving. Admits it if every earlier stream is admitted or refused.
    pub fn call_head(&mut self, now: Timestamp, stream: StreamIndex, head: CallHead) {
        if let Some(Stream::Arriving { head: slot, .. }) = self.streams.get_mut(&stream) {
            if slot.is_none() {
                *slot = Some(head);
                self.touch(now);
                self.run_gate(now);
            }
        }
    }

    /// The arguments of the call on `stream` are complete (and the stream's
    /// end was read: nothing followed the call).
    pub fn call_args(&mut self, now: Timestamp, stream: StreamIndex, args: Tree) {
        self.touch(now);
        match self.streams.get_mut(&stream) {
            Some(Stream::Arriving {
                head: Some(_),
                args: slot,
            }) => {
                *slot = Some(args);
                self.timers.remove(Timer::Progress(stream));
                self.run_gate(now);
            }
            Some(Stream::Admitted { id, args_done }) if !*args_done => {
                *args_done = true;
                let id = *id;
                self.timers.remove(Timer::Progress(stream));
                self.out
                    .push_back(ServerOutput::Arguments { stream, id, args });
            }
            // A refused, cancelled or finished call: nobody wants them.
            _ => {}
        }
    }

    /// The whole call on `stream` arrived at once: [`call_head`](Self::call_head)
    /// and [`call_args`](Self::call_args) together.
    pub fn call_received(&mut self, now: Timestamp, stream: StreamIndex, call: Call) {
        let Call {
            request_id,
            method,
            timeout,
            args,
        } = call;
        if let Some(Stream::Arriving { head, args: slot }) = self.streams.get_mut(&stream) {
            if head.is_none() {
                *head = Some(CallHead {
                    request_id,
                    method,
                    timeout,
                });
                *slot = Some(args);
                self.timers.remove(Timer::Progress(stream));
                self.touch(now);
                self.run_gate(now);
                return;
            }
        }
        self.call_args(now, stream, args);
    }

    /// Call stream `stream` did not deliver a call the server can run.
    ///
    /// A call the server cannot read is answered on its stream with a `Reply`
    /// of request id 0 (bad request, or over limit) and the stream is no
    /// longer read; a stream the client reset is dropped silently. A call
    /// already admitted is stopped.
    pub fn call_unreadable(&mut self, now: Timestamp, stream: StreamIndex, error: CallStreamError) {
        let admitted = match self.streams.get(&stream) {
            None | Some(Stream::Replying) => return,
            Some(Stream::Admitted { id, .. }) => Some(*id),
            Some(Stream::Arriving { .. }) => None,
        };
        self.touch(now);
        self.timers.remove(Timer::Progress(stream));
        if let Some(id) = admitted {
            self.open.remove(&id);
            self.end_open(id);
            self.out.push_back(ServerOutput::Stop { stream, id });
        }
        self.gate.remove(&stream);
        let (kind, message) = match &error {
            CallStreamError::Reset(_) => {
                self.streams.remove(&stream);
                self.out.push_back(ServerOutput::Reset {
                    stream,
                    code: StreamCode::Cancelled,
                });
                self.after_call_ended(now);
                self.run_gate(now);
                return;
            }
            CallStreamError::OverLimit(_) => (ErrorKind::OverLimit, format!("{error}")),
            _ => (ErrorKind::BadRequest, format!("{error}")),
        };
        // The reply names request 0: on its stream, it belongs to that call.
        let stop = match error {
            CallStreamError::Empty => None,
            _ => Some(StreamCode::Refused),
        };
        self.answer_stream(stream, 0, kind, message, stop);
        self.run_gate(now);
    }

    /// The reply on `stream` was written and the stream finished.
    pub fn reply_sent(&mut self, now: Timestamp, stream: StreamIndex) {
        self.stream_closed(now, stream);
    }

    /// Call stream `stream` is finished from the server's side: its reply was
    /// written, or writing it failed (the client stopped reading).
    pub fn stream_closed(&mut self, now: Timestamp, stream: StreamIndex) {
        if let Some(Stream::Replying) = self.streams.get(&stream) {
            self.streams.remove(&stream);
            self.after_call_ended(now);
        }
    }

    /// Answers call `id`. Queues its `Reply` and returns true if the call is
    /// open; returns false (the caller discards the result) if it was
    /// cancelled, stopped, expired (including a deadline at or before `now`
    /// not yet handled, whose stream is then reset), or the connection ended.
    pub fn reply(
        &mut self,
        now: Timestamp,
        id: RequestId,
        result: Result<Tree, RemoteError>,
    ) -> bool {
        let Some(open) = self.open.remove(&id) else {
            return false;
        };
        self.end_open(id);
        self.timers.remove(Timer::Progress(open.stream));
        if open.deadline.is_some_and(|d| d <= now) {
            self.streams.remove(&open.stream);
            self.out.push_back(ServerOutput::Reset {
                stream: open.stream,
                code: StreamCode::Expired,
            });
            self.after_call_ended(now);
            return false;
        }
        // An answer before the arguments were complete (a refusal by the
        // application): stop reading them.
        let stop = match self.streams.get(&open.stream) {
            Some(Stream::Admitted {
                args_done: false, ..
            }) => Some(StreamCode::Refused),
            _ => None,
        };
        self.streams.insert(open.stream, Stream::Replying);
        self.out.push_back(ServerOutput::Reply {
            stream: open.stream,
            reply: Reply {
                request_id: id,
                result,
            },
            stop_reading: stop,
        });
        true
    }

    // ----- time -----

    /// Handles the passage of time: the Hello deadline, call deadlines,
    /// stalled uploads, the end of a drain, the close wait, the idle timeout,
    /// the peer timeout.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if let Some(dead_at) = self.peer_deadline() {
            if now >= dead_at {
                let silent_for = now - self.last_heard;
                let reason = format!(
                    "no sign of life from the client for {silent_for:?} while its calls were \
                     held (the server's peer_timeout)"
                );
                self.stop_all();
                self.close_now(CloseCode::PeerTimeout, &reason);
                return;
            }
        }
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Hello => {
                    if self.phase == Phase::AwaitingHello {
                        let reason = format!(
                            "no Hello within {:?} of the first packet",
                            self.config.hello_timeout
                        );
                        self.stop_all();
                        self.close_now(CloseCode::ProtocolError, &reason);
                    }
                }
                Timer::Call(id) => {
                    if let Some(open) = self.open.remove(&id) {
                        self.end_open(id);
                        self.streams.remove(&open.stream);
                        self.timers.remove(Timer::Progress(open.stream));
                        self.out.push_back(ServerOutput::Stop {
                            stream: open.stream,
                            id,
                        });
                        self.out.push_back(ServerOutput::Reset {
                            stream: open.stream,
                            code: StreamCode::Expired,
                        });
                        self.after_call_ended(now);
                    }
                }
                Timer::Progress(stream) => self.stalled(now, stream),
                Timer::Drain => {
                    if self.phase == Phase::Draining {
                        self.abandon_for_shutdown();
                        self.goodbye_after_drain(now);
                    }
                }
                Timer::Close => {
                    if let Phase::Closing { code, reason } = &self.phase {
                        let (code, reason) = (*code, reason.clone());
                        self.close_now(code, &reason);
                    }
                }
                Timer::Idle => {
                    if self.phase == Phase::Open && self.streams.is_empty() {
                        self.say_goodbye(
                            now,
                            GoodbyeReason::Normal,
                            CloseCode::Normal,
                            "the connection was idle; reconnect to call again",
                        );
                    }
                }
            }
        }
    }

    // ----- closing -----

    /// Stops taking calls: from now on every new call is answered with a
    /// `ShuttingDown` error, open calls may finish until `deadline`. Once
    /// every open call is answered and its reply written (or at `deadline`,
    /// stopping what is left), the server says goodbye and closes as
    /// [`ServerConfig::close_timeout`] says.
    pub fn begin_shutdown(&mut self, now: Timestamp, deadline: Timestamp) {
        match self.phase {
            Phase::AwaitingHello => {
                self.stop_all();
                self.close_now(CloseCode::ShuttingDown, "the server is shutting down");
            }
            Phase::Open => {
                self.phase = Phase::Draining;
                self.timers.remove(Timer::Idle);
                self.timers.set(Timer::Drain, deadline);
                self.run_gate(now);
                self.after_call_ended(now);
            }
            _ => {}
        }
    }

    /// Closes the connection now: stops every open call, says goodbye
    /// (`ShuttingDown` after [`begin_shutdown`](Self::begin_shutdown), else
    /// `Normal`), and closes once the client has closed or after the close
    /// timeout.
    pub fn close(&mut self, now: Timestamp) {
        match self.phase {
            Phase::AwaitingHello => {
                self.stop_all();
                self.close_now(CloseCode::Normal, "the server closed the connection");
            }
            Phase::Open | Phase::Draining => {
                let draining = self.phase == Phase::Draining;
                self.abandon_for_shutdown();
                if draining {
                    self.say_goodbye(
                        now,
                        GoodbyeReason::ShuttingDown,
                        CloseCode::ShuttingDown,
                        "the server is shutting down",
                    );
                } else {
                    self.say_goodbye(
                        now,
                        GoodbyeReason::Normal,
                        CloseCode::Normal,
                        "the server closed the connection",
                    );
                }
            }
            _ => {}
        }
    }

    /// The client broke the protocol, or the control stream's bytes could not
    /// be decoded: stops every open call, says goodbye with reason protocol
    /// error carrying `message`, and closes.
    pub fn protocol_violation(&mut self, now: Timestamp, message: impl Into<String>) {
        if matches!(self.phase, Phase::Closed | Phase::Closing { .. }) {
            return;
        }
        let message = message.into();
        self.abandon_for_shutdown();
        self.say_goodbye(
            now,
            GoodbyeReason::ProtocolError,
            CloseCode::ProtocolError,
            &message,
        );
    }

    /// The control stream, ending with our `Goodbye`, was acknowledged by the
    /// client. After a refusal the connection closes at once; after a normal
    /// goodbye the client closes it once it has read its replies.
    pub fn goodbye_acknowledged(&mut self, now: Timestamp) {
        let _ = now;
        if let Phase::Closing { code, reason } = &self.phase {
            if !matches!(code, CloseCode::Normal | CloseCode::ShuttingDown) {
                let (code, reason) = (*code, reason.clone());
                self.close_now(code, &reason);
            }
        }
    }

    /// The transport lost the connection (or the client closed it): stops
    /// every open call. No [`ServerOutput::Close`] follows: the connection is
    /// already gone.
    pub fn connection_lost(&mut self, now: Timestamp) {
        let _ = now;
        if self.phase == Phase::Closed {
            return;
        }
        self.stop_all();
        self.phase = Phase::Closed;
        self.timers.clear();
    }

    // ----- internals -----

    fn touch(&mut self, now: Timestamp) {
        self.heard(now);
        self.last_activity = self.last_activity.max(now);
        if self.timers.get(Timer::Idle).is_some() {
            self.arm_idle(now);
        }
    }

    /// Starts the idle timer if the connection has nothing going on.
    fn arm_idle(&mut self, now: Timestamp) {
        if self.phase != Phase::Open || !self.streams.is_empty() {
            return;
        }
        if let Some(idle) = self.config.idle_timeout {
            self.timers
                .set(Timer::Idle, self.last_activity.max(now) + idle);
        }
    }

    /// The bookkeeping after a call or its stream ended: the idle timer, and
    /// the Goodbye of a drain that is complete.
    fn after_call_ended(&mut self, now: Timestamp) {
        match self.phase {
            Phase::Open => self.arm_idle(now),
            Phase::Draining if self.streams.is_empty() => self.goodbye_after_drain(now),
            _ => {}
        }
    }

    fn goodbye_after_drain(&mut self, now: Timestamp) {
        self.timers.remove(Timer::Drain);
        self.say_goodbye(
            now,
            GoodbyeReason::ShuttingDown,
            CloseCode::ShuttingDown,
            "the server is shutting down",
        );
    }

    /// Stops every open call and resets every stream still in use, for a
    /// close that does not wait for them.
    fn abandon_for_shutdown(&mut self) {
        for (id, open) in core::mem::take(&mut self.open) {
            self.end_open(id);
            self.out.push_back(ServerOutput::Stop {
                stream: open.stream,
                id,
            });
        }
        // In stream order, for outputs that do not depend on the map's.
        let mut streams: Vec<_> = self.streams.drain().collect();
        streams.sort_unstable_by_key(|&(stream, _)| stream);
        for (stream, state) in streams {
            // A reply being written is let through: the client may read it.
            if matches!(state, Stream::Replying) {
                self.streams.insert(stream, state);
                continue;
            }
            self.out.push_back(ServerOutput::Reset {
                stream,
                code: StreamCode::ShuttingDown,
            });
        }
        self.gate.clear();
        self.timers
            .retain(|t| !matches!(t, Timer::Call(_) | Timer::Progress(_)));
    }

    /// Stops every open call, for a connection that is gone.
    fn stop_all(&mut self) {
        for (id, open) in core::mem::take(&mut self.open) {
            self.end_open(id);
            self.out.push_back(ServerOutput::Stop {
                stream: open.stream,
                id,
            });
        }
        self.streams.clear();
        self.gate.clear();
    }

    /// Sends a Goodbye and waits (bounded) for the client to close.
    fn say_goodbye(
        &mut self,
        now: Timestamp,
        reason: GoodbyeReason,
        code: CloseCode,
        message: &str,
    ) {
        if matches!(self.phase, Phase::Closed | Phase::Closing { .. }) {
            return;
        }
        if !matches!(code, CloseCode::Normal | CloseCode::ShuttingDown) {
            // A refused client gets no more of the server's time.
            self.stop_all();
        }
        self.out
            .push_back(ServerOutput::Transmit(Message::Goodbye(Goodbye {
                reason,
                message: String::from(message),
            })));
        self.timers.clear();
        self.timers
            .set(Timer::Close, now + self.config.close_timeout);
        self.phase = Phase::Closing {
            code,
            reason: String::from(message),
        };
    }

    fn close_now(&mut self, code: CloseCode, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.timers.clear();
        self.streams.clear();
        self.gate.clear();
        self.out.push_back(ServerOutput::Close {
            code,
            reason: String::from(reason),
        });
    }

    /// The end of an admitted call: its deadline and shared-capacity place.
    fn end_open(&mut self, id: RequestId) {
        self.timers.remove(Timer::Call(id));
        if let Some(capacity) = &self.config.capacity {
            capacity.release();
        }
    }
}

/// Compares the token in constant time (for tokens of equal length; the length
/// itself is not hidden). `expected == None` accepts any client.
pub(crate) fn token_matches(expected: Option<&str>, given: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let present = given.is_some();
    let given = given.unwrap_or("");
    let equal: bool = expected.as_bytes().ct_eq(given.as_bytes()).into();
    equal & present
}
