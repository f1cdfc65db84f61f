//! The future of one call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use teleport_protocol::{RequestId, Tree};

use crate::driver::Driver;
use crate::Error;

/// A call in flight: a future of its result.
///
/// Dropping it does not stop the call: it runs to the end, and if it fails,
/// the next call on the client reports the error (see
/// [`ClientBuilder::raise_unobserved_errors`](crate::ClientBuilder::raise_unobserved_errors)).
/// To stop it, [`cancel`](Self::cancel).
pub struct PendingCall {
    driver: Arc<Driver>,
    /// `None` once the result was returned (or for an early error).
    id: Option<RequestId>,
    /// An error to return without waiting (an earlier call's unobserved
    /// failure, or a client that takes no calls).
    early: Option<Error>,
}

impl PendingCall {
    pub(crate) fn started(driver: Arc<Driver>, id: RequestId) -> PendingCall {
        PendingCall {
            driver,
            id: Some(id),
            early: None,
        }
    }

    pub(crate) fn failed(driver: Arc<Driver>, error: Error) -> PendingCall {
        PendingCall {
            driver,
            id: None,
            early: Some(error),
        }
    }

    /// The call's request id, unless it failed before it started.
    pub fn id(&self) -> Option<RequestId> {
        self.id
    }

    /// Cancels the call: the future resolves to
    /// [`CallError::Cancelled`](crate::CallError::Cancelled) (unless the
    /// result was already in), the server is told to drop it if it was sent,
    /// and a call still waiting for its turn or a connection is never sent.
    pub fn cancel(&self) {
        if let Some(id) = self.id {
            self.driver.cancel(id);
        }
    }
}

impl fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingCall")
            .field("id", &self.id)
            .field("early", &self.early)
            .finish_non_exhaustive()
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.driver.abandon(id);
        }
    }
}

impl Future for PendingCall {
    type Output = Result<Tree, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(error) = self.early.take() {
            return Poll::Ready(Err(error));
        }
        let Some(id) = self.id else {
            return Poll::Ready(Err(Error::Call(
                teleport_protocol::client::CallError::Cancelled,
            )));
        };
        match self.driver.poll_call(id, cx) {
            Poll::Ready(result) => {
                self.id = None;
                let target = self.driver.target();
                Poll::Ready(result.map_err(|e| Error::of_call(e, target)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
