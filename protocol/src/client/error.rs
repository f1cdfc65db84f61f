//! Why calls fail, and what can be wrong with what a server sends.

use alloc::format;
use alloc::string::String;
use core::time::Duration;

use crate::{GoodbyeReason, Kind, RemoteError, RequestId, StreamCode};

/// Why a call failed on this side of the connection (or on the server, for
/// [`CallError::Remote`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The server ran (or refused) the call and reported an error.
    #[error("the server reported an error: {0}")]
    Remote(RemoteError),
    /// No reply arrived within the call's timeout. If the call had been sent,
    /// the server was told to drop it.
    #[error(
        "no reply within the call's timeout of {timeout:?}; the server was told to drop the call \
         (raise the timeout if the function is slow)"
    )]
    DeadlineExceeded {
        /// The timeout the call was started with.
        timeout: Duration,
    },
    /// The caller cancelled the call. If it had been sent, the server was told.
    #[error("the call was cancelled by the caller")]
    Cancelled,
    /// The call waited for a connection (the client was connecting or
    /// reconnecting) until its deadline, or for the connect timeout if it has
    /// none, and was never sent.
    #[error(
        "not connected: no connection within {waited:?}, so the call was not sent (last error: \
         {}; is the server up, and are the pin and token right?)",
        last_error.as_deref().unwrap_or("no attempt has finished yet")
    )]
    NotConnected {
        /// How long the call waited.
        waited: Duration,
        /// Why the last connection or attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The server was silent for longer than `max_age` while calls were
    /// pending, and is presumed dead. The call may or may not have run.
    #[error(
        "the server sent nothing for {silent_for:?} while calls were pending (max_age is \
         {max_age:?}); it is presumed dead and the call may or may not have run (reconnect, or \
         raise max_age for slow links)"
    )]
    NotAlive {
        /// How long the server had been silent when it was declared dead.
        silent_for: Duration,
        /// The configured `max_age`.
        max_age: Duration,
    },
    /// The transport lost the connection. The call may or may not have run.
    #[error("the connection was lost ({reason}); the call may or may not have run")]
    ConnectionLost {
        /// What the transport reported.
        reason: String,
    },
    /// The server closed the connection with a `Goodbye` before answering.
    #[error("the server closed the connection ({}): {message}", reason_text(*reason))]
    ServerClosed {
        /// The reason code the server gave.
        reason: GoodbyeReason,
        /// The server's explanation.
        message: String,
    },
    /// The server refused the connection during the handshake (a wrong or
    /// missing token, a version it does not speak).
    #[error("the server refused the connection ({}): {message}", reason_text(*reason))]
    Rejected {
        /// The reason code the server gave.
        reason: GoodbyeReason,
        /// The server's explanation.
        message: String,
    },
    /// This client was closed before the call completed.
    #[error("the client was closed before the call completed")]
    Closed,
    /// The server broke the protocol (or its bytes could not be decoded), so this
    /// client closed the connection.
    #[error("the connection was closed after a protocol violation: {message}")]
    ProtocolViolation {
        /// What was wrong.
        message: String,
    },
    /// The reply is over this client's limits (`Limits`), so it was not
    /// received. The connection is fine.
    #[error("the reply is over this client's limits and was not received: {message}")]
    ReplyOverLimit {
        /// Which limit, and by how much.
        message: String,
    },
    /// The server abandoned the call's stream without a reply (it refused a
    /// stalled upload, or stopped the call while shutting down).
    #[error("the server abandoned the call's stream without a reply ({code})")]
    StreamReset {
        /// The server's stream code.
        code: StreamCode,
    },
    /// The reply could not be read: malformed bytes, or the stream ended
    /// without one. The connection is fine.
    #[error("the reply could not be read: {reason}")]
    InvalidReply {
        /// What was wrong.
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

    /// True if the call's own timeout expired.
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, CallError::DeadlineExceeded { .. })
    }

    /// True if the caller cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, CallError::Cancelled)
    }

    /// True if the call failed for want of a working connection (dead peer,
    /// lost connection, server goodbye or refusal, local close, protocol
    /// violation, no connection at all). Such a call may or may not have run
    /// on the server (except [`CallError::NotConnected`], which was never
    /// sent): send it again only if the method is idempotent.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            CallError::NotAlive { .. }
                | CallError::ConnectionLost { .. }
                | CallError::ServerClosed { .. }
                | CallError::Rejected { .. }
                | CallError::Closed
                | CallError::ProtocolViolation { .. }
                | CallError::NotConnected { .. }
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

