//! The one way to describe a bound function: a closure for the common case,
//! or a [`Function`] with options that compose.

use std::any::TypeId;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use teleport_protocol::batcher::BatchPolicy;
use teleport_protocol::Tree;

use super::batched::{BatchFn, BatchedFunction};
use super::blocking::{Body, Runner};
use super::hook::Hook;
use super::queue::{call_queue, CallQueue, QueueSender};
use super::{panic, BoundFunction, Context, DeferredFn, JobFuture, Responder, StartAsync};
use crate::HandlerError;

/// What an async function's future yields, with its by-product.
pub(crate) type BodyFuture<B> =
    Pin<Box<dyn Future<Output = Result<(Tree, B), HandlerError>> + Send>>;

/// An async function, type-erased.
pub(crate) type AsyncBody<B> = dyn Fn(Tree, Context) -> BodyFuture<B> + Send + Sync;

/// A blocking function, type-erased.
pub(crate) type BlockingBody<B> =
    dyn Fn(Tree, Context) -> Result<(Tree, B), HandlerError> + Send + Sync;

/// Which worker threads run a function's calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Workers {
    /// A blocking function runs on the server's pool, shared with every other
    /// blocking function (its size is
    /// [`ServerBuilder::workers`](crate::ServerBuilder::workers)). An async
    /// function runs on the tokio runtime, as many calls at once as come.
    #[default]
    Shared,
    /// A pool of this many workers for this function alone, so that slow calls
    /// of other functions never hold up its calls (nor its calls theirs): for
    /// a blocking function, at most this many of the runtime's blocking
    /// threads at once (no thread is kept idle for it); for an async
    /// function, at most this many calls running at once. Waiting calls get a
    /// worker in the order they were made. `Own(0)` counts as one.
    Own(usize),
}

/// What a function returns on success: its result [`Tree`], or the result and
/// a by-product for its [`hook`](Function::hook).
pub trait FunctionOutput: Send + 'static {
    /// What the hook gets (`()` for a plain result).
    type ByProduct: Send + 'static;
    #[doc(hidden)]
    fn split(self) -> (Tree, Self::ByProduct);
}

impl FunctionOutput for Tree {
    type ByProduct = ();
    fn split(self) -> (Tree, ()) {
        (self, ())
    }
}

impl<B: Send + 'static> FunctionOutput for (Tree, B) {
    type ByProduct = B;
    fn split(self) -> (Tree, B) {
        self
    }
}

/// Markers telling apart the shapes of function a trait is implemented for
/// (as axum's handlers do). Never named by users.
pub mod marker {
    /// A function of the call's arguments.
    #[derive(Debug)]
    pub struct Args;
    /// A function of the call's arguments and its [`Context`](crate::Context).
    #[derive(Debug)]
    pub struct ArgsContext;
    /// A [`Function`](crate::Function).
    #[derive(Debug)]
    pub struct Described;
}
use marker::{Args, ArgsContext, Described};

/// An async function [`Function::new`] accepts: `Fn(Tree) -> impl Future` or
/// `Fn(Tree, Context) -> impl Future`, the future yielding
/// `Result<`[`FunctionOutput`]`, HandlerError>`.
pub trait AsyncHandler<M>: Send + Sync + 'static {
    /// What its hook gets.
    type ByProduct: Send + 'static;
    #[doc(hidden)]
    const TAKES_CONTEXT: bool;
    #[doc(hidden)]
    fn into_body(self) -> Arc<AsyncBody<Self::ByProduct>>;
}

impl<F, Fut, O> AsyncHandler<(Args, O)> for F
where
    F: Fn(Tree) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    O: FunctionOutput,
{
    type ByProduct = O::ByProduct;
    const TAKES_CONTEXT: bool = false;
    fn into_body(self) -> Arc<AsyncBody<O::ByProduct>> {
        Arc::new(move |args, _| {
            let future = self(args);
            Box::pin(async move { future.await.map(O::split) })
        })
    }
}

