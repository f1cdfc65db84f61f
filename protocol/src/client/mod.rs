//! The client: calls, their order and deadlines, connecting and reconnecting,
//! liveness, and closing.
//!
//! A [`ClientProtocol`] holds every decision a client makes, across the
//! connections it opens one after another: when to connect and reconnect
//! (with backoff), which call goes out next (in the order they were made, at
//! most `max_in_flight` at once), when a call fails (its deadline, wherever it
//! waits; a dead or lost server), which lost calls are sent again (only those
//! marked idempotent), and how the connection is closed. It reads no clock,
//! owns no socket and spawns no task; the async client (or a test, a fuzzer, a
//! browser event loop) drives it.
//!
//! # Connections
//!
//! The machine asks for a connection with [`ClientOutput::Connect`], naming it
//! with a [`ConnId`]; every later input about that connection carries the id,
//! and inputs about an older connection are ignored, so a late event from a
//! connection already replaced does no harm.
//!
//! # Run-loop contract
//!
//! 1. Create it with [`ClientProtocol::new`]; it is idle until
//!    [`connect`](ClientProtocol::connect) or the first
//!    [`start_call`](ClientProtocol::start_call).
//! 2. Feed inputs as they happen, each with the current time first:
//!    - from the application: [`connect`](ClientProtocol::connect),
//!      [`start_call`](ClientProtocol::start_call),
//!      [`cancel`](ClientProtocol::cancel), [`abandon`](ClientProtocol::abandon)
//!      (the caller stopped waiting), [`close`](ClientProtocol::close);
//!    - from the transport: [`connected`](ClientProtocol::connected) or
//!      [`connect_failed`](ClientProtocol::connect_failed) for a `Connect`;
//!      [`handle_message`](ClientProtocol::handle_message) for each message of
//!      the control stream; [`reply_received`](ClientProtocol::reply_received)
//!      or [`reply_failed`](ClientProtocol::reply_failed) for each call's
//!      stream; [`heard_from_peer`](ClientProtocol::heard_from_peer) whenever
//!      bytes arrive (a large reply still arriving is a sign of life);
//!      [`goodbye_acknowledged`](ClientProtocol::goodbye_acknowledged),
//!      [`protocol_violation`](ClientProtocol::protocol_violation) and
//!      [`connection_lost`](ClientProtocol::connection_lost).
//! 3. After every input, drain [`poll_output`](ClientProtocol::poll_output)
//!    until it returns `None` and carry out each [`ClientOutput`] in order.
//! 4. Then ask [`poll_timeout`](ClientProtocol::poll_timeout). If it returns
//!    `Some(t)`, call [`handle_timeout`](ClientProtocol::handle_timeout) at (or
//!    after) `t` unless another input comes first, and go back to step 3. If it
//!    returns `None`, no timer is needed: an idle client costs nothing.
//!
//! Calling `handle_timeout` early, late or more often than asked is harmless.
//!
//! # Guarantees
//!
//! - Every call that [`start_call`](ClientProtocol::start_call) accepted
//!   completes exactly once, with one [`ClientOutput::Completed`].
//! - At most [`ClientConfig::max_in_flight`] calls are in flight at once, and
//!   calls are sent in the order they were started (calls sent again after a
//!   loss go first, in their original order).
//! - A call ends at its deadline wherever it waits: for its turn, for a
//!   connection, or for its reply.
//! - A call is sent again on a new connection only if it is idempotent; any
//!   other call in flight on a lost connection fails with a connection error.
//! - Nothing the server sends makes this code panic. A message a server must
//!   not send closes the connection with a protocol-error goodbye.
//!
//! # Example
//!
//! ```
//! use teleport_protocol::client::{CallOptions, ClientConfig, ClientOutput, ClientProtocol};
//! use teleport_protocol::{tree, Hello, Message, Reply, Timestamp};
//!
//! let t0 = Timestamp::ZERO;
//! let mut client = ClientProtocol::new(t0, ClientConfig::default());
//! let id = client.start_call(t0, "add", tree!([1, 2]), CallOptions::default()).unwrap();
//! // No connection yet: the machine asks for one.
//! let Some(ClientOutput::Connect { conn }) = client.poll_output() else { panic!() };
//! client.connected(t0, conn);
//! let Some(ClientOutput::Transmit { message: Message::Hello(_), .. }) = client.poll_output() else {
//!     panic!()
//! };
//! client.handle_message(t0, conn, Message::Hello(Hello::default())).unwrap();
//! // Connected: the call goes out on a stream of its own.
//! let Some(ClientOutput::Send { call, .. }) = client.poll_output() else { panic!() };
//! assert_eq!(call.request_id, id);
//! let reply = Reply { request_id: id, result: Ok(tree!(3)) };
//! client.reply_received(Timestamp::from_micros(300), conn, id, reply);
//! let Some(ClientOutput::Completed { result, .. }) = client.poll_output() else { panic!() };
//! assert_eq!(result.unwrap(), tree!(3));
//! // Nothing pending: no timer.
//! assert_eq!(client.poll_timeout(), None);
//! ```

