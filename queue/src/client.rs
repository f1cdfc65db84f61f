//! [`QueueClient`]: the queue functions as methods of a client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use teleport_client::{Client, PendingCall};
use teleport_protocol::{Map, RemoteError, Tree};

use crate::wire::{self, int};
use crate::QueueInfo;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue is full: the push did not wait, or waited past its timeout.
    /// Nothing was queued.
    #[error("{0}")]
    Full(RemoteError),
    /// The queue is closed: it takes no pushes, and a pull found it drained.
    #[error("{0}")]
    Closed(RemoteError),
    /// The lease is not held by this client's connection (acknowledged
    /// already, or given back because the connection was lost or the ack
    /// timeout passed: its items went to the queue again).
    #[error("{0}")]
    UnknownLease(RemoteError),
    /// The item is larger than a queue of the server may hold
    /// ([`QueueConfig::max_queue_bytes`](crate::QueueConfig::max_queue_bytes)):
    /// it can never be pushed; split it, or raise the server's limit.
    #[error("{0}")]
    ItemTooLarge(RemoteError),
    /// A stacked pull found an item at the front that does not stack even
    /// alone; it stays there, for a pull without stacking.
    #[error("{0}")]
    Unstackable(RemoteError),
    /// The server refused the call otherwise: arguments it does not take,
    /// too many queues, no queue service bound (`UnknownMethod`).
    #[error("the queue server refused the call: {0}")]
    Refused(RemoteError),
    /// The call did not complete: no connection, a lost connection, a
    /// deadline. A push may or may not have been queued; a pull took nothing
    /// unless the reply was lost on its way (see the crate docs).
    #[error(transparent)]
    Client(Box<teleport_client::Error>),
    /// The server's reply is not what the queue functions answer.
    #[error("the reply of {function} is malformed: {message}")]
    Reply {
        /// The function called.
        function: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl QueueError {
    fn from_call(error: teleport_client::Error) -> QueueError {
        let Some(remote) = error.remote() else {
            return QueueError::Client(Box::new(error));
        };
        let remote = remote.clone();
        match remote.type_name.as_str() {
            wire::QUEUE_FULL => QueueError::Full(remote),
            wire::QUEUE_CLOSED => QueueError::Closed(remote),
            wire::UNKNOWN_LEASE => QueueError::UnknownLease(remote),
            wire::ITEM_TOO_LARGE => QueueError::ItemTooLarge(remote),
            wire::QUEUE_UNSTACKABLE => QueueError::Unstackable(remote),
            _ => QueueError::Refused(remote),
        }
    }

    /// Whether the queue is closed ([`QueueError::Closed`]).
    pub fn is_closed(&self) -> bool {
        matches!(self, QueueError::Closed(_))
    }

    /// Whether the queue was full ([`QueueError::Full`]).
    pub fn is_full(&self) -> bool {
        matches!(self, QueueError::Full(_))
    }
}

/// The items of an acknowledged pull and the lease that holds them.
///
/// Until [`QueueClient::ack`], the server keeps the items: if this client's
/// connection ends first (the process dies, the client is dropped) or the
/// pull's ack timeout passes, they go back to the front of the queue for
/// another consumer.
#[derive(Debug)]
pub struct Leased<T> {
    /// The item (or items) pulled.
    pub item: T,
    /// What to acknowledge.
    pub lease: Lease,
}

/// A lease on items of an acknowledged pull; give it to
/// [`QueueClient::ack`] (done with them) or [`QueueClient::requeue`] (give
/// them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease(u64);

impl Lease {
    /// The lease's number, as the server gave it (`"lease"` in the reply).
    pub fn id(&self) -> u64 {
        self.0
    }
}

/// Items of one pull stacked into one tree: every array gained a leading
/// axis of length `count` (see [`teleport_protocol::batch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stacked {
    /// How many items were stacked.
    pub count: usize,
    /// The stacked tree.
    pub tree: Tree,
}

/// The queue functions of a server, as methods.
///
/// Wraps a [`Client`] (a clone shares its connection), so one connection
/// serves queue operations and ordinary calls alike. A call that waits on
/// the server (a pull of an empty queue, a push to a full one) is given the
/// wait plus [`call_grace`](Self::with_call_grace) as its deadline, so a
/// server that disappears cannot keep it forever. Dropping the future of an
/// operation cancels its call, and the server puts back an item a cancelled
/// pull had been given; an acknowledged pull dropped after the server made
/// its lease (its reply on the way) also tells the server to give the lease
/// back (`_queue.release`, sent from the drop where a tokio runtime is at
/// hand).
///
/// ```no_run
/// use std::time::Duration;
/// use teleport_client::Client;
/// use teleport_protocol::tree;
/// use teleport_queue::QueueClient;
///
/// # async fn run(fingerprint: teleport_client::Fingerprint) -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::builder("127.0.0.1:4433").pin(fingerprint).connect().await?;
/// let queues = QueueClient::new(client);
/// queues.push("jobs", tree!({"n": 1})).await?;
/// let job = queues.pull("jobs", Duration::from_secs(1)).await?;
/// assert_eq!(job, Some(tree!({"n": 1})));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QueueClient {
    client: Client,
    grace: Duration,
}

