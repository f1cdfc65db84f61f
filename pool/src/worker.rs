//! The worker side: a server process for pools, with the application's own
//! functions.
//!
//! An application binds its functions and hands the builder to [`main`] (or
//! [`serve`] from its own runtime); the pool starts that program as its
//! worker ([`PoolBuilder::worker_command`](crate::PoolBuilder::worker_command)):
//!
//! ```no_run
//! use teleport_server::Server;
//! use teleport_protocol::{tree, Tree};
//!
//! fn main() -> std::process::ExitCode {
//!     let functions = Server::builder()
//!         .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) });
//!     // --listen ADDR, or --connect ADDR --pin FP; see `WorkerOptions`.
//!     teleport_pool::worker::main(functions)
//! }
//! ```
//!
//! A worker started with `--listen` prints one line,
//! `teleport worker listening on ADDR fingerprint FP`, which is how a pool
//! that started it learns where it is and which certificate to pin.
//!
//! With `--connect ADDR --pin FP` and the pool's token (`--token-stdin`,
//! `--token`, or `TELEPORT_TOKEN`) the worker dials a pool that listens
//! ([`PoolBuilder::accept_workers`](crate::PoolBuilder::accept_workers)) and
//! is called over the connection it opened
//! ([`Server::dial`](teleport_server::Server::dial)): only the pool must be
//! reachable, so a worker behind a firewall or NAT that lets it dial out
//! serves as well as any. The worker pins the pool's certificate and proves
//! itself with the token in its `Hello`. It still listens for clients of its
//! own (on `127.0.0.1:0` unless `--listen` says otherwise), dials the pool
//! again when the connection is lost (for up to `--redial-for`), and stops
//! when the pool closes it.
//!
//! The token is best given on stdin (`--token-stdin`: the first line), as a
//! pool that starts workers does: a command line is visible to every user
//! of the machine in `ps`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use teleport_client::{ClientTls, Fingerprint, Identity};
use teleport_server::{DialedClient, DialedEnd, ServerBuilder};

/// What a worker announces on stdout before the address.
pub(crate) const ANNOUNCE_PREFIX: &str = "teleport worker listening on ";
/// What a worker started with `--connect` prints, before the pool's
/// address, once its connection to the pool is up (the pool checks its
/// token next; a worker it refuses exits with [`WorkerError::Refused`]).
pub const REGISTERED_PREFIX: &str = "teleport worker registered with ";
/// Between the address and the fingerprint in the announcement.
pub(crate) const ANNOUNCE_FINGERPRINT: &str = " fingerprint ";

/// The line a worker listening at `addr` with certificate `fingerprint`
/// prints.
pub fn announcement(addr: SocketAddr, fingerprint: Fingerprint) -> String {
    format!("{ANNOUNCE_PREFIX}{addr}{ANNOUNCE_FINGERPRINT}{fingerprint}")
}

/// The address and fingerprint in a worker's announcement line.
pub fn parse_announcement(line: &str) -> Option<(SocketAddr, Fingerprint)> {
    let rest = line.trim().strip_prefix(ANNOUNCE_PREFIX)?;
    let (addr, fingerprint) = rest.split_once(ANNOUNCE_FINGERPRINT)?;
    Some((addr.parse().ok()?, fingerprint.parse().ok()?))
}

