//! The queue service under pressure: replies nobody reads, consumers that
//! vanish, memory bounds, hostile names, races of acks and closes with the
//! connection's end, and one service on two servers.

mod common;

use std::time::Duration;

use common::{connect, listen, serve, serve_with, until, until_state, within};
use teleport_client::Client;
use teleport_netsim::{LinkConfig, Relay};
use teleport_protocol::{tree, Array, DType, ErrorKind, Tree};
use teleport_queue::{wire, QueueClient, QueueConfig, QueueError, QueueService};
use teleport_server::{Server, TransportConfig};

/// A client whose packets go through `relay`.
async fn connect_via(relay: &Relay, server: &Server) -> QueueClient {
    let client = within(
        "connect through the relay",
        Client::builder(relay.addr())
            .pin(server.fingerprint())
            .reconnect(false)
            .connect(),
    )
    .await
    .expect("connect");
    QueueClient::new(client)
}

fn relay_to(server: &Server, seed: u64) -> Relay {
    Relay::start(
        server.local_addr(),
        LinkConfig::default(),
        LinkConfig::default(),
        seed,
    )
    .expect("the relay starts on loopback")
}

fn bytes_item(len: usize) -> Tree {
    tree!({"data": (Array::zeros(DType::U8, [len]).unwrap())})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_pull_dropped_after_its_lease_was_made_gives_the_item_back() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let producer = connect(&server).await;
    within("push", producer.push("jobs", tree!("job")))
        .await
        .unwrap();
    // The consumer's replies take half a second to reach it, so the test
    // sees the lease made and drops the pull while its reply travels.
    let relay = relay_to(&server, 7);
    let consumer = connect_via(&relay, &server).await;
    relay.set_down(LinkConfig::default().with_delay(Duration::from_millis(500)));
    let mut pull = Box::pin(consumer.pull_acked("jobs", Duration::ZERO, None));
    tokio::select! {
        biased;
        () = until(&queues, "jobs", "the lease is made", |info| info.leased == 1) => {}
        got = &mut pull => panic!("the reply came through a 500 ms delay at once: {got:?}"),
    }
    drop(pull);
    // No ack timeout, and the connection lives on: only the release brings
    // the item back.
    until(&queues, "jobs", "the item comes back", |info| {
        info.leased == 0 && info.len == 1
    })
    .await;
    let again = within("pull", producer.pull("jobs", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(again, Some(tree!("job")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_vanishes_with_a_lease_has_its_item_delivered_to_another() {
    // The server notices a silent peer after 1 s without packets; its
    // keep-alives keep live idle clients.
    let mut transport = TransportConfig::default();
    transport.idle_timeout = Duration::from_secs(1);
    transport.keep_alive = Some(Duration::from_millis(200));
    let (server, queues) =
        serve_with(QueueConfig::default(), move |b| b.transport(transport)).await;
    let producer = connect(&server).await;
    for n in 0..2 {
        within("push", producer.push("frames", tree!(n)))
            .await
            .unwrap();
    }
    let relay = relay_to(&server, 11);
    let doomed = connect_via(&relay, &server).await;
    let leased = within("pull", doomed.pull_acked("frames", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("frame 0");
    assert_eq!(leased.item, tree!(0));

    // Another consumer takes frame 1 and waits for more.
    let survivor = connect(&server).await;
    let first = within("pull", survivor.pull_acked("frames", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("frame 1");
    assert_eq!(first.item, tree!(1));
    within("ack", survivor.ack(first.lease)).await.unwrap();
    let waiting = {
        let survivor = survivor.clone();
        tokio::spawn(async move {
            survivor
                .pull_acked("frames", Duration::from_secs(15), None)
                .await
        })
    };
    until(&queues, "frames", "the survivor waits", |info| {
        info.waiting_pulls == 1
    })
    .await;

    // The doomed consumer's packets stop, both ways.
    relay.set(LinkConfig::cut(), LinkConfig::cut());
    let again = within("the survivor's pull", waiting)
        .await
        .unwrap()
        .unwrap()
        .expect("frame 0 is delivered again");
    assert_eq!(again.item, tree!(0));
    within("ack", survivor.ack(again.lease)).await.unwrap();
    let info = queues.info("frames");
    assert!(info.is_none(), "drained and forgotten: {info:?}");
    assert_eq!(queues.total_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_belong_to_the_server_they_were_made_on() {
    // One service, two servers: their first connections have the same
    // number on each.
    let queues = QueueService::new();
    let one = listen(&queues, |b| b).await;
    let two = listen(&queues, |b| b).await;
    let on_one = connect(&one).await;
    let on_two = connect(&two).await;
    within("push", on_one.push("jobs", tree!(1))).await.unwrap();
    let leased = within("pull", on_one.pull_acked("jobs", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("the job");
    let error = within("ack from the other server", on_two.ack(leased.lease))
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::UnknownLease(_)), "{error}");
    within("ack", on_one.ack(leased.lease)).await.unwrap();
    // Both servers serve the one set of queues.
    within("push", on_two.push("shared", tree!(2)))
        .await
        .unwrap();
    let got = within("pull", on_one.pull("shared", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got, Some(tree!(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_bounded_by_bytes_per_queue_and_in_total() {
    let config = QueueConfig::default()
        .with_max_queue_bytes(64 << 10)
        .with_max_total_bytes(96 << 10);
    let (server, queues) = serve(config).await;
    let client = connect(&server).await;

    let error = within("push a huge item", client.push("a", bytes_item(100 << 10)))
        .await
        .unwrap_err();
    let QueueError::ItemTooLarge(remote) = &error else {
        panic!("expected ItemTooLarge, got {error}");
    };
    assert_eq!(remote.kind, ErrorKind::OverLimit);
    assert!(remote.message.contains("max_queue_bytes"), "{error}");
    assert!(queues.names().is_empty(), "a refused item makes no queue");

    // Two 40 KiB items do not fit in one queue's 64 KiB.
    within("push", client.push("a", bytes_item(40 << 10)))
        .await
        .unwrap();
    let error = within("push", client.push("a", bytes_item(40 << 10)))
        .await
        .unwrap_err();
    assert!(error.is_full(), "{error}");
    assert!(error.to_string().contains("bytes"), "{error}");

    // Another queue takes one; a third queue finds the service's 96 KiB
    // taken, and waits for room.
    within("push", client.push("b", bytes_item(40 << 10)))
        .await
        .unwrap();
    let error = within("push", client.push("c", bytes_item(40 << 10)))
        .await
        .unwrap_err();
    assert!(error.is_full(), "{error}");
    assert!(error.to_string().contains("together"), "{error}");
    let pusher = client.clone();
    let waiting = tokio::spawn(async move {
        pusher
            .push_wait("c", bytes_item(40 << 10), Duration::from_secs(15))
            .await
    });
    until(&queues, "c", "the push waits", |info| {
        info.waiting_pushes == 1
    })
    .await;
    // Memory freed in "a" lets the push to "c" in.
    let taken = within("pull", client.pull("a", Duration::ZERO))
        .await
        .unwrap();
    assert!(taken.is_some());
    assert_eq!(within("waiting push", waiting).await.unwrap().unwrap(), 1);
    let info = queues.info("c").expect("c holds an item");
    assert!(info.bytes > 40 << 10, "{info:?}");
    assert_eq!(
        queues.total_bytes(),
        info.bytes + queues.info("b").unwrap().bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_capacity_is_capped() {
    let config = QueueConfig::default()
        .with_default_capacity(10)
        .with_max_capacity(100);
    let (server, queues) = serve(config).await;
    let client = connect(&server).await;
    let error = within("declare", client.declare("big", Some(101)))
        .await
        .unwrap_err();
    let QueueError::Refused(remote) = &error else {
        panic!("expected Refused, got {error}");
    };
    assert_eq!(remote.type_name, wire::BAD_ARGUMENTS);
    assert!(remote.message.contains("max_capacity"), "{error}");
    assert!(queues.info("big").is_none());
    within("declare", client.declare("big", None))
        .await
        .unwrap();
    assert_eq!(queues.info("big").unwrap().capacity, 100);
    assert!(QueueService::with_config(QueueConfig::default().with_max_capacity(10)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_unknown_names_makes_no_queues_and_is_remembered_within_a_bound() {
    let config = QueueConfig::default()
        .with_max_queues(1)
        .with_max_closed_names(2);
    let (server, queues) = serve(config).await;
    let client = connect(&server).await;
    for name in ["a", "b", "c"] {
        assert_eq!(within("close", client.close(name)).await.unwrap(), 0);
    }
    assert!(queues.names().is_empty(), "{:?}", queues.names());
    // The last two names are remembered closed.
    for name in ["b", "c"] {
        let error = within("push", client.push(name, tree!(1)))
            .await
            .unwrap_err();
        assert!(error.is_closed(), "{name}: {error}");
        let error = within("pull", client.pull(name, Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(error.is_closed(), "{name}: {error}");
        assert!(within("len", client.len(name)).await.unwrap().closed);
    }
    // The oldest was forgotten; and closed names took no place among the
    // one queue allowed.
    within("push", client.push("a", tree!(1))).await.unwrap();
    assert_eq!(queues.names(), vec!["a".to_owned()]);

    // A queue closed with items is forgotten once drained, its name kept.
    within("close", client.close("a")).await.unwrap();
    within("pull", client.pull("a", Duration::ZERO))
        .await
        .unwrap();
    assert!(queues.names().is_empty());
    let error = within("push", client.push("a", tree!(2)))
        .await
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_racing_the_connections_end_settles_the_lease_once() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let producer = connect(&server).await;
    for round in 0..10 {
        let name = format!("race{round}");
        within("push", producer.push(&name, tree!(round)))
            .await
            .unwrap();
        let consumer = connect(&server).await;
        let leased = within("pull", consumer.pull_acked(&name, Duration::ZERO, None))
            .await
            .unwrap()
            .expect("the item");
        let acking = consumer.clone();
        let ack = tokio::spawn(async move { acking.ack(leased.lease).await });
        consumer.client().close();
        let acked = within("the ack", ack).await.unwrap();
        // Acknowledged or given back, once: never leased forever, never
        // both gone and queued.
        until_state(&queues, &name, "the lease is settled", |info| {
            info.is_none_or(|info| info.leased == 0)
        })
        .await;
        let len = queues.info(&name).map_or(0, |info| info.len);
        if acked.is_ok() {
            assert_eq!(len, 0, "round {round}: acknowledged, yet queued again");
        }
        assert!(len <= 1, "round {round}: {len} copies");
        if len == 1 {
            let again = within("pull", producer.pull(&name, Duration::ZERO))
                .await
                .unwrap();
            assert_eq!(again, Some(tree!(round)));
        }
        assert!(queues.info(&name).is_none());
    }
    assert_eq!(queues.total_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_racing_waiting_pushes_and_pulls_loses_no_item() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let client = connect(&server).await;
    for round in 0..10 {
        let (full, empty) = (format!("full{round}"), format!("empty{round}"));
        within("declare", client.declare(&full, Some(1)))
            .await
            .unwrap();
        within("push", client.push(&full, tree!(0))).await.unwrap();
        let pusher = client.clone();
        let name = full.clone();
        let push = tokio::spawn(async move {
            pusher
                .push_wait(&name, tree!(1), Duration::from_secs(15))
                .await
        });
        let puller = client.clone();
        let name = empty.clone();
        let pull = tokio::spawn(async move { puller.pull(&name, Duration::from_secs(15)).await });
        until(&queues, &full, "the push waits", |info| {
            info.waiting_pushes == 1
        })
        .await;
        until(&queues, &empty, "the pull waits", |info| {
            info.waiting_pulls == 1
        })
        .await;
        // Room and the close arrive together.
        let (taken, closed_full, closed_empty) = tokio::join!(
            client.pull(&full, Duration::ZERO),
            client.close(&full),
            client.close(&empty),
        );
        closed_full.unwrap();
        closed_empty.unwrap();
        let mut pulled: Vec<Tree> = taken.unwrap().into_iter().collect();
        let pushed = within("the waiting push", push).await.unwrap();
        if let Err(error) = &pushed {
            assert!(error.is_closed(), "{error}");
        }
        let error = within("the waiting pull", pull).await.unwrap().unwrap_err();
        assert!(error.is_closed(), "{error}");
        loop {
            match within("drain", client.pull(&full, Duration::from_secs(5))).await {
                Ok(Some(item)) => pulled.push(item),
                Ok(None) => panic!("a closed queue's pull waited out its timeout"),
                Err(error) => {
                    assert!(error.is_closed(), "{error}");
                    break;
                }
            }
        }
        let mut expected = vec![tree!(0)];
        if pushed.is_ok() {
            expected.push(tree!(1));
        }
        assert_eq!(pulled, expected, "round {round}");
    }
    assert!(queues.names().is_empty(), "{:?}", queues.names());
}