/// The default [`QueueClient::with_call_grace`].
pub const DEFAULT_CALL_GRACE: Duration = Duration::from_secs(5);

/// Claims of acknowledged pulls: unique in the process, so on each of its
/// connections (the server keys them by connection).
static CLAIMS: AtomicU64 = AtomicU64::new(1);

/// Armed while an acknowledged pull waits for its reply: dropped armed (the
/// caller stopped waiting: its future was dropped, or the call failed on
/// the client's side), it tells the server to give back whatever the pull
/// got (`_queue.release`), so that a lease whose reply nobody reads does not
/// wait for the connection's end or the ack timeout.
struct ReleaseOnDrop {
    armed: Option<(Client, Map)>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some((client, args)) = self.armed.take() else {
            return;
        };
        // Sent at once; awaited (so that its outcome, say an older server
        // without the function, is not reported by the client's next call)
        // where a runtime is at hand.
        let release = client.call(wire::RELEASE, Tree::Map(args));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = release.await;
            });
        }
    }
}

/// Cancels its call when dropped unfinished (cancelling a finished call does
/// nothing).
struct CancelOnDrop(PendingCall);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl QueueClient {
    /// Queue operations over `client`.
    pub fn new(client: Client) -> QueueClient {
        QueueClient {
            client,
            grace: DEFAULT_CALL_GRACE,
        }
    }

    /// How much longer than its wait a waiting call may take before the
    /// client gives up on the server. Default [`DEFAULT_CALL_GRACE`].
    pub fn with_call_grace(mut self, grace: Duration) -> QueueClient {
        self.grace = grace;
        self
    }