/// How a worker runs: where it listens, and the pool it dials.
/// (`Debug` hides the token.)
#[derive(Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Where to listen (`--listen`). Default: `127.0.0.1:0` (a free port on
    /// loopback; a worker that dials its pool needs no other).
    pub listen: Option<String>,
    /// A pool that accepts workers, to dial and serve (`--connect`).
    pub connect: Option<String>,
    /// The fingerprint of that pool's certificate (`--pin`).
    pub pin: Option<Fingerprint>,
    /// Stop when stdin closes (`--exit-on-stdin-close`): how a pool that
    /// started the worker, locally or over ssh, takes it down with itself.
    pub exit_on_stdin_close: bool,
    /// Keep the self-signed certificate in this directory, so the
    /// fingerprint stays the same across restarts (`--identity-dir`).
    pub identity_dir: Option<PathBuf>,
    /// A shared token clients must present, and the worker presents to the
    /// pool it dials (`--token`, or `TELEPORT_TOKEN`).
    pub token: Option<String>,
    /// Read the token from the first line of stdin (`--token-stdin`), before
    /// listening.
    pub token_stdin: bool,
    /// With `connect`: how long to keep dialling the pool again after the
    /// connection was lost (silent past its idle timeout, or forgotten by a
    /// restarted pool), before the worker gives up and exits with an error
    /// (`--redial-for SECONDS`). A pool that closed the connection, or
    /// refused the worker, is not dialled again. Default 60 s; zero never
    /// dials again.
    pub redial_for: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            listen: None,
            connect: None,
            pin: None,
            exit_on_stdin_close: false,
            identity_dir: None,
            token: std::env::var("TELEPORT_TOKEN").ok(),
            token_stdin: false,
            redial_for: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("listen", &self.listen)
            .field("connect", &self.connect)
            .field("pin", &self.pin)
            .field("exit_on_stdin_close", &self.exit_on_stdin_close)
            .field("identity_dir", &self.identity_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_stdin", &self.token_stdin)
            .field("redial_for", &self.redial_for)
            .finish()
    }
}

