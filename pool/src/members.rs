//! The pool's servers: who is up, how many calls each has outstanding, leases
//! on their slots, and bringing lost servers back with backoff.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;
use tokio::process::Child;

use teleport_client::{Client, ClientBuilder, ClientTls, DialedServer};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::error::PoolError;

/// Where a server came from, for removing it and for its child process.
#[derive(Debug)]
pub(crate) enum Origin {
    /// Given by address ([`PoolBuilder::server`](crate::PoolBuilder::server),
    /// [`Pool::add_server`](crate::Pool::add_server)).
    Given,
    /// One of the addresses a name resolved to; removed when it no longer does.
    Resolved {
        /// The name as given.
        name: Arc<str>,
    },
    /// A worker that dialled the pool (`teleport worker --connect`) and is
    /// called over the connection it opened. Removed when lost (or when its
    /// `Hello` lacks the token).
    Dialed,
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
    /// Taken out of the pool (its process exited, or
    /// [`Pool::remove_server`](crate::Pool::remove_server)): its client is
    /// closed, it gets no new calls and is dropped.
    pub(crate) removed: bool,
    /// Retired (its name stopped resolving, or
    /// [`Pool::retire_server`](crate::Pool::retire_server)): it gets no new
    /// calls, its calls in flight finish, and then it is closed and dropped.
    pub(crate) retired: bool,
    /// Refused a call as overloaded: it gets no call before this.
    pub(crate) busy_until: Option<Instant>,
    /// Overloaded refusals since its last success, for the backoff.
    pub(crate) overloads: u32,
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

/// Settings every server of the pool shares. (`Debug` hides the token.)
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) qsize: usize,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) server_wait: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) idempotent: Vec<String>,
    /// Presented to every server the pool dials, and required of workers
    /// that dial the pool.
    /// Always set: a pool given none makes a random one.
    pub(crate) token: String,
    pub(crate) max_registered_workers: usize,
    /// Start a local worker again when its process exits on its own.
    pub(crate) restart_workers: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("qsize", &self.qsize)
            .field("call_timeout", &self.call_timeout)
            .field("server_wait", &self.server_wait)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_attempts", &self.max_attempts)
            .field("idempotent", &self.idempotent)
            .field("token", &"<redacted>")
            .field("max_registered_workers", &self.max_registered_workers)
            .field("restart_workers", &self.restart_workers)
            .finish()
    }
}

/// A slot on one server, held while a call is outstanding there. Dropping it
/// frees the slot.
#[derive(Debug)]
pub(crate) struct Lease {
    shared: Arc<Shared>,
    pub(crate) member: u64,
    pub(crate) name: Arc<str>,
    pub(crate) client: Client,
    /// Set when the call on it succeeded: the server's overload backoff
    /// starts over.
    pub(crate) succeeded: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if let Some(m) = state.members.iter_mut().find(|m| m.id == self.member) {
                m.outstanding = m.outstanding.saturating_sub(1);
                if self.succeeded {
                    m.overloads = 0;
                }
            }
            state.drop_finished();
        }
        self.shared.changed.notify_waiters();
    }
}

impl State {
    /// Drops the members that are out and have no call left: removed ones,
    /// and retired ones whose last call finished (closing their client and
    /// stopping their process now).
    fn drop_finished(&mut self) {
        for m in &mut self.members {
            if m.retired && !m.removed && m.outstanding == 0 {
                m.removed = true;
                m.client.close();
                if let Origin::Process(process) = &mut m.origin {
                    process.kill();
                }
            }
        }
        self.members.retain(|m| !(m.removed && m.outstanding == 0));
    }
}

impl Member {
    /// True if it may get new calls (when it has a free slot).
    fn takes_calls(&self) -> bool {
        self.up && !self.removed && !self.retired
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
        let now = Instant::now();
        let best = state
            .members
            .iter_mut()
            .filter(|m| m.takes_calls() && m.outstanding < qsize)
            .filter(|m| m.busy_until.is_none_or(|t| t <= now))
            .min_by_key(|m| m.outstanding);
        Ok(best.map(|m| {
            m.outstanding += 1;
            Lease {
                shared: self.clone(),
                member: m.id,
                name: m.name.clone(),
                client: m.client.clone(),
                succeeded: false,
            }
        }))
    }

