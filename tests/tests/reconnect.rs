//! Reconnection: a client waits for a server that is not up yet, reconnects
//! after a restart, fails pending calls by default (at-most-once), re-sends
//! idempotent ones when asked, and keeps its in-flight limit throughout.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, within, Counters, Fixture};
use teleport_client::{CallOptions, Client, ClientBuilder, Error};
use teleport_protocol::tree;
use teleport_quic::Identity;
use teleport_server::Server;

/// A port on loopback that nothing listens on now (bound, then released).
fn free_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// The test functions served on `addr` with `identity` (so that a client's
/// pin stays valid across restarts), with counters of their own.
async fn serve(addr: SocketAddr, identity: &Identity) -> Fixture {
    let counters = Arc::new(Counters::default());
    let server = common::test_functions(Server::builder(), counters.clone())
        .identity(identity.clone())
        .listen(addr)
        .await
        .expect("the port is free");
    Fixture { server, counters }
}

fn client_builder(addr: SocketAddr, identity: &Identity) -> ClientBuilder {
    Client::builder(addr).pin(identity.fingerprint())
}

async fn connect(builder: ClientBuilder) -> Client {
    within("connecting", builder.connect())
        .await
        .expect("the client connects")
}

/// Waits until the client's `connected()` says `connected`.
async fn until_connected(client: &Client, connected: bool) {
    wait_until(&format!("connected() == {connected}"), || {
        client.connected() == connected
    })
    .await;
}

/// Waits until `count` of the server's `sleep` calls have started.
async fn until_sleeps_started(fixture: &Fixture, count: usize) {
    wait_until("the function starts", || {
        fixture.counters.sleeps_started.load(Ordering::SeqCst) >= count
    })
    .await;
}

/// Stops `fixture`'s server without waiting for its running calls.
async fn stop(fixture: Fixture) {
    within(
        "shutdown",
        fixture.server.shutdown(Duration::from_millis(100)),
    )
    .await;
}

#[tokio::test]
async fn a_lazy_client_started_before_its_server_calls_once_the_server_is_up() {
    let addr = free_port();
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let client = client_builder(addr, &identity)
        .connect_timeout(common::WAIT)
        .connect_lazy();
    assert!(!client.connected());
    let call = client.call("add", tree!({"a": 2, "b": 3}));
    // Let the client try (and fail to reach) the absent server first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!client.connected());
    let _server = serve(addr, &identity).await;
    assert_eq!(within("the waiting call", call).await.unwrap(), tree!(5));
    assert!(client.connected());
}

#[tokio::test]
async fn a_call_made_while_no_server_answers_fails_after_its_timeout_with_not_connected() {
    let addr = free_port();
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let client = client_builder(addr, &identity).connect_lazy();
    let err = within(
        "a call that cannot be sent",
        client.call_with_timeout("echo", tree!(1), Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotConnected { .. }), "{err}");
    assert!(err.is_connection_error());
    let message = err.to_string();
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(message.contains("was not sent"), "{message}");
}

#[tokio::test]
async fn after_a_server_restart_new_calls_succeed_on_a_new_connection() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(client_builder(addr, &identity)).await;
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );
    assert!(client.connected());

    stop(first).await;
    until_connected(&client, false).await;
    assert!(!client.is_closed(), "a reconnecting client is not closed");

    let second = serve(addr, &identity).await;
    // Made while disconnected: waits for the new connection.
    assert_eq!(
        within("call after the restart", client.call("echo", tree!(2)))
            .await
            .unwrap(),
        tree!(2)
    );
    assert!(client.connected());
    assert_eq!(second.server.connections(), 1);
}

