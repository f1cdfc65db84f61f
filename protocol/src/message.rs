//! The messages peers exchange.

use alloc::string::String;
use core::fmt;
use core::time::Duration;

use crate::Tree;

/// Identifies a call within a connection. Chosen by the client, unique among its
/// open calls. Over QUIC the stream already identifies the call; the id makes the
/// same messages usable over one ordered byte stream.
pub type RequestId = u64;

/// One protocol message.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// First message each way: names the peer and, client to server, carries the
    /// shared token if one is configured.
    Hello(Hello),
    /// Call a bound function.
    Call(Call),
    /// The result of a call.
    Reply(Reply),
    /// Are you alive? Answered by a [`Message::Pong`] with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The client no longer wants the result of this call.
    Cancel {
        request_id: RequestId,
    },
    /// The sender is closing the connection, and why.
    Goodbye(Goodbye),
}

/// The message kind byte in the preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    Hello = 1,
    Call = 2,
    Reply = 3,
    Ping = 4,
    Pong = 5,
    Cancel = 6,
    Goodbye = 7,
}

impl Kind {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::Call,
            3 => Kind::Reply,
            4 => Kind::Ping,
            5 => Kind::Pong,
            6 => Kind::Cancel,
            7 => Kind::Goodbye,
            _ => return None,
        })
    }
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Call(_) => Kind::Call,
            Message::Reply(_) => Kind::Reply,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::Cancel { .. } => Kind::Cancel,
            Message::Goodbye(_) => Kind::Goodbye,
        }
    }
}

/// The opening message of each side.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// A free-form name of the software and peer (`"teleport-rs/0.1 client"`).
    pub agent: String,
    /// The shared secret, client to server; or server to client from a
    /// server that dialled its client (see the wire format, "Hello").
    /// Compared in constant time.
    pub token: Option<String>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A secret must never reach a log line.
        f.debug_struct("Hello")
            .field("agent", &self.agent)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A request to run the function bound as `method` on `args`.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub request_id: RequestId,
    pub method: String,
    /// Time left until the caller gives up, as measured when the call was sent.
    /// Relative, because the peers' clocks are not comparable. Microseconds on the wire.
    pub timeout: Option<Duration>,
    pub args: Tree,
}

/// The outcome of a call.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub request_id: RequestId,
    pub result: Result<Tree, RemoteError>,
}

/// A failure reported by the server for one call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {type_name}: {message}")]
pub struct RemoteError {
    pub kind: ErrorKind,
    /// The type of the error in the handler's language (`"ValueError"`,
    /// `"std::io::Error"`), or a fixed name for errors the server raises itself.
    pub type_name: String,
    pub message: String,
}

impl RemoteError {
    pub fn new(kind: ErrorKind, type_name: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            type_name: type_name.into(),
            message: message.into(),
        }
    }
}

/// Why a call failed on the server. The code is part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The handler returned an error.
    Handler,
    /// The handler panicked.
    Panic,
    /// No function is bound under that name.
    UnknownMethod,
    /// The request was malformed or its arguments were rejected before the handler ran.
    BadRequest,
    /// The request exceeded a configured limit (size, depth, in-flight calls).
    OverLimit,
    /// The server is too busy to take the call now; trying later may work.
    Overloaded,
    /// The call's deadline passed before it finished.
    DeadlineExceeded,
    /// The call was cancelled.
    Cancelled,
    /// The peer is not authenticated.
    Unauthenticated,
    /// The server is shutting down and takes no new calls.
    ShuttingDown,
    /// A bug or unexpected condition in the server itself.
    Internal,
    /// A code this version does not know, kept so it can be reported.
    Unknown(u8),
}

impl ErrorKind {
    pub const fn code(self) -> u8 {
        match self {
            ErrorKind::Handler => 0,
            ErrorKind::Panic => 1,
            ErrorKind::UnknownMethod => 2,
            ErrorKind::BadRequest => 3,
            ErrorKind::OverLimit => 4,
            ErrorKind::Overloaded => 5,
            ErrorKind::DeadlineExceeded => 6,
            ErrorKind::Cancelled => 7,
            ErrorKind::Unauthenticated => 8,
            ErrorKind::ShuttingDown => 9,
            ErrorKind::Internal => 10,
            ErrorKind::Unknown(code) => code,
        }
    }

    pub const fn from_code(code: u8) -> ErrorKind {
        match code {
            0 => ErrorKind::Handler,
            1 => ErrorKind::Panic,
            2 => ErrorKind::UnknownMethod,
            3 => ErrorKind::BadRequest,
            4 => ErrorKind::OverLimit,
            5 => ErrorKind::Overloaded,
            6 => ErrorKind::DeadlineExceeded,
            7 => ErrorKind::Cancelled,
            8 => ErrorKind::Unauthenticated,
            9 => ErrorKind::ShuttingDown,
            10 => ErrorKind::Internal,
            other => ErrorKind::Unknown(other),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Handler => "handler error",
            ErrorKind::Panic => "handler panicked",
            ErrorKind::UnknownMethod => "unknown method",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::OverLimit => "over limit",
            ErrorKind::Overloaded => "server overloaded",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::ShuttingDown => "server shutting down",
            ErrorKind::Internal => "internal server error",
            ErrorKind::Unknown(code) => return write!(f, "error kind {code}"),
        };
        f.write_str(s)
    }
}

/// The last message on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goodbye {
    pub reason: GoodbyeReason,
    pub message: String,
}

/// Why a peer closes the connection. The code is part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GoodbyeReason {
    /// An orderly close.
    Normal,
    ShuttingDown,
    Unauthenticated,
    /// The peer sent something this side could not accept.
    ProtocolError,
    UnsupportedVersion,
    Unknown(u8),
}

impl GoodbyeReason {
    pub const fn code(self) -> u8 {
        match self {
            GoodbyeReason::Normal => 0,
            GoodbyeReason::ShuttingDown => 1,
            GoodbyeReason::Unauthenticated => 2,
            GoodbyeReason::ProtocolError => 3,
            GoodbyeReason::UnsupportedVersion => 4,
            GoodbyeReason::Unknown(code) => code,
        }
    }

    pub const fn from_code(code: u8) -> GoodbyeReason {
        match code {
            0 => GoodbyeReason::Normal,
            1 => GoodbyeReason::ShuttingDown,
            2 => GoodbyeReason::Unauthenticated,
            3 => GoodbyeReason::ProtocolError,
            4 => GoodbyeReason::UnsupportedVersion,
            other => GoodbyeReason::Unknown(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 0..=255u8 {
            assert_eq!(ErrorKind::from_code(code).code(), code);
            assert_eq!(GoodbyeReason::from_code(code).code(), code);
            if let Some(k) = Kind::from_code(code) {
                assert_eq!(k.code(), code);
            }
        }
    }

    #[test]
    fn hello_debug_hides_token() {
        let h = Hello {
            agent: "x".into(),
            token: Some("secret".into()),
        };
        let s = alloc::format!("{h:?}");
        assert!(!s.contains("secret"), "{s}");
    }
}
