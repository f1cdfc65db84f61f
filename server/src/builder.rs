//! Binding functions and choosing settings: the [`ServerBuilder`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use teleport_protocol::server::{Capacity, ServerConfig};
use teleport_protocol::{Limits, Tree};
use teleport_quic::{
    ClientAuth, Host, Identity, Listener, ServerTls, ToAddress, TransportConfig, TransportError,
};
use tokio::task::JoinHandle;

use crate::function::{
    call_queue, BatchFn, BatchedFunction, Blocking, CallQueue, Function, FunctionOptions, Hook,
    Responder,
};
use crate::shared::ServerShared;
use crate::{BatchPolicy, HandlerError, Server, ServerError};

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
    functions: HashMap<String, Function>,
    duplicate: Option<String>,
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
            functions: HashMap::new(),
            duplicate: None,
        }
    }

    fn insert(mut self, name: String, function: Function) -> Self {
        if self.functions.insert(name.clone(), function).is_some() {
            self.duplicate.get_or_insert(name);
        }
        self
    }

    /// Binds an async function under `name`. It runs on the tokio runtime, so
    /// it must not block; use [`bind_blocking`](Self::bind_blocking) for work
    /// that does (numerics, file IO, calls into C).
    pub fn bind<F, Fut>(self, name: impl Into<String>, function: F) -> Self
    where
        F: Fn(Tree) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
    {
        self.insert(name.into(), Function::from_async(function))
    }

    /// Binds a blocking function under `name`. Calls run on worker threads,
    /// at most [`workers`](Self::workers) at once across the server, so they
    /// run in parallel and never stall the network.
    pub fn bind_blocking<F>(self, name: impl Into<String>, function: F) -> Self
    where
        F: Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static,
    {
        let name = name.into();
        let function = Function::from_blocking(&name, function);
        self.insert(name, function)
    }

    /// Binds a blocking function under `name`, run as `options` say: on a
    /// worker pool of its own ([`Workers::Own`](crate::Workers::Own)) so that
    /// slow calls of other functions do not hold it up, and with at most
    /// [`max_concurrent`](FunctionOptions::max_concurrent) calls admitted at
    /// once, the others waiting in arrival order. The server-wide and
    /// per-connection limits apply as to any call.
    pub fn bind_blocking_with<F>(
        self,
        name: impl Into<String>,
        options: FunctionOptions,
        function: F,
    ) -> Self
    where
        F: Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static,
    {
        let name = name.into();
        let function = Blocking::<()>::new(
            &name,
            options,
            Arc::new(move |args| function(args).map(|tree| (tree, ()))),
            None,
        );
        self.insert(name, Function::Blocking(Arc::new(function)))
    }

    /// Binds a blocking function with an ordered completion hook (Teleport's
    /// `donefn`, Portal's `postfn`): `function` returns its result and a
    /// by-product; the result goes to the caller at once, and `hook` runs on
    /// the by-products one at a time, on a thread of its own, strictly in the
    /// order the calls were admitted, whatever order they finish in.
    ///
    /// A call keeps its admission slot (see
    /// [`max_concurrent`](FunctionOptions::max_concurrent)) until its hook has
    /// run, so a slow hook slows the function instead of letting by-products
    /// pile up. Without `max_concurrent` nothing bounds that backlog.
    ///
    /// A call that fails, panics, or is cancelled before its function runs
    /// gives the hook nothing and does not hold up the hooks after it. A call
    /// cancelled while its function runs still hands its by-product to the hook
    /// (the work was done). A panicking hook is logged and later hooks run.
    pub fn bind_blocking_with_hook<F, B, H>(
        self,
        name: impl Into<String>,
        options: FunctionOptions,
        function: F,
        hook: H,
    ) -> Self
    where
        F: Fn(Tree) -> Result<(Tree, B), HandlerError> + Send + Sync + 'static,
        B: Send + 'static,
        H: Fn(B) + Send + Sync + 'static,
    {
        let name = name.into();
        let hook: Box<Hook<B>> = Box::new(hook);
        let function = Blocking::new(&name, options, Arc::new(function), Some(hook));
        self.insert(name, Function::Blocking(Arc::new(function)))
    }

    /// Binds a function that answers later: it gets the call's arguments and a
    /// [`Responder`], keeps the responder (in a queue, another thread, a task)
    /// and answers through it when it can. The function itself runs on the
    /// async runtime and must return quickly.
    ///
    /// A responder dropped without answering fails the call with an error of
    /// kind `Handler` ("the function dropped its responder without answering").
    /// A call cancelled or expired meanwhile is stopped as usual; answering it
    /// afterwards does nothing. Until answered, the call counts against the
    /// per-connection and server-wide limits.
    ///
    /// ```no_run
    /// use teleport_server::Server;
    /// use teleport_protocol::{tree, Tree};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = Server::builder()
    ///     .bind_deferred("later", |args: Tree, responder| {
    ///         std::thread::spawn(move || {
    ///             std::thread::sleep(std::time::Duration::from_millis(10));
    ///             responder.respond(Ok(tree!({"echo": args})));
    ///         });
    ///     })
    ///     .listen("127.0.0.1:4433")
    ///     .await?;
    /// # let _ = server;
    /// # Ok(()) }
    /// ```
    pub fn bind_deferred<F>(self, name: impl Into<String>, function: F) -> Self
    where
        F: Fn(Tree, Responder) + Send + Sync + 'static,
    {
        self.insert(name.into(), Function::Deferred(Arc::new(function)))
    }

    /// Binds `name` as a queue: its calls wait in the returned [`CallQueue`]
    /// for the application to take them, with their [`Responder`]s, one at a
    /// time or as a batch of whatever is queued
    /// ([`recv_batch`](CallQueue::recv_batch), with
    /// [`stack_calls`](crate::stack_calls) to stack their arguments).
    ///
    /// At most `capacity` calls (at least 1) wait; more are refused with an
    /// `Overloaded` error, so a queue nobody takes from does not grow without
    /// bound. Calls cancelled while queued stay in the queue until taken;
    /// [`Responder::is_cancelled`] tells them apart.
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
        let (sender, queue) = call_queue(capacity);
        (self.insert(name.into(), Function::Queue(sender)), queue)
    }

    /// Binds a blocking function under `name` that serves many calls at once:
    /// concurrent calls of it, from any connection, are stacked into one
    /// tree whose arrays gain a leading axis of the batch size (ints, floats
    /// and bools become 1-d arrays; see [`teleport_protocol::batch`]), the
    /// function runs once on that tree, on the [`workers`](Self::workers)
    /// pool, and its result is split back along axis 0, one row per call.
    ///
    /// A batch starts as soon as `policy.max_batch` calls are queued, or when
    /// the oldest has waited `policy.max_wait`, so a lone call is served after
    /// `max_wait`. A call whose arguments differ in structure, dtype or shape
    /// from the rest of its batch gets its own `BadRequest` error and the others
    /// are served; strings and bytes stack as a list at their path, one element
    /// per call. Every array in the function's result must have the batch size
    /// as its leading dimension (and every list of strings or bytes the batch
    /// size as its length); otherwise, or if the function fails or panics, every call of
    /// the batch gets that error. Calls cancelled or expired before their
    /// batch runs are left out of it.
    ///
    /// [`listen`](Self::listen) fails with [`ServerError::BatchPolicy`] if
    /// `policy.max_batch` is 0.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use teleport_protocol::{tree, Array, Tree};
    /// use teleport_server::{BatchPolicy, Server};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// // Each call sends {"x": float32 array of shape [3]}; the function sees
    /// // shape [N, 3] for a batch of N calls and answers with shape [N].
    /// let policy = BatchPolicy { max_batch: 32, max_wait: Duration::from_millis(2) };
    /// let server = Server::builder()
    ///     .bind_batched("norm2", policy, |batch: Tree| {
    ///         let x = batch.get("x")?.as_array()?;
    ///         let sums: Vec<f32> =
    ///             x.as_slice::<f32>()?.chunks(3).map(|row| row.iter().map(|v| v * v).sum()).collect();
    ///         Ok(tree!((Array::from_vec1(sums))))
    ///     })
    ///     .listen("127.0.0.1:4433")
    ///     .await?;
    /// server.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn bind_batched<F>(self, name: impl Into<String>, policy: BatchPolicy, function: F) -> Self
    where
        F: Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static,
    {
        let batched = BatchedFunction::new(policy, BatchFn::Blocking(Arc::new(function)));
        self.insert(name.into(), Function::Batched(batched))
    }

    /// Like [`bind_batched`](Self::bind_batched), for an async function: it
    /// runs on the tokio runtime (so it must not block) and suits a batch
    /// that mostly waits, on another server or a device, say.
    pub fn bind_batched_async<F, Fut>(
        self,
        name: impl Into<String>,
        policy: BatchPolicy,
        function: F,
    ) -> Self
    where
        F: Fn(Tree) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
    {
        let function = BatchFn::Async(Arc::new(move |args| Box::pin(function(args))));
        self.insert(
            name.into(),
            Function::Batched(BatchedFunction::new(policy, function)),
        )
    }

    /// The server's certificate and key. Without one, the server makes a
    /// self-signed certificate for `localhost` and the bound IP address; print
    /// its [`fingerprint`](Server::fingerprint) for clients to pin.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Require client certificates (mutual TLS).
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
    /// connections. Default: the number of CPUs.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
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
        protocol.capacity = Some(Arc::new(Capacity::new(self.max_in_flight_total)));
        protocol.methods = Some(Arc::new(self.functions.keys().cloned().collect()));
        let shared = Arc::new(ServerShared::new(self.functions, protocol, self.workers));
        let batchers = start_batchers(&shared)?;
        let fingerprint = identity.fingerprint();
        let tls = ServerTls::new(identity).with_client_auth(self.client_auth);
        let listener = match bind_first(&addrs, &tls, &self.transport, &self.limits) {
            Ok(listener) => listener,
            Err(e) => {
                batchers.iter().for_each(JoinHandle::abort);
                return Err(e.into());
            }
        };
        Ok(Server::start(listener, fingerprint, shared, batchers))
    }
}

/// Binds the first of `addrs` that can be bound (a name may resolve to an
/// IPv6 and an IPv4 address, and only one may be available), or fails with
/// the first address's error.
fn bind_first(
    addrs: &[SocketAddr],
    tls: &ServerTls,
    transport: &TransportConfig,
    limits: &Limits,
) -> Result<Listener, TransportError> {
    let mut first_error = None;
    for &addr in addrs {
        match Listener::bind(addr, tls, transport, limits.clone()) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.expect("an address resolves to at least one socket address"))
}

/// Starts the task of every batched function, or fails if a policy cannot
/// work.
fn start_batchers(shared: &Arc<ServerShared>) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let mut batchers = Vec::new();
    for (method, (_, function)) in &shared.functions {
        if let Function::Batched(batched) = function {
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
