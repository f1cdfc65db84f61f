//! Connecting out: a link to an address
//! ([`Peer::connect`](crate::Peer::connect)) or to a peer known by name,
//! admitted once the name its greeting gives is checked, or refused (and
//! the other side told why).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use teleport_client::ClientTls;
use teleport_protocol::to_tree;
use teleport_quic::{Address, Fingerprint};

use crate::directory::{Claim, Entry};
use crate::error::{PeerError, Refusal, RefusalKind, NAME_CLASH_TYPE, UNTRUSTED_TYPE};
use crate::greeting::{PeerInfo, RefuseNotice, REFUSE};
use crate::inner::{addresses, lock, Inner};
use crate::link::{self, Established, Link, LinkState, Origin};

impl Inner {
    /// Connects to `address`, trusting whoever answers as the trust rules
    /// say, and keeps the connection up. Returns the peer's name.
    pub(crate) async fn connect_address(
        self: &Arc<Self>,
        address: Address,
        deadline: Instant,
    ) -> Result<String, PeerError> {
        // First connection: trust any pinned certificate (or, with
        // `accept_any`, any certificate) to learn who answers there.
        let pins: Vec<Fingerprint> = self.settings.pins.values().copied().collect();
        let probe_trust = if self.settings.accept_any {
            ClientTls::insecure_skip_verification()
        } else if pins.is_empty() {
            return Err(PeerError::Untrusted {
                name: format!("the peer at {address}"),
                fingerprint: "unknown".into(),
                reason: "no certificate is pinned and accept_any is off, so no certificate \
                         could be trusted: pin the peer with PeerBuilder::trust(name, \
                         fingerprint), or opt in with PeerBuilder::accept_any()"
                    .into(),
            });
        } else {
            ClientTls::pinned_any(pins.iter().copied())
        };
        let targets = [address.clone()];
        let probe = link::establish(self, &targets, &probe_trust, deadline).await?;
        let info = probe.info.clone();
        match self.settings.pins.get(&info.name) {
            Some(pin) if *pin == info.fingerprint => {}
            Some(pin) => {
                probe.client.close();
                return Err(PeerError::pinned_elsewhere(
                    info.name,
                    info.fingerprint,
                    *pin,
                ));
            }
            None if self.settings.accept_any => {}
            None => {
                probe.client.close();
                return Err(PeerError::Untrusted {
                    name: info.name.clone(),
                    fingerprint: info.fingerprint.to_string(),
                    reason: format!(
                        "the name is not pinned: pin it with PeerBuilder::trust({:?}, \"{}\"), \
                         or opt in with PeerBuilder::accept_any()",
                        info.name, info.fingerprint
                    ),
                });
            }
        }
        // The link itself is pinned to exactly the certificate the name is
        // trusted with: the probe may have trusted several.
        let exact = !self.settings.accept_any && pins.iter().all(|p| *p == info.fingerprint);
        let established = if exact {
            probe
        } else {
            probe.client.close();
            let trust = ClientTls::pinned(info.fingerprint);
            let established = link::establish(self, &targets, &trust, deadline).await?;
            if established.info.name != info.name {
                established.client.close();
                return Err(PeerError::Greeting {
                    from: address.to_string(),
                    message: format!(
                        "it said it was {:?}, then {:?}",
                        info.name, established.info.name
                    ),
                });
            }
            established
        };
        let link = self.admit(established, Origin::Address(address)).await?;
        Ok(link.name.clone())
    }

    /// Opens a link to a peer known by name (from a greeting or a lookup),
    /// pinned to the certificate it is known by.
    pub(crate) async fn open_learned(
        self: &Arc<Self>,
        info: &PeerInfo,
        deadline: Instant,
    ) -> Result<Arc<Link>, PeerError> {
        let trust = ClientTls::pinned(info.fingerprint);
        let established = link::establish(self, &addresses(&info.addrs), &trust, deadline).await?;
        if established.info.name != info.name || established.info.fingerprint != info.fingerprint {
            established.client.close();
            return Err(PeerError::Greeting {
                from: format!("{:?}", info.addrs),
                message: format!(
                    "expected the peer {:?}, found {:?} there",
                    info.name, established.info.name
                ),
            });
        }
        self.admit(established, Origin::Learned).await
    }

