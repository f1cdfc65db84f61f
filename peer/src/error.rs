//! The peer's error type, and the record of greetings it refused.

use std::net::SocketAddr;
use std::time::Duration;

use teleport_quic::{AddressError, Fingerprint, TransportError};
use teleport_server::ServerError;

/// Why a peer could not start, connect, find a peer or make a call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The name is held in the cohort by another identity (another
    /// certificate) that is still reachable, or it is this peer's own name.
    /// Names are unique in a cohort: choose another name, or stop the peer
    /// holding it. Both sides of a refused greeting see this error (the
    /// refusing side in [`Peer::refusals`](crate::Peer::refusals)).
    #[error("name clash: the name {name:?} is taken ({message})")]
    NameClash {
        /// The name both peers claim.
        name: String,
        /// The peer that refused the greeting (its name, or "this peer").
        refused_by: String,
        /// What was found.
        message: String,
    },
    /// A peer's certificate is not trusted for the name it claims: its name
    /// is pinned to another fingerprint, or nothing says to trust it (see the
    /// trust rules in the crate documentation: pin it with
    /// [`PeerBuilder::trust`](crate::PeerBuilder::trust), or opt in with
    /// [`PeerBuilder::accept_any`](crate::PeerBuilder::accept_any)).
    #[error("untrusted peer {name:?} (fingerprint {fingerprint}): {reason}")]
    Untrusted {
        /// The name the peer claims.
        name: String,
        /// The fingerprint of its certificate.
        fingerprint: String,
        /// Why it is not trusted, and what would trust it.
        reason: String,
    },
    /// No peer that this peer could ask knew the name within the call's
    /// timeout (or the peers that did could not be reached).
    #[error(
        "no peer named {name:?} was found within {waited:?}: asked {asked} peer(s){}; is it \
         connected to a peer of this cohort, and is the name right?",
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    NotFound {
        /// The name looked up.
        name: String,
        /// How long the search went on.
        waited: Duration,
        /// How many lookups were answered or failed.
        asked: usize,
        /// Why the last attempt to reach a peer that knew the name failed.
        last_error: Option<String>,
    },
    /// Connecting to an address (or to a peer found by name) failed.
    #[error("cannot connect to the peer at {target}: {error}")]
    Connect {
        /// The address.
        target: String,
        /// Why.
        #[source]
        error: Box<teleport_client::Error>,
    },
    /// The call reached the peer and failed there (the function's error, a
    /// deadline, ...), or its connection failed after it was sent.
    #[error("calling {method:?} on peer {peer:?}: {error}")]
    Call {
        /// The peer called.
        peer: String,
        /// The function called.
        method: String,
        /// How it failed; [`teleport_client::Error::remote`] gives the
        /// peer's own error.
        #[source]
        error: Box<teleport_client::Error>,
    },
    /// No time was left for the call: its timeout passed while the peer was
    /// being found or connected.
    #[error("calling {method:?} on peer {peer:?}: the timeout of {timeout:?} passed before the call could be sent ({while_doing})")]
    TimedOut {
        /// The peer called.
        peer: String,
        /// The function called.
        method: String,
        /// The call's timeout.
        timeout: Duration,
        /// What the call was waiting for.
        while_doing: String,
    },
    /// The other side of a greeting broke the greeting protocol (a reply that
    /// is not a greeting, or one that does not match the certificate).
    #[error("bad greeting from {from}: {message}")]
    Greeting {
        /// Who sent it.
        from: String,
        /// What was wrong.
        message: String,
    },
    /// A function was defined under a name reserved for the peer's own
    /// functions (those starting with `_peer.`).
    #[error(
        "the function name {0:?} is reserved (names starting with \"_peer.\" are the peer's own)"
    )]
    ReservedName(String),
    /// A name that cannot be a peer's name (empty, or longer than 255 bytes).
    #[error("{0:?} cannot be a peer name: it must be 1 to 255 bytes")]
    InvalidName(String),
    /// Functions were defined on a peer that does not listen, so nobody
    /// could call them.
    #[error("functions were defined but the peer does not listen: use PeerBuilder::listen")]
    NotListening,
    /// An address that is not one.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The peer's server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The peer's certificate could not be made.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer must be started inside a tokio runtime.
    #[error("a peer must be started inside a tokio runtime")]
    NoRuntime,
    /// [`Peer::call_blocking`](crate::Peer::call_blocking) was called on a
    /// thread that runs async tasks, which it would block.
    #[error(
        "call_blocking was called inside an async runtime, where blocking would stall it: \
         await Peer::call instead"
    )]
    BlockingInRuntime,
    /// The peer was shut down.
    #[error("the peer was shut down")]
    Closed,
    /// A call named this peer's own name: a peer does not call itself over
    /// the network (call the function directly instead).
    #[error("{0:?} is this peer's own name: a peer does not call itself")]
    OwnName(String),
    /// This peer's directory of known peers is full
    /// ([`PeerBuilder::max_peers`](crate::PeerBuilder::max_peers)) and no
    /// entry can be evicted (every one is connected): raise the limit, or
    /// make the cohort smaller.
    #[error(
        "this peer already knows {limit} peers, its limit (PeerBuilder::max_peers), and none \
         of them can be forgotten (each is connected): raise the limit"
    )]
    DirectoryFull {
        /// The limit.
        limit: usize,
    },
}

