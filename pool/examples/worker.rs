//! A worker binary with the application's own functions: bind them, then
//! hand the builder to `teleport_pool::worker::main`, which takes the
//! worker's command line (`--listen ADDR`, or `--connect ADDR --pin FP`
//! with the pool's token, `--exit-on-stdin-close`, `--identity-dir DIR`,
//! `--token-stdin` or `--token T`).
//!
//! ```sh
//! cargo build --release -p teleport-pool --example worker
//! target/release/examples/worker --listen 127.0.0.1:0
//! # teleport worker listening on 127.0.0.1:PORT fingerprint FP
//! ```
//!
//! A pool starts it as its local (or, over ssh, remote) worker with
//! `Pool::builder().worker_command("target/release/examples/worker",
//! Vec::<String>::new()).local_workers(4)`.

use std::process::ExitCode;

use teleport_protocol::{tree, Tree};
use teleport_server::{Function, HandlerError, Server};

fn main() -> ExitCode {
    let functions = Server::builder()
        // g(x) = x + 2 on an int.
        .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) })
        // CPU work belongs on the blocking pool, not the connections' tasks.
        .bind(
            "norm",
            Function::blocking(|x: Tree| {
                let v: &[f32] = x.as_slice()?;
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                Ok::<Tree, HandlerError>(tree!((f64::from(norm))))
            }),
        );
    teleport_pool::worker::main(functions)
}
