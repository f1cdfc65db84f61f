//! What can be wrong with what a client sends.

use alloc::string::String;

use crate::Kind;

/// What was wrong with a message the client sent on its control stream.
/// Returned by [`ServerProtocol::handle_message`](super::ServerProtocol::handle_message)
/// for logging; the state machine has already acted on it (every variant
/// closes the connection).
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
    /// A message a client must never send on its control stream (a `Reply`, a
    /// second `Hello`, a `Call`: calls travel on streams of their own).
    #[error(
        "the client sent a {kind:?} message on its control stream, which clients must not do; \
         connection closed"
    )]
    Unexpected {
        /// The kind of the offending message.
        kind: Kind,
    },
}

/// Why a call stream did not deliver a call the server could run. Reported by
/// the driver with
/// [`ServerProtocol::call_unreadable`](super::ServerProtocol::call_unreadable).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallStreamError {
    /// The client finished the stream without writing anything.
    #[error("the call stream ended without a Call")]
    Empty,
    /// The bytes are not a valid message (or the stream ended inside one).
    #[error("the call could not be read: {0}")]
    Malformed(String),
    /// The message is over one of the server's limits.
    #[error("the call is over a limit of the server: {0}")]
    OverLimit(String),
    /// A valid message, but not a `Call`.
    #[error("a call stream must carry a Call, not a {0:?} message")]
    NotACall(Kind),
    /// Bytes followed the `Call` on its stream.
    #[error("bytes followed the Call on its stream (a call stream carries exactly one Call)")]
    TrailingBytes,
    /// The client reset its side of the stream before the call was complete.
    #[error("the client reset the call stream (code {0})")]
    Reset(u64),
}