/// Why [`ClientProtocol::start_call`](super::ClientProtocol::start_call) did
/// not start a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartCallError {
    /// The client takes no new calls: it was closed, or it lost its connection
    /// with reconnecting turned off (connect again to go on).
    #[error("the client takes no new calls: {cause}")]
    Closed {
        /// Why (the error its pending calls failed with).
        cause: CallError,
    },
    /// An earlier call whose result nobody awaited failed; this call was not
    /// started, so the failure is not lost. Reported once.
    #[error("an earlier call of {method:?}, whose result was never awaited, failed: {error}")]
    Unobserved {
        /// The method of the earlier call.
        method: String,
        /// How it failed.
        error: CallError,
    },
}

/// What was wrong with a message the server sent. Returned by
/// [`ClientProtocol::handle_message`](super::ClientProtocol::handle_message)
/// for logging; the state machine has already acted on it.
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

/// Why a connection attempt failed, as the driver reports it with
/// [`ClientProtocol::connect_failed`](super::ClientProtocol::connect_failed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// No answer, or the network refused: the server may not be up yet.
    /// Worth retrying.
    #[error("{0}")]
    Unreachable(String),
    /// The server's name could not be resolved.
    #[error("{0}")]
    Resolve(String),
    /// TLS failed: the server's certificate is not trusted (a wrong pin or CA),
    /// or this side's TLS settings cannot work.
    #[error("{0}")]
    Tls(String),
    /// There is nothing to connect to any more: the one connection a
    /// server that dialled in gave was used (refused or lost). Not retried.
    #[error("{0}")]
    Spent(String),
}

impl ConnectFailure {
    /// True if retrying the same settings soon is unlikely to help (a
    /// `connect()` that waits gives up at once on these).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ConnectFailure::Unreachable(_))
    }
}

/// Why [`connect`](super::ClientProtocol::connect) gave up, in
/// [`ClientOutput::ConnectResult`](super::ClientOutput::ConnectResult).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// An attempt failed in a way retrying will not mend: TLS (an untrusted
    /// certificate, a wrong pin), or a name that does not resolve.
    #[error("{0}")]
    Failed(ConnectFailure),
    /// The server refused the connection after the TLS handshake (a wrong or
    /// missing token, a version it does not speak).
    #[error("the server refused the connection ({}): {message}", reason_text(*reason))]
    Rejected {
        /// The reason code the server gave.
        reason: GoodbyeReason,
        /// The server's explanation.
        message: String,
    },
    /// The server did not present the token this client requires of it
    /// ([`ClientConfig::server_token`](super::ClientConfig::server_token)):
    /// whoever dialled in is not one of the application's servers.
    #[error(
        "the server did not present the expected token: whoever dialled in is not one of \
         yours (or its token differs from this side's)"
    )]
    ServerUnauthenticated,
    /// The server broke the protocol during the handshake.
    #[error("the server broke the protocol during the handshake: {message}")]
    ProtocolViolation {
        /// What was wrong.
        message: String,
    },
    /// No connection within the connect timeout.
    #[error(
        "no connection within {waited:?} (last error: {}; is a server running there, and is UDP \
         let through?)",
        last_error.as_deref().unwrap_or("none")
    )]
    TimedOut {
        /// How long `connect()` tried.
        waited: Duration,
        /// Why the last attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The client was closed meanwhile.
    #[error("the client was closed")]
    Closed,
}

/// How a call's stream ended without a reply the state machine could use, as
/// the driver reports it with
/// [`ClientProtocol::reply_failed`](super::ClientProtocol::reply_failed).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyFailure {
    /// The server reset the stream with this code.
    Reset(StreamCode),
    /// The reply is over this client's limits.
    OverLimit(String),
    /// The reply's bytes are not a valid message, or not a reply.
    Malformed(String),
    /// The server finished the stream without a reply.
    Missing,
}