impl<F, Fut, O> AsyncHandler<(ArgsContext, O)> for F
where
    F: Fn(Tree, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    O: FunctionOutput,
{
    type ByProduct = O::ByProduct;
    const TAKES_CONTEXT: bool = true;
    fn into_body(self) -> Arc<AsyncBody<O::ByProduct>> {
        Arc::new(move |args, ctx| {
            let future = self(args, ctx);
            Box::pin(async move { future.await.map(O::split) })
        })
    }
}

/// A blocking function [`Function::blocking`] accepts: `Fn(Tree)` or
/// `Fn(Tree, Context)`, returning `Result<`[`FunctionOutput`]`, HandlerError>`.
pub trait BlockingHandler<M>: Send + Sync + 'static {
    /// What its hook gets.
    type ByProduct: Send + 'static;
    #[doc(hidden)]
    const TAKES_CONTEXT: bool;
    #[doc(hidden)]
    fn into_body(self) -> Arc<BlockingBody<Self::ByProduct>>;
}

impl<F, O> BlockingHandler<(Args, O)> for F
where
    F: Fn(Tree) -> Result<O, HandlerError> + Send + Sync + 'static,
    O: FunctionOutput,
{
    type ByProduct = O::ByProduct;
    const TAKES_CONTEXT: bool = false;
    fn into_body(self) -> Arc<BlockingBody<O::ByProduct>> {
        Arc::new(move |args, _| self(args).map(O::split))
    }
}

impl<F, O> BlockingHandler<(ArgsContext, O)> for F
where
    F: Fn(Tree, Context) -> Result<O, HandlerError> + Send + Sync + 'static,
    O: FunctionOutput,
{
    type ByProduct = O::ByProduct;
    const TAKES_CONTEXT: bool = true;
    fn into_body(self) -> Arc<BlockingBody<O::ByProduct>> {
        Arc::new(move |args, ctx| self(args, ctx).map(O::split))
    }
}

/// A bound function with its options: what
/// [`ServerBuilder::bind`](crate::ServerBuilder::bind) takes besides a plain
/// async closure.
///
/// Start from the kind of function, then add options; they compose:
///
/// | kind | made by | options |
/// | --- | --- | --- |
/// | async | [`new`](Self::new) | [`workers`](Self::workers), [`max_concurrent`](Self::max_concurrent), [`hook`](Self::hook), [`batch`](Self::batch) |
/// | blocking | [`blocking`](Self::blocking) | the same |
/// | deferred | [`deferred`](Self::deferred) | none |
/// | queue | [`queue`](Self::queue) | none |
///
/// Every function may take the call's [`Context`] as a second argument.
/// Options a kind does not support, and combinations that cannot work, make
/// [`listen`](crate::ServerBuilder::listen) fail with
/// [`ServerError::InvalidFunction`](crate::ServerError::InvalidFunction),
/// saying which; a by-product without a hook is a compile error where the
/// types tell (a closure returning `(Tree, B)` bound directly) and that error
/// otherwise.
///
/// ```
/// use teleport_protocol::{tree, Tree};
/// use teleport_server::{Context, Function, Server, Workers};
///
/// let builder = Server::builder()
///     // Two threads of its own; at most two calls admitted, the others wait
///     // in the order they were made.
///     .bind(
///         "solve",
///         Function::blocking(|args: Tree| Ok(args))
///             .workers(Workers::Own(2))
///             .max_concurrent(2),
///     )
///     // An ordered completion hook on a by-product.
///     .bind(
///         "step",
///         Function::blocking(|args: Tree, ctx: Context| {
///             Ok((tree!(1), ctx.agent().to_owned()))
///         })
///         .hook(|agent: String| println!("a step for {agent} is done")),
///     );
/// # let _ = builder;
/// ```
pub struct Function<B = ()> {
    kind: Kind<B>,
    takes_context: bool,
    workers: Workers,
    max_concurrent: Option<usize>,
    hook: Option<Box<Hook<B>>>,
    bounded_backlog: bool,
    batch: Option<BatchPolicy>,
}

