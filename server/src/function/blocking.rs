//! Blocking functions: run on worker threads, on the server's shared pool or
//! a pool of their own, optionally with a bound on their concurrent calls and
//! an ordered completion hook.
//!
//! Every place a call waits for (an admission slot, a worker) is asked for when
//! the connection hands the call over, in admission order (see
//! [`fifo`](super::fifo)); and every slot moves into the worker thread with
//! the call, so a call cancelled while its thread runs keeps its slot until the
//! thread is done: the bounds hold for threads, not just for futures.

use std::fmt;
use std::sync::Arc;

use teleport_protocol::server::SERVER_ERROR_TYPE;
use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::Semaphore;

use super::fifo::{enqueue, Queued};
use super::hook::{Hook, HookQueue, HookTicket};
use super::panic::panic_error;
use super::JobFuture;
use crate::HandlerError;

/// Which worker threads run a blocking function's calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Workers {
    /// The server's pool, shared with every other blocking function (its size
    /// is [`ServerBuilder::workers`](crate::ServerBuilder::workers)).
    #[default]
    Shared,
    /// A pool of this many workers for this function alone, so that slow calls
    /// of other functions never hold up its calls (nor its calls theirs). Like
    /// the shared pool, it bounds how many threads of the runtime's blocking
    /// pool the function occupies at once; no thread is kept idle for it.
    Own(usize),
}

/// How a blocking function bound with
/// [`bind_blocking_with`](crate::ServerBuilder::bind_blocking_with) runs.
///
/// ```
/// use teleport_server::{FunctionOptions, Workers};
///
/// // Two threads of its own; at most two calls admitted, the others queue in
/// // arrival order.
/// let options = FunctionOptions::new().workers(Workers::Own(2)).max_concurrent(2);
/// # let _ = options;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionOptions {
    workers: Workers,
    max_concurrent: Option<usize>,
}

impl FunctionOptions {
    /// The shared worker pool and no bound of its own on concurrent calls:
    /// what [`bind_blocking`](crate::ServerBuilder::bind_blocking) does.
    pub fn new() -> FunctionOptions {
        FunctionOptions::default()
    }

    /// The pool the calls run on. `Workers::Own(0)` counts as one thread.
    pub fn workers(mut self, workers: Workers) -> FunctionOptions {
        self.workers = match workers {
            Workers::Own(n) => Workers::Own(n.max(1)),
            Workers::Shared => Workers::Shared,
        };
        self
    }

    /// Calls of this function admitted at once (at least 1); later calls wait
    /// for a slot in arrival order. With a completion hook, a call keeps its
    /// slot until its hook has run, so a slow hook slows the function down
    /// instead of piling up by-products.
    pub fn max_concurrent(mut self, max_concurrent: usize) -> FunctionOptions {
        self.max_concurrent = Some(max_concurrent.max(1));
        self
    }
}

pub(crate) type BlockingWithByProduct<B> =
    dyn Fn(Tree) -> Result<(Tree, B), HandlerError> + Send + Sync;

/// A blocking function, its by-product type erased.
pub(crate) trait BlockingFunction: Send + Sync {
    /// Hands a call over: takes its places in the queues now, and returns
    /// the future that runs it and yields its result.
    fn start(&self, method: Arc<str>, args: Tree, shared_workers: &Arc<Semaphore>) -> JobFuture;
}

/// A blocking function returning a result and a by-product `B` for its hook
/// (`()` and no hook without one).
pub(crate) struct Blocking<B> {
    function: Arc<BlockingWithByProduct<B>>,
    /// `None`: the server's shared pool.
    own_workers: Option<Arc<Semaphore>>,
    /// Fair, so waiting calls are admitted in arrival order.
    admission: Option<Arc<Semaphore>>,
    hook: Option<Arc<HookQueue<B>>>,
}

impl<B: Send + 'static> Blocking<B> {
    pub(crate) fn new(
        method: &str,
        options: FunctionOptions,
        function: Arc<BlockingWithByProduct<B>>,
        hook: Option<Box<Hook<B>>>,
    ) -> Blocking<B> {
        Blocking {
            function,
            own_workers: match options.workers {
                Workers::Shared => None,
                Workers::Own(n) => Some(Arc::new(Semaphore::new(n))),
            },
            admission: options.max_concurrent.map(|n| Arc::new(Semaphore::new(n))),
            hook: hook.map(|hook| Arc::new(HookQueue::new(method, hook))),
        }
    }
}

fn pool_closed() -> RemoteError {
    RemoteError::new(
        ErrorKind::ShuttingDown,
        SERVER_ERROR_TYPE,
        "the function's worker pool is closed",
    )
}

/// Where a call waits before its thread starts.
enum Waits<B: Send + 'static> {
    /// Bounded admission: a slot first, then (taking its hook turn) a worker.
    Admission(Queued),
    /// No bound: the hook turn and the worker's queue place are taken now.
    Worker(Option<HookTicket<B>>, Queued),
}

impl<B: Send + 'static> BlockingFunction for Blocking<B> {
    fn start(&self, method: Arc<str>, args: Tree, shared_workers: &Arc<Semaphore>) -> JobFuture {
        let pool = self.own_workers.as_ref().unwrap_or(shared_workers).clone();
        let waits = match &self.admission {
            Some(slots) => Waits::Admission(enqueue(slots)),
            None => Waits::Worker(
                self.hook.as_ref().map(|hook| HookQueue::ticket(hook, None)),
                enqueue(&pool),
            ),
        };
        let (function, hook) = (self.function.clone(), self.hook.clone());
        Box::pin(async move {
            let (mut ticket, admission, worker) = match waits {
                Waits::Admission(slot) => {
                    let slot = slot.await.map_err(|_| pool_closed())?;
                    // The hook turn is taken once a slot is held, so every
                    // earlier turn belongs to a call holding a slot: a hook
                    // never waits for a call that waits for a slot held by a
                    // call whose hook waits (no deadlock).
                    let (ticket, slot) = match &hook {
                        Some(hook) => (Some(HookQueue::ticket(hook, Some(slot))), None),
                        None => (None, Some(slot)),
                    };
                    let worker = enqueue(&pool).await.map_err(|_| pool_closed())?;
                    (ticket, slot, worker)
                }
                Waits::Worker(ticket, worker) => {
                    let worker = worker.await.map_err(|_| pool_closed())?;
                    (ticket, None, worker)
                }
            };
            let joined = tokio::task::spawn_blocking(move || {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| function(args)));
                drop(worker);
                let result = match outcome {
                    Ok(Ok((tree, by_product))) => {
                        if let Some(ticket) = ticket.as_mut() {
                            ticket.by_product = Some(by_product);
                        }
                        Ok(Ok(tree))
                    }
                    Ok(Err(error)) => Ok(Err(error)),
                    Err(panic) => Err(panic),
                };
                // Hands the by-product to the hook queue (or skips this turn);
                // the hook runs on another thread, so the result is not delayed.
                drop(ticket);
                drop(admission);
                result
            })
            .await;
            match joined {
                Ok(Ok(result)) => result.map_err(HandlerError::into_remote),
                Ok(Err(panic)) => Err(panic_error(&method, panic)),
                Err(_) => Err(RemoteError::new(
                    ErrorKind::Internal,
                    SERVER_ERROR_TYPE,
                    "the server stopped the function's thread",
                )),
            }
        })
    }
}

impl<B> fmt::Debug for Blocking<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blocking")
            .field("own_workers", &self.own_workers)
            .field("admission", &self.admission)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}
