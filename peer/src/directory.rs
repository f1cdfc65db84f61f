//! The directory of the peers this one knows: what it knows about each,
//! and who may hold a name (claims, checks, liveness probes of a holder).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use teleport_client::ClientTls;
use teleport_quic::{Address, Fingerprint};

use crate::error::PeerError;
use crate::greeting::PeerInfo;
use crate::inner::{addresses, deadline_in, lock, Inner};
use crate::link::{self, Link, LinkState};

/// What this peer knows about another.
pub(crate) struct Entry {
    pub(crate) info: PeerInfo,
    /// This peer's connection to it, if one is made.
    pub(crate) link: Option<Arc<Link>>,
    /// Its connection was lost and did not come back: the name must be found
    /// again, and another identity may take it.
    pub(crate) lost: bool,
    /// The connection to this peer's server its greeting came over, while
    /// that connection lasts (the number of
    /// [`Context::connection_id`](teleport_server::Context::connection_id)).
    pub(crate) greeted_on: Option<u64>,
}

impl Entry {
    /// Whether the directory may forget this entry to make room: nothing of
    /// this peer's uses it (no link) and the peer is not connected here.
    fn evictable(&self) -> bool {
        self.lost || (self.link.is_none() && self.greeted_on.is_none())
    }
}

/// A name being checked for a certificate ([`Inner::check_name`]): while
/// it is held, other certificates claiming the name are refused, so that
/// two claims cannot both pass the check. Dropping it ends the claim.
pub(crate) struct Claim<'a> {
    inner: &'a Inner,
    name: String,
    fingerprint: Fingerprint,
    /// The certificate of a holder found gone, which this claim may replace.
    replaces: Option<Fingerprint>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = lock(&self.inner.claims);
        if let Some((_, count)) = claims.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                claims.remove(&self.name);
            }
        }
    }
}

impl Claim<'_> {
    /// Puts `entry` in the directory under the claimed name, if the name is
    /// still free for it: held by nobody, by the same certificate, by one
    /// lost, or by the holder the check found gone. Makes room by forgetting
    /// an evictable entry when the directory is full. Returns the entry it
    /// replaced.
    pub(crate) fn commit(
        &self,
        directory: &mut HashMap<String, Entry>,
        entry: Entry,
    ) -> Result<Option<Entry>, PeerError> {
        debug_assert_eq!(entry.info.name, self.name);
        match directory.get(&self.name) {
            Some(held)
                if held.info.fingerprint != self.fingerprint
                    && !held.lost
                    && Some(held.info.fingerprint) != self.replaces =>
            {
                return Err(PeerError::NameClash {
                    name: self.name.clone(),
                    refused_by: "this peer".into(),
                    message: format!(
                        "the peer with certificate {} took the name while the claim of {} \
                         was being checked",
                        held.info.fingerprint, self.fingerprint
                    ),
                });
            }
            Some(_) => {}
            None => {
                let limit = self.inner.settings.max_peers;
                if directory.len() >= limit {
                    let victim = directory
                        .iter()
                        .filter(|(_, e)| e.evictable())
                        .min_by_key(|(_, e)| !e.lost)
                        .map(|(n, _)| n.clone());
                    match victim {
                        Some(victim) => {
                            tracing::debug!(peer = %victim, "forgot a peer to make room");
                            directory.remove(&victim);
                        }
                        None => return Err(PeerError::DirectoryFull { limit }),
                    }
                }
            }
        }
        Ok(directory.insert(self.name.clone(), entry))
    }
}

impl Inner {
    /// The link to `name`, if there is one and it is up.
    pub(crate) fn up_link(&self, name: &str) -> Option<Arc<Link>> {
        lock(&self.directory)
            .get(name)
            .and_then(|e| e.link.clone())
            .filter(|l| l.state() == LinkState::Up)
    }

