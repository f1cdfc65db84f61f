//! Functions with options: run on worker threads (blocking) or the runtime
//! (async), on the server's shared pool or a pool of their own, optionally
//! with a bound on their concurrent calls and an ordered completion hook.
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
use super::panic::{self, panic_error};
use super::spec::{AsyncBody, BlockingBody};
use super::{Context, JobFuture};
use crate::HandlerError;

/// What runs a call.
pub(crate) enum Body<B> {
    /// On a worker thread.
    Blocking(Arc<BlockingBody<B>>),
    /// On the runtime, in the call's task.
    Async(Arc<AsyncBody<B>>),
}

/// A function with options, its by-product type erased.
pub(crate) trait RunFunction: Send + Sync {
    /// Hands a call over: takes its places in the queues now, and returns
    /// the future that runs it and yields its result.
    fn start(
        &self,
        method: Arc<str>,
        args: Tree,
        ctx: Context,
        shared_workers: &Arc<Semaphore>,
    ) -> JobFuture;
}

/// A function returning a result and a by-product `B` for its hook (`()` and
/// no hook without one).
pub(crate) struct Runner<B> {
    body: Body<B>,
    /// `None`: the server's shared pool for a blocking function, no bound for
    /// an async one.
    own_workers: Option<Arc<Semaphore>>,
    /// Fair, so waiting calls are admitted in arrival order.
    admission: Option<Arc<Semaphore>>,
    hook: Option<Arc<HookQueue<B>>>,
}

impl<B: Send + 'static> Runner<B> {
    pub(crate) fn new(
        method: &str,
        body: Body<B>,
        own_workers: Option<usize>,
        admission: Option<usize>,
        hook: Option<Box<Hook<B>>>,
    ) -> Runner<B> {
        Runner {
            body,
            own_workers: own_workers.map(|n| Arc::new(Semaphore::new(n))),
            admission: admission.map(|n| Arc::new(Semaphore::new(n))),
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

/// Where a call waits before it starts.
enum Waits<B: Send + 'static> {
    /// Bounded admission: a slot first (kept with the hook turn), then a
    /// worker.
    Admission(Option<HookTicket<B>>, Queued),
    /// No bound: the hook turn and the worker's queue place are taken now.
    Worker(Option<HookTicket<B>>, Option<Queued>),
}

impl<B: Send + 'static> RunFunction for Runner<B> {
    fn start(
        &self,
        method: Arc<str>,
        args: Tree,
        ctx: Context,
        shared_workers: &Arc<Semaphore>,
    ) -> JobFuture {
        // An async function on the shared "pool" runs at once, as any async
        // function does.
        let pool = match (&self.own_workers, &self.body) {
            (Some(own), _) => Some(own.clone()),
            (None, Body::Blocking(_)) => Some(shared_workers.clone()),
            (None, Body::Async(_)) => None,
        };
        // The hook turn is taken now, in admission order, like the places in
        // the queues for a slot and a worker.
        let ticket = self.hook.as_ref().map(HookQueue::ticket);
        let waits = match &self.admission {
            Some(slots) => Waits::Admission(ticket, enqueue(slots)),
            None => Waits::Worker(ticket, pool.as_ref().map(enqueue)),
        };
        let body = match &self.body {
            Body::Blocking(f) => Body::Blocking(f.clone()),
            Body::Async(f) => Body::Async(f.clone()),
        };
        Box::pin(async move {
            let (mut ticket, admission, worker) = match waits {
                Waits::Admission(mut ticket, slot) => {
                    let slot = slot.await.map_err(|_| pool_closed())?;
                    // With a hook, the slot is kept until the call's hook ran.
                    // Slots go out in admission order, as turns do, so every
                    // earlier turn belongs to a call holding a slot or done
                    // with it: a hook never waits for a call that waits for a
                    // slot held by a call whose hook waits (no deadlock).
                    let slot = match ticket.as_mut() {
                        Some(ticket) => {
                            ticket.hold(slot);
                            None
                        }
                        None => Some(slot),
                    };
                    let worker = match &pool {
                        Some(pool) => Some(enqueue(pool).await.map_err(|_| pool_closed())?),
                        None => None,
                    };
                    (ticket, slot, worker)
                }
                Waits::Worker(ticket, worker) => {
                    let worker = match worker {
                        Some(worker) => Some(worker.await.map_err(|_| pool_closed())?),
                        None => None,
                    };
                    (ticket, None, worker)
                }
            };
            match body {
                Body::Async(function) => {
                    // It may panic making its future, or while the future runs.
                    let future = panic::catch(&method, || function(args, ctx))?;
                    let outcome = panic::catch_async(&method, future).await;
                    drop(worker);
                    let result = match outcome? {
                        Ok((tree, by_product)) => {
                            if let Some(ticket) = ticket.as_mut() {
                                ticket.by_product = Some(by_product);
                            }
                            Ok(tree)
                        }
                        Err(error) => Err(error.into_remote()),
                    };
                    drop(ticket);
                    drop(admission);
                    result
                }
                Body::Blocking(function) => {
                    let joined = tokio::task::spawn_blocking(move || {
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                function(args, ctx)
                            }));
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
                        // Hands the by-product to the hook queue (or skips this
                        // turn); the hook runs on another thread, so the result
                        // is not delayed.
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
                }
            }
        })
    }
}

impl<B> fmt::Debug for Runner<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field(
                "body",
                &match self.body {
                    Body::Blocking(_) => "blocking",
                    Body::Async(_) => "async",
                },
            )
            .field("own_workers", &self.own_workers)
            .field("admission", &self.admission)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}
