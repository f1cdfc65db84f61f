//! Binding functions and choosing settings: the [`ServerBuilder`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use teleport_protocol::server::{Capacity, ServerConfig};
use teleport_protocol::Limits;
use teleport_quic::{
    ClientAuth, Host, Identity, Listener, MemoryBudget, ServerTls, ToAddress, TransportConfig,
};
use tokio::task::JoinHandle;

use crate::function::{Binding, BoundFunction, CallQueue, Env, Function, IntoFunction};
use crate::shared::{Budgets, ServerShared};
use crate::{Server, ServerError};

/// Settings and bound functions of a server. Start from [`Server::builder`].
#[derive(Debug)]
pub struct ServerBuilder {
    identity: Option<Identity>,
    client_auth: ClientAuth,
    token: Option<String>,
    transport: TransportConfig,
    limits: Limits,
    max_in_flight: usize,
    max_in_flight_total: usize,
    workers: usize,
    peer_timeout: Option<Duration>,
    receive_memory: usize,
    connection_receive_memory: usize,
    max_connections: usize,
    max_unauthenticated: usize,
    hello_timeout: Duration,
    call_progress_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    functions: HashMap<String, Binding>,
    duplicate: Option<String>,
}

/// The default of [`ServerBuilder::connection_receive_memory`]: 1 GiB.
pub const DEFAULT_CONNECTION_RECEIVE_MEMORY: usize = 1 << 30;
/// The default of [`ServerBuilder::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The default of [`ServerBuilder::max_unauthenticated`].
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 256;

/// The default of [`ServerBuilder::receive_memory`]: a quarter of the
/// machine's memory (`MemTotal` in `/proc/meminfo`), at least 1 GiB; 4 GiB
/// where the machine's memory cannot be read.
pub fn default_receive_memory() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    match total {
        Some(bytes) => (bytes / 4).max(1 << 30),
        None => 4 << 30,
    }
}

impl ServerBuilder {
    pub(crate) fn new() -> ServerBuilder {
        ServerBuilder {
            identity: None,
            client_auth: ClientAuth::None,
            token: None,
            transport: TransportConfig::default(),
            limits: Limits::default(),
            max_in_flight: 64,
            max_in_flight_total: 4096,
            workers: std::thread::available_parallelism().map_or(4, |n| n.get()),
            peer_timeout: ServerConfig::default().peer_timeout,
            receive_memory: default_receive_memory(),
            connection_receive_memory: DEFAULT_CONNECTION_RECEIVE_MEMORY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            hello_timeout: ServerConfig::default().hello_timeout,
            call_progress_timeout: ServerConfig::default().call_progress_timeout,
            idle_timeout: ServerConfig::default().idle_timeout,
            functions: HashMap::new(),
            duplicate: None,
        }
    }

    /// Binds `function` under `name`: an async closure, `Fn(Tree)` or
    /// `Fn(Tree, Context)` returning a future, for the common case, or a
    /// [`Function`] for anything else (blocking, a pool of its own, bounded
    /// concurrency, an ordered hook, batching, deferred answers, a queue).
    ///
    /// ```
    /// use teleport_protocol::{tree, Tree};
    /// use std::time::Duration;
    /// use teleport_server::{BatchPolicy, Context, Function, Server, Workers};
    ///
    /// let policy = BatchPolicy { max_batch: 32, max_wait: Duration::from_millis(2) };
    /// let builder = Server::builder()
    ///     .bind("echo", |args: Tree| async move { Ok(args) })
    ///     .bind("who", |_: Tree, ctx: Context| async move { Ok(tree!((ctx.agent()))) })
    ///     .bind(
    ///         "solve",
    ///         Function::blocking(|args: Tree| Ok(args)).workers(Workers::Own(4)),
    ///     )
    ///     .bind(
    ///         "infer",
    ///         Function::blocking(|batch: Tree| Ok(batch)).batch(policy),
    ///     );
    /// # let _ = builder;
    /// ```
    ///
    /// Binding a name twice makes [`listen`](Self::listen) fail with
    /// [`ServerError::DuplicateMethod`]; options that cannot work together
    /// with [`ServerError::InvalidFunction`].
    pub fn bind<M>(mut self, name: impl Into<String>, function: impl IntoFunction<M>) -> Self {
        let name = name.into();
        if self
            .functions
            .insert(name.clone(), function.into_binding())
            .is_some()
        {
            self.duplicate.get_or_insert(name);
        }
        self
    }

