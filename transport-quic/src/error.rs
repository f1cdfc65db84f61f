//! The errors of the transport.

use std::net::SocketAddr;

use teleport_protocol::{DecodeError, EncodeError};

/// What went wrong below the calls: TLS set-up, the connection, or a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A certificate or key could not be made, read or used.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind a UDP socket to {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The connection could not be started (bad address, no endpoint...).
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The peer closed the connection on purpose.
    #[error("the peer closed the connection (code {code}): {reason}")]
    ClosedByPeer { code: u64, reason: String },
    /// This side closed the connection.
    #[error("the connection was closed by this side")]
    ClosedLocally,
    /// Nothing was heard from the peer within the idle timeout.
    #[error("the connection timed out: nothing heard from the peer within the idle timeout")]
    TimedOut,
    /// The connection failed: the TLS handshake was refused (untrusted
    /// certificate, no common ALPN protocol), the peer reset it, or QUIC broke.
    #[error("the connection failed: {0}")]
    ConnectionFailed(String),
    /// The peer abandoned the stream it was sending on.
    #[error("the peer reset the stream (code {0})")]
    StreamReset(u64),
    /// The peer no longer reads the stream this side writes.
    #[error("the peer stopped reading the stream (code {0})")]
    StreamStopped(u64),
    /// The stream ended in the middle of a message.
    #[error("the stream ended in the middle of a message: {0}")]
    Truncated(DecodeError),
    /// The peer sent bytes that are not a valid message.
    #[error("malformed message from the peer: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] EncodeError),
}

impl TransportError {
    /// True if the whole connection is gone (not just one stream).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            TransportError::ClosedByPeer { .. }
                | TransportError::ClosedLocally
                | TransportError::TimedOut
                | TransportError::ConnectionFailed(_)
        )
    }
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(close) => TransportError::ClosedByPeer {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            E::LocallyClosed => TransportError::ClosedLocally,
            E::TimedOut => TransportError::TimedOut,
            other => TransportError::ConnectionFailed(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        use quinn::WriteError as E;
        match e {
            E::Stopped(code) => TransportError::StreamStopped(code.into_inner()),
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => {
                TransportError::ConnectionFailed("write to a finished stream".into())
            }
            E::ZeroRttRejected => TransportError::ConnectionFailed("0-RTT data rejected".into()),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        use quinn::ReadError as E;
        match e {
            E::Reset(code) => TransportError::StreamReset(code.into_inner()),
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => {
                TransportError::ConnectionFailed("read from a stopped stream".into())
            }
            E::IllegalOrderedRead => {
                TransportError::ConnectionFailed("unordered read mixed with ordered reads".into())
            }
            E::ZeroRttRejected => TransportError::ConnectionFailed("0-RTT data rejected".into()),
        }
    }
}
