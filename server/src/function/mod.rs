//! Bound functions, and how a call reaches one.
//!
//! A connection hands every call to its function with [`Function::start`]
//! once the call's arguments are complete, synchronously, under the
//! connection's lock, in the order its state machine admitted the calls.
//! Everything that gives calls an order takes its place there and then: the
//! worker queue, the hook turn, the batch, the queue of a queue function, the
//! call of a deferred function. What comes back is the call's [`JobFuture`],
//! which the call's stream task awaits (and drops, to stop the call).

mod batched;
mod blocking;
mod deferred;
mod fifo;
mod hook;
mod panic;
mod queue;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use teleport_protocol::{RemoteError, Tree};
use tokio::sync::Semaphore;

pub(crate) use batched::{BatchFn, BatchedFunction};
pub(crate) use blocking::{Blocking, BlockingFunction};
pub use blocking::{FunctionOptions, Workers};
pub use deferred::Responder;
pub(crate) use hook::Hook;
pub(crate) use queue::{call_queue, QueueSender};
pub use queue::{stack_calls, CallQueue, QueuedCall, StackedCalls};

use crate::HandlerError;

/// What an async function's future yields.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Tree, HandlerError>> + Send>>;

/// An async function, type-erased.
pub(crate) type AsyncFn = dyn Fn(Tree) -> HandlerFuture + Send + Sync;

/// A blocking function, type-erased.
pub(crate) type BlockingFn = dyn Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync;

/// A deferred function, type-erased.
pub(crate) type DeferredFn = dyn Fn(Tree, Responder) + Send + Sync;

/// A call's result, as its caller receives it.
pub(crate) type Outcome = Result<Tree, RemoteError>;

/// The work of one call: awaited by its stream task, dropped to stop it.
pub(crate) type JobFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A bound function, type-erased.
#[derive(Clone)]
pub(crate) enum Function {
    /// Runs on the async runtime, in its call's stream task.
    Async(Arc<AsyncFn>),
    /// Runs on a worker thread.
    Blocking(Arc<dyn BlockingFunction>),
    /// Gets a responder and answers through it, now or later.
    Deferred(Arc<DeferredFn>),
    /// Its calls go to a queue the application takes them from.
    Queue(QueueSender),
    /// Runs on the stacked arguments of many calls at once.
    Batched(BatchedFunction),
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Function::Async(_) => "Function::Async",
            Function::Blocking(_) => "Function::Blocking",
            Function::Deferred(_) => "Function::Deferred",
            Function::Queue(_) => "Function::Queue",
            Function::Batched(_) => "Function::Batched",
        })
    }
}

impl Function {
    pub(crate) fn from_async<F, Fut>(f: F) -> Function
    where
        F: Fn(Tree) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
    {
        Function::Async(Arc::new(move |args| Box::pin(f(args))))
    }

    pub(crate) fn from_blocking<F>(method: &str, f: F) -> Function
    where
        F: Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static,
    {
        let function = Arc::new(move |args| f(args).map(|tree| (tree, ())));
        Function::Blocking(Arc::new(Blocking::<()>::new(
            method,
            FunctionOptions::new(),
            function,
            None,
        )))
    }

    /// Hands a call of the function bound as `method` over (see the [module
    /// docs](self)); its failure or panic becomes the `RemoteError` the caller
    /// receives, and a panic fails its own call, not the server.
    pub(crate) fn start(
        &self,
        method: &Arc<str>,
        args: Tree,
        workers: &Arc<Semaphore>,
    ) -> JobFuture {
        match self {
            Function::Async(f) => {
                let (f, method) = (f.clone(), method.clone());
                Box::pin(async move {
                    // It may panic making its future, or while the future runs.
                    let future = panic::catch(&method, || f(args))?;
                    panic::catch_async(&method, future)
                        .await?
                        .map_err(HandlerError::into_remote)
                })
            }
            Function::Blocking(f) => f.start(method.clone(), args, workers),
            Function::Deferred(f) => {
                let (responder, answer) = Responder::new();
                // The function only takes the responder: it runs here, in
                // admission order, and must return quickly.
                match panic::catch(method, || f(args, responder)) {
                    Ok(()) => Box::pin(answer.wait()),
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                }
            }
            Function::Queue(queue) => {
                let (responder, answer) = Responder::new();
                match queue.push(method, (args, responder)) {
                    Ok(()) => Box::pin(answer.wait()),
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                }
            }
            Function::Batched(f) => f.submit(method, args),
        }
    }
}
