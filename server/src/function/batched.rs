//! Batched functions: concurrent calls of one function, from any connection,
//! are stacked into one call of the function and its result split back.
//!
//! Each batched function has one task for the whole server that owns its
//! [`Batcher`] and drives it with real time. A call reaches it as a
//! [`BatchRequest`] over a channel (sent in admission order, so a batch's
//! members are in the order the calls were made), with a oneshot for its own
//! result, and waits on that oneshot in its stream's task like any other
//! function call, so admission, the in-flight limits, cancellation and
//! [`Server::check`] work as for unbatched functions.
//!
//! The channel is unbounded because every request in it is a call the server
//! admitted: the server-wide in-flight limit already bounds it.
//!
//! [`Server::check`]: crate::Server::check

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use teleport_protocol::batch::{split, stack_compatible};
use teleport_protocol::batcher::{BatchPolicy, BatchPolicyError, Batcher};
use teleport_protocol::server::SERVER_ERROR_TYPE;
use teleport_protocol::{ErrorKind, RemoteError, Timestamp, Tree};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::panic::panic_error;
use super::{BatchAsyncFn, BlockingFn, JobFuture};
use crate::HandlerError;

/// The type name of the error every member of a batch gets when the function's
/// result cannot be split back into one result per call.
pub(crate) const BATCH_RESULT_ERROR_TYPE: &str = "BatchResultError";

/// One call waiting for its batch.
struct BatchRequest {
    args: Tree,
    /// Dropped unanswered by the caller when the call is cancelled or expires
    /// (its connection drops the call's future), which is how the batch task
    /// learns to leave it out.
    reply: oneshot::Sender<Result<Tree, RemoteError>>,
}

/// A function bound with [`Function::batch`](crate::Function::batch).
#[derive(Clone)]
pub(crate) struct BatchedFunction {
    inner: Arc<Inner>,
}

/// The function of a batched binding.
#[derive(Clone)]
pub(crate) enum BatchFn {
    /// Runs on the worker pool.
    Blocking(Arc<BlockingFn>),
    /// Runs on the async runtime.
    Async(Arc<BatchAsyncFn>),
}

struct Inner {
    policy: BatchPolicy,
    function: BatchFn,
    /// A pool of its own for a blocking function; `None`: the server's.
    own_workers: Option<Arc<Semaphore>>,
    requests: mpsc::UnboundedSender<BatchRequest>,
    /// The receiving end until [`BatchedFunction::start`] hands it to the
    /// batch task: the builder runs outside any runtime, so the task can only
    /// be spawned when the server starts listening.
    unstarted: Mutex<Option<mpsc::UnboundedReceiver<BatchRequest>>>,
}

impl fmt::Debug for BatchedFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchedFunction")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl BatchedFunction {
    pub(crate) fn new(
        policy: BatchPolicy,
        function: BatchFn,
        own_workers: Option<usize>,
    ) -> BatchedFunction {
        let (requests, unstarted) = mpsc::unbounded_channel();
        BatchedFunction {
            inner: Arc::new(Inner {
                policy,
                function,
                own_workers: own_workers.map(|n| Arc::new(Semaphore::new(n))),
                requests,
                unstarted: Mutex::new(Some(unstarted)),
            }),
        }
    }

    /// Spawns the task that batches the calls of the function bound as
    /// `method`; the function runs on the `workers` pool. Fails if the policy
    /// cannot work. Must be called inside a tokio runtime, once. Once
    /// `shutdown` turns true, queued calls no longer wait for `max_wait`.
    pub(crate) fn start(
        &self,
        method: &str,
        workers: Arc<Semaphore>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Option<JoinHandle<()>>, BatchPolicyError> {
        let batcher = Batcher::new(self.inner.policy)?;
        let requests = self
            .inner
            .unstarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Already started: a builder is consumed by `listen`, so only a clone
        // of this handler could get here; its task is running.
        let Some(requests) = requests else {
            return Ok(None);
        };
        let job = BatchJob {
            method: Arc::from(method),
            function: self.inner.function.clone(),
            workers: self.inner.own_workers.clone().unwrap_or(workers),
        };
        Ok(Some(tokio::spawn(run_batcher(
            batcher, requests, job, shutdown,
        ))))
    }

    /// Queues `args` for the next batch now, in admission order, and returns
    /// the future of this call's part of the result. Dropping the future
    /// withdraws the call.
    pub(crate) fn submit(&self, method: &str, args: Tree) -> JobFuture {
        let (reply, result) = oneshot::channel();
        let stopped = {
            let method = method.to_owned();
            move || {
                RemoteError::new(
                    ErrorKind::ShuttingDown,
                    SERVER_ERROR_TYPE,
                    format!(
                        "the batched function {method:?} has stopped: the server is shutting down"
                    ),
                )
            }
        };
        if self
            .inner
            .requests
            .send(BatchRequest { args, reply })
            .is_err()
        {
            return Box::pin(std::future::ready(Err(stopped())));
        }
        Box::pin(async move { result.await.unwrap_or_else(|_| Err(stopped())) })
    }
}

/// What running one batch needs.
#[derive(Clone)]
struct BatchJob {
    method: Arc<str>,
    function: BatchFn,
    workers: Arc<Semaphore>,
}

