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
