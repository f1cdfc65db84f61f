//! The server side of one client connection: handshake, admission, deadlines,
//! cancellation and draining.
//!
//! A [`ServerProtocol`] decides, for one connected client, which calls reach the
//! application and which are refused, and keeps track of the calls the
//! application is working on. It does not know which methods exist: the server
//! crate checks method names (and answers `UnknownMethod` through
//! [`ServerProtocol::reply`]).
//!
//! # Run-loop contract
//!
//! 1. Create it with [`ServerProtocol::new`] when a client connects.
//! 2. Feed inputs as they happen, each with the current time:
//!    [`handle_message`](ServerProtocol::handle_message) for every message decoded
//!    from the client; [`reply`](ServerProtocol::reply) when the application
//!    finishes a request; [`begin_shutdown`](ServerProtocol::begin_shutdown),
//!    [`close`](ServerProtocol::close),
//!    [`protocol_violation`](ServerProtocol::protocol_violation) and
//!    [`connection_lost`](ServerProtocol::connection_lost) as the server decides or
//!    the transport finds out.
//! 3. After every input, drain [`poll_output`](ServerProtocol::poll_output) until
//!    it returns `None`: send each [`ServerOutput::Transmit`] in order, start each
//!    [`ServerOutput::Request`], stop or discard the work of each
//!    [`ServerOutput::Cancelled`] and [`ServerOutput::Expired`], and close the
//!    transport on [`ServerOutput::Close`] (after sending the messages queued
//!    before it).
//! 4. Then ask [`poll_timeout`](ServerProtocol::poll_timeout) (the earliest
//!    request deadline). If it returns `Some(t)`, call
//!    [`handle_timeout`](ServerProtocol::handle_timeout) at (or after) `t` unless
//!    another input comes first, and go back to step 3. `None` means no timer is
//!    needed.
//!
//! # Guarantees
//!
//! - Until the client's `Hello` carries the right token, no call reaches the
//!   application: anything else first closes the connection with an
//!   `Unauthenticated` goodbye.
//! - At most [`ServerConfig::max_in_flight`] requests of this connection are open
//!   (handed to the application and not yet finished) at once; calls beyond that
//!   are answered with an `OverLimit` error without reaching the application.
//! - Every [`ServerOutput::Request`] ends exactly once: by a
//!   [`reply`](ServerProtocol::reply) that returns `true`, a `reply` that returns
//!   `false` because the deadline had passed, or a [`ServerOutput::Cancelled`] or
//!   [`ServerOutput::Expired`] output (closing the connection cancels every open
//!   request).
//! - An expired request is not answered: the client fails the call at its own,
//!   earlier, deadline. A cancelled one is not answered either.
//! - Nothing the client sends makes this code panic.
//!
//! # Example
//!
//! ```
//! use teleport_protocol::server::{ServerConfig, ServerOutput, ServerProtocol};
//! use teleport_protocol::{tree, Call, Hello, Message, Timestamp};
//!
//! let now = Timestamp::ZERO;
//! let mut server = ServerProtocol::new(ServerConfig::default());
//! server.handle_message(now, Message::Hello(Hello::default())).unwrap();
//! assert!(matches!(server.poll_output(), Some(ServerOutput::Transmit(Message::Hello(_)))));
//! let call = Call { request_id: 7, method: "add".into(), timeout: None, args: tree!([1, 2]) };
//! server.handle_message(now, Message::Call(call)).unwrap();
//! let Some(ServerOutput::Request { id, method, .. }) = server.poll_output() else { panic!() };
//! assert_eq!((id, method.as_str()), (7, "add"));
//! assert!(server.reply(id, Ok(tree!(3)), now));
//! assert!(matches!(server.poll_output(), Some(ServerOutput::Transmit(Message::Reply(_)))));
//! ```

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use core::fmt;

use subtle::ConstantTimeEq;

