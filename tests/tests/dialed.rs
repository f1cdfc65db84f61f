//! Servers that dial their client (`Server::dial`, `ServerListener`,
//! `Client::dialed_in`): calls over a connection the server opened, the
//! proof a dialled-in server must give, and what each side sees when the
//! other goes away.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::within;
use teleport_client::{Client, ClientTls, ConnectError, Error, ServerListener, TransportConfig};
use teleport_protocol::{tree, Tree};
use teleport_quic::Identity;
use teleport_server::Server;

const TOKEN: &str = "correct horse battery staple";

async fn listener() -> ServerListener {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    ServerListener::bind("127.0.0.1:0", identity, &TransportConfig::default())
        .await
        .unwrap()
}

/// A server with `add2`, counting the calls that ran.
async fn server(ran: Arc<AtomicUsize>) -> Server {
    Server::builder()
        .bind("add2", move |x: Tree| {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(tree!((x.as_int()? + 2)))
            }
        })
        // Its own clients need this token; the client it dials does not.
        .token("another secret")
        .listen("127.0.0.1:0")
        .await
        .unwrap()
}

#[tokio::test]
async fn a_server_that_dialled_in_is_called_over_its_own_connection() {
    let listener = listener().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let server = server(ran.clone()).await;
    // The handshake completes as the listening side accepts it: both at once.
    let (dialled, client) = within("dial and connect", async {
        tokio::join!(
            server.dial(
                listener.local_addr(),
                ClientTls::pinned(listener.fingerprint()),
                TOKEN,
            ),
            async {
                let incoming = listener.accept().await.unwrap();
                assert!(incoming.remote_addr().ip().is_loopback());
                Client::dialed_in(incoming, TOKEN).connect().await
            }
        )
    })
    .await;
    let (dialled, client) = (dialled.unwrap(), client.unwrap());
    let calls: Vec<_> = (0..50).map(|i| client.call("add2", tree!((i)))).collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = within("call", call).await.unwrap();
        assert_eq!(reply.as_int().unwrap(), i as i64 + 2);
    }
    assert_eq!(ran.load(Ordering::SeqCst), 50);
    assert_eq!(server.stats().calls_received, 50);

    // The server shuts down: the client hears it, and does not reconnect.
    within(
        "shutdown",
        server.shutdown(std::time::Duration::from_millis(100)),
    )
    .await;
    within("the dialled connection ends", dialled.closed()).await;
    let err = within("call after the end", client.call("add2", tree!(1)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("dial again") || err.to_string().contains("shutting down"),
        "{err}"
    );
}

#[tokio::test]
async fn a_dialled_in_server_without_the_token_gets_no_call_and_no_secret() {
    let listener = listener().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let impostor = server(ran.clone()).await;
    let (dialled, (client, call, err)) = within("dial and connect", async {
        tokio::join!(
            impostor.dial(
                listener.local_addr(),
                ClientTls::pinned(listener.fingerprint()),
                "not the token",
            ),
            async {
                let incoming = listener.accept().await.unwrap();
                let client = Client::dialed_in(incoming, TOKEN)
                    // Never sent to a server that dialled in, right or wrong.
                    .token("the client's own secret")
                    // Nothing can dial it back: no effect.
                    .reconnect(true)
                    .build();
                let call = client.call("add2", tree!(1));
                let err = client.connect().await.unwrap_err();
                (client, call, err)
            }
        )
    })
    .await;
    let dialled = dialled.unwrap();
    assert!(
        matches!(
            err,
            Error::Connect {
                error: ConnectError::ServerUnauthenticated,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("expected token"), "{err}");
    // The call waiting for the connection fails, saying why (no retries:
    // nothing can dial the impostor back); nothing ran on it.
    let err = within("the waiting call", call).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("expected token") || text.contains("dial again"),
        "{text}"
    );
    assert_eq!(client.stats().connections, 0);
    within("the impostor's connection ends", dialled.closed()).await;
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(impostor.stats().calls_received, 0);
}

#[tokio::test]
async fn a_server_dials_only_the_listener_it_pinned() {
    let listener = listener().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let server = server(ran).await;
    let other = Identity::self_signed(["localhost"]).unwrap().fingerprint();
    let accepting = async {
        // The listening side would take it; the dialler refuses.
        let incoming = listener.accept().await.unwrap();
        let _ = Client::dialed_in(incoming, TOKEN).connect().await;
        std::future::pending::<()>().await
    };
    let err = within("dial with a wrong pin", async {
        tokio::select! {
            dialled = server.dial(listener.local_addr(), ClientTls::pinned(other), TOKEN) => dialled,
            () = accepting => unreachable!(),
        }
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(server.connections(), 0);
}
