//! [`PoolBuilder`]: the servers of a pool and how it treats them.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use teleport_client::{ClientTls, Fingerprint, Identity, ToAddress};

use crate::error::StartError;
use crate::members::{Origin, Settings, Shared};
use crate::sources::{self, SshSource, WorkerCommand};
use crate::Pool;

/// Settings and sources of servers of a [`Pool`]. Start from [`Pool::builder`].
///
/// Sources combine freely: servers by address, a name resolved again and
/// again, worker processes started locally or over ssh, and workers that
/// dial the pool.
///
/// ```no_run
/// use teleport_pool::Pool;
/// # async fn run(fp: teleport_client::Fingerprint) -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder()
///     .local_workers(4)                 // `teleport worker` x 4 on this machine
///     .ssh("ssh://maxi/8")              // and 8 on host maxi, over ssh
///     .server("10.0.0.7:4433", fp)      // and one already running
///     .qsize(32)
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PoolBuilder {
    settings: Settings,
    trust: Option<ClientTls>,
    servers: Vec<(String, Option<Fingerprint>)>,
    names: Vec<String>,
    resolve_every: Duration,
    local_workers: usize,
    worker_command: WorkerCommand,
    ssh: Vec<String>,
    ssh_command: WorkerCommand,
    remote_worker_command: Vec<String>,
    ssh_listen: String,
    accept: Option<(String, Option<Identity>)>,
    token: Option<String>,
}

impl PoolBuilder {
    pub(crate) fn new() -> PoolBuilder {
        PoolBuilder {
            settings: Settings {
                qsize: 16,
                call_timeout: None,
                server_wait: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                backoff_initial: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                max_attempts: 3,
                idempotent: Vec::new(),
                // Set by `start`: the token given, or a random one.
                token: String::new(),
                max_registered_workers: 1024,
                restart_workers: true,
            },
            trust: None,
            servers: Vec::new(),
            names: Vec::new(),
            resolve_every: Duration::from_secs(10),
            local_workers: 0,
            worker_command: WorkerCommand {
                program: "teleport".into(),
                args: vec!["worker".into()],
            },
            ssh: Vec::new(),
            ssh_command: WorkerCommand {
                program: "ssh".into(),
                args: Vec::new(),
            },
            remote_worker_command: vec!["teleport".to_owned(), "worker".to_owned()],
            ssh_listen: "0.0.0.0:0".to_owned(),
            accept: None,
            token: None,
        }
    }

    /// Adds the server at `addr` (any address a client takes: `"host:4433"`,
    /// `"10.0.0.7:4433"`, a `SocketAddr`), trusted by `fingerprint`.
    pub fn server(mut self, addr: impl ToAddress, fingerprint: Fingerprint) -> Self {
        self.servers.push((address_text(&addr), Some(fingerprint)));
        self
    }

    /// Adds servers by address, trusted as [`pin`](Self::pin) or
    /// [`tls`](Self::tls) say.
    pub fn servers<A: ToAddress>(mut self, addrs: impl IntoIterator<Item = A>) -> Self {
        self.servers
            .extend(addrs.into_iter().map(|a| (address_text(&a), None)));
        self
    }

    /// Trusts the servers of [`servers`](Self::servers) and
    /// [`resolve`](Self::resolve) that present this certificate (servers
    /// that share one identity, such as the replicas of a Kubernetes
    /// deployment with the certificate in a Secret).
    pub fn pin(mut self, fingerprint: Fingerprint) -> Self {
        self.trust = Some(ClientTls::pinned(fingerprint));
        self
    }

