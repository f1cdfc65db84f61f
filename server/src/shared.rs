//! What every connection of a server shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use teleport_protocol::server::ServerConfig;
use teleport_protocol::{ErrorKind, RemoteError, Timestamp};
use teleport_quic::driver::Clock;
use teleport_quic::MemoryBudget;
use tokio::sync::{watch, Semaphore};

use crate::connection::Conn;
use crate::function::BoundFunction;
use crate::stats::Counters;
use crate::HandlerFailure;

/// The server-wide state the connections of one server share. Connections
/// hold it; it holds them only weakly (for shutdown), so dropping the server
/// leaves no cycle that would keep a connection, or the socket, alive.
#[derive(Debug)]
pub(crate) struct ServerShared {
    /// The bound functions by name; the name is shared, not copied, per call.
    /// Looked up once per call, with names the server chose (no peer can add
    /// one), so a fast hash rather than a keyed one.
    pub(crate) functions: rustc_hash::FxHashMap<String, (Arc<str>, BoundFunction)>,
    /// The state machine settings every connection starts from (token,
    /// limits, the shared capacity, the method names, timeouts).
    pub(crate) protocol: ServerConfig,
    /// Permits for blocking functions on the shared pool.
    pub(crate) workers: Arc<Semaphore>,
    /// The first function error or panic, for [`Server::check`](crate::Server::check).
    first_error: Mutex<Option<HandlerFailure>>,
    pub(crate) clock: Clock,
    connections: Mutex<HashMap<u64, Weak<Conn>>>,
    next_connection: AtomicU64,
    /// Connection tasks running; shutdown waits for 0.
    live: watch::Sender<usize>,
    /// What the server has done, for [`Server::stats`](crate::Server::stats).
    pub(crate) stats: Counters,
    /// `Some(deadline)` once shutdown began: connections that start later
    /// drain to the same deadline.
    shutdown: watch::Sender<Option<Timestamp>>,
    /// What bounds the memory, connections and handshakes peers can take.
    pub(crate) budgets: Budgets,
    /// Connections admitted by the accept loop and not yet finished.
    admitted: AtomicUsize,
    /// Of those, the ones whose client has not yet been authenticated.
    unauthenticated: AtomicUsize,
}

/// The server-wide bounds on what peers can make the server hold.
#[derive(Debug)]
pub(crate) struct Budgets {
    /// Receive memory of every connection together.
    pub(crate) memory: Arc<MemoryBudget>,
    /// Receive memory of one connection.
    pub(crate) connection_memory: usize,
    /// Connections at once (handshakes included).
    pub(crate) max_connections: usize,
    /// Connections at once whose client has not sent an accepted `Hello`.
    pub(crate) max_unauthenticated: usize,
}

impl ServerShared {
    pub(crate) fn new(
        functions: HashMap<String, BoundFunction>,
        protocol: ServerConfig,
        workers: usize,
        budgets: Budgets,
    ) -> ServerShared {
        ServerShared {
            functions: functions
                .into_iter()
                .map(|(name, f)| {
                    let shared: Arc<str> = Arc::from(name.as_str());
                    (name, (shared, f))
                })
                .collect(),
            protocol,
            workers: Arc::new(Semaphore::new(workers)),
            first_error: Mutex::new(None),
            clock: Clock::new(),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            live: watch::channel(0).0,
            stats: Counters::default(),
            shutdown: watch::channel(None).0,
            budgets,
            admitted: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
        }
    }

    /// A place for a new connection attempt, or `None` (refuse it) when the
    /// server has as many connections, or as many not yet authenticated, as
    /// its limits allow.
    pub(crate) fn admit_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let take = |counter: &AtomicUsize, max: usize| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        };
        if !take(&self.admitted, self.budgets.max_connections) {
            return None;
        }
        if !take(&self.unauthenticated, self.budgets.max_unauthenticated) {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot {
            auth: AuthenticationSlot {
                shared: self.clone(),
                unauthenticated: Arc::new(AtomicBool::new(true)),
            },
        })
    }

    /// Keeps the first failure of a function (its error or panic).
    pub(crate) fn record_failure(&self, method: &str, error: &RemoteError) {
        if matches!(error.kind, ErrorKind::Handler | ErrorKind::Panic) {
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| HandlerFailure {
                method: method.to_owned(),
                error: error.clone(),
            });
        }
    }

    pub(crate) fn first_failure(&self) -> Option<HandlerFailure> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A number for a new connection, and its registration until the
    /// returned guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, conn: &Arc<Conn>) -> LiveConnection {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn.id, Arc::downgrade(conn));
        self.live.send_modify(|n| *n += 1);
        LiveConnection {
            shared: self.clone(),
            id: conn.id,
        }
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections open now.
    pub(crate) fn live_connections(&self) -> usize {
        *self.live.borrow()
    }

    /// The connections still running, for shutdown.
    pub(crate) fn connections(&self) -> Vec<Arc<Conn>> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Waits until every connection task has ended.
    pub(crate) async fn all_closed(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Starts the shutdown: connections drain until `deadline`.
    pub(crate) fn begin_shutdown(&self, deadline: Timestamp) {
        self.shutdown.send_if_modified(|d| {
            if d.is_some() {
                return false;
            }
            *d = Some(deadline);
            true
        });
    }

    /// The drain deadline, once shutdown began.
    pub(crate) fn shutdown_deadline(&self) -> Option<Timestamp> {
        *self.shutdown.borrow()
    }

    /// Completes when shutdown begins, or when the server is gone; holds
    /// no reference to the server meanwhile.
    pub(crate) fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shutdown.subscribe();
        async move {
            let _ = shutdown.wait_for(Option::is_some).await;
        }
    }
}

/// A connection counted as live until this is dropped (when its task ends,
/// however it ends).
#[derive(Debug)]
pub(crate) struct LiveConnection {
    shared: Arc<ServerShared>,
    id: u64,
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.shared.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A connection's place under the connection limits, held by its task
/// until the task ends.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    auth: AuthenticationSlot,
}

impl ConnectionSlot {
    /// What the connection's state uses to say its client was authenticated.
    pub(crate) fn authentication(&self) -> AuthenticationSlot {
        AuthenticationSlot {
            shared: self.auth.shared.clone(),
            unauthenticated: self.auth.unauthenticated.clone(),
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.auth.authenticated();
        self.auth.shared.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place among the unauthenticated ones.
#[derive(Debug)]
pub(crate) struct AuthenticationSlot {
    shared: Arc<ServerShared>,
    unauthenticated: Arc<AtomicBool>,
}

impl AuthenticationSlot {
    /// The client was authenticated: it no longer counts against the limit
    /// of unauthenticated connections.
    pub(crate) fn authenticated(&self) {
        if self.unauthenticated.swap(false, Ordering::AcqRel) {
            self.shared.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
