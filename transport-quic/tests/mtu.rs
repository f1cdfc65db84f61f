//! With jumbo packets allowed (the opt-in data-centre setting), a transfer
//! on loopback completes intact with packets bigger than an Ethernet frame's.

use std::time::Duration;

use bytes::Bytes;
use teleport_quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport_quic::{ClientTls, Identity, ServerTls, TransportConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_settings_discover_a_large_mtu_on_loopback_and_lose_no_byte() {
    let transfer = async {
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let fingerprint = identity.fingerprint();
        let mut transport = TransportConfig::default();
        transport.max_udp_payload = 8_972;
        transport.mtu_upper_bound = 8_972;
        // The jumbo bound itself, not the loopback default above it.
        transport.loopback_udp_payload = None;
        let server = ReferenceServer::start(
            "127.0.0.1:0".parse().unwrap(),
            &ServerTls::new(identity),
            &transport,
        )
        .unwrap();
        let client = ReferenceClient::connect(
            server.local_addr().unwrap(),
            "localhost",
            &ClientTls::pinned(fingerprint),
            &transport,
        )
        .await
        .unwrap();

        // Echo: every byte comes back and is compared. Several requests, so
        // discovery (which probes once the connection is up) has time to end.
        let payload: Bytes = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..4 {
            let echoed = client
                .request(ReferenceMode::Echo, payload.clone())
                .await
                .unwrap();
            assert_eq!(echoed.len(), payload.len());
            assert!(echoed == payload, "the echo differs from what was sent");
        }
        let stats = client.stats();
        client.close().await;
        server.close();
        stats
    };
    let stats = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("the transfers finished in time");
    assert!(
        stats.path.current_mtu > 1_452,
        "MTU discovery stayed at {} bytes",
        stats.path.current_mtu
    );
}

/// Echoes 4 x 16 MB over Teleport's own listener and connector with
/// `transport`, checking every byte, and returns the path MTU each side
/// reached (client, server).
async fn echo_over_teleport_endpoints(transport: TransportConfig) -> (u16, u16) {
    use teleport_protocol::{Array, DType, Limits, Message, Reply};
    use teleport_quic::{Connector, Listener};

    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        &ServerTls::new(identity),
        &transport,
        Limits::default(),
    )
    .unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let incoming = listener.accept().await.expect("the listener is open");
        let connection = incoming.accept().unwrap().await.unwrap();
        let (mut send, mut recv) = connection.accept_stream().await.unwrap();
        while let Some(message) = recv.receive(|_| {}).await.unwrap() {
            send.send(&message).await.unwrap();
        }
        send.finish();
        let _ = send.stopped().await;
        connection.path_mtu()
    });
    let connector = Connector::new(
        &ClientTls::pinned(fingerprint),
        &transport,
        Limits::default(),
    )
    .unwrap();
    let connection = connector.connect(addr, "localhost").await.unwrap();
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    let data: Vec<u8> = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
    let message = Message::Reply(Reply {
        request_id: 1,
        result: Ok(teleport_protocol::Tree::Array(
            Array::new(DType::U8, [data.len()], data).unwrap(),
        )),
    });
    for _ in 0..4 {
        send.send(&message).await.unwrap();
        let echoed = recv.receive(|_| {}).await.unwrap().expect("an echo");
        assert!(echoed == message, "the echo differs from what was sent");
    }
    send.finish();
    assert!(recv.receive(|_| {}).await.unwrap().is_none());
    let client_mtu = connection.path_mtu();
    (client_mtu, server.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_settings_send_big_packets_to_peers_on_this_host_only() {
    let (client, server) = tokio::time::timeout(
        Duration::from_secs(120),
        echo_over_teleport_endpoints(TransportConfig::default()),
    )
    .await
    .expect("the transfers finished in time");
    // Discovery ends at the largest size loopback over IPv4 carries, within
    // its search's granularity: well above any Ethernet frame.
    assert!(client > 9_000, "the client's MTU stayed at {client} bytes");
    assert!(server > 9_000, "the server's MTU stayed at {server} bytes");

    // With loopback treated as any other path, the internet-safe bound holds.
    let mut transport = TransportConfig::default();
    transport.loopback_udp_payload = None;
    let (client, server) = tokio::time::timeout(
        Duration::from_secs(120),
        echo_over_teleport_endpoints(transport),
    )
    .await
    .expect("the transfers finished in time");
    assert!(client <= 1_452, "the client's MTU reached {client} bytes");
    assert!(server <= 1_452, "the server's MTU reached {server} bytes");
}