mod config;
mod error;
mod link;
#[cfg(test)]
mod tests;

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use crate::deadlines::Deadlines;
use crate::id_map::IdMap;
use crate::liveness::{Liveness, LivenessEvent};
use crate::server::token_matches;
use crate::{
    Backoff, Call, CloseCode, Goodbye, GoodbyeReason, Hello, Message, Reply, RequestId, StreamCode,
    Timestamp, Tree,
};

pub use config::{ClientConfig, DEFAULT_AGENT};
pub use error::{
    CallError, ClientMessageError, ConnectError, ConnectFailure, ReplyFailure, StartCallError,
};

/// Names one connection of a client: see the [module docs](self).
pub type ConnId = u64;

/// How one call is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOptions {
    /// The call's timeout; `None`: the client's default.
    pub timeout: Option<Duration>,
    /// Whether running the call twice is harmless, so that it is sent again on
    /// the next connection if its connection is lost; `None`: the client's
    /// default ([`ClientConfig::resend_lost_calls`]).
    pub idempotent: Option<bool>,
}

impl CallOptions {
    /// The client's defaults: its default timeout, and sent again after a
    /// lost connection only if [`ClientConfig::resend_lost_calls`] says so.
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Fail with [`CallError::DeadlineExceeded`] if no reply arrives within
    /// `timeout` (the server is told the deadline too, and drops the call when
    /// it passes). Waiting for a turn or a connection counts against it; a
    /// call still waiting for a connection when it passes fails with
    /// [`CallError::NotConnected`].
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Whether running the call twice is harmless. If so and its connection
    /// is lost while the call is in flight, the call is sent again on the next
    /// connection (within its deadline) instead of failing; otherwise it fails
    /// with a connection error, as it may or may not have run.
    pub fn idempotent(mut self, idempotent: bool) -> CallOptions {
        self.idempotent = Some(idempotent);
        self
    }
}

/// What the state machine asks its driver to do. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClientOutput {
    /// Open a connection to the server (resolve, QUIC, TLS, open the control
    /// stream), and report [`connected`](ClientProtocol::connected) or
    /// [`connect_failed`](ClientProtocol::connect_failed) with `conn`.
    Connect {
        /// The new connection's id.
        conn: ConnId,
    },
    /// Send this message on the control stream of `conn`.
    Transmit {
        /// The connection.
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// Open a call stream on `conn` (streams in the order of these outputs),
    /// write the call, finish the stream, and read the reply.
    Send {
        /// The connection.
        conn: ConnId,
        /// The call.
        call: Call,
    },
    /// Abandon the stream of call `id` on `conn` in both directions with
    /// `code`.
    AbandonCall {
        /// The connection.
        conn: ConnId,
        /// The call.
        id: RequestId,
        /// Why.
        code: StreamCode,
    },
    /// Close connection `conn` now (or abandon the attempt to open it).
    CloseConnection {
        /// The connection.
        conn: ConnId,
        /// The application close code.
        code: CloseCode,
        /// For people, not programs.
        reason: String,
    },
    /// A call completed; deliver the result to whoever awaits `id`.
    Completed {
        /// The id [`ClientProtocol::start_call`] returned.
        id: RequestId,
        /// The call's method (for reporting a failure nobody read, see
        /// [`ClientProtocol::report_unobserved`]).
        method: String,
        /// The server's result, or why the call failed.
        result: Result<Tree, CallError>,
    },
    /// The answer to [`connect`](ClientProtocol::connect): connected, or given
    /// up (a permanent failure, or the connect timeout passed).
    ConnectResult(Result<(), ConnectError>),
}

/// Where the client's connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Link {
    /// No connection, and none being made.
    Idle,
    /// A `Connect` is out; waiting for `connected` or `connect_failed`.
    Connecting {
        conn: ConnId,
    },
    /// The transport is up and the `Hello` sent; waiting for the server's.
    Handshaking {
        conn: ConnId,
    },
    Up {
        conn: ConnId,
        since: Timestamp,
    },
    /// The server said goodbye; replies it sent before may still arrive.
    Draining {
        conn: ConnId,
    },
    /// Waiting before the next attempt.
    Backoff,
    /// Reconnecting is off and the connection ended: calls fail with `cause`
    /// until the application connects again.
    Lost {
        cause: CallError,
    },
    /// This client said goodbye; waiting for it to be acknowledged.
    Closing {
        conn: ConnId,
    },
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The call's own deadline.
    Call(RequestId),
    /// A call without a deadline waiting for a connection gives up.
    ConnectWait(RequestId),
    /// The connection attempt takes too long.
    Attempt,
    /// The next attempt is due.
    Backoff,
    /// `connect()` gives up.
    ConnectDeadline,
    /// After the server's Goodbye, the last replies are late.
    GoodbyeWait,
    /// After our Goodbye, close anyway.
    CloseWait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    /// Waiting for its turn or a connection, since then.
    Queued { since: Timestamp },
    /// Sent on this connection.
    InFlight { conn: ConnId },
}

#[derive(Debug)]
struct Entry {
    method: String,
    /// The arguments while the call waits to be sent, and afterwards only if
    /// it may be sent again (idempotent, and reconnecting is on).
    args: Option<Tree>,
    /// The timeout the call was started with (or the default).
    timeout: Option<Duration>,
    deadline: Option<Timestamp>,
    idempotent: bool,
    /// The caller stopped waiting for the result.
    abandoned: bool,
    at: Where,
}

