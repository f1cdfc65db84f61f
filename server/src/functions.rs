//! Blocking functions bound with options: a worker pool of their own, a bound on
//! how many of their calls run at once, and an ordered completion hook.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use teleport_protocol::server::SERVER_ERROR_TYPE;
use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::handler::{panic_error, panic_text, HandlerError};

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

type BlockingWithByProduct<B> = dyn Fn(Tree) -> Result<(Tree, B), HandlerError> + Send + Sync;
type Hook<B> = dyn Fn(B) + Send + Sync;

pub(crate) type PooledFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Tree, RemoteError>> + Send + 'a>>;

/// A blocking function with options, its by-product type erased.
pub(crate) trait PooledFunction: Send + Sync {
    fn call<'a>(
        &'a self,
        method: &'a str,
        args: Tree,
        shared_workers: &'a Arc<Semaphore>,
    ) -> PooledFuture<'a>;
}

/// A blocking function returning a result and a by-product `B` for its hook
/// (`()` and no hook for [`bind_blocking_with`](crate::ServerBuilder::bind_blocking_with)).
pub(crate) struct BlockingFunction<B> {
    function: Arc<BlockingWithByProduct<B>>,
    /// `None`: the server's shared pool.
    own_workers: Option<Arc<Semaphore>>,
    /// Fair, so waiting calls are admitted in arrival order.
    admission: Option<Arc<Semaphore>>,
    hook: Option<Arc<HookQueue<B>>>,
}

impl<B: Send + 'static> BlockingFunction<B> {
    pub(crate) fn new(
        method: &str,
        options: FunctionOptions,
        function: Arc<BlockingWithByProduct<B>>,
        hook: Option<Box<Hook<B>>>,
    ) -> BlockingFunction<B> {
        BlockingFunction {
            function,
            own_workers: match options.workers {
                Workers::Shared => None,
                Workers::Own(n) => Some(Arc::new(Semaphore::new(n))),
            },
            admission: options.max_concurrent.map(|n| Arc::new(Semaphore::new(n))),
            hook: hook.map(|hook| {
                Arc::new(HookQueue {
                    method: method.to_owned(),
                    hook,
                    state: Mutex::new(HookState {
                        next_ticket: 0,
                        next_to_run: 0,
                        finished: BTreeMap::new(),
                        draining: false,
                    }),
                })
            }),
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

impl<B: Send + 'static> PooledFunction for BlockingFunction<B> {
    fn call<'a>(
        &'a self,
        method: &'a str,
        args: Tree,
        shared_workers: &'a Arc<Semaphore>,
    ) -> PooledFuture<'a> {
        Box::pin(async move {
            let admission = match &self.admission {
                Some(slots) => Some(
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| pool_closed())?,
                ),
                None => None,
            };
            // Taken once admitted, so every earlier ticket belongs to a call
            // holding a slot: a hook never waits for a call that waits for a
            // slot held by a call whose hook waits (no deadlock).
            let (mut ticket, admission) = match &self.hook {
                Some(hook) => (Some(HookQueue::ticket(hook, admission)), None),
                None => (None, admission),
            };
            let pool = self.own_workers.as_ref().unwrap_or(shared_workers).clone();
            let worker = pool.acquire_owned().await.map_err(|_| pool_closed())?;
            let function = self.function.clone();
            // The slot, the worker and the ticket move into the thread: a call
            // cancelled while its function runs keeps them until it returns,
            // so the bounds hold for threads, not just for futures.
            let joined = tokio::task::spawn_blocking(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| function(args)));
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
                Ok(Err(panic)) => Err(panic_error(method, panic)),
                Err(_) => Err(RemoteError::new(
                    ErrorKind::Internal,
                    SERVER_ERROR_TYPE,
                    "the server stopped the function's thread",
                )),
            }
        })
    }
}

/// Runs a function's hook on its by-products strictly in the order the calls
/// were admitted, whatever order they finish in.
struct HookQueue<B> {
    method: String,
    hook: Box<Hook<B>>,
    state: Mutex<HookState<B>>,
}

struct HookState<B> {
    next_ticket: u64,
    /// The ticket whose hook runs next.
    next_to_run: u64,
    /// Calls finished out of turn, by ticket.
    finished: BTreeMap<u64, Finished<B>>,
    /// A thread is running hooks: at most one, which is what keeps them in order.
    draining: bool,
}

struct Finished<B> {
    /// `None`: the call failed, panicked or was dropped before it ran; its turn
    /// is skipped.
    by_product: Option<B>,
    /// Released only after the hook ran (backpressure).
    _admission: Option<OwnedSemaphorePermit>,
}

impl<B: Send + 'static> HookQueue<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HookState<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a turn. Must be called inside the runtime (it keeps its handle
    /// to start the hook thread from wherever the call finishes).
    fn ticket(queue: &Arc<Self>, admission: Option<OwnedSemaphorePermit>) -> HookTicket<B> {
        let number = {
            let mut state = queue.lock();
            state.next_ticket += 1;
            state.next_ticket - 1
        };
        HookTicket {
            queue: queue.clone(),
            number,
            by_product: None,
            admission,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs every hook whose turn has come, then stops (another finishing call
    /// starts the next drain).
    fn drain(&self) {
        loop {
            let mut finished = {
                let mut state = self.lock();
                let turn = state.next_to_run;
                match state.finished.remove(&turn) {
                    Some(finished) => {
                        state.next_to_run += 1;
                        finished
                    }
                    None => {
                        state.draining = false;
                        return;
                    }
                }
            };
            if let Some(by_product) = finished.by_product.take() {
                let hook = &self.hook;
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| hook(by_product)))
                {
                    tracing::error!(
                        method = %self.method,
                        panic = %panic_text(&*panic),
                        "a completion hook panicked; later hooks still run"
                    );
                }
            }
            // The admission slot is released here, after the hook.
            drop(finished);
        }
    }
}

/// A call's turn in its function's hook order. Dropping it hands over the
/// by-product (if set) and lets the next turns run.
struct HookTicket<B: Send + 'static> {
    queue: Arc<HookQueue<B>>,
    number: u64,
    by_product: Option<B>,
    admission: Option<OwnedSemaphorePermit>,
    runtime: tokio::runtime::Handle,
}

impl<B: Send + 'static> Drop for HookTicket<B> {
    fn drop(&mut self) {
        let start_drain = {
            let mut state = self.queue.lock();
            state.finished.insert(
                self.number,
                Finished {
                    by_product: self.by_product.take(),
                    _admission: self.admission.take(),
                },
            );
            let ready = state.finished.contains_key(&state.next_to_run);
            if ready && !state.draining {
                state.draining = true;
                true
            } else {
                false
            }
        };
        if start_drain {
            let queue = self.queue.clone();
            // Hooks may block; they get a thread of their own.
            drop(self.runtime.spawn_blocking(move || queue.drain()));
        }
    }
}

impl<B> fmt::Debug for BlockingFunction<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingFunction")
            .field("own_workers", &self.own_workers)
            .field("admission", &self.admission)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}
