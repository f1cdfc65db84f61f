//! Deferred answers: a function keeps a [`Responder`] and answers its call
//! later, from any thread or task.

use std::fmt;

use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::oneshot;

use super::Context;
use crate::HandlerError;

/// What the caller is told when a [`Responder`] is dropped unanswered.
pub(crate) const DROPPED_RESPONDER: &str = "the function dropped its responder without answering";

/// The type name of that error, for the caller to match on.
pub(crate) const DROPPED_RESPONDER_TYPE: &str = "DroppedResponder";

/// The way to answer one call later: from
/// a [`Function::deferred`](crate::Function::deferred) or a
/// [`CallQueue`](crate::CallQueue).
///
/// Answer once with [`respond`](Self::respond). Dropping it unanswered fails
/// the call with an error saying so. Answering a call that was cancelled or
/// expired meanwhile does nothing.
pub struct Responder {
    reply: oneshot::Sender<Result<Tree, RemoteError>>,
    context: Context,
}

impl Responder {
    /// A responder and the receiving end the server awaits.
    pub(crate) fn new(context: Context) -> (Responder, Answer) {
        let (reply, answer) = oneshot::channel();
        (Responder { reply, context }, Answer(answer))
    }

    /// The call this responder answers: its caller, deadline and whether it
    /// was stopped.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Answers the call: the caller gets `result` (an error with its type name
    /// and message, as from any function).
    pub fn respond(self, result: Result<Tree, HandlerError>) {
        self.respond_remote(result.map_err(HandlerError::into_remote));
    }

    /// Fails the call with exactly `error`, its [`ErrorKind`] included, where
    /// [`respond`](Self::respond)'s errors are all of kind `Handler`: for a
    /// function that refuses a call the way the server itself would
    /// (`Overloaded` for a resource that is full, `BadRequest` for arguments it
    /// cannot take), so that callers can tell that from a failure of the
    /// function, and [`Server::check`](crate::Server::check) reports only
    /// errors of kind `Handler` and `Panic`.
    pub fn respond_error(self, error: RemoteError) {
        self.respond_remote(Err(error));
    }

    /// Answers the call with `value` if someone still awaits the answer, and
    /// gives `value` back if not (the call was cancelled, expired or lost its
    /// connection), so that whatever it carries can go elsewhere rather than
    /// be dropped. An answer handed over can still be lost: if the call is
    /// stopped before its reply is written (a cancel or expiry that arrives
    /// meanwhile, a reply that cannot be written), the context's
    /// [`cancelled`](Context::cancelled) tells; if the connection fails while
    /// the reply travels, or the client drops it, the server cannot know.
    ///
    /// ```
    /// use teleport_protocol::{tree, Tree};
    /// use teleport_server::Function;
    ///
    /// let take = Function::deferred(|_args: Tree, responder| {
    ///     let item = tree!({"job": 7});
    ///     if let Err(item) = responder.try_respond(item) {
    ///         // Nobody is waiting any more: keep `item` for the next caller.
    ///         drop(item);
    ///     }
    /// });
    /// # let _ = take;
    /// ```
    pub fn try_respond(self, value: Tree) -> Result<(), Tree> {
        if self.is_cancelled() {
            return Err(value);
        }
        match self.reply.send(Ok(value)) {
            Ok(()) => Ok(()),
            Err(Ok(value)) => Err(value),
            // Only `Ok` was sent.
            Err(Err(_)) => Ok(()),
        }
    }

    pub(crate) fn respond_remote(self, result: Result<Tree, RemoteError>) {
        // The call is gone (cancelled, expired, connection lost): nobody to tell.
        let _ = self.reply.send(result);
    }

    /// Whether nobody awaits the answer any more (the call was cancelled, it
    /// expired or its connection was lost), so work for it can be skipped.
    pub fn is_cancelled(&self) -> bool {
        self.reply.is_closed() || self.context.is_cancelled()
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// The server's end of a [`Responder`].
#[derive(Debug)]
pub(crate) struct Answer(oneshot::Receiver<Result<Tree, RemoteError>>);

impl Answer {
    /// Waits for the answer. Dropping this future (on cancel or expiry) is what
    /// makes a later `respond` a no-op.
    pub(crate) async fn wait(self) -> Result<Tree, RemoteError> {
        match self.0.await {
            Ok(result) => result,
            // Kind `Handler`: a bug in the function, so `Server::check` sees it.
            Err(_) => Err(RemoteError::new(
                ErrorKind::Handler,
                DROPPED_RESPONDER_TYPE,
                DROPPED_RESPONDER,
            )),
        }
    }
}
