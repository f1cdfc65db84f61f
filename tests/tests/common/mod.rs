//! A server with test functions on loopback, and a client pinned to it.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use teleport_client::{Client, ClientBuilder};
use teleport_protocol::{tree, Array, DType, Tree};
use teleport_server::{Function, HandlerError, Server, ServerBuilder};

/// Every wait in these tests is bounded, so a bug fails a test instead of
/// hanging CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// Polls `condition` until it holds, bounded by [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Counts how often `sleep` calls were dropped before finishing (cancelled).
#[derive(Debug, Default)]
pub struct Counters {
    pub sleeps_started: AtomicUsize,
    pub sleeps_dropped: AtomicUsize,
    /// Calls of `hold`/`hold_blocking` running now, and the most at once.
    pub holding: AtomicUsize,
    pub max_holding: AtomicUsize,
}

impl Counters {
    fn enter_hold(&self) {
        let now = self.holding.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_holding.fetch_max(now, Ordering::SeqCst);
    }

    fn leave_hold(&self) {
        self.holding.fetch_sub(1, Ordering::SeqCst);
    }
}

struct DropCounter(Arc<Counters>, bool);

impl Drop for DropCounter {
    fn drop(&mut self) {
        if !self.1 {
            self.0.sleeps_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

pub fn test_functions(builder: ServerBuilder, counters: Arc<Counters>) -> ServerBuilder {
    let (hold, hold_blocking) = (counters.clone(), counters.clone());
    builder
        .bind("hold", move |args: Tree| {
            let counters = hold.clone();
            async move {
                counters.enter_hold();
                tokio::time::sleep(Duration::from_secs_f64(args.as_float()?)).await;
                counters.leave_hold();
                Ok(tree!(null))
            }
        })
        .bind(
            "hold_blocking",
            Function::blocking(move |args: Tree| {
                hold_blocking.enter_hold();
                std::thread::sleep(Duration::from_secs_f64(args.as_float()?));
                hold_blocking.leave_hold();
                Ok(tree!(null))
            }),
        )
        .bind("echo", |args: Tree| async move { Ok(args) })
        .bind("add", |args: Tree| async move {
            Ok(tree!((args.get("a")?.as_int()? + args.get("b")?.as_int()?)))
        })
        .bind("zeros", |args: Tree| async move {
            let n = usize::try_from(args.get("bytes")?.as_int()?)
                .map_err(|_| HandlerError::new("bytes must not be negative"))?;
            Ok(tree!({"data": (Array::zeros(DType::U8, [n])?)}))
        })
        .bind("sleep", move |args: Tree| {
            let counters = counters.clone();
            async move {
                counters.sleeps_started.fetch_add(1, Ordering::SeqCst);
                let mut guard = DropCounter(counters, false);
                let seconds = args.as_float()?;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                guard.1 = true;
                Ok(tree!("slept"))
            }
        })
        .bind(
            "fail",
            Function::blocking(|_: Tree| {
                Err::<Tree, _>(HandlerError::with_type(
                    "ValueError",
                    "this function always fails",
                ))
            }),
        )
        .bind(
            "panic",
            Function::blocking(|_: Tree| -> Result<Tree, HandlerError> {
                panic!("deliberate panic in a test")
            }),
        )
        .bind(
            "sum_f32",
            Function::blocking(|args: Tree| {
                let total: f64 = args.as_slice::<f32>()?.iter().map(|&x| f64::from(x)).sum();
                Ok(tree!(total))
            }),
        )
}

pub struct Fixture {
    pub server: Server,
    pub counters: Arc<Counters>,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Fixture::start_with(|b| b).await
    }

    pub async fn start_with(configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Fixture {
        let counters = Arc::new(Counters::default());
        let builder = configure(test_functions(Server::builder(), counters.clone()));
        let server = builder
            .listen("127.0.0.1:0")
            .await
            .expect("the server starts on loopback");
        Fixture { server, counters }
    }

    pub fn client_builder(&self) -> ClientBuilder {
        Client::builder(self.server.local_addr()).pin(self.server.fingerprint())
    }

    pub async fn client(&self) -> Client {
        within("connecting", self.client_builder().connect())
            .await
            .expect("the client connects")
    }
}

/// A QUIC connection to the fixture's server that speaks the wire format by
/// hand (the tests decide every byte), and its endpoint.
pub async fn raw_connection(
    fixture: &Fixture,
) -> (teleport_quic::Connector, teleport_quic::Connection) {
    let tls = teleport_quic::ClientTls::pinned(fixture.server.fingerprint());
    let connector = teleport_quic::Connector::new(
        &tls,
        &teleport_quic::TransportConfig::default(),
        Default::default(),
    )
    .unwrap();
    let connection = within(
        "raw connect",
        connector.connect(fixture.server.local_addr(), "localhost"),
    )
    .await
    .unwrap();
    (connector, connection)
}

/// A raw connection past its Hello exchange: (endpoint, connection, control
/// stream).
pub async fn raw_session(
    fixture: &Fixture,
) -> (
    teleport_quic::Connector,
    teleport_quic::Connection,
    (teleport_quic::SendStream, teleport_quic::RecvStream),
) {
    let (connector, connection) = raw_connection(fixture).await;
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    let hello = teleport_protocol::Message::Hello(teleport_protocol::Hello {
        agent: "raw".into(),
        token: None,
    });
    send.send(&hello).await.unwrap();
    let answer = within("the server's hello", recv.receive(|_| {}))
        .await
        .unwrap();
    assert!(matches!(answer, Some(teleport_protocol::Message::Hello(_))));
    (connector, connection, (send, recv))
}

/// A UDP relay on loopback that forwards datagrams to `server` and drops
/// every datagram coming back: a client behind it starts a handshake that
/// never completes. Lives as long as the returned task.
pub async fn one_way_relay(
    server: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let inbound = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let outbound = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = inbound.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                received = inbound.recv_from(&mut up) => {
                    let Ok((n, _)) = received else { return };
                    let _ = outbound.send_to(&up[..n], server).await;
                }
                // The server's answers are read and dropped.
                received = outbound.recv_from(&mut down) => {
                    if received.is_err() { return }
                }
            }
        }
    });
    (addr, task)
}