use crate::{
    ErrorKind, Goodbye, GoodbyeReason, Hello, Kind, Message, RemoteError, Reply, RequestId,
    Timestamp, Tree,
};

/// The agent string sent in the server's `Hello` by default.
pub const DEFAULT_AGENT: &str = concat!("teleport-rs/", env!("CARGO_PKG_VERSION"), " server");

/// The `type_name` of the errors the server state machine raises itself.
pub const SERVER_ERROR_TYPE: &str = "teleport";

/// Settings of a [`ServerProtocol`].
///
/// Start from [`ServerConfig::default()`] and change the fields you need.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Requests of one connection open at once; calls beyond are refused with an
    /// `OverLimit` error. Default 64; 0 is treated as 1.
    pub max_in_flight: usize,
    /// The shared token clients must send in their `Hello`, compared in constant
    /// time (only its length is not hidden). `None` accepts any client (use
    /// mutual TLS or a trusted network). Never printed by `Debug`.
    pub token: Option<String>,
    /// Names this server in its `Hello`. Default [`DEFAULT_AGENT`].
    pub agent: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            token: None,
            agent: String::from(DEFAULT_AGENT),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("agent", &self.agent)
            .finish()
    }
}

/// What the state machine asks its driver to do. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerOutput {
    /// Send this message to the client.
    Transmit(Message),
    /// Run `method` on `args` and answer with [`ServerProtocol::reply`].
    Request {
        /// The client's id for the call; pass it to `reply`.
        id: RequestId,
        /// The bound function's name, unchecked.
        method: String,
        /// The arguments.
        args: Tree,
        /// When the client gives up, on this side's clock (arrival time plus the
        /// call's timeout). `None`: no deadline.
        deadline: Option<Timestamp>,
    },
    /// The client cancelled this request, or the connection closed while it was
    /// open: stop it if possible and discard its result.
    Cancelled(RequestId),
    /// This request's deadline passed: stop it if possible and discard its result.
    Expired(RequestId),
    /// The connection is finished: close the transport once the messages queued
    /// before this one are sent. Emitted once, as the last output.
    Close,
}

/// What was wrong with a message the client sent. Returned by
/// [`ServerProtocol::handle_message`] for logging; the state machine has already
/// acted on it (every variant closes the connection).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerMessageError {
    /// The client's `Hello` had a missing or wrong token.
    #[error("client authentication failed: missing or wrong token; connection closed")]
    Unauthenticated,
    /// The client's first message was not a `Hello`.
    #[error("the client sent {kind:?} before Hello; connection closed")]
    NoHello {
        /// The kind of the offending message.
        kind: Kind,
    },
    /// A message a client must never send (a `Reply`, a second `Hello`).
    #[error("the client sent a {kind:?} message, which clients must not send; connection closed")]
    Unexpected {
        /// The kind of the offending message.
        kind: Kind,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    Closed,
}

/// The server side of one client connection. See the [module docs](self) for
/// the run-loop contract.
#[derive(Debug)]
pub struct ServerProtocol {
    config: ServerConfig,
    state: State,
    shutting_down: bool,
    /// Open requests and their deadlines.
    open: BTreeMap<RequestId, Option<Timestamp>>,
    deadlines: BTreeSet<(Timestamp, RequestId)>,
    peer_agent: Option<String>,
    out: VecDeque<ServerOutput>,
}

impl ServerProtocol {
    /// The server side of a newly accepted connection, waiting for the client's
    /// `Hello`.
    pub fn new(mut config: ServerConfig) -> ServerProtocol {
        config.max_in_flight = config.max_in_flight.max(1);
        ServerProtocol {
            config,
            state: State::AwaitingHello,
            shutting_down: false,
            open: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            peer_agent: None,
            out: VecDeque::new(),
        }
    }

    /// The configuration in use (`max_in_flight` at least 1).
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// True once the client's `Hello` was accepted (and until the connection closes).
    pub fn is_authenticated(&self) -> bool {
        self.state == State::Open
    }

