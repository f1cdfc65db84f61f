//! The peer: its handle, what it knows about other peers, and calls by name.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use teleport_client::{Client, ClientBuilder, ClientTls};
use teleport_protocol::{from_tree, to_tree, Tree};
use teleport_quic::{Address, Fingerprint, Identity, ToAddress};
use teleport_server::{Context, HandlerError, Server};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::{PeerError, Refusal, RefusalKind, NAME_CLASH_TYPE, UNTRUSTED_TYPE};
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
    /// a peer not yet connected make one connection.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
    pub(crate) fn client_builder(
        &self,
        target: &Address,
        trust: &ClientTls,
        connect_timeout: Duration,
    ) -> ClientBuilder {
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
            .connect_timeout(connect_timeout.max(Duration::from_millis(1)));
        if let Some(token) = &self.settings.token {
            builder = builder.token(token.clone());
        }
        builder
    }

    fn gate(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.gates)
            .entry(name.to_owned())
            .or_default()
            .clone()
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
    /// pinned to another fingerprint, and not held by another identity that
    /// still answers (one whose connection was lost for good may be
    /// replaced: that is how a restarted peer takes its name back).
    pub(crate) async fn check_name(&self, info: &PeerInfo) -> Result<(), PeerError> {
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
        let holder = lock(&self.directory)
            .get(&info.name)
            .filter(|e| e.info.fingerprint != info.fingerprint && !e.lost)
            .map(|e| (e.info.clone(), e.link.clone()));
        let Some((held, link)) = holder else {
            return Ok(());
        };
        if self.holder_alive(&held, link).await {
            return Err(clash(format!(
                "it is held by the peer with certificate {} at {:?}, which still answers; \
                 refused the certificate {}",
                held.fingerprint, held.addrs, info.fingerprint
            )));
        }
        tracing::info!(
            name = %info.name,
            "the peer that held this name no longer answers; a new identity takes it"
        );
        Ok(())
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
        match link::establish(self, &targets, &trust, Instant::now() + liveness).await {
            Ok(established) => {
                established.client.close();
                established.info.name == held.name
            }
            Err(_) => false,
        }
    }

    /// Puts a greeted connection in the directory and starts its task.
    fn install(self: &Arc<Self>, established: Established, origin: Origin) -> Arc<Link> {
        let Established { client, info, .. } = established;
        let link = Arc::new(Link::new(
            info.name.clone(),
            info.fingerprint,
            client,
            origin,
        ));
        let replaced = lock(&self.directory).insert(
            info.name.clone(),
            Entry {
                info,
                link: Some(link.clone()),
                lost: false,
            },
        );
        if let Some(old) = replaced.and_then(|e| e.link) {
            old.close();
        }
        if self.is_closed() {
            link.close();
        }
        self.runtime
            .spawn(link::watch(Arc::downgrade(self), link.clone()));
        link
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
        self.admit(established, Origin::Address(address)).await
    }

    /// Checks the name of a greeted connection and installs it, or refuses
    /// it and tells the other side why.
    async fn admit(
        self: &Arc<Self>,
        mut established: Established,
        origin: Origin,
    ) -> Result<String, PeerError> {
        if let Err(error) = self.check_name(&established.info).await {
            self.tell_refused(&established, &error).await;
            established.client.close();
            return Err(error);
        }
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
        let name = established.info.name.clone();
        self.install(established, origin);
        Ok(name)
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
                    let bounded = deadline.min(Instant::now() + self.settings.liveness_timeout);
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
        self.admit(established, Origin::Learned).await?;
        lock(&self.directory)
            .get(&info.name)
            .and_then(|e| e.link.clone())
            .ok_or(PeerError::Closed)
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
            let info = self
                .find(
                    name,
                    deadline,
                    self.settings.max_hops,
                    vec![self.name.clone()],
                    true,
                )
                .await?;
            let gate = self.gate(name);
            let Ok(_turn) = tokio::time::timeout_at(deadline.into(), gate.lock()).await else {
                continue;
            };
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
        let deadline = Instant::now() + timeout;
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
                // again once the peer is found again.
                Err(teleport_client::Error::NotConnected { .. })
                | Err(teleport_client::Error::Call(teleport_client::CallError::NotConnected {
                    ..
                })) => continue,
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

    /// `_peer.hello`: another peer connected and introduces itself.
    pub(crate) async fn on_hello(&self, args: Tree, ctx: Context) -> Result<Tree, HandlerError> {
        let bad = |message: String| HandlerError::with_type("BadGreeting", message);
        let greeting: Greeting = from_tree(args).map_err(|e| bad(e.to_string()))?;
        let info = greeting.check(Some(ctx.peer_addr().ip())).map_err(bad)?;
        let reply = || to_tree(&Greeting::of(&self.own_info())).map_err(|e| bad(e.to_string()));
        if info.name == self.name && info.fingerprint == self.fingerprint {
            // This peer connected to itself: the caller sees its own name
            // come back and refuses.
            return reply();
        }
        if let Err(error) = self.check_name(&info).await {
            let (kind, type_name, message) = match &error {
                PeerError::NameClash { message, .. } => {
                    (RefusalKind::NameClash, NAME_CLASH_TYPE, message.clone())
                }
                PeerError::Untrusted { reason, .. } => {
                    (RefusalKind::Untrusted, UNTRUSTED_TYPE, reason.clone())
                }
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
            return Err(HandlerError::with_type(type_name, message));
        }
        self.note_greeting(info);
        reply()
    }

    /// Remembers who greeted this peer, and where it listens.
    fn note_greeting(&self, info: PeerInfo) {
        let mut directory = lock(&self.directory);
        let closed = match directory.get_mut(&info.name) {
            Some(entry) if entry.info.fingerprint == info.fingerprint => {
                if !info.addrs.is_empty() {
                    entry.info.addrs = info.addrs;
                }
                entry.lost = false;
                None
            }
            _ => directory
                .insert(
                    info.name.clone(),
                    Entry {
                        info,
                        link: None,
                        lost: false,
                    },
                )
                .and_then(|old| old.link),
        };
        drop(directory);
        if let Some(old) = closed {
            old.close();
        }
    }

    /// `_peer.refuse`: a peer this one connected to refused it.
    pub(crate) async fn on_refuse(&self, args: Tree, ctx: Context) -> Result<Tree, HandlerError> {
        let notice: RefuseNotice =
            from_tree(args).map_err(|e| HandlerError::with_type("BadRefusal", e.to_string()))?;
        let kind = if notice.kind == NAME_CLASH_TYPE {
            RefusalKind::NameClash
        } else {
            RefusalKind::Untrusted
        };
        // It will not take calls from this peer: forget it.
        let forgotten = lock(&self.directory).remove(&notice.refused_by);
        if let Some(link) = forgotten.and_then(|e| e.link) {
            link.close();
        }
        self.record_refusal(Refusal {
            kind,
            name: notice.name,
            fingerprint: Some(self.fingerprint),
            from: Some(ctx.peer_addr()),
            refused_by: notice.refused_by,
            message: notice.message,
        });
        Ok(Tree::None)
    }
}

/// Socket addresses as addresses to connect to.
pub(crate) fn addresses(addrs: &[SocketAddr]) -> Vec<Address> {
    addrs.iter().filter_map(|a| a.to_address().ok()).collect()
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
        let deadline = Instant::now() + self.inner.settings.connect_timeout;
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