    /// Binds `name` as a queue of at most `capacity` calls and returns the
    /// queue: a shorthand for [`Function::queue`] and [`bind`](Self::bind).
    ///
    /// ```no_run
    /// use teleport_server::{stack_calls, Server};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let (builder, queue) = Server::builder().bind_queue("infer", 256);
    /// let server = builder.listen("127.0.0.1:4433").await?;
    /// tokio::spawn(async move {
    ///     // Up to 32 calls at a time, as many as are waiting.
    ///     while let Some(calls) = queue.recv_batch(32).await {
    ///         if let Some(batch) = stack_calls(calls) {
    ///             let result = batch.args().clone(); // run the model here
    ///             batch.respond(Ok(result));
    ///         }
    ///     }
    /// });
    /// server.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn bind_queue(self, name: impl Into<String>, capacity: usize) -> (Self, CallQueue) {
        let (function, queue) = Function::queue(capacity);
        (self.bind(name, function), queue)
    }

    /// The server's certificate and key. Without one, the server makes a
    /// self-signed certificate for `localhost` and the bound IP address; print
    /// its [`fingerprint`](Server::fingerprint) for clients to pin.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Require client certificates (mutual TLS): pinned ones, ones a CA
    /// issued, or any (`ClientAuth::AnyCertificate`). Functions see the
    /// caller's certificate as
    /// [`Context::peer_fingerprint`](crate::Context::peer_fingerprint).
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// Require this shared token in each client's `Hello`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// QUIC windows and timers.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = transport;
        self
    }

    /// Bounds on every message received; calls over them are refused with an
    /// `OverLimit` error and the connection carries on.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Calls one connection may have running at once; more are refused with an
    /// `OverLimit` error. Default 64.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight.max(1);
        self
    }

    /// Calls running at once across all connections; more are refused with an
    /// `Overloaded` error (retry later, or elsewhere). Default 4096.
    pub fn max_in_flight_total(mut self, max: usize) -> Self {
        self.max_in_flight_total = max.max(1);
        self
    }

    /// Worker threads running blocking functions at once, shared by all
    /// connections and by every blocking function without a pool of its own
    /// (see [`Function::workers`]). Default: the number of CPUs.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// While the server holds a call of a client (arriving, running, or its
    /// reply being written), how long the client may give no sign of life
    /// before it is presumed dead: its calls are stopped, their memory freed,
    /// and the connection closed (code 4, peer timeout). Clients ping every
    /// second while they wait by default; a client with pings off (or
    /// pinging less often) needs calls shorter than this, or `None` here.
    /// Default 10 s.
    pub fn peer_timeout(mut self, peer_timeout: Option<Duration>) -> Self {
        self.peer_timeout = peer_timeout;
        self
    }

    /// Bytes that the data sections of calls being received (and received
    /// calls whose arrays are still held) may take across all connections.
    /// Memory is reserved as bytes arrive, never for a whole declared size up
    /// front. A call whose next bytes do not fit waits for memory (its
    /// stream is not read meanwhile, so QUIC flow control stops its sender);
    /// if it waits longer than the
    /// [`call_progress_timeout`](Self::call_progress_timeout) it is refused.
    /// A call declaring more than this can never fit and is refused at once
    /// with an `OverLimit` error. Default [`default_receive_memory`]: a
    /// quarter of the machine's memory, at least 1 GiB.
    pub fn receive_memory(mut self, bytes: usize) -> Self {
        self.receive_memory = bytes;
        self
    }

    /// The share of [`receive_memory`](Self::receive_memory) one connection
    /// may take, so a single peer cannot take it all. A call declaring a
    /// data section larger than this is refused at its header with an
    /// `OverLimit` error naming the budget (the message limit
    /// [`Limits::max_data_len`] allows 4 GiB by default: raise this too to
    /// receive calls that large). Default 1 GiB.
    pub fn connection_receive_memory(mut self, bytes: usize) -> Self {
        self.connection_receive_memory = bytes;
        self
    }

    /// Connections open at once, handshakes included; attempts beyond are
    /// refused at their first packet (the client sees the connection
    /// refused and may retry). Default 10,000.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Connections open at once whose client has not yet sent an accepted
    /// `Hello` (handshaking, or connected and silent); attempts beyond are
    /// refused at their first packet. Each such connection lasts at most the
    /// [`hello_timeout`](Self::hello_timeout). Default 256.
    pub fn max_unauthenticated(mut self, max: usize) -> Self {
        self.max_unauthenticated = max.max(1);
        self
    }

    /// How long a new connection may take, from its first packet through the
    /// TLS handshake, to send an acceptable `Hello`; then it is closed.
    /// Default 10 s.
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// How long a call being received may go without a byte arriving; then
    /// it is refused with a `BadRequest` error, so a client that stops
    /// sending (or trickles slower than this) holds neither memory nor a
    /// place in flight. `None`: no bound. Default 30 s.
    pub fn call_progress_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_progress_timeout = timeout;
        self
    }

    /// A connection with no call and no message from the client for this
    /// long is closed with a normal `Goodbye` (QUIC keep-alives do not count;
    /// a Teleport client reconnects when it next calls). `None`: never.
    /// Default 10 minutes.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Binds `addr` and starts serving. `addr` is written as people write
    /// addresses: a port (`4433`, `":4433"`: every IPv4 interface),
    /// `"127.0.0.1:4433"`, `"[::]:4433"`, `"localhost:0"` (a name: its
    /// addresses are tried in turn until one binds), `quic://host:port`, or a
    /// `SocketAddr`. Port 0 picks a free port. Must be called inside a tokio
    /// runtime.
    pub async fn listen(self, addr: impl ToAddress) -> Result<Server, ServerError> {
        if let Some(name) = self.duplicate {
            return Err(ServerError::DuplicateMethod(name));
        }
        let address = addr.to_address()?;
        let addrs = address.resolve_for_server().await?;
        let identity = match self.identity {
            Some(identity) => identity,
            None => {
                let mut names = vec!["localhost".to_owned()];
                if let Host::Name(name) = &address.host {
                    names.push(name.clone());
                }
                names.extend(
                    addrs
                        .iter()
                        .filter(|a| !a.ip().is_unspecified())
                        .map(|a| a.ip().to_string()),
                );
                names.dedup();
                Identity::self_signed(names)?
            }
        };
        let mut protocol = ServerConfig::default();
        protocol.max_in_flight = self.max_in_flight;
        protocol.token = self.token;
        protocol.peer_timeout = self.peer_timeout;
        protocol.capacity = Some(Arc::new(Capacity::new(self.max_in_flight_total)));
        protocol.methods = Some(Arc::new(self.functions.keys().cloned().collect()));
        protocol.hello_timeout = self.hello_timeout;
        protocol.call_progress_timeout = self.call_progress_timeout;
        protocol.idle_timeout = self.idle_timeout;
        let budgets = Budgets {
            memory: MemoryBudget::new("server", self.receive_memory),
            connection_memory: self.connection_receive_memory,
            max_connections: self.max_connections,
            max_unauthenticated: self.max_unauthenticated,
        };
        let env = Env {
            shared_workers: self.workers,
        };
        let mut functions = HashMap::with_capacity(self.functions.len());
        for (method, binding) in self.functions {
            match binding.resolve(&method, &env) {
                Ok(function) => functions.insert(method, function),
                Err(reason) => return Err(ServerError::InvalidFunction { method, reason }),
            };
        }
        let shared = Arc::new(ServerShared::new(
            functions,
            protocol,
            self.workers,
            budgets,
        ));
        let batchers = start_batchers(&shared)?;
        let fingerprint = identity.fingerprint();
        let tls = ServerTls::new(identity).with_client_auth(self.client_auth);
        let listener = match Listener::bind_first(&addrs, &tls, &self.transport, &self.limits) {
            Ok(listener) => listener,
            Err(e) => {
                batchers.iter().for_each(JoinHandle::abort);
                return Err(e.into());
            }
        };
        Ok(Server::start(
            listener,
            fingerprint,
            shared,
            batchers,
            (self.transport, self.limits),
        ))
    }
}

/// Starts the task of every batched function, or fails if a policy cannot
/// work.
fn start_batchers(shared: &Arc<ServerShared>) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let mut batchers = Vec::new();
    for (method, (_, function)) in &shared.functions {
        if let BoundFunction::Batched(batched) = function {
            match batched.start(method, shared.workers.clone(), shared.shutdown_signal()) {
                Ok(task) => batchers.extend(task),
                Err(error) => {
                    batchers.iter().for_each(JoinHandle::abort);
                    return Err(ServerError::BatchPolicy {
                        method: method.clone(),
                        error,
                    });
                }
            }
        }
    }
    Ok(batchers)
}
