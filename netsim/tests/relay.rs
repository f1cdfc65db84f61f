//! The relay on real loopback sockets. Every wait is bounded.

use std::net::SocketAddr;
use std::time::Duration;

use teleport_netsim::{LinkConfig, Relay};
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(5);

/// A UDP echo server; returns its address.
async fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    addr
}

async fn client(relay: &Relay) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(relay.addr()).await.unwrap();
    socket
}

/// Receives datagrams until `quiet` passes without one (bounded by WAIT).
async fn drain(socket: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match timeout(quiet, socket.recv(&mut buf)).await {
            Ok(Ok(len)) => got.push(buf[..len].to_vec()),
            _ => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perfect_link_echoes_every_datagram_in_order() {
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default(),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let socket = client(&relay).await;
    for i in 0..100u32 {
        socket.send(&i.to_le_bytes()).await.unwrap();
        // Paced, so neither kernel buffer overflows.
        let mut buf = [0u8; 16];
        let len = timeout(WAIT, socket.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..len], &i.to_le_bytes());
    }
    let stats = relay.stats();
    assert_eq!((stats.up.forwarded, stats.down.forwarded), (100, 100));
    assert_eq!(stats.flows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_applies_each_way() {
    let delay = Duration::from_millis(30);
    let link = LinkConfig::default().with_delay(delay);
    let relay = Relay::start(echo_server().await, link.clone(), link, 1).unwrap();
    let socket = client(&relay).await;
    let start = Instant::now();
    socket.send(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    timeout(WAIT, socket.recv(&mut buf)).await.unwrap().unwrap();
    assert!(start.elapsed() >= 2 * delay, "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_drops_everything_until_restored() {
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default(),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let socket = client(&relay).await;
    relay.set(LinkConfig::cut(), LinkConfig::default());
    for _ in 0..20 {
        socket.send(b"lost").await.unwrap();
    }
    assert!(drain(&socket, Duration::from_millis(200)).await.is_empty());
    assert_eq!(relay.stats().up.dropped_loss, 20);

    relay.set(LinkConfig::default(), LinkConfig::default());
    socket.send(b"back").await.unwrap();
    let got = drain(&socket, Duration::from_millis(200)).await;
    assert_eq!(got, vec![b"back".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_arrive_twice_and_are_counted() {
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default().with_duplicate(1.0),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let socket = client(&relay).await;
    socket.send(b"twice").await.unwrap();
    let got = drain(&socket, Duration::from_millis(200)).await;
    assert_eq!(got, vec![b"twice".to_vec(), b"twice".to_vec()]);
    assert_eq!(relay.stats().up.duplicated, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_paces_and_queue_drops_the_tail() {
    // 1 MB/s with a 20 KB queue; a burst of 100 datagrams of 1000 bytes.
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default().with_rate(1_000_000, 20_000),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let socket = client(&relay).await;
    let start = Instant::now();
    for i in 0..100u8 {
        socket.send(&[i; 1000]).await.unwrap();
    }
    let burst = start.elapsed();
    let got = drain(&socket, Duration::from_millis(300)).await;
    let stats = relay.stats();
    assert_eq!(stats.up.forwarded as usize, got.len());
    assert_eq!(stats.up.forwarded + stats.up.dropped_queue, 100);
    // The queue's worth of the burst gets through, plus one datagram per
    // millisecond the burst took to arrive (on a busy machine it may take a
    // while), and delivering them took the rate's time.
    let drained_meanwhile = burst.as_millis() as usize + 2;
    assert!(got.len() >= 20, "{}", got.len());
    assert!(
        got.len() <= 20 + drained_meanwhile,
        "{} in {burst:?}",
        got.len()
    );
    assert!(start.elapsed() >= Duration::from_millis(19));
    // Drop-tail: what arrives is the head of the burst, in order.
    let firsts: Vec<u8> = got.iter().map(|d| d[0]).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{firsts:?}");
    assert_eq!(firsts[0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_are_two_flows_on_one_link() {
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default(),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let a = client(&relay).await;
    let b = client(&relay).await;
    a.send(b"from a").await.unwrap();
    b.send(b"from b").await.unwrap();
    assert_eq!(
        drain(&a, Duration::from_millis(200)).await,
        vec![b"from a".to_vec()]
    );
    assert_eq!(
        drain(&b, Duration::from_millis(200)).await,
        vec![b"from b".to_vec()]
    );
    let stats = relay.stats();
    assert_eq!(stats.flows, 2);
    assert_eq!(stats.up.forwarded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_relay_stops_it() {
    let relay = Relay::start(
        echo_server().await,
        LinkConfig::default(),
        LinkConfig::default(),
        1,
    )
    .unwrap();
    let socket = client(&relay).await;
    socket.send(b"one").await.unwrap();
    assert_eq!(drain(&socket, Duration::from_millis(200)).await.len(), 1);
    drop(relay);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The port is closed: the send may fail or vanish, nothing comes back.
    let _ = socket.send(b"two").await;
    assert!(drain(&socket, Duration::from_millis(200)).await.is_empty());
}
