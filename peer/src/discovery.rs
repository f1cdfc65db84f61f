//! Discovery: finding a peer by name through the peers this one knows
//! (`_peer.lookup`), and answering their questions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use teleport_protocol::{from_tree, to_tree, Tree};
use teleport_server::{Context, HandlerError};

use crate::error::PeerError;
use crate::greeting::{Greeting, LookupReply, LookupRequest, PeerInfo, LOOKUP};
use crate::link::LinkState;
use crate::peer::{lock, Inner};

/// The first wait between rounds of questions, doubled each round.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Inner {
    /// Finds where the peer called `name` is, asking the peers this one
    /// knows `lookup_fanout` at a time (connected ones first), until one
    /// answers. With `retry`, asks again in rounds with backoff until
    /// `deadline`; without, makes one round (a question passed on).
    pub(crate) async fn find(
        self: &Arc<Self>,
        name: &str,
        deadline: Instant,
        hops: u32,
        path: Vec<String>,
        retry: bool,
    ) -> Result<PeerInfo, PeerError> {
        let started = Instant::now();
        let mut asked = 0;
        let mut last_error: Option<String> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            for batch in self
                .candidates(name, &path)
                .chunks(self.settings.lookup_fanout)
            {
                let mut asks: FuturesUnordered<_> = batch
                    .iter()
                    .map(|candidate| self.ask(candidate, name, hops, &path, deadline))
                    .collect();
                while let Some(answer) = asks.next().await {
                    asked += 1;
                    match answer {
                        Ok(Some(info)) => return Ok(info),
                        Ok(None) => {}
                        Err(error) => last_error = Some(error),
                    }
                }
            }
            let now = Instant::now();
            if !retry || now >= deadline || self.is_closed() {
                return Err(PeerError::NotFound {
                    name: name.to_owned(),
                    waited: started.elapsed(),
                    asked,
                    last_error,
                });
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The peers to ask about `name`: every peer known and not lost but
    /// `name` itself and those the question passed through, connected ones
    /// first.
    fn candidates(&self, name: &str, path: &[String]) -> Vec<String> {
        let directory = lock(&self.directory);
        let mut candidates: Vec<(bool, String)> = directory
            .iter()
            .filter(|(n, e)| {
                n.as_str() != name
                    && !path.contains(n)
                    && !e.lost
                    && (e.link.is_some() || !e.info.addrs.is_empty())
            })
            .map(|(n, e)| {
                let up = e.link.as_ref().is_some_and(|l| l.state() == LinkState::Up);
                (!up, n.clone())
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, n)| n).collect()
    }

    /// Asks `candidate` whether it knows `name`. An answer is checked: the
    /// name asked, a fingerprint, an address, and not a fingerprint other
    /// than the one this peer pins the name to.
    async fn ask(
        self: &Arc<Self>,
        candidate: &str,
        name: &str,
        hops: u32,
        path: &[String],
        deadline: Instant,
    ) -> Result<Option<PeerInfo>, String> {
        let bounded = deadline.min(Instant::now() + self.settings.lookup_timeout);
        let link = match self.link_known(candidate, bounded).await {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(None),
            Err(error) => return Err(format!("asking {candidate:?}: {error}")),
        };
        let request = LookupRequest {
            name: name.to_owned(),
            hops,
            path: path.to_vec(),
        };
        let args = to_tree(&request).map_err(|e| e.to_string())?;
        let remaining = bounded.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(None);
        }
        let reply = link
            .client
            .call_with_timeout(LOOKUP, args, remaining)
            .await
            .map_err(|e| format!("asking {candidate:?}: {e}"))?;
        let reply: LookupReply = from_tree(reply).map_err(|e| e.to_string())?;
        let Some(found) = reply.found else {
            return Ok(None);
        };
        let info = found
            .check(None)
            .map_err(|e| format!("{candidate:?} answered with a bad greeting: {e}"))?;
        if info.name != name || info.addrs.is_empty() {
            return Err(format!(
                "{candidate:?} answered about {:?} at {:?} when asked about {name:?}",
                info.name, info.addrs
            ));
        }
        if let Some(pin) = self.settings.pins.get(name) {
            if *pin != info.fingerprint {
                return Err(format!(
                    "{candidate:?} introduced {name:?} with certificate {}, but this peer pins \
                     it to {pin}",
                    info.fingerprint
                ));
            }
        }
        tracing::debug!(peer = name, by = candidate, addrs = ?info.addrs, "found a peer");
        Ok(Some(info))
    }

    /// `_peer.lookup`: another peer asks whether this one knows a name. It
    /// answers with what it knows, or passes the question on (one round)
    /// while hops are left.
    pub(crate) async fn on_lookup(
        self: Arc<Self>,
        args: Tree,
        ctx: Context,
    ) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadLookup", message);
        let request: LookupRequest = from_tree(args).map_err(|e| bad(e.to_string()))?;
        crate::greeting::check_name(&request.name).map_err(bad)?;
        let known = if request.name == self.name {
            Some(self.own_info())
        } else {
            lock(&self.directory)
                .get(&request.name)
                .filter(|e| !e.lost && !e.info.addrs.is_empty())
                .map(|e| e.info.clone())
        };
        let found = match known {
            Some(info) => Some(info),
            None if request.hops > 0 => {
                let mut path = request.path;
                path.truncate(16);
                path.push(self.name.clone());
                let deadline = ctx
                    .deadline()
                    .unwrap_or_else(|| Instant::now() + self.settings.lookup_timeout)
                    .min(Instant::now() + self.settings.lookup_timeout);
                self.find(&request.name, deadline, request.hops - 1, path, false)
                    .await
                    .ok()
            }
            None => None,
        };
        let reply = LookupReply {
            found: found.as_ref().map(Greeting::of),
        };
        to_tree(&reply).map_err(|e| bad(e.to_string()))
    }
}
