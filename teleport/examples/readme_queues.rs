//! The README's "Named queues" snippet, as a program that runs (CI runs it,
//! and `tests/readme_snippets.rs` checks that the README shows these lines).
//!
//! ```sh
//! cargo run -p teleport --example readme_queues
//! ```

use std::time::Duration;

use teleport::{tree, Array, Client, Server};

#[rustfmt::skip] // the README's lines, as they are there
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let frame = Array::from_vec([4, 4, 3], vec![0u8; 4 * 4 * 3])?;
    // --- README: Named queues ---
    use teleport::queue::{QueueClient, QueueService};

    let server = QueueService::new().install(Server::builder()).listen("127.0.0.1:0").await?;
    let client = Client::builder(server.local_addr()).pin(server.fingerprint()).connect().await?;
    let queues = QueueClient::new(client);

    queues.declare("frames", Some(8)).await?;              // at most 8 items queued
    queues.push_wait("frames", tree!({"frame": (frame)}), Duration::from_secs(10)).await?;
    let item = queues.pull("frames", Duration::from_secs(1)).await?;        // Option<Tree>
    let batch = queues.pull_stacked("frames", 32, Duration::ZERO).await?;   // stacked on a new axis 0
    let job = queues.pull_acked("frames", Duration::from_secs(1), None).await?;
    if let Some(job) = job { /* process job.item */ queues.ack(job.lease).await?; }
    queues.close("frames").await?;                          // pulls drain it, then fail
    // --- end ---
    assert!(item.is_some());
    assert!(batch.is_none(), "the one frame was pulled already");
    println!("the README's queue snippet ran");
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
