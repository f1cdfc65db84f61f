//! `teleport worker`: a server for pools (see `teleport::pool::worker`), with
//! the built-in functions and `add2`, the pool benchmark's task.

use clap::Args;
use teleport::pool::worker::{self, WorkerOptions};
use teleport::{Array, DType, HandlerError, Server, ServerBuilder, Tree};

use crate::builtins::bind_builtins;

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Where to listen (UDP); the worker prints
    /// `teleport worker listening on ADDR fingerprint FP`. Default
    /// 127.0.0.1:0.
    #[arg(long)]
    listen: Option<String>,
    /// Dial a pool that accepts workers at this address and serve it over
    /// that connection (only the pool must be reachable). Needs the pool's
    /// token (--token-stdin or TELEPORT_TOKEN).
    #[arg(long, requires = "pin")]
    connect: Option<String>,
    /// The fingerprint of the pool's certificate (with --connect).
    #[arg(long, requires = "connect")]
    pin: Option<teleport::Fingerprint>,
    /// Stop when stdin closes (how a pool stops the workers it started).
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// Keep the self-signed certificate here, so the fingerprint stays.
    #[arg(long)]
    identity_dir: Option<std::path::PathBuf>,
    /// Shared token clients must present (and the worker presents to the
    /// pool it dials). Visible in `ps`: prefer --token-stdin or
    /// TELEPORT_TOKEN.
    #[arg(long, env = "TELEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from the first line of stdin (how a pool that starts
    /// workers gives it); overrides --token.
    #[arg(long)]
    token_stdin: bool,
    /// With --connect: for how many seconds to keep dialling the pool again
    /// after the connection was lost (not after the pool closed it or
    /// refused the worker); 0 never dials again.
    #[arg(long, default_value_t = 60.0)]
    redial_for: f64,
}

/// The functions `teleport worker` serves.
pub(crate) fn functions() -> ServerBuilder {
    bind_builtins(Server::builder()).bind("add2", |x: Tree| async move { add2(&x) })
}

pub(crate) async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut options = WorkerOptions::default();
    options.listen = args.listen;
    options.connect = args.connect;
    options.pin = args.pin;
    options.exit_on_stdin_close = args.exit_on_stdin_close;
    options.identity_dir = args.identity_dir;
    options.token = args.token;
    options.token_stdin = args.token_stdin;
    if !(args.redial_for.is_finite() && args.redial_for >= 0.0) {
        anyhow::bail!("--redial-for takes seconds (0 or more)");
    }
    options.redial_for = std::time::Duration::from_secs_f64(args.redial_for);
    worker::serve(functions(), options).await?;
    Ok(())
}

/// `add2(x)`: x + 2 for an int, a float, or every element of an int64,
/// float64 or float32 array (a chunk of ints stacks into an int64 array).
fn add2(x: &Tree) -> Result<Tree, HandlerError> {
    Ok(match x {
        Tree::Int(i) => Tree::Int(i.wrapping_add(2)),
        Tree::Float(f) => Tree::Float(f + 2.0),
        Tree::Array(a) => {
            let shape = a.shape().to_vec();
            let out = match a.dtype() {
                DType::I64 => Array::from_vec(
                    shape,
                    a.as_slice::<i64>()?
                        .iter()
                        .map(|v| v.wrapping_add(2))
                        .collect(),
                )?,
                DType::F64 => Array::from_vec(
                    shape,
                    a.as_slice::<f64>()?.iter().map(|v| v + 2.0).collect(),
                )?,
                DType::F32 => Array::from_vec(
                    shape,
                    a.as_slice::<f32>()?.iter().map(|v| v + 2.0).collect(),
                )?,
                other => {
                    return Err(HandlerError::with_type(
                        "TypeError",
                        format!("add2 takes int64, float64 or float32 arrays, not {other}"),
                    ))
                }
            };
            Tree::Array(out)
        }
        other => {
            return Err(HandlerError::with_type(
                "TypeError",
                format!("add2 takes a number or an array, not {}", other.kind_name()),
            ))
        }
    })
}
