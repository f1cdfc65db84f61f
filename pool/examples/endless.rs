//! Maps a function over an endless stream of arrays across 4 local worker
//! processes, with a progress bar, and stops after `--items N` results
//! (default 20,000): dropping the map stops reading the stream and cancels
//! what is still in flight.
//!
//! ```sh
//! cargo run --release -p teleport-pool --example endless -- --items 20000
//! ```
//!
//! The program is its own worker: started as `endless worker ...` it serves
//! its function (`teleport_pool::worker::main_with_args`), which is how an
//! application ships its functions to a pool without a second binary.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use teleport_pool::Pool;
use teleport_protocol::{tree, Array, Tree};
use teleport_server::{Function, HandlerError, Server, ServerBuilder};

/// Elements per input array.
const LEN: usize = 1024;

fn functions() -> ServerBuilder {
    Server::builder().bind(
        "norm",
        Function::blocking(|x: Tree| {
            let v: &[f32] = x.as_slice()?;
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            Ok::<Tree, HandlerError>(tree!((f64::from(norm))))
        }),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        return teleport_pool::worker::main_with_args(functions(), args[1..].to_vec());
    }
    let items = match parse_items(&args) {
        Ok(items) => items,
        Err(e) => {
            eprintln!("error: {e}\nusage: endless [--items N]");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(items)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_items(args: &[String]) -> Result<u64, String> {
    match args {
        [] => Ok(20_000),
        [flag, n] if flag == "--items" => n
            .parse()
            .map_err(|_| format!("--items takes a number, not {n:?}")),
        other => Err(format!("unexpected arguments {other:?}")),
    }
}

async fn run(items: u64) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let pool = Pool::builder()
        .worker_command(exe, ["worker"])
        .local_workers(4)
        .qsize(8)
        .idempotent("norm")
        .start()
        .await?;
    pool.wait_for_servers(4, Duration::from_secs(10)).await?;
    println!(
        "{} workers: {:?}",
        pool.servers().len(),
        pool.servers().iter().map(|s| s.addr).collect::<Vec<_>>()
    );

    // An endless stream of arrays: input i is LEN copies of i % 7, so its
    // norm is (i % 7) * sqrt(LEN).
    let inputs = (0u64..).map(|i| {
        let value = (i % 7) as f32;
        Tree::Array(Array::from_vec([LEN], vec![value; LEN]).expect("shape fits"))
    });
    let bar = ProgressBar::new(items);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut results = pool.map("norm", inputs).take(items as usize).enumerate();
    while let Some((i, result)) = results.next().await {
        let norm = result?.as_float()?;
        let expected = (i % 7) as f64 * (LEN as f64).sqrt();
        if (norm - expected).abs() > 1e-3 * expected.max(1.0) {
            return Err(format!("input {i}: norm {norm}, expected {expected}").into());
        }
        bar.inc(1);
    }
    bar.finish();
    drop(results);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{items} arrays of {LEN} float32 in {seconds:.2} s: {:.0} arrays/s, {:.1} MB/s of input",
        items as f64 / seconds,
        (items as usize * LEN * 4) as f64 / seconds / 1e6
    );
    pool.close();
    Ok(())
}
