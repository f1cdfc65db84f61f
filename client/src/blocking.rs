//! A client for code that is not async: each call blocks until its result.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use teleport_protocol::Tree;

use crate::{CallOptions, Client, ClientBuilder, Error};

/// A [`Client`] with its own small tokio runtime, for synchronous programs.
/// Calls from several threads at once run concurrently on one connection.
#[derive(Debug)]
pub struct BlockingClient {
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl BlockingClient {
    /// Connects as `builder` says. Must not be called from inside an async runtime.
    pub fn connect(builder: ClientBuilder) -> Result<BlockingClient, Error> {
        let runtime = runtime()?;
        let client = runtime.block_on(builder.connect())?;
        Ok(BlockingClient { client, runtime })
    }

    /// Returns at once and connects in the background, waiting for a server
    /// that is not up yet (see [`ClientBuilder::connect_lazy`]). Must not be
    /// called from inside an async runtime.
    pub fn connect_lazy(builder: ClientBuilder) -> Result<BlockingClient, Error> {
        let runtime = runtime()?;
        let client = {
            let _guard = runtime.enter();
            builder.connect_lazy()
        };
        Ok(BlockingClient { client, runtime })
    }

    /// Calls `method` on `args` and waits for the result.
    pub fn call(&self, method: &str, args: Tree) -> Result<Tree, Error> {
        let pending = {
            let _guard = self.runtime.enter();
            self.client.call(method, args)
        };
        self.runtime.block_on(pending)
    }

    /// Calls `method` with `request` converted to a tree and converts the
    /// reply to `Resp`, and waits: see [`Client::call_as`].
    pub fn call_as<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, Error>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let args = crate::client::to_request(method, request)?;
        let reply = self.call(method, args)?;
        crate::client::from_reply(method, reply)
    }

    /// Like [`call`](Self::call), with a timeout.
    pub fn call_with_timeout(
        &self,
        method: &str,
        args: Tree,
        timeout: Duration,
    ) -> Result<Tree, Error> {
        let pending = {
            let _guard = self.runtime.enter();
            self.client.call_with_timeout(method, args, timeout)
        };
        self.runtime.block_on(pending)
    }

    /// Like [`call`](Self::call), as `options` say (timeout, idempotence).
    pub fn call_with_options(
        &self,
        method: &str,
        args: Tree,
        options: CallOptions,
    ) -> Result<Tree, Error> {
        let pending = {
            let _guard = self.runtime.enter();
            self.client.call_with_options(method, args, options)
        };
        self.runtime.block_on(pending)
    }

    /// A client that connects on its first call (see [`ClientBuilder::build`]).
    /// Must not be called from inside an async runtime.
    pub fn build(builder: ClientBuilder) -> Result<BlockingClient, Error> {
        let runtime = runtime()?;
        let client = {
            let _guard = runtime.enter();
            builder.build()
        };
        Ok(BlockingClient { client, runtime })
    }

    /// True while the client has a connection that takes calls.
    pub fn connected(&self) -> bool {
        self.client.connected()
    }

    /// The async client underneath, to start several calls before waiting.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        self.client.close();
        // Let the goodbye go out before the runtime (and the socket) goes, so
        // the server frees the connection now rather than at its idle timeout.
        // (Blocking inside another runtime would panic: skip the wait there.)
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        // The state machine bounds how long closing takes.
        let client = &self.client;
        self.runtime.block_on(client.closed());
    }
}

/// A small runtime of the client's own, for its connection's tasks.
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("teleport-client")
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}
