//! The pool's servers: who is up, how many calls each has outstanding, leases
//! on their slots, and bringing lost servers back with backoff.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;
use tokio::process::Child;

use teleport_client::{Client, ClientTls};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::error::PoolError;

/// Where a server came from, for removing it and for its child process.
#[derive(Debug)]
pub(crate) enum Origin {
    /// Given by address ([`PoolBuilder::server`](crate::PoolBuilder::server),
    /// [`Pool::add_server`](crate::Pool::add_server)), or announced by a worker
    /// that registered.
    Given,
    /// One of the addresses a name resolved to; removed when it no longer does.
    Resolved {
        /// The name as given.
        name: Arc<str>,
    },
    /// A worker that registered (`teleport worker --connect`). Removed when
    /// lost: a worker that comes back registers again.
    Registered,
    /// A worker process the pool started (locally or over ssh). Removed for
    /// good when the process exits (see [`watch_process`]).
    Process(ProcessHandle),
}

/// Stops a worker process the pool started: its task owns the child (and
/// its stdin, which the worker watches), and kills it when told or when this
/// handle is dropped.
#[derive(Debug)]
pub(crate) struct ProcessHandle {
    kill: Option<oneshot::Sender<()>>,
}

impl ProcessHandle {
    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// The state of one server.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) addr: SocketAddr,
    pub(crate) client: Client,
    pub(crate) outstanding: usize,
    pub(crate) up: bool,
    /// Taken out of the pool (its name stopped resolving, its process
    /// exited, or [`Pool::remove_server`](crate::Pool::remove_server)): it
    /// gets no new calls and is dropped.
    pub(crate) removed: bool,
    pub(crate) last_error: Option<String>,
    pub(crate) origin: Origin,
}

/// What the pool's parts share.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Notified when a slot frees up, a server comes up, or the pool closes.
    pub(crate) changed: Notify,
    pub(crate) settings: Settings,
}

#[derive(Debug, Default)]
struct State {
    members: Vec<Member>,
    next_id: u64,
    closed: bool,
}

/// Settings every server of the pool shares.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) qsize: usize,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) server_wait: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) idempotent: Vec<String>,
    pub(crate) token: Option<String>,
}

/// A slot on one server, held while a call is outstanding there. Dropping it
/// frees the slot.
#[derive(Debug)]
pub(crate) struct Lease {
    shared: Arc<Shared>,
    pub(crate) member: u64,
    pub(crate) name: Arc<str>,
    pub(crate) client: Client,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if let Some(m) = state.members.iter_mut().find(|m| m.id == self.member) {
                m.outstanding = m.outstanding.saturating_sub(1);
            }
            state.members.retain(|m| !(m.removed && m.outstanding == 0));
        }
        self.shared.changed.notify_waiters();
    }
}

