//! The pool handle: single calls, calls on every server, adding and removing
//! servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use teleport_client::{CallError, CallOptions, ClientTls, Error as ClientError, PendingCall};
use teleport_protocol::{ErrorKind, Tree};

use crate::error::PoolError;
use crate::members::{Lease, Origin, Shared};
use crate::{MapStream, PoolBuilder};

/// A pool of servers that bind the same functions. Cheap to clone; every
/// clone shares the servers. When the last clone is dropped (or on
/// [`close`](Pool::close)) the pool closes its connections and stops the
/// worker processes it started.
///
/// Start one with [`Pool::builder`].
#[derive(Clone, Debug)]
pub struct Pool {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// The endpoint workers dial, kept open with the pool.
    registration: Option<Arc<teleport_client::ServerListener>>,
    /// Background tasks of the pool's sources (re-resolving names), stopped
    /// with it.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let dialed = self.shared.dialed_clients();
        self.shared.close();
        if let Some(listener) = self.registration.take() {
            match tokio::runtime::Handle::try_current() {
                // The workers that dialled in are told goodbye by their
                // clients (closed above; each machine bounds how long that
                // takes), then the endpoint closes what is left and is kept
                // until the peers were told: dropped at once, it was seen to
                // go before its close did, and a worker then waited for its
                // idle timeout.
                Ok(runtime) => {
                    runtime.spawn(async move {
                        for client in dialed {
                            client.closed().await;
                        }
                        listener.close();
                        listener.wait_idle().await;
                    });
                }
                Err(_) => listener.close(),
            }
        }
    }
}

