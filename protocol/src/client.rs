//! The client side of one connection: calls, replies, deadlines and liveness.
//!
//! A [`ClientProtocol`] holds every decision a client makes about one connection
//! to a server, and nothing else: it reads no clock, owns no socket and spawns no
//! task. The async client (or a test, a fuzzer, a browser event loop) drives it.
//!
//! # Run-loop contract
//!
//! 1. Create it with [`ClientProtocol::new`]. That queues the opening
//!    [`Message::Hello`]; drain it before anything else.
//! 2. Feed inputs as they happen, each with the current time:
//!    - [`start_call`](ClientProtocol::start_call),
//!      [`cancel`](ClientProtocol::cancel), [`close`](ClientProtocol::close) from the
//!      application;
//!    - [`handle_message`](ClientProtocol::handle_message) for every message decoded
//!      from the server, and [`heard_from_peer`](ClientProtocol::heard_from_peer)
//!      whenever bytes arrive at all (a large reply still arriving is a sign of life);
//!    - [`reply_failed`](ClientProtocol::reply_failed),
//!      [`protocol_violation`](ClientProtocol::protocol_violation) and
//!      [`connection_lost`](ClientProtocol::connection_lost) for what the transport
//!      finds out.
//! 3. After every input, drain [`poll_output`](ClientProtocol::poll_output) until it
//!    returns `None`: send each [`ClientOutput::Transmit`] in order, resolve each
//!    [`ClientOutput::Completed`], and close the transport on [`ClientOutput::Close`]
//!    (after sending the messages queued before it).
//! 4. Then ask [`poll_timeout`](ClientProtocol::poll_timeout). If it returns
//!    `Some(t)`, call [`handle_timeout`](ClientProtocol::handle_timeout) at (or after)
//!    `t` unless another input comes first, and go back to step 3. If it returns
//!    `None`, no timer is needed: an idle client costs nothing.
//!
//! Calling `handle_timeout` early, late or more often than asked is harmless.
//!
//! # Guarantees
//!
//! - Every call that [`start_call`](ClientProtocol::start_call) accepted completes
//!   exactly once, with one [`ClientOutput::Completed`]: with the server's reply, or
//!   with a [`CallError`] (deadline, cancellation, dead or lost connection, ...).
//! - At most [`ClientConfig::max_in_flight`] calls are pending at once.
//! - Nothing the server sends makes this code panic. A message a server must not
//!   send closes the connection with [`GoodbyeReason::ProtocolError`].
//! - Calls are sent at once, without waiting for the server's `Hello`: over one
//!   ordered byte stream the server reads the `Hello` first. A transport that uses
//!   separate streams must deliver the `Hello` before the calls (for example by
//!   sending it on the first stream and waiting for the server's `Hello`, see
//!   [`is_handshake_complete`](ClientProtocol::is_handshake_complete)).
//!
//! # Example
//!
//! ```
//! use core::time::Duration;
//! use teleport_protocol::client::{ClientConfig, ClientOutput, ClientProtocol};
//! use teleport_protocol::{tree, Message, Reply, Timestamp};
//!
//! let t0 = Timestamp::ZERO;
//! let mut client = ClientProtocol::new(ClientConfig::default(), t0);
//! let id = client.start_call(t0, "add", tree!([1, 2]), Some(Duration::from_secs(1))).unwrap();
//! while let Some(out) = client.poll_output() {
//!     // Hello, then the Call: hand them to the transport.
//!     assert!(matches!(out, ClientOutput::Transmit(_)));
//! }
//! // The server answers.
//! let t1 = Timestamp::from_micros(300);
//! let reply = Message::Reply(Reply { request_id: id, result: Ok(tree!(3)) });
//! client.handle_message(t1, reply).unwrap();
//! match client.poll_output() {
//!     Some(ClientOutput::Completed { id: done, result }) => {
//!         assert_eq!(done, id);
//!         assert_eq!(result.unwrap(), tree!(3));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! // Nothing pending: no timer.
//! assert_eq!(client.poll_timeout(), None);
//! ```

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use crate::{
    Call, Goodbye, GoodbyeReason, Hello, Kind, Message, RemoteError, RequestId, Timestamp, Tree,
};

/// The agent string sent in the client's `Hello` by default.
pub const DEFAULT_AGENT: &str = concat!("teleport-rs/", env!("CARGO_PKG_VERSION"), " client");

/// Settings of a [`ClientProtocol`].
///
/// Start from [`ClientConfig::default()`] and change the fields you need.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Calls that may be pending at once. [`ClientProtocol::start_call`] refuses
    /// more with [`StartCallError::AtCapacity`]. Default 16; 0 is treated as 1.
    pub max_in_flight: usize,
    /// While calls are pending and nothing has been heard from the server for this
    /// long, send a ping (at most one per interval). `None` sends no pings.
    /// Default 5 s; anything under 1 ms is treated as 1 ms.
    pub ping_interval: Option<Duration>,
    /// While calls are pending, a server silent for longer than this is declared
    /// dead and every pending call fails with [`CallError::NotAlive`]. `None`
    /// never declares it dead (deadlines still apply). Default 30 s.
    pub max_age: Option<Duration>,
    /// The timeout of calls started without one. Default `None` (no deadline).
    pub default_timeout: Option<Duration>,
    /// Names this client in its `Hello`. Default [`DEFAULT_AGENT`].
    pub agent: String,
    /// The shared token the server expects, if any. Never printed by `Debug`.
    pub token: Option<String>,
    /// Keep a copy of each pending call's method and arguments so that
    /// [`ClientProtocol::connection_lost`] can hand them back for re-sending. Costs
    /// one clone of the tree per call (array data is reference counted, not
    /// copied). Default `false`.
    pub keep_calls: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_in_flight: 16,
            ping_interval: Some(Duration::from_secs(5)),
            max_age: Some(Duration::from_secs(30)),
            default_timeout: None,
            agent: String::from(DEFAULT_AGENT),
            token: None,
            keep_calls: false,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("ping_interval", &self.ping_interval)
            .field("max_age", &self.max_age)
            .field("default_timeout", &self.default_timeout)
            .field("agent", &self.agent)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("keep_calls", &self.keep_calls)
            .finish()
    }
}

