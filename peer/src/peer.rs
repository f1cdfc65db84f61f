//! The peer: its handle, what it knows about other peers, and calls by name.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use teleport_client::{Client, ClientBuilder, ClientTls};
use teleport_protocol::{from_tree, to_tree, Tree};
use teleport_quic::{Address, Fingerprint, Identity, ToAddress};

use teleport_server::{Context, HandlerError, Server};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::{
    PeerError, Refusal, RefusalKind, DIRECTORY_FULL_TYPE, NAME_CLASH_TYPE, UNTRUSTED_TYPE,
};
use crate::greeting::{Greeting, PeerInfo, RefuseNotice, REFUSE};
use crate::link::{self, Established, Link, LinkState, Origin};
use crate::PeerBuilder;

/// How many refusals [`Peer::refusals`] keeps.
const MAX_REFUSALS: usize = 32;

/// A peer: a server of the functions it defines and a client of the peers it
/// knows, which it calls by name. Cheap to clone; the peer stops when the
/// last clone is dropped (or at [`shutdown`](Peer::shutdown)).
///
/// See the [crate documentation](crate) for an example, the greeting,
/// discovery, and how peers are trusted.
#[derive(Clone, Debug)]
pub struct Peer {
    inner: Arc<Inner>,
    guard: Arc<Guard>,
}

/// Dropped with the last `Peer` clone: closes the links and the server.
#[derive(Debug)]
struct Guard {
    inner: Arc<Inner>,
    server: Option<Server>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.close();
        // The server is dropped after this: it stops at once.
    }
}

/// The settings a peer keeps from its builder.
pub(crate) struct Settings {
    pub(crate) pins: HashMap<String, Fingerprint>,
    pub(crate) accept_any: bool,
    pub(crate) token: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) liveness_timeout: Duration,
    pub(crate) lookup_timeout: Duration,
    pub(crate) lookup_fanout: usize,
    pub(crate) max_hops: u32,
    pub(crate) max_peers: usize,
    pub(crate) configure_client: Option<Arc<ConfigureClient>>,
}

/// A function adjusting every link's client builder.
pub(crate) type ConfigureClient = dyn Fn(ClientBuilder) -> ClientBuilder + Send + Sync;

