//! The errors of the server: why it could not start, the first failure of a
//! bound function, and what a function returns when it fails.

use std::fmt;

use teleport_protocol::batcher::BatchPolicyError;
use teleport_protocol::{ErrorKind, RemoteError};
use teleport_quic::{AddressError, TransportError};

/// Why a server could not start (or [`Server::dial`](crate::Server::dial) a
/// client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The identity or the socket could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The address to listen on is not one, or did not resolve.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// Two functions were bound under one name.
    #[error("the name {0:?} is bound twice")]
    DuplicateMethod(String),
    /// A function's options cannot work together (see
    /// [`Function`](crate::Function)).
    #[error("the function {method:?} cannot be bound: {reason}")]
    InvalidFunction {
        /// The name the function is bound as.
        method: String,
        /// Which options clash.
        reason: String,
    },
    /// [`Server::dial`](crate::Server::dial): the server has as many
    /// connections as it takes.
    #[error(
        "the server has as many connections as it takes (ServerBuilder::max_connections); \
         the client dialled was not served"
    )]
    ConnectionLimit,
    /// A batched function's policy cannot work (`max_batch` 0).
    #[error("the batched function {method:?} cannot be served: {error}")]
    BatchPolicy {
        /// The name the function is bound as.
        method: String,
        /// What is wrong with its policy.
        error: BatchPolicyError,
    },
}

/// A bound function failed (returned an error or panicked); see
/// [`Server::check`](crate::Server::check).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the function {method:?} failed: {error}")]
pub struct HandlerFailure {
    /// The name the function is bound as.
    pub method: String,
    /// What the caller was told.
    pub error: RemoteError,
}

/// What a bound function returns when it fails: a type name and a message,
/// delivered to the caller as a [`RemoteError`] of kind `Handler`.
///
/// Any `std::error::Error` converts into it with `?`, keeping its type name.
pub struct HandlerError {
    type_name: String,
    message: String,
}

impl HandlerError {
    /// An error with the type name `"Error"` and this message.
    pub fn new(message: impl Into<String>) -> HandlerError {
        HandlerError::with_type("Error", message)
    }

    /// An error with a type name of your choice (`"ValueError"`, say).
    pub fn with_type(type_name: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError {
            type_name: type_name.into(),
            message: message.into(),
        }
    }

    /// The type name the caller sees.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The message the caller sees.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_remote(self) -> RemoteError {
        RemoteError::new(ErrorKind::Handler, self.type_name, self.message)
    }
}

// Not `std::error::Error` itself, so that every error type can convert into it
// (the same choice `anyhow::Error` makes).
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::with_type(short_type_name::<E>(), e.to_string())
    }
}

/// `ParseIntError` for `core::num::error::ParseIntError`: what a caller can act
/// on, without the server's module paths. Generic parameters are kept short too.
fn short_type_name<E>() -> String {
    let full = std::any::type_name::<E>();
    let mut out = String::with_capacity(full.len());
    let mut segment_start = 0;
    for (i, c) in full.char_indices() {
        if matches!(c, '<' | '>' | ',' | ' ' | '(' | ')' | '[' | ']' | '&' | ';') {
            out.push_str(last_segment(&full[segment_start..i]));
            out.push(c);
            segment_start = i + c.len_utf8();
        }
    }
    out.push_str(last_segment(&full[segment_start..]));
    out
}

fn last_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_module_paths() {
        assert_eq!(
            short_type_name::<std::num::ParseIntError>(),
            "ParseIntError"
        );
        assert_eq!(
            short_type_name::<std::collections::HashMap<String, std::io::Error>>(),
            "HashMap<String, Error>"
        );
    }

    #[test]
    fn errors_keep_their_type_and_message() {
        let e: HandlerError = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.type_name(), "ParseIntError");
        let remote = e.into_remote();
        assert_eq!(remote.kind, ErrorKind::Handler);
        assert!(remote.message.contains("invalid digit"), "{remote}");
    }
}
