//! A server and a client in two processes.
//!
//! ```sh
//! # terminal 1
//! cargo run --release -p teleport --example two_process -- --serve
//! # terminal 2, with the address and fingerprint terminal 1 printed
//! cargo run --release -p teleport --example two_process -- --connect 127.0.0.1:PORT --pin FP
//! # or both at once: the program starts itself as the server child
//! cargo run --release -p teleport --example two_process
//! ```

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use teleport::{tree, Array, Client, Fingerprint, HandlerError, Server, Tree};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("--serve") => runtime.block_on(serve()),
        Some("--connect") => {
            let (addr, pin) = match args.as_slice() {
                [_, addr, flag, pin] if flag == "--pin" => (addr.parse()?, pin.parse()?),
                _ => return Err("usage: two_process --connect ADDR --pin FINGERPRINT".into()),
            };
            runtime.block_on(client(addr, pin))
        }
        None => spawn_and_run(&runtime),
        Some(other) => Err(format!(
            "unknown argument {other:?}; use --serve, --connect ADDR --pin FP, or nothing"
        )
        .into()),
    }
}

/// The server process: prints its address and fingerprint (one per line, for
/// a parent to read) and serves until its stdin closes.
async fn serve() -> Result<()> {
    let server = Server::builder()
        .bind("mean", |args: Tree| async move {
            let x: &[f32] = args.get("x")?.as_slice()?;
            // Summed in f64: an f32 running sum of a million values drifts.
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len().max(1) as f64;
            Ok::<Tree, HandlerError>(tree!({"mean": mean, "pid": (std::process::id())}))
        })
        .listen("127.0.0.1:0")
        .await?;
    println!("addr {}", server.local_addr());
    println!("fingerprint {}", server.fingerprint());
    // On stderr: a parent reads only the two lines above from stdout.
    eprintln!("serving; close stdin (Ctrl-D) to stop");
    // Stdin closing is the stop signal: a parent that dies takes the child along.
    tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await?;
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

async fn client(addr: SocketAddr, pin: Fingerprint) -> Result<()> {
    let client = Client::builder(addr).pin(pin).connect().await?;
    let x = Array::from_vec1((0..1_000_000).map(|i| i as f32).collect::<Vec<f32>>());
    let reply = client.call("mean", tree!({"x": (x)})).await?;
    let mean = reply.get("mean")?.as_float()?;
    println!(
        "mean of 0..1e6 computed by process {}: {mean}",
        reply.get("pid")?.as_int()?
    );
    client.close();
    if (mean - 499_999.5).abs() > 1.0 {
        return Err(format!("unexpected mean {mean}").into());
    }
    Ok(())
}

/// Starts this program as the server child, reads where to connect from its
/// stdout, runs the client, and stops the child.
fn spawn_and_run(runtime: &tokio::runtime::Runtime) -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = read_server_line(&mut child).and_then(|(addr, pin)| {
        println!("child server {} on {addr}", child.id());
        runtime.block_on(client(addr, pin))
    });
    // Closing its stdin asks the child to shut down; wait for it either way.
    drop(child.stdin.take());
    let status = child.wait()?;
    result?;
    if !status.success() {
        return Err(format!("the server child exited with {status}").into());
    }
    Ok(())
}

fn read_server_line(child: &mut Child) -> Result<(SocketAddr, Fingerprint)> {
    let stdout: ChildStdout = child.stdout.take().ok_or("the child has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut field = |name: &str| -> Result<String> {
        let line = lines
            .next()
            .ok_or("the server child exited before printing its address")??;
        line.strip_prefix(name)
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| format!("expected {name:?} from the child, got {line:?}").into())
    };
    let addr = field("addr ")?.parse()?;
    let pin = field("fingerprint ")?.parse()?;
    Ok((addr, pin))
}
