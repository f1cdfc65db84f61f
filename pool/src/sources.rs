//! Where a pool's servers come from: worker processes it starts (locally or
//! over ssh), names it resolves again and again, and workers that dial in.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use teleport_client::{Address, ClientTls, Fingerprint, Host, ServerListener, ToAddress};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::error::StartError;
use crate::members::{watch_process, Origin, Shared};
use crate::worker::parse_announcement;
use teleport_protocol::Backoff;

/// An `ssh://[user@]host[:port]/N` source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SshSource {
    pub(crate) user: Option<String>,
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
    pub(crate) workers: usize,
}

impl SshSource {
    pub(crate) fn parse(input: &str) -> Result<SshSource, StartError> {
        let bad = |why: &str| StartError::SshSource {
            input: input.to_owned(),
            why: why.to_owned(),
        };
        let rest = input
            .strip_prefix("ssh://")
            .ok_or_else(|| bad("it does not start with ssh://"))?;
        let (authority, count) = rest
            .rsplit_once('/')
            .ok_or_else(|| bad("the number of workers is missing"))?;
        let workers: usize = count
            .parse()
            .map_err(|_| bad("the number of workers after the last / is not a number"))?;
        if workers == 0 {
            return Err(bad("the number of workers is 0"));
        }
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, rest)) if !user.is_empty() => (Some(user.to_owned()), rest),
            Some(_) => return Err(bad("the user before @ is empty")),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).map_err(|why| bad(&why))?;
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        // ssh reads a destination beginning with `-` as an option
        // (`-oProxyCommand=...` runs a command here), and whitespace or
        // control characters are no part of a host or user name.
        for (what, text) in [("host", Some(host.as_str())), ("user", user.as_deref())] {
            let Some(text) = text else { continue };
            if text.starts_with('-') {
                return Err(bad(&format!(
                    "the {what} {text:?} begins with '-', which ssh would take as an option"
                )));
            }
            if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(&format!(
                    "the {what} {text:?} contains whitespace or a control character"
                )));
            }
        }
        Ok(SshSource {
            user,
            host,
            port,
            workers,
        })
    }

    /// `[user@]host`, as ssh takes it.
    fn destination(&self) -> String {
        match &self.user {
            Some(user) => format!("{user}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

/// `host`, `host:22`, `[::1]`, `[::1]:22`.
fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("the port {p:?} is not a number from 0 to 65535"))
    };
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "an IPv6 address misses its ]".to_owned())?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after the address")),
        };
        return Ok((host.to_owned(), port));
    }
    match text.split_once(':') {
        Some((host, port)) => Ok((host.to_owned(), Some(parse_port(port)?))),
        None => Ok((text.to_owned(), None)),
    }
}

/// Quotes `word` for the remote shell ssh hands its command to.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A worker command to start: the program, its arguments, and how errors name it.
#[derive(Clone, Debug)]
pub(crate) struct WorkerCommand {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
}

impl WorkerCommand {
    fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Starts a worker process, gives it `token` on its stdin (`--token-stdin`:
/// a command line is visible to every user in `ps`), and reads its
/// announcement. The child keeps its stdin open (the worker stops when it
/// closes) and is killed when dropped.
async fn start_worker(
    command: WorkerCommand,
    token: &str,
    wait: Duration,
) -> Result<(Child, SocketAddr, Fingerprint, String), StartError> {
    let shown = command.display();
    let mut child = Command::new(&command.program)
        .args(&command.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| StartError::Spawn {
            command: shown.clone(),
            error,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| StartError::Announce {
        command: shown.clone(),
        what: "its stdout is not a pipe".to_owned(),
    })?;
    if let Some(stdin) = child.stdin.as_mut() {
        let line = format!("{token}\n");
        // A worker that exits at once shows in its announcement instead.
        if let Err(e) = stdin.write_all(line.as_bytes()).await {
            tracing::debug!(error = %e, "pool: writing the token to a worker's stdin");
        }
        let _ = stdin.flush().await;
    }
    let mut lines = BufReader::new(stdout).lines();
    let announce = |what: String| StartError::Announce {
        command: shown.clone(),
        what,
    };
    let read = tokio::time::timeout(wait, async {
        // Skip what a login shell or ssh banner may print before it.
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(found) = parse_announcement(&line) {
                        return Ok(found);
                    }
                    tracing::debug!(line, "pool: worker output before its announcement");
                }
                Ok(None) => return Err("it exited (its stdout closed)".to_owned()),
                Err(e) => return Err(format!("reading its stdout: {e}")),
            }
        }
    })
    .await;
    let (addr, fingerprint) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(what)) => {
            let status = child.try_wait().ok().flatten();
            let what = match status {
                Some(status) => format!("{what}, {status}"),
                None => what,
            };
            return Err(announce(what));
        }
        Err(_) => return Err(announce(format!("nothing within {wait:?}"))),
    };
    // Keep reading what it prints, so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr, fingerprint, shown))
}