    /// True once the connection is finished.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The agent string of the client's accepted `Hello`.
    pub fn peer_agent(&self) -> Option<&str> {
        self.peer_agent.as_deref()
    }

    /// Requests handed to the application and not yet finished.
    pub fn open_requests(&self) -> usize {
        self.open.len()
    }

    /// True if request `id` is open (a reply would be sent).
    pub fn is_open(&self, id: RequestId) -> bool {
        self.open.contains_key(&id)
    }

    /// True after [`begin_shutdown`](Self::begin_shutdown).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// True when no request is open: after
    /// [`begin_shutdown`](Self::begin_shutdown), the moment to
    /// [`close`](Self::close).
    pub fn is_drained(&self) -> bool {
        self.open.is_empty()
    }

    /// Handles one message decoded from the client.
    ///
    /// Errors are for logging: the state machine has already acted on them.
    /// Messages arriving after the connection finished are ignored.
    pub fn handle_message(
        &mut self,
        now: Timestamp,
        message: Message,
    ) -> Result<(), ServerMessageError> {
        match self.state {
            State::Closed => Ok(()),
            State::AwaitingHello => self.handle_first(message),
            State::Open => self.handle_open(now, message),
        }
    }

    fn handle_first(&mut self, message: Message) -> Result<(), ServerMessageError> {
        match message {
            Message::Hello(hello) => {
                if !token_matches(self.config.token.as_deref(), hello.token.as_deref()) {
                    self.refuse("authentication failed: missing or wrong token");
                    return Err(ServerMessageError::Unauthenticated);
                }
                self.state = State::Open;
                self.peer_agent = Some(hello.agent);
                self.out
                    .push_back(ServerOutput::Transmit(Message::Hello(Hello {
                        agent: self.config.agent.clone(),
                        token: None,
                    })));
                Ok(())
            }
            Message::Goodbye(_) => {
                self.finish();
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.refuse("the first message must be a Hello");
                Err(ServerMessageError::NoHello { kind })
            }
        }
    }

    fn handle_open(&mut self, now: Timestamp, message: Message) -> Result<(), ServerMessageError> {
        match message {
            Message::Call(call) => {
                let id = call.request_id;
                if self.shutting_down {
                    self.refuse_call(
                        id,
                        ErrorKind::ShuttingDown,
                        "the server is shutting down and takes no new calls; retry on another \
                         server or later",
                    );
                } else if self.open.contains_key(&id) {
                    self.refuse_call(
                        id,
                        ErrorKind::BadRequest,
                        format!("request id {id} is already in use by an open call"),
                    );
                } else if self.open.len() >= self.config.max_in_flight {
                    self.refuse_call(
                        id,
                        ErrorKind::OverLimit,
                        format!(
                            "more than {} calls in flight on one connection; lower the client's \
                             max_in_flight",
                            self.config.max_in_flight
                        ),
                    );
                } else {
                    let deadline = call.timeout.map(|t| now + t);
                    if let Some(d) = deadline {
                        self.deadlines.insert((d, id));
                    }
                    self.open.insert(id, deadline);
                    self.out.push_back(ServerOutput::Request {
                        id,
                        method: call.method,
                        args: call.args,
                        deadline,
                    });
                }
                Ok(())
            }
            Message::Cancel { request_id } => {
                if self.remove_open(request_id) {
                    self.out.push_back(ServerOutput::Cancelled(request_id));
                }
                Ok(())
            }
            Message::Ping { nonce } => {
                self.out
                    .push_back(ServerOutput::Transmit(Message::Pong { nonce }));
                Ok(())
            }
            // The server sends no pings today; a pong is harmless.
            Message::Pong { .. } => Ok(()),
            Message::Goodbye(_) => {
                self.finish();
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.protocol_violation(now, format!("a client must not send {kind:?} messages"));
                Err(ServerMessageError::Unexpected { kind })
            }
        }
    }

