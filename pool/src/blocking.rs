//! A pool for programs without an async runtime.

use std::time::Duration;

use futures_util::StreamExt;
use teleport_protocol::Tree;

use crate::error::{PoolError, StartError};
use crate::{MapStream, Pool, PoolBuilder, ServerInfo};

/// A [`Pool`] with its own tokio runtime: every method blocks until its
/// result. Maps return iterators that pull the next result when asked.
///
/// ```no_run
/// use teleport_pool::{BlockingPool, Pool};
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = BlockingPool::start(Pool::builder().local_workers(2))?;
/// for y in pool.map("echo", (0..100).map(|i| i as i64)) {
///     println!("{}", y?);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlockingPool {
    pool: Pool,
    runtime: tokio::runtime::Runtime,
}

impl BlockingPool {
    /// Starts the pool `builder` describes. Must not be called from inside
    /// an async runtime.
    pub fn start(builder: PoolBuilder) -> Result<BlockingPool, StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("teleport-pool")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let pool = runtime.block_on(builder.start())?;
        Ok(BlockingPool { pool, runtime })
    }

    /// [`Pool::submit`], waiting for the result.
    pub fn submit(&self, method: &str, args: impl Into<Tree>) -> Result<Tree, PoolError> {
        self.runtime.block_on(self.pool.submit(method, args))
    }

    /// [`Pool::run_on_all`], waiting for every result.
    pub fn run_on_all(
        &self,
        method: &str,
        args: impl Into<Tree>,
    ) -> Vec<(String, Result<Tree, PoolError>)> {
        self.runtime.block_on(self.pool.run_on_all(method, args))
    }

    /// [`Pool::map`] as an iterator of results in input order.
    pub fn map<I>(&self, method: &str, inputs: I) -> BlockingMap<'_>
    where
        I: IntoIterator,
        I::Item: Into<Tree> + 'static,
        I::IntoIter: Send + 'static,
    {
        self.iter(self.pool.map(method, inputs))
    }

    /// [`Pool::map_unordered`] as an iterator of results as they finish.
    pub fn map_unordered<I>(&self, method: &str, inputs: I) -> BlockingMap<'_>
    where
        I: IntoIterator,
        I::Item: Into<Tree> + 'static,
        I::IntoIter: Send + 'static,
    {
        self.iter(self.pool.map_unordered(method, inputs))
    }

    /// Iterates over a map made on [`pool`](Self::pool) (to set its
    /// `chunksize`, `timeout` or `idempotent` first).
    pub fn iter(&self, stream: MapStream) -> BlockingMap<'_> {
        BlockingMap {
            stream,
            runtime: &self.runtime,
        }
    }

    /// [`Pool::wait_for_servers`], blocking.
    pub fn wait_for_servers(&self, n: usize, timeout: Duration) -> Result<(), PoolError> {
        self.runtime
            .block_on(self.pool.wait_for_servers(n, timeout))
    }

    /// [`Pool::servers`].
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.pool.servers()
    }

    /// The async pool underneath (its calls must be awaited on this pool's
    /// runtime or another).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        // Kill the worker processes and close connections while the
        // runtime (which owns the child handles' reaper) still runs.
        let _guard = self.runtime.enter();
        self.pool.close();
    }
}

/// The results of a map, one per `next`, blocking until each is in.
/// Dropping it cancels the map.
#[derive(Debug)]
pub struct BlockingMap<'a> {
    stream: MapStream,
    runtime: &'a tokio::runtime::Runtime,
}

impl Iterator for BlockingMap<'_> {
    type Item = Result<Tree, PoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.stream.next())
    }
}