    /// Whether a server is up (busy or not), and the earliest time still to
    /// come at which a server that refused a call as overloaded takes calls
    /// again.
    fn availability(&self) -> (bool, Option<Instant>) {
        let state = self.lock();
        let now = Instant::now();
        let up = state.members.iter().filter(|m| m.takes_calls());
        let mut any = false;
        let mut next = None::<Instant>;
        for m in up {
            any = true;
            // A backoff that is over is no reason to wake: waiting for a
            // slot then is waiting for a call to finish.
            if let Some(t) = m.busy_until.filter(|&t| t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        (any, next)
    }

    /// Waits for a free slot. Busy servers (every slot taken, or backing off
    /// after refusing a call as overloaded) are waited for as long as it
    /// takes: their calls finish or time out. Only when no server is up for
    /// the pool's `server_wait` does it fail.
    pub(crate) async fn acquire(self: Arc<Self>, method: &str) -> Result<Lease, PoolError> {
        let mut none_up_since: Option<Instant> = None;
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire()? {
                return Ok(lease);
            }
            let (any_up, next_free) = self.availability();
            let give_up = if any_up {
                none_up_since = None;
                None
            } else {
                let since = *none_up_since.get_or_insert_with(Instant::now);
                let give_up = since + self.settings.server_wait;
                if Instant::now() >= give_up {
                    return Err(PoolError::NoServers {
                        method: method.to_owned(),
                        waited: self.settings.server_wait,
                        servers: self.describe(),
                    });
                }
                Some(give_up)
            };
            let wake = match (give_up, next_free) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match wake {
                Some(wake) => {
                    let _ = tokio::time::timeout_at(wake, notified).await;
                }
                None => notified.await,
            }
        }
    }

    /// Server `member` refused a call as overloaded (or shutting down): it
    /// gets no call for a while, doubling with each refusal in a row.
    pub(crate) fn back_off_busy(&self, member: u64) {
        {
            let mut state = self.lock();
            let Some(m) = state.members.iter_mut().find(|m| m.id == member) else {
                return;
            };
            m.overloads = m.overloads.saturating_add(1);
            let doublings = (m.overloads - 1).min(16);
            let wait = self
                .settings
                .backoff_initial
                .saturating_mul(1 << doublings)
                .min(self.settings.backoff_max);
            m.busy_until = Some(Instant::now() + wait);
        }
        self.changed.notify_waiters();
    }

    /// When server `member` takes calls again after refusing one as
    /// overloaded (`None` if it is not backing off, or not known).
    pub(crate) fn busy_until(&self, member: u64) -> Option<Instant> {
        let state = self.lock();
        state
            .members
            .iter()
            .find(|m| m.id == member)
            .and_then(|m| m.busy_until)
    }

    /// Takes a slot on server `member` regardless of `qsize` (for
    /// `run_on_all`, which must reach every server).
    pub(crate) fn lease_on(self: &Arc<Self>, member: u64) -> Option<Lease> {
        let mut state = self.lock();
        let m = state
            .members
            .iter_mut()
            .find(|m| m.id == member && m.takes_calls())?;
        m.outstanding += 1;
        Some(Lease {
            shared: self.clone(),
            member: m.id,
            name: m.name.clone(),
            client: m.client.clone(),
            succeeded: false,
        })
    }

    /// The ids of the servers up now.
    pub(crate) fn up_members(&self) -> Vec<u64> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| m.takes_calls())
            .map(|m| m.id)
            .collect()
    }

    /// Slots of the servers up now (`qsize` each), at least one server's.
    pub(crate) fn capacity(&self) -> usize {
        let state = self.lock();
        let up = state.members.iter().filter(|m| m.takes_calls()).count();
        up.max(1) * self.settings.qsize
    }

    /// (name, up, outstanding) of every server, for [`Pool::servers`](crate::Pool::servers).
    pub(crate) fn snapshot(&self) -> Vec<(String, SocketAddr, bool, usize)> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| {
                (
                    m.name.to_string(),
                    m.addr,
                    m.up && !m.retired,
                    m.outstanding,
                )
            })
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
                _ if m.retired => {
                    let _ = write!(text, "retired, finishing {} calls", m.outstanding);
                }
                (true, _) if m.busy_until.is_some_and(|t| t > Instant::now()) => {
                    text.push_str("up, backing off after refusing a call as overloaded")
                }
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
        server_name: Option<String>,
        origin: Origin,
    ) -> u64 {
        let mut builder = Client::builder(addr).tls(tls);
        // Dialled by address, the client would check the certificate for the
        // IP; a CA-signed certificate names the host the user gave.
        if let Some(server_name) = server_name {
            builder = builder.server_name(server_name);
        }
        self.add_client(name, addr, builder, origin)
    }

    /// The client of a worker that dialled the pool, connected once its
    /// `Hello` showed the pool's token; then the worker is added. Until
    /// then it is no server of the pool (an impostor takes no place).
    pub(crate) async fn connect_dialed(
        shared: std::sync::Weak<Shared>,
        server: DialedServer,
    ) -> Result<(), String> {
        let addr = server.remote_addr();
        let client = {
            let shared = shared.upgrade().ok_or("the pool is gone")?;
            shared
                .client_settings(Client::dialed_in(server, shared.settings.token.clone()))
                .build()
        };
        if let Err(e) = client.connect().await {
            client.close();
            return Err(e.to_string());
        }
        let shared = shared.upgrade().ok_or("the pool is gone")?;
        shared.add_built(
            format!("worker dialled in from {addr}"),
            addr,
            client,
            Origin::Dialed,
        );
        Ok(())
    }

    /// The settings every client of the pool's servers has.
    fn client_settings(&self, builder: ClientBuilder) -> ClientBuilder {
        let settings = &self.settings;
        builder
            .max_in_flight(settings.qsize)
            // The pool moves work off a lost server itself; the client must
            // fail its calls at once rather than wait for a reconnection.
            .reconnect(false)
            .connect_timeout(settings.connect_timeout)
            .raise_unobserved_errors(false)
            .agent(concat!("teleport-pool ", env!("CARGO_PKG_VERSION")))
            // Not sent to a worker that dialled in: it proves the token to
            // the pool instead.
            .token(settings.token.clone())
    }

    fn add_client(
        self: &Arc<Self>,
        name: String,
        addr: SocketAddr,
        builder: ClientBuilder,
        origin: Origin,
    ) -> u64 {
        let client = self.client_settings(builder).build();
        self.add_built(name, addr, client, origin)
    }

    /// Adds a server with its client and starts bringing it up. On a pool
    /// that closed meanwhile it is removed at once (its client closed, its
    /// process killed).
    fn add_built(
        self: &Arc<Self>,
        name: String,
        addr: SocketAddr,
        client: Client,
        origin: Origin,
    ) -> u64 {
        let (id, closed) = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            let closed = state.closed;
            if closed {
                client.close();
            }
            state.members.push(Member {
                id,
                name: name.into(),
                addr,
                client,
                outstanding: 0,
                up: false,
                removed: closed,
                retired: false,
                busy_until: None,
                overloads: 0,
                last_error: None,
                origin,
            });
            // Dropping a removed member's origin kills its process.
            state.drop_finished();
            (id, closed)
        };
        if !closed {
            tokio::spawn(revive(self.clone(), id, Duration::ZERO));
        }
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
        let for_good = self
            .with_member(member, |m| m.retired || matches!(m.origin, Origin::Dialed))
            .unwrap_or(false);
        if for_good {
            tracing::info!(
                member,
                reason,
                "pool: dialled-in or retired server lost; removed"
            );
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
            state.drop_finished();
        }
        self.changed.notify_waiters();
        removed
    }

    /// Retires the servers `retire` says yes to: no new calls; each is closed
    /// and dropped when its calls in flight have finished. Returns how many.
    pub(crate) fn retire_where(&self, mut retire: impl FnMut(&Member) -> bool) -> usize {
        let mut retired = 0;
        {
            let mut state = self.lock();
            for m in state
                .members
                .iter_mut()
                .filter(|m| !m.removed && !m.retired)
            {
                if retire(m) {
                    m.retired = true;
                    retired += 1;
                }
            }
            state.drop_finished();
        }
        self.changed.notify_waiters();
        retired
    }

    /// The clients of the workers that dialled in.
    pub(crate) fn dialed_clients(&self) -> Vec<Client> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| matches!(m.origin, Origin::Dialed))
            .map(|m| m.client.clone())
            .collect()
    }

    /// How many workers that dialled in the pool has (proven or not yet).
    pub(crate) fn dialed_count(&self) -> usize {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| !m.removed && !m.retired && matches!(m.origin, Origin::Dialed))
            .count()
    }

    /// The addresses of the servers that came from resolving `name`.
    pub(crate) fn resolved_addrs(&self, name: &str) -> Vec<SocketAddr> {
        let state = self.lock();
        state
            .members
            .iter()
            .filter(|m| !m.removed && !m.retired)
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
        let Some(client) = shared
            .with_member(member, |m| (!m.retired).then(|| m.client.clone()))
            .flatten()
        else {
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
                let dialed = shared
                    .with_member(member, |m| {
                        m.last_error = Some(e.to_string());
                        matches!(m.origin, Origin::Dialed)
                    })
                    .unwrap_or(false);
                // Nothing can dial it back.
                if dialed {
                    tracing::info!(member, error = %e, "pool: a worker that dialled in was not taken");
                    shared.remove_where(|m| m.id == member);
                    return;
                }
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
///
/// The receiver returned hears when the process exited on its own (not when
/// it was killed): the pool may start another.
pub(crate) fn watch_process(
    shared: &Arc<Shared>,
    mut child: Child,
) -> (ProcessHandle, impl FnOnce(u64), oneshot::Receiver<()>) {
    let (kill, killed) = oneshot::channel::<()>();
    let (exited_tx, exited) = oneshot::channel::<()>();
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
                        // Removed already (remove_server, the pool closing):
                        // not to be started again.
                        if shared.remove_where(|m| m.id == member) > 0 {
                            let _ = exited_tx.send(());
                        }
                    }
                }
                // Told to stop, or the handle was dropped with its server.
                _ = killed => {
                    let _ = child.kill().await;
                }
            }
        });
    };
    (ProcessHandle { kill: Some(kill) }, start, exited)
}
