//! The queue service: the reserved functions, bound as deferred functions on
//! a server, and the tasks of calls that wait.
//!
//! Each function runs when its call is admitted, takes the lock of the
//! [`State`] briefly and either answers at once or leaves a waiter and
//! spawns a task that awaits the waiter's channel, its timeout and its
//! call's cancellation. No worker thread is held while a call waits.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use teleport_protocol::batch::stack;
use teleport_protocol::{ErrorKind, Map, RemoteError, Tree};
use teleport_server::{Context, Function, Responder, ServerBuilder};

use crate::state::{AckSpec, Delivery, LeaseTicket, PullResult, Settle, State, Take};
use crate::wire::{self, int, Args, QUEUE_FULL};

/// The default [`QueueConfig::default_capacity`].
pub const DEFAULT_CAPACITY: usize = 1024;
/// The default [`QueueConfig::max_queues`].
pub const DEFAULT_MAX_QUEUES: usize = 10_000;
/// The default [`QueueConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 4096;

/// Settings of a [`QueueService`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueConfig {
    /// The capacity, in items, of a queue made by its first use (a push or
    /// a pull), rather than by `declare`. `None`: unbounded, so producers
    /// faster than their consumers grow the server's memory without limit.
    /// Default [`DEFAULT_CAPACITY`].
    pub default_capacity: Option<usize>,
    /// Queues the server holds at once; making more fails with
    /// [`TOO_MANY_QUEUES`](crate::wire::TOO_MANY_QUEUES). An empty queue
    /// made by its first use is forgotten, so this bounds queues that hold
    /// something, were declared, or were closed. Default [`DEFAULT_MAX_QUEUES`].
    pub max_queues: usize,
    /// The longest queue name, in bytes. Default 256.
    pub max_name_len: usize,
    /// The most items one `pull_batch` takes, whatever its `max`. Default
    /// [`DEFAULT_MAX_BATCH`].
    pub max_batch: usize,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            default_capacity: Some(DEFAULT_CAPACITY),
            max_queues: DEFAULT_MAX_QUEUES,
            max_name_len: 256,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

impl QueueConfig {
    /// The default settings with this [`default_capacity`](Self::default_capacity)
    /// (at least 1).
    pub fn with_default_capacity(mut self, capacity: Option<usize>) -> QueueConfig {
        self.default_capacity = capacity.map(|c| c.max(1));
        self
    }

    /// These settings with this [`max_queues`](Self::max_queues) (at least 1).
    pub fn with_max_queues(mut self, max_queues: usize) -> QueueConfig {
        self.max_queues = max_queues.max(1);
        self
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    config: QueueConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Named FIFO queues of trees, served as ordinary functions of a Teleport
/// server (see [`crate::wire`] for their names and messages).
///
/// [`install`](Self::install) binds the functions on a
/// [`ServerBuilder`], next to any others the server has; clients use them
/// through a [`QueueClient`](crate::QueueClient). Clones share the queues.
///
/// ```no_run
/// use teleport_protocol::Tree;
/// use teleport_queue::QueueService;
/// use teleport_server::Server;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let queues = QueueService::new();
/// let server = queues
///     .install(Server::builder())
///     .bind("echo", |args: Tree| async move { Ok(args) })
///     .listen("127.0.0.1:4433")
///     .await?;
/// println!("queues on {} ({})", server.local_addr(), server.fingerprint());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QueueService {
    shared: Arc<Shared>,
}

impl Default for QueueService {
    fn default() -> QueueService {
        QueueService::new()
    }
}

/// What a queue holds now, as [`QueueService::info`] and
/// [`QueueClient::len`](crate::QueueClient::len) report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Items queued (not counting leased ones).
    pub len: usize,
    /// Items out on acknowledged pulls, not yet acknowledged: they return
    /// to the queue if their consumer goes away.
    pub leased: usize,
    /// The most items queued and leased together; `None`: no bound.
    pub capacity: Option<usize>,
    /// Whether the queue was closed.
    pub closed: bool,
    /// Pulls waiting for an item now.
    pub waiting_pulls: usize,
    /// Pushes waiting for room now.
    pub waiting_pushes: usize,
}

