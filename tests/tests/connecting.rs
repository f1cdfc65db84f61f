//! Addresses as people write them, and connecting: `connect()` keeps trying
//! within its timeout, an unconnected client connects on demand, a client with
//! reconnecting off connects again when asked, and the in-flight limit can be
//! unbounded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{within, Fixture};
use teleport_client::{Client, ConnectError, Error};
use teleport_protocol::client::ConnectFailure;
use teleport_protocol::tree;
use teleport_quic::Identity;
use teleport_server::Server;

async fn echo_through(client: &Client) {
    assert_eq!(
        within("echo", client.call("echo", tree!(7))).await.unwrap(),
        tree!(7)
    );
}

fn is_resolve_failure(err: &Error) -> bool {
    matches!(
        err,
        Error::Connect {
            error: ConnectError::Failed(ConnectFailure::Resolve(_)),
            ..
        }
    )
}

#[tokio::test]
async fn a_client_reaches_the_server_by_every_written_form_of_its_address() {
    let fixture = Fixture::start().await;
    let port = fixture.server.local_addr().port();
    let forms: Vec<Box<dyn Fn() -> teleport_client::ClientBuilder>> = vec![
        Box::new(move || Client::builder(port)),
        Box::new(move || Client::builder(port.to_string())),
        Box::new(move || Client::builder(format!(":{port}"))),
        Box::new(move || Client::builder(format!("localhost:{port}"))),
        Box::new(move || Client::builder(format!("127.0.0.1:{port}"))),
        Box::new(move || Client::builder(format!("quic://127.0.0.1:{port}"))),
        Box::new(move || Client::builder(("127.0.0.1", port))),
    ];
    for (i, form) in forms.iter().enumerate() {
        let client = within(
            "connect",
            form().pin(fixture.server.fingerprint()).connect(),
        )
        .await
        .unwrap_or_else(|e| panic!("form {i}: {e}"));
        echo_through(&client).await;
    }
    // A literal integer port, as written in a README.
    let client = within(
        "connect",
        Client::builder(i32::from(port))
            .pin(fixture.server.fingerprint())
            .connect(),
    )
    .await
    .unwrap();
    echo_through(&client).await;
}

#[tokio::test]
async fn a_server_listens_on_every_written_form_of_an_address() {
    for form in [
        "localhost:0",
        "127.0.0.1:0",
        "[::1]:0",
        "quic://127.0.0.1:0",
    ] {
        let server = common::test_functions(Server::builder(), Arc::default())
            .listen(form)
            .await
            .unwrap_or_else(|e| panic!("{form}: {e}"));
        let addr = server.local_addr();
        assert!(
            addr.ip().is_loopback() && addr.port() != 0,
            "{form}: {addr}"
        );
        let client = within(
            "connect",
            Client::builder(addr).pin(server.fingerprint()).connect(),
        )
        .await
        .unwrap();
        echo_through(&client).await;
    }
    let err = Server::builder().listen("localhost").await.unwrap_err();
    assert!(err.to_string().contains("no port"), "{err}");
}

#[tokio::test]
async fn a_bad_or_unresolvable_address_fails_at_once_with_the_reason() {
    let pin = Identity::self_signed(["localhost"]).unwrap().fingerprint();
    for (target, says) in [
        ("localhost", "no port"),
        ("tcp://localhost:1", "unknown scheme"),
        ("host:99999", "not a port"),
        // `.invalid` never resolves (RFC 6761): the resolver says so at once.
        ("no-such-host.invalid:4433", "cannot resolve"),
    ] {
        // A connect timeout far longer than any resolver's answer: the error
        // kind shows the attempt gave up on the address itself, not on the
        // timeout (that would be `NotConnected`).
        let err = tokio::time::timeout(
            Duration::from_secs(90),
            Client::builder(target)
                .pin(pin)
                .connect_timeout(Duration::from_secs(120))
                .connect(),
        )
        .await
        .expect("the resolver answers")
        .unwrap_err();
        assert!(is_resolve_failure(&err), "{target}: {err}");
        assert!(err.to_string().contains(says), "{target}: {err}");
    }
}

#[tokio::test]
async fn connect_reaches_a_server_that_starts_after_the_client() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server_identity = identity.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        common::test_functions(Server::builder(), Arc::default())
            .identity(server_identity)
            .listen(addr)
            .await
            .unwrap()
    });
    let client = within(
        "connect",
        Client::builder(addr)
            .pin(identity.fingerprint())
            .connect_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await
    .expect("a 1 s connect reaches a server that starts 0.2 s later");
    echo_through(&client).await;
    drop(within("the server", server).await.unwrap());
}

#[tokio::test]
async fn a_built_client_connects_on_connect_or_on_its_first_call() {
    let fixture = Fixture::start().await;
    let client = fixture.client_builder().build();
    assert!(!client.connected());
    within("connect", client.connect()).await.unwrap();
    assert!(client.connected());
    echo_through(&client).await;

    let lazy = fixture.client_builder().build();
    assert!(!lazy.connected());
    echo_through(&lazy).await;
    assert!(lazy.connected());
}

#[tokio::test]
async fn with_reconnect_off_connect_after_a_loss_connects_again() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let first = common::test_functions(Server::builder(), Arc::default())
        .identity(identity.clone())
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let addr = first.local_addr();
    let client = within(
        "connect",
        Client::builder(addr)
            .pin(identity.fingerprint())
            .reconnect(false)
            .connect(),
    )
    .await
    .unwrap();
    echo_through(&client).await;
    within("shutdown", first.shutdown(Duration::from_millis(100))).await;
    common::wait_until("the loss is seen", || !client.connected()).await;
    let _second = common::test_functions(Server::builder(), Arc::default())
        .identity(identity)
        .listen(addr)
        .await
        .unwrap();
    within("connect again", client.connect())
        .await
        .expect("connect() after a loss connects again");
    assert!(client.connected());
    echo_through(&client).await;
}

#[tokio::test]
async fn the_in_flight_limit_can_be_unbounded() {
    let fixture = Fixture::start().await;
    for builder in [
        fixture.client_builder().max_in_flight(usize::MAX),
        fixture.client_builder().unbounded_in_flight(),
    ] {
        let client = within("connect", builder.connect()).await.unwrap();
        let calls: Vec<_> = (0..200).map(|i| client.call("echo", tree!(i))).collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(within("echo", call).await.unwrap(), tree!(i as i64));
        }
    }
}

#[tokio::test]
async fn dropping_the_server_stops_it_and_frees_its_port() {
    let fixture = Fixture::start().await;
    let addr = fixture.server.local_addr();
    let client = fixture.client().await;
    let running = client.call("sleep", tree!(10.0));
    common::wait_until("the call runs", || fixture.server.running() == 1).await;
    drop(fixture);
    let err = within("the call ends with the server", running)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Call(ref e) if e.is_connection_error()),
        "{err}"
    );
    // The port is free again once the socket's tasks end.
    common::wait_until("the port is free", || {
        std::net::UdpSocket::bind(addr).is_ok()
    })
    .await;
}