/// What the worker's command line or its serving went wrong with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The command line is not one a worker takes.
    #[error("{0}\nusage: worker [--listen ADDR] [--connect ADDR --pin FINGERPRINT] [--exit-on-stdin-close] [--identity-dir DIR] [--token TOKEN | --token-stdin] [--redial-for SECONDS]")]
    Usage(String),
    /// The server could not be started.
    #[error(transparent)]
    Server(#[from] teleport_server::ServerError),
    /// The certificate in `--identity-dir` could not be read or made.
    #[error("the identity in {dir}: {error}")]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        error: String,
    },
    /// Dialling the pool failed.
    #[error("dialling the pool at {pool}: {error}")]
    Register {
        /// The pool's address as given.
        pool: String,
        /// What went wrong.
        error: teleport_server::ServerError,
    },
    /// The pool refused the worker's token (`--connect`): it is not the
    /// pool's, or the pool's changed.
    #[error(
        "the pool at {pool} refused this worker's token ({reason}); give the token \
         Pool::registration() shows"
    )]
    Refused {
        /// The pool's address as given.
        pool: String,
        /// What the connection's end said.
        reason: String,
    },
    /// The token could not be read from stdin (`--token-stdin`).
    #[error("reading the token from stdin (--token-stdin): {0}")]
    TokenStdin(String),
    /// Writing the announcement to stdout failed.
    #[error("writing the announcement to stdout: {0}")]
    Stdout(#[source] std::io::Error),
    /// The runtime could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl WorkerOptions {
    /// Parses a worker's arguments (without the program name).
    pub fn from_args<I, S>(args: I) -> Result<WorkerOptions, WorkerError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut options = WorkerOptions::default();
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| WorkerError::Usage(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "--listen" => options.listen = Some(value("--listen")?),
                "--connect" => options.connect = Some(value("--connect")?),
                "--pin" => {
                    let text = value("--pin")?;
                    options.pin = Some(
                        text.parse()
                            .map_err(|e| WorkerError::Usage(format!("--pin: {e}")))?,
                    );
                }
                "--advertise" => {
                    return Err(WorkerError::Usage(
                        "--advertise is gone: the pool calls a worker over the connection the \
                         worker opens, so it never dials one back"
                            .to_owned(),
                    ))
                }
                "--identity-dir" => options.identity_dir = Some(value("--identity-dir")?.into()),
                "--token" => options.token = Some(value("--token")?),
                "--token-stdin" => options.token_stdin = true,
                "--redial-for" => {
                    let text = value("--redial-for")?;
                    let seconds: f64 = text
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| {
                            WorkerError::Usage(format!(
                                "--redial-for takes seconds (0 or more), not {text:?}"
                            ))
                        })?;
                    options.redial_for = Duration::from_secs_f64(seconds);
                }
                "--exit-on-stdin-close" => options.exit_on_stdin_close = true,
                other => return Err(WorkerError::Usage(format!("unknown argument {other:?}"))),
            }
        }
        options.check()?;
        Ok(options)
    }

    /// Checks options that go together: `--connect` with `--pin` and a
    /// token (a pool takes no worker without one).
    pub fn check(&self) -> Result<(), WorkerError> {
        if self.connect.is_some() != self.pin.is_some() {
            return Err(WorkerError::Usage(
                "--connect and --pin go together (Pool::registration gives both)".to_owned(),
            ));
        }
        if self.connect.is_some() && self.token.is_none() && !self.token_stdin {
            return Err(WorkerError::Usage(
                "--connect needs the pool's token (Pool::token): --token-stdin and the token \
                 on stdin, or TELEPORT_TOKEN"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Where the worker listens: `listen`, or its default.
    pub fn listen_addr(&self) -> &str {
        self.listen.as_deref().unwrap_or("127.0.0.1:0")
    }
}

/// Serves the functions bound on `builder` as `options` say, until stopped:
/// by Ctrl-C, by stdin closing (with `exit_on_stdin_close`), or by the pool
/// closing its connection (with `connect`; a lost connection is dialled
/// again for up to `redial_for`, and a refused one is an error).
/// Prints the announcement line first.
pub async fn serve(builder: ServerBuilder, options: WorkerOptions) -> Result<(), WorkerError> {
    let mut options = options;
    options.check()?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    if options.token_stdin {
        options.token = Some(read_token(&mut stdin).await?);
    }
    let mut builder = builder;
    if let Some(dir) = &options.identity_dir {
        let identity = load_identity(dir)?;
        builder = builder.identity(identity);
    }
    if let Some(token) = &options.token {
        builder = builder.token(token.clone());
    }
    let server = builder.listen(options.listen_addr()).await?;
    say(&announcement(server.local_addr(), server.fingerprint()))?;
    let registration = match (&options.connect, options.pin) {
        (Some(pool), Some(pin)) => {
            let client = register(pool, pin, &server, &options).await?;
            say(&format!("{REGISTERED_PREFIX}{pool}"))?;
            Some((pool.as_str(), pin, client))
        }
        _ => None,
    };
    let pool_gone = async {
        let Some((pool, pin, mut client)) = registration else {
            return std::future::pending().await;
        };
        loop {
            match client.closed().await {
                DialedEnd::Refused(reason) => {
                    return Err(WorkerError::Refused {
                        pool: pool.to_owned(),
                        reason,
                    })
                }
                DialedEnd::Lost(reason) if !options.redial_for.is_zero() => {
                    tracing::warn!(reason, "worker: lost the pool; dialling it again");
                    client = redial(pool, pin, &server, &options).await?;
                    say(&format!("{REGISTERED_PREFIX}{pool}"))?;
                }
                end => {
                    tracing::info!(%end, "worker: the pool's connection ended; stopping");
                    return Ok(());
                }
            }
        }
    };
    let stdin_closed = async {
        if options.exit_on_stdin_close {
            use tokio::io::AsyncReadExt;
            let mut sink = [0u8; 256];
            while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        () = stdin_closed => Ok(()),
        gone = pool_gone => gone,
    };
    server.shutdown(Duration::from_secs(1)).await;
    result
}

/// Prints one line of what the worker announces (where it listens, that its
/// connection to the pool is up) and flushes it: pools, scripts and tests
/// wait for these lines.
fn say(line: &str) -> Result<(), WorkerError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").map_err(WorkerError::Stdout)?;
    stdout.flush().map_err(WorkerError::Stdout)
}

/// Dials the pool again after a lost connection, with a backoff from
/// 100 ms doubling to 5 s, for up to `redial_for`; then fails with the last
/// attempt's error.
async fn redial(
    pool: &str,
    pin: Fingerprint,
    server: &teleport_server::Server,
    options: &WorkerOptions,
) -> Result<DialedClient, WorkerError> {
    let give_up = tokio::time::Instant::now() + options.redial_for;
    let backoff = teleport_protocol::Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    let mut failures = 0u32;
    loop {
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff.wait(failures)).await;
        match register(pool, pin, server, options).await {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() >= give_up => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "worker: the pool did not answer; trying again");
            }
        }
    }
}