    /// Trusts the servers of [`servers`](Self::servers) and
    /// [`resolve`](Self::resolve) as `tls` says (CA roots, several pins).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.trust = Some(tls);
        self
    }

    /// Adds every address `name` (`"host:port"`) resolves to, and resolves
    /// it again every [`resolve_every`](Self::resolve_every): new addresses
    /// join the pool, addresses no longer listed leave it (their calls in
    /// flight finish). A Kubernetes headless service or DNS round robin.
    /// Trusted as [`pin`](Self::pin) or [`tls`](Self::tls) say.
    pub fn resolve(mut self, name: impl Into<String>) -> Self {
        self.names.push(name.into());
        self
    }

    /// How often names given to [`resolve`](Self::resolve) are resolved
    /// again. Default 10 s.
    pub fn resolve_every(mut self, period: Duration) -> Self {
        self.resolve_every = period.max(Duration::from_millis(10));
        self
    }

    /// Starts `n` worker processes on this machine
    /// ([`worker_command`](Self::worker_command) with `--listen 127.0.0.1:0
    /// --exit-on-stdin-close`), pinned by the fingerprint each announces.
    /// They stop with the pool.
    pub fn local_workers(mut self, n: usize) -> Self {
        self.local_workers += n;
        self
    }

    /// Whether a worker the pool started (local, or over ssh) whose process
    /// exits on its own (it crashed, was killed, ran out of memory, its ssh
    /// session died) is started again the same way, as a new server of the
    /// pool: after the reconnect backoff's first wait, doubling while new
    /// ones fail to start or die within the backoff's longest wait. Default
    /// true. Its calls in flight fail or move as a lost server's either way;
    /// workers the pool stops (`remove_server`, the pool closing) are not
    /// restarted.
    pub fn restart_workers(mut self, restart: bool) -> Self {
        self.settings.restart_workers = restart;
        self
    }

    /// The program (and its first arguments) started as a local worker.
    /// Default `teleport worker`; an application with functions of its own
    /// gives its own worker binary (see [`worker`](crate::worker)).
    pub fn worker_command<S: Into<OsString>>(
        mut self,
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.worker_command = WorkerCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        };
        self
    }

    /// Starts workers on another host over the system's `ssh`:
    /// `ssh://[user@]host[:port]/N` runs N workers there
    /// ([`remote_worker_command`](Self::remote_worker_command) with
    /// `--listen 0.0.0.0:0 --exit-on-stdin-close`), one ssh session each.
    /// Each worker announces its port and fingerprint through its session;
    /// the pool dials it at `host`, so its UDP port must be reachable (ssh
    /// does not forward UDP). Closing the pool closes the sessions, which
    /// stops the workers. Checked by [`start`](Self::start).
    pub fn ssh(mut self, source: impl Into<String>) -> Self {
        self.ssh.push(source.into());
        self
    }

    /// The ssh program and options put before `[-p port] [user@]host --
    /// command`. Default `ssh`. (`["-o", "BatchMode=yes"]` fails at once
    /// instead of asking for a password.)
    pub fn ssh_command<S: Into<OsString>>(
        mut self,
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.ssh_command = WorkerCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        };
        self
    }

    /// The worker command run on ssh hosts, as words (quoted for the remote
    /// shell). Default `teleport worker`.
    pub fn remote_worker_command<S: Into<String>>(
        mut self,
        words: impl IntoIterator<Item = S>,
    ) -> Self {
        self.remote_worker_command = words.into_iter().map(Into::into).collect();
        self
    }

    /// Where workers started over ssh listen. Default `0.0.0.0:0` (every
    /// IPv4 interface, a free port).
    pub fn ssh_listen(mut self, addr: impl Into<String>) -> Self {
        self.ssh_listen = addr.into();
        self
    }

    /// Listens at `addr` for workers that dial the pool: `teleport worker
    /// --connect ADDR --pin FP` with the token on stdin (`--token-stdin`) or
    /// in `TELEPORT_TOKEN`, all three from [`Pool::registration`]. The pool
    /// calls each worker over the connection the worker opened, so only the
    /// pool must be reachable: workers behind a firewall or NAT that lets
    /// them dial out serve as well as any. A worker pins this endpoint's
    /// certificate; the pool takes it once its `Hello` carries the pool's
    /// [token](Pool::token), and sends it nothing before (anyone can dial).
    /// At most [`max_registered_workers`](Self::max_registered_workers) at
    /// once; a worker whose connection ends is removed (a worker whose
    /// connection was lost dials again for a while: `--redial-for`). With `identity`, the endpoint's fingerprint stays the same
    /// across runs (otherwise each start makes a new certificate).
    pub fn accept_workers(mut self, addr: impl Into<String>, identity: Option<Identity>) -> Self {
        self.accept = Some((addr.into(), identity));
        self
    }

    /// The most calls each server has in flight. Default 16. More keeps
    /// small calls flowing (each server pipelines them); fewer balances long
    /// calls more evenly.
    pub fn qsize(mut self, qsize: usize) -> Self {
        self.settings.qsize = qsize.max(1);
        self
    }

    /// A timeout for every call (a map's own [`timeout`](crate::MapStream::timeout)
    /// overrides it). Default none.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.settings.call_timeout = Some(timeout);
        self
    }

    /// How long a call waits for a free slot when no server has one (or none
    /// is up) before failing with [`PoolError::NoServers`](crate::PoolError::NoServers).
    /// Default 30 s.
    pub fn server_wait(mut self, wait: Duration) -> Self {
        self.settings.server_wait = wait;
        self
    }

    /// How long one connection attempt to a server, and starting a worker
    /// process (until it announces itself), may take; and how long
    /// [`start`](Self::start) waits for the first server. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// The wait before reconnecting to a lost server: `initial`, doubling
    /// after each failed attempt up to `max`. Default 100 ms up to 5 s.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.backoff_initial = initial;
        self.settings.backoff_max = max.max(initial);
        self
    }

    /// Marks `method` idempotent: its calls lost with a server are re-sent
    /// to another (up to [`max_attempts`](Self::max_attempts) sends in all).
    /// Other methods' lost calls fail with
    /// [`PoolError::ServerLost`](crate::PoolError::ServerLost).
    pub fn idempotent(mut self, method: impl Into<String>) -> Self {
        self.settings.idempotent.push(method.into());
        self
    }

    /// How many times an idempotent call is sent before it fails with
    /// [`PoolError::Exhausted`](crate::PoolError::Exhausted). Default 3.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }

    /// The most workers dialled in at once
    /// ([`accept_workers`](Self::accept_workers)), counting those whose
    /// `Hello` has not come yet; more are refused until some leave. Default
    /// 1024.
    pub fn max_registered_workers(mut self, n: usize) -> Self {
        self.settings.max_registered_workers = n;
        self
    }

    /// A shared token presented to every server, given to the workers the
    /// pool starts (on their stdin, never on a command line), and required
    /// of workers that dial the pool. Without one the pool makes a random
    /// 256-bit token ([`Pool::token`]).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Starts the pool: connects to the servers given, starts the worker
    /// processes and reads their announcements, resolves the names, opens
    /// the registration endpoint; then waits (up to the connect timeout)
    /// until one server is up, unless the pool has only names and a
    /// registration endpoint (which may have no server yet). Must be called
    /// inside a tokio runtime.
    pub async fn start(mut self) -> Result<Pool, StartError> {
        self.settings.token = match self.token.take() {
            Some(token) => token,
            None => random_token()?,
        };
        let shared = Shared::new(self.settings.clone());
        // A pool dropped half-started closes what it started.
        let mut partial = PartialPool(Some(shared.clone()));
        let mut expect_server = false;
        for (addr, fingerprint) in &self.servers {
            let tls = match (fingerprint, &self.trust) {
                (Some(fp), _) => ClientTls::pinned(*fp),
                (None, Some(tls)) => tls.clone(),
                (None, None) => {
                    return Err(StartError::Trust {
                        server: addr.clone(),
                    })
                }
            };
            let address = addr.as_str().to_address()?;
            let resolved: Vec<SocketAddr> = address.resolve_for_client().await?;
            let server_name = sources::server_name(&address);
            shared.add(addr.clone(), resolved[0], tls, server_name, Origin::Given);
            expect_server = true;
        }
        let mut tasks = Vec::new();
        for name in &self.names {
            let tls = self.trust.clone().ok_or_else(|| StartError::Trust {
                server: name.clone(),
            })?;
            // Fail at once on a name that is not an address at all.
            name.as_str().to_address()?;
            let name: Arc<str> = name.as_str().into();
            sources::refresh_name(&shared, &name, &tls).await;
            tasks.push(sources::resolve_periodically(
                shared.clone(),
                name,
                tls,
                self.resolve_every,
            ));
        }
        if self.local_workers > 0 {
            sources::start_local(&shared, &self.worker_command, self.local_workers).await?;
            expect_server = true;
        }
        for source in &self.ssh {
            let source = SshSource::parse(source)?;
            sources::start_ssh(
                &shared,
                &self.ssh_command,
                &self.remote_worker_command,
                &self.ssh_listen,
                &source,
            )
            .await?;
            expect_server = true;
        }
        let registration = match self.accept {
            Some((addr, identity)) => {
                let (listener, task) = sources::worker_listener(&shared, &addr, identity).await?;
                tasks.push(task);
                Some(listener)
            }
            None => None,
        };
        partial.0 = None;
        let pool = Pool::from_parts(shared, registration, tasks);
        if expect_server {
            let timeout = self.settings.connect_timeout;
            if pool.wait_for_servers(1, timeout).await.is_err() {
                return Err(StartError::NoServers {
                    waited: timeout,
                    servers: pool.shared().describe(),
                });
            }
        }
        Ok(pool)
    }
}

/// Closes a pool whose start failed part way (killing the workers started).
struct PartialPool(Option<Arc<Shared>>);

impl Drop for PartialPool {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.close();
        }
    }
}

/// 256 random bits, as 64 hex digits.
fn random_token() -> Result<String, StartError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| StartError::Token(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn address_text(addr: &impl ToAddress) -> String {
    match addr.to_address() {
        Ok(address) => address.to_string(),
        Err(teleport_client::AddressError::Invalid { input, .. }) => input,
        Err(e) => e.to_string(),
    }
}
