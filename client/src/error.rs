//! The client's error type.

use teleport_protocol::client::{CallError, ConnectError};
use teleport_protocol::{RemoteError, SerdeError};

/// Why connecting or calling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made: the name, the network, TLS (an untrusted
    /// or unpinned certificate shows here), a refusal by the server (a wrong
    /// token), or no answer within the connect timeout.
    #[error("cannot connect to {target}: {error}")]
    Connect {
        /// The address as given.
        target: String,
        /// What went wrong.
        error: ConnectError,
    },
    /// An earlier call failed while nobody awaited it (its
    /// [`PendingCall`](crate::PendingCall) was dropped). Reported once, by the
    /// next call, which was not sent.
    #[error("an earlier call of {method:?}, whose result was never awaited, failed: {error}")]
    Unobserved {
        /// The method of the earlier call.
        method: String,
        /// How it failed.
        error: CallError,
    },
    /// The call waited for a connection (the client was connecting or
    /// reconnecting) until its deadline, or for the connect timeout if it has
    /// none, and was not sent.
    #[error(
        "not connected to {target}: no connection within {waited:?}, so the call was not sent \
         (last error: {}; is the server up, and are the pin and token right?)",
        last_error.as_deref().unwrap_or("no attempt has finished yet")
    )]
    NotConnected {
        /// The address as given.
        target: String,
        /// How long the call waited.
        waited: std::time::Duration,
        /// Why the last connection or attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The blocking client's runtime could not be started.
    #[error("cannot start the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A typed call's request ([`Client::call_as`](crate::Client::call_as))
    /// did not convert to a tree; the call was not sent.
    #[error("the request of {method:?} did not convert to a tree: {error}")]
    Request {
        /// The method called.
        method: String,
        /// Where in the request, and what went wrong.
        error: SerdeError,
    },
    /// A typed call's reply did not convert to the type asked for (the call
    /// itself succeeded).
    #[error("the reply of {method:?} did not convert to the type asked for: {error}")]
    Response {
        /// The method called.
        method: String,
        /// Where in the reply, and what went wrong.
        error: SerdeError,
    },
    /// The call failed: the function's own error ([`CallError::Remote`]), a
    /// deadline, a cancel, no connection, or the connection.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Error {
    /// The error of a call that failed, naming the target where it helps.
    pub(crate) fn of_call(error: CallError, target: &str) -> Error {
        match error {
            CallError::NotConnected { waited, last_error } => Error::NotConnected {
                target: target.to_owned(),
                waited,
                last_error,
            },
            other => Error::Call(other),
        }
    }

    /// True if the call failed for want of a working connection (it was lost,
    /// closed, or could not be made): see [`CallError::is_connection_error`].
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Call(e) => e.is_connection_error(),
            Error::Connect { .. } | Error::NotConnected { .. } => true,
            _ => false,
        }
    }

    /// The server's error, if the function failed or the server refused the call.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Call(e) => e.remote(),
            _ => None,
        }
    }

    /// The call's error, if this is one.
    pub fn call_error(&self) -> Option<&CallError> {
        match self {
            Error::Call(e) => Some(e),
            _ => None,
        }
    }
}
