//! The bare-quinn benchmark reference answers echo and sink requests.

use bytes::Bytes;
use teleport_quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport_quic::{ClientTls, Identity, ServerTls, TransportConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_echoes_and_sinks_over_pinned_tls() {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let transport = TransportConfig::default();
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

    let payload: Bytes = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = client
        .request(ReferenceMode::Echo, payload.clone())
        .await
        .unwrap();
    assert_eq!(echoed, payload);

    let counted = client
        .request(ReferenceMode::Sink, payload.clone())
        .await
        .unwrap();
    assert_eq!(counted[..], (payload.len() as u64).to_le_bytes());

    let empty = client
        .request(ReferenceMode::Echo, Bytes::new())
        .await
        .unwrap();
    assert!(empty.is_empty());

    client.close().await;
    server.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_refuses_an_unpinned_server() {
    let transport = TransportConfig::default();
    let server = ReferenceServer::start(
        "127.0.0.1:0".parse().unwrap(),
        &ServerTls::new(Identity::self_signed(["localhost"]).unwrap()),
        &transport,
    )
    .unwrap();
    let other = Identity::self_signed(["localhost"]).unwrap().fingerprint();
    let result = ReferenceClient::connect(
        server.local_addr().unwrap(),
        "localhost",
        &ClientTls::pinned(other),
        &transport,
    )
    .await;
    assert!(result.is_err());
}
