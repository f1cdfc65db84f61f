//! The errors of the transport.

use std::net::SocketAddr;

use teleport_protocol::{CloseCode, DecodeError, EncodeError, StreamCode};

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
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The connection could not be started (an address quinn cannot use).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed: this side did not trust the peer's
    /// certificate (a wrong pin or CA, a name mismatch), the peer did not
    /// trust this side's, or there was no common protocol (ALPN). Retrying
    /// will not help until the configuration changes.
    #[error("the TLS handshake failed: {0}")]
    HandshakeFailed(String),
    /// The peer's QUIC stack refused or aborted the connection (a server at
    /// its connection limit, no common QUIC version). Retrying later may work.
    #[error("the peer refused the connection: {0}")]
    Refused(String),
    /// The peer no longer knows the connection (it restarted, say).
    #[error("the peer reset the connection (it no longer knows it; restarted?)")]
    Reset,
    /// A message's data section is larger than the receive memory budget
    /// (of its connection or of the whole server) could ever give it.
    #[error(
        "the message's data section of {needed} bytes is larger than the {budget}'s receive memory budget of {limit} bytes"
    )]
    MemoryBudget {
        /// The declared size.
        needed: usize,
        /// Which budget: `"connection"` or `"server"`.
        budget: &'static str,
        /// Its limit.
        limit: usize,
    },
    /// The peer closed the connection on purpose.
    #[error("the peer closed the connection ({code}): {reason}")]
    ClosedByPeer {
        /// The peer's close code.
        code: CloseCode,
        /// The peer's explanation.
        reason: String,
    },
    /// This side closed the connection.
    #[error("the connection was closed by this side")]
    ClosedLocally,
    /// Nothing was heard from the peer within the idle timeout.
    #[error("the connection timed out: nothing heard from the peer within the idle timeout")]
    TimedOut,
    /// The peer broke the QUIC protocol.
    #[error("the peer broke the QUIC protocol: {0}")]
    QuicViolation(String),
    /// This side used the connection or a stream in a way it does not allow
    /// (a bug in the caller).
    #[error("misuse of the transport: {0}")]
    Misuse(String),
    /// The peer abandoned the stream it was sending on.
    #[error("the peer reset the stream ({0})")]
    StreamReset(StreamCode),
    /// The peer no longer reads the stream this side writes.
    #[error("the peer stopped reading the stream ({0})")]
    StreamStopped(StreamCode),
    /// The stream ended in the middle of a message.
    #[error("the stream ended in the middle of a message: {0}")]
    Truncated(DecodeError),
    /// Bytes followed the message on a stream that carries one message.
    #[error("bytes followed the message on a stream that carries only one")]
    TrailingBytes,
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
            TransportError::HandshakeFailed(_)
                | TransportError::Refused(_)
                | TransportError::Reset
                | TransportError::ClosedByPeer { .. }
                | TransportError::ClosedLocally
                | TransportError::TimedOut
                | TransportError::QuicViolation(_)
        )
    }

    /// True if retrying the same connection settings is unlikely to help
    /// (TLS failures, unusable addresses or configurations).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TransportError::HandshakeFailed(_)
                | TransportError::Certificate(_)
                | TransportError::Tls(_)
                | TransportError::Connect { .. }
        )
    }
}

/// TLS alerts travel as QUIC error codes 0x100-0x1ff.
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(close) => TransportError::ClosedByPeer {
                code: CloseCode::from_code(close.error_code.into_inner()),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            E::LocallyClosed => TransportError::ClosedLocally,
            E::TimedOut => TransportError::TimedOut,
            E::Reset => TransportError::Reset,
            E::TransportError(t) if is_crypto(t.code) => {
                TransportError::HandshakeFailed(t.reason.clone())
            }
            E::TransportError(t) => TransportError::QuicViolation(t.to_string()),
            E::ConnectionClosed(close) if is_crypto(close.error_code) => {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                TransportError::HandshakeFailed(format!(
                    "the peer rejected this side's TLS ({:?}){}",
                    close.error_code,
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                ))
            }
            E::ConnectionClosed(close) => TransportError::Refused(close.to_string()),
            E::VersionMismatch => {
                TransportError::Refused("the peer speaks no QUIC version this side does".into())
            }
            E::CidsExhausted => TransportError::Misuse("connection ids exhausted".into()),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        use quinn::WriteError as E;
        match e {
            E::Stopped(code) => {
                TransportError::StreamStopped(StreamCode::from_code(code.into_inner()))
            }
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => TransportError::Misuse("write to a finished stream".into()),
            E::ZeroRttRejected => TransportError::Misuse("0-RTT data rejected".into()),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        use quinn::ReadError as E;
        match e {
            E::Reset(code) => TransportError::StreamReset(StreamCode::from_code(code.into_inner())),
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => TransportError::Misuse("read from a stopped stream".into()),
            E::IllegalOrderedRead => {
                TransportError::Misuse("unordered read mixed with ordered reads".into())
            }
            E::ZeroRttRejected => TransportError::Misuse("0-RTT data rejected".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_refusing_this_sides_tls_is_a_handshake_failure() {
        let close = |code| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: bytes::Bytes::from_static(b"bad certificate"),
            })
        };
        let e = TransportError::from(close(quinn::TransportErrorCode::crypto(42)));
        assert!(matches!(e, TransportError::HandshakeFailed(_)), "{e}");
        assert!(e.is_permanent() && e.is_connection_error());
        let e = TransportError::from(close(quinn::TransportErrorCode::CONNECTION_REFUSED));
        assert!(matches!(e, TransportError::Refused(_)), "{e}");
        assert!(!e.is_permanent());
    }
}
