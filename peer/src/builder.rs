//! Settings and functions of a peer: the [`PeerBuilder`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use teleport_client::ClientBuilder;
use teleport_protocol::Tree;
use teleport_quic::{ClientAuth, Fingerprint, Identity, ToAddress};
use teleport_server::{CallQueue, Context, Function, IntoFunction, Server, ServerBuilder};
use tokio::runtime::Handle;

use crate::greeting::{check_name, random_name, HELLO, LOOKUP, REFUSE, RESERVED_PREFIX};
use crate::inner::{ConfigureClient, Inner, Settings};
use crate::{Peer, PeerError};

/// The default call timeout: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of [`PeerBuilder::connect_timeout`]: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of [`PeerBuilder::liveness_timeout`]: 3 s.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// The default of [`PeerBuilder::max_peers`]: 1,024.
pub const DEFAULT_MAX_PEERS: usize = 1024;

/// Settings and functions of a peer. Start from [`Peer::builder`].
pub struct PeerBuilder {
    name: Option<String>,
    server: ServerBuilder,
    functions: usize,
    reserved: Option<String>,
    identity: Option<Identity>,
    pins: HashMap<String, Fingerprint>,
    accept_any: bool,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    liveness_timeout: Duration,
    lookup_timeout: Duration,
    lookup_fanout: usize,
    max_hops: u32,
    max_peers: usize,
    client_auth: ClientAuth,
    configure_client: Option<Arc<ConfigureClient>>,
}