/// What this peer knows about another.
pub(crate) struct Entry {
    pub(crate) info: PeerInfo,
    /// This peer's connection to it, if one is made.
    pub(crate) link: Option<Arc<Link>>,
    /// Its connection was lost and did not come back: the name must be found
    /// again, and another identity may take it.
    pub(crate) lost: bool,
    /// The connection to this peer's server its greeting came over, while
    /// that connection lasts (the number of [`Context::connection_id`]).
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
    fn commit(
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

/// The state all of a peer's tasks share.
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) identity: Identity,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) settings: Settings,
    timeout_ms: AtomicU64,
    advertised: Mutex<Vec<SocketAddr>>,
    pub(crate) directory: Mutex<HashMap<String, Entry>>,
    /// One opening of a link per name at a time, so that concurrent calls to
    /// a peer not yet connected make one connection. Weak: a gate lives while
    /// a call holds or waits for it, and the map forgets dead ones.
    gates: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Names being checked, with the certificate claiming each and how many
    /// checks of it run ([`Claim`]).
    claims: Mutex<HashMap<String, (Fingerprint, usize)>>,
    /// When the holder of a name last answered a liveness probe: within the
    /// liveness timeout, another claim is refused without asking again.
    probed: Mutex<HashMap<String, Instant>>,
    /// The name each connection to this peer's server greeted with: one name
    /// per connection. Forgotten when the connection ends.
    greeted_by: Mutex<HashMap<u64, String>>,
    refusals: Mutex<VecDeque<Refusal>>,
    pub(crate) runtime: Handle,
    closed: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("known", &lock(&self.directory).len())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, carrying on past a panic elsewhere (the data stays
/// consistent: every critical section is a few map operations).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn new(
        name: String,
        identity: Identity,
        settings: Settings,
        timeout: Duration,
        runtime: Handle,
    ) -> Inner {
        Inner {
            name,
            fingerprint: identity.fingerprint(),
            identity,
            settings,
            timeout_ms: AtomicU64::new(duration_ms(timeout)),
            advertised: Mutex::new(Vec::new()),
            directory: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            probed: Mutex::new(HashMap::new()),
            greeted_by: Mutex::new(HashMap::new()),
            refusals: Mutex::new(VecDeque::new()),
            runtime,
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_advertised(&self, addrs: Vec<SocketAddr>) {
        *lock(&self.advertised) = addrs;
    }

    pub(crate) fn own_info(&self) -> PeerInfo {
        PeerInfo {
            name: self.name.clone(),
            fingerprint: self.fingerprint,
            addrs: lock(&self.advertised).clone(),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Stops: every link closes; calls still being found fail.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = lock(&self.directory)
            .drain()
            .filter_map(|(_, e)| e.link)
            .collect();
        for link in links {
            link.close();
        }
    }

    /// The builder of a link's client: pinned as `trust` says, presenting
    /// this peer's certificate, with the cohort's token, reconnected by the
    /// link's own task (so it knows when a connection is lost).
    pub(crate) fn client_builder(&self, target: &Address, trust: &ClientTls) -> ClientBuilder {
        let mut builder = Client::builder(target.clone());
        if let Some(configure) = &self.settings.configure_client {
            builder = configure(builder);
        }
        builder = builder
            .tls(trust.clone().with_identity(self.identity.clone()))
            .agent(format!(
                "teleport-peer/{} {}",
                env!("CARGO_PKG_VERSION"),
                self.name
            ))
            .reconnect(false)
            // Lookups that lose the race for an answer are dropped; their
            // failures must not fail the next call on the link.
            .raise_unobserved_errors(false)
            // The settings', not the time left when the link was made: the
            // link's task reconnects with this client for as long as it lives
            // (bounded by the liveness timeout there); a first connection is
            // bounded by its caller's deadline.
            .connect_timeout(
                self.settings
                    .connect_timeout
                    .max(self.settings.liveness_timeout)
                    .max(Duration::from_millis(1)),
            );
        if let Some(token) = &self.settings.token {
            builder = builder.token(token.clone());
        }
        builder
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

    /// The link to `name`, if there is one and it is up.
    pub(crate) fn up_link(&self, name: &str) -> Option<Arc<Link>> {
        lock(&self.directory)
            .get(name)
            .and_then(|e| e.link.clone())
            .filter(|l| l.state() == LinkState::Up)
    }

    pub(crate) fn record_refusal(&self, refusal: Refusal) {
        tracing::warn!(%refusal, "a greeting was refused");
        let mut refusals = lock(&self.refusals);
        if refusals.len() == MAX_REFUSALS {
            refusals.pop_front();
        }
        refusals.push_back(refusal);
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
                return Err(PeerError::Untrusted {
                    name: info.name.clone(),
                    fingerprint: info.fingerprint.to_string(),
                    reason: format!("this peer pins the name to certificate {pin}"),
                });
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
        let existing = directory.get(&info.name);
        if let Some(up) = existing
            .filter(|e| e.info.fingerprint == info.fingerprint)
            .and_then(|e| e.link.clone())
            .filter(|l| l.state() == LinkState::Up)
        {
            drop(directory);
            client.close();
            return Ok(up);
        }
        // A link replaced keeps its promise to keep an address up.
        let origin = match (origin, existing.and_then(|e| e.link.as_ref())) {
            (Origin::Learned, Some(old)) if matches!(old.origin, Origin::Address(_)) => {
                old.origin.clone()
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
        if self.is_closed() {
            link.close();
        }
        self.runtime
            .spawn(link::watch(Arc::downgrade(self), link.clone()));
        Ok(link)
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
                return Err(PeerError::Untrusted {
                    name: info.name,
                    fingerprint: info.fingerprint.to_string(),
                    reason: format!("this peer pins the name to certificate {pin}"),
                });
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
            kind: if kind == NAME_CLASH_TYPE {
                RefusalKind::NameClash
            } else {
                RefusalKind::Untrusted
            },
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
                        Err(
                            error @ (PeerError::NameClash { .. } | PeerError::Untrusted { .. }),
                        ) => return Err(error),
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
                Err(
                    e @ (PeerError::NameClash { .. }
                    | PeerError::Untrusted { .. }
                    | PeerError::Closed),
                ) => return Err(e),
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
                Err(e @ (PeerError::NameClash { .. } | PeerError::Untrusted { .. })) => {
                    return Err(e)
                }
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

    /// Calls `method` on the peer called `peer`, finding it first if need
    /// be, all within `timeout`.
    async fn call(
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

    /// `_peer.hello`: another peer connected and introduces itself. The
    /// fingerprint it greets with must be the certificate it presented in
    /// the TLS handshake, and a connection greets under one name only.
    pub(crate) async fn on_hello(
        self: Arc<Self>,
        args: Tree,
        ctx: Context,
    ) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadGreeting", message);
        let greeting: Greeting = from_tree(args).map_err(|e| bad(e.to_string()))?;
        let info = greeting.check(Some(ctx.peer_addr().ip())).map_err(bad)?;
        let reply = || to_tree(&Greeting::of(&self.own_info())).map_err(|e| bad(e.to_string()));
        let refuse = |error: PeerError| {
            let (kind, type_name, message) = match &error {
                PeerError::NameClash { message, .. } => {
                    (RefusalKind::NameClash, NAME_CLASH_TYPE, message.clone())
                }
                PeerError::Untrusted { reason, .. } => {
                    (RefusalKind::Untrusted, UNTRUSTED_TYPE, reason.clone())
                }
                PeerError::DirectoryFull { .. } => (
                    RefusalKind::Untrusted,
                    DIRECTORY_FULL_TYPE,
                    error.to_string(),
                ),
                other => (RefusalKind::Untrusted, UNTRUSTED_TYPE, other.to_string()),
            };
            let message = format!(
                "peer {:?} refused the name {:?}: {message}",
                self.name, info.name
            );
            self.record_refusal(Refusal {
                kind,
                name: info.name.clone(),
                fingerprint: Some(info.fingerprint),
                from: Some(ctx.peer_addr()),
                refused_by: "this peer".into(),
                message: message.clone(),
            });
            HandlerError::with_type(type_name, message)
        };
        match ctx.peer_fingerprint() {
            Some(seen) if seen == info.fingerprint => {}
            seen => {
                return Err(refuse(PeerError::Untrusted {
                    name: info.name.clone(),
                    fingerprint: info.fingerprint.to_string(),
                    reason: match seen {
                        Some(seen) => format!(
                            "the greeting claims the certificate {}, but the connection \
                             presented {seen}",
                            info.fingerprint
                        ),
                        None => "the connection presented no certificate".into(),
                    },
                }))
            }
        }
        if info.name == self.name && info.fingerprint == self.fingerprint {
            // This peer connected to itself: the caller sees its own name
            // come back and refuses.
            return reply();
        }
        let connection = ctx.connection_id();
        {
            let mut greeted_by = lock(&self.greeted_by);
            match greeted_by.get(&connection) {
                Some(name) if *name != info.name => {
                    return Err(bad(format!(
                        "this connection greeted as {name:?} already; one connection, one name"
                    )))
                }
                Some(_) => {}
                None => {
                    greeted_by.insert(connection, info.name.clone());
                    drop(greeted_by);
                    self.forget_connection_when_closed(&ctx);
                }
            }
        }
        let claim = self.check_name(&info).await.map_err(&refuse)?;
        self.note_greeting(&claim, info.clone(), connection)
            .map_err(&refuse)?;
        drop(claim);
        reply()
    }

    /// When the connection of `ctx` ends, forgets the name it greeted with,
    /// and that the entry it made is connected.
    fn forget_connection_when_closed(self: &Arc<Self>, ctx: &Context) {
        let connection = ctx.connection_id();
        let closed = ctx.connection_closed();
        let inner = Arc::downgrade(self);
        self.runtime.spawn(async move {
            closed.await;
            let Some(inner) = inner.upgrade() else { return };
            let name = lock(&inner.greeted_by).remove(&connection);
            if let Some(name) = name {
                if let Some(entry) = lock(&inner.directory).get_mut(&name) {
                    if entry.greeted_on == Some(connection) {
                        entry.greeted_on = None;
                    }
                }
            }
        });
    }

    /// Remembers who greeted this peer, and where it listens. The greeting's
    /// certificate was checked against the connection's, so a greeting under
    /// the same certificate is the peer itself, telling where it is now.
    fn note_greeting(
        &self,
        claim: &Claim<'_>,
        info: PeerInfo,
        connection: u64,
    ) -> Result<(), PeerError> {
        let mut directory = lock(&self.directory);
        let closed = match directory.get_mut(&info.name) {
            Some(entry) if entry.info.fingerprint == info.fingerprint => {
                if !info.addrs.is_empty() {
                    entry.info.addrs = info.addrs;
                }
                entry.lost = false;
                entry.greeted_on = Some(connection);
                None
            }
            _ => {
                let entry = Entry {
                    info,
                    link: None,
                    lost: false,
                    greeted_on: Some(connection),
                };
                claim
                    .commit(&mut directory, entry)?
                    .and_then(|old| old.link)
            }
        };
        drop(directory);
        if let Some(old) = closed {
            old.close();
        }
        Ok(())
    }

    /// `_peer.refuse`: a peer this one connected to refused it. The notice is
    /// recorded; it changes no link (anyone who can connect can send one).
    /// Only an entry that the refusing peer's own greeting made (the
    /// connection presented its certificate) and that no link uses is
    /// forgotten: this peer would only be refused again there.
    pub(crate) async fn on_refuse(&self, args: Tree, ctx: Context) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadRefusal", message);
        let notice: RefuseNotice = from_tree(args).map_err(|e| bad(e.to_string()))?;
        for name in [&notice.refused_by, &notice.name] {
            crate::greeting::check_name(name).map_err(bad)?;
        }
        let kind = if notice.kind == NAME_CLASH_TYPE {
            RefusalKind::NameClash
        } else {
            RefusalKind::Untrusted
        };
        if let Some(seen) = ctx.peer_fingerprint() {
            let mut directory = lock(&self.directory);
            let from_it = directory
                .get(&notice.refused_by)
                .is_some_and(|e| e.info.fingerprint == seen && e.link.is_none());
            if from_it {
                directory.remove(&notice.refused_by);
            }
        }
        let mut message = notice.message;
        message.truncate(1024);
        self.record_refusal(Refusal {
            kind,
            name: notice.name,
            fingerprint: Some(self.fingerprint),
            from: Some(ctx.peer_addr()),
            refused_by: notice.refused_by,
            message,
        });
        Ok(Tree::None)
    }
}

/// Socket addresses as addresses to connect to.
pub(crate) fn addresses(addrs: &[SocketAddr]) -> Vec<Address> {
    addrs.iter().filter_map(|a| a.to_address().ok()).collect()
}

/// The instant `timeout` from now, or one far in the future if that is not
/// representable (a timeout of `Duration::MAX` means "no timeout").
pub(crate) fn deadline_in(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        // A century: far enough to be no deadline, near enough for timers.
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What a peer knows about another (see [`Peer::peers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownPeer {
    /// Its name.
    pub name: String,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
    /// Whether this peer has a working connection to it now.
    pub connected: bool,
}

impl Peer {
    /// A builder: a random name, no functions, a self-signed certificate.
    pub fn builder() -> PeerBuilder {
        PeerBuilder::new()
    }

    pub(crate) fn new(inner: Arc<Inner>, server: Option<Server>) -> Peer {
        Peer {
            guard: Arc::new(Guard {
                inner: inner.clone(),
                server,
            }),
            inner,
        }
    }

    /// This peer's name, unique in its cohort.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The SHA-256 fingerprint of this peer's certificate: what other peers
    /// pin its name to ([`PeerBuilder::trust`]).
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint
    }

    /// The address this peer listens on, if it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.guard.server.as_ref().map(Server::local_addr)
    }

    /// The server underneath, if the peer listens: its statistics, its
    /// first function error ([`Server::check`]).
    pub fn server(&self) -> Option<&Server> {
        self.guard.server.as_ref()
    }

    /// Connects to the peer at `addr` (a port, `"host:port"`, a
    /// `SocketAddr`, ...), greets it, and returns its name. The connection is
    /// kept up: when lost, it is made again (to whichever peer then answers
    /// at the address). Tries for the connect timeout
    /// ([`PeerBuilder::connect_timeout`]).
    ///
    /// Whoever answers must be trusted (a name pinned with
    /// [`PeerBuilder::trust`], or [`PeerBuilder::accept_any`]) and must not
    /// clash with a name this peer knows ([`PeerError::NameClash`]).
    pub async fn connect(&self, addr: impl ToAddress) -> Result<String, PeerError> {
        let address = addr.to_address()?;
        let deadline = deadline_in(self.inner.settings.connect_timeout);
        self.inner.connect_address(address, deadline).await
    }

    /// Calls `method` on the peer called `peer` with the default timeout
    /// ([`set_timeout`](Self::set_timeout)), finding the peer through the
    /// peers this one knows if it has no connection to it. The call starts
    /// at once; the returned future gives its result. Dropping the future
    /// does not stop the call.
    pub fn call(&self, peer: impl Into<String>, method: impl Into<String>, args: Tree) -> PeerCall {
        self.call_with_timeout(peer, method, args, self.inner.timeout())
    }

    /// Like [`call`](Self::call), with a timeout for this call: finding the
    /// peer, connecting, and the call itself all fit in it.
    pub fn call_with_timeout(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
        timeout: Duration,
    ) -> PeerCall {
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, timeout);
        PeerCall {
            task: self.inner.runtime.spawn(call),
        }
    }

    /// Calls `method` on the peer called `peer` and waits for the result,
    /// for code that is not async. Must not be called on a thread that runs
    /// async tasks ([`PeerError::BlockingInRuntime`]); the runtime the peer
    /// was started in must keep running (a multi-threaded one, or one driven
    /// by another thread).
    pub fn call_blocking(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
    ) -> Result<Tree, PeerError> {
        if Handle::try_current().is_ok() {
            return Err(PeerError::BlockingInRuntime);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, self.inner.timeout());
        self.inner.runtime.spawn(async move {
            let _ = tx.send(call.await);
        });
        rx.recv().unwrap_or(Err(PeerError::Closed))
    }

    /// Calls `method` on the peer called `peer` and runs `callback` with
    /// the result (moolib's `async_callback`). Returns at once. The callback
    /// runs on the runtime's blocking pool, so it may take its time.
    pub fn call_with_callback<F>(
        &self,
        peer: impl Into<String>,
        method: impl Into<String>,
        args: Tree,
        callback: F,
    ) where
        F: FnOnce(Result<Tree, PeerError>) + Send + 'static,
    {
        let call = self
            .inner
            .clone()
            .call(peer.into(), method.into(), args, self.inner.timeout());
        self.inner.runtime.spawn(async move {
            let result = call.await;
            if let Err(error) = tokio::task::spawn_blocking(move || callback(result)).await {
                tracing::error!(%error, "the callback of a peer call panicked");
            }
        });
    }

    /// Sets the default timeout of calls (moolib's `set_timeout`): finding
    /// the peer, connecting and the call itself fit in it.
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner
            .timeout_ms
            .store(duration_ms(timeout), Ordering::Relaxed);
    }

    /// The default timeout of calls.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// The peers this one knows, by name, sorted.
    pub fn peers(&self) -> Vec<KnownPeer> {
        let mut peers: Vec<KnownPeer> = lock(&self.inner.directory)
            .values()
            .filter(|e| !e.lost)
            .map(|e| KnownPeer {
                name: e.info.name.clone(),
                fingerprint: e.info.fingerprint,
                addrs: e.info.addrs.clone(),
                connected: e
                    .link
                    .as_ref()
                    .is_some_and(|l| l.state() == LinkState::Up && l.client.connected()),
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        peers
    }

    /// The greetings refused by this peer, or reported refused by the peer
    /// they were sent to, oldest first (the last 32).
    pub fn refusals(&self) -> Vec<Refusal> {
        lock(&self.inner.refusals).iter().cloned().collect()
    }

    /// Stops: closes every connection to other peers, then shuts the server
    /// down, letting running calls finish for up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.close();
        if let Some(server) = &self.guard.server {
            server.shutdown(grace).await;
        }
    }
}

/// A call to a peer in flight: a future of its result. Dropping it does not
/// stop the call.
pub struct PeerCall {
    task: JoinHandle<Result<Tree, PeerError>>,
}

impl std::fmt::Debug for PeerCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCall")
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

impl Future for PeerCall {
    type Output = Result<Tree, PeerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.task).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            // The runtime is shutting down (or the task panicked).
            Poll::Ready(Err(_)) => Poll::Ready(Err(PeerError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}
