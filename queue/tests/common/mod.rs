//! What the queue tests share: bounded waits, a server with the queue
//! service, clients of their own, and waiting for the service's state
//! through [`QueueService::changes`] instead of polling it.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use teleport_client::Client;
use teleport_protocol::Tree;
use teleport_queue::{QueueClient, QueueConfig, QueueInfo, QueueService};
use teleport_server::{Server, ServerBuilder};

/// Every wait is bounded, so a bug fails a test instead of hanging CI.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// Waits until `condition` holds of the service's view of `queue` (`None`:
/// no such queue), woken by each change of the service's state.
pub(crate) async fn until_state(
    queues: &QueueService,
    queue: &str,
    what: &str,
    condition: impl Fn(Option<&QueueInfo>) -> bool,
) {
    let mut changes = queues.changes();
    within(what, async {
        loop {
            // Seen before the check, so a change after it wakes the wait.
            changes.borrow_and_update();
            if condition(queues.info(queue).as_ref()) {
                return;
            }
            changes.changed().await.expect("the service lives");
        }
    })
    .await;
}

/// Waits until `condition` holds of `queue`, which exists.
pub(crate) async fn until(
    queues: &QueueService,
    queue: &str,
    what: &str,
    condition: impl Fn(&QueueInfo) -> bool,
) {
    until_state(queues, queue, what, |info| info.is_some_and(&condition)).await;
}

pub(crate) async fn serve(config: QueueConfig) -> (Server, QueueService) {
    serve_with(config, |builder| builder).await
}

pub(crate) async fn serve_with(
    config: QueueConfig,
    adjust: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> (Server, QueueService) {
    let queues = QueueService::with_config(config).expect("valid settings");
    let server = listen(&queues, adjust).await;
    (server, queues)
}

/// Another server serving `queues`.
pub(crate) async fn listen(
    queues: &QueueService,
    adjust: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> Server {
    adjust(queues.install(Server::builder()))
        .bind("echo", |args: Tree| async move { Ok(args) })
        .listen("127.0.0.1:0")
        .await
        .expect("listen")
}

/// A client of its own (its own connection).
pub(crate) async fn connect(server: &Server) -> QueueClient {
    let client = within(
        "connect",
        Client::builder(server.local_addr())
            .pin(server.fingerprint())
            .connect(),
    )
    .await
    .expect("connect");
    QueueClient::new(client)
}