enum Kind<B> {
    Async(Arc<AsyncBody<B>>),
    Blocking(Arc<BlockingBody<B>>),
    Deferred(Arc<DeferredFn>),
    Queue(QueueSender),
}

impl<B> Kind<B> {
    fn name(&self) -> &'static str {
        match self {
            Kind::Async(_) => "async",
            Kind::Blocking(_) => "blocking",
            Kind::Deferred(_) => "deferred",
            Kind::Queue(_) => "queue",
        }
    }
}

impl<B> fmt::Debug for Function<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("kind", &self.kind.name())
            .field("takes_context", &self.takes_context)
            .field("workers", &self.workers)
            .field("max_concurrent", &self.max_concurrent)
            .field("hook", &self.hook.is_some())
            .field("bounded_backlog", &self.bounded_backlog)
            .field("batch", &self.batch)
            .finish()
    }
}

impl<B: Send + 'static> Function<B> {
    fn of(kind: Kind<B>, takes_context: bool) -> Function<B> {
        Function {
            kind,
            takes_context,
            workers: Workers::Shared,
            max_concurrent: None,
            hook: None,
            bounded_backlog: true,
            batch: None,
        }
    }

    /// An async function: `Fn(Tree)` or `Fn(Tree, Context)` returning a
    /// future. It runs on the tokio runtime, so it must not block; use
    /// [`blocking`](Self::blocking) for work that does. Bound as is, it is
    /// what [`bind`](crate::ServerBuilder::bind) makes of a closure.
    pub fn new<M>(function: impl AsyncHandler<M, ByProduct = B>) -> Function<B> {
        let takes_context = function_takes_context_async(&function);
        Function::of(Kind::Async(function.into_body()), takes_context)
    }

    /// A blocking function: `Fn(Tree)` or `Fn(Tree, Context)`. Its calls run
    /// on worker threads, at most [`workers`](crate::ServerBuilder::workers)
    /// at once across the server (or on a pool of its own, see
    /// [`workers`](Self::workers)), so they run in parallel and never stall
    /// the network.
    pub fn blocking<M>(function: impl BlockingHandler<M, ByProduct = B>) -> Function<B> {
        let takes_context = function_takes_context_blocking(&function);
        Function::of(Kind::Blocking(function.into_body()), takes_context)
    }

    /// The pool the calls run on (see [`Workers`]). Default: shared.
    pub fn workers(mut self, workers: Workers) -> Function<B> {
        self.workers = match workers {
            Workers::Own(n) => Workers::Own(n.max(1)),
            Workers::Shared => Workers::Shared,
        };
        self
    }

    /// Calls of this function admitted at once (at least 1); later calls wait
    /// for a slot in the order they were made. With a [`hook`](Self::hook), a
    /// call keeps its slot until its hook has run. The server-wide and
    /// per-connection limits apply as to any call.
    pub fn max_concurrent(mut self, max_concurrent: usize) -> Function<B> {
        self.max_concurrent = Some(max_concurrent.max(1));
        self
    }

    /// An ordered completion hook (Teleport's `donefn`, Portal's `postfn`):
    /// the function returns `(result, by_product)`; the result goes to the
    /// caller at once, and `hook` runs on the by-products one at a time, on a
    /// thread of its own, strictly in the order the calls were admitted,
    /// whatever order they finish in.
    ///
    /// The backlog is bounded, as in Teleport and Portal: a call keeps its
    /// admission slot until its hook has run, and without
    /// [`max_concurrent`](Self::max_concurrent) there are `workers + 1` slots
    /// (the function's own pool, or the server's
    /// [`workers`](crate::ServerBuilder::workers)), so calls started never
    /// run more than `workers + 1` ahead of the hooks finished and a slow hook
    /// slows the function instead of letting by-products pile up.
    /// [`unbounded_hook_backlog`](Self::unbounded_hook_backlog) turns that off.
    ///
    /// A call that fails, panics, or is cancelled before its function runs
    /// gives the hook nothing and does not hold up the hooks after it. A call
    /// cancelled while a blocking function runs still hands its by-product to
    /// the hook (the work was done); an async function's future is dropped.
    /// A panicking hook is logged and later hooks run.
    pub fn hook(mut self, hook: impl Fn(B) + Send + Sync + 'static) -> Function<B> {
        self.hook = Some(Box::new(hook));
        self
    }

    /// Lets calls run ahead of their [`hook`](Self::hook)s without bound
    /// (unless [`max_concurrent`](Self::max_concurrent) is set): the
    /// by-products of fast calls may then pile up behind a slow hook.
    pub fn unbounded_hook_backlog(mut self) -> Function<B> {
        self.bounded_backlog = false;
        self
    }
}