    /// Checks the name of a greeted connection and installs it, or refuses
    /// it and tells the other side why.
    async fn admit(
        self: &Arc<Self>,
        mut established: Established,
        origin: Origin,
    ) -> Result<Arc<Link>, PeerError> {
        let claim = match self.check_name(&established.info).await {
            Ok(claim) => claim,
            Err(error) => {
                self.tell_refused(&established, &error).await;
                established.client.close();
                return Err(error);
            }
        };
        if established.info.addrs.is_empty() {
            if let teleport_quic::Host::Ip(ip) = established.target.host {
                // A peer that listens where it was reached, though its
                // greeting named no address this peer could use.
                established
                    .info
                    .addrs
                    .push(SocketAddr::new(ip, established.target.port));
            }
        }
        self.install(&claim, established, origin)
    }

    /// Tells the other side of a refused connection why (`_peer.refuse`), so
    /// that it sees the error too; best effort.
    async fn tell_refused(&self, established: &Established, error: &PeerError) {
        let (kind, name, message) = match error {
            PeerError::NameClash { name, message, .. } => (NAME_CLASH_TYPE, name, message.clone()),
            PeerError::Untrusted { name, reason, .. } => (UNTRUSTED_TYPE, name, reason.clone()),
            _ => return,
        };
        self.record_refusal(Refusal {
            kind: RefusalKind::of_type(kind),
            name: name.clone(),
            fingerprint: Some(established.info.fingerprint),
            from: None,
            refused_by: "this peer".into(),
            message: message.clone(),
        });
        let notice = RefuseNotice {
            refused_by: self.name.clone(),
            kind: kind.into(),
            name: name.clone(),
            message,
        };
        if let Ok(args) = to_tree(&notice) {
            let timeout = self.settings.liveness_timeout;
            let _ = established
                .client
                .call_with_timeout(REFUSE, args, timeout)
                .await;
        }
    }

    /// Puts a greeted connection in the directory and starts its task. A
    /// link that is up to the same certificate stays (the new connection is
    /// closed and the one there returned): calls on it must not fail because
    /// a second connection was made meanwhile.
    fn install(
        self: &Arc<Self>,
        claim: &Claim<'_>,
        established: Established,
        origin: Origin,
    ) -> Result<Arc<Link>, PeerError> {
        let Established { client, info, .. } = established;
        let mut directory = lock(&self.directory);
        // Checked under the directory's lock: `close` marks the peer closed
        // before it empties the directory, so a link made while it closed is
        // either refused here or emptied out by it, never left behind.
        if self.is_closed() {
            drop(directory);
            client.close();
            return Err(PeerError::Closed);
        }
        let existing = directory.get(&info.name);
        if let Some(up) = existing
            .filter(|e| e.info.fingerprint == info.fingerprint)
            .and_then(|e| e.link.clone())
            .filter(|l| l.state() == LinkState::Up)
        {
            drop(directory);
            client.close();
            // `connect` to a peer already linked by name: the link it gets
            // must keep the address up, as `connect` promises.
            if let Origin::Address(address) = origin {
                up.keep_up_at(address);
            }
            return Ok(up);
        }
        // A link replaced keeps its promise to keep an address up.
        let origin = match (origin, existing.and_then(|e| e.link.as_ref())) {
            (Origin::Learned, Some(old)) if matches!(old.origin(), Origin::Address(_)) => {
                old.origin()
            }
            (origin, _) => origin,
        };
        let greeted_on = existing
            .filter(|e| e.info.fingerprint == info.fingerprint)
            .and_then(|e| e.greeted_on);
        let link = Arc::new(Link::new(
            info.name.clone(),
            info.fingerprint,
            client,
            origin,
        ));
        let entry = Entry {
            info,
            link: Some(link.clone()),
            lost: false,
            greeted_on,
        };
        let replaced = match claim.commit(&mut directory, entry) {
            Ok(replaced) => replaced,
            Err(error) => {
                drop(directory);
                link.close();
                return Err(error);
            }
        };
        drop(directory);
        if let Some(old) = replaced.and_then(|e| e.link) {
            old.close();
        }
        self.runtime
            .spawn(link::watch(Arc::downgrade(self), link.clone()));
        Ok(link)
    }
}
