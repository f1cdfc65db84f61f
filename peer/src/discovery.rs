//! Discovery: finding a peer by name through the peers this one knows
//! (`_peer.lookup`), and answering their questions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use teleport_protocol::{from_tree, to_tree, Tree};
use teleport_server::{Context, HandlerError};

use crate::error::PeerError;
use crate::greeting::{Greeting, LookupReply, LookupRequest, PeerInfo, LOOKUP};
use crate::inner::{deadline_in, lock, Inner};
use crate::link::LinkState;

/// The first wait between rounds of questions, doubled each round.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The most names a question's path may hold; a longer one is refused (a
/// path is never cut, so a question cannot come back to a peer it passed).
pub(crate) const MAX_PATH: usize = 16;

impl Inner {
    /// Finds where the peer called `name` is, asking the peers this one
    /// knows `lookup_fanout` at a time (connected ones first), until one
    /// answers. With `retry` (this peer's own question), asks again in
    /// rounds with backoff until `deadline`, connecting to known peers as
    /// needed; without (a question passed on for another peer), asks only
    /// peers this one has a link up to, at most `lookup_fanout` of them,
    /// once, and opens no connection. `Ok(None)`: while this peer searched,
    /// the name became known here directly (a greeting, a connection to an
    /// address kept up): look in the directory again.
    pub(crate) async fn find(
        self: &Arc<Self>,
        name: &str,
        deadline: Instant,
        hops: u32,
        path: Vec<String>,
        retry: bool,
    ) -> Result<Option<PeerInfo>, PeerError> {
        let started = Instant::now();
        let mut asked = 0;
        let mut last_error: Option<String> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut candidates = self.candidates(name, &path, !retry);
            if !retry {
                candidates.truncate(self.settings.lookup_fanout);
            }
            for batch in candidates.chunks(self.settings.lookup_fanout) {
                let mut asks: FuturesUnordered<_> = batch
                    .iter()
                    .map(|candidate| self.ask(candidate, name, hops, &path, deadline, !retry))
                    .collect();
                while let Some(answer) = asks.next().await {
                    asked += 1;
                    match answer {
                        Ok(Some(info)) => return Ok(Some(info)),
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
            let known_here = lock(&self.directory)
                .get(name)
                .is_some_and(|e| !e.lost && (e.link.is_some() || !e.info.addrs.is_empty()));
            if known_here {
                return Ok(None);
            }
        }
    }

    /// The peers to ask about `name`: every peer known and not lost (with
    /// `linked_only`, every peer with a link up) but `name` itself and those
    /// the question passed through, connected ones first.
    fn candidates(&self, name: &str, path: &[String], linked_only: bool) -> Vec<String> {
        let directory = lock(&self.directory);
        let mut candidates: Vec<(bool, String)> = directory
            .iter()
            .filter(|(n, e)| {
                let up = e.link.as_ref().is_some_and(|l| l.state() == LinkState::Up);
                n.as_str() != name
                    && !path.contains(n)
                    && !e.lost
                    && (up || (!linked_only && (e.link.is_some() || !e.info.addrs.is_empty())))
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
        linked_only: bool,
    ) -> Result<Option<PeerInfo>, String> {
        let bounded = deadline.min(deadline_in(self.settings.lookup_timeout));
        let link = if linked_only {
            match self.up_link(candidate) {
                Some(link) => link,
                None => return Ok(None),
            }
        } else {
            match self.link_known(candidate, bounded).await {
                Ok(Some(link)) => link,
                Ok(None) => return Ok(None),
                Err(error) => return Err(format!("asking {candidate:?}: {error}")),
            }
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
    /// answers with what it knows, or passes the question on (one round, to
    /// peers it has a link up to) while hops are left: no more than this
    /// peer's own `max_hops`, whatever the question says.
    pub(crate) async fn on_lookup(
        self: Arc<Self>,
        args: Tree,
        ctx: Context,
    ) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadLookup", message);
        let request: LookupRequest = from_tree(args).map_err(|e| bad(e.to_string()))?;
        crate::greeting::check_name(&request.name).map_err(bad)?;
        if request.path.len() > MAX_PATH {
            return Err(bad(format!(
                "the question passed through {} peers; at most {MAX_PATH} are allowed",
                request.path.len()
            )));
        }
        for name in &request.path {
            crate::greeting::check_name(name).map_err(bad)?;
        }
        let hops = request.hops.min(self.settings.max_hops);
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
            None if hops > 0 && request.path.len() < MAX_PATH => {
                let mut path = request.path;
                path.push(self.name.clone());
                let bound = deadline_in(self.settings.lookup_timeout);
                let deadline = ctx.deadline().map_or(bound, |d| d.min(bound));
                self.find(&request.name, deadline, hops - 1, path, false)
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        let reply = LookupReply {
            found: found.as_ref().map(Greeting::of),
        };
        to_tree(&reply).map_err(|e| bad(e.to_string()))
    }
}
