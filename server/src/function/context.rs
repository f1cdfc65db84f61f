//! What a function may know about the call it serves: a [`Context`].

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The call a function serves: who made it, until when the caller waits, and
/// whether it still does.
///
/// A function gets one by taking it as its second argument (see
/// [`Function`](crate::Function)); deferred and queue functions find it on
/// their [`Responder`](crate::Responder). It is cheap to clone, and a clone
/// held anywhere (another thread, a task) sees the call's cancellation.
///
/// ```
/// use teleport_protocol::{tree, Tree};
/// use teleport_server::{Context, Function, Server};
///
/// let builder = Server::builder()
///     .bind("whoami", |_: Tree, ctx: Context| async move {
///         Ok(tree!({"addr": (ctx.peer_addr().to_string()), "agent": (ctx.agent())}))
///     })
///     .bind(
///         "crunch",
///         Function::blocking(|args: Tree, ctx: Context| {
///             for _ in 0..100 {
///                 if ctx.is_cancelled() {
///                     break; // nobody waits for the result any more
///                 }
///                 // ... a slice of the work
///             }
///             Ok(args)
///         }),
///     );
/// # let _ = builder;
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    peer: SocketAddr,
    agent: Arc<str>,
    deadline: Option<Instant>,
    cancelled: AtomicBool,
    notify: Notify,
}

impl Context {
    pub(crate) fn new(peer: SocketAddr, agent: Arc<str>, deadline: Option<Instant>) -> Context {
        Context {
            inner: Arc::new(Inner {
                peer,
                agent,
                deadline,
                cancelled: AtomicBool::new(false),
                notify: Notify::new(),
            }),
        }
    }

    /// A context that belongs to no call, for functions that never see it.
    pub(crate) fn detached() -> Context {
        Context::new(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            Arc::from(""),
            None,
        )
    }

    /// The caller's address (its QUIC connection's remote address).
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// The agent string the client sent in its `Hello` (the client's
    /// `ClientConfig::agent`; `teleport_protocol::client::DEFAULT_AGENT` for
    /// this crate's client).
    pub fn agent(&self) -> &str {
        &self.inner.agent
    }

    /// When the caller gives up, from the call's timeout; `None` if it has
    /// none. Past it, the call is stopped and [`is_cancelled`](Self::is_cancelled)
    /// turns true.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// The time left until the [`deadline`](Self::deadline) (zero once
    /// passed); `None` without one.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the call was stopped: cancelled by the client, expired, or its
    /// connection ended. Its result, if any, is discarded, so a long function
    /// may check this and give up early.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Completes once the call is stopped (see
    /// [`is_cancelled`](Self::is_cancelled)). An async function's future is
    /// dropped when its call stops, so this serves work the function handed
    /// elsewhere (a spawned task, say).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Marks the call stopped and wakes whoever awaits [`cancelled`](Self::cancelled).
    pub(crate) fn cancel(&self) {
        if !self.inner.cancelled.swap(true, Ordering::AcqRel) {
            self.inner.notify.notify_waiters();
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("peer_addr", &self.inner.peer)
            .field("agent", &self.inner.agent)
            .field("deadline", &self.inner.deadline)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}
