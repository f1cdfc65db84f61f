//! The transport on its own, on loopback: streams, messages, identities.

use std::time::Duration;

use teleport_protocol::{tree, Array, DType, Limits, Message, Reply};
use teleport_quic::{
    ClientAuth, ClientTls, Connector, Identity, Listener, ServerTls, TransportConfig,
    TransportError,
};

const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future).await.expect("timed out")
}

fn listener(tls: &ServerTls) -> Listener {
    Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        &TransportConfig::default(),
        Limits::default(),
    )
    .unwrap()
}

/// The next connection's handshake, completed.
async fn accepted(listener: &Listener) -> teleport_quic::Connection {
    let incoming = listener.accept().await.expect("the listener is open");
    incoming.accept().unwrap().await.unwrap()
}

#[tokio::test]
async fn messages_cross_a_stream_in_order_and_arrays_arrive_aligned() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let listener = listener(&ServerTls::new(identity));
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let connection = accepted(&listener).await;
        let (mut send, mut recv) = connection.accept_stream().await.unwrap();
        // Echo every message back until the client finishes.
        while let Some(message) = recv.receive(|_| {}).await.unwrap() {
            send.send(&message).await.unwrap();
        }
        send.finish();
        let _ = send.stopped().await;
    });

    let tls = ClientTls::pinned(fingerprint);
    let connector = Connector::new(&tls, &TransportConfig::default(), Limits::default()).unwrap();
    let connection = within(connector.connect(addr, "localhost")).await.unwrap();
    assert!(connection
        .peer_fingerprint()
        .is_some_and(|f| f == fingerprint));
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    let big = Array::new(DType::U8, [3 << 20], vec![7u8; 3 << 20]).unwrap();
    let messages = [
        Message::Ping { nonce: 1 },
        Message::Reply(Reply {
            request_id: 2,
            result: Ok(tree!({"x": (big), "y": [1, 2]})),
        }),
        Message::Pong { nonce: 3 },
    ];
    for message in &messages {
        send.send(message).await.unwrap();
    }
    send.finish();
    for expected in &messages {
        let got = within(recv.receive(|_| {})).await.unwrap().unwrap();
        assert_eq!(&got, expected);
        if let Message::Reply(reply) = got {
            let tree = reply.result.unwrap();
            assert!(tree.get("x").unwrap().as_array().unwrap().is_aligned_to(64));
        }
    }
    assert!(within(recv.receive(|_| {})).await.unwrap().is_none());
    within(server).await.unwrap();
}

#[tokio::test]
async fn a_message_over_the_receivers_limit_is_an_error_of_that_stream() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let mut limits = Limits::default();
    limits.max_data_len = 1024;
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        &ServerTls::new(identity),
        &TransportConfig::default(),
        limits,
    )
    .unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let connection = accepted(&listener).await;
        let (_send, mut recv) = connection.accept_stream().await.unwrap();
        let err = recv.receive(|_| {}).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Decode(ref e) if e.is_over_limit()),
            "{err}"
        );
        // The connection is fine: the next stream works.
        let (_send, mut recv) = connection.accept_stream().await.unwrap();
        recv.receive(|_| {}).await.unwrap().unwrap()
    });
    let connector = Connector::new(
        &ClientTls::pinned(fingerprint),
        &TransportConfig::default(),
        Limits::default(),
    )
    .unwrap();
    let connection = within(connector.connect(addr, "localhost")).await.unwrap();
    let (mut send, _recv) = connection.open_stream().await.unwrap();
    let big = Array::zeros(DType::U8, [4096]).unwrap();
    let _ = send
        .send(&Message::Reply(Reply {
            request_id: 1,
            result: Ok(tree!((big))),
        }))
        .await;
    send.finish();
    let (mut send, _recv2) = connection.open_stream().await.unwrap();
    send.send(&Message::Ping { nonce: 9 }).await.unwrap();
    send.finish();
    assert_eq!(within(server).await.unwrap(), Message::Ping { nonce: 9 });
}

#[tokio::test]
async fn an_untrusted_client_certificate_fails_the_handshake_and_the_listener_carries_on() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let allowed = Identity::self_signed(["client"]).unwrap();
    let tls = ServerTls::new(identity)
        .with_client_auth(ClientAuth::Fingerprints(vec![allowed.fingerprint()]));
    let listener = listener(&tls);
    let addr = listener.local_addr();
    let allowed_fp = allowed.fingerprint();
    let server = tokio::spawn(async move {
        // The first attempt fails; the second is accepted.
        let first = listener.accept().await.unwrap().accept().unwrap().await;
        assert!(
            matches!(first, Err(TransportError::HandshakeFailed(_))),
            "a stranger's certificate was accepted: {first:?}"
        );
        let second = accepted(&listener).await;
        assert_eq!(second.peer_fingerprint(), Some(allowed_fp));
        let (_send, mut recv) = second.accept_stream().await.unwrap();
        recv.receive(|_| {}).await.unwrap().unwrap()
    });

    let stranger = Identity::self_signed(["client"]).unwrap();
    let connector = Connector::new(
        &ClientTls::pinned(fingerprint).with_identity(stranger),
        &TransportConfig::default(),
        Limits::default(),
    )
    .unwrap();
    // TLS 1.3: the client may finish its handshake before the server refuses.
    if let Ok(connection) = within(connector.connect(addr, "localhost")).await {
        let err = within(connection.closed()).await;
        assert!(matches!(err, TransportError::HandshakeFailed(_)), "{err}");
    }

    let connector = Connector::new(
        &ClientTls::pinned(fingerprint).with_identity(allowed),
        &TransportConfig::default(),
        Limits::default(),
    )
    .unwrap();
    let connection = within(connector.connect(addr, "localhost")).await.unwrap();
    let (mut send, _recv) = connection.open_stream().await.unwrap();
    send.send(&Message::Ping { nonce: 4 }).await.unwrap();
    send.finish();
    assert_eq!(within(server).await.unwrap(), Message::Ping { nonce: 4 });
}

#[tokio::test]
async fn listener_reports_its_socket_buffers() {
    let listener = listener(&ServerTls::new(
        Identity::self_signed(["localhost"]).unwrap(),
    ));
    let buffers = listener.socket_buffers();
    println!("{buffers:?}");
    assert_eq!(buffers.requested, teleport_quic::SOCKET_BUFFER);
    // Whatever the kernel granted, it is at least its usual default and it
    // is reported; the capped flags agree with the figures.
    assert!(buffers.recv > 0 && buffers.send > 0, "{buffers:?}");
    if !buffers.recv_capped() {
        assert!(buffers.recv >= buffers.requested, "{buffers:?}");
    }
    if !buffers.send_capped() {
        assert!(buffers.send >= buffers.requested, "{buffers:?}");
    }
}
