//! Worker slots taken in the order calls were admitted.
//!
//! tokio's semaphore is fair: permits go out in the order they were asked
//! for, and a permit is asked for when its future is first polled. A
//! connection hands calls to their functions in admission order, under its
//! lock, but the futures waiting for workers are polled later, in whatever
//! order tokio runs their tasks. [`enqueue`] polls the request once, at once,
//! so its place in the queue is the order of the calls, not of the tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::noop_waker_ref;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A permit asked for at [`enqueue`]; await it for the permit.
pub(crate) struct Queued {
    acquire: Option<Acquire>,
    ready: Option<Result<OwnedSemaphorePermit, AcquireError>>,
}

/// Asks `semaphore` for a permit now, taking a place in its queue.
pub(crate) fn enqueue(semaphore: &Arc<Semaphore>) -> Queued {
    let mut acquire: Acquire = Box::pin(semaphore.clone().acquire_owned());
    let mut cx = Context::from_waker(noop_waker_ref());
    match acquire.as_mut().poll(&mut cx) {
        Poll::Ready(permit) => Queued {
            acquire: None,
            ready: Some(permit),
        },
        Poll::Pending => Queued {
            acquire: Some(acquire),
            ready: None,
        },
    }
}

impl Future for Queued {
    type Output = Result<OwnedSemaphorePermit, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(ready) = self.ready.take() {
            return Poll::Ready(ready);
        }
        match self.acquire.as_mut() {
            Some(acquire) => acquire.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test]
    async fn permits_follow_the_order_of_enqueue_not_of_first_await() {
        let semaphore = Arc::new(Semaphore::new(1));
        let held = enqueue(&semaphore).await.unwrap();
        let queued: Vec<Queued> = (0..5).map(|_| enqueue(&semaphore)).collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Awaited in reverse order, each in its own task.
        let mut tasks = Vec::new();
        for (i, q) in queued.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let permit = q.await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(2)).await;
                drop(permit);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }
}
