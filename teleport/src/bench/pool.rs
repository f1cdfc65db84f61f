//! The pool case of `teleport bench`: small tasks (`add2`, g(x) = x + 2)
//! mapped over two local `teleport worker` processes with TLS, in tasks per
//! second, as distex's benchmark does (`map_async(g, range(100000))`; see
//! `pool/scripts/distex_bench.py` and docs/performance.md).

use std::time::Instant;

use anyhow::{ensure, Context};
use futures_util::StreamExt;
use teleport::Pool;

/// One measurement: a map of `tasks` inputs with these settings.
#[derive(Clone, Debug)]
pub(crate) struct PoolRow {
    pub(crate) qsize: usize,
    pub(crate) chunksize: usize,
    pub(crate) tasks: usize,
    pub(crate) seconds: f64,
}

impl PoolRow {
    pub(crate) fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }
}

/// (qsize, chunksize): distex's two settings, then chunks of 16.
const CASES: [(usize, usize); 3] = [(32, 1), (2, 1), (32, 16)];

/// Tasks per measurement: distex's benchmark's 100,000, also with
/// `--quick` (the three maps take a few seconds).
const TASKS: usize = 100_000;

pub(crate) async fn run() -> anyhow::Result<Vec<PoolRow>> {
    let tasks = TASKS;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut rows = Vec::new();
    for (qsize, chunksize) in CASES {
        let pool = Pool::builder()
            .worker_command(&exe, ["worker"])
            .local_workers(2)
            .qsize(qsize)
            .start()
            .await
            .context("starting two `teleport worker` processes")?;
        pool.wait_for_servers(2, std::time::Duration::from_secs(10))
            .await?;
        // Untimed: connections warm, workers' first calls done.
        map_all(&pool, 1_000, chunksize).await?;
        let started = Instant::now();
        map_all(&pool, tasks, chunksize).await?;
        rows.push(PoolRow {
            qsize,
            chunksize,
            tasks,
            seconds: started.elapsed().as_secs_f64(),
        });
        pool.close();
    }
    Ok(rows)
}

/// Maps `add2` over 0..n in input order and checks every result.
async fn map_all(pool: &Pool, n: usize, chunksize: usize) -> anyhow::Result<()> {
    let mut results = pool
        .map("add2", (0..n as i64).map(teleport::Tree::Int))
        .chunksize(chunksize);
    let mut expected = 2i64;
    while let Some(y) = results.next().await {
        let y = y?.as_int()?;
        ensure!(y == expected, "add2 returned {y}, expected {expected}");
        expected += 1;
    }
    ensure!(expected == n as i64 + 2, "the map ended early");
    Ok(())
}

/// The rows as a table.
pub(crate) fn table(rows: &[PoolRow]) -> String {
    let mut out = String::from(
        "Pool: add2 (x + 2) over two local `teleport worker` processes, TLS, input order\n\n\
         | qsize | chunksize | tasks | seconds | tasks/s |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.0} |\n",
            r.qsize,
            r.chunksize,
            r.tasks,
            r.seconds,
            r.tasks_per_s()
        ));
    }
    out
}

/// The rows as JSON lines.
pub(crate) fn json_lines(rows: &[PoolRow]) -> Vec<String> {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "case": "pool",
                "qsize": r.qsize,
                "chunksize": r.chunksize,
                "tasks": r.tasks,
                "seconds": r.seconds,
                "tasks_per_s": r.tasks_per_s(),
            })
            .to_string()
        })
        .collect()
}
