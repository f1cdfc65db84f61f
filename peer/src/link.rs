//! A link: this peer's client connection to another peer's server, made by
//! a greeting, and the task that keeps it up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use teleport_client::{Client, ClientTls};
use teleport_protocol::{from_tree, to_tree};
use teleport_quic::{Address, Fingerprint};
use tokio::sync::watch;

use crate::error::{PeerError, NAME_CLASH_TYPE, UNTRUSTED_TYPE};
use crate::greeting::{Greeting, PeerInfo, HELLO};
use crate::inner::{deadline_in, Inner};

/// Whether a link takes calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Connected and greeted.
    Up,
    /// The connection was lost; reconnecting within the liveness timeout.
    Reconnecting,
    /// Lost for good (or closed): the name must be found again.
    Down,
}

/// How a link came about, which decides what happens when it is lost.
#[derive(Clone, Debug)]
pub(crate) enum Origin {
    /// [`Peer::connect`](crate::Peer::connect) to an address: kept up, by
    /// connecting to the address again (whoever answers there) until it
    /// answers.
    Address(Address),
    /// Made to a peer found by name (a greeting or a lookup): when lost and
    /// not back within the liveness timeout, the name is looked up again.
    Learned,
}

/// A connection to one peer, greeted, pinned to its fingerprint.
pub(crate) struct Link {
    pub(crate) name: String,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) client: Client,
    /// Read when the link is lost; a `connect` to the address of a link
    /// made by name turns it into one kept up.
    origin: std::sync::Mutex<Origin>,
    state: watch::Sender<LinkState>,
    closing: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("origin", &self.origin())
            .field("state", &self.state())
            .finish()
    }
}

impl Link {
    pub(crate) fn new(
        name: String,
        fingerprint: Fingerprint,
        client: Client,
        origin: Origin,
    ) -> Link {
        Link {
            name,
            fingerprint,
            client,
            origin: std::sync::Mutex::new(origin),
            state: watch::channel(LinkState::Up).0,
            closing: AtomicBool::new(false),
        }
    }

    pub(crate) fn origin(&self) -> Origin {
        self.origin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// From now on, when lost, this link is kept up by connecting to
    /// `address` (as if made by [`Peer::connect`](crate::Peer::connect)),
    /// unless it is kept up at an address already.
    pub(crate) fn keep_up_at(&self, address: Address) {
        let mut origin = self.origin.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*origin, Origin::Learned) {
            *origin = Origin::Address(address);
        }
    }

    pub(crate) fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    fn set_state(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    /// Closes the link for good: its client says goodbye, its task ends.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.set_state(LinkState::Down);
        self.client.close();
    }

    /// Waits until the link is no longer up (its task noticed the connection
    /// is lost), or until `deadline`.
    pub(crate) async fn left_up(&self, deadline: Instant) {
        let mut rx = self.state.subscribe();
        let _ =
            tokio::time::timeout_at(deadline.into(), rx.wait_for(|s| *s != LinkState::Up)).await;
    }

    /// Waits while the link reconnects, until `deadline`.
    pub(crate) async fn settled(&self, deadline: Instant) -> LinkState {
        let mut rx = self.state.subscribe();
        let wait = async {
            let _ = rx.wait_for(|s| *s != LinkState::Reconnecting).await;
        };
        // The sender lives as long as the link; a timeout leaves it
        // reconnecting.
        let _ = tokio::time::timeout_at(deadline.into(), wait).await;
        self.state()
    }
}

/// A connection made and greeted, not yet in the directory.
pub(crate) struct Established {
    pub(crate) client: Client,
    /// The other peer as its greeting says.
    pub(crate) info: PeerInfo,
    /// The address it was reached at, as given.
    pub(crate) target: Address,
}