fn function_takes_context_async<M, H: AsyncHandler<M>>(_: &H) -> bool {
    H::TAKES_CONTEXT
}

fn function_takes_context_blocking<M, H: BlockingHandler<M>>(_: &H) -> bool {
    H::TAKES_CONTEXT
}

impl Function<()> {
    /// A function that answers later: it gets the call's arguments and a
    /// [`Responder`], keeps the responder (in a queue, another thread, a task)
    /// and answers through it when it can; the call's [`Context`] is
    /// [`Responder::context`]. The function itself runs on the async runtime,
    /// in the order the calls were admitted, and must return quickly.
    ///
    /// A responder dropped without answering fails the call with an error of
    /// kind `Handler` ("the function dropped its responder without answering").
    /// A call cancelled or expired meanwhile is stopped as usual; answering it
    /// afterwards does nothing. Until answered, the call counts against the
    /// per-connection and server-wide limits.
    ///
    /// ```no_run
    /// use teleport_server::{Function, Server};
    /// use teleport_protocol::{tree, Tree};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = Server::builder()
    ///     .bind("later", Function::deferred(|args: Tree, responder| {
    ///         std::thread::spawn(move || {
    ///             std::thread::sleep(std::time::Duration::from_millis(10));
    ///             responder.respond(Ok(tree!({"echo": args})));
    ///         });
    ///     }))
    ///     .listen("127.0.0.1:4433")
    ///     .await?;
    /// # let _ = server;
    /// # Ok(()) }
    /// ```
    pub fn deferred(function: impl Fn(Tree, Responder) + Send + Sync + 'static) -> Function<()> {
        Function::of(Kind::Deferred(Arc::new(function)), true)
    }

    /// A queue: the function's calls wait in the returned [`CallQueue`] for
    /// the application to take them, with their [`Responder`]s, one at a
    /// time or as a batch of whatever is queued
    /// ([`recv_batch`](CallQueue::recv_batch), with
    /// [`stack_calls`](crate::stack_calls) to stack their arguments).
    /// [`ServerBuilder::bind_queue`](crate::ServerBuilder::bind_queue) binds
    /// one in a single step.
    ///
    /// At most `capacity` calls (at least 1) wait; more are refused with an
    /// `Overloaded` error, so a queue nobody takes from does not grow without
    /// bound. Calls cancelled while queued stay in the queue until taken;
    /// [`Responder::is_cancelled`] tells them apart.
    pub fn queue(capacity: usize) -> (Function<()>, CallQueue) {
        let (sender, queue) = call_queue(capacity);
        (Function::of(Kind::Queue(sender), true), queue)
    }