/// Owns the batcher: queues requests as they arrive, hands each due batch to a
/// task of its own (so batches run in parallel on the worker pool, and a slow
/// batch does not hold up the next one's timer), and sleeps until the next
/// batch is due. Once the server shuts down, it runs whatever is queued at
/// once, so that draining calls do not wait out `max_wait`. Ends when every
/// sender is gone (the server was dropped) or when the server aborts it at the
/// end of its shutdown.
async fn run_batcher(
    mut batcher: Batcher<BatchRequest>,
    mut requests: mpsc::UnboundedReceiver<BatchRequest>,
    job: BatchJob,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let origin = Instant::now();
    let now = || Timestamp::from_duration(origin.elapsed());
    let mut draining = false;
    loop {
        loop {
            let batch = if draining {
                batcher.flush()
            } else {
                batcher.poll_batch(now())
            };
            let Some(batch) = batch else { break };
            tokio::spawn(run_batch(batch, job.clone()));
        }
        // `None` past the end of tokio's clock (a huge max_wait): only a new
        // request, or a flush at the end, releases the queue then.
        let due = batcher
            .poll_timeout()
            .and_then(|at| origin.checked_add(at.since_origin()));
        let request = tokio::select! {
            request = requests.recv() => request,
            _ = tokio::time::sleep_until(due.unwrap_or(origin)), if due.is_some() => continue,
            _ = &mut shutdown, if !draining => {
                draining = true;
                continue;
            }
        };
        let Some(request) = request else { break };
        let arrived = now();
        batcher.push(request, arrived);
        // Take everything already waiting in one go: one pass of the loop
        // per request would poll the batcher for nothing.
        while let Ok(request) = requests.try_recv() {
            batcher.push(request, arrived);
        }
    }
    while let Some(batch) = batcher.flush() {
        tokio::spawn(run_batch(batch, job.clone()));
    }
}

/// Runs one batch: a blocking function on a worker's thread (stacking and
/// splitting there too), an async one in this task.
async fn run_batch(batch: Vec<BatchRequest>, job: BatchJob) {
    let function = match &job.function {
        BatchFn::Blocking(function) => function.clone(),
        BatchFn::Async(function) => {
            // Stacking copies the arrays once, on the runtime: memcpy speed,
            // like decoding the calls did.
            if let Some((members, stacked)) = stack_batch(batch, &job.method) {
                let result = match std::panic::catch_unwind(AssertUnwindSafe(|| function(stacked)))
                {
                    Ok(future) => match AssertUnwindSafe(future).catch_unwind().await {
                        Ok(result) => result.map_err(HandlerError::into_remote),
                        Err(panic) => Err(panic_error(&job.method, panic)),
                    },
                    Err(panic) => Err(panic_error(&job.method, panic)),
                };
                answer(members, result, &job.method);
            }
            return;
        }
    };
    let Ok(permit) = job.workers.clone().acquire_owned().await else {
        let error = RemoteError::new(
            ErrorKind::ShuttingDown,
            SERVER_ERROR_TYPE,
            "the server's worker pool is closed",
        );
        for member in batch {
            let _ = member.reply.send(Err(error.clone()));
        }
        return;
    };
    // The blocking task answers every member itself; if it is lost (the
    // runtime shuts down), the dropped reply senders tell the callers.
    let _ = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        if let Some((members, stacked)) = stack_batch(batch, &job.method) {
            let result = match std::panic::catch_unwind(AssertUnwindSafe(|| function(stacked))) {
                Ok(result) => result.map_err(HandlerError::into_remote),
                Err(panic) => Err(panic_error(&job.method, panic)),
            };
            answer(members, result, &job.method);
        }
    })
    .await;
}

/// The reply routes of the members of a batch that were stacked, in row order.
type Members = Vec<oneshot::Sender<Result<Tree, RemoteError>>>;

/// Stacks the members that agree and answers every other one with its own
/// error. `None` if no member is left to run.
fn stack_batch(batch: Vec<BatchRequest>, method: &str) -> Option<(Members, Tree)> {
    // Cancelled or expired while queued or waiting for a worker: nobody is
    // waiting for these, so they do not take a row of the batch.
    let (args, replies): (Vec<Tree>, Vec<_>) = batch
        .into_iter()
        .filter(|member| !member.reply.is_closed())
        .map(|member| (member.args, member.reply))
        .unzip();
    if args.is_empty() {
        return None;
    }
    let size = args.len();
    // Copies each member's array bytes once, into the stacked arrays.
    let outcome = stack_compatible(&args);
    drop(args);
    let mut replies: Vec<Option<_>> = replies.into_iter().map(Some).collect();
    for (index, error) in outcome.rejected {
        if let Some(reply) = replies[index].take() {
            let _ = reply.send(Err(RemoteError::new(
                ErrorKind::BadRequest,
                SERVER_ERROR_TYPE,
                format!(
                    "the arguments of this call to the batched function {method:?} do not \
                     stack with the others in its batch of {size} calls (calls of a batched \
                     function must agree in structure, dtypes and shapes): {error}"
                ),
            )));
        }
    }
    let members = outcome
        .members
        .iter()
        .filter_map(|&index| replies[index].take())
        .collect();
    Some((members, outcome.stacked?))
}

/// Splits the function's result on the stacked arguments into one part per
/// member and sends each its part. The function's error or panic, or a result
/// that does not split, is every member's error.
fn answer(members: Members, result: Result<Tree, RemoteError>, method: &str) {
    let size = members.len();
    let parts = result.and_then(|result| {
        split(&result, size).map_err(|error| {
            RemoteError::new(
                ErrorKind::Handler,
                BATCH_RESULT_ERROR_TYPE,
                format!(
                    "the batched function {method:?} returned a result that cannot be split \
                     back into its {size} calls: every leaf of its result must be None or an \
                     array whose leading dimension equals the batch size {size} (one row per \
                     call); {error}"
                ),
            )
        })
    });
    match parts {
        Ok(parts) => {
            for (reply, part) in members.into_iter().zip(parts) {
                let _ = reply.send(Ok(part));
            }
        }
        Err(error) => {
            for reply in members {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
