//! The state all of a peer's tasks share (its identity, settings, the
//! directory's map, the refusals it keeps), how a link's client is built,
//! and closing; small time and address helpers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use teleport_client::{Client, ClientBuilder, ClientTls};
use teleport_quic::{Address, Fingerprint, Identity, ToAddress};
use tokio::runtime::Handle;

use crate::directory::Entry;
use crate::error::Refusal;
use crate::greeting::PeerInfo;
use crate::link::Link;

/// How many refusals [`Peer::refusals`](crate::Peer::refusals) keeps.
const MAX_REFUSALS: usize = 32;

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
    pub(crate) gates: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Names being checked, with the certificate claiming each and how many
    /// checks of it run ([`Claim`](crate::directory::Claim)).
    pub(crate) claims: Mutex<HashMap<String, (Fingerprint, usize)>>,
    /// When the holder of a name last answered a liveness probe: within the
    /// liveness timeout, another claim is refused without asking again.
    pub(crate) probed: Mutex<HashMap<String, Instant>>,
    /// The name each connection to this peer's server greeted with: one name
    /// per connection. Forgotten when the connection ends.
    pub(crate) greeted_by: Mutex<HashMap<u64, String>>,
    pub(crate) refusals: Mutex<VecDeque<Refusal>>,
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

    /// The default timeout of calls.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Sets the default timeout of calls.
    pub(crate) fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(duration_ms(timeout), Ordering::Relaxed);
    }

    /// Stops: every link closes; calls still being found fail.
    pub(crate) fn close(&self) {
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

    pub(crate) fn record_refusal(&self, refusal: Refusal) {
        tracing::warn!(%refusal, "a greeting was refused");
        let mut refusals = lock(&self.refusals);
        if refusals.len() == MAX_REFUSALS {
            refusals.pop_front();
        }
        refusals.push_back(refusal);
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