    /// Serves many calls at once: concurrent calls of the function, from any
    /// connection, are stacked into one tree whose arrays gain a leading axis
    /// of the batch size (ints, floats and bools become 1-d arrays; see
    /// [`teleport_protocol::batch`]), the function runs once on that tree
    /// (a blocking one on its [`workers`](Self::workers) pool), and its result
    /// is split back along axis 0, one row per call.
    ///
    /// A batch starts as soon as `policy.max_batch` calls are queued, or when
    /// the oldest has waited `policy.max_wait`, so a lone call is served after
    /// `max_wait`. A call whose arguments differ in structure, dtype or shape
    /// from the rest of its batch gets its own `BadRequest` error and the
    /// others are served; strings and bytes stack as a list at their path, one
    /// element per call. Every array in the function's result must have the
    /// batch size as its leading dimension (and every list of strings or bytes
    /// the batch size as its length); otherwise, or if the function fails or
    /// panics, every call of the batch gets that error. Calls cancelled or
    /// expired before their batch runs are left out of it.
    ///
    /// A batch serves many calls, so its function takes no [`Context`], and
    /// neither a hook nor `max_concurrent` applies; nor does an own pool for
    /// an async function. [`listen`](crate::ServerBuilder::listen) fails with
    /// [`ServerError::BatchPolicy`](crate::ServerError::BatchPolicy) if
    /// `policy.max_batch` is 0.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use teleport_protocol::{tree, Array, Tree};
    /// use teleport_server::{BatchPolicy, Function, Server};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// // Each call sends {"x": float32 array of shape [3]}; the function sees
    /// // shape [N, 3] for a batch of N calls and answers with shape [N].
    /// let policy = BatchPolicy { max_batch: 32, max_wait: Duration::from_millis(2) };
    /// let norm2 = Function::blocking(|batch: Tree| {
    ///     let x = batch.get("x")?.as_array()?;
    ///     let sums: Vec<f32> =
    ///         x.as_slice::<f32>()?.chunks(3).map(|row| row.iter().map(|v| v * v).sum()).collect();
    ///     Ok(tree!((Array::from_vec1(sums))))
    /// });
    /// let server = Server::builder()
    ///     .bind("norm2", norm2.batch(policy))
    ///     .listen("127.0.0.1:4433")
    ///     .await?;
    /// server.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn batch(mut self, policy: BatchPolicy) -> Function<()> {
        self.batch = Some(policy);
        self
    }
}

/// What a [`Function`] becomes once the server knows its settings.
pub(crate) struct Env {
    /// The size of the server's shared worker pool.
    pub(crate) shared_workers: usize,
}

/// A function ready to be bound, type-erased; made into the server's
/// function at [`listen`](crate::ServerBuilder::listen).
pub struct Binding(Box<Resolve>);

/// Makes the server's function for the name it is bound as, or says why not.
type Resolve = dyn FnOnce(&str, &Env) -> Result<BoundFunction, String> + Send;

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Binding")
    }
}

impl Binding {
    pub(crate) fn resolve(self, method: &str, env: &Env) -> Result<BoundFunction, String> {
        (self.0)(method, env)
    }
}

/// What [`ServerBuilder::bind`](crate::ServerBuilder::bind) accepts: an async
/// closure `Fn(Tree)` or `Fn(Tree, Context)` whose future yields
/// `Result<Tree, HandlerError>`, or a [`Function`] with options. The marker
/// `M` only tells the implementations apart; it is inferred.
pub trait IntoFunction<M> {
    /// The function, ready to be bound.
    fn into_binding(self) -> Binding;
}

impl<F, Fut> IntoFunction<(Args,)> for F
where
    F: Fn(Tree) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
{
    fn into_binding(self) -> Binding {
        Function::new(self).into_binding()
    }
}

impl<F, Fut> IntoFunction<(ArgsContext,)> for F
where
    F: Fn(Tree, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
{
    fn into_binding(self) -> Binding {
        Function::new(self).into_binding()
    }
}

impl<B: Send + 'static> IntoFunction<Described> for Function<B> {
    fn into_binding(self) -> Binding {
        Binding(Box::new(move |method, env| self.resolve(method, env)))
    }
}