impl Shared {
    pub(crate) fn new(settings: Settings) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            settings,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still
        // consistent enough to go on with.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_idempotent(&self, method: &str) -> bool {
        self.settings.idempotent.iter().any(|m| m == method)
    }

    /// A slot on the server with the fewest outstanding calls, if one is free.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Result<Option<Lease>, PoolError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PoolError::Closed);
        }
        let qsize = self.settings.qsize;
        let best = state
            .members
            .iter_mut()
            .filter(|m| m.up && !m.removed && m.outstanding < qsize)
            .min_by_key(|m| m.outstanding);
        Ok(best.map(|m| {
            m.outstanding += 1;
            Lease {
                shared: self.clone(),
                member: m.id,
                name: m.name.clone(),
                client: m.client.clone(),
            }
        }))
    }

    /// Waits for a free slot, up to the pool's `server_wait`.
    pub(crate) async fn acquire(self: Arc<Self>, method: &str) -> Result<Lease, PoolError> {
        let deadline = Instant::now() + self.settings.server_wait;
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire()? {
                return Ok(lease);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::NoServers {
                    method: method.to_owned(),
                    waited: self.settings.server_wait,
                    servers: self.describe(),
                });
            }
        }
    }

    /// Takes a slot on server `member` regardless of `qsize` (for
    /// `run_on_all`, which must reach every server).
    pub(crate) fn lease_on(self: &Arc<Self>, member: u64) -> Option<Lease> {
        let mut state = self.lock();
        let m = state
            .members
            .iter_mut()
            .find(|m| m.id == member && m.up && !m.removed)?;
        m.outstanding += 1;
        Some(Lease {
            shared: self.clone(),
            member: m.id,
            name: m.name.clone(),
            client: m.client.clone(),
        })
    }

    /// The ids of the servers up now.
    pub(crate) fn up_members(&self) -> Vec<u64> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| m.up && !m.removed)
            .map(|m| m.id)
            .collect()
    }

    /// Slots of the servers up now (`qsize` each), at least one server's.
    pub(crate) fn capacity(&self) -> usize {
        let state = self.lock();
        let up = state.members.iter().filter(|m| m.up && !m.removed).count();
        up.max(1) * self.settings.qsize
    }

    /// (name, up, outstanding) of every server, for [`Pool::servers`](crate::Pool::servers).
    pub(crate) fn snapshot(&self) -> Vec<(String, SocketAddr, bool, usize)> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| (m.name.to_string(), m.addr, m.up, m.outstanding))
            .collect()
    }

    /// Every known server and its state, for error messages.
    pub(crate) fn describe(&self) -> String {
        let state = self.lock();
        let members: Vec<&Member> = state.members.iter().filter(|m| !m.removed).collect();
        if members.is_empty() {
            return "the pool has no servers".to_owned();
        }
        let mut text = String::new();
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            let _ = write!(text, "{}: ", m.name);
            match (&m.up, &m.last_error) {
                (true, _) => text.push_str("up, all slots busy"),
                (false, Some(e)) => {
                    let _ = write!(text, "down ({e})");
                }
                (false, None) => text.push_str("connecting"),
            }
        }
        text
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Adds a server (down until its first connection succeeds) and starts
    /// connecting to it. Returns its id.
    pub(crate) fn add(
        self: &Arc<Self>,
        name: String,
        addr: SocketAddr,
        tls: ClientTls,
        origin: Origin,
    ) -> u64 {
        let settings = &self.settings;
        let mut builder = Client::builder(addr)
            .tls(tls)
            .max_in_flight(settings.qsize)
            // The pool moves work off a lost server itself; the client must
            // fail its calls at once rather than wait for a reconnection.
            .reconnect(false)
            .connect_timeout(settings.connect_timeout)
            .raise_unobserved_errors(false)
            .agent(concat!("teleport-pool ", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &settings.token {
            builder = builder.token(token.clone());
        }
        let client = builder.build();
        let id = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.members.push(Member {
                id,
                name: name.into(),
                addr,
                client,
                outstanding: 0,
                up: false,
                removed: false,
                last_error: None,
                origin,
            });
            id
        };
        tokio::spawn(revive(self.clone(), id, Duration::ZERO));
        id
    }

    /// Marks `member` down after a lost call, and starts bringing it back.
    pub(crate) fn mark_down(self: &Arc<Self>, member: u64, reason: &str) {
        let was_up = {
            let mut state = self.lock();
            let Some(m) = state.members.iter_mut().find(|m| m.id == member) else {
                return;
            };
            let was_up = m.up;
            m.up = false;
            m.last_error = Some(reason.to_owned());
            was_up
        };
        let registered = self
            .with_member(member, |m| matches!(m.origin, Origin::Registered))
            .unwrap_or(false);
        if registered {
            tracing::info!(member, reason, "pool: registered worker lost; removed");
            self.remove_where(|m| m.id == member);
            return;
        }
        if was_up {
            tracing::info!(member, reason, "pool: server down, retrying with backoff");
            tokio::spawn(revive(self.clone(), member, self.settings.backoff_initial));
        }
    }

    /// Takes servers out of the pool: those `remove` says yes to. Returns how
    /// many.
    pub(crate) fn remove_where(&self, mut remove: impl FnMut(&Member) -> bool) -> usize {
        let mut removed = 0;
        {
            let mut state = self.lock();
            for m in state.members.iter_mut().filter(|m| !m.removed) {
                if remove(m) {
                    m.removed = true;
                    m.client.close();
                    if let Origin::Process(process) = &mut m.origin {
                        process.kill();
                    }
                    removed += 1;
                }
            }
            state.members.retain(|m| !(m.removed && m.outstanding == 0));
        }
        self.changed.notify_waiters();
        removed
    }

    /// The addresses of the servers that came from resolving `name`.
    pub(crate) fn resolved_addrs(&self, name: &str) -> Vec<SocketAddr> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| !m.removed)
            .filter(|m| matches!(&m.origin, Origin::Resolved { name: n } if &**n == name))
            .map(|m| m.addr)
            .collect()
    }

    /// Closes the pool: no new calls, every server's client closed, every
    /// worker process the pool started killed.
    pub(crate) fn close(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
        }
        self.remove_where(|_| true);
    }

    /// Why `member` went down, if the pool knows better than the client
    /// (its process exited), also after it was removed.
    pub(crate) fn known_reason(&self, member: u64) -> Option<String> {
        let state = self.lock();
        let m = state.members.iter().find(|m| m.id == member)?;
        if m.removed {
            m.last_error.clone()
        } else {
            None
        }
    }

    fn with_member<R>(&self, member: u64, f: impl FnOnce(&mut Member) -> R) -> Option<R> {
        let mut state = self.lock();
        state
            .members
            .iter_mut()
            .find(|m| m.id == member && !m.removed)
            .map(f)
    }
}