/// Why a call failed on this side of the connection (or on the server, for
/// [`CallError::Remote`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The server ran (or refused) the call and reported an error.
    #[error("the server reported an error: {0}")]
    Remote(RemoteError),
    /// No reply arrived within the call's timeout. The server was sent a cancel.
    #[error(
        "no reply within the call's timeout of {timeout:?}; the server was told to drop the call \
         (raise the timeout if the function is slow)"
    )]
    DeadlineExceeded {
        /// The timeout the call was started with.
        timeout: Duration,
    },
    /// The caller cancelled the call. The server was sent a cancel.
    #[error("the call was cancelled by the caller")]
    Cancelled,
    /// The server was silent for longer than `max_age` while calls were pending,
    /// and is presumed dead. The call may or may not have run.
    #[error(
        "the server sent nothing for {silent_for:?} while calls were pending (max_age is \
         {max_age:?}); it is presumed dead and the call may or may not have run (reconnect, or \
         raise max_age for slow links)"
    )]
    NotAlive {
        /// How long the server had been silent when it was declared dead.
        silent_for: Duration,
        /// The configured [`ClientConfig::max_age`].
        max_age: Duration,
    },
    /// The transport lost the connection. The call may or may not have run.
    #[error("the connection was lost ({reason}); the call may or may not have run")]
    ConnectionLost {
        /// What the transport reported.
        reason: String,
    },
    /// The server closed the connection with a `Goodbye`.
    #[error("the server closed the connection ({}): {message}", reason_text(*reason))]
    ServerClosed {
        /// The reason code the server gave.
        reason: GoodbyeReason,
        /// The server's explanation.
        message: String,
    },
    /// This client closed the connection before the call completed.
    #[error("the connection was closed by this client before the call completed")]
    Closed,
    /// The server broke the protocol (or its bytes could not be decoded), so this
    /// client closed the connection.
    #[error("the connection was closed after a protocol violation: {message}")]
    ProtocolViolation {
        /// What was wrong.
        message: String,
    },
    /// The reply to this call could not be received or decoded (for example it
    /// was over a configured limit); the connection itself may still be usable.
    #[error("the reply could not be received: {reason}")]
    InvalidReply {
        /// What the transport or decoder reported.
        reason: String,
    },
}

impl CallError {
    /// The server's error, if the server reported one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            CallError::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// True if the server reported the error.
    pub fn is_remote(&self) -> bool {
        matches!(self, CallError::Remote(_))
    }

    /// True if the call's own timeout expired on this side.
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, CallError::DeadlineExceeded { .. })
    }

    /// True if the caller cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, CallError::Cancelled)
    }

    /// True if the call failed because the connection failed or was closed (dead
    /// peer, lost connection, server goodbye, local close, protocol violation).
    /// Such a call may or may not have run on the server: re-send it on a new
    /// connection only if the method is idempotent.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            CallError::NotAlive { .. }
                | CallError::ConnectionLost { .. }
                | CallError::ServerClosed { .. }
                | CallError::Closed
                | CallError::ProtocolViolation { .. }
        )
    }
}

/// A human-readable reason code, for error messages.
pub(crate) fn reason_text(reason: GoodbyeReason) -> String {
    match reason {
        GoodbyeReason::Normal => "normal close".into(),
        GoodbyeReason::ShuttingDown => "shutting down".into(),
        GoodbyeReason::Unauthenticated => "unauthenticated: check the token".into(),
        GoodbyeReason::ProtocolError => "protocol error".into(),
        GoodbyeReason::UnsupportedVersion => "unsupported protocol version".into(),
        GoodbyeReason::Unknown(code) => format!("reason code {code}"),
    }
}

/// Why [`ClientProtocol::start_call`] did not start a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartCallError {
    /// `max_in_flight` calls are already pending. Wait for one to complete (any
    /// [`ClientOutput::Completed`]) and try again.
    #[error(
        "{max_in_flight} calls are already in flight (the configured max_in_flight); \
         wait for one to complete and try again"
    )]
    AtCapacity {
        /// The configured limit.
        max_in_flight: usize,
    },
    /// The connection is closed or was declared dead; open a new one.
    #[error("the connection takes no new calls, open a new one: {cause}")]
    Closed {
        /// Why the connection ended (the error its pending calls failed with).
        cause: CallError,
    },
}

impl StartCallError {
    /// True if the call may succeed later on this connection.
    pub fn is_at_capacity(&self) -> bool {
        matches!(self, StartCallError::AtCapacity { .. })
    }

