use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use teleport::{Array, Client, Server, Tree};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = Server::builder()
        .bind("echo", |t: Tree| async move { Ok(t) })
        .max_in_flight(128)
        .listen("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::builder(server.local_addr())
        .pin(server.fingerprint())
        .max_in_flight(128)
        .connect()
        .await
        .unwrap();
    let payload = Array::from_vec1(vec![1u8; 1024]);
    let done = Arc::new(AtomicU64::new(0));
    let secs: u64 = std::env::args().nth(1).map_or(5, |s| s.parse().unwrap());
    let inflight: usize = std::env::args().nth(2).map_or(64, |s| s.parse().unwrap());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (c, p, d) = (client.clone(), payload.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while t.elapsed() < Duration::from_secs(secs) {
                c.call("echo", Tree::Array(p.clone())).await.unwrap();
                d.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{:.0} calls/s",
        done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    );
}