/// The first line of stdin, without its line end.
async fn read_token(
    stdin: &mut tokio::io::BufReader<tokio::io::Stdin>,
) -> Result<String, WorkerError> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    let n = stdin
        .read_line(&mut line)
        .await
        .map_err(|e| WorkerError::TokenStdin(e.to_string()))?;
    let token = line.trim_end_matches(['\r', '\n']);
    if n == 0 || token.is_empty() {
        return Err(WorkerError::TokenStdin(
            "stdin closed or its first line is empty; write the token and a newline".to_owned(),
        ));
    }
    Ok(token.to_owned())
}

fn load_identity(dir: &std::path::Path) -> Result<Identity, WorkerError> {
    let error = |e: &dyn std::fmt::Display| WorkerError::Identity {
        dir: dir.to_owned(),
        error: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| error(&e))?;
    Identity::load_or_create_self_signed(
        dir.join("cert.pem"),
        dir.join("key.pem"),
        ["localhost".to_owned()],
    )
    .map_err(|e| error(&e))
}

/// Dials the pool at `pool` and serves it over that connection; the
/// returned handle's end is the worker's.
async fn register(
    pool: &str,
    pin: Fingerprint,
    server: &teleport_server::Server,
    options: &WorkerOptions,
) -> Result<DialedClient, WorkerError> {
    // `check` made sure there is one: a pool takes no worker without.
    let token = options.token.clone().unwrap_or_default();
    server
        .dial(pool, ClientTls::pinned(pin), token)
        .await
        .map_err(|error| WorkerError::Register {
            pool: pool.to_owned(),
            error,
        })
}

/// A worker's `main`: parses the command line (see [`WorkerOptions`]),
/// serves the functions bound on `builder` on a runtime of its own, and
/// returns the exit code (printing the error, if any, to stderr).
pub fn main(builder: ServerBuilder) -> ExitCode {
    main_with_args(builder, std::env::args().skip(1))
}

/// [`main`] with the worker's arguments given (for a program that is also
/// something else: `myapp worker --listen ...`).
pub fn main_with_args<I, S>(builder: ServerBuilder, args: I) -> ExitCode
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let result = WorkerOptions::from_args(args).and_then(|options| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(WorkerError::Runtime)?;
        runtime.block_on(serve(builder, options))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_arguments_parse_and_wrong_ones_say_why() {
        let fp = teleport_client::Identity::self_signed(["localhost"])
            .unwrap()
            .fingerprint();
        let pin = fp.to_string();
        let options = WorkerOptions::from_args([
            "--connect",
            "pool:4500",
            "--pin",
            &pin,
            "--token",
            "t",
            "--redial-for=2.5",
        ])
        .unwrap();
        assert_eq!(options.connect.as_deref(), Some("pool:4500"));
        assert_eq!(options.pin, Some(fp));
        assert_eq!(options.redial_for, Duration::from_millis(2500));
        assert_eq!(options.listen_addr(), "127.0.0.1:0");
        assert!(!format!("{options:?}").contains("\"t\""));

        for (args, why) in [
            (vec!["--redial-for", "-1"], "--redial-for takes seconds"),
            (vec!["--redial-for", "soon"], "--redial-for takes seconds"),
            (vec!["--advertise", "h"], "--advertise is gone"),
            (
                vec!["--connect", "pool:4500"],
                "--connect and --pin go together",
            ),
        ] {
            let e = WorkerOptions::from_args(args).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