    /// True if this connection will never take a call again.
    pub fn is_closed(&self) -> bool {
        matches!(self, StartCallError::Closed { .. })
    }
}

/// What was wrong with a message the server sent. Returned by
/// [`ClientProtocol::handle_message`] for logging; the state machine has already
/// acted on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientMessageError {
    /// A reply for a call that is not pending. Expected after a cancel or an
    /// expired deadline crossed the reply on the wire; the reply was ignored and
    /// the connection is fine.
    #[error(
        "reply for request {id}, which is not pending (cancelled, timed out, or never sent); \
         ignored"
    )]
    UnknownRequest {
        /// The request id the reply named.
        id: RequestId,
    },
    /// A message a server must never send (a `Call`, a `Cancel`, a second
    /// `Hello`). The connection has been closed with a protocol-error goodbye.
    #[error("the server sent a {kind:?} message, which servers must not send; connection closed")]
    Unexpected {
        /// The kind of the offending message.
        kind: Kind,
    },
}

impl ClientMessageError {
    /// True if the error closed the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ClientMessageError::Unexpected { .. })
    }
}

/// What the state machine asks its driver to do. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClientOutput {
    /// Send this message to the server.
    Transmit(Message),
    /// A call completed; deliver the result to whoever awaits `id`.
    Completed {
        /// The id [`ClientProtocol::start_call`] returned.
        id: RequestId,
        /// The server's result, or why the call failed.
        result: Result<Tree, CallError>,
    },
    /// The connection is finished: close the transport once the messages queued
    /// before this one are sent. Emitted once, as the last output.
    Close,
}

/// A call that was pending when the connection was lost, as returned by
/// [`ClientProtocol::connection_lost`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LostCall {
    /// The call's id on the lost connection.
    pub id: RequestId,
    /// The timeout the call was started with.
    pub timeout: Option<Duration>,
    /// `(method, args)`, kept only when [`ClientConfig::keep_calls`] is set.
    pub call: Option<(String, Tree)>,
}

#[derive(Debug)]
struct Pending {
    timeout: Option<Duration>,
    deadline: Option<Timestamp>,
    kept: Option<(String, Tree)>,
}

/// The client side of one connection. See the [module docs](self) for the
/// run-loop contract.
#[derive(Debug)]
pub struct ClientProtocol {
    config: ClientConfig,
    /// `Some` once the connection is finished: the error pending calls got.
    closed: Option<CallError>,
    pending: BTreeMap<RequestId, Pending>,
    deadlines: BTreeSet<(Timestamp, RequestId)>,
    next_id: RequestId,
    next_nonce: u64,
    last_heard: Timestamp,
    /// When the client last went from no pending calls to some.
    busy_since: Option<Timestamp>,
    /// The last ping sent during the current busy period.
    last_ping: Option<Timestamp>,
    peer_agent: Option<String>,
    out: VecDeque<ClientOutput>,
}

impl ClientProtocol {
    /// A client for a new connection, at time `now`. Queues the `Hello`.
    pub fn new(mut config: ClientConfig, now: Timestamp) -> ClientProtocol {
        config.max_in_flight = config.max_in_flight.max(1);
        config.ping_interval = config
            .ping_interval
            .map(|d| d.max(Duration::from_millis(1)));
        let mut out = VecDeque::new();
        out.push_back(ClientOutput::Transmit(Message::Hello(Hello {
            agent: config.agent.clone(),
            token: config.token.clone(),
        })));
        ClientProtocol {
            config,
            closed: None,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_id: 1,
            next_nonce: 1,
            last_heard: now,
            busy_since: None,
            last_ping: None,
            peer_agent: None,
            out,
        }
    }

    /// The configuration in use (`max_in_flight` at least 1, `ping_interval`
    /// at least 1 ms).
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Calls pending now.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// True if [`start_call`](Self::start_call) would accept a call now.
    pub fn can_start(&self) -> bool {
        self.closed.is_none() && self.pending.len() < self.config.max_in_flight
    }

    /// True if the call `id` is pending.
    pub fn is_pending(&self, id: RequestId) -> bool {
        self.pending.contains_key(&id)
    }

    /// True once the connection is finished (closed, lost, or the server dead).
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the connection finished, if it has.
    pub fn close_cause(&self) -> Option<&CallError> {
        self.closed.as_ref()
    }

    /// True once the server's `Hello` has arrived.
    pub fn is_handshake_complete(&self) -> bool {
        self.peer_agent.is_some()
    }

    /// The agent string of the server's `Hello`, once it has arrived.
    pub fn peer_agent(&self) -> Option<&str> {
        self.peer_agent.as_deref()
    }