#[tokio::test]
async fn a_call_pending_during_a_restart_fails_with_a_connection_error_by_default() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(client_builder(addr, &identity)).await;
    let pending = client.call("sleep", tree!(30.0));
    until_sleeps_started(&first, 1).await;

    stop(first).await;
    let err = within("the pending call", pending).await.unwrap_err();
    assert!(
        matches!(err, Error::Call(ref e) if e.is_connection_error()),
        "{err}"
    );

    // The client reconnects for new calls, and the lost call is not re-sent.
    let second = serve(addr, &identity).await;
    assert_eq!(
        within("call after the restart", client.call("echo", tree!(3)))
            .await
            .unwrap(),
        tree!(3)
    );
    assert_eq!(second.counters.sleeps_started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_idempotent_call_pending_during_a_restart_is_sent_again_and_succeeds() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(client_builder(addr, &identity)).await;
    let pending =
        client.call_with_options("sleep", tree!(1.0), CallOptions::new().idempotent(true));
    // An ordinary call on the same client still fails: the opt-in is per call.
    let ordinary = client.call("sleep", tree!(1.0));
    until_sleeps_started(&first, 2).await;

    stop(first).await;
    let err = within("the ordinary call", ordinary).await.unwrap_err();
    assert!(err.is_connection_error(), "{err}");
    let second = serve(addr, &identity).await;
    assert_eq!(
        within("the re-sent call", pending).await.unwrap(),
        tree!("slept")
    );
    assert_eq!(second.counters.sleeps_started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_resends_lost_calls_completes_them_all_after_a_restart() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(
        client_builder(addr, &identity)
            .resend_lost_calls(true)
            .default_timeout(Some(common::WAIT)),
    )
    .await;
    let pending: Vec<_> = (0..3).map(|_| client.call("sleep", tree!(1.0))).collect();
    until_sleeps_started(&first, 3).await;

    stop(first).await;
    let second = serve(addr, &identity).await;
    for call in pending {
        assert_eq!(
            within("a re-sent call", call).await.unwrap(),
            tree!("slept")
        );
    }
    assert_eq!(second.counters.sleeps_started.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_in_flight_limit_holds_across_a_restart() {
    const MAX_IN_FLIGHT: usize = 2;
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(
        client_builder(addr, &identity)
            .max_in_flight(MAX_IN_FLIGHT)
            .resend_lost_calls(true),
    )
    .await;
    // Some calls run on the first server, the rest wait for a turn; all of
    // them end up on the second server, re-sent or sent for the first time.
    let pending: Vec<_> = (0..6).map(|_| client.call("hold", tree!(0.5))).collect();
    wait_until("the first calls run", || {
        first.counters.holding.load(Ordering::SeqCst) >= MAX_IN_FLIGHT
    })
    .await;
    let first_counters = first.counters.clone();

    stop(first).await;
    let second = serve(addr, &identity).await;
    for call in pending {
        assert_eq!(within("a call", call).await.unwrap(), tree!(null));
    }
    let first_max = first_counters.max_holding.load(Ordering::SeqCst);
    let second_max = second.counters.max_holding.load(Ordering::SeqCst);
    assert!(first_max <= MAX_IN_FLIGHT, "first server saw {first_max}");
    assert!(
        second_max <= MAX_IN_FLIGHT,
        "second server saw {second_max}"
    );
    assert!(second_max >= 1);
}

#[tokio::test]
async fn with_reconnect_disabled_calls_after_a_loss_keep_failing() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(client_builder(addr, &identity).reconnect(false)).await;
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );

    stop(first).await;
    until_connected(&client, false).await;
    let _second = serve(addr, &identity).await;
    for _ in 0..2 {
        let err = within("call after the loss", client.call("echo", tree!(1)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Call(ref e) if e.is_connection_error()),
            "{err}"
        );
    }
    assert!(client.is_closed());
    assert!(!client.connected());
}

#[tokio::test]
async fn cancelling_a_call_that_waits_for_a_connection_ends_it_at_once_and_it_is_never_sent() {
    let addr = free_port();
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let client = client_builder(addr, &identity)
        .connect_timeout(common::WAIT)
        .connect_lazy();
    let waiting = client.call("sleep", tree!(0.0));
    waiting.cancel();
    let err = within("the cancelled call", waiting).await.unwrap_err();
    assert!(
        matches!(err, Error::Call(teleport_client::CallError::Cancelled)),
        "{err}"
    );

    let server = serve(addr, &identity).await;
    assert_eq!(
        within("a later call", client.call("echo", tree!(1)))
            .await
            .unwrap(),
        tree!(1)
    );
    assert_eq!(server.counters.sleeps_started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_lazy_client_with_a_wrong_token_says_so_when_its_call_gives_up() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let server = common::test_functions(Server::builder(), Arc::new(Counters::default()))
        .identity(identity.clone())
        .token("correct horse")
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let client = client_builder(server.local_addr(), &identity)
        .token("battery staple")
        .connect_lazy();
    let err = within(
        "a call that cannot be sent",
        client.call_with_timeout("echo", tree!(1), Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotConnected { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("refused"), "{message}");
    assert!(message.contains("token"), "{message}");
    assert!(!client.connected());
}

#[test]
fn the_blocking_client_connects_lazily_and_reports_its_connection() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let addr = free_port();
    let client = teleport_client::BlockingClient::connect_lazy(
        client_builder(addr, &identity).connect_timeout(common::WAIT),
    )
    .unwrap();
    assert!(!client.connected());
    let fixture = runtime.block_on(serve(addr, &identity));
    let result = client
        .call_with_options(
            "add",
            tree!({"a": 1, "b": 2}),
            CallOptions::new().idempotent(true),
        )
        .unwrap();
    assert_eq!(result, tree!(3));
    assert!(client.connected());
    drop(client);
    runtime.block_on(fixture.server.shutdown(Duration::from_secs(1)));
}

#[tokio::test]
async fn an_idempotent_call_lost_with_its_server_still_ends_by_its_deadline() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = serve("127.0.0.1:0".parse().unwrap(), &identity).await;
    let addr = first.server.local_addr();
    let client = connect(client_builder(addr, &identity)).await;
    let pending = client.call_with_options(
        "sleep",
        tree!(30.0),
        CallOptions::new()
            .idempotent(true)
            .timeout(Duration::from_secs(2)),
    );
    until_sleeps_started(&first, 1).await;
    // The server never comes back: the call waits for a connection no longer
    // than its own deadline allows.
    stop(first).await;
    let err = within("the lost call", pending).await.unwrap_err();
    let ended_by_deadline = matches!(err, Error::NotConnected { .. })
        || matches!(err, Error::Call(ref e) if e.is_deadline_exceeded());
    assert!(ended_by_deadline, "{err}");
}
