//! Pype's "split a video stream to multiple remote worker processes" with
//! Teleport queues: one producer pushes camera frames (arrays) into the queue
//! `frames`, three workers pull them, process them (a mean brightness and a
//! 4x smaller thumbnail) and push the results into `results`, and a collector
//! checks that every frame came back exactly once with the right values.
//!
//! Everything runs on loopback in this one program, each role with its own
//! client and connection, as they would be in their own processes on other
//! hosts. The workers use acknowledged pulls, so a worker that died holding a
//! frame would not lose it. It exits non-zero if a check fails.
//!
//! ```sh
//! cargo run --release -p teleport --example queue_pipeline
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use teleport::queue::{QueueClient, QueueService};
use teleport::{tree, Array, Client, Server, Tree};

const FRAMES: usize = 120;
const WORKERS: usize = 3;
const HEIGHT: usize = 240;
const WIDTH: usize = 320;
/// Thumbnails are this many times smaller along each side.
const SHRINK: usize = 4;
/// The whole run must finish within this.
const DEADLINE: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Frame `index`: every pixel of every channel is `index % 251`, so the
/// collector knows what each result must hold.
fn frame(index: usize) -> Result<Array, BoxError> {
    let value = (index % 251) as u8;
    Ok(Array::from_vec(
        [HEIGHT, WIDTH, 3],
        vec![value; HEIGHT * WIDTH * 3],
    )?)
}

/// A worker's processing: the frame's mean brightness and a thumbnail that
/// keeps every `SHRINK`th pixel.
fn process(frame: &Array) -> Result<(f64, Array), BoxError> {
    let pixels: &[u8] = frame.as_slice()?;
    let mean = pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / pixels.len() as f64;
    let (h, w) = (HEIGHT / SHRINK, WIDTH / SHRINK);
    let mut thumb = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let at = ((y * SHRINK) * WIDTH + x * SHRINK) * 3;
            thumb.extend_from_slice(&pixels[at..at + 3]);
        }
    }
    Ok((mean, Array::from_vec([h, w, 3], thumb)?))
}

async fn connect(server: &Server) -> Result<QueueClient, BoxError> {
    let client = Client::builder(server.local_addr())
        .pin(server.fingerprint())
        .connect()
        .await?;
    Ok(QueueClient::new(client))
}

/// Pushes every frame, waiting for room when the workers fall behind, then
/// closes the queue so the workers know the stream ended.
async fn producer(queues: QueueClient) -> Result<(), BoxError> {
    for index in 0..FRAMES {
        let item = tree!({"index": (index as i64), "frame": (frame(index)?)});
        queues
            .push_wait("frames", item, Duration::from_secs(10))
            .await?;
    }
    queues.close("frames").await?;
    Ok(())
}

/// Pulls frames until the queue is closed and drained; returns how many it
/// processed.
async fn worker(id: usize, queues: QueueClient) -> Result<usize, BoxError> {
    let mut done = 0;
    loop {
        let leased = match queues
            .pull_acked("frames", Duration::from_secs(5), None)
            .await
        {
            Ok(Some(leased)) => leased,
            Ok(None) => return Err(format!("worker {id}: no frame for 5 s").into()),
            Err(error) if error.is_closed() => return Ok(done),
            Err(error) => return Err(error.into()),
        };
        let index = leased.item.get("index")?.as_int()?;
        let (mean, thumb) = process(leased.item.get("frame")?.as_array()?)?;
        let result = tree!({
            "index": index,
            "worker": (id as i64),
            "mean": mean,
            "thumb": (thumb),
        });
        queues
            .push_wait("results", result, Duration::from_secs(10))
            .await?;
        // Only now is the frame done with: had this worker died before,
        // the frame would have gone back to the queue for another.
        queues.ack(leased.lease).await?;
        done += 1;
    }
}

/// Pulls every result and checks it; returns the frames per worker.
async fn collector(queues: QueueClient) -> Result<BTreeMap<i64, usize>, BoxError> {
    let mut seen = vec![false; FRAMES];
    let mut per_worker = BTreeMap::new();
    let mut received = 0;
    while received < FRAMES {
        let results = queues
            .pull_batch("results", 16, Duration::from_secs(5))
            .await?;
        if results.is_empty() {
            return Err(format!("no result for 5 s after {received} of {FRAMES}").into());
        }
        for result in results {
            check(&result, &mut seen)?;
            *per_worker
                .entry(result.get("worker")?.as_int()?)
                .or_insert(0) += 1;
            received += 1;
        }
    }
    Ok(per_worker)
}

fn check(result: &Tree, seen: &mut [bool]) -> Result<(), BoxError> {
    let index = usize::try_from(result.get("index")?.as_int()?)?;
    let slot = seen
        .get_mut(index)
        .ok_or_else(|| format!("a result for frame {index}, which was never sent"))?;
    if std::mem::replace(slot, true) {
        return Err(format!("frame {index} came back twice").into());
    }
    let expected = (index % 251) as u8;
    let mean = result.get("mean")?.as_float()?;
    if mean != f64::from(expected) {
        return Err(format!("frame {index}: mean {mean}, expected {expected}").into());
    }
    let thumb = result.get("thumb")?.as_array()?;
    if thumb.shape() != [HEIGHT / SHRINK, WIDTH / SHRINK, 3] {
        return Err(format!("frame {index}: thumbnail of shape {:?}", thumb.shape()).into());
    }
    if thumb.as_slice::<u8>()?.iter().any(|&p| p != expected) {
        return Err(format!("frame {index}: the thumbnail's pixels are not {expected}").into());
    }
    Ok(())
}

async fn run() -> Result<(), BoxError> {
    let queues = QueueService::new();
    let server = queues
        .install(Server::builder())
        .listen("127.0.0.1:0")
        .await?;
    println!(
        "queue server on {} (fingerprint {})",
        server.local_addr(),
        server.fingerprint()
    );
    // A short frame queue: a producer faster than its workers waits for them
    // instead of filling the server's memory.
    let setup = connect(&server).await?;
    setup.declare("frames", Some(8)).await?;
    setup.declare("results", Some(64)).await?;

    let started = Instant::now();
    let producer = tokio::spawn(producer(connect(&server).await?));
    let mut workers = Vec::new();
    for id in 0..WORKERS {
        workers.push(tokio::spawn(worker(id, connect(&server).await?)));
    }
    let per_worker = collector(connect(&server).await?).await?;
    producer.await??;
    let mut processed = Vec::new();
    for worker in workers {
        processed.push(worker.await??);
    }
    let elapsed = started.elapsed();
    if processed.iter().sum::<usize>() != FRAMES {
        return Err(format!("the workers processed {processed:?} frames, not {FRAMES}").into());
    }
    let megabytes = (FRAMES * HEIGHT * WIDTH * 3) as f64 / 1e6;
    println!(
        "{FRAMES} frames of {HEIGHT}x{WIDTH}x3 ({megabytes:.1} MB) through {WORKERS} workers \
         in {elapsed:.2?}: every frame came back once, with the right values"
    );
    for (worker, count) in &per_worker {
        println!("  worker {worker}: {count} frames");
    }
    let left = setup.len("results").await?;
    if left.len != 0 || left.leased != 0 {
        return Err(format!("results left over: {left:?}").into());
    }
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match tokio::time::timeout(DEADLINE, run()).await {
        Ok(result) => result,
        Err(_) => Err(format!("the pipeline did not finish within {DEADLINE:?}").into()),
    }
}
