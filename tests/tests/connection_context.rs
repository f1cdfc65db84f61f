//! What a function learns about its caller's connection from its `Context`
//! (`connection_id`, `connection_closed`), and `Responder::try_respond`.

mod common;

use std::sync::{Arc, Mutex};

use common::{within, WAIT};
use teleport_client::{CallError, Client, Error};
use teleport_protocol::{tree, ErrorKind, RemoteError, Tree};
use teleport_server::{Context, Function, Responder, Server};
use tokio::sync::{mpsc, oneshot};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_learns_when_its_callers_connection_ends() {
    // Each call reports its connection's number, and a task per call says
    // when that connection ended, long after the call was answered.
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<u64>();
    let server = Server::builder()
        .bind("whoami", move |_: Tree, ctx: Context| {
            let ended_tx = ended_tx.clone();
            async move {
                let id = ctx.connection_id();
                assert!(!ctx.is_connection_closed());
                let closed = ctx.connection_closed();
                tokio::spawn(async move {
                    closed.await;
                    let _ = ended_tx.send(id);
                });
                Ok(tree!((id as i64)))
            }
        })
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let connect = || {
        Client::builder(server.local_addr())
            .pin(server.fingerprint())
            .connect()
    };
    let first = within("connect", connect()).await.unwrap();
    let a = within("call", first.call("whoami", tree!(null)))
        .await
        .unwrap();
    let b = within("call", first.call("whoami", tree!(null)))
        .await
        .unwrap();
    assert_eq!(a, b, "calls of one connection share its number");
    let second = within("connect", connect()).await.unwrap();
    let c = within("call", second.call("whoami", tree!(null)))
        .await
        .unwrap();
    assert_ne!(a, c, "another connection, another number");

    // Nothing ended while both clients live.
    assert!(ended.try_recv().is_err());
    first.close();
    let id = a.as_int().unwrap() as u64;
    for _ in 0..2 {
        assert_eq!(within("first's end", ended.recv()).await, Some(id));
    }
    assert!(ended.try_recv().is_err(), "the second connection lives on");
    drop(second);
    let id = c.as_int().unwrap() as u64;
    assert_eq!(within("second's end", ended.recv()).await, Some(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_respond_gives_the_value_back_when_nobody_waits() {
    let (held_tx, held) = oneshot::channel::<Responder>();
    let held_tx = Arc::new(Mutex::new(Some(held_tx)));
    let server = Server::builder()
        .bind(
            "hold",
            Function::deferred(move |_: Tree, responder: Responder| {
                if let Some(tx) = held_tx.lock().unwrap().take() {
                    let _ = tx.send(responder);
                }
            }),
        )
        .bind(
            "offer",
            Function::deferred(|args: Tree, responder: Responder| {
                if responder.try_respond(args).is_err() {
                    unreachable!("the caller waits");
                }
            }),
        )
        .bind(
            "refuse",
            Function::deferred(|_: Tree, responder: Responder| {
                responder.respond_error(RemoteError::new(
                    ErrorKind::Overloaded,
                    "Busy",
                    "come back later",
                ));
            }),
        )
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let client = within(
        "connect",
        Client::builder(server.local_addr())
            .pin(server.fingerprint())
            .connect(),
    )
    .await
    .unwrap();

    // `respond_error` keeps its kind, and is no function failure.
    let error = within("refuse", client.call("refuse", tree!(null)))
        .await
        .unwrap_err();
    let remote = error.remote().expect("a remote error");
    assert_eq!(
        (remote.kind, remote.type_name.as_str()),
        (ErrorKind::Overloaded, "Busy")
    );
    server.check().expect("no function failure");

    // A call cancelled while its function holds the responder: the value
    // comes back.
    let call = client.call("hold", tree!(null));
    let responder = within("the call is held", held).await.unwrap();
    call.cancel();
    within(
        "the server sees the cancel",
        responder.context().cancelled(),
    )
    .await;
    let back = responder.try_respond(tree!("item"));
    assert_eq!(back, Err(tree!("item")));
    assert!(matches!(
        tokio::time::timeout(WAIT, call).await.unwrap(),
        Err(Error::Call(CallError::Cancelled))
    ));

    // A live call takes the value.
    let offered = within("offer", client.call("offer", tree!({"x": 1})))
        .await
        .unwrap();
    assert_eq!(offered, tree!({"x": 1}));
}