impl QueueService {
    /// A service with the default [`QueueConfig`].
    pub fn new() -> QueueService {
        QueueService::with_config(QueueConfig::default())
    }

    /// A service with these settings.
    pub fn with_config(config: QueueConfig) -> QueueService {
        QueueService {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                config,
            }),
        }
    }

    /// Binds the queue functions ([`wire::FUNCTIONS`]) on `builder`.
    /// Binding one of their names yourself too makes `listen` fail with a
    /// duplicate name.
    pub fn install(&self, builder: ServerBuilder) -> ServerBuilder {
        let bind = |builder: ServerBuilder,
                    name: &'static str,
                    handler: fn(&Arc<Shared>, Tree, Responder)| {
            let shared = self.shared.clone();
            builder.bind(
                name,
                Function::deferred(move |args: Tree, responder: Responder| {
                    handler(&shared, args, responder)
                }),
            )
        };
        let builder = bind(builder, wire::PUSH, push);
        let builder = bind(builder, wire::PULL, |shared, args, responder| {
            pull(shared, args, responder, false)
        });
        let builder = bind(builder, wire::PULL_BATCH, |shared, args, responder| {
            pull(shared, args, responder, true)
        });
        let builder = bind(builder, wire::LEN, len);
        let builder = bind(builder, wire::CLOSE, close);
        let builder = bind(builder, wire::DECLARE, declare);
        bind(builder, wire::ACK, ack)
    }

    /// What the queue `name` holds now; `None` if it does not exist (it
    /// was never used, or was forgotten when it became empty).
    pub fn info(&self, name: &str) -> Option<QueueInfo> {
        self.shared.lock().get(name).map(|queue| QueueInfo {
            len: queue.items.len(),
            leased: queue.leased,
            capacity: queue.capacity,
            closed: queue.closed,
            waiting_pulls: queue.waiting_pulls(),
            waiting_pushes: queue.waiting_pushes(),
        })
    }

    /// The names of the queues that exist now, in no particular order.
    pub fn names(&self) -> Vec<String> {
        self.shared.lock().names()
    }
}

fn ok(map: Map) -> Tree {
    Tree::Map(map)
}

fn respond(responder: Responder, result: Result<Tree, RemoteError>) {
    match result {
        Ok(tree) => responder.respond(Ok(tree)),
        Err(error) => responder.respond_error(error),
    }
}

/// A timer that never fires without a duration.
async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

fn full_error(name: &str, capacity: Option<usize>, waited: Option<Duration>) -> RemoteError {
    let capacity = capacity.map_or_else(|| "its capacity".to_owned(), |c| format!("{c} items"));
    let message = match waited {
        None => format!(
            "the queue {name:?} is full ({capacity}); push with wait to wait for room, or retry later"
        ),
        Some(waited) => format!(
            "the queue {name:?} stayed full ({capacity}) for {waited:?}, the push's timeout; \
             its consumers are slower than its producers"
        ),
    };
    wire::error(ErrorKind::Overloaded, QUEUE_FULL, message)
}