    /// Starts a call of `method` on `args`, and returns its id.
    ///
    /// `timeout` overrides [`ClientConfig::default_timeout`]; the call fails with
    /// [`CallError::DeadlineExceeded`] at `now + timeout`. Queues the `Call`.
    pub fn start_call(
        &mut self,
        now: Timestamp,
        method: impl Into<String>,
        args: Tree,
        timeout: Option<Duration>,
    ) -> Result<RequestId, StartCallError> {
        if let Some(cause) = &self.closed {
            return Err(StartCallError::Closed {
                cause: cause.clone(),
            });
        }
        if self.pending.len() >= self.config.max_in_flight {
            return Err(StartCallError::AtCapacity {
                max_in_flight: self.config.max_in_flight,
            });
        }
        let id = self.allocate_id();
        let method = method.into();
        let timeout = timeout.or(self.config.default_timeout);
        let deadline = timeout.map(|t| now + t);
        if let Some(d) = deadline {
            self.deadlines.insert((d, id));
        }
        if self.pending.is_empty() {
            self.busy_since = Some(now);
            self.last_ping = None;
        }
        let kept = self
            .config
            .keep_calls
            .then(|| (method.clone(), args.clone()));
        self.pending.insert(
            id,
            Pending {
                timeout,
                deadline,
                kept,
            },
        );
        self.out
            .push_back(ClientOutput::Transmit(Message::Call(Call {
                request_id: id,
                method,
                timeout,
                args,
            })));
        Ok(id)
    }

    /// Cancels the pending call `id`: queues a `Cancel` for the server and
    /// completes the call with [`CallError::Cancelled`]. Returns false (and does
    /// nothing) if the call is not pending.
    pub fn cancel(&mut self, id: RequestId, now: Timestamp) -> bool {
        let _ = now;
        if self.remove_pending(id).is_none() {
            return false;
        }
        self.out
            .push_back(ClientOutput::Transmit(Message::Cancel { request_id: id }));
        self.complete(id, Err(CallError::Cancelled));
        true
    }

    /// The transport could not receive the reply to `id` (its stream failed, or
    /// the reply could not be decoded, e.g. over a limit) but the connection
    /// lives on. Completes the call with [`CallError::InvalidReply`] and queues a
    /// `Cancel`. Returns false if the call is not pending.
    pub fn reply_failed(
        &mut self,
        id: RequestId,
        now: Timestamp,
        reason: impl Into<String>,
    ) -> bool {
        let _ = now;
        if self.remove_pending(id).is_none() {
            return false;
        }
        self.out
            .push_back(ClientOutput::Transmit(Message::Cancel { request_id: id }));
        self.complete(
            id,
            Err(CallError::InvalidReply {
                reason: reason.into(),
            }),
        );
        true
    }

    /// Any bytes arrived from the server: it is alive. Call this as data arrives,
    /// not only when a whole message is decoded.
    pub fn heard_from_peer(&mut self, now: Timestamp) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Handles one message decoded from the server.
    ///
    /// Errors are for logging: the state machine has already acted on them
    /// (see [`ClientMessageError::is_fatal`]). Messages arriving after the
    /// connection finished are ignored.
    pub fn handle_message(
        &mut self,
        now: Timestamp,
        message: Message,
    ) -> Result<(), ClientMessageError> {
        if self.closed.is_some() {
            return Ok(());
        }
        self.heard_from_peer(now);
        match message {
            Message::Reply(reply) => {
                let id = reply.request_id;
                if self.remove_pending(id).is_none() {
                    return Err(ClientMessageError::UnknownRequest { id });
                }
                self.complete(id, reply.result.map_err(CallError::Remote));
                Ok(())
            }
            Message::Pong { .. } => Ok(()),
            Message::Ping { nonce } => {
                self.out
                    .push_back(ClientOutput::Transmit(Message::Pong { nonce }));
                Ok(())
            }
            Message::Hello(hello) if self.peer_agent.is_none() => {
                self.peer_agent = Some(hello.agent);
                Ok(())
            }
            Message::Goodbye(Goodbye { reason, message }) => {
                self.finish(CallError::ServerClosed { reason, message });
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.protocol_violation(now, format!("a server must not send {kind:?} messages"));
                Err(ClientMessageError::Unexpected { kind })
            }
        }
    }

