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
mod context;
mod deferred;
mod fifo;
mod hook;
mod panic;
mod queue;
mod spec;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use teleport_protocol::{RemoteError, Tree};
use tokio::sync::Semaphore;

pub(crate) use batched::BatchedFunction;
pub(crate) use blocking::RunFunction;
pub(crate) use context::ConnectionLife;
pub use context::Context;
pub use deferred::Responder;
pub(crate) use panic::panic_text;
pub use queue::{stack_calls, CallQueue, QueuedCall, StackedCalls};
pub(crate) use spec::Env;
pub use spec::{
    marker, AsyncHandler, Binding, BlockingHandler, Function, FunctionOutput, IntoFunction, Workers,
};

use crate::HandlerError;

/// What an async function's future yields.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Tree, HandlerError>> + Send>>;

/// An async function with no options, type-erased: it makes the whole work
/// of one call, catching its panics, as one future.
pub(crate) trait StartAsync: Send + Sync {
    fn start(&self, method: &Arc<str>, args: Tree, ctx: Context) -> JobFuture;
}

/// An async function of a batch, type-erased.
pub(crate) type BatchAsyncFn = dyn Fn(Tree) -> HandlerFuture + Send + Sync;

/// A blocking function of a batch, type-erased.
pub(crate) type BlockingFn = dyn Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync;

/// A deferred function, type-erased.
pub(crate) type DeferredFn = dyn Fn(Tree, Responder) + Send + Sync;

/// A call's result, as its caller receives it.
pub(crate) type Outcome = Result<Tree, RemoteError>;

/// The work of one call: awaited by its stream task, dropped to stop it.
pub(crate) type JobFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A bound function, type-erased: what a [`Function`] becomes at `listen`.
#[derive(Clone)]
pub(crate) enum BoundFunction {
    /// Runs on the async runtime, in its call's stream task, with no options.
    Async(Arc<dyn StartAsync>),
    /// Runs with options: on a worker thread or the runtime, with its pool,
    /// admission bound and hook.
    Runner(Arc<dyn RunFunction>),
    /// Gets a responder and answers through it, now or later.
    Deferred(Arc<DeferredFn>),
    /// Its calls go to a queue the application takes them from.
    Queue(queue::QueueSender),
    /// Runs on the stacked arguments of many calls at once.
    Batched(BatchedFunction),
}

impl fmt::Debug for BoundFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BoundFunction::Async(_) => "BoundFunction::Async",
            BoundFunction::Runner(_) => "BoundFunction::Runner",
            BoundFunction::Deferred(_) => "BoundFunction::Deferred",
            BoundFunction::Queue(_) => "BoundFunction::Queue",
            BoundFunction::Batched(_) => "BoundFunction::Batched",
        })
    }
}

impl BoundFunction {
    /// Hands a call of the function bound as `method` over (see the [module
    /// docs](self)); its failure or panic becomes the `RemoteError` the caller
    /// receives, and a panic fails its own call, not the server.
    pub(crate) fn start(
        &self,
        method: &Arc<str>,
        args: Tree,
        ctx: Context,
        workers: &Arc<Semaphore>,
    ) -> JobFuture {
        match self {
            BoundFunction::Async(f) => f.start(method, args, ctx),
            BoundFunction::Runner(f) => f.start(method.clone(), args, ctx, workers),
            BoundFunction::Deferred(f) => {
                let (responder, answer) = Responder::new(ctx);
                // The function only takes the responder: it runs here, in
                // admission order, and must return quickly.
                match panic::catch(method, || f(args, responder)) {
                    Ok(()) => Box::pin(answer.wait()),
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                }
            }
            BoundFunction::Queue(queue) => {
                let (responder, answer) = Responder::new(ctx);
                match queue.push(method, (args, responder)) {
                    Ok(()) => Box::pin(answer.wait()),
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                }
            }
            BoundFunction::Batched(f) => f.submit(method, args),
        }
    }
}