/// `_queue.push {"queue", "item", "wait"?, "timeout"?}` -> `{"len"}`.
fn push(shared: &Arc<Shared>, args: Tree, responder: Responder) {
    let parsed = (|| {
        let args_view = Args::new(wire::PUSH, &args)?;
        let name = args_view.queue(shared.config.max_name_len)?.to_owned();
        let wait = args_view.flag("wait")?;
        let timeout = args_view.seconds("timeout")?;
        Ok::<_, RemoteError>((name, wait, timeout))
    })();
    let (name, wait, timeout) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return responder.respond_error(error),
    };
    // The item moves out of the arguments: its arrays are never copied.
    let Tree::Map(mut map) = args else {
        unreachable!("Args::new checked it is a map")
    };
    let Some(item) = map.remove("item") else {
        return responder.respond_error(wire::bad_arguments(
            wire::PUSH,
            "the item is missing (key \"item\")",
        ));
    };
    let mut state = shared.lock();
    let item = match state.push(&name, item, &shared.config) {
        Err(error) => return responder.respond_error(error),
        Ok(Ok(len)) => {
            drop(state);
            return respond_len(responder, len);
        }
        Ok(Err(item)) => item,
    };
    if !wait || timeout == Some(Duration::ZERO) {
        let capacity = state.get(&name).and_then(|queue| queue.capacity);
        return responder.respond_error(full_error(&name, capacity, None));
    }
    let (id, accepted) = state.wait_push(&name, item);
    drop(state);
    let shared = shared.clone();
    tokio::spawn(async move {
        let ctx = responder.context().clone();
        let mut accepted = accepted;
        let outcome = tokio::select! {
            outcome = &mut accepted => outcome,
            () = sleep_for(timeout) => {
                // `Some(capacity)` if it still waited.
                let withdrawn = {
                    let mut state = shared.lock();
                    state
                        .withdraw_push(&name, id)
                        .then(|| state.get(&name).and_then(|queue| queue.capacity))
                };
                if let Some(capacity) = withdrawn {
                    return responder.respond_error(full_error(&name, capacity, timeout));
                }
                // It went in (or failed) just now: the answer is in the channel.
                accepted.await
            }
            () = ctx.cancelled() => {
                // Nobody to tell. If the item went in meanwhile, it stays.
                shared.lock().withdraw_push(&name, id);
                return;
            }
        };
        match outcome {
            Ok(Ok(len)) => respond_len(responder, len),
            Ok(Err(error)) => responder.respond_error(error),
            Err(_) => responder.respond_error(internal("the waiting push was dropped")),
        }
    });
}

fn respond_len(responder: Responder, len: usize) {
    let mut map = Map::new();
    map.insert("len", int(len));
    responder.respond(Ok(ok(map)));
}

fn internal(what: &str) -> RemoteError {
    RemoteError::new(
        ErrorKind::Internal,
        "QueueInternal",
        format!("a bug in the queue service: {what}"),
    )
}

/// How one pull call is to be answered.
struct PullCall {
    name: String,
    take: Take,
    wait: Option<Duration>,
}

fn parse_pull(
    shared: &Shared,
    args: &Tree,
    ctx: &Context,
    batch: bool,
) -> Result<PullCall, RemoteError> {
    let function = if batch { wire::PULL_BATCH } else { wire::PULL };
    let args = Args::new(function, args)?;
    let name = args.queue(shared.config.max_name_len)?.to_owned();
    let (max, stack) = if batch {
        let max = args.count("max", 1)?.ok_or_else(|| {
            wire::bad_arguments(function, "the most items to take is missing (key \"max\")")
        })?;
        (max.min(shared.config.max_batch), args.flag("stack")?)
    } else {
        (1, false)
    };
    let ack = args.flag("ack")?.then_some(AckSpec {
        connection: ctx.connection_id(),
        timeout: args.seconds("ack_timeout")?,
    });
    Ok(PullCall {
        name,
        take: Take { max, stack, ack },
        wait: args.seconds("timeout")?.filter(|wait| !wait.is_zero()),
    })
}

