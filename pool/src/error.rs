//! The pool's error types: [`PoolError`] for calls, [`StartError`] for
//! starting a pool's sources.

use std::sync::Arc;
use std::time::Duration;

use teleport_client::CallError;
use teleport_protocol::batch::{SplitError, StackError};
use teleport_protocol::RemoteError;

/// Why a call through the pool failed. Every error that a server caused
/// names that server (its address, or how the pool started it).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The function raised an error (or the server refused the call): its
    /// type name and message as the server sent them.
    #[error("{method} on {server} failed: {}: {}", .error.type_name, .error.message)]
    Remote {
        /// The server that ran the call.
        server: String,
        /// The method called.
        method: String,
        /// The server's error, with its kind, type name and message.
        error: RemoteError,
    },
    /// The server was lost (it died, closed, or fell silent) while the call
    /// was in flight, and the call was not re-sent: it may or may not have
    /// run, and its method is not marked idempotent.
    #[error(
        "lost {method} on {server} ({reason}); it may or may not have run, so it was not \
         re-sent (mark {method:?} idempotent to re-send lost calls to other servers)"
    )]
    ServerLost {
        /// The server that was lost.
        server: String,
        /// The method called.
        method: String,
        /// How the connection ended.
        reason: String,
    },
    /// An idempotent call was lost with every server it was sent to, as many
    /// times as the pool allows (`PoolBuilder::max_attempts`).
    #[error(
        "{method} was lost {attempts} times, last on {server} ({reason}); giving up (are the \
         servers crashing on it? PoolBuilder::max_attempts allows more sends)"
    )]
    Exhausted {
        /// The last server tried.
        server: String,
        /// The method called.
        method: String,
        /// How many times it was sent.
        attempts: u32,
        /// How the last connection ended.
        reason: String,
    },
    /// No reply within the call's timeout; the server was told to drop it.
    #[error(
        "no reply from {server} to {method} within {timeout:?}, the call's timeout; the server \
         was told to drop it (raise PoolBuilder::call_timeout or MapStream::timeout if the \
         function is this slow)"
    )]
    Timeout {
        /// The server that had the call.
        server: String,
        /// The method called.
        method: String,
        /// The timeout.
        timeout: Duration,
    },
    /// No server of the pool was up for as long as a call may wait for one
    /// (`PoolBuilder::server_wait`). Busy servers do not count: a call waits
    /// for them as long as it takes. In a map, this error ends the map.
    #[error(
        "no server of the pool was up to take {method} for {waited:?} \
         (PoolBuilder::server_wait): {servers}"
    )]
    NoServers {
        /// The method called.
        method: String,
        /// How long the call waited.
        waited: Duration,
        /// Each known server and its state, or that there are none.
        servers: String,
    },
    /// Any other failure of the call on a server (a reply over this client's
    /// limits, a reply that could not be read): the call's error.
    #[error("{method} on {server} failed: {error}")]
    Call {
        /// The server.
        server: String,
        /// The method called.
        method: String,
        /// The call's error.
        error: CallError,
    },
    /// The client of a server failed in a way that is not the call's own
    /// (no connection could be made, an earlier unobserved failure): the
    /// client's error, whole.
    #[error("{method} on {server}: {error}")]
    Client {
        /// The server.
        server: String,
        /// The method called.
        method: String,
        /// The client's error (shared: a failed chunk fails each of its
        /// inputs with it).
        #[source]
        error: Arc<teleport_client::Error>,
    },
    /// The inputs of one chunk did not stack into one call (`chunksize`).
    #[error("the inputs of a chunk of {method} do not stack: {error}")]
    Stack {
        /// The method called.
        method: String,
        /// Which input differs, and where.
        error: StackError,
    },
    /// The result of a chunk did not split back into one result per input.
    #[error(
        "the result of a chunk of {size} inputs of {method} from {server} does not split \
         into {size} results: {error}"
    )]
    Split {
        /// The server that ran the chunk.
        server: String,
        /// The method called.
        method: String,
        /// The number of inputs in the chunk.
        size: usize,
        /// What did not split.
        error: SplitError,
    },
    /// The pool was closed (`Pool::close`, or every handle was dropped).
    /// In a map, this error ends the map.
    #[error("the pool was closed (Pool::close, or its last handle was dropped); start a new one")]
    Closed,
}

impl PoolError {
    /// The server the error happened on, where there was one.
    pub fn server(&self) -> Option<&str> {
        match self {
            PoolError::Remote { server, .. }
            | PoolError::ServerLost { server, .. }
            | PoolError::Exhausted { server, .. }
            | PoolError::Timeout { server, .. }
            | PoolError::Call { server, .. }
            | PoolError::Client { server, .. }
            | PoolError::Split { server, .. } => Some(server),
            PoolError::NoServers { .. } | PoolError::Stack { .. } | PoolError::Closed => None,
        }
    }

    /// True for the errors that end a map ([`PoolError::NoServers`],
    /// [`PoolError::Closed`]): a map yields such an error last, after the
    /// results of the calls that were in flight.
    pub fn is_terminal(&self) -> bool {
        matches!(self, PoolError::NoServers { .. } | PoolError::Closed)
    }

    /// The function's own error, if it raised one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            PoolError::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why a pool could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A worker command could not be started.
    #[error(
        "cannot start the worker command `{command}`: {error} (is the program installed and \
         on PATH? PoolBuilder::worker_command names another)"
    )]
    Spawn {
        /// The command line.
        command: String,
        /// The operating system's error.
        #[source]
        error: std::io::Error,
    },
    /// A worker exited, or printed something else, before announcing where it
    /// listens.
    #[error(
        "the worker `{command}` did not announce its address (expected a line \
         `teleport worker listening on ADDR fingerprint FP`): {what}"
    )]
    Announce {
        /// The command line.
        command: String,
        /// What happened instead.
        what: String,
    },
    /// An `ssh://` source that is not `ssh://[user@]host[:port]/N`.
    #[error("{input:?} is not an ssh source: {why} (write ssh://[user@]host[:port]/N)")]
    SshSource {
        /// The source as given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// Servers given without a fingerprint, with no `pin` or `tls` for the pool.
    #[error(
        "no way to trust {server}: give its fingerprint (`server(addr, fp)`), or `pin`/`tls` \
         for the pool's servers"
    )]
    Trust {
        /// The server or name.
        server: String,
    },
    /// An address that is not one, or a name that does not resolve.
    #[error("{0}")]
    Address(#[from] teleport_client::AddressError),
    /// The endpoint workers dial (`PoolBuilder::accept_workers`) could not be
    /// started.
    #[error("cannot start the endpoint workers dial: {0}")]
    Registration(String),
    /// The random token for workers could not be made (the operating
    /// system's random source failed).
    #[error("cannot make a random token for the pool: {0} (or give one: PoolBuilder::token)")]
    Token(String),
    /// The pool's own runtime (`BlockingPool`) could not be started.
    #[error("cannot start the pool's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No server of the pool came up within the connect timeout.
    #[error("no server of the pool came up within {waited:?}: {servers}")]
    NoServers {
        /// How long the pool waited.
        waited: Duration,
        /// Each known server and its state, or that there are none.
        servers: String,
    },
}