impl std::fmt::Debug for PeerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBuilder")
            .field("name", &self.name)
            .field("functions", &self.functions)
            .field("pins", &self.pins)
            .field("accept_any", &self.accept_any)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PeerBuilder {
    pub(crate) fn new() -> PeerBuilder {
        PeerBuilder {
            name: None,
            server: Server::builder(),
            functions: 0,
            reserved: None,
            identity: None,
            pins: HashMap::new(),
            accept_any: false,
            token: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            lookup_timeout: Duration::from_secs(2),
            lookup_fanout: 3,
            max_hops: 2,
            max_peers: DEFAULT_MAX_PEERS,
            client_auth: ClientAuth::AnyCertificate,
            configure_client: None,
        }
    }

    /// The peer's name, unique in its cohort (moolib's `set_name`). Default:
    /// `peer-` and 128 random bits in hex, unique everywhere.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Defines a function other peers may call, as
    /// [`ServerBuilder::bind`] binds one: an async closure, or a
    /// [`Function`] with options. [`Function::deferred`] is moolib's
    /// `define_deferred`, [`Function::queue`] (or
    /// [`define_queue`](Self::define_queue)) its `define_queue`.
    pub fn define<M>(mut self, name: impl Into<String>, function: impl IntoFunction<M>) -> Self {
        let name = name.into();
        if name.starts_with(RESERVED_PREFIX) {
            self.reserved.get_or_insert(name);
            return self;
        }
        self.functions += 1;
        self.server = self.server.bind(name, function);
        self
    }

    /// Defines `name` as a queue of at most `capacity` calls and returns the
    /// queue, whose `(args, responder)` pairs the application takes
    /// (moolib's `define_queue`): see [`ServerBuilder::bind_queue`].
    pub fn define_queue(self, name: impl Into<String>, capacity: usize) -> (Self, CallQueue) {
        let (function, queue) = Function::queue(capacity);
        (self.define(name, function), queue)
    }

    /// This peer's certificate and key (from PEM files, say, so that its
    /// fingerprint survives restarts). Default: a new self-signed
    /// certificate each start.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Trusts the peer called `name` only with the certificate of this
    /// fingerprint: connecting to it, introductions of it, and its greetings
    /// must all carry it.
    pub fn trust(mut self, name: impl Into<String>, fingerprint: Fingerprint) -> Self {
        self.pins.insert(name.into(), fingerprint);
        self
    }

    /// Trusts the certificate of whatever peer answers at an address given
    /// to [`Peer::connect`] when its name is not pinned (trust on first use:
    /// the connection is encrypted, and pinned to that certificate from then
    /// on, but the first contact is not authenticated). Off by default.
    pub fn accept_any(mut self) -> Self {
        self.accept_any = true;
        self
    }

    /// A shared token: this peer's server requires it of every peer that
    /// connects, and this peer presents it to every peer it connects to.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.server = self.server.token(token.clone());
        self.token = Some(token);
        self
    }

    /// Which certificates of the peers that connect this peer's server
    /// accepts at the TLS level. A peer's server always requires a
    /// certificate (every peer presents its own), because a greeting must
    /// come with the certificate it names: the default,
    /// [`ClientAuth::AnyCertificate`], accepts any and checks it against
    /// the greeting; [`ClientAuth::Fingerprints`] or [`ClientAuth::Roots`]
    /// narrow it further. [`ClientAuth::None`] means the default here.
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = match client_auth {
            ClientAuth::None => ClientAuth::AnyCertificate,
            other => other,
        };
        self
    }

    /// The default timeout of calls (moolib's `set_timeout`; see also
    /// [`Peer::set_timeout`]): finding the peer, connecting and the call
    /// itself fit in it. Default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`Peer::connect`] tries. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a lost connection may take to come back before the peer is
    /// presumed gone (and its name looked up again), and how long a peer
    /// holding a name is given to answer when another identity claims it.
    /// Default 3 s.
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// How long one question to one peer during discovery may take. Default 2 s.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// How many peers are asked at once during discovery. Default 3.
    pub fn lookup_fanout(mut self, fanout: usize) -> Self {
        self.lookup_fanout = fanout.max(1);
        self
    }

    /// How many times a question may be passed on by the peers asked (0:
    /// only the peers this one knows answer). Default 2. It also bounds the
    /// questions this peer passes on for others, whatever they ask for.
    pub fn max_hops(mut self, hops: u32) -> Self {
        self.max_hops = hops;
        self
    }

    /// How many peers this peer remembers (those that greeted it, those it
    /// found or connected to). When full, a peer neither connected nor
    /// linked is forgotten to make room; if every one is, a new greeting is
    /// refused ([`PeerError::DirectoryFull`]). Default
    /// [`DEFAULT_MAX_PEERS`].
    pub fn max_peers(mut self, max: usize) -> Self {
        self.max_peers = max.max(1);
        self
    }

    /// Adjusts the settings of this peer's server (limits, workers,
    /// timeouts). Its identity and token are the peer's own.
    pub fn configure_server(
        mut self,
        configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
    ) -> Self {
        self.server = configure(self.server);
        self
    }

    /// Adjusts every client this peer makes to call other peers (in-flight
    /// limits, pings, transport). The peer sets trust, identity, token and
    /// reconnection itself, after this.
    pub fn configure_client(
        mut self,
        configure: impl Fn(ClientBuilder) -> ClientBuilder + Send + Sync + 'static,
    ) -> Self {
        self.configure_client = Some(Arc::new(configure));
        self
    }

    /// Listens on `addr` (as [`ServerBuilder::listen`]: `"127.0.0.1:0"`, a
    /// port, ...) and starts the peer. Must be called inside a tokio runtime.
    pub async fn listen(self, addr: impl ToAddress) -> Result<Peer, PeerError> {
        let address = addr.to_address()?;
        let (inner, server) = self.prepare()?;
        let server = server.listen(address).await?;
        inner.set_advertised(vec![server.local_addr()]);
        Ok(Peer::new(inner, Some(server)))
    }

    /// Starts a peer that does not listen: it calls other peers but cannot
    /// be called. Must be called inside a tokio runtime.
    pub fn start(self) -> Result<Peer, PeerError> {
        if self.functions > 0 {
            return Err(PeerError::NotListening);
        }
        let (inner, _) = self.prepare()?;
        Ok(Peer::new(inner, None))
    }

    /// The shared state, and the server builder with the reserved
    /// functions bound.
    fn prepare(self) -> Result<(Arc<Inner>, ServerBuilder), PeerError> {
        if let Some(name) = self.reserved {
            return Err(PeerError::ReservedName(name));
        }
        let runtime = Handle::try_current().map_err(|_| PeerError::NoRuntime)?;
        let name = self.name.unwrap_or_else(random_name);
        check_name(&name).map_err(|_| PeerError::InvalidName(name.clone()))?;
        let identity = match self.identity {
            Some(identity) => identity,
            None => Identity::self_signed(["localhost"])?,
        };
        let settings = Settings {
            pins: self.pins,
            accept_any: self.accept_any,
            token: self.token,
            connect_timeout: self.connect_timeout,
            liveness_timeout: self.liveness_timeout,
            lookup_timeout: self.lookup_timeout,
            lookup_fanout: self.lookup_fanout,
            max_hops: self.max_hops,
            max_peers: self.max_peers,
            configure_client: self.configure_client,
        };
        let inner = Arc::new(Inner::new(
            name,
            identity.clone(),
            settings,
            self.timeout,
            runtime,
        ));
        let (hello, lookup, refuse) = (inner.clone(), inner.clone(), inner.clone());
        let server = self
            .server
            .identity(identity)
            .client_auth(self.client_auth)
            .bind(HELLO, move |args: Tree, ctx: Context| {
                hello.clone().on_hello(args, ctx)
            })
            .bind(LOOKUP, move |args: Tree, ctx: Context| {
                lookup.clone().on_lookup(args, ctx)
            })
            .bind(REFUSE, move |args: Tree, ctx: Context| {
                let inner = refuse.clone();
                async move { inner.on_refuse(args, ctx).await }
            });
        Ok((inner, server))
    }
}