    /// Answers request `id`. Queues the `Reply` and returns true if the request is
    /// open; returns false (the caller discards the result) if it was cancelled,
    /// expired (including a deadline at or before `now` not yet handled), or the
    /// connection closed.
    pub fn reply(
        &mut self,
        id: RequestId,
        result: Result<Tree, RemoteError>,
        now: Timestamp,
    ) -> bool {
        let Some(&deadline) = self.open.get(&id) else {
            return false;
        };
        self.remove_open(id);
        if deadline.is_some_and(|d| d <= now) {
            return false;
        }
        self.out
            .push_back(ServerOutput::Transmit(Message::Reply(Reply {
                request_id: id,
                result,
            })));
        true
    }

    /// Handles the passage of time: expires requests whose deadline passed.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if self.open.remove(&id).is_some() {
                self.out.push_back(ServerOutput::Expired(id));
            }
        }
    }

    /// The earliest deadline of an open request, or `None`.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|&(d, _)| d)
    }

    /// The next thing for the driver to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.out.pop_front()
    }

    /// Stops taking calls: from now on every new call is answered with a
    /// `ShuttingDown` error. Open requests may still be answered; once
    /// [`is_drained`](Self::is_drained) (or when the server's grace period ends),
    /// call [`close`](Self::close).
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Closes the connection: queues a `Goodbye` (`ShuttingDown` after
    /// [`begin_shutdown`](Self::begin_shutdown), else `Normal`), cancels every
    /// open request, then queues [`ServerOutput::Close`].
    pub fn close(&mut self, now: Timestamp) {
        let _ = now;
        if self.state == State::Closed {
            return;
        }
        let (reason, message) = if self.shutting_down {
            (GoodbyeReason::ShuttingDown, "the server is shutting down")
        } else {
            (GoodbyeReason::Normal, "the server closed the connection")
        };
        self.out
            .push_back(ServerOutput::Transmit(Message::Goodbye(Goodbye {
                reason,
                message: String::from(message),
            })));
        self.finish();
    }

    /// The client broke the protocol, or the connection's bytes could not be
    /// decoded: queues a protocol-error `Goodbye` carrying `message`, cancels every
    /// open request, then queues [`ServerOutput::Close`].
    pub fn protocol_violation(&mut self, now: Timestamp, message: impl Into<String>) {
        let _ = now;
        if self.state == State::Closed {
            return;
        }
        self.out
            .push_back(ServerOutput::Transmit(Message::Goodbye(Goodbye {
                reason: GoodbyeReason::ProtocolError,
                message: message.into(),
            })));
        self.finish();
    }

    /// The transport lost the connection: cancels every open request and queues
    /// [`ServerOutput::Close`].
    pub fn connection_lost(&mut self) {
        self.finish();
    }

    fn refuse(&mut self, message: &str) {
        self.out
            .push_back(ServerOutput::Transmit(Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Unauthenticated,
                message: String::from(message),
            })));
        self.finish();
    }

    fn refuse_call(&mut self, id: RequestId, kind: ErrorKind, message: impl Into<String>) {
        self.out
            .push_back(ServerOutput::Transmit(Message::Reply(Reply {
                request_id: id,
                result: Err(RemoteError::new(kind, SERVER_ERROR_TYPE, message)),
            })));
    }

    fn remove_open(&mut self, id: RequestId) -> bool {
        match self.open.remove(&id) {
            Some(deadline) => {
                if let Some(d) = deadline {
                    self.deadlines.remove(&(d, id));
                }
                true
            }
            None => false,
        }
    }

    fn finish(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.deadlines.clear();
        for id in core::mem::take(&mut self.open).into_keys() {
            self.out.push_back(ServerOutput::Cancelled(id));
        }
        self.out.push_back(ServerOutput::Close);
    }
}