/// Where and how a worker joins a pool ([`Pool::registration`]): `teleport
/// worker --connect ADDR --pin FINGERPRINT --token-stdin`, with the token
/// written to its stdin (or in `TELEPORT_TOKEN`). Its `Debug` hides the
/// token.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Registration {
    /// The address the endpoint workers dial listens at.
    pub addr: SocketAddr,
    /// The fingerprint of its certificate, for the worker to pin.
    pub fingerprint: teleport_client::Fingerprint,
    /// The token the worker must present in its `Hello`.
    pub token: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("addr", &self.addr)
            .field("fingerprint", &self.fingerprint)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One server of a pool as [`Pool::servers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// How the pool names it in errors: its address, or the worker command
    /// that started it and its address.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// True while it takes calls.
    pub up: bool,
    /// Calls it has outstanding now.
    pub outstanding: usize,
}

impl Pool {
    /// A builder for a pool: add sources of servers, then
    /// [`start`](PoolBuilder::start).
    pub fn builder() -> PoolBuilder {
        PoolBuilder::new()
    }

    pub(crate) fn from_parts(
        shared: Arc<Shared>,
        registration: Option<Arc<teleport_client::ServerListener>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Pool {
        Pool {
            handle: Arc::new(Handle {
                shared,
                registration,
                tasks,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Calls `method` on `args` on the server with the fewest outstanding
    /// calls, waiting for a free slot if every server has `qsize`. Starts
    /// when first polled; dropping the future cancels the call.
    pub async fn submit(&self, method: &str, args: impl Into<Tree>) -> Result<Tree, PoolError> {
        let options = self.default_options(method);
        call(self.shared().clone(), method.into(), args.into(), options).await
    }

    /// Like [`submit`](Self::submit), with `options` (timeout, idempotence)
    /// instead of the pool's defaults for `method`.
    pub async fn submit_with(
        &self,
        method: &str,
        args: impl Into<Tree>,
        options: CallOptions,
    ) -> Result<Tree, PoolError> {
        call(self.shared().clone(), method.into(), args.into(), options).await
    }

    /// Runs `method` on `args` once on every server that is up now, all at
    /// once, and returns each server's name with its result, in the order of
    /// [`servers`](Self::servers). Each result is that server's: a server
    /// that refuses the call as overloaded gets it again after its backoff
    /// (within the pool's call timeout, if any), and a call lost with its
    /// server fails with [`PoolError::ServerLost`]; nothing goes elsewhere.
    pub async fn run_on_all(
        &self,
        method: &str,
        args: impl Into<Tree>,
    ) -> Vec<(String, Result<Tree, PoolError>)> {
        let args = args.into();
        let options = self.default_options(method).idempotent(false);
        let shared = self.shared();
        let calls: Vec<_> = shared
            .up_members()
            .into_iter()
            .filter_map(|member| shared.lease_on(member))
            .map(|lease| {
                let name = lease.name.to_string();
                let call = call_on(
                    shared.clone(),
                    lease,
                    method.to_owned(),
                    args.clone(),
                    options,
                    Placement::ThisServer,
                );
                async move { (name, call.await) }
            })
            .collect();
        futures_util::future::join_all(calls).await
    }

    /// Maps `method` over `inputs` (any iterator, possibly endless): a
    /// [`Stream`](futures_util::Stream) of the results in input order. An
    /// input is taken from the iterator only when a server has a free slot,
    /// so memory stays bounded however long the iterator is. Dropping the
    /// stream stops reading inputs and cancels the calls in flight.
    ///
    /// The iterator's `next` is called from the task polling the stream: an
    /// iterator that blocks (reading a file) blocks that task; use
    /// [`map_stream`](Self::map_stream) for inputs that arrive asynchronously.
    pub fn map<I>(&self, method: &str, inputs: I) -> MapStream
    where
        I: IntoIterator,
        I::Item: Into<Tree> + 'static,
        I::IntoIter: Send + 'static,
    {
        let inputs = futures_util::stream::iter(inputs.into_iter().map(Into::into));
        MapStream::new(self.clone(), method, Box::pin(inputs), true)
    }

    /// [`map`](Self::map) yielding results as they finish, not in input order.
    pub fn map_unordered<I>(&self, method: &str, inputs: I) -> MapStream
    where
        I: IntoIterator,
        I::Item: Into<Tree> + 'static,
        I::IntoIter: Send + 'static,
    {
        let inputs = futures_util::stream::iter(inputs.into_iter().map(Into::into));
        MapStream::new(self.clone(), method, Box::pin(inputs), false)
    }

    /// [`map`](Self::map) over a [`Stream`](futures_util::Stream) of inputs.
    pub fn map_stream<S>(&self, method: &str, inputs: S) -> MapStream
    where
        S: futures_util::Stream + Send + 'static,
        S::Item: Into<Tree>,
    {
        use futures_util::StreamExt;
        MapStream::new(self.clone(), method, Box::pin(inputs.map(Into::into)), true)
    }

    /// [`map_unordered`](Self::map_unordered) over a [`Stream`](futures_util::Stream).
    pub fn map_stream_unordered<S>(&self, method: &str, inputs: S) -> MapStream
    where
        S: futures_util::Stream + Send + 'static,
        S::Item: Into<Tree>,
    {
        use futures_util::StreamExt;
        MapStream::new(
            self.clone(),
            method,
            Box::pin(inputs.map(Into::into)),
            false,
        )
    }

    /// Adds the server at `addr`, trusted by `fingerprint`. It gets calls as
    /// soon as it is connected (calls waiting for a slot go to it at once).
    pub fn add_server(&self, addr: SocketAddr, fingerprint: teleport_client::Fingerprint) {
        self.shared().add(
            addr.to_string(),
            addr,
            ClientTls::pinned(fingerprint),
            None,
            Origin::Given,
        );
    }

    /// Retires the server at `addr`: it gets no new calls, its calls in
    /// flight finish there, and then the pool closes its connection (and
    /// stops a worker process it started there). What happens to servers a
    /// name no longer resolves to. Returns whether there was one.
    pub fn retire_server(&self, addr: SocketAddr) -> bool {
        self.shared().retire_where(|m| m.addr == addr) > 0
    }

    /// Takes the server at `addr` out of the pool: it gets no new calls, its
    /// calls in flight fail or go elsewhere as a lost server's do, and a
    /// worker process the pool started there is stopped. Returns whether
    /// there was one.
    pub fn remove_server(&self, addr: SocketAddr) -> bool {
        self.shared().remove_where(|m| m.addr == addr) > 0
    }

    /// The servers of the pool and their state now.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.shared()
            .snapshot()
            .into_iter()
            .map(|(name, addr, up, outstanding)| ServerInfo {
                name,
                addr,
                up,
                outstanding,
            })
            .collect()
    }

    /// Waits until at least `n` servers are up, or `timeout` passes (then
    /// fails, saying what each server is doing).
    pub async fn wait_for_servers(&self, n: usize, timeout: Duration) -> Result<(), PoolError> {
        let shared = self.shared();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut notified = std::pin::pin!(shared.changed.notified());
            notified.as_mut().enable();
            if shared.is_closed() {
                return Err(PoolError::Closed);
            }
            if shared.up_members().len() >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::NoServers {
                    method: format!("(waiting for {n} servers)"),
                    waited: timeout,
                    servers: shared.describe(),
                });
            }
        }
    }

    /// What a worker needs to join this pool, if it accepts
    /// workers ([`PoolBuilder::accept_workers`]).
    pub fn registration(&self) -> Option<Registration> {
        self.handle
            .registration
            .as_ref()
            .map(|server| Registration {
                addr: server.local_addr(),
                fingerprint: server.fingerprint(),
                token: self.token().to_owned(),
            })
    }

    /// The token the pool presents to every server and requires of workers
    /// that dial the pool: the one given ([`PoolBuilder::token`]) or the
    /// random one the pool made. A secret: whoever has it can add workers.
    pub fn token(&self) -> &str {
        &self.shared().settings.token
    }

    /// Each server's slots (`qsize`).
    pub fn qsize(&self) -> usize {
        self.shared().settings.qsize
    }

    /// Closes the pool: calls in flight fail with a connection error, new
    /// ones with [`PoolError::Closed`], and the worker processes the pool
    /// started are stopped.
    pub fn close(&self) {
        self.shared().close();
    }

    /// The options a call of `method` gets by default: the pool's call
    /// timeout, and whether the method was marked idempotent.
    pub(crate) fn default_options(&self, method: &str) -> CallOptions {
        let shared = self.shared();
        let mut options = CallOptions::new().idempotent(shared.is_idempotent(method));
        if let Some(timeout) = shared.settings.call_timeout {
            options = options.timeout(timeout);
        }
        options
    }
}

/// A pending call that is cancelled when dropped: dropping a map stream or a
/// `submit` future stops its calls on the servers.
struct CancelOnDrop(PendingCall);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        // A call that already returned its result has no id left: no-op.
        self.0.cancel();
    }
}

/// One call through the pool: a slot, the call, and what to do when the
/// server is lost.
pub(crate) async fn call(
    shared: Arc<Shared>,
    method: String,
    args: Tree,
    options: CallOptions,
) -> Result<Tree, PoolError> {
    let lease = match shared.try_acquire()? {
        Some(lease) => lease,
        None => shared.clone().acquire(&method).await?,
    };
    call_on(shared, lease, method, args, options, Placement::AnyServer).await
}

/// Which servers a call may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Any server (a map's, a submit's call): refused or lost, it goes to
    /// whichever is free next.
    AnyServer,
    /// Only the server of its first slot (`run_on_all`): refused as
    /// overloaded, it waits for that server's backoff and tries it again;
    /// lost, it fails.
    ThisServer,
}

/// [`call`] on a slot already held.
///
/// A call refused as overloaded (or by a server shutting down) did not run:
/// it waits for that server's backoff and goes to whichever server is free
/// then (or, [`Placement::ThisServer`], to the same server again), however
/// often, within the call's timeout. A call lost with its server is sent
/// again only if it was never sent or the method is idempotent, and never
/// with [`Placement::ThisServer`].
pub(crate) async fn call_on(
    shared: Arc<Shared>,
    mut lease: Lease,
    method: String,
    args: Tree,
    options: CallOptions,
    placement: Placement,
) -> Result<Tree, PoolError> {
    let idempotent = options.idempotent.unwrap_or(false);
    // The pool re-sends lost calls itself, to other servers; the client must
    // fail them at once rather than hold them for its own next connection.
    let options = options.idempotent(false);
    let max_attempts = if idempotent {
        shared.settings.max_attempts.max(1)
    } else {
        1
    };
    // The timeout bounds the whole call, refusals and re-sends included.
    let deadline = options
        .timeout
        .map(|t| (t, tokio::time::Instant::now() + t));
    // The arguments are kept for a re-send (a clone of a tree shares its
    // array buffers).
    let mut attempt = 1;
    loop {
        let mut this_options = options;
        if let Some((timeout, deadline)) = deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(PoolError::Timeout {
                    server: lease.name.to_string(),
                    method,
                    timeout,
                });
            }
            this_options = this_options.timeout(left);
        }
        let pending = CancelOnDrop(lease.client.call_with_options(
            method.as_str(),
            args.clone(),
            this_options,
        ));
        // A call the client refused to start (its connection is gone) was
        // never sent.
        let started = pending.0.id().is_some();
        let result = {
            let mut pending = pending;
            (&mut pending.0).await
        };
        let error = match result {
            Ok(tree) => {
                lease.succeeded = true;
                return Ok(tree);
            }
            Err(error) => error,
        };
        let server = lease.name.to_string();
        if is_busy(&error) {
            tracing::debug!(%server, %method, ?placement, "pool: server busy; the call waits for a slot");
            shared.back_off_busy(lease.member);
            let member = lease.member;
            drop(lease);
            lease = match placement {
                Placement::AnyServer => next_lease(&shared, &method, deadline).await?,
                Placement::ThisServer => {
                    lease_again(&shared, member, server, &method, deadline).await?
                }
            };
            continue;
        }
        if !error.is_connection_error() {
            return Err(classify(server, method, error, deadline.map(|d| d.0)));
        }
        let reason = shared
            .known_reason(lease.member)
            .unwrap_or_else(|| connection_reason(&error));
        shared.mark_down(lease.member, &reason);
        if placement == Placement::ThisServer {
            return Err(PoolError::ServerLost {
                server,
                method,
                reason,
            });
        }
        if !started || never_sent(&error) {
            tracing::debug!(%server, %method, "pool: re-sending a call its lost server never got");
            drop(lease);
            lease = next_lease(&shared, &method, deadline).await?;
            continue;
        }
        if attempt >= max_attempts {
            return Err(if idempotent {
                PoolError::Exhausted {
                    server,
                    method,
                    attempts: attempt,
                    reason,
                }
            } else {
                PoolError::ServerLost {
                    server,
                    method,
                    reason,
                }
            });
        }
        tracing::debug!(%server, %method, attempt, "pool: re-sending a lost idempotent call");
        drop(lease);
        lease = next_lease(&shared, &method, deadline).await?;
        attempt += 1;
    }
}

/// A slot for sending a call again, within the call's deadline.
async fn next_lease(
    shared: &Arc<Shared>,
    method: &str,
    deadline: Option<(Duration, tokio::time::Instant)>,
) -> Result<Lease, PoolError> {
    if let Some(lease) = shared.try_acquire()? {
        return Ok(lease);
    }
    let acquire = shared.clone().acquire(method);
    match deadline {
        None => acquire.await,
        Some((timeout, deadline)) => match tokio::time::timeout_at(deadline, acquire).await {
            Ok(lease) => lease,
            Err(_) => Err(PoolError::NoServers {
                method: method.to_owned(),
                waited: timeout,
                servers: format!(
                    "no server took it again within the call's timeout: {}",
                    shared.describe()
                ),
            }),
        },
    }
}

/// A slot on server `member` again, once its overload backoff is over,
/// within the call's deadline.
async fn lease_again(
    shared: &Arc<Shared>,
    member: u64,
    server: String,
    method: &str,
    deadline: Option<(Duration, tokio::time::Instant)>,
) -> Result<Lease, PoolError> {
    if let Some(until) = shared.busy_until(member) {
        match deadline {
            Some((timeout, deadline)) if deadline < until => {
                tokio::time::sleep_until(deadline).await;
                return Err(PoolError::Timeout {
                    server,
                    method: method.to_owned(),
                    timeout,
                });
            }
            _ => tokio::time::sleep_until(until).await,
        }
    }
    shared
        .lease_on(member)
        .ok_or_else(|| PoolError::ServerLost {
            reason: shared.known_reason(member).unwrap_or_else(|| {
                "it left the pool while the call waited after an overloaded refusal".to_owned()
            }),
            server,
            method: method.to_owned(),
        })
}

/// True if the server refused the call without running it because it is
/// busy (or on its way down): trying later, or elsewhere, may work.
fn is_busy(error: &ClientError) -> bool {
    matches!(
        error.remote().map(|e| e.kind),
        Some(ErrorKind::Overloaded | ErrorKind::ShuttingDown)
    )
}

/// True for the connection errors of calls that were never sent.
fn never_sent(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::NotConnected { .. } | ClientError::Call(CallError::NotConnected { .. })
    )
}

/// What a client error says about the connection, for [`PoolError::ServerLost`].
fn connection_reason(error: &ClientError) -> String {
    match error {
        ClientError::Call(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// A call's error that is not a lost server, as a [`PoolError`].
fn classify(
    server: String,
    method: String,
    error: ClientError,
    timeout: Option<Duration>,
) -> PoolError {
    match error {
        ClientError::Call(CallError::Remote(error)) => PoolError::Remote {
            server,
            method,
            error,
        },
        // The client saw the remaining time; the user set the whole timeout.
        ClientError::Call(CallError::DeadlineExceeded { timeout: left }) => PoolError::Timeout {
            server,
            method,
            timeout: timeout.unwrap_or(left),
        },
        ClientError::Call(error) => PoolError::Call {
            server,
            method,
            error,
        },
        other => PoolError::Client {
            server,
            method,
            error: Arc::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::Settings;
    use teleport_protocol::tree;
    use teleport_server::Server;

    /// A call whose server's connection was gone before it was sent (the
    /// pool had not noticed yet) goes to another server, idempotent or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_never_sent_to_a_lost_server_goes_to_another() {
        let limit = Duration::from_secs(20);
        let mut servers = Vec::new();
        for tag in ["a", "b"] {
            let server = Server::builder()
                .bind("tag", move |_: Tree| async move { Ok(tree!((tag))) })
                .listen("127.0.0.1:0")
                .await
                .unwrap();
            servers.push(server);
        }
        let shared = Shared::new(Settings {
            qsize: 4,
            call_timeout: None,
            server_wait: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            max_attempts: 3,
            idempotent: Vec::new(),
            token: "t".to_owned(),
            max_registered_workers: 1,
            restart_workers: false,
        });
        let ids: Vec<u64> = servers
            .iter()
            .map(|s| {
                shared.add(
                    s.local_addr().to_string(),
                    s.local_addr(),
                    ClientTls::pinned(s.fingerprint()),
                    None,
                    Origin::Given,
                )
            })
            .collect();
        tokio::time::timeout(limit, async {
            while shared.up_members().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("both servers up");
        let lease = shared.lease_on(ids[0]).unwrap();
        // The race: server a's client closed, the pool not told yet.
        lease.client.close();
        let options = CallOptions::new().idempotent(false);
        let y = tokio::time::timeout(
            limit,
            call_on(
                shared.clone(),
                lease,
                "tag".into(),
                tree!(null),
                options,
                Placement::AnyServer,
            ),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the call was never sent, so it may go elsewhere: {e}"));
        assert_eq!(y.as_str().unwrap(), "b");
        shared.close();
    }
}
