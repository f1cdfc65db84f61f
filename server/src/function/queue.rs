//! Queue functions: calls the application pulls from a [`CallQueue`] and answers
//! through their [`Responder`]s, one by one or as stacked batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use teleport_protocol::batch::{split, stack_compatible};
use teleport_protocol::server::SERVER_ERROR_TYPE;
use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::Responder;
use crate::HandlerError;

/// One call taken from a queue: its arguments and the way to answer it.
pub type QueuedCall = (Tree, Responder);

/// The server's end of a queue: where admitted calls are put.
#[derive(Debug, Clone)]
pub(crate) struct QueueSender {
    sender: mpsc::Sender<QueuedCall>,
    capacity: usize,
    /// Calls in the queue, shared with the [`CallQueue`]s.
    queued: Arc<AtomicUsize>,
}

impl QueueSender {
    /// Puts a call in the queue, or refuses it: a queue nobody empties must
    /// not grow without bound.
    pub(crate) fn push(&self, method: &str, call: QueuedCall) -> Result<(), RemoteError> {
        // Counted before it is sent, so a consumer never takes it uncounted.
        self.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.sender.try_send(call);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(RemoteError::new(
                ErrorKind::Overloaded,
                SERVER_ERROR_TYPE,
                format!(
                    "the queue of {method:?} holds {} calls, its capacity; retry later",
                    self.capacity
                ),
            )),
            Err(TrySendError::Closed(_)) => Err(RemoteError::new(
                ErrorKind::Internal,
                SERVER_ERROR_TYPE,
                format!("nothing takes calls from the queue of {method:?} any more"),
            )),
        }
    }
}

/// Where the application takes the calls of a function bound with
/// [`bind_queue`](crate::ServerBuilder::bind_queue).
///
/// Clones share the queue, so several tasks or threads can consume it; each
/// call goes to one of them. The calls wait in arrival order.
#[derive(Debug, Clone)]
pub struct CallQueue {
    /// Behind a lock so that clones can share one receiver.
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<QueuedCall>>>,
    queued: Arc<AtomicUsize>,
}

/// A queue of `capacity` calls (at least 1): both ends.
pub(crate) fn call_queue(capacity: usize) -> (QueueSender, CallQueue) {
    let capacity = capacity.max(1);
    let (sender, receiver) = mpsc::channel(capacity);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        QueueSender {
            sender,
            capacity,
            queued: queued.clone(),
        },
        CallQueue {
            receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
            queued,
        },
    )
}

impl CallQueue {
    /// The next call, waiting for one. `None` once the server is gone (dropped,
    /// with every connection ended) and the queue is empty.
    pub async fn recv(&self) -> Option<QueuedCall> {
        let call = self.receiver.lock().await.recv().await;
        self.taken(usize::from(call.is_some()));
        call
    }

    fn taken(&self, count: usize) {
        self.queued.fetch_sub(count, Ordering::AcqRel);
    }

    /// [`recv`](Self::recv) for threads outside the async runtime.
    ///
    /// # Panics
    ///
    /// When called from inside an async task (as tokio's blocking receives do):
    /// use `recv` there.
    pub fn recv_blocking(&self) -> Option<QueuedCall> {
        let call = self.receiver.blocking_lock().blocking_recv();
        self.taken(usize::from(call.is_some()));
        call
    }

    /// Waits for a call, then takes it and whatever else is queued, up to `max`
    /// calls (at least 1): a dynamic batch, as large as the load makes it.
    /// `None` once the server is gone and the queue is empty.
    pub async fn recv_batch(&self, max: usize) -> Option<Vec<QueuedCall>> {
        let mut calls = Vec::new();
        let received = self
            .receiver
            .lock()
            .await
            .recv_many(&mut calls, max.max(1))
            .await;
        self.taken(received);
        (received > 0).then_some(calls)
    }

    /// Calls waiting in the queue now (including calls cancelled while
    /// queued, which stay until taken).
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether no call waits in the queue now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Calls from a queue whose arguments were stacked into one tree (a new axis
/// 0, see [`teleport_protocol::batch`]), answered together by splitting one
/// result. Made by [`stack_calls`].
#[derive(Debug)]
pub struct StackedCalls {
    args: Tree,
    responders: Vec<Responder>,
}

/// Stacks the arguments of `calls` into one tree for one batched computation.
///
/// A call whose arguments do not stack with the others (another structure,
/// dtype or shape, or a string leaf) is answered at once with its own
/// `BadRequest` error naming the difference; the rest are batched together.
/// `None` if no call is left to batch (`calls` is empty or every call was
/// refused).
pub fn stack_calls(calls: Vec<QueuedCall>) -> Option<StackedCalls> {
    let (args, responders): (Vec<Tree>, Vec<Responder>) = calls.into_iter().unzip();
    let outcome = stack_compatible(&args);
    let mut responders: Vec<Option<Responder>> = responders.into_iter().map(Some).collect();
    for (index, error) in outcome.rejected {
        if let Some(responder) = responders.get_mut(index).and_then(Option::take) {
            responder.respond_remote(Err(RemoteError::new(
                ErrorKind::BadRequest,
                SERVER_ERROR_TYPE,
                format!("the arguments do not stack with the rest of their batch: {error}"),
            )));
        }
    }
    let stacked = outcome.stacked?;
    let members = outcome
        .members
        .iter()
        .filter_map(|&index| responders.get_mut(index).and_then(Option::take))
        .collect();
    Some(StackedCalls {
        args: stacked,
        responders: members,
    })
}

impl StackedCalls {
    /// The stacked arguments: every array has a leading axis of [`len`](Self::len).
    pub fn args(&self) -> &Tree {
        &self.args
    }

    /// The number of calls stacked.
    pub fn len(&self) -> usize {
        self.responders.len()
    }

    /// Whether no call was stacked (never, for a value from [`stack_calls`]).
    pub fn is_empty(&self) -> bool {
        self.responders.is_empty()
    }

    /// Answers every call: row `i` of each array of `result` (cut along axis
    /// 0, see [`teleport_protocol::batch::split`]) goes to call `i`; an error
    /// goes to all of them. A result whose leading dimension is not
    /// [`len`](Self::len) fails every call with an error saying so.
    pub fn respond(self, result: Result<Tree, HandlerError>) {
        let count = self.responders.len();
        let parts = result.map_err(HandlerError::into_remote).and_then(|tree| {
            split(&tree, count).map_err(|e| {
                RemoteError::new(
                    ErrorKind::Handler,
                    "SplitError",
                    format!("the batched result could not be split into {count} results: {e}"),
                )
            })
        });
        match parts {
            Ok(parts) => {
                for (responder, part) in self.responders.into_iter().zip(parts) {
                    responder.respond_remote(Ok(part));
                }
            }
            Err(error) => {
                for responder in self.responders {
                    responder.respond_remote(Err(error.clone()));
                }
            }
        }
    }
}
