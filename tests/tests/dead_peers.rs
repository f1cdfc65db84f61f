//! Dead peers are detected in seconds, with default settings, on both sides:
//! a client whose server vanished (the network cut both ways) fails every
//! pending call as not alive within max_age; a server whose client vanished
//! stops its calls and frees what they held within its peer timeout; and a
//! function running far longer than either on a live peer is never declared
//! dead.

mod common;

use std::time::{Duration, Instant};

use common::{wait_until, within, Fixture};
use futures_util::future::join_all;
use teleport_client::{CallError, Client, Error};
use teleport_netsim::{LinkConfig, Relay};
use teleport_protocol::{tree, Call, Message};

fn relay_to(fixture: &Fixture, seed: u64) -> Relay {
    Relay::start(
        fixture.server.local_addr(),
        LinkConfig::default(),
        LinkConfig::default(),
        seed,
    )
    .expect("the relay starts on loopback")
}

#[tokio::test]
async fn a_server_cut_off_fails_all_sixteen_pending_calls_as_not_alive_with_default_settings() {
    let fixture = Fixture::start().await;
    let relay = relay_to(&fixture, 1);
    // Default ping interval (1 s) and max_age (5 s).
    let client = within(
        "connecting through the relay",
        Client::builder(relay.addr())
            .pin(fixture.server.fingerprint())
            .reconnect(false)
            .connect(),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..16).map(|_| client.call("sleep", tree!(60.0))).collect();
    wait_until("all 16 calls run", || fixture.server.running() == 16).await;
    let cut = Instant::now();
    relay.set(LinkConfig::cut(), LinkConfig::cut());
    // Bounded well above the 5 s target; the kind is what is asserted.
    let results = tokio::time::timeout(Duration::from_secs(10), join_all(calls))
        .await
        .expect("every pending call fails within 10 s of the cut");
    let noticed = cut.elapsed();
    for result in results {
        match result {
            Err(Error::Call(CallError::NotAlive { max_age, .. })) => {
                assert_eq!(max_age, Duration::from_secs(5));
            }
            other => panic!("expected NotAlive, got {other:?}"),
        }
    }
    eprintln!("a cut-off server was declared dead {noticed:?} after the cut");
}

#[tokio::test]
async fn a_function_running_four_times_max_age_on_a_live_server_is_not_declared_dead() {
    let fixture = Fixture::start().await;
    let relay = relay_to(&fixture, 2);
    let client = within(
        "connecting through the relay",
        Client::builder(relay.addr())
            .pin(fixture.server.fingerprint())
            .max_age(Some(Duration::from_secs(2)))
            .connect(),
    )
    .await
    .unwrap();
    // 8 s of silence from the function; the server's pongs (to the client's
    // pings every second) keep the client from declaring it dead, and the
    // pings keep the server from timing the client out.
    let result = within("a call of 8 s", client.call("sleep", tree!(8.0)))
        .await
        .unwrap();
    assert_eq!(result, tree!("slept"));
    assert!(client.connected());
}

#[tokio::test]
async fn a_silent_client_is_closed_with_peer_timeout_and_its_calls_stopped() {
    let fixture = Fixture::start_with(|b| b.peer_timeout(Some(Duration::from_millis(1500)))).await;
    // A raw client that makes a call and then says nothing, not even pings.
    let (_connector, connection, _control) = common::raw_session(&fixture).await;
    let (mut send, _recv) = connection.open_stream().await.unwrap();
    let call = Message::Call(Call {
        request_id: 1,
        method: "sleep".into(),
        timeout: None,
        args: tree!(60.0),
    });
    send.send(&call).await.unwrap();
    send.finish();
    wait_until("the call runs", || fixture.server.running() == 1).await;
    let started = Instant::now();
    let reason = within("the server closes the silent client", connection.closed()).await;
    eprintln!(
        "a silent client was closed after {:?}: {reason}",
        started.elapsed()
    );
    // Close code 4, peer timeout.
    assert!(
        reason.to_string().contains("no sign of life from the peer"),
        "{reason}"
    );
    wait_until("its call is stopped", || fixture.server.running() == 0).await;
    wait_until("its connection is gone", || {
        fixture.server.connections() == 0
    })
    .await;
    assert_eq!(
        fixture
            .counters
            .sleeps_dropped
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The server serves others throughout.
    let other = fixture.client().await;
    assert_eq!(
        within(
            "another client's call",
            other.call("add", tree!({"a": 1, "b": 2}))
        )
        .await
        .unwrap(),
        tree!(3)
    );
}

#[tokio::test]
async fn a_client_cut_off_during_a_large_reply_is_dropped_and_its_reply_freed() {
    let fixture = Fixture::start_with(|b| b.peer_timeout(Some(Duration::from_secs(2)))).await;
    let relay = relay_to(&fixture, 3);
    let client = within(
        "connecting through the relay",
        Client::builder(relay.addr())
            .pin(fixture.server.fingerprint())
            .reconnect(false)
            .connect(),
    )
    .await
    .unwrap();
    // A 256 MiB reply; the link dies once its first bytes are on the way.
    let big = client.call("zeros", tree!({"bytes": (256i64 << 20)}));
    let big = tokio::spawn(big);
    wait_until("the reply is on its way", || {
        relay.stats().down.forwarded_bytes > (4 << 20)
    })
    .await;
    relay.set(LinkConfig::cut(), LinkConfig::cut());
    let cut = Instant::now();
    wait_until("the server drops the dead client", || {
        fixture.server.connections() == 0
    })
    .await;
    eprintln!(
        "a client cut off during a 256 MiB reply was dropped {:?} after the cut",
        cut.elapsed()
    );
    assert_eq!(fixture.server.running(), 0);
    let other = fixture.client().await;
    assert_eq!(
        within(
            "another client's call",
            other.call("add", tree!({"a": 1, "b": 2}))
        )
        .await
        .unwrap(),
        tree!(3)
    );
    let _ = within("the cut-off client's call ends", big).await;
}