impl PeerError {
    /// A name pinned here to the certificate `pin`, claimed with another.
    pub(crate) fn pinned_elsewhere(
        name: String,
        fingerprint: Fingerprint,
        pin: Fingerprint,
    ) -> Self {
        PeerError::Untrusted {
            name,
            fingerprint: fingerprint.to_string(),
            reason: format!("this peer pins the name to certificate {pin}"),
        }
    }

    /// True for a refusal, by either side, of a name
    /// ([`NameClash`](PeerError::NameClash)) or a certificate
    /// ([`Untrusted`](PeerError::Untrusted)): it says something about the
    /// peers, not the address: another address would not help.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            PeerError::NameClash { .. } | PeerError::Untrusted { .. }
        )
    }

    /// True for a [`NameClash`](PeerError::NameClash).
    pub fn is_name_clash(&self) -> bool {
        matches!(self, PeerError::NameClash { .. })
    }

    /// True for a [`NotFound`](PeerError::NotFound).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PeerError::NotFound { .. })
    }

    /// True if the call's timeout passed: before it was sent
    /// ([`TimedOut`](PeerError::TimedOut)), while the peer was looked up
    /// ([`NotFound`](PeerError::NotFound)), or while it ran (a deadline error
    /// of the call).
    pub fn is_timeout(&self) -> bool {
        match self {
            PeerError::TimedOut { .. } | PeerError::NotFound { .. } => true,
            PeerError::Call { error, .. } => matches!(
                error.call_error(),
                Some(teleport_client::CallError::DeadlineExceeded { .. })
            ),
            _ => false,
        }
    }

    /// The called function's own error (or the remote server's refusal), if
    /// the call reached the peer and failed there.
    pub fn remote(&self) -> Option<&teleport_protocol::RemoteError> {
        match self {
            PeerError::Call { error, .. } => error.remote(),
            _ => None,
        }
    }
}

/// Why a greeting was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The name is held by another identity that is still reachable.
    NameClash,
    /// The name is pinned here to another fingerprint.
    Untrusted,
}

impl RefusalKind {
    /// The kind of a refusal that travelled as the error type `type_name`
    /// ([`NAME_CLASH_TYPE`] or another).
    pub(crate) fn of_type(type_name: &str) -> RefusalKind {
        if type_name == NAME_CLASH_TYPE {
            RefusalKind::NameClash
        } else {
            RefusalKind::Untrusted
        }
    }
}

/// A greeting this peer refused, or one whose refusal another peer reported
/// to it (see [`Peer::refusals`](crate::Peer::refusals)).
#[derive(Clone, Debug)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The name in question.
    pub name: String,
    /// The fingerprint of the refused identity, where known.
    pub fingerprint: Option<Fingerprint>,
    /// The address the refused greeting came from, where known.
    pub from: Option<SocketAddr>,
    /// Which peer refused: this one ("this peer") or the one that said so.
    pub refused_by: String,
    /// What was found, in words.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            RefusalKind::NameClash => "name clash",
            RefusalKind::Untrusted => "untrusted",
        };
        write!(
            f,
            "{kind}: {:?} refused by {}: {}",
            self.name, self.refused_by, self.message
        )
    }
}

/// The error type a refused greeting travels as (the remote error's type
/// name), so the refused side can tell a clash from other failures.
pub(crate) const NAME_CLASH_TYPE: &str = "NameClash";
/// The same for an untrusted identity.
pub(crate) const UNTRUSTED_TYPE: &str = "Untrusted";
/// The error type of a greeting refused because the directory is full.
pub(crate) const DIRECTORY_FULL_TYPE: &str = "DirectoryFull";