impl<B: Send + 'static> Function<B> {
    /// Checks the options and makes the server's function.
    fn resolve(self, method: &str, env: &Env) -> Result<BoundFunction, String> {
        let kind = self.kind.name();
        let has_options = self.workers != Workers::Shared
            || self.max_concurrent.is_some()
            || self.hook.is_some()
            || !self.bounded_backlog
            || self.batch.is_some();
        if self.hook.is_none() && TypeId::of::<B>() != TypeId::of::<()>() {
            return Err("the function returns a by-product but has no hook to take it".into());
        }
        if matches!(self.kind, Kind::Deferred(_) | Kind::Queue(_)) && has_options {
            return Err(format!(
                "a {kind} function takes no options (workers, max_concurrent, hook, batch)"
            ));
        }
        if let Some(policy) = self.batch {
            if self.hook.is_some() || self.max_concurrent.is_some() || !self.bounded_backlog {
                return Err("a batched function takes no hook and no max_concurrent".into());
            }
            if self.takes_context {
                return Err(
                    "a batched function serves many calls at once, so it takes no Context".into(),
                );
            }
            let (function, own) = match self.kind {
                Kind::Blocking(body) => {
                    let own = match self.workers {
                        Workers::Own(n) => Some(n),
                        Workers::Shared => None,
                    };
                    let function = BatchFn::Blocking(Arc::new(move |args| {
                        body(args, Context::detached()).map(|(tree, _)| tree)
                    }));
                    (function, own)
                }
                Kind::Async(body) => {
                    if self.workers != Workers::Shared {
                        return Err("a batched async function has no worker pool".into());
                    }
                    let function = BatchFn::Async(Arc::new(move |args| {
                        let future = body(args, Context::detached());
                        Box::pin(async move { future.await.map(|(tree, _)| tree) })
                    }));
                    (function, None)
                }
                _ => return Err(format!("a {kind} function cannot be batched")),
            };
            return Ok(BoundFunction::Batched(BatchedFunction::new(
                policy, function, own,
            )));
        }
        let body = match self.kind {
            Kind::Deferred(function) => return Ok(BoundFunction::Deferred(function)),
            Kind::Queue(sender) => return Ok(BoundFunction::Queue(sender)),
            Kind::Async(body) if !has_options => return Ok(plain_async(body)),
            Kind::Async(body) => Body::Async(body),
            Kind::Blocking(body) => Body::Blocking(body),
        };
        let pool = match (self.workers, &body) {
            (Workers::Own(n), _) => n,
            (Workers::Shared, _) => env.shared_workers,
        };
        let admission = match (self.max_concurrent, &self.hook) {
            (Some(n), _) => Some(n),
            (None, Some(_)) if self.bounded_backlog => Some(pool + 1),
            (None, _) => None,
        };
        let own = match self.workers {
            Workers::Own(n) => Some(n),
            Workers::Shared => None,
        };
        Ok(BoundFunction::Runner(Arc::new(Runner::new(
            method, body, own, admission, self.hook,
        ))))
    }
}

/// An async function with no options: it runs in its call's task, with
/// nothing to wait for.
fn plain_async<B: Send + 'static>(body: Arc<AsyncBody<B>>) -> BoundFunction {
    BoundFunction::Async(Arc::new(PlainAsync(body)))
}

/// See [`plain_async`]: one future per call besides the function's own.
struct PlainAsync<B>(Arc<AsyncBody<B>>);

impl<B: Send + 'static> StartAsync for PlainAsync<B> {
    fn start(&self, method: &Arc<str>, args: Tree, ctx: Context) -> JobFuture {
        let (body, method) = (self.0.clone(), method.clone());
        Box::pin(async move {
            // It may panic making its future, or while the future runs.
            let future = panic::catch(&method, || body(args, ctx))?;
            panic::catch_async(&method, future)
                .await?
                .map(|(tree, _)| tree)
                .map_err(HandlerError::into_remote)
        })
    }
}
