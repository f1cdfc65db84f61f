//! Bare quinn through a lossy relay, with each congestion controller: every
//! byte arrives, in order. No timing assertions (the figures are in
//! `examples/loss.rs` and `docs/reliability.md`); every wait is bounded.

use std::time::Duration;

use bytes::Bytes;
use teleport_netsim::{LinkConfig, Relay};
use teleport_quic::reference::{ReferenceClient, ReferenceMode, ReferenceServer};
use teleport_quic::{ClientTls, CongestionControl, Identity, ServerTls, TransportConfig};

const WAIT: Duration = Duration::from_secs(15);

async fn echo_through_lossy_relay(congestion: CongestionControl, seed: u64) {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let mut transport = TransportConfig::default();
    transport.congestion = congestion;
    // The relay stands for a path between hosts: packets of the size the
    // internet carries, not loopback's.
    transport.loopback_udp_payload = None;
    let server = ReferenceServer::start(
        "127.0.0.1:0".parse().unwrap(),
        &ServerTls::new(identity),
        &transport,
    )
    .unwrap();
    // 1% loss and 2 ms each way, with a little reordering and duplication.
    let link = LinkConfig::default()
        .with_loss(0.01)
        .with_delay(Duration::from_millis(2))
        .with_reorder(0.01, Duration::from_millis(3))
        .with_duplicate(0.005);
    let relay = Relay::start(server.local_addr().unwrap(), link.clone(), link, seed).unwrap();

    let payload: Bytes = (0..1_500_000u32)
        .map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8)
        .collect();
    let echoed = tokio::time::timeout(WAIT, async {
        let client = ReferenceClient::connect(
            relay.addr(),
            "localhost",
            &ClientTls::pinned(fingerprint),
            &transport,
        )
        .await
        .unwrap();
        let echoed = client
            .request(ReferenceMode::Echo, payload.clone())
            .await
            .unwrap();
        client.close().await;
        echoed
    })
    .await
    .unwrap_or_else(|_| panic!("{congestion}: timed out; relay {:?}", relay.stats()));
    assert!(echoed == payload, "{congestion}: the echo differs");
    let stats = relay.stats();
    assert!(
        stats.up.dropped_loss > 0 && stats.down.dropped_loss > 0,
        "{congestion}: the relay lost nothing: {stats:?}"
    );
    server.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cubic_delivers_every_byte_at_1_percent_loss() {
    echo_through_lossy_relay(CongestionControl::Cubic, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newreno_delivers_every_byte_at_1_percent_loss() {
    echo_through_lossy_relay(CongestionControl::NewReno, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bbr_delivers_every_byte_at_1_percent_loss() {
    echo_through_lossy_relay(CongestionControl::Bbr, 3).await;
}

#[test]
fn controllers_parse_and_print_by_name() {
    for cc in CongestionControl::ALL {
        assert_eq!(cc.name().parse::<CongestionControl>(), Ok(cc));
        assert_eq!(cc.to_string(), cc.name());
    }
    assert!("vegas".parse::<CongestionControl>().is_err());
    assert_eq!(
        TransportConfig::quinn_defaults().congestion,
        CongestionControl::Cubic
    );
}