/// Brings server `member` (back) up: connects after `first_wait`, then with
/// doubling waits up to the pool's maximum, until it connects or is removed.
async fn revive(shared: Arc<Shared>, member: u64, first_wait: Duration) {
    let mut wait = first_wait;
    loop {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let Some(client) = shared.with_member(member, |m| m.client.clone()) else {
            return;
        };
        match client.connect().await {
            Ok(()) => {
                shared.with_member(member, |m| {
                    m.up = true;
                    m.last_error = None;
                });
                tracing::debug!(member, "pool: server up");
                shared.changed.notify_waiters();
                // The client does not reconnect by itself: when its
                // connection ends, take the server out before calls fail on it.
                let reason = client.closed().await;
                shared.mark_down(member, &reason);
                return;
            }
            Err(e) => {
                shared.with_member(member, |m| m.last_error = Some(e.to_string()));
            }
        }
        wait = if wait.is_zero() {
            shared.settings.backoff_initial
        } else {
            (wait * 2).min(shared.settings.backoff_max)
        };
    }
}

/// Owns worker process `child` of server `member`: removes the server as
/// soon as the process exits (its calls in flight fail, or go elsewhere if
/// idempotent, without waiting for the connection to time out), and kills
/// the process when the handle says so or is dropped.
pub(crate) fn watch_process(
    shared: &Arc<Shared>,
    mut child: Child,
) -> (ProcessHandle, impl FnOnce(u64)) {
    let (kill, killed) = oneshot::channel::<()>();
    let weak = Arc::downgrade(shared);
    let start = move |member: u64| {
        tokio::spawn(async move {
            // `wait` closes the child's stdin, which stops a worker: hold it
            // here instead, for as long as the worker is to run.
            let _stdin = child.stdin.take();
            tokio::select! {
                status = child.wait() => {
                    tracing::info!(member, ?status, "pool: worker process exited; removed");
                    if let Some(shared) = weak.upgrade() {
                        let why = match status {
                            Ok(status) => format!("the worker process exited ({status})"),
                            Err(e) => format!("the worker process is gone ({e})"),
                        };
                        shared.with_member(member, |m| m.last_error = Some(why));
                        shared.remove_where(|m| m.id == member);
                    }
                }
                // Told to stop, or the handle was dropped with its server.
                _ = killed => {
                    let _ = child.kill().await;
                }
            }
        });
    };
    (ProcessHandle { kill: Some(kill) }, start)
}
