//! Calls by name: the link to a name (known here, or found through the
//! peers this one knows), and the call on it, all within the call's timeout.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use teleport_protocol::Tree;

use crate::error::PeerError;
use crate::inner::{deadline_in, lock, Inner};
use crate::link::{Link, LinkState};

impl Inner {
    /// Calls `method` on the peer called `peer`, finding it first if need
    /// be, all within `timeout`.
    pub(crate) async fn call(
        self: Arc<Self>,
        peer: String,
        method: String,
        args: Tree,
        timeout: Duration,
    ) -> Result<Tree, PeerError> {
        if peer == self.name {
            return Err(PeerError::OwnName(peer));
        }
        let deadline = deadline_in(timeout);
        let timed_out = |while_doing: &str| PeerError::TimedOut {
            peer: peer.clone(),
            method: method.clone(),
            timeout,
            while_doing: while_doing.into(),
        };
        loop {
            let found = tokio::time::timeout_at(deadline.into(), self.link_to(&peer, deadline));
            let link = match found.await {
                Ok(link) => link?,
                Err(_) => return Err(timed_out("finding and connecting to the peer")),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(timed_out("connecting to the peer"));
            }
            match link
                .client
                .call_with_timeout(method.clone(), args.clone(), remaining)
                .await
            {
                Ok(reply) => return Ok(reply),
                // Never sent (the link was lost just before): safe to send
                // again once the peer is found again. The link may still read
                // up until its task notices: wait for that, not spin.
                Err(teleport_client::Error::NotConnected { .. })
                | Err(teleport_client::Error::Call(teleport_client::CallError::NotConnected {
                    ..
                })) => {
                    link.left_up(deadline).await;
                    continue;
                }
                Err(error) => {
                    return Err(PeerError::Call {
                        peer,
                        method,
                        error: Box::new(error),
                    })
                }
            }
        }
    }

    /// A link to the peer called `name`: known, or found through the peers
    /// this peer knows, until `deadline`.
    async fn link_to(
        self: &Arc<Self>,
        name: &str,
        deadline: Instant,
    ) -> Result<Arc<Link>, PeerError> {
        let started = Instant::now();
        let mut last_error: Option<PeerError> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.link_known(name, deadline).await {
                Ok(Some(link)) => return Ok(link),
                Ok(None) => {}
                Err(e) if e.is_refusal() || matches!(e, PeerError::Closed) => return Err(e),
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                return Err(last_error.unwrap_or_else(|| PeerError::NotFound {
                    name: name.to_owned(),
                    waited: started.elapsed(),
                    asked: 0,
                    last_error: None,
                }));
            }
            let found = self
                .find(
                    name,
                    deadline,
                    self.settings.max_hops,
                    vec![self.name.clone()],
                    true,
                )
                .await?;
            let Some(info) = found else {
                continue; // known here now: link_known takes it
            };
            let gate = self.gate(name);
            let Ok(_turn) = tokio::time::timeout_at(deadline.into(), gate.lock()).await else {
                continue;
            };
            // Another call may have made the link while this one waited.
            if let Some(link) = self.up_link(name) {
                return Ok(link);
            }
            match self.open_learned(&info, deadline).await {
                Ok(link) => return Ok(link),
                Err(e) if e.is_refusal() => return Err(e),
                Err(e) => {
                    tracing::debug!(peer = name, error = %e, "the peer found does not answer");
                    last_error = Some(e);
                    let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A link to `name` if this peer knows where it is: the one there, the
    /// one reconnecting (waited for), or a new one to the addresses it knows.
    /// `Ok(None)` if the name must be looked up.
    pub(crate) async fn link_known(
        self: &Arc<Self>,
        name: &str,
        deadline: Instant,
    ) -> Result<Option<Arc<Link>>, PeerError> {
        loop {
            if self.is_closed() {
                return Err(PeerError::Closed);
            }
            let snapshot = lock(&self.directory)
                .get(name)
                .map(|e| (e.info.clone(), e.link.clone(), e.lost));
            match snapshot {
                Some((_, Some(link), _)) => match link.state() {
                    LinkState::Up => return Ok(Some(link)),
                    LinkState::Reconnecting => {
                        if link.settled(deadline).await == LinkState::Reconnecting {
                            return Ok(None);
                        }
                    }
                    LinkState::Down => self.link_lost(&link),
                },
                Some((info, None, false)) if !info.addrs.is_empty() => {
                    let gate = self.gate(name);
                    let Ok(_turn) = tokio::time::timeout_at(deadline.into(), gate.lock()).await
                    else {
                        return Ok(None);
                    };
                    let still_unlinked = lock(&self.directory)
                        .get(name)
                        .is_some_and(|e| e.link.is_none() && !e.lost);
                    if !still_unlinked {
                        continue; // another call made the link meanwhile
                    }
                    let bounded = deadline.min(deadline_in(self.settings.liveness_timeout));
                    match self.open_learned(&info, bounded).await {
                        Ok(link) => return Ok(Some(link)),
                        Err(error) if error.is_refusal() => return Err(error),
                        Err(error) => {
                            tracing::debug!(peer = name, %error, "a known peer does not answer");
                            if let Some(entry) = lock(&self.directory).get_mut(name) {
                                if entry.info == info && entry.link.is_none() {
                                    entry.lost = true;
                                }
                            }
                            return Err(error);
                        }
                    }
                }
                _ => return Ok(None),
            }
        }
    }

    fn gate(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.gates);
        // Only gates some call holds or waits for stay: the map is as large
        // as the number of names being connected to now.
        gates.retain(|_, gate| gate.strong_count() > 0);
        if let Some(gate) = gates.get(name).and_then(Weak::upgrade) {
            return gate;
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        gates.insert(name.to_owned(), Arc::downgrade(&gate));
        gate
    }
}