    /// The client underneath, for ordinary calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn call(
        &self,
        function: &'static str,
        args: Map,
        wait: Option<Duration>,
    ) -> Result<Map, QueueError> {
        let args = Tree::Map(args);
        let pending = match wait {
            Some(wait) => {
                self.client
                    .call_with_timeout(function, args, wait.saturating_add(self.grace))
            }
            None => self.client.call(function, args),
        };
        let mut call = CancelOnDrop(pending);
        match (&mut call.0).await {
            Ok(Tree::Map(map)) => Ok(map),
            Ok(other) => Err(malformed(
                function,
                format!("a {} where a map was expected", other.kind_name()),
            )),
            Err(error) => Err(QueueError::from_call(error)),
        }
    }

    /// An acknowledged pull's call, with a claim to release it by if its
    /// reply is not read (see [`ReleaseOnDrop`]).
    async fn acked(
        &self,
        function: &'static str,
        queue: &str,
        mut args: Map,
        wait: Option<Duration>,
    ) -> Result<Map, QueueError> {
        let claim = CLAIMS.fetch_add(1, Ordering::Relaxed);
        args.insert("claim", int(claim));
        let mut release = named(queue);
        release.insert("claim", int(claim));
        let mut guard = ReleaseOnDrop {
            armed: Some((self.client.clone(), release)),
        };
        let result = self.call(function, args, wait).await;
        // A reply read, or a refusal (which leased nothing): nothing to
        // give back. A failure on the client's side (a deadline, a lost
        // connection) may have left a lease behind: the guard releases it.
        if !matches!(&result, Err(QueueError::Client(_))) {
            guard.armed = None;
        }
        result
    }

    /// Pushes `item` to the back of `queue` (made with the server's default
    /// capacity if it does not exist); fails at once with
    /// [`QueueError::Full`] if the queue is full. Returns the queue's length
    /// after the push.
    pub async fn push(&self, queue: &str, item: Tree) -> Result<usize, QueueError> {
        let reply = self
            .call(wire::PUSH, push_args(queue, item, None), None)
            .await?;
        count(wire::PUSH, &reply, "len")
    }

    /// Pushes `item`, waiting up to `timeout` for room if `queue` is full:
    /// a slow consumer slows its producers. Fails with [`QueueError::Full`]
    /// if there is still no room then (nothing was queued).
    pub async fn push_wait(
        &self,
        queue: &str,
        item: Tree,
        timeout: Duration,
    ) -> Result<usize, QueueError> {
        let args = push_args(queue, item, Some(timeout));
        let reply = self.call(wire::PUSH, args, Some(timeout)).await?;
        count(wire::PUSH, &reply, "len")
    }

    /// Takes the item at the front of `queue`, waiting up to `timeout` for
    /// one; `None` if none came. At most once: if the reply is lost (the
    /// connection fails while it travels), so is the item; see
    /// [`pull_acked`](Self::pull_acked).
    pub async fn pull(&self, queue: &str, timeout: Duration) -> Result<Option<Tree>, QueueError> {
        let args = pull_args(queue, None, timeout, false, None, None);
        let reply = self.call(wire::PULL, args, wait(timeout)).await?;
        Ok(items(wire::PULL, reply)?.into_iter().next())
    }

    /// Takes up to `max` items from the front of `queue`: whatever is queued,
    /// waiting up to `timeout` for the first if there is none; empty if none
    /// came.
    pub async fn pull_batch(
        &self,
        queue: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Tree>, QueueError> {
        let args = pull_args(queue, Some(max), timeout, false, None, None);
        let reply = self.call(wire::PULL_BATCH, args, wait(timeout)).await?;
        items(wire::PULL_BATCH, reply)
    }

    /// Like [`pull_batch`](Self::pull_batch), the items stacked along a new
    /// axis 0 by the server. Only the run of items at the front that agree
    /// in structure, dtypes and shapes with the first is taken, so the
    /// queue's order holds; `None` if no item came.
    pub async fn pull_stacked(
        &self,
        queue: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Option<Stacked>, QueueError> {
        let args = pull_args(queue, Some(max), timeout, true, None, None);
        let mut reply = self.call(wire::PULL_BATCH, args, wait(timeout)).await?;
        let count = count(wire::PULL_BATCH, &reply, "count")?;
        let tree = reply.remove("stacked").unwrap_or(Tree::None);
        Ok((count > 0).then_some(Stacked { count, tree }))
    }

    /// An acknowledged pull: takes the front item of `queue` (waiting up to
    /// `timeout`), leased to this client until [`ack`](Self::ack). If this
    /// client's connection ends first, or `ack_timeout` passes, the server
    /// puts the item back at the front of the queue for another consumer.
    pub async fn pull_acked(
        &self,
        queue: &str,
        timeout: Duration,
        ack_timeout: Option<Duration>,
    ) -> Result<Option<Leased<Tree>>, QueueError> {
        let args = pull_args(queue, None, timeout, false, Some(true), ack_timeout);
        let reply = self.acked(wire::PULL, queue, args, wait(timeout)).await?;
        let lease = lease(wire::PULL, &reply)?;
        let item = items(wire::PULL, reply)?.into_iter().next();
        match (item, lease) {
            (Some(item), Some(lease)) => Ok(Some(Leased { item, lease })),
            (None, _) => Ok(None),
            (Some(_), None) => Err(malformed(wire::PULL, "an item without a lease".into())),
        }
    }

    /// [`pull_batch`](Self::pull_batch), acknowledged: the items are leased
    /// together, as [`pull_acked`](Self::pull_acked) leases one.
    pub async fn pull_batch_acked(
        &self,
        queue: &str,
        max: usize,
        timeout: Duration,
        ack_timeout: Option<Duration>,
    ) -> Result<Option<Leased<Vec<Tree>>>, QueueError> {
        let args = pull_args(queue, Some(max), timeout, false, Some(true), ack_timeout);
        let reply = self
            .acked(wire::PULL_BATCH, queue, args, wait(timeout))
            .await?;
        let lease = lease(wire::PULL_BATCH, &reply)?;
        let items = items(wire::PULL_BATCH, reply)?;
        match lease {
            Some(lease) if !items.is_empty() => Ok(Some(Leased { item: items, lease })),
            _ => Ok(None),
        }
    }

    /// Acknowledges a lease: its items are done with and gone for good.
    /// Fails with [`QueueError::UnknownLease`] if the server gave them back
    /// already (this client's connection was lost meanwhile, or the ack
    /// timeout passed).
    pub async fn ack(&self, lease: Lease) -> Result<(), QueueError> {
        self.settle(lease, false).await
    }

    /// Gives a lease's items back to the front of their queue, now.
    pub async fn requeue(&self, lease: Lease) -> Result<(), QueueError> {
        self.settle(lease, true).await
    }

    async fn settle(&self, lease: Lease, requeue: bool) -> Result<(), QueueError> {
        let mut args = Map::new();
        args.insert("lease", int(lease.0));
        if requeue {
            args.insert("requeue", true);
        }
        self.call(wire::ACK, args, None).await.map(drop)
    }

    /// What `queue` holds now.
    pub async fn len(&self, queue: &str) -> Result<QueueInfo, QueueError> {
        let reply = self.call(wire::LEN, named(queue), None).await?;
        // Absent from servers that counted no bytes.
        let bytes = match reply.get("bytes") {
            None | Some(Tree::None) => 0,
            Some(_) => count(wire::LEN, &reply, "bytes")?,
        };
        Ok(QueueInfo {
            len: count(wire::LEN, &reply, "len")?,
            leased: count(wire::LEN, &reply, "leased")?,
            bytes,
            capacity: count(wire::LEN, &reply, "capacity")?,
            closed: matches!(reply.get("closed"), Some(Tree::Bool(true))),
            waiting_pulls: count(wire::LEN, &reply, "waiting_pulls")?,
            waiting_pushes: count(wire::LEN, &reply, "waiting_pushes")?,
        })
    }

    /// Closes `queue`: pushes fail from now on (waiting ones too), pulls take
    /// what is left and then fail with [`QueueError::Closed`]. Returns the
    /// items left to drain.
    pub async fn close(&self, queue: &str) -> Result<usize, QueueError> {
        let reply = self.call(wire::CLOSE, named(queue), None).await?;
        count(wire::CLOSE, &reply, "len")
    }

    /// Makes `queue` with room for `capacity` items (`None`: unbounded), or
    /// sets the capacity of the existing one; a declared queue is kept while
    /// empty. Returns whether it was made now.
    pub async fn declare(&self, queue: &str, capacity: Option<usize>) -> Result<bool, QueueError> {
        let mut args = named(queue);
        match capacity {
            Some(capacity) => args.insert("capacity", int(capacity)),
            None => args.insert("unbounded", true),
        };
        let reply = self.call(wire::DECLARE, args, None).await?;
        Ok(matches!(reply.get("created"), Some(Tree::Bool(true))))
    }
}

fn wait(timeout: Duration) -> Option<Duration> {
    (!timeout.is_zero()).then_some(timeout)
}

fn named(queue: &str) -> Map {
    let mut args = Map::new();
    args.insert("queue", queue);
    args
}

fn push_args(queue: &str, item: Tree, wait: Option<Duration>) -> Map {
    let mut args = named(queue);
    args.insert("item", item);
    if let Some(timeout) = wait {
        args.insert("wait", true);
        args.insert("timeout", timeout.as_secs_f64());
    }
    args
}

fn pull_args(
    queue: &str,
    max: Option<usize>,
    timeout: Duration,
    stack: bool,
    ack: Option<bool>,
    ack_timeout: Option<Duration>,
) -> Map {
    let mut args = named(queue);
    if let Some(max) = max {
        args.insert("max", int(max));
    }
    if !timeout.is_zero() {
        args.insert("timeout", timeout.as_secs_f64());
    }
    if stack {
        args.insert("stack", true);
    }
    if ack == Some(true) {
        args.insert("ack", true);
        if let Some(ack_timeout) = ack_timeout {
            args.insert("ack_timeout", ack_timeout.as_secs_f64());
        }
    }
    args
}

fn malformed(function: &'static str, message: String) -> QueueError {
    QueueError::Reply { function, message }
}

fn count(function: &'static str, reply: &Map, key: &str) -> Result<usize, QueueError> {
    match reply.get(key) {
        Some(Tree::Int(n)) => usize::try_from(*n)
            .map_err(|_| malformed(function, format!("{key:?} is {n}, not a count"))),
        Some(other) => Err(malformed(
            function,
            format!("{key:?} is a {}, not an int", other.kind_name()),
        )),
        None => Err(malformed(function, format!("{key:?} is missing"))),
    }
}

fn items(function: &'static str, mut reply: Map) -> Result<Vec<Tree>, QueueError> {
    match reply.remove("items") {
        Some(Tree::List(items)) => Ok(items),
        Some(other) => Err(malformed(
            function,
            format!("\"items\" is a {}, not a list", other.kind_name()),
        )),
        None => Err(malformed(function, "\"items\" is missing".into())),
    }
}

fn lease(function: &'static str, reply: &Map) -> Result<Option<Lease>, QueueError> {
    match reply.get("lease") {
        None | Some(Tree::None) => Ok(None),
        Some(_) => count(function, reply, "lease").map(|n| Some(Lease(n as u64))),
    }
}
