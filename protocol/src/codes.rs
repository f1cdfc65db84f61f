//! The application codes of the QUIC mapping (`docs/wire-format.md` §10): why a
//! whole connection was closed, and why one stream was abandoned.
//!
//! They live here, beside the messages, because the state machines decide them;
//! the transport only puts them on the wire.

/// Why a connection was closed (QUIC `CONNECTION_CLOSE`, application codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// An orderly close: the client's own close, or the server's after a
    /// normal Goodbye.
    Normal,
    /// The peer broke the protocol (an unreadable Hello, no Hello in time, a
    /// message it must not send).
    ProtocolError,
    /// The client failed authentication (a wrong or missing token).
    Unauthenticated,
    /// The server is shutting down.
    ShuttingDown,
    /// The peer gave no sign of life for too long while something was
    /// awaited from it (the server's `peer_timeout`): it is presumed dead,
    /// and nothing is kept for it.
    PeerTimeout,
    /// A code this version does not know, kept so it can be reported.
    Unknown(u64),
}

impl CloseCode {
    /// The code on the wire.
    pub const fn code(self) -> u64 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::ProtocolError => 1,
            CloseCode::Unauthenticated => 2,
            CloseCode::ShuttingDown => 3,
            CloseCode::PeerTimeout => 4,
            CloseCode::Unknown(code) => code,
        }
    }

    /// The code read from the wire.
    pub const fn from_code(code: u64) -> CloseCode {
        match code {
            0 => CloseCode::Normal,
            1 => CloseCode::ProtocolError,
            2 => CloseCode::Unauthenticated,
            3 => CloseCode::ShuttingDown,
            4 => CloseCode::PeerTimeout,
            other => CloseCode::Unknown(other),
        }
    }
}

impl core::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CloseCode::Normal => f.write_str("normal close"),
            CloseCode::ProtocolError => f.write_str("protocol error"),
            CloseCode::Unauthenticated => f.write_str("unauthenticated"),
            CloseCode::ShuttingDown => f.write_str("shutting down"),
            CloseCode::PeerTimeout => f.write_str("no sign of life from the peer"),
            CloseCode::Unknown(code) => write!(f, "close code {code}"),
        }
    }
}

/// Why one stream was abandoned (QUIC `RESET_STREAM` and `STOP_SENDING`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamCode {
    /// The caller cancelled the call.
    Cancelled,
    /// The call's deadline passed.
    Expired,
    /// The stream broke the protocol or a limit, or stopped making progress.
    Refused,
    /// The server is shutting down and stopped the call.
    ShuttingDown,
    /// A code this version does not know.
    Unknown(u64),
}

impl StreamCode {
    /// The code on the wire.
    pub const fn code(self) -> u64 {
        match self {
            StreamCode::Cancelled => 1,
            StreamCode::Expired => 2,
            StreamCode::Refused => 3,
            StreamCode::ShuttingDown => 4,
            StreamCode::Unknown(code) => code,
        }
    }

    /// The code read from the wire.
    pub const fn from_code(code: u64) -> StreamCode {
        match code {
            1 => StreamCode::Cancelled,
            2 => StreamCode::Expired,
            3 => StreamCode::Refused,
            4 => StreamCode::ShuttingDown,
            other => StreamCode::Unknown(other),
        }
    }
}

impl core::fmt::Display for StreamCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StreamCode::Cancelled => f.write_str("cancelled"),
            StreamCode::Expired => f.write_str("deadline passed"),
            StreamCode::Refused => f.write_str("refused"),
            StreamCode::ShuttingDown => f.write_str("server shutting down"),
            StreamCode::Unknown(code) => write!(f, "stream code {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 0..16u64 {
            assert_eq!(CloseCode::from_code(code).code(), code);
            assert_eq!(StreamCode::from_code(code).code(), code);
        }
    }
}