/// Connects to the first of `targets` that answers, trusting its certificate
/// as `trust` says, and greets it: this peer's greeting goes in, the other's
/// comes back.
pub(crate) async fn establish(
    inner: &Inner,
    targets: &[Address],
    trust: &ClientTls,
    deadline: Instant,
) -> Result<Established, PeerError> {
    let mut last_error = None;
    for target in targets {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let client = inner.client_builder(target, trust).build();
        let connected = tokio::time::timeout(remaining, client.connect()).await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                last_error = Some(PeerError::Connect {
                    target: target.to_string(),
                    error: Box::new(error),
                });
                continue;
            }
            Err(_) => {
                client.close();
                last_error = Some(PeerError::Connect {
                    target: target.to_string(),
                    error: Box::new(teleport_client::Error::Call(
                        teleport_client::CallError::NotConnected {
                            waited: remaining,
                            last_error: None,
                        },
                    )),
                });
                continue;
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match greet(inner, &client, &target.to_string(), target, remaining).await {
            Ok(info) => {
                return Ok(Established {
                    client,
                    info,
                    target: target.clone(),
                })
            }
            Err(error) => {
                client.close();
                // A refusal says something about this peer, not the address.
                if error.is_refusal() {
                    return Err(error);
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| PeerError::Connect {
        target: targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        error: Box::new(teleport_client::Error::Call(
            teleport_client::CallError::NotConnected {
                waited: Duration::ZERO,
                last_error: Some("no address to connect to, or no time left".into()),
            },
        )),
    }))
}

/// Calls `_peer.hello` on a connected client and checks the reply.
pub(crate) async fn greet(
    inner: &Inner,
    client: &Client,
    from: &str,
    target: &Address,
    timeout: Duration,
) -> Result<PeerInfo, PeerError> {
    let args = to_tree(&Greeting::of(&inner.own_info())).map_err(|e| PeerError::Greeting {
        from: "this peer".into(),
        message: e.to_string(),
    })?;
    let reply = client
        .call_with_timeout(HELLO, args, timeout)
        .await
        .map_err(|error| refusal_or(inner, from, error))?;
    let bad = |message: String| PeerError::Greeting {
        from: from.to_owned(),
        message,
    };
    let greeting: Greeting = from_tree(reply).map_err(|e| bad(e.to_string()))?;
    let seen_from = match &target.host {
        teleport_quic::Host::Ip(ip) => Some(*ip),
        _ => None,
    };
    greeting.check(seen_from).map_err(bad)
}

/// A hello call's error as the refusal it carries, if it is one.
fn refusal_or(inner: &Inner, from: &str, error: teleport_client::Error) -> PeerError {
    let Some(remote) = error.remote() else {
        return PeerError::Connect {
            target: from.to_owned(),
            error: Box::new(error),
        };
    };
    match remote.type_name.as_str() {
        NAME_CLASH_TYPE => PeerError::NameClash {
            name: inner.name.clone(),
            refused_by: from.to_owned(),
            message: remote.message.clone(),
        },
        UNTRUSTED_TYPE => PeerError::Untrusted {
            name: inner.name.clone(),
            fingerprint: inner.fingerprint.to_string(),
            reason: remote.message.clone(),
        },
        _ => PeerError::Connect {
            target: from.to_owned(),
            error: Box::new(error),
        },
    }
}

/// Keeps `link` up: when its connection is lost, reconnects and greets
/// again within the liveness timeout; past that the link is down, the
/// directory forgets it, and a link to an address starts connecting to the
/// address again.
pub(crate) async fn watch(inner: Weak<Inner>, link: Arc<Link>) {
    loop {
        let reason = link.client.closed().await;
        if link.closing.load(Ordering::Acquire) {
            return;
        }
        let Some(peer) = inner.upgrade() else { return };
        if peer.is_closed() {
            return;
        }
        link.set_state(LinkState::Reconnecting);
        tracing::info!(peer = %link.name, %reason, "lost the connection to a peer; reconnecting");
        let liveness = peer.settings.liveness_timeout;
        let back = tokio::time::timeout(liveness, async {
            link.client.connect().await.ok()?;
            let target = match link.origin() {
                Origin::Address(address) => address,
                Origin::Learned => Address::new(teleport_quic::Host::Unspecified, 0),
            };
            let info = greet(&peer, &link.client, &link.name, &target, liveness)
                .await
                .ok()?;
            // Whoever answers must still be the same peer.
            (info.name == link.name && info.fingerprint == link.fingerprint).then_some(())
        })
        .await;
        if let Ok(Some(())) = back {
            tracing::info!(peer = %link.name, "reconnected to a peer");
            link.set_state(LinkState::Up);
            continue;
        }
        tracing::info!(
            peer = %link.name,
            "a peer did not come back within {liveness:?}; its name will be looked up again"
        );
        peer.link_lost(&link);
        link.close();
        if let Origin::Address(address) = link.origin() {
            drop(peer);
            keep_up(inner, address).await;
        }
        return;
    }
}

/// The longest wait between attempts while an address does not answer.
const KEEP_UP_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest wait between attempts while the peer there refuses this one
/// (a name clash, an untrusted certificate): that takes a person to fix.
const KEEP_UP_REFUSED_BACKOFF: Duration = Duration::from_secs(60);

/// Connects to `address` again and again, backing off up to 5 s (60 s while
/// the peer there refuses this one), until a peer answers there or this peer
/// closes: what keeps a connection made with
/// [`Peer::connect`](crate::Peer::connect) up.
async fn keep_up(inner: Weak<Inner>, address: Address) {
    let mut backoff = Duration::from_millis(50);
    let mut refused_before = false;
    loop {
        tokio::time::sleep(backoff).await;
        let Some(peer) = inner.upgrade() else { return };
        if peer.is_closed() {
            return;
        }
        let deadline = deadline_in(peer.settings.connect_timeout);
        match peer.connect_address(address.clone(), deadline).await {
            Ok(name) => {
                tracing::info!(%address, peer = %name, "connected to the address again");
                return;
            }
            Err(error) if error.is_refusal() => {
                // Said once, not every attempt.
                if !refused_before {
                    tracing::warn!(
                        %address,
                        %error,
                        "the peer at an address this peer keeps up refuses it (or is not \
                         trusted); trying again every {KEEP_UP_REFUSED_BACKOFF:?}"
                    );
                }
                refused_before = true;
                backoff = (backoff * 4).min(KEEP_UP_REFUSED_BACKOFF);
            }
            Err(error) => {
                tracing::debug!(%address, %error, "the address does not answer yet; trying again");
                refused_before = false;
                backoff = (backoff * 2).min(KEEP_UP_MAX_BACKOFF);
            }
        }
    }
}