    /// Handles the passage of time: expires deadlines, sends pings, declares a
    /// silent server dead. See [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.closed.is_some() {
            return;
        }
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(p) = self.remove_pending(id) {
                self.out
                    .push_back(ClientOutput::Transmit(Message::Cancel { request_id: id }));
                self.complete(
                    id,
                    Err(CallError::DeadlineExceeded {
                        timeout: p.timeout.unwrap_or_default(),
                    }),
                );
            }
        }
        let Some(since) = self.silence_start() else {
            return;
        };
        if let Some(max_age) = self.config.max_age {
            if now >= since + max_age {
                self.finish(CallError::NotAlive {
                    silent_for: now - since,
                    max_age,
                });
                return;
            }
        }
        if let Some(at) = self.next_ping_at(since) {
            if now >= at {
                let nonce = self.next_nonce;
                self.next_nonce = self.next_nonce.wrapping_add(1);
                self.last_ping = Some(now);
                self.out
                    .push_back(ClientOutput::Transmit(Message::Ping { nonce }));
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, or
    /// `None` if no timer is needed (no calls pending, or the connection finished).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.closed.is_some() {
            return None;
        }
        let since = self.silence_start()?;
        let deadline = self.deadlines.first().map(|&(d, _)| d);
        let dead_at = self.config.max_age.map(|a| since + a);
        let ping_at = self.next_ping_at(since);
        [deadline, dead_at, ping_at].into_iter().flatten().min()
    }

    /// The next thing for the driver to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        self.out.pop_front()
    }

    /// Closes the connection: queues a `Goodbye` (normal close), fails every
    /// pending call with [`CallError::Closed`], then queues [`ClientOutput::Close`].
    pub fn close(&mut self, now: Timestamp) {
        let _ = now;
        if self.closed.is_some() {
            return;
        }
        self.out
            .push_back(ClientOutput::Transmit(Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Normal,
                message: String::from("client closed the connection"),
            })));
        self.finish(CallError::Closed);
    }

    /// The server broke the protocol, or the connection's bytes could not be
    /// decoded: queues a protocol-error `Goodbye` carrying `message`, fails every
    /// pending call with [`CallError::ProtocolViolation`], then queues
    /// [`ClientOutput::Close`].
    pub fn protocol_violation(&mut self, now: Timestamp, message: impl Into<String>) {
        let _ = now;
        if self.closed.is_some() {
            return;
        }
        let message = message.into();
        self.out
            .push_back(ClientOutput::Transmit(Message::Goodbye(Goodbye {
                reason: GoodbyeReason::ProtocolError,
                message: message.clone(),
            })));
        self.finish(CallError::ProtocolViolation { message });
    }

    /// The transport lost the connection. Every pending call fails with
    /// [`CallError::ConnectionLost`] (the calls are at-most-once), and
    /// [`ClientOutput::Close`] is queued.
    ///
    /// Returns the calls that were pending, in id order, with their method and
    /// arguments if [`ClientConfig::keep_calls`] is set, so that a caller may
    /// re-send those it knows to be idempotent on a new connection instead of
    /// delivering the error. Returns nothing if the connection had already
    /// finished.
    pub fn connection_lost(&mut self, reason: impl Into<String>) -> Vec<LostCall> {
        if self.closed.is_some() {
            return Vec::new();
        }
        let lost = self
            .pending
            .iter()
            .map(|(&id, p)| LostCall {
                id,
                timeout: p.timeout,
                call: p.kept.clone(),
            })
            .collect();
        self.finish(CallError::ConnectionLost {
            reason: reason.into(),
        });
        lost
    }

    fn allocate_id(&mut self) -> RequestId {
        // Terminates: fewer than `max_in_flight` ids are in use.
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    fn remove_pending(&mut self, id: RequestId) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(d) = p.deadline {
            self.deadlines.remove(&(d, id));
        }
        if self.pending.is_empty() {
            self.busy_since = None;
            self.last_ping = None;
        }
        Some(p)
    }

    fn complete(&mut self, id: RequestId, result: Result<Tree, CallError>) {
        self.out.push_back(ClientOutput::Completed { id, result });
    }

    /// Silence is measured from the later of the last time the server was heard
    /// and the moment the client became busy. `None` while idle.
    fn silence_start(&self) -> Option<Timestamp> {
        self.busy_since.map(|b| b.max(self.last_heard))
    }

    fn next_ping_at(&self, since: Timestamp) -> Option<Timestamp> {
        let interval = self.config.ping_interval?;
        let base = self.last_ping.map_or(since, |p| p.max(since));
        Some(base + interval)
    }

    /// Fails every pending call with `cause` and ends the connection.
    fn finish(&mut self, cause: CallError) {
        if self.closed.is_some() {
            return;
        }
        let pending = core::mem::take(&mut self.pending);
        self.deadlines.clear();
        self.busy_since = None;
        self.last_ping = None;
        for id in pending.into_keys() {
            self.complete(id, Err(cause.clone()));
        }
        self.closed = Some(cause);
        self.out.push_back(ClientOutput::Close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tree, ErrorKind, Reply};
    use alloc::vec;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at(n: u64) -> Timestamp {
        Timestamp::ZERO + secs(n)
    }

    fn at_ms(n: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(n)
    }

    fn drain(c: &mut ClientProtocol) -> Vec<ClientOutput> {
        let mut v = Vec::new();
        while let Some(o) = c.poll_output() {
            v.push(o);
        }
        v
    }

    /// A client past its `Hello`.
    fn client(config: ClientConfig) -> ClientProtocol {
        let mut c = ClientProtocol::new(config, at(0));
        let out = drain(&mut c);
        assert!(matches!(
            &out[..],
            [ClientOutput::Transmit(Message::Hello(_))]
        ));
        c
    }

    fn start(c: &mut ClientProtocol, now: Timestamp, timeout: Option<Duration>) -> RequestId {
        let id = c.start_call(now, "f", tree!([1]), timeout).unwrap();
        let out = drain(c);
        assert!(
            matches!(&out[..], [ClientOutput::Transmit(Message::Call(call))] if call.request_id == id),
            "{out:?}"
        );
        id
    }

    fn reply(id: RequestId, result: Result<Tree, RemoteError>) -> Message {
        Message::Reply(Reply {
            request_id: id,
            result,
        })
    }

    fn completed(out: &[ClientOutput]) -> Vec<(RequestId, Result<Tree, CallError>)> {
        out.iter()
            .filter_map(|o| match o {
                ClientOutput::Completed { id, result } => Some((*id, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn transmitted(out: &[ClientOutput]) -> Vec<Message> {
        out.iter()
            .filter_map(|o| match o {
                ClientOutput::Transmit(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hello_carries_agent_and_token_and_debug_hides_it() {
        let config = ClientConfig {
            token: Some("hunter2".into()),
            agent: "me".into(),
            ..ClientConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        let mut c = ClientProtocol::new(config, at(0));
        match c.poll_output() {
            Some(ClientOutput::Transmit(Message::Hello(h))) => {
                assert_eq!(h.agent, "me");
                assert_eq!(h.token.as_deref(), Some("hunter2"));
            }
            other => panic!("{other:?}"),
        }
        assert!(c.poll_output().is_none());
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn call_carries_method_args_and_timeout() {
        let config = ClientConfig {
            default_timeout: Some(secs(9)),
            ..ClientConfig::default()
        };
        let mut c = client(config);
        c.start_call(at(0), "add", tree!([1, 2]), Some(secs(2)))
            .unwrap();
        c.start_call(at(0), "sub", tree!([3]), None).unwrap();
        let msgs = transmitted(&drain(&mut c));
        match &msgs[..] {
            [Message::Call(a), Message::Call(b)] => {
                assert_eq!(a.method, "add");
                assert_eq!(a.args, tree!([1, 2]));
                assert_eq!(a.timeout, Some(secs(2)), "per-call timeout wins");
                assert_eq!(b.timeout, Some(secs(9)), "default timeout applies");
                assert_ne!(a.request_id, b.request_id);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn in_flight_limit_refuses_and_frees_slots() {
        let config = ClientConfig {
            max_in_flight: 2,
            ..ClientConfig::default()
        };
        let mut c = client(config);
        let a = start(&mut c, at(0), None);
        let _b = start(&mut c, at(0), None);
        assert_eq!(c.in_flight(), 2);
        assert!(!c.can_start());
        let err = c.start_call(at(0), "f", Tree::None, None).unwrap_err();
        assert!(err.is_at_capacity(), "{err}");
        assert!(format!("{err}").contains("wait for one to complete"));
        assert!(drain(&mut c).is_empty(), "a refused call sends nothing");
        c.handle_message(at(1), reply(a, Ok(tree!(1)))).unwrap();
        assert_eq!(completed(&drain(&mut c)), vec![(a, Ok(tree!(1)))]);
        assert!(c.can_start());
        let d = start(&mut c, at(1), None);
        assert!(c.is_pending(d));
    }

    #[test]
    fn zero_max_in_flight_means_one() {
        let config = ClientConfig {
            max_in_flight: 0,
            ..ClientConfig::default()
        };
        let mut c = client(config);
        assert_eq!(c.config().max_in_flight, 1);
        start(&mut c, at(0), None);
        assert!(!c.can_start());
    }

    #[test]
    fn zero_ping_interval_cannot_spin() {
        let config = ClientConfig {
            ping_interval: Some(Duration::ZERO),
            ..ClientConfig::default()
        };
        let mut c = client(config);
        assert_eq!(c.config().ping_interval, Some(Duration::from_millis(1)));
        start(&mut c, at(0), None);
        let t = c.poll_timeout().unwrap();
        c.handle_timeout(t);
        assert!(c.poll_timeout().unwrap() > t);
    }

    #[test]
    fn ids_are_unique_among_open_calls() {
        let mut c = client(ClientConfig::default());
        c.next_id = u64::MAX;
        let a = start(&mut c, at(0), None);
        let b = start(&mut c, at(0), None);
        c.next_id = a;
        let d = start(&mut c, at(0), None);
        assert_eq!(a, u64::MAX);
        assert_eq!(b, 0);
        assert!(d != a && d != b);
    }

    #[test]
    fn replies_complete_calls_in_any_order() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), None);
        let b = start(&mut c, at(0), None);
        let err = RemoteError::new(ErrorKind::Handler, "ValueError", "bad");
        c.handle_message(at(1), reply(b, Err(err.clone()))).unwrap();
        c.handle_message(at(1), reply(a, Ok(tree!("ok")))).unwrap();
        let done = completed(&drain(&mut c));
        assert_eq!(
            done,
            vec![
                (b, Err(CallError::Remote(err.clone()))),
                (a, Ok(tree!("ok")))
            ]
        );
        let e = done[0].1.clone().unwrap_err();
        assert!(e.is_remote());
        assert_eq!(e.remote(), Some(&err));
        assert!(format!("{e}").contains("ValueError"));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn reply_for_unknown_id_is_ignored_and_reported() {
        let mut c = client(ClientConfig::default());
        let err = c
            .handle_message(at(1), reply(42, Ok(Tree::None)))
            .unwrap_err();
        assert_eq!(err, ClientMessageError::UnknownRequest { id: 42 });
        assert!(!err.is_fatal());
        assert!(drain(&mut c).is_empty());
        assert!(!c.is_closed());
    }

    #[test]
    fn cancel_sends_cancel_and_completes_once() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), Some(secs(5)));
        assert!(c.cancel(a, at(1)));
        let out = drain(&mut c);
        assert_eq!(transmitted(&out), vec![Message::Cancel { request_id: a }]);
        assert_eq!(completed(&out), vec![(a, Err(CallError::Cancelled))]);
        assert!(!c.cancel(a, at(1)), "second cancel is a no-op");
        assert!(drain(&mut c).is_empty());
        // The reply crossing the cancel on the wire is dropped.
        let err = c
            .handle_message(at(2), reply(a, Ok(Tree::None)))
            .unwrap_err();
        assert!(!err.is_fatal());
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), None, "no deadline left, idle");
    }

    #[test]
    fn reply_failed_completes_with_invalid_reply() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), None);
        assert!(c.reply_failed(a, at(1), "reply over max_data_len"));
        let out = drain(&mut c);
        assert_eq!(transmitted(&out), vec![Message::Cancel { request_id: a }]);
        let (_, result) = completed(&out).remove(0);
        let e = result.unwrap_err();
        assert!(format!("{e}").contains("max_data_len"), "{e}");
        assert!(!c.reply_failed(a, at(1), "again"));
        assert!(!c.is_closed());
    }

    #[test]
    fn ping_from_server_is_answered() {
        let mut c = client(ClientConfig::default());
        c.handle_message(at(0), Message::Ping { nonce: 77 })
            .unwrap();
        assert_eq!(
            transmitted(&drain(&mut c)),
            vec![Message::Pong { nonce: 77 }]
        );
    }

    #[test]
    fn server_hello_completes_handshake_once() {
        let mut c = client(ClientConfig::default());
        assert!(!c.is_handshake_complete());
        let hello = Message::Hello(Hello {
            agent: "srv".into(),
            token: None,
        });
        c.handle_message(at(0), hello.clone()).unwrap();
        assert_eq!(c.peer_agent(), Some("srv"));
        assert!(c.is_handshake_complete());
        let err = c.handle_message(at(0), hello).unwrap_err();
        assert!(err.is_fatal());
        assert!(c.is_closed());
    }

    #[test]
    fn goodbye_fails_pending_calls_with_the_reason() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), None);
        let b = start(&mut c, at(0), None);
        let bye = Message::Goodbye(Goodbye {
            reason: GoodbyeReason::ShuttingDown,
            message: "maintenance window".into(),
        });
        c.handle_message(at(1), bye).unwrap();
        let out = drain(&mut c);
        let done = completed(&out);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].0, done[1].0), (a, b));
        let e = done[0].1.clone().unwrap_err();
        assert!(e.is_connection_error());
        let text = format!("{e}");
        assert!(
            text.contains("maintenance window") && text.contains("shutting down"),
            "{text}"
        );
        assert!(matches!(out.last(), Some(ClientOutput::Close)));
        let err = c.start_call(at(2), "f", Tree::None, None).unwrap_err();
        assert!(err.is_closed());
        assert!(format!("{err}").contains("maintenance window"));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn unexpected_messages_close_with_protocol_error() {
        for msg in [
            Message::Cancel { request_id: 1 },
            Message::Call(Call {
                request_id: 1,
                method: "x".into(),
                timeout: None,
                args: Tree::None,
            }),
        ] {
            let mut c = client(ClientConfig::default());
            let a = start(&mut c, at(0), None);
            let err = c.handle_message(at(1), msg).unwrap_err();
            assert!(err.is_fatal());
            let out = drain(&mut c);
            match &transmitted(&out)[..] {
                [Message::Goodbye(g)] => assert_eq!(g.reason, GoodbyeReason::ProtocolError),
                other => panic!("{other:?}"),
            }
            let done = completed(&out);
            assert_eq!(done[0].0, a);
            assert!(matches!(
                done[0].1,
                Err(CallError::ProtocolViolation { .. })
            ));
            assert!(matches!(out.last(), Some(ClientOutput::Close)));
            // Everything after is ignored.
            c.handle_message(at(2), Message::Ping { nonce: 1 }).unwrap();
            assert!(drain(&mut c).is_empty());
        }
    }

    #[test]
    fn idle_client_has_no_timer_and_sends_nothing() {
        let mut c = client(ClientConfig::default());
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(at(3600));
        assert!(drain(&mut c).is_empty());
        let a = start(&mut c, at(3600), None);
        assert!(c.poll_timeout().is_some());
        c.handle_message(at(3601), reply(a, Ok(Tree::None)))
            .unwrap();
        drain(&mut c);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn pings_at_most_once_per_interval_while_silent() {
        let mut c = client(ClientConfig::default()); // ping 5 s, max_age 30 s
        start(&mut c, at(0), None);
        assert_eq!(c.poll_timeout(), Some(at(5)));
        c.handle_timeout(at(4));
        assert!(drain(&mut c).is_empty(), "too early");
        c.handle_timeout(at(5));
        assert!(matches!(
            &transmitted(&drain(&mut c))[..],
            [Message::Ping { .. }]
        ));
        assert_eq!(c.poll_timeout(), Some(at(10)));
        c.handle_timeout(at(7));
        c.handle_timeout(at(9));
        assert!(drain(&mut c).is_empty(), "one ping per interval");
        // Hearing from the server restarts the silence.
        c.heard_from_peer(at(8));
        assert_eq!(c.poll_timeout(), Some(at(13)));
        c.handle_timeout(at(10));
        assert!(drain(&mut c).is_empty());
        c.handle_timeout(at(13));
        let msgs = transmitted(&drain(&mut c));
        assert!(
            matches!(&msgs[..], [Message::Ping { nonce: 2 }]),
            "{msgs:?}"
        );
    }

    #[test]
    fn silent_server_is_declared_dead_at_max_age() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(100), None);
        let b = start(&mut c, at(101), None);
        let mut pings = 0;
        let mut now = at(100);
        while let Some(t) = c.poll_timeout() {
            assert!(t >= now, "time only moves forward");
            now = t;
            c.handle_timeout(now);
            for o in drain(&mut c) {
                match o {
                    ClientOutput::Transmit(Message::Ping { .. }) => pings += 1,
                    ClientOutput::Completed { id, result } => {
                        assert!(id == a || id == b);
                        match result {
                            Err(
                                e @ CallError::NotAlive {
                                    silent_for,
                                    max_age,
                                },
                            ) => {
                                assert_eq!(silent_for, secs(30));
                                assert_eq!(max_age, secs(30));
                                let text = format!("{e}");
                                assert!(text.contains("30s") && text.contains("max_age"), "{text}");
                                assert!(e.is_connection_error());
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                    ClientOutput::Close => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(now, at(130));
        assert_eq!(pings, 5, "at 105, 110, 115, 120, 125");
        assert!(c.is_closed());
        let err = c.start_call(at(131), "f", Tree::None, None).unwrap_err();
        assert!(matches!(
            err,
            StartCallError::Closed {
                cause: CallError::NotAlive { .. }
            }
        ));
    }

    #[test]
    fn signs_of_life_keep_a_long_call_alive() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), None);
        for s in (20..=200).step_by(20) {
            c.handle_timeout(at(s));
            c.heard_from_peer(at(s));
        }
        assert!(c.is_pending(a));
        assert!(!c.is_closed());
    }

    #[test]
    fn idle_time_does_not_count_as_silence() {
        let mut c = client(ClientConfig::default());
        // Heard at 0, then an idle hour, then a call.
        let a = start(&mut c, at(3600), None);
        c.handle_timeout(at(3601));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(at(3605)));
        c.handle_timeout(at(3629));
        assert!(c.is_pending(a));
        c.handle_timeout(at(3630));
        assert!(!c.is_pending(a));
    }

    #[test]
    fn no_pings_or_death_when_disabled() {
        let config = ClientConfig {
            ping_interval: None,
            max_age: None,
            ..ClientConfig::default()
        };
        let mut c = client(config);
        let a = start(&mut c, at(0), None);
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(at(10_000));
        assert!(drain(&mut c).is_empty());
        assert!(c.is_pending(a));
    }

    #[test]
    fn deadline_fails_the_call_and_cancels_it_on_the_server() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at_ms(0), Some(Duration::from_millis(1500)));
        let b = start(&mut c, at_ms(0), Some(secs(60)));
        assert_eq!(c.poll_timeout(), Some(at_ms(1500)));
        c.handle_timeout(at_ms(1499));
        assert!(drain(&mut c).is_empty());
        c.handle_timeout(at_ms(1500));
        let out = drain(&mut c);
        assert_eq!(transmitted(&out), vec![Message::Cancel { request_id: a }]);
        let done = completed(&out);
        assert_eq!(
            done,
            vec![(
                a,
                Err(CallError::DeadlineExceeded {
                    timeout: Duration::from_millis(1500)
                })
            )]
        );
        let e = done[0].1.clone().unwrap_err();
        assert!(e.is_deadline_exceeded());
        assert!(format!("{e}").contains("1.5s"));
        assert!(c.is_pending(b));
        assert_eq!(c.poll_timeout(), Some(at(5)), "ping of the remaining call");
    }

    #[test]
    fn zero_timeout_fails_at_the_next_timeout() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(1), Some(Duration::ZERO));
        assert_eq!(c.poll_timeout(), Some(at(1)));
        c.handle_timeout(at(1));
        assert!(!c.is_pending(a));
    }

    #[test]
    fn huge_timeout_never_overflows() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(1), Some(Duration::MAX));
        c.heard_from_peer(at(1_000_000));
        c.handle_timeout(at(1_000_000));
        assert!(c.is_pending(a));
    }

    #[test]
    fn connection_lost_fails_everything_and_returns_kept_calls() {
        let config = ClientConfig {
            keep_calls: true,
            ..ClientConfig::default()
        };
        let mut c = client(config);
        let a = c
            .start_call(at(0), "add", tree!([1, 2]), Some(secs(3)))
            .unwrap();
        drain(&mut c);
        let lost = c.connection_lost("reset by peer");
        assert_eq!(
            lost,
            vec![LostCall {
                id: a,
                timeout: Some(secs(3)),
                call: Some(("add".into(), tree!([1, 2]))),
            }]
        );
        let out = drain(&mut c);
        assert!(transmitted(&out).is_empty());
        let e = completed(&out).remove(0).1.unwrap_err();
        assert!(format!("{e}").contains("reset by peer"));
        assert!(e.is_connection_error());
        assert!(matches!(out.last(), Some(ClientOutput::Close)));
        assert!(c.connection_lost("again").is_empty());
        assert!(drain(&mut c).is_empty(), "completes exactly once");
    }

    #[test]
    fn calls_are_not_kept_by_default() {
        let mut c = client(ClientConfig::default());
        start(&mut c, at(0), None);
        let lost = c.connection_lost("gone");
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].call, None);
    }

    #[test]
    fn close_says_goodbye_and_fails_pending() {
        let mut c = client(ClientConfig::default());
        let a = start(&mut c, at(0), Some(secs(1)));
        c.close(at(0));
        let out = drain(&mut c);
        assert!(
            matches!(
                &out[..],
                [
                    ClientOutput::Transmit(Message::Goodbye(Goodbye { reason: GoodbyeReason::Normal, .. })),
                    ClientOutput::Completed { id, result: Err(CallError::Closed) },
                    ClientOutput::Close,
                ] if *id == a
            ),
            "{out:?}"
        );
        c.close(at(1));
        c.handle_timeout(at(5));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.close_cause(), Some(&CallError::Closed));
    }
}
