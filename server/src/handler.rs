//! Bound functions and the errors they return.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use teleport_protocol::server::SERVER_ERROR_TYPE;
use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::Semaphore;

use crate::batched::BatchedFunction;
use crate::deferred::Responder;
use crate::functions::PooledFunction;
use crate::queue::QueueSender;

/// What a bound function returns when it fails: a type name and a message,
/// delivered to the caller as a [`RemoteError`] of kind `Handler`.
///
/// Any `std::error::Error` converts into it with `?`, keeping its type name.
pub struct HandlerError {
    type_name: String,
    message: String,
}

impl HandlerError {
    /// An error with the type name `"Error"` and this message.
    pub fn new(message: impl Into<String>) -> HandlerError {
        HandlerError::with_type("Error", message)
    }

    /// An error with a type name of your choice (`"ValueError"`, say).
    pub fn with_type(type_name: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError {
            type_name: type_name.into(),
            message: message.into(),
        }
    }

    /// The type name the caller sees.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The message the caller sees.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_remote(self) -> RemoteError {
        RemoteError::new(ErrorKind::Handler, self.type_name, self.message)
    }
}

// Not `std::error::Error` itself, so that every error type can convert into it
// (the same choice `anyhow::Error` makes).
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::with_type(short_type_name::<E>(), e.to_string())
    }
}

/// `ParseIntError` for `core::num::error::ParseIntError`: what a caller can act
/// on, without the server's module paths. Generic parameters are kept short too.
fn short_type_name<E>() -> String {
    let full = std::any::type_name::<E>();
    let mut out = String::with_capacity(full.len());
    let mut segment_start = 0;
    for (i, c) in full.char_indices() {
        if matches!(c, '<' | '>' | ',' | ' ' | '(' | ')' | '[' | ']' | '&' | ';') {
            out.push_str(last_segment(&full[segment_start..i]));
            out.push(c);
            segment_start = i + c.len_utf8();
        }
    }
    out.push_str(last_segment(&full[segment_start..]));
    out
}

fn last_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Tree, HandlerError>> + Send>>;

pub(crate) type AsyncFn = dyn Fn(Tree) -> HandlerFuture + Send + Sync;
pub(crate) type BlockingFn = dyn Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync;
type DeferredFn = dyn Fn(Tree, Responder) + Send + Sync;

/// A bound function, type-erased.
#[derive(Clone)]
pub(crate) enum Handler {
    /// Runs on the async runtime.
    Async(Arc<AsyncFn>),
    /// Runs on a worker thread, at most `workers` at once per server.
    Blocking(Arc<BlockingFn>),
    /// A blocking function with a pool of its own, a bound on its concurrent
    /// calls and/or an ordered completion hook.
    Pooled(Arc<dyn PooledFunction>),
    /// Gets a responder and answers through it, now or later.
    Deferred(Arc<DeferredFn>),
    /// Its calls go to a queue the application takes them from.
    Queue(QueueSender),
    /// Runs on a worker thread, on the stacked arguments of many calls at once.
    Batched(BatchedFunction),
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Handler::Async(_) => "Handler::Async",
            Handler::Blocking(_) => "Handler::Blocking",
            Handler::Pooled(_) => "Handler::Pooled",
            Handler::Deferred(_) => "Handler::Deferred",
            Handler::Queue(_) => "Handler::Queue",
            Handler::Batched(_) => "Handler::Batched",
        })
    }
}

impl Handler {
    pub(crate) fn from_async<F, Fut>(f: F) -> Handler
    where
        F: Fn(Tree) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Tree, HandlerError>> + Send + 'static,
    {
        Handler::Async(Arc::new(move |args| Box::pin(f(args))))
    }

    pub(crate) fn from_blocking<F>(f: F) -> Handler
    where
        F: Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync + 'static,
    {
        Handler::Blocking(Arc::new(f))
    }