/// `_queue.pull {"queue", "timeout"?, "ack"?, "ack_timeout"?}` and
/// `_queue.pull_batch {"queue", "max", "timeout"?, "stack"?, "ack"?,
/// "ack_timeout"?}` -> `{"items": [...], "lease"?}` or, stacked,
/// `{"count", "stacked", "lease"?}`.
fn pull(shared: &Arc<Shared>, args: Tree, responder: Responder, batch: bool) {
    let call = match parse_pull(shared, &args, responder.context(), batch) {
        Ok(call) => call,
        Err(error) => return responder.respond_error(error),
    };
    drop(args);
    let mut state = shared.lock();
    match state.pull(&call.name, call.take, &shared.config) {
        Err(error) => return responder.respond_error(error),
        Ok(Some(delivery)) => {
            drop(state);
            return finish_pull(shared, responder, &call, delivery);
        }
        Ok(None) => {}
    }
    if call.wait.is_none() {
        state.forget_if_idle(&call.name);
        drop(state);
        return finish_pull(shared, responder, &call, Delivery::empty());
    }
    let (id, delivered) = state.wait_pull(&call.name, call.take);
    drop(state);
    let shared = shared.clone();
    tokio::spawn(async move {
        let ctx = responder.context().clone();
        let mut delivered = delivered;
        let outcome: Option<PullResult> = tokio::select! {
            outcome = &mut delivered => outcome.ok(),
            () = sleep_for(call.wait) => {
                if shared.lock().withdraw_pull(&call.name, id) {
                    Some(Ok(Delivery::empty()))
                } else {
                    // Served (or failed) just now: the answer is in the channel.
                    delivered.await.ok()
                }
            }
            () = ctx.cancelled() => {
                if !shared.lock().withdraw_pull(&call.name, id) {
                    if let Ok(Ok(delivery)) = delivered.await {
                        shared.lock().give_back(&call.name, delivery);
                    }
                }
                return;
            }
        };
        match outcome {
            Some(Ok(delivery)) => finish_pull(&shared, responder, &call, delivery),
            Some(Err(error)) => responder.respond_error(error),
            None => responder.respond_error(internal("the waiting pull was dropped")),
        }
    });
}

impl Delivery {
    fn empty() -> Delivery {
        Delivery {
            items: Vec::new(),
            lease: None,
        }
    }
}