/// Starts `n` local worker processes concurrently and adds them; with
/// `restart_workers`, each is started again when it exits on its own.
pub(crate) async fn start_local(
    shared: &Arc<Shared>,
    command: &WorkerCommand,
    n: usize,
) -> Result<(), StartError> {
    let mut command = command.clone();
    command.args.extend(
        [
            "--listen",
            "127.0.0.1:0",
            "--exit-on-stdin-close",
            "--token-stdin",
        ]
        .iter()
        .map(OsString::from),
    );
    let respawns = (0..n).map(|_| Respawn::Local(command.clone())).collect();
    start_all(shared, respawns).await
}

/// Starts a worker process for each of `respawns` concurrently and adds
/// them; with `restart_workers`, each is started again the same way when
/// it exits on its own.
async fn start_all(shared: &Arc<Shared>, respawns: Vec<Respawn>) -> Result<(), StartError> {
    let launched = futures_util::future::join_all(respawns.iter().map(|r| r.launch(shared))).await;
    for (launched, respawn) in launched.into_iter().zip(respawns) {
        let Launched {
            name,
            child,
            addr,
            fingerprint,
        } = launched?;
        let exited = add_process(shared, name, child, addr, fingerprint);
        if shared.settings.restart_workers {
            tokio::spawn(keep_worker(Arc::downgrade(shared), respawn, exited));
        }
    }
    Ok(())
}

/// Adds the worker process `child` (local or over ssh) that announced
/// `addr` and `fingerprint`, watched: removed when it exits, which the
/// receiver hears.
fn add_process(
    shared: &Arc<Shared>,
    name: String,
    child: Child,
    addr: SocketAddr,
    fingerprint: Fingerprint,
) -> tokio::sync::oneshot::Receiver<()> {
    let (process, watch, exited) = watch_process(shared, child);
    let member = shared.add(
        name,
        addr,
        ClientTls::pinned(fingerprint),
        None,
        Origin::Process(process),
    );
    watch(member);
    exited
}

/// How to start one worker process again, once its predecessor exited.
#[derive(Clone, Debug)]
enum Respawn {
    /// A local worker: the pool's worker command.
    Local(WorkerCommand),
    /// Worker `index` of an ssh source: the whole `ssh` command line.
    Ssh {
        command: WorkerCommand,
        source: SshSource,
        index: usize,
    },
}

/// A worker process started and announced, not yet a pool member.
struct Launched {
    name: String,
    child: Child,
    addr: SocketAddr,
    fingerprint: Fingerprint,
}

impl Respawn {
    async fn launch(&self, shared: &Shared) -> Result<Launched, StartError> {
        let command = match self {
            Respawn::Local(command) | Respawn::Ssh { command, .. } => command.clone(),
        };
        let settings = &shared.settings;
        let (child, announced, fingerprint, _) =
            start_worker(command, &settings.token, settings.connect_timeout).await?;
        let (name, addr) = match self {
            Respawn::Local(_) => (local_name(&child, announced), announced),
            Respawn::Ssh { source, index, .. } => {
                let addr = dial_address(&source.host, announced).await?;
                (ssh_name(source, *index, addr), addr)
            }
        };
        Ok(Launched {
            name,
            child,
            addr,
            fingerprint,
        })
    }
}

/// Starts a worker again each time its process exits on its own (`exited`
/// fires), until the pool stops it or closes. Waits the reconnect backoff
/// first, doubling while new workers fail to start or die within the
/// backoff's longest wait.
async fn keep_worker(
    shared: std::sync::Weak<Shared>,
    respawn: Respawn,
    mut exited: tokio::sync::oneshot::Receiver<()>,
) {
    let mut started = tokio::time::Instant::now();
    let mut failures = 0u32;
    let backoff = |s: &Shared| Backoff {
        initial: s.settings.backoff_initial,
        max: s.settings.backoff_max,
    };
    loop {
        // An error: the pool stopped the worker (or is gone), so no restart.
        if exited.await.is_err() {
            return;
        }
        let Some(backoff) = shared.upgrade().map(|s| backoff(&s)) else {
            return;
        };
        if started.elapsed() >= backoff.max {
            failures = 0;
        }
        loop {
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.wait(failures)).await;
            let Some(shared) = shared.upgrade().filter(|s| !s.is_closed()) else {
                return;
            };
            match respawn.launch(&shared).await {
                // Dropped at once if the pool closed meanwhile (the child is
                // killed on drop).
                Ok(_) if shared.is_closed() => return,
                Ok(launched) => {
                    tracing::info!(worker = %launched.name, "pool: a worker exited; started another");
                    exited = add_process(
                        &shared,
                        launched.name,
                        launched.child,
                        launched.addr,
                        launched.fingerprint,
                    );
                    started = tokio::time::Instant::now();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pool: a worker could not be started again; retrying");
                }
            }
        }
    }
}