/// The client's state machine. See the [module docs](self) for the run-loop
/// contract.
#[derive(Debug)]
pub struct ClientProtocol {
    config: ClientConfig,
    link: Link,
    calls: IdMap<RequestId, Entry>,
    /// Calls waiting to be sent, in order.
    queue: VecDeque<RequestId>,
    in_flight: usize,
    timers: Deadlines<Timer>,
    liveness: Liveness,
    next_id: RequestId,
    next_conn: ConnId,
    /// Consecutive failed attempts (and short-lived connections), for backoff.
    failures: u32,
    attempts: u32,
    last_error: Option<String>,
    /// A `connect()` waits for the outcome.
    connect_waiting: bool,
    /// The first failure of a call nobody awaited, for the next call.
    unobserved: Option<(String, CallError)>,
    peer_agent: Option<String>,
    stats: CallCounts,
    out: VecDeque<ClientOutput>,
}

/// What a client's calls and connections came to, counted by the machine;
/// see [`ClientProtocol::counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallCounts {
    /// Calls started.
    pub started: u64,
    /// Calls completed with a result.
    pub succeeded: u64,
    /// Calls completed with an error (their own, the server's, or the
    /// connection's; cancelled and timed-out calls included).
    pub failed: u64,
    /// Sends of a call after its first (idempotent calls re-sent on a new
    /// connection).
    pub resent: u64,
    /// Connections that completed their Hello exchange.
    pub connections: u64,
}

impl ClientProtocol {
    /// An idle client at `now`: it connects on [`connect`](Self::connect) or
    /// its first call.
    pub fn new(now: Timestamp, mut config: ClientConfig) -> ClientProtocol {
        config.max_in_flight = config.max_in_flight.max(1);
        let liveness = Liveness::new(now, config.ping_interval, config.max_age);
        ClientProtocol {
            config,
            link: Link::Idle,
            calls: IdMap::default(),
            queue: VecDeque::new(),
            in_flight: 0,
            timers: Deadlines::default(),
            liveness,
            next_id: 1,
            next_conn: 1,
            failures: 0,
            attempts: 0,
            last_error: None,
            connect_waiting: false,
            unobserved: None,
            peer_agent: None,
            stats: CallCounts::default(),
            out: VecDeque::new(),
        }
    }

    /// What this client's calls and connections came to so far.
    pub fn counts(&self) -> CallCounts {
        self.stats
    }

    /// The configuration in use (`max_in_flight` at least 1).
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Calls in flight now (sent, not answered).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Calls waiting to be sent (for their turn or a connection).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True if call `id` has not completed.
    pub fn is_pending(&self, id: RequestId) -> bool {
        self.calls.contains_key(&id)
    }

    /// True while a connection that takes calls is up (handshake complete).
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// The connection in use or being made, if any.
    pub fn connection(&self) -> Option<ConnId> {
        match self.link {
            Link::Connecting { conn }
            | Link::Handshaking { conn }
            | Link::Up { conn, .. }
            | Link::Draining { conn }
            | Link::Closing { conn } => Some(conn),
            _ => None,
        }
    }