/// Answers a pull with its items. If nobody awaits the answer any more, the
/// items go back to the front of the queue; an acknowledged pull's lease is
/// watched until it is settled.
fn finish_pull(shared: &Arc<Shared>, responder: Responder, call: &PullCall, delivery: Delivery) {
    let Delivery { items, lease } = delivery;
    let lease_id = lease.as_ref().map(|ticket| ticket.id);
    let mut map = Map::new();
    // Stacking copies the arrays (once); keep the items to give them back.
    let kept = if call.take.stack {
        map.insert("count", int(items.len()));
        let stacked = if items.is_empty() {
            Tree::None
        } else {
            match stack(&items) {
                Ok(stacked) => stacked,
                Err(error) => {
                    // Only items of one layout are taken together, so only
                    // an array too large to stack fails here.
                    shared
                        .lock()
                        .give_back(&call.name, Delivery { items, lease });
                    return responder.respond_error(wire::error(
                        ErrorKind::OverLimit,
                        wire::BAD_ARGUMENTS,
                        format!("the items of {:?} cannot be stacked: {error}", call.name),
                    ));
                }
            }
        };
        map.insert("stacked", stacked);
        Some(items)
    } else {
        map.insert("items", Tree::List(items));
        None
    };
    if let Some(id) = lease_id {
        map.insert("lease", int(id));
    }
    let ctx = responder.context().clone();
    match responder.try_respond(ok(map)) {
        Ok(()) => {
            if let Some(ticket) = lease {
                tokio::spawn(watch_lease(shared.clone(), ticket, ctx.connection_closed()));
            }
        }
        Err(tree) => {
            let items = kept.unwrap_or_else(|| match tree {
                Tree::Map(mut map) => match map.remove("items") {
                    Some(Tree::List(items)) => items,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            });
            shared
                .lock()
                .give_back(&call.name, Delivery { items, lease });
        }
    }
}

/// Gives a lease's items back when its holder's connection ends or its ack
/// timeout passes, unless it is settled first.
async fn watch_lease(
    shared: Arc<Shared>,
    ticket: LeaseTicket,
    connection_closed: impl Future<Output = ()>,
) {
    let LeaseTicket {
        id,
        settled,
        timeout,
    } = ticket;
    tokio::select! {
        // Acknowledged or given back: the lease's sender was dropped.
        _ = settled => return,
        () = connection_closed => {}
        () = sleep_for(timeout) => {}
    }
    // Settled meanwhile (acknowledged just now): nothing to give back.
    let _ = shared.lock().settle(id, None, Settle::Requeue);
}

/// `_queue.len {"queue"}` -> `{"len", "leased", "capacity", "closed",
/// "waiting_pulls", "waiting_pushes"}`.
fn len(shared: &Arc<Shared>, args: Tree, responder: Responder) {
    let name = match Args::new(wire::LEN, &args).and_then(|a| a.queue(shared.config.max_name_len)) {
        Ok(name) => name,
        Err(error) => return responder.respond_error(error),
    };
    let state = shared.lock();
    let queue = state.get(name);
    let mut map = Map::new();
    map.insert("len", int(queue.map_or(0, |q| q.items.len())));
    map.insert("leased", int(queue.map_or(0, |q| q.leased)));
    let capacity = match queue {
        Some(queue) => queue.capacity,
        None => shared.config.default_capacity,
    };
    map.insert("capacity", capacity.map_or(Tree::None, int));
    map.insert("closed", queue.is_some_and(|q| q.closed));
    map.insert("waiting_pulls", int(queue.map_or(0, |q| q.waiting_pulls())));
    map.insert(
        "waiting_pushes",
        int(queue.map_or(0, |q| q.waiting_pushes())),
    );
    drop(state);
    responder.respond(Ok(ok(map)));
}

/// `_queue.close {"queue"}` -> `{"len"}` (the items left to drain).
fn close(shared: &Arc<Shared>, args: Tree, responder: Responder) {
    let result = Args::new(wire::CLOSE, &args)
        .and_then(|a| a.queue(shared.config.max_name_len))
        .and_then(|name| shared.lock().close(name, &shared.config));
    respond(
        responder,
        result.map(|len| {
            let mut map = Map::new();
            map.insert("len", int(len));
            ok(map)
        }),
    );
}

/// `_queue.declare {"queue", "capacity"?, "unbounded"?}` -> `{"created"}`.
fn declare(shared: &Arc<Shared>, args: Tree, responder: Responder) {
    let result = (|| {
        let args = Args::new(wire::DECLARE, &args)?;
        let name = args.queue(shared.config.max_name_len)?;
        let capacity = match (args.count("capacity", 1)?, args.flag("unbounded")?) {
            (Some(_), true) => {
                return Err(wire::bad_arguments(
                    wire::DECLARE,
                    "give a \"capacity\" or \"unbounded\", not both",
                ))
            }
            (Some(capacity), false) => Some(capacity),
            (None, true) => None,
            (None, false) => shared.config.default_capacity,
        };
        let created = shared.lock().declare(name, capacity, &shared.config)?;
        let mut map = Map::new();
        map.insert("created", created);
        Ok(ok(map))
    })();
    respond(responder, result);
}

/// `_queue.ack {"lease", "requeue"?}` -> `{"items"}` (how many the lease held).
fn ack(shared: &Arc<Shared>, args: Tree, responder: Responder) {
    let connection = responder.context().connection_id();
    let result = (|| {
        let args = Args::new(wire::ACK, &args)?;
        let lease = args.lease()?;
        let how = if args.flag("requeue")? {
            Settle::Requeue
        } else {
            Settle::Ack
        };
        let count = shared.lock().settle(lease, Some(connection), how)?;
        let mut map = Map::new();
        map.insert("items", int(count));
        Ok(ok(map))
    })();
    respond(responder, result);
}