    /// Whether `info` may hold its name here: not this peer's own name, not
    /// pinned to another fingerprint, not claimed by another certificate
    /// right now, and not held by another identity that still answers (one
    /// whose connection was lost for good may be replaced: that is how a
    /// restarted peer takes its name back). The returned claim keeps other
    /// certificates off the name until the entry is put in the directory
    /// with [`Claim::commit`], which checks again under the lock.
    pub(crate) async fn check_name(&self, info: &PeerInfo) -> Result<Claim<'_>, PeerError> {
        let clash = |message: String| PeerError::NameClash {
            name: info.name.clone(),
            refused_by: "this peer".into(),
            message,
        };
        if info.name == self.name {
            return Err(clash(if info.fingerprint == self.fingerprint {
                "that is this peer itself (it connected to its own address)".into()
            } else {
                format!(
                    "it is this peer's own name; the other peer has certificate {}",
                    info.fingerprint
                )
            }));
        }
        if let Some(pin) = self.settings.pins.get(&info.name) {
            if *pin != info.fingerprint {
                return Err(PeerError::pinned_elsewhere(
                    info.name.clone(),
                    info.fingerprint,
                    *pin,
                ));
            }
        }
        let mut claim = {
            let mut claims = lock(&self.claims);
            match claims.get_mut(&info.name) {
                Some((other, _)) if *other != info.fingerprint => {
                    return Err(clash(format!(
                        "the certificate {other} is claiming it right now; refused the \
                         certificate {}",
                        info.fingerprint
                    )));
                }
                Some((_, count)) => *count += 1,
                None => {
                    claims.insert(info.name.clone(), (info.fingerprint, 1));
                }
            }
            Claim {
                inner: self,
                name: info.name.clone(),
                fingerprint: info.fingerprint,
                replaces: None,
            }
        };
        let holder = lock(&self.directory)
            .get(&info.name)
            .filter(|e| e.info.fingerprint != info.fingerprint && !e.lost)
            .map(|e| (e.info.clone(), e.link.clone()));
        let Some((held, link)) = holder else {
            return Ok(claim);
        };
        let refused = || {
            clash(format!(
                "it is held by the peer with certificate {} at {:?}, which still answers; \
                 refused the certificate {}",
                held.fingerprint, held.addrs, info.fingerprint
            ))
        };
        // A holder that answered lately is not asked again: claims cannot
        // make this peer connect out at their pace.
        let liveness = self.settings.liveness_timeout;
        let answered = lock(&self.probed).get(&info.name).copied();
        if answered.is_some_and(|at| at.elapsed() < liveness) {
            return Err(refused());
        }
        if self.holder_alive(&held, link).await {
            let mut probed = lock(&self.probed);
            probed.retain(|_, at| at.elapsed() < liveness);
            probed.insert(info.name.clone(), Instant::now());
            return Err(refused());
        }
        tracing::info!(
            name = %info.name,
            "the peer that held this name no longer answers; a new identity takes it"
        );
        claim.replaces = Some(held.fingerprint);
        Ok(claim)
    }

    /// Whether the peer in `held` still answers under its name, asked
    /// within the liveness timeout.
    async fn holder_alive(&self, held: &PeerInfo, link: Option<Arc<Link>>) -> bool {
        let liveness = self.settings.liveness_timeout;
        if let Some(link) = link.filter(|l| l.state() == LinkState::Up) {
            let target = Address::new(teleport_quic::Host::Unspecified, 0);
            return match link::greet(self, &link.client, &held.name, &target, liveness).await {
                Ok(info) => info.name == held.name && info.fingerprint == held.fingerprint,
                Err(_) => false,
            };
        }
        let targets = addresses(&held.addrs);
        if targets.is_empty() {
            // It cannot be called, so it holds the name for nobody.
            return false;
        }
        let trust = ClientTls::pinned(held.fingerprint);
        match link::establish(self, &targets, &trust, deadline_in(liveness)).await {
            Ok(established) => {
                established.client.close();
                established.info.name == held.name
            }
            Err(_) => false,
        }
    }

    /// The directory forgets a link lost for good (if it is still the one
    /// there): the name must be found again.
    pub(crate) fn link_lost(&self, link: &Arc<Link>) {
        let mut directory = lock(&self.directory);
        if let Some(entry) = directory.get_mut(&link.name) {
            if entry.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                entry.link = None;
                entry.lost = true;
            }
        }
    }
}