/// A worker's name in the pool's figures and errors.
fn ssh_name(source: &SshSource, index: usize, addr: SocketAddr) -> String {
    let port = source.port.map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "ssh://{}{port}/{} worker {index} at {addr}",
        source.destination(),
        source.workers
    )
}

fn local_name(child: &Child, addr: SocketAddr) -> String {
    format!("local worker {addr} (pid {})", child.id().unwrap_or(0))
}

/// Starts the workers of an ssh source through `ssh` and adds them; with
/// `restart_workers`, each is started again (through `ssh`, on the same
/// host) when it exits on its own.
pub(crate) async fn start_ssh(
    shared: &Arc<Shared>,
    ssh: &WorkerCommand,
    remote: &[String],
    listen: &str,
    source: &SshSource,
) -> Result<(), StartError> {
    let mut remote_words: Vec<String> = remote.iter().map(|w| shell_quote(w)).collect();
    remote_words.extend(
        ["--listen", listen, "--exit-on-stdin-close", "--token-stdin"]
            .iter()
            .map(|w| shell_quote(w)),
    );
    let remote_line = remote_words.join(" ");
    let respawns: Vec<Respawn> = (0..source.workers)
        .map(|index| {
            let mut command = ssh.clone();
            if let Some(port) = source.port {
                command.args.push("-p".into());
                command.args.push(port.to_string().into());
            }
            command.args.push(source.destination().into());
            command.args.push("--".into());
            command.args.push(remote_line.clone().into());
            Respawn::Ssh {
                command,
                source: source.clone(),
                index,
            }
        })
        .collect();
    start_all(shared, respawns).await
}

/// Where to dial a worker on `host` that announced `announced`: a worker
/// listening on every interface (`0.0.0.0`, `::`) is reached at `host`.
async fn dial_address(host: &str, announced: SocketAddr) -> Result<SocketAddr, StartError> {
    if !announced.ip().is_unspecified() {
        return Ok(announced);
    }
    let address = if host.contains(':') {
        format!("[{host}]:{}", announced.port())
    } else {
        format!("{host}:{}", announced.port())
    };
    let resolved = address.to_address()?.resolve_for_client().await?;
    Ok(resolved[0])
}

/// The name a server's certificate must carry when it is trusted by CA
/// roots: the host name given (a server dialled by an address it resolved
/// to would otherwise be checked for that IP). `None` for an IP.
pub(crate) fn server_name(address: &Address) -> Option<String> {
    match &address.host {
        Host::Name(name) => Some(name.clone()),
        Host::Unspecified => Some("localhost".to_owned()),
        Host::Ip(_) => None,
    }
}

/// Resolves `name` (`host:port`) now and adds the addresses that are new;
/// retires the servers whose address it no longer resolves to (their calls
/// in flight finish).
pub(crate) async fn refresh_name(shared: &Arc<Shared>, name: &Arc<str>, tls: &ClientTls) {
    let address = match name.to_address() {
        Ok(address) => address,
        Err(e) => {
            tracing::warn!(%name, error = %e, "pool: not an address; keeping the servers");
            return;
        }
    };
    let resolved = address.resolve_for_client().await;
    let addrs = match resolved {
        Ok(addrs) => addrs,
        Err(e) => {
            // A name that does not resolve for a moment (a DNS hiccup, a
            // service scaled to zero) keeps the servers it had.
            tracing::warn!(%name, error = %e, "pool: resolving failed; keeping the servers");
            return;
        }
    };
    let known = shared.resolved_addrs(name);
    for addr in &addrs {
        if !known.contains(addr) {
            tracing::info!(%name, %addr, "pool: new server");
            shared.add(
                format!("{addr} ({name})"),
                *addr,
                tls.clone(),
                server_name(&address),
                Origin::Resolved { name: name.clone() },
            );
        }
    }
    let gone = shared.retire_where(|m| {
        matches!(&m.origin, Origin::Resolved { name: n } if n == name) && !addrs.contains(&m.addr)
    });
    if gone > 0 {
        tracing::info!(%name, gone, "pool: servers no longer resolved; retired");
    }
}

/// The task that re-resolves `name` every `period`.
pub(crate) fn resolve_periodically(
    shared: Arc<Shared>,
    name: Arc<str>,
    tls: ClientTls,
    period: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // The first tick is immediate; start() resolved already.
        loop {
            ticker.tick().await;
            if shared.is_closed() {
                return;
            }
            refresh_name(&shared, &name, &tls).await;
        }
    })
}