/// Compares the token in constant time (for tokens of equal length; the length
/// itself is not hidden). `expected == None` accepts any client.
fn token_matches(expected: Option<&str>, given: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let present = given.is_some();
    let given = given.unwrap_or("");
    let equal: bool = expected.as_bytes().ct_eq(given.as_bytes()).into();
    equal & present
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tree, Call};
    use alloc::vec;
    use alloc::vec::Vec;
    use core::time::Duration;

    fn at(n: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_secs(n)
    }

    fn drain(s: &mut ServerProtocol) -> Vec<ServerOutput> {
        let mut v = Vec::new();
        while let Some(o) = s.poll_output() {
            v.push(o);
        }
        v
    }

    fn hello(token: Option<&str>) -> Message {
        Message::Hello(Hello {
            agent: "cli".into(),
            token: token.map(Into::into),
        })
    }

    fn call(id: RequestId, timeout: Option<u64>) -> Message {
        Message::Call(Call {
            request_id: id,
            method: "f".into(),
            timeout: timeout.map(Duration::from_secs),
            args: tree!([1]),
        })
    }

    fn server(config: ServerConfig) -> ServerProtocol {
        let mut s = ServerProtocol::new(config);
        s.handle_message(at(0), hello(None)).unwrap();
        assert!(matches!(
            &drain(&mut s)[..],
            [ServerOutput::Transmit(Message::Hello(_))]
        ));
        s
    }

    fn with_token(token: &str) -> ServerConfig {
        ServerConfig {
            token: Some(token.into()),
            ..ServerConfig::default()
        }
    }

    fn request_ids(out: &[ServerOutput]) -> Vec<RequestId> {
        out.iter()
            .filter_map(|o| match o {
                ServerOutput::Request { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn refusal(out: &[ServerOutput]) -> Option<(RequestId, ErrorKind)> {
        match out {
            [ServerOutput::Transmit(Message::Reply(Reply {
                request_id,
                result: Err(e),
            }))] => Some((*request_id, e.kind)),
            _ => None,
        }
    }

    fn assert_refused_unauthenticated(out: &[ServerOutput]) {
        assert!(
            matches!(
                out,
                [
                    ServerOutput::Transmit(Message::Goodbye(Goodbye {
                        reason: GoodbyeReason::Unauthenticated,
                        ..
                    })),
                    ServerOutput::Close
                ]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn handshake_without_token() {
        let mut s = ServerProtocol::new(ServerConfig::default());
        assert!(!s.is_authenticated());
        s.handle_message(at(0), hello(Some("anything"))).unwrap();
        match &drain(&mut s)[..] {
            [ServerOutput::Transmit(Message::Hello(h))] => {
                assert_eq!(h.agent, DEFAULT_AGENT);
                assert_eq!(h.token, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.is_authenticated());
        assert_eq!(s.peer_agent(), Some("cli"));
    }

    #[test]
    fn handshake_with_the_right_token() {
        let mut s = ServerProtocol::new(with_token("s3cret"));
        s.handle_message(at(0), hello(Some("s3cret"))).unwrap();
        assert!(s.is_authenticated());
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn wrong_or_missing_token_is_refused() {
        for given in [Some("s3creT"), Some("s3cret "), Some(""), None] {
            let mut s = ServerProtocol::new(with_token("s3cret"));
            let err = s.handle_message(at(0), hello(given)).unwrap_err();
            assert_eq!(err, ServerMessageError::Unauthenticated);
            assert_refused_unauthenticated(&drain(&mut s));
            assert!(s.is_closed() && !s.is_authenticated());
            // Nothing reaches the application afterwards.
            s.handle_message(at(0), call(1, None)).unwrap();
            s.handle_message(at(0), hello(Some("s3cret"))).unwrap();
            assert!(drain(&mut s).is_empty());
        }
    }

    #[test]
    fn empty_token_still_needs_a_token() {
        let mut s = ServerProtocol::new(with_token(""));
        assert!(s.handle_message(at(0), hello(None)).is_err());
        let mut s = ServerProtocol::new(with_token(""));
        assert!(s.handle_message(at(0), hello(Some(""))).is_ok());
    }

    #[test]
    fn call_before_hello_is_refused() {
        for first in [call(1, None), Message::Ping { nonce: 1 }] {
            let mut s = ServerProtocol::new(ServerConfig::default());
            let err = s.handle_message(at(0), first).unwrap_err();
            assert!(matches!(err, ServerMessageError::NoHello { .. }));
            let out = drain(&mut s);
            assert!(request_ids(&out).is_empty());
            assert_refused_unauthenticated(&out);
            s.handle_message(at(0), call(2, None)).unwrap();
            assert!(drain(&mut s).is_empty());
        }
    }

    #[test]
    fn call_becomes_a_request_with_a_deadline() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(10), call(5, Some(3))).unwrap();
        match &drain(&mut s)[..] {
            [ServerOutput::Request {
                id,
                method,
                args,
                deadline,
            }] => {
                assert_eq!(*id, 5);
                assert_eq!(method, "f");
                assert_eq!(args, &tree!([1]));
                assert_eq!(*deadline, Some(at(13)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.poll_timeout(), Some(at(13)));
        assert!(s.reply(5, Ok(tree!(2)), at(11)));
        assert!(matches!(
            &drain(&mut s)[..],
            [ServerOutput::Transmit(Message::Reply(Reply {
                request_id: 5,
                result: Ok(_)
            }))]
        ));
        assert_eq!(s.poll_timeout(), None);
        assert!(!s.reply(5, Ok(tree!(2)), at(11)), "answered once");
        assert!(!s.reply(99, Ok(tree!(2)), at(11)), "never opened");
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn duplicate_open_id_is_a_bad_request() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, None)).unwrap();
        drain(&mut s);
        s.handle_message(at(0), call(1, None)).unwrap();
        assert_eq!(refusal(&drain(&mut s)), Some((1, ErrorKind::BadRequest)));
        assert_eq!(s.open_requests(), 1);
        // Once answered, the id may be used again.
        assert!(s.reply(1, Ok(Tree::None), at(0)));
        s.handle_message(at(0), call(1, None)).unwrap();
        assert_eq!(request_ids(&drain(&mut s)), vec![1]);
    }

    #[test]
    fn over_the_limit_is_refused_before_the_application() {
        let config = ServerConfig {
            max_in_flight: 2,
            ..ServerConfig::default()
        };
        let mut s = server(config);
        for id in 0..2 {
            s.handle_message(at(0), call(id, None)).unwrap();
        }
        assert_eq!(request_ids(&drain(&mut s)), vec![0, 1]);
        s.handle_message(at(0), call(2, None)).unwrap();
        let out = drain(&mut s);
        assert_eq!(refusal(&out), Some((2, ErrorKind::OverLimit)));
        assert_eq!(s.open_requests(), 2);
        s.reply(0, Ok(Tree::None), at(0));
        drain(&mut s);
        s.handle_message(at(0), call(3, None)).unwrap();
        assert_eq!(request_ids(&drain(&mut s)), vec![3]);
    }

    #[test]
    fn cancel_forgets_the_request() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, Some(5))).unwrap();
        drain(&mut s);
        s.handle_message(at(1), Message::Cancel { request_id: 1 })
            .unwrap();
        assert!(matches!(&drain(&mut s)[..], [ServerOutput::Cancelled(1)]));
        assert_eq!(s.poll_timeout(), None);
        assert!(!s.reply(1, Ok(Tree::None), at(2)));
        // Cancel of an unknown (already answered) request: nothing.
        s.handle_message(at(1), Message::Cancel { request_id: 1 })
            .unwrap();
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn deadline_expires_the_request() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, Some(5))).unwrap();
        s.handle_message(at(0), call(2, Some(2))).unwrap();
        s.handle_message(at(0), call(3, None)).unwrap();
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(at(2)));
        s.handle_timeout(at(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(at(5));
        assert!(matches!(
            &drain(&mut s)[..],
            [ServerOutput::Expired(2), ServerOutput::Expired(1)]
        ));
        assert!(!s.reply(1, Ok(Tree::None), at(6)));
        assert!(s.reply(3, Ok(Tree::None), at(6)));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn reply_after_an_unhandled_deadline_is_dropped() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, Some(2))).unwrap();
        drain(&mut s);
        assert!(!s.reply(1, Ok(Tree::None), at(2)));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.poll_timeout(), None);
        assert!(s.is_drained());
    }

    #[test]
    fn ping_is_answered() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), Message::Ping { nonce: 9 }).unwrap();
        assert!(matches!(
            &drain(&mut s)[..],
            [ServerOutput::Transmit(Message::Pong { nonce: 9 })]
        ));
    }

    #[test]
    fn goodbye_cancels_open_requests_and_closes() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, None)).unwrap();
        s.handle_message(at(0), call(2, Some(1))).unwrap();
        drain(&mut s);
        let bye = Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Normal,
            message: String::new(),
        });
        s.handle_message(at(0), bye).unwrap();
        assert!(matches!(
            &drain(&mut s)[..],
            [
                ServerOutput::Cancelled(1),
                ServerOutput::Cancelled(2),
                ServerOutput::Close
            ]
        ));
        assert!(s.is_closed());
        assert_eq!(s.poll_timeout(), None);
        assert!(!s.reply(1, Ok(Tree::None), at(0)));
    }

    #[test]
    fn shutdown_refuses_new_calls_and_drains() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(1, None)).unwrap();
        drain(&mut s);
        s.begin_shutdown();
        assert!(s.is_shutting_down());
        assert!(!s.is_drained());
        s.handle_message(at(0), call(2, None)).unwrap();
        assert_eq!(refusal(&drain(&mut s)), Some((2, ErrorKind::ShuttingDown)));
        assert!(s.reply(1, Ok(Tree::None), at(1)));
        assert!(s.is_drained());
        drain(&mut s);
        s.close(at(1));
        assert!(matches!(
            &drain(&mut s)[..],
            [
                ServerOutput::Transmit(Message::Goodbye(Goodbye {
                    reason: GoodbyeReason::ShuttingDown,
                    ..
                })),
                ServerOutput::Close
            ]
        ));
        s.close(at(1));
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn client_only_messages_from_a_client_close_the_connection() {
        for msg in [
            Message::Reply(Reply {
                request_id: 1,
                result: Ok(Tree::None),
            }),
            hello(None),
        ] {
            let mut s = server(ServerConfig::default());
            s.handle_message(at(0), call(1, None)).unwrap();
            drain(&mut s);
            let err = s.handle_message(at(0), msg).unwrap_err();
            assert!(matches!(err, ServerMessageError::Unexpected { .. }));
            assert!(matches!(
                &drain(&mut s)[..],
                [
                    ServerOutput::Transmit(Message::Goodbye(Goodbye {
                        reason: GoodbyeReason::ProtocolError,
                        ..
                    })),
                    ServerOutput::Cancelled(1),
                    ServerOutput::Close
                ]
            ));
        }
    }

    #[test]
    fn connection_lost_cancels_open_requests() {
        let mut s = server(ServerConfig::default());
        s.handle_message(at(0), call(4, None)).unwrap();
        drain(&mut s);
        s.connection_lost();
        assert!(matches!(
            &drain(&mut s)[..],
            [ServerOutput::Cancelled(4), ServerOutput::Close]
        ));
        s.connection_lost();
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn zero_max_in_flight_means_one() {
        let config = ServerConfig {
            max_in_flight: 0,
            ..ServerConfig::default()
        };
        let mut s = server(config);
        s.handle_message(at(0), call(1, None)).unwrap();
        assert_eq!(request_ids(&drain(&mut s)), vec![1]);
    }
}