    /// Runs the function on `args` and turns its failure or panic into the
    /// `RemoteError` the caller receives. A panic fails its own call, not the
    /// server. Blocking functions wait for one of the `workers` permits.
    pub(crate) async fn call(
        &self,
        method: &str,
        args: Tree,
        workers: &Arc<Semaphore>,
    ) -> Result<Tree, RemoteError> {
        match self {
            Handler::Async(f) => {
                // It may panic making its future, or while the future runs.
                let future = match std::panic::catch_unwind(AssertUnwindSafe(|| f(args))) {
                    Ok(future) => future,
                    Err(panic) => return Err(panic_error(method, panic)),
                };
                match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(result) => result.map_err(HandlerError::into_remote),
                    Err(panic) => Err(panic_error(method, panic)),
                }
            }
            Handler::Blocking(f) => {
                let Ok(_permit) = workers.clone().acquire_owned().await else {
                    return Err(RemoteError::new(
                        ErrorKind::ShuttingDown,
                        SERVER_ERROR_TYPE,
                        "the server's worker pool is closed",
                    ));
                };
                let f = f.clone();
                match tokio::task::spawn_blocking(move || f(args)).await {
                    Ok(result) => result.map_err(HandlerError::into_remote),
                    Err(join) if join.is_panic() => Err(panic_error(method, join.into_panic())),
                    Err(_) => Err(RemoteError::new(
                        ErrorKind::Internal,
                        SERVER_ERROR_TYPE,
                        "the server stopped the function's thread",
                    )),
                }
            }
            Handler::Pooled(function) => function.call(method, args, workers).await,
            Handler::Deferred(f) => {
                let (responder, answer) = Responder::new();
                // The function only takes the responder: it runs here, briefly.
                if let Err(panic) =
                    std::panic::catch_unwind(AssertUnwindSafe(|| f(args, responder)))
                {
                    return Err(panic_error(method, panic));
                }
                answer.wait().await
            }
            Handler::Queue(queue) => {
                let (responder, answer) = Responder::new();
                queue.push(method, (args, responder))?;
                answer.wait().await
            }
            // Waits for its batch, which runs on the same worker pool.
            Handler::Batched(f) => f.call(method, args).await,
        }
    }
}

/// A panic's message, if it has one.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".to_owned())
}

pub(crate) fn panic_error(method: &str, panic: Box<dyn std::any::Any + Send>) -> RemoteError {
    let text = panic_text(&*panic);
    tracing::error!(method, panic = %text, "a bound function panicked");
    RemoteError::new(
        ErrorKind::Panic,
        "panic",
        format!("the function {method:?} panicked: {text}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use teleport_protocol::tree;

    #[test]
    fn type_names_lose_their_module_paths() {
        assert_eq!(
            short_type_name::<std::num::ParseIntError>(),
            "ParseIntError"
        );
        assert_eq!(
            short_type_name::<std::collections::HashMap<String, std::io::Error>>(),
            "HashMap<String, Error>"
        );
    }

    #[tokio::test]
    async fn errors_keep_their_type_and_panics_become_errors() {
        let workers = Arc::new(Semaphore::new(2));
        let ok = Handler::from_async(|t| async move { Ok(t) });
        assert_eq!(ok.call("ok", tree!(1), &workers).await.unwrap(), tree!(1));

        let fails = Handler::from_async(|_| async move {
            let n: i32 = "x".parse()?;
            Ok(tree!((n as i64)))
        });
        let err = fails
            .call("fails", tree!(null), &workers)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Handler);
        assert_eq!(err.type_name, "ParseIntError", "{err}");

        let panics = Handler::from_blocking(|_| panic!("boom"));
        let err = panics
            .call("panics", tree!(null), &workers)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Panic);
        assert!(
            err.message.contains("boom") && err.message.contains("panics"),
            "{err}"
        );

        let panics_early = Handler::from_async(|_| -> HandlerFuture { panic!("early") });
        let err = panics_early
            .call("early", tree!(null), &workers)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Panic);
    }
}
