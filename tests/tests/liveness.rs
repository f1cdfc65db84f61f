//! Heartbeats and liveness: a slow function on a live server is waited for, a
//! silent server is declared dead, and both checks can be switched off.

mod common;

use std::time::Duration;

use common::{within, Fixture};
use teleport_client::{CallError, Client, Error};
use teleport_protocol::{tree, Hello, Limits, Message};
use teleport_quic::{Identity, Listener, ServerTls, TransportConfig};

const PING_INTERVAL: Duration = Duration::from_millis(50);
const MAX_AGE: Duration = Duration::from_millis(300);

/// A server that completes TLS and the Hello exchange, then accepts call
/// streams and never answers anything, not even pings: a hung peer whose QUIC
/// stack is still alive (so the transport's own idle timeout does not fire).
struct SilentServer {
    addr: std::net::SocketAddr,
    identity: Identity,
    task: tokio::task::JoinHandle<()>,
}

impl SilentServer {
    async fn start() -> SilentServer {
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let listener = Listener::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ServerTls::new(identity.clone()),
            &TransportConfig::default(),
            Limits::default(),
        )
        .unwrap();
        let addr = listener.local_addr();
        let task = tokio::spawn(async move {
            let Some(incoming) = listener.accept().await else {
                return;
            };
            let Ok(connecting) = incoming.accept() else {
                return;
            };
            let Ok(connection) = connecting.await else {
                return;
            };
            let Ok((mut control_send, mut control_recv)) = connection.accept_stream().await else {
                return;
            };
            match control_recv.receive(|_| {}).await {
                Ok(Some(Message::Hello(_))) => {}
                other => panic!("the client's first message is not a Hello: {other:?}"),
            }
            let hello = Message::Hello(Hello {
                agent: "silent test server".into(),
                token: None,
            });
            control_send.send(&hello).await.unwrap();
            // Keep every stream open and unanswered; the control stream is
            // never read again, so pings go unanswered.
            let mut held = vec![(control_send, control_recv)];
            while let Ok(streams) = connection.accept_stream().await {
                held.push(streams);
            }
            drop((held, listener));
        });
        SilentServer {
            addr,
            identity,
            task,
        }
    }

    fn client_builder(&self) -> teleport_client::ClientBuilder {
        Client::builder(self.addr).pin(self.identity.fingerprint())
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_function_running_longer_than_max_age_succeeds_because_the_server_answers_pings() {
    let fixture = Fixture::start().await;
    let client = within(
        "connecting",
        fixture
            .client_builder()
            .ping_interval(Some(PING_INTERVAL))
            .max_age(Some(MAX_AGE))
            .connect(),
    )
    .await
    .unwrap();
    // The function is silent for more than three times max_age; only the
    // server's pongs keep the client from declaring it dead.
    let result = within(
        "a call longer than max_age",
        client.call("sleep", tree!(1.0)),
    )
    .await
    .unwrap();
    assert_eq!(result, tree!("slept"));
    assert!(client.connected());
}

#[tokio::test]
async fn a_silent_server_is_declared_dead_and_the_call_fails_with_the_ages() {
    let server = SilentServer::start().await;
    let client = within(
        "connecting",
        server
            .client_builder()
            .ping_interval(Some(PING_INTERVAL))
            .max_age(Some(MAX_AGE))
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(client.server_agent().as_deref(), Some("silent test server"));
    let err = within("the dead server is noticed", client.call("echo", tree!(1)))
        .await
        .unwrap_err();
    match &err {
        Error::Call(CallError::NotAlive {
            silent_for,
            max_age,
        }) => {
            assert_eq!(*max_age, MAX_AGE);
            assert!(*silent_for >= MAX_AGE, "{err}");
        }
        other => panic!("expected NotAlive, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("max_age is 300ms"), "{message}");
    assert!(message.contains("presumed dead"), "{message}");
    assert!(err.is_connection_error());
}

#[tokio::test]
async fn without_pings_and_max_age_a_long_call_is_simply_waited_for() {
    let fixture = Fixture::start().await;
    let client = within(
        "connecting",
        fixture
            .client_builder()
            .ping_interval(None)
            .max_age(None)
            .connect(),
    )
    .await
    .unwrap();
    let result = within("a long call", client.call("sleep", tree!(1.0)))
        .await
        .unwrap();
    assert_eq!(result, tree!("slept"));
}

#[tokio::test]
async fn without_max_age_a_silent_server_is_not_declared_dead() {
    let server = SilentServer::start().await;
    let client = within(
        "connecting",
        server
            .client_builder()
            .ping_interval(None)
            .max_age(None)
            .connect(),
    )
    .await
    .unwrap();
    let mut call = client.call("echo", tree!(1));
    // Three times the max_age that kills the call in the test above: the call
    // is still pending, and the connection still up.
    let waited = tokio::time::timeout(MAX_AGE * 3, &mut call).await;
    assert!(waited.is_err(), "the call ended: {waited:?}");
    assert!(client.connected());
    assert_eq!(client.in_flight(), 1);
    // The caller can still end it.
    call.cancel();
    let err = within("cancelled call", call).await.unwrap_err();
    assert!(matches!(err, Error::Call(CallError::Cancelled)), "{err}");
}