    /// True once the client was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.link, Link::Closed | Link::Closing { .. })
    }

    /// True once the client was closed and its last connection closed too:
    /// the machine will ask for nothing more.
    pub fn is_finished(&self) -> bool {
        self.link == Link::Closed
    }

    /// True if the client takes no new calls until it connects again:
    /// reconnecting is off and its connection ended.
    pub fn is_lost(&self) -> bool {
        matches!(self.link, Link::Lost { .. })
    }

    /// Why the last connection or attempt failed, if one did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The agent string of the server's `Hello`, once connected.
    pub fn peer_agent(&self) -> Option<&str> {
        self.peer_agent.as_deref()
    }

    /// The next thing for the driver to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, or
    /// `None` if no timer is needed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let liveness = match self.link {
            Link::Up { .. } | Link::Draining { .. } => self.liveness.next_timeout(),
            _ => None,
        };
        [self.timers.next(), liveness].into_iter().flatten().min()
    }

    // ----- the application -----

    /// Connects, if not connected or connecting: for a client that is idle,
    /// or lost its connection with reconnecting off. Emits
    /// [`ClientOutput::ConnectResult`] once connected, or once it gives up: at
    /// the first permanent failure (TLS, a refusal by the server, a name that
    /// does not resolve) or when `connect_timeout` has passed.
    pub fn connect(&mut self, now: Timestamp) {
        match &self.link {
            Link::Closed | Link::Closing { .. } => {
                self.out
                    .push_back(ClientOutput::ConnectResult(Err(ConnectError::Closed)));
                return;
            }
            Link::Up { .. } => {
                self.out.push_back(ClientOutput::ConnectResult(Ok(())));
                return;
            }
            _ => {}
        }
        self.connect_waiting = true;
        self.timers
            .set(Timer::ConnectDeadline, now + self.config.connect_timeout);
        match self.link {
            Link::Idle | Link::Lost { .. } => {
                self.link = Link::Idle;
                self.failures = 0;
                self.attempts = 0;
                self.start_attempt(now);
            }
            Link::Backoff => {
                // Someone waits now: try at once.
                self.timers.remove(Timer::Backoff);
                self.start_attempt(now);
            }
            _ => {}
        }
    }

    /// Starts a call of `method` on `args`, and returns its id. The call is
    /// sent at once if the client is connected and has a free slot; otherwise
    /// it waits, in order, up to its deadline (or, while there is no
    /// connection and it has no deadline, up to the connect timeout). A client
    /// that is idle starts connecting.
    pub fn start_call(
        &mut self,
        now: Timestamp,
        method: impl Into<String>,
        args: Tree,
        options: CallOptions,
    ) -> Result<RequestId, StartCallError> {
        if let Some((method, error)) = self.unobserved.take() {
            return Err(StartCallError::Unobserved { method, error });
        }
        match &self.link {
            Link::Closed | Link::Closing { .. } => {
                return Err(StartCallError::Closed {
                    cause: CallError::Closed,
                })
            }
            Link::Lost { cause } => {
                return Err(StartCallError::Closed {
                    cause: cause.clone(),
                })
            }
            _ => {}
        }
        let id = self.allocate_id();
        self.stats.started += 1;
        let timeout = options.timeout.or(self.config.default_timeout);
        let deadline = timeout.map(|t| now + t);
        if let Some(d) = deadline {
            self.timers.set(Timer::Call(id), d);
        }
        self.calls.insert(
            id,
            Entry {
                method: method.into(),
                args: Some(args),
                timeout,
                deadline,
                idempotent: options.idempotent.unwrap_or(self.config.resend_lost_calls),
                abandoned: false,
                at: Where::Queued { since: now },
            },
        );
        self.queue.push_back(id);
        match self.link {
            Link::Up { .. } => self.fill(now),
            Link::Idle => {
                self.arm_connect_wait(now, id);
                self.start_attempt(now);
            }
            _ => self.arm_connect_wait(now, id),
        }
        Ok(id)
    }

    /// Cancels call `id`: it completes with [`CallError::Cancelled`] and, if it
    /// was sent, the server is told to drop it. Returns false if it is not
    /// pending.
    pub fn cancel(&mut self, now: Timestamp, id: RequestId) -> bool {
        let Some(entry) = self.calls.get(&id) else {
            return false;
        };
        if let Where::InFlight { conn } = entry.at {
            self.out.push_back(ClientOutput::Transmit {
                conn,
                message: Message::Cancel { request_id: id },
            });
            self.out.push_back(ClientOutput::AbandonCall {
                conn,
                id,
                code: StreamCode::Cancelled,
            });
        }
        self.complete(now, id, Err(CallError::Cancelled));
        true
    }

    /// The caller stopped waiting for call `id` (its future was dropped). The
    /// call goes on; if it fails, the failure is reported by the next
    /// [`start_call`](Self::start_call) (see [`ClientConfig::raise_unobserved`]).
    pub fn abandon(&mut self, now: Timestamp, id: RequestId) {
        let _ = now;
        if let Some(entry) = self.calls.get_mut(&id) {
            entry.abandoned = true;
        }
    }

    /// A call failed with `error` and nobody read it (its result arrived, then
    /// the caller dropped its future unread): the next
    /// [`start_call`](Self::start_call) reports it, unless turned off
    /// ([`ClientConfig::raise_unobserved`]) or a failure is already waiting.
    /// Cancellations and this client's own close are not failures.
    pub fn report_unobserved(&mut self, now: Timestamp, method: String, error: CallError) {
        let _ = now;
        if !self.config.raise_unobserved
            || self.unobserved.is_some()
            || matches!(error, CallError::Cancelled | CallError::Closed)
        {
            return;
        }
        self.unobserved = Some((method, error));
    }

    /// Closes the client: every pending call fails with [`CallError::Closed`],
    /// the server is told goodbye, and the connection is closed once the
    /// goodbye is acknowledged (or after `close_wait`).
    pub fn close(&mut self, now: Timestamp) {
        if self.is_closed() {
            return;
        }
        let conn = match self.link {
            Link::Handshaking { conn } | Link::Up { conn, .. } | Link::Draining { conn } => {
                Some(conn)
            }
            Link::Connecting { conn } => {
                self.out.push_back(ClientOutput::CloseConnection {
                    conn,
                    code: CloseCode::Normal,
                    reason: String::from("the client was closed"),
                });
                None
            }
            _ => None,
        };
        // The link first: failing the calls must not send queued ones.
        self.link = match conn {
            Some(conn) => Link::Closing { conn },
            None => Link::Closed,
        };
        self.fail_all(now, &CallError::Closed);
        self.timers.clear();
        self.give_up_connect(ConnectError::Closed);
        if let Some(conn) = conn {
            self.out.push_back(ClientOutput::Transmit {
                conn,
                message: Message::Goodbye(Goodbye {
                    reason: GoodbyeReason::Normal,
                    message: String::from("the client closed the connection"),
                }),
            });
            self.timers
                .set(Timer::CloseWait, now + self.config.close_wait);
        }
    }

    // ----- the transport -----

    /// Connection `conn`'s transport is up (TLS done, control stream open):
    /// the `Hello` goes out.
    pub fn connected(&mut self, now: Timestamp, conn: ConnId) {
        if self.link != (Link::Connecting { conn }) {
            return;
        }
        self.link = Link::Handshaking { conn };
        // The server answered the TLS handshake, so it is there: its Hello
        // gets the whole connect timeout. Abandoning it at the short attempt
        // timeout (a busy server, a lost packet) would start another
        // handshake on a server already struggling, and leave it an open
        // connection that lingers until QUIC's idle timeout if our close is
        // lost.
        self.timers
            .set(Timer::Attempt, now + self.config.connect_timeout);
        self.out.push_back(ClientOutput::Transmit {
            conn,
            message: Message::Hello(Hello {
                agent: self.config.agent.clone(),
                // A server that must prove itself may be anyone: no secret
                // goes to it first.
                token: match self.config.server_token {
                    Some(_) => None,
                    None => self.config.token.clone(),
                },
            }),
        });
    }

    /// The attempt to open connection `conn` failed.
    pub fn connect_failed(&mut self, now: Timestamp, conn: ConnId, failure: ConnectFailure) {
        if !matches!(self.link, Link::Connecting { conn: c } | Link::Handshaking { conn: c } if c == conn)
        {
            return;
        }
        let reason = format!("{failure}");
        let spent = matches!(failure, ConnectFailure::Spent(_));
        let give_up = failure
            .is_permanent()
            .then_some(ConnectError::Failed(failure));
        self.attempt_failed(now, reason, give_up);
        if spent {
            // No attempt can ever succeed: the calls waiting for one fail
            // now instead of at their connect wait.
            for id in self.queue.clone() {
                if let Some(Where::Queued { since }) = self.calls.get(&id).map(|e| e.at) {
                    let error = self.not_connected(now, since);
                    self.complete(now, id, Err(error));
                }
            }
            self.stop_trying_if_unwanted();
        }
    }

    /// Bytes arrived from the server on `conn`: it is alive. Call this as data
    /// arrives, not only when a whole message is decoded.
    pub fn heard_from_peer(&mut self, now: Timestamp, conn: ConnId) {
        if self.connection() == Some(conn) {
            self.liveness.heard(now);
        }
    }

    /// Handles one message decoded from the control stream of `conn`. (Over a
    /// single ordered byte stream, replies arrive here too.)
    ///
    /// Errors are for logging: the state machine has already acted on them
    /// (see [`ClientMessageError::is_fatal`]).
    pub fn handle_message(
        &mut self,
        now: Timestamp,
        conn: ConnId,
        message: Message,
    ) -> Result<(), ClientMessageError> {
        match self.link {
            Link::Handshaking { conn: c } if c == conn => {
                self.liveness.heard(now);
                return self.handle_handshake(now, conn, message);
            }
            Link::Up { conn: c, .. } | Link::Draining { conn: c } if c == conn => {}
            _ => return Ok(()),
        }
        self.liveness.heard(now);
        match message {
            Message::Reply(reply) => {
                let id = reply.request_id;
                if !self.is_in_flight_on(id, conn) {
                    return Err(ClientMessageError::UnknownRequest { id });
                }
                self.complete(now, id, reply.result.map_err(CallError::Remote));
                Ok(())
            }
            Message::Pong { .. } => Ok(()),
            Message::Ping { nonce } => {
                self.out.push_back(ClientOutput::Transmit {
                    conn,
                    message: Message::Pong { nonce },
                });
                Ok(())
            }
            Message::Goodbye(Goodbye { reason, message }) => {
                let cause = CallError::ServerClosed { reason, message };
                if self.in_flight == 0 {
                    self.end_connection(now, conn, cause, true);
                } else {
                    // Replies sent before the Goodbye travel on other streams
                    // and may still be on their way.
                    self.link = Link::Draining { conn };
                    self.last_error = Some(format!("{cause}"));
                    self.timers
                        .set(Timer::GoodbyeWait, now + self.config.goodbye_wait);
                }
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.protocol_violation(
                    now,
                    conn,
                    format!("a server must not send {kind:?} messages"),
                );
                Err(ClientMessageError::Unexpected { kind })
            }
        }
    }

    fn handle_handshake(
        &mut self,
        now: Timestamp,
        conn: ConnId,
        message: Message,
    ) -> Result<(), ClientMessageError> {
        match message {
            Message::Hello(hello) => {
                if self.config.server_token.is_some()
                    && !token_matches(self.config.server_token.as_deref(), hello.token.as_deref())
                {
                    self.out.push_back(ClientOutput::CloseConnection {
                        conn,
                        code: CloseCode::Unauthenticated,
                        reason: String::from("the server did not present the expected token"),
                    });
                    let error = ConnectError::ServerUnauthenticated;
                    let text = format!("{error}");
                    self.attempt_failed(now, text, Some(error));
                    return Ok(());
                }
                self.peer_agent = Some(hello.agent);
                self.timers.remove(Timer::Attempt);
                self.attempts = 0;
                self.link = Link::Up { conn, since: now };
                self.stats.connections += 1;
                self.liveness = Liveness::new(now, self.config.ping_interval, self.config.max_age);
                // Waiting calls now wait for their turn only.
                self.timers.retain(|t| !matches!(t, Timer::ConnectWait(_)));
                if self.connect_waiting {
                    self.connect_waiting = false;
                    self.timers.remove(Timer::ConnectDeadline);
                    self.out.push_back(ClientOutput::ConnectResult(Ok(())));
                }
                self.fill(now);
                Ok(())
            }
            Message::Goodbye(Goodbye { reason, message }) => {
                self.out.push_back(ClientOutput::CloseConnection {
                    conn,
                    code: CloseCode::Normal,
                    reason: String::from("refused by the server"),
                });
                let error = ConnectError::Rejected { reason, message };
                let text = format!("{error}");
                self.attempt_failed(now, text, Some(error));
                Ok(())
            }
            Message::Ping { nonce } => {
                self.out.push_back(ClientOutput::Transmit {
                    conn,
                    message: Message::Pong { nonce },
                });
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.protocol_violation(
                    now,
                    conn,
                    format!("a server must answer the Hello with a Hello, not {kind:?}"),
                );
                Err(ClientMessageError::Unexpected { kind })
            }
        }
    }

    /// The server on `conn` is shutting down (it refused or stopped call
    /// `id` for it): nothing more is sent on `conn`, and call `id` goes to the
    /// next connection if it may be sent again (it is idempotent, so its
    /// arguments were kept); otherwise it fails with `error`. (A refused call
    /// never ran, but only idempotent calls keep their arguments to be sent
    /// again.)
    fn server_draining(&mut self, now: Timestamp, conn: ConnId, id: RequestId, error: CallError) {
        if let Link::Up { .. } = self.link {
            self.link = Link::Draining { conn };
            self.timers
                .set(Timer::GoodbyeWait, now + self.config.goodbye_wait);
        }
        let resend = self.config.reconnect.is_some()
            && self.calls.get(&id).is_some_and(|e| e.args.is_some());
        if !resend {
            return self.complete(now, id, Err(error));
        }
        let entry = self.calls.get_mut(&id).expect("checked above");
        entry.at = Where::Queued { since: now };
        self.in_flight -= 1;
        self.stats.resent += 1;
        self.queue.push_front(id);
        if self.in_flight == 0 {
            self.liveness.set_busy(now, false);
            let cause = CallError::ServerClosed {
                reason: GoodbyeReason::ShuttingDown,
                message: String::from("the server is shutting down"),
            };
            self.end_connection(now, conn, cause, true);
        }
    }

    /// The server finished the control stream of `conn`. After its `Goodbye`
    /// that is how a control stream ends; before, it breaks the protocol.
    pub fn control_ended(&mut self, now: Timestamp, conn: ConnId) {
        if let Link::Handshaking { conn: c } | Link::Up { conn: c, .. } = self.link {
            if c == conn {
                self.protocol_violation(now, conn, "the server ended the control stream");
            }
        }
    }

    /// The reply to call `id` arrived on its stream of `conn`. A reply with
    /// request id 0 carrying an error belongs to the stream's call (the server
    /// could not read it); a reply naming another call is a protocol violation.
    pub fn reply_received(&mut self, now: Timestamp, conn: ConnId, id: RequestId, reply: Reply) {
        if !self.is_in_flight_on(id, conn) {
            return;
        }
        self.liveness.heard(now);
        match reply {
            // Refused because the server is shutting down: an idempotent
            // call goes to the next connection.
            Reply {
                request_id,
                result: Err(error),
            } if (request_id == id || request_id == 0)
                && error.kind == crate::ErrorKind::ShuttingDown
                && self.config.reconnect.is_some() =>
            {
                self.server_draining(now, conn, id, CallError::Remote(error));
            }
            Reply { request_id, result } if request_id == id => {
                self.complete(now, id, result.map_err(CallError::Remote))
            }
            Reply {
                request_id: 0,
                result: Err(error),
            } => self.complete(now, id, Err(CallError::Remote(error))),
            Reply { request_id, .. } => self.protocol_violation(
                now,
                conn,
                format!("the stream of call {id} carried a reply for request {request_id}"),
            ),
        }
    }

    /// The stream of call `id` on `conn` ended without a usable reply (the
    /// connection itself is fine: report its loss with
    /// [`connection_lost`](Self::connection_lost)).
    pub fn reply_failed(
        &mut self,
        now: Timestamp,
        conn: ConnId,
        id: RequestId,
        failure: ReplyFailure,
    ) {
        if !self.is_in_flight_on(id, conn) {
            return;
        }
        let error = match failure {
            ReplyFailure::Reset(StreamCode::Expired) => CallError::DeadlineExceeded {
                timeout: self.calls[&id].timeout.unwrap_or_default(),
            },
            // The server stopped it while shutting down: it may have run.
            ReplyFailure::Reset(StreamCode::ShuttingDown) => {
                let error = CallError::ServerClosed {
                    reason: GoodbyeReason::ShuttingDown,
                    message: String::from(
                        "the server stopped the call while shutting down; it may or may not \
                         have run",
                    ),
                };
                return self.server_draining(now, conn, id, error);
            }
            ReplyFailure::Reset(code) => CallError::StreamReset { code },
            ReplyFailure::OverLimit(message) => {
                // Stop the rest of the reply: nobody will read it.
                self.out.push_back(ClientOutput::AbandonCall {
                    conn,
                    id,
                    code: StreamCode::Refused,
                });
                CallError::ReplyOverLimit { message }
            }
            ReplyFailure::Malformed(reason) => {
                self.out.push_back(ClientOutput::AbandonCall {
                    conn,
                    id,
                    code: StreamCode::Refused,
                });
                CallError::InvalidReply { reason }
            }
            ReplyFailure::Missing => CallError::InvalidReply {
                reason: String::from("the server finished the call's stream without a reply"),
            },
        };
        self.complete(now, id, Err(error));
    }

    /// The control stream of `conn`, ending with this client's `Goodbye`, was
    /// acknowledged by the server: the connection can close.
    pub fn goodbye_acknowledged(&mut self, now: Timestamp, conn: ConnId) {
        let _ = now;
        if self.link == (Link::Closing { conn }) {
            self.finish_close(conn);
        }
    }

    /// The server broke the protocol on `conn`, or its bytes could not be
    /// decoded: says goodbye with a protocol-error reason, closes the
    /// connection, and fails (or re-sends) its calls.
    pub fn protocol_violation(&mut self, now: Timestamp, conn: ConnId, message: impl Into<String>) {
        if !matches!(
            self.link,
            Link::Handshaking { conn: c } | Link::Up { conn: c, .. } | Link::Draining { conn: c }
            if c == conn
        ) {
            return;
        }
        let message = message.into();
        self.out.push_back(ClientOutput::Transmit {
            conn,
            message: Message::Goodbye(Goodbye {
                reason: GoodbyeReason::ProtocolError,
                message: message.clone(),
            }),
        });
        if let Link::Handshaking { .. } = self.link {
            self.out.push_back(ClientOutput::CloseConnection {
                conn,
                code: CloseCode::ProtocolError,
                reason: String::from("protocol violation"),
            });
            let error = ConnectError::ProtocolViolation { message };
            let text = format!("{error}");
            self.attempt_failed(now, text, Some(error));
            return;
        }
        let cause = CallError::ProtocolViolation { message };
        self.out.push_back(ClientOutput::CloseConnection {
            conn,
            code: CloseCode::ProtocolError,
            reason: String::from("protocol violation"),
        });
        self.end_connection(now, conn, cause, false);
    }

    /// The transport lost connection `conn` (or the attempt to open it failed
    /// after the transport was up).
    pub fn connection_lost(&mut self, now: Timestamp, conn: ConnId, reason: impl Into<String>) {
        let reason = reason.into();
        match self.link {
            Link::Connecting { conn: c } | Link::Handshaking { conn: c } if c == conn => {
                self.attempt_failed(now, reason, None);
            }
            Link::Up { conn: c, .. } | Link::Draining { conn: c } if c == conn => {
                self.end_connection(now, conn, CallError::ConnectionLost { reason }, false);
            }
            Link::Closing { conn: c } if c == conn => self.link = Link::Closed,
            _ => {}
        }
    }

    // ----- time -----

    /// Handles the passage of time: call deadlines, calls waiting too long for
    /// a connection, attempts that take too long, backoff, the last replies
    /// after a Goodbye, pings, and a server silent past `max_age`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Call(id) => self.deadline_passed(now, id),
                Timer::ConnectWait(id) => {
                    if let Some(Where::Queued { since }) = self.calls.get(&id).map(|e| e.at) {
                        if !self.is_connected() {
                            let error = self.not_connected(now, since);
                            self.complete(now, id, Err(error));
                        }
                    }
                }
                Timer::Attempt => {
                    if let Link::Connecting { conn } | Link::Handshaking { conn } = self.link {
                        self.out.push_back(ClientOutput::CloseConnection {
                            conn,
                            code: CloseCode::Normal,
                            reason: String::from("connection attempt timed out"),
                        });
                        let waited = self.attempt_timeout();
                        self.attempt_failed(
                            now,
                            format!("no answer from the server within {waited:?}"),
                            None,
                        );
                    }
                }
                Timer::Backoff => {
                    if self.link == Link::Backoff {
                        self.start_attempt(now);
                    }
                }
                Timer::ConnectDeadline => {
                    if self.connect_waiting && !self.is_connected() {
                        let error = ConnectError::TimedOut {
                            waited: self.config.connect_timeout,
                            last_error: self.last_error.clone(),
                        };
                        self.give_up_connect(error);
                        self.stop_trying_if_unwanted();
                    }
                }
                Timer::GoodbyeWait => {
                    if let Link::Draining { conn } = self.link {
                        let cause = CallError::ServerClosed {
                            reason: GoodbyeReason::ShuttingDown,
                            message: format!(
                                "no reply within {:?} of the server's goodbye",
                                self.config.goodbye_wait
                            ),
                        };
                        self.end_connection(now, conn, cause, true);
                    }
                }
                Timer::CloseWait => {
                    if let Link::Closing { conn } = self.link {
                        self.finish_close(conn);
                    }
                }
            }
        }
        if let Link::Up { conn, .. } | Link::Draining { conn } = self.link {
            match self.liveness.on_timeout(now) {
                Some(LivenessEvent::Ping(nonce)) => self.out.push_back(ClientOutput::Transmit {
                    conn,
                    message: Message::Ping { nonce },
                }),
                Some(LivenessEvent::Dead {
                    silent_for,
                    max_age,
                }) => {
                    self.out.push_back(ClientOutput::CloseConnection {
                        conn,
                        code: CloseCode::Normal,
                        reason: String::from("the server fell silent"),
                    });
                    let cause = CallError::NotAlive {
                        silent_for,
                        max_age,
                    };
                    self.end_connection(now, conn, cause, false);
                }
                None => {}
            }
        }
    }

    // ----- internals -----

    fn allocate_id(&mut self) -> RequestId {
        // Terminates: fewer than 2^64 - 1 calls are pending. Id 0 is reserved.
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0 && !self.calls.contains_key(&id) {
                return id;
            }
        }
    }

    fn is_in_flight_on(&self, id: RequestId, conn: ConnId) -> bool {
        self.calls
            .get(&id)
            .is_some_and(|e| e.at == Where::InFlight { conn })
    }

    /// A call without a deadline of its own waits for a connection up to the
    /// connect timeout.
    fn arm_connect_wait(&mut self, now: Timestamp, id: RequestId) {
        if let Some(entry) = self.calls.get(&id) {
            if entry.deadline.is_none() {
                self.timers
                    .set(Timer::ConnectWait(id), now + self.config.connect_timeout);
            }
        }
    }

    fn not_connected(&self, now: Timestamp, since: Timestamp) -> CallError {
        CallError::NotConnected {
            waited: now - since,
            last_error: self.last_error.clone(),
        }
    }

    /// Sends queued calls while the connection is up and slots are free.
    fn fill(&mut self, now: Timestamp) {
        let Link::Up { conn, .. } = self.link else {
            return;
        };
        while self.in_flight < self.config.max_in_flight {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            let keep = self.config.reconnect.is_some();
            let Some(entry) = self.calls.get_mut(&id) else {
                continue;
            };
            let timeout = entry.deadline.map(|d| d - now);
            let args = if entry.idempotent && keep {
                entry.args.clone()
            } else {
                entry.args.take()
            };
            entry.at = Where::InFlight { conn };
            let method = entry.method.clone();
            self.timers.remove(Timer::ConnectWait(id));
            self.in_flight += 1;
            self.liveness.set_busy(now, true);
            self.out.push_back(ClientOutput::Send {
                conn,
                call: Call {
                    request_id: id,
                    method,
                    timeout,
                    args: args.unwrap_or(Tree::None),
                },
            });
        }
    }

    fn deadline_passed(&mut self, now: Timestamp, id: RequestId) {
        let Some(entry) = self.calls.get(&id) else {
            return;
        };
        let error = match entry.at {
            Where::InFlight { conn } => {
                self.out.push_back(ClientOutput::Transmit {
                    conn,
                    message: Message::Cancel { request_id: id },
                });
                self.out.push_back(ClientOutput::AbandonCall {
                    conn,
                    id,
                    code: StreamCode::Expired,
                });
                CallError::DeadlineExceeded {
                    timeout: entry.timeout.unwrap_or_default(),
                }
            }
            // Waiting for a connection that never came says so.
            Where::Queued { since } if !self.is_connected() => self.not_connected(now, since),
            Where::Queued { .. } => CallError::DeadlineExceeded {
                timeout: entry.timeout.unwrap_or_default(),
            },
        };
        self.complete(now, id, Err(error));
    }

    /// Completes call `id` with `result`: removes it, frees its slot and sends
    /// the next queued call.
    fn complete(&mut self, now: Timestamp, id: RequestId, result: Result<Tree, CallError>) {
        let Some(entry) = self.calls.remove(&id) else {
            return;
        };
        self.timers.remove(Timer::Call(id));
        self.timers.remove(Timer::ConnectWait(id));
        match entry.at {
            Where::InFlight { .. } => {
                self.in_flight -= 1;
                if self.in_flight == 0 {
                    self.liveness.set_busy(now, false);
                }
            }
            Where::Queued { .. } => self.queue.retain(|&q| q != id),
        }
        if entry.abandoned {
            if let Err(error) = &result {
                self.report_unobserved(now, entry.method.clone(), error.clone());
            }
        }
        match &result {
            Ok(_) => self.stats.succeeded += 1,
            Err(_) => self.stats.failed += 1,
        }
        self.out.push_back(ClientOutput::Completed {
            id,
            method: entry.method,
            result,
        });
        if let Link::Draining { conn } = self.link {
            if self.in_flight == 0 {
                let cause = CallError::ServerClosed {
                    reason: GoodbyeReason::ShuttingDown,
                    message: String::from("the server said goodbye"),
                };
                self.end_connection(now, conn, cause, true);
                return;
            }
        }
        self.fill(now);
    }

    /// The ids of the pending calls `keep` accepts, in the order the calls
    /// were made (the map's own order is not theirs), for outputs that must
    /// come out in that order.
    fn ids_in_order(&self, keep: impl Fn(&Entry) -> bool) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self
            .calls
            .iter()
            .filter(|(_, e)| keep(e))
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Fails every pending call, in flight or queued, with `cause`.
    fn fail_all(&mut self, now: Timestamp, cause: &CallError) {
        for id in self.ids_in_order(|_| true) {
            self.complete(now, id, Err(cause.clone()));
        }
    }
}
