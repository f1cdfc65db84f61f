//! The queue service: the reserved functions, bound as deferred functions on
//! a server, and the tasks of calls that wait.
//!
//! Each function runs when its call is admitted, takes the lock of the
//! [`State`] briefly and either answers at once or leaves a waiter and
//! spawns a task that awaits the waiter's channel, its timeout and its
//! call's cancellation. No worker thread is held while a call waits.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use teleport_protocol::batch::{stack, StackError};
use teleport_protocol::{ErrorKind, Map, RemoteError, Tree};
use teleport_server::{Context, Function, Responder, ServerBuilder};
use tokio::sync::watch;

use crate::config::{QueueConfig, QueueConfigError};
use crate::state::{AckSpec, Delivery, Item, LeaseTicket, Owner, PullResult, Settle, State, Take};
use crate::wire::{self, int, Args, QUEUE_FULL};

/// Numbers of [`QueueService::install`] calls in this process, so that
/// leases name the server (installation) as well as the connection.
static INSTALLATIONS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    config: QueueConfig,
    /// Counts changes of the state; see [`QueueService::changes`].
    changes: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            changes: &self.changes,
            changed: false,
        }
    }
}

/// The state, locked; tells [`QueueService::changes`] when it is released
/// after a change (any mutable use counts as one).
struct StateGuard<'a> {
    guard: MutexGuard<'a, State>,
    changes: &'a watch::Sender<u64>,
    changed: bool,
}

impl Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.changed = true;
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// One installation of a service on a server: the shared queues, and the
/// number that tells this server's connections from another's.
#[derive(Debug, Clone)]
struct Installed {
    shared: Arc<Shared>,
    installation: u64,
}

impl Installed {
    fn owner(&self, ctx: &Context) -> Owner {
        Owner {
            installation: self.installation,
            connection: ctx.connection_id(),
        }
    }

    fn lock(&self) -> StateGuard<'_> {
        self.shared.lock()
    }

    fn config(&self) -> &QueueConfig {
        &self.shared.config
    }
}

/// Named FIFO queues of trees, served as ordinary functions of a Teleport
/// server (see [`crate::wire`] for their names and messages).
///
/// [`install`](Self::install) binds the functions on a
/// [`ServerBuilder`], next to any others the server has; clients use them
/// through a [`QueueClient`](crate::QueueClient). Clones share the queues,
/// and one service may be installed on several servers: its queues are then
/// served by each, and a lease belongs to the connection (of the server)
/// that made it.
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
#[non_exhaustive]
pub struct QueueInfo {
    /// Items queued (not counting leased ones).
    pub len: usize,
    /// Items out on acknowledged pulls, not yet acknowledged: they return
    /// to the queue if their consumer goes away.
    pub leased: usize,
    /// The bytes the queued and leased items are counted for (see
    /// [`QueueConfig::max_queue_bytes`]).
    pub bytes: usize,
    /// The most items queued and leased together.
    pub capacity: usize,
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
        QueueService::with_valid_config(QueueConfig::default())
    }

    /// A service with these settings, if they are
    /// [valid](QueueConfig::validated).
    pub fn with_config(config: QueueConfig) -> Result<QueueService, QueueConfigError> {
        Ok(QueueService::with_valid_config(config.validated()?))
    }

    fn with_valid_config(config: QueueConfig) -> QueueService {
        QueueService {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(config.clone())),
                config,
                changes: watch::Sender::new(0),
            }),
        }
    }

    /// Binds the queue functions ([`wire::FUNCTIONS`]) on `builder`.
    /// Binding one of their names yourself too makes `listen` fail with a
    /// duplicate name.
    pub fn install(&self, builder: ServerBuilder) -> ServerBuilder {
        let installed = Installed {
            shared: self.shared.clone(),
            installation: INSTALLATIONS.fetch_add(1, Ordering::Relaxed),
        };
        let bind = |builder: ServerBuilder,
                    name: &'static str,
                    handler: fn(&Installed, Tree, Responder)| {
            let installed = installed.clone();
            builder.bind(
                name,
                Function::deferred(move |args: Tree, responder: Responder| {
                    handler(&installed, args, responder)
                }),
            )
        };
        let builder = bind(builder, wire::PUSH, push);
        let builder = bind(builder, wire::PULL, |installed, args, responder| {
            pull(installed, args, responder, false)
        });
        let builder = bind(builder, wire::PULL_BATCH, |installed, args, responder| {
            pull(installed, args, responder, true)
        });
        let builder = bind(builder, wire::LEN, len);
        let builder = bind(builder, wire::CLOSE, close);
        let builder = bind(builder, wire::DECLARE, declare);
        let builder = bind(builder, wire::ACK, ack);
        bind(builder, wire::RELEASE, release)
    }

    /// What the queue `name` holds now; `None` if it does not exist (it
    /// was never used, or was forgotten when it became empty). A closed
    /// queue forgotten once drained is reported empty and closed.
    pub fn info(&self, name: &str) -> Option<QueueInfo> {
        let state = self.shared.lock();
        info_of(&state, name)
    }

    /// The names of the queues that exist now, in no particular order
    /// (not those of closed queues forgotten once drained).
    pub fn names(&self) -> Vec<String> {
        self.shared.lock().names()
    }

    /// The bytes the items of every queue are counted for now (see
    /// [`QueueConfig::max_total_bytes`]).
    pub fn total_bytes(&self) -> usize {
        self.shared.lock().total_bytes()
    }

    /// A receiver that sees a new value each time the queues change (an
    /// item moves, a call starts or stops waiting, a lease is made or
    /// settled), for tests and monitors that wait for a state instead of
    /// polling it: check [`info`](Self::info), and if it is not there yet,
    /// await [`changed`](watch::Receiver::changed) and check again. Reading
    /// the state does not count as a change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}