/// The endpoint `teleport worker --connect` dials: every worker that dials
/// in becomes a server of the pool, called over the connection it opened,
/// once its `Hello` carries the pool's token (anyone can dial; the worker
/// pinned this endpoint's certificate). At most `max_registered_workers` at
/// once, proven or not yet; more are refused without a handshake.
pub(crate) async fn worker_listener(
    shared: &Arc<Shared>,
    listen: &str,
    identity: Option<teleport_client::Identity>,
) -> Result<(Arc<ServerListener>, tokio::task::JoinHandle<()>), StartError> {
    let identity = match identity {
        Some(identity) => identity,
        None => teleport_client::Identity::self_signed(["localhost"])
            .map_err(|e| StartError::Registration(e.to_string()))?,
    };
    let listener = ServerListener::bind(
        listen,
        identity,
        &teleport_client::TransportConfig::default(),
    )
    .await
    .map_err(|e| StartError::Registration(e.to_string()))?;
    let listener = Arc::new(listener);
    let task = tokio::spawn(accept_workers(Arc::downgrade(shared), listener.clone()));
    Ok((listener, task))
}

async fn accept_workers(weak: std::sync::Weak<Shared>, listener: Arc<ServerListener>) {
    // Dialled in and not proven yet: counted apart, so impostors cannot
    // take the places of proven workers.
    let unproven = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(dialed) = listener.accept().await {
        let Some(shared) = weak.upgrade().filter(|s| !s.is_closed()) else {
            dialed.refuse();
            return;
        };
        let most = shared.settings.max_registered_workers;
        let count = shared.dialed_count();
        let waiting = unproven.load(std::sync::atomic::Ordering::Acquire);
        if count >= most || waiting >= most {
            tracing::warn!(
                peer = %dialed.remote_addr(),
                count,
                waiting,
                "pool: a worker dialled in but the pool has as many as it takes \
                 (PoolBuilder::max_registered_workers), or as many unproven; refused"
            );
            dialed.refuse();
            continue;
        }
        drop(shared);
        let peer = dialed.remote_addr();
        tracing::info!(%peer, "pool: a worker dialled in");
        unproven.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (weak, unproven) = (weak.clone(), unproven.clone());
        // Each in a task of its own: a dialler that stalls delays no other.
        tokio::spawn(async move {
            let result = Shared::connect_dialed(weak, dialed).await;
            unproven.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            if let Err(error) = result {
                tracing::info!(%peer, error, "pool: a worker that dialled in was not taken");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_sources_parse() {
        let s = SshSource::parse("ssh://maxi/8").unwrap();
        assert_eq!(
            s,
            SshSource {
                user: None,
                host: "maxi".into(),
                port: None,
                workers: 8
            }
        );
        let s = SshSource::parse("ssh://ann@10.0.0.7:2222/2").unwrap();
        assert_eq!(s.user.as_deref(), Some("ann"));
        assert_eq!(s.host, "10.0.0.7");
        assert_eq!(s.port, Some(2222));
        let s = SshSource::parse("ssh://[::1]:22/1").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", Some(22)));
        for bad in [
            "maxi/8",
            "ssh://maxi",
            "ssh://maxi/0",
            "ssh://maxi/x",
            "ssh://@h/1",
            "ssh:///2",
        ] {
            let e = SshSource::parse(bad).unwrap_err();
            assert!(e.to_string().contains("ssh://[user@]host[:port]/N"), "{e}");
        }
    }

    #[test]
    fn ssh_sources_that_would_inject_options_are_refused() {
        for (bad, why) in [
            ("ssh://-oProxyCommand=touch%20x/1", "begins with '-'"),
            ("ssh://-oProxyCommand=x@host/1", "begins with '-'"),
            ("ssh://-l@host/1", "begins with '-'"),
            ("ssh://ann@-F/1", "begins with '-'"),
            ("ssh://a b/1", "whitespace"),
            ("ssh://ann@host\t/1", "whitespace"),
            ("ssh://an n@host/1", "whitespace"),
            ("ssh://host\n-oX/1", "control"),
            ("ssh://ann\u{7f}@host/1", "control"),
        ] {
            let e = SshSource::parse(bad).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(why), "{bad:?}: {text}");
            assert!(text.contains("ssh://[user@]host[:port]/N"), "{text}");
        }
        // Names with dots, dashes inside, digits and underscores are fine.
        let s = SshSource::parse("ssh://a-nn_1@node-07.example.org/2").unwrap();
        assert_eq!(s.destination(), "a-nn_1@node-07.example.org");
    }

    #[test]
    fn remote_words_are_quoted() {
        assert_eq!(shell_quote("teleport"), "teleport");
        assert_eq!(shell_quote("0.0.0.0:0"), "0.0.0.0:0");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