fn info_of(state: &State, name: &str) -> Option<QueueInfo> {
    match state.get(name) {
        Some(queue) => Some(QueueInfo {
            len: queue.len(),
            leased: queue.leased,
            bytes: queue.bytes,
            capacity: queue.capacity,
            closed: queue.closed,
            waiting_pulls: queue.waiting_pulls(),
            waiting_pushes: queue.waiting_pushes(),
        }),
        None if state.is_closed_name(name) => Some(QueueInfo {
            len: 0,
            leased: 0,
            bytes: 0,
            capacity: state.config().default_capacity,
            closed: true,
            waiting_pulls: 0,
            waiting_pushes: 0,
        }),
        None => None,
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

/// Why a push of an item of `bytes` found no room: its queue's items or
/// bytes, the service's bytes, or earlier pushes waiting.
fn full_error(state: &State, name: &str, bytes: usize, waited: Option<Duration>) -> RemoteError {
    let config = state.config();
    let what = match state.get(name) {
        Some(queue) if queue.len() + queue.leased >= queue.capacity => {
            format!("it holds {} items, its capacity", queue.capacity)
        }
        Some(queue) if queue.bytes.saturating_add(bytes) > config.max_queue_bytes => format!(
            "it holds {} bytes and the item takes {bytes}, over the {} a queue may hold",
            queue.bytes, config.max_queue_bytes
        ),
        _ if state.total_bytes().saturating_add(bytes) > config.max_total_bytes => format!(
            "the server's queues hold {} bytes and the item takes {bytes}, over the {} they \
             may hold together",
            state.total_bytes(),
            config.max_total_bytes
        ),
        _ => "earlier pushes wait for room".to_owned(),
    };
    let message = match waited {
        None => format!(
            "the queue {name:?} is full ({what}); push with wait to wait for room, or retry later"
        ),
        Some(waited) => format!(
            "the queue {name:?} stayed full ({what}) for {waited:?}, the push's timeout; \
             its consumers are slower than its producers"
        ),
    };
    wire::error(ErrorKind::Overloaded, QUEUE_FULL, message)
}

/// `_queue.push {"queue", "item", "wait"?, "timeout"?}` -> `{"len"}`.
fn push(installed: &Installed, args: Tree, responder: Responder) {
    let parsed = (|| {
        let args_view = Args::new(wire::PUSH, &args)?;
        let name = args_view.queue(installed.config().max_name_len)?.to_owned();
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
    let mut state = installed.lock();
    let item = match state.push(&name, Item::new(item)) {
        Err(error) => return responder.respond_error(error),
        Ok(Ok(len)) => {
            drop(state);
            return respond_len(responder, len);
        }
        Ok(Err(item)) => item,
    };
    if !wait || timeout == Some(Duration::ZERO) {
        let error = full_error(&state, &name, item.bytes, None);
        state.forget_if_idle(&name);
        drop(state);
        return responder.respond_error(error);
    }
    let bytes = item.bytes;
    let (id, accepted) = state.wait_push(&name, item);
    drop(state);
    let shared = installed.shared.clone();
    tokio::spawn(async move {
        let ctx = responder.context().clone();
        let mut accepted = accepted;
        let outcome = tokio::select! {
            outcome = &mut accepted => outcome,
            () = sleep_for(timeout) => {
                // The error, if it still waited.
                let withdrawn = {
                    let mut state = shared.lock();
                    let error = full_error(&state, &name, bytes, timeout);
                    state.withdraw_push(&name, id).then_some(error)
                };
                if let Some(error) = withdrawn {
                    return responder.respond_error(error);
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
    installed: &Installed,
    args: &Tree,
    ctx: &Context,
    batch: bool,
) -> Result<PullCall, RemoteError> {
    let config = installed.config();
    let function = if batch { wire::PULL_BATCH } else { wire::PULL };
    let args = Args::new(function, args)?;
    let name = args.queue(config.max_name_len)?.to_owned();
    let (max, stack) = if batch {
        let max = args.count("max", 1)?.ok_or_else(|| {
            wire::bad_arguments(function, "the most items to take is missing (key \"max\")")
        })?;
        (max.min(config.max_batch), args.flag("stack")?)
    } else {
        (1, false)
    };
    let ack = if args.flag("ack")? {
        Some(AckSpec {
            owner: installed.owner(ctx),
            claim: args.number("claim")?,
            timeout: args.seconds("ack_timeout")?,
        })
    } else {
        None
    };
    Ok(PullCall {
        name,
        take: Take { max, stack, ack },
        wait: args.seconds("timeout")?.filter(|wait| !wait.is_zero()),
    })
}

/// `_queue.pull {"queue", "timeout"?, "ack"?, "ack_timeout"?, "claim"?}` and
/// `_queue.pull_batch {"queue", "max", "timeout"?, "stack"?, "ack"?,
/// "ack_timeout"?, "claim"?}` -> `{"items": [...], "lease"?}` or, stacked,
/// `{"count", "stacked", "lease"?}`.
fn pull(installed: &Installed, args: Tree, responder: Responder, batch: bool) {
    let call = match parse_pull(installed, &args, responder.context(), batch) {
        Ok(call) => call,
        Err(error) => return responder.respond_error(error),
    };
    drop(args);
    let shared = &installed.shared;
    let mut state = shared.lock();
    match state.pull(&call.name, call.take) {
        Err(error) => return responder.respond_error(error),
        Ok(Some(delivery)) => {
            drop(state);
            return finish_pull(shared, responder, call, delivery);
        }
        Ok(None) => {}
    }
    if call.wait.is_none() {
        state.forget_if_idle(&call.name);
        drop(state);
        return finish_pull(shared, responder, call, Delivery::empty());
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
            Some(Ok(delivery)) => finish_pull(&shared, responder, call, delivery),
            Some(Err(error)) => responder.respond_error(error),
            None => responder.respond_error(internal("the waiting pull was dropped")),
        }
    });
}

/// Answers a pull with its items. Stacking copies every array, so it runs
/// on a blocking thread, not in the call's task (nor under the connection's
/// lock, where deferred functions are called).
fn finish_pull(shared: &Arc<Shared>, responder: Responder, call: PullCall, delivery: Delivery) {
    if !call.take.stack {
        let Delivery { items, lease } = delivery;
        let trees = items.into_iter().map(|item| item.tree).collect();
        let mut map = Map::new();
        map.insert("items", Tree::List(trees));
        return reply(shared, responder, &call.name, map, None, lease);
    }
    if delivery.items.is_empty() {
        let mut map = Map::new();
        map.insert("count", int(0));
        map.insert("stacked", Tree::None);
        return reply(shared, responder, &call.name, map, None, delivery.lease);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let Delivery { items, lease } = delivery;
        let stacked = tokio::task::spawn_blocking(move || {
            let stacked = stack_prefix(&items);
            (items, stacked)
        })
        .await;
        let lease_id = lease.as_ref().map(|ticket| ticket.id);
        let (mut items, (count, stacked)) = match stacked {
            Ok(done) => done,
            Err(join) => {
                // The items went with the panicking thread: nothing to give
                // back but the lease's copies.
                if let Some(ticket) = lease {
                    let _ = shared.lock().settle(ticket.id, None, Settle::Requeue);
                }
                return responder.respond_error(internal(&format!("stacking failed: {join}")));
            }
        };
        let tail = items.split_off(count);
        shared.lock().give_back_tail(&call.name, lease_id, tail);
        match stacked {
            Ok(tree) => {
                let mut map = Map::new();
                map.insert("count", int(count));
                map.insert("stacked", tree);
                reply(&shared, responder, &call.name, map, Some(items), lease);
            }
            Err(error) => {
                shared
                    .lock()
                    .give_back(&call.name, Delivery { items, lease });
                responder.respond_error(wire::error(
                    ErrorKind::BadRequest,
                    wire::QUEUE_UNSTACKABLE,
                    format!(
                        "the item at the front of {:?} cannot be stacked ({error}); it stays \
                         there: pull it without stacking",
                        call.name
                    ),
                ));
            }
        }
    });
}

/// Stacks the longest prefix of `items` that stacks: `(count, stacked)`,
/// or `(0, error)` if not even the first item does.
fn stack_prefix(items: &[Item]) -> (usize, Result<Tree, StackError>) {
    let mut count = items.len();
    loop {
        match stack(&items[..count]) {
            Ok(tree) => return (count, Ok(tree)),
            Err(error) => {
                // The member that differs ends the prefix; an overflow (or
                // anything else) halves it.
                let shorter = match error.member() {
                    Some(member) if member > 0 && member < count => member,
                    _ => count / 2,
                };
                if shorter == 0 {
                    return (0, Err(error));
                }
                count = shorter;
            }
        }
    }
}

/// Sends a pull's reply. If nobody awaits it any more, its items go back to
/// the front of the queue. An acknowledged pull's lease is watched until it
/// is settled. `kept` holds the items of a stacked reply (whose tree holds
/// copies of them).
fn reply(
    shared: &Arc<Shared>,
    responder: Responder,
    name: &str,
    mut map: Map,
    kept: Option<Vec<Item>>,
    lease: Option<LeaseTicket>,
) {
    if let Some(ticket) = &lease {
        map.insert("lease", int(ticket.id));
    }
    let ctx = responder.context().clone();
    match responder.try_respond(ok(map)) {
        Ok(()) => {
            if let Some(ticket) = lease {
                tokio::spawn(watch_lease(shared.clone(), ticket, ctx));
            }
        }
        Err(tree) => {
            let items = kept.unwrap_or_else(|| match tree {
                Tree::Map(mut map) => match map.remove("items") {
                    Some(Tree::List(items)) => items.into_iter().map(Item::new).collect(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            });
            shared.lock().give_back(name, Delivery { items, lease });
        }
    }
}

/// Gives a lease's items back when its holder's connection ends, its ack
/// timeout passes, or its call is stopped after all (the reply was handed
/// over, but the call was cancelled, expired or its reply could not be
/// written before it left), unless it is settled first.
async fn watch_lease(shared: Arc<Shared>, ticket: LeaseTicket, ctx: Context) {
    let LeaseTicket {
        id,
        settled,
        timeout,
    } = ticket;
    let connection_closed = ctx.connection_closed();
    tokio::select! {
        // Acknowledged or given back: the lease's sender was dropped.
        _ = settled => return,
        () = connection_closed => {}
        () = ctx.cancelled() => {}
        () = sleep_for(timeout) => {}
    }
    // Settled meanwhile (acknowledged just now): nothing to give back.
    let _ = shared.lock().settle(id, None, Settle::Requeue);
}

/// `_queue.len {"queue"}` -> `{"len", "leased", "capacity", "closed",
/// "waiting_pulls", "waiting_pushes", "bytes"}`.
fn len(installed: &Installed, args: Tree, responder: Responder) {
    let name =
        match Args::new(wire::LEN, &args).and_then(|a| a.queue(installed.config().max_name_len)) {
            Ok(name) => name,
            Err(error) => return responder.respond_error(error),
        };
    let state = installed.lock();
    let info = info_of(&state, name);
    let capacity = state.config().default_capacity;
    drop(state);
    let info = info.unwrap_or(QueueInfo {
        len: 0,
        leased: 0,
        bytes: 0,
        capacity,
        closed: false,
        waiting_pulls: 0,
        waiting_pushes: 0,
    });
    let mut map = Map::new();
    map.insert("len", int(info.len));
    map.insert("leased", int(info.leased));
    map.insert("capacity", int(info.capacity));
    map.insert("closed", info.closed);
    map.insert("waiting_pulls", int(info.waiting_pulls));
    map.insert("waiting_pushes", int(info.waiting_pushes));
    map.insert("bytes", int(info.bytes));
    responder.respond(Ok(ok(map)));
}

/// `_queue.close {"queue"}` -> `{"len"}` (the items left to drain).
fn close(installed: &Installed, args: Tree, responder: Responder) {
    let result = Args::new(wire::CLOSE, &args)
        .and_then(|a| a.queue(installed.config().max_name_len))
        .map(|name| installed.lock().close(name));
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
fn declare(installed: &Installed, args: Tree, responder: Responder) {
    let config = installed.config();
    let result = (|| {
        let args = Args::new(wire::DECLARE, &args)?;
        let name = args.queue(config.max_name_len)?;
        let capacity = match (args.count("capacity", 1)?, args.flag("unbounded")?) {
            (Some(_), true) => {
                return Err(wire::bad_arguments(
                    wire::DECLARE,
                    "give a \"capacity\" or \"unbounded\", not both",
                ))
            }
            (Some(capacity), false) if capacity > config.max_capacity => {
                return Err(wire::bad_arguments(
                    wire::DECLARE,
                    format_args!(
                        "\"capacity\" {capacity} is over the {} items a queue of this server \
                         may hold (QueueConfig::max_capacity)",
                        config.max_capacity
                    ),
                ))
            }
            (Some(capacity), false) => capacity,
            (None, true) => config.max_capacity,
            (None, false) => config.default_capacity,
        };
        let created = installed.lock().declare(name, capacity)?;
        let mut map = Map::new();
        map.insert("created", created);
        Ok(ok(map))
    })();
    respond(responder, result);
}

/// `_queue.ack {"lease", "requeue"?}` -> `{"items"}` (how many the lease held).
fn ack(installed: &Installed, args: Tree, responder: Responder) {
    let owner = installed.owner(responder.context());
    let result = (|| {
        let args = Args::new(wire::ACK, &args)?;
        let lease = args.lease()?;
        let how = if args.flag("requeue")? {
            Settle::Requeue
        } else {
            Settle::Ack
        };
        let count = installed.lock().settle(lease, Some(owner), how)?;
        let mut map = Map::new();
        map.insert("items", int(count));
        Ok(ok(map))
    })();
    respond(responder, result);
}

/// `_queue.release {"queue", "claim"}` -> `{"items"}` (how many went back).
fn release(installed: &Installed, args: Tree, responder: Responder) {
    let owner = installed.owner(responder.context());
    let result = (|| {
        let args = Args::new(wire::RELEASE, &args)?;
        let name = args.queue(installed.config().max_name_len)?;
        let claim = args.number("claim")?.ok_or_else(|| {
            wire::bad_arguments(wire::RELEASE, "the claim is missing (key \"claim\")")
        })?;
        let count = installed.lock().release(name, owner, claim);
        let mut map = Map::new();
        map.insert("items", int(count));
        Ok(ok(map))
    })();
    respond(responder, result);
}

#[cfg(test)]
mod tests {
    use teleport_protocol::{tree, Array};

    use super::*;

    fn frame(shape: &[usize]) -> Item {
        let len = shape.iter().product();
        Item::new(tree!({"frame": (Array::from_vec(shape.to_vec(), vec![1.0f32; len]).unwrap())}))
    }

    #[test]
    fn a_stack_takes_the_longest_prefix_that_stacks() {
        let items = [frame(&[2]), frame(&[2]), frame(&[3]), frame(&[2])];
        let (count, stacked) = stack_prefix(&items);
        assert_eq!(count, 2);
        let stacked = stacked.unwrap();
        assert_eq!(
            stacked.get("frame").unwrap().as_array().unwrap().shape(),
            &[2, 2]
        );
        let (count, stacked) = stack_prefix(&items[2..3]);
        assert_eq!(count, 1);
        assert!(stacked.is_ok());
    }
}
