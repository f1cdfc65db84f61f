//! Queues end to end on loopback: a server with the queue service, clients
//! with their own connections.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{connect, serve, until, until_state, within};
use teleport_protocol::{tree, Array, DType, ErrorKind, Tree};
use teleport_queue::{wire, QueueConfig, QueueError};

fn item(producer: i64, seq: i64) -> Tree {
    tree!({"producer": producer, "seq": seq})
}

fn ids(tree: &Tree) -> (i64, i64) {
    (
        tree.get("producer").unwrap().as_int().unwrap(),
        tree.get("seq").unwrap().as_int().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_producer_one_consumer_keeps_the_order() {
    let (server, _queues) = serve(QueueConfig::default()).await;
    let (producer, consumer) = (connect(&server).await, connect(&server).await);
    for seq in 0..50 {
        within("push", producer.push("q", item(0, seq)))
            .await
            .unwrap();
    }
    for seq in 0..50 {
        let got = within("pull", consumer.pull("q", Duration::from_secs(5)))
            .await
            .unwrap()
            .expect("an item");
        assert_eq!(ids(&got), (0, seq));
    }
    let empty = within("pull", consumer.pull("q", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(empty, None);
    // The queue and its calls sit beside ordinary functions.
    let echoed = within("echo", consumer.client().call("echo", tree!(7)))
        .await
        .unwrap();
    assert_eq!(echoed, tree!(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_and_consumers_get_every_item_once_in_order() {
    const PRODUCERS: i64 = 4;
    const CONSUMERS: usize = 4;
    const ITEMS: i64 = 150;
    // A small capacity, so producers wait for the consumers as well.
    let (server, _queues) = serve(QueueConfig::default().with_default_capacity(8)).await;
    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let client = connect(&server).await;
        producers.push(tokio::spawn(async move {
            for seq in 0..ITEMS {
                client
                    .push_wait("work", item(producer, seq), Duration::from_secs(10))
                    .await
                    .expect("push");
            }
        }));
    }
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let client = connect(&server).await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match client.pull("work", Duration::from_secs(5)).await {
                    Ok(Some(item)) => got.push(ids(&item)),
                    Ok(None) => panic!("no item within 5 s while producers still push"),
                    Err(error) if error.is_closed() => return got,
                    Err(error) => panic!("pull failed: {error}"),
                }
            }
        }));
    }
    for producer in producers {
        within("producer", producer).await.unwrap();
    }
    let closer = connect(&server).await;
    within("close", closer.close("work")).await.unwrap();
    let mut seen = HashSet::new();
    let mut per_consumer = Vec::new();
    for consumer in consumers {
        let got = within("consumer", consumer).await.unwrap();
        for id in &got {
            assert!(seen.insert(*id), "{id:?} was delivered twice");
        }
        per_consumer.push(got);
    }
    assert_eq!(
        seen.len(),
        (PRODUCERS * ITEMS) as usize,
        "every item delivered"
    );
    // FIFO: each consumer saw every producer's items in the order pushed.
    for got in &per_consumer {
        for producer in 0..PRODUCERS {
            let seqs: Vec<i64> = got
                .iter()
                .filter(|(p, _)| *p == producer)
                .map(|(_, s)| *s)
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "producer {producer}'s items out of order: {seqs:?}"
            );
        }
    }
    assert!(
        per_consumer.iter().filter(|got| !got.is_empty()).count() > 1,
        "the work was shared: {:?}",
        per_consumer.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_or_holds_its_pushers() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let client = connect(&server).await;
    assert!(within("declare", client.declare("small", Some(2)))
        .await
        .unwrap());
    assert!(!within("declare", client.declare("small", Some(2)))
        .await
        .unwrap());
    within("push", client.push("small", tree!(1)))
        .await
        .unwrap();
    within("push", client.push("small", tree!(2)))
        .await
        .unwrap();

    // Not waiting: refused as Overloaded.
    let error = within("push", client.push("small", tree!(3)))
        .await
        .unwrap_err();
    let QueueError::Full(remote) = &error else {
        panic!("expected Full, got {error}");
    };
    assert_eq!(remote.kind, ErrorKind::Overloaded);

    // Waiting past the timeout: refused too, after the timeout.
    let started = Instant::now();
    let error = within(
        "push",
        client.push_wait("small", tree!(3), Duration::from_millis(150)),
    )
    .await
    .unwrap_err();
    assert!(error.is_full(), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Waiting with room made meanwhile: it goes in, after the others.
    let pusher = client.clone();
    let waiting = tokio::spawn(async move {
        pusher
            .push_wait("small", tree!(3), Duration::from_secs(10))
            .await
    });
    until(&queues, "small", "the push waits", |info| {
        info.waiting_pushes == 1
    })
    .await;
    let consumer = connect(&server).await;
    let first = within("pull", consumer.pull("small", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(first, Some(tree!(1)));
    assert_eq!(within("waiting push", waiting).await.unwrap().unwrap(), 2);
    for expected in [2, 3] {
        let got = within("pull", consumer.pull("small", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(got, Some(tree!(expected)));
    }
    let info = within("len", client.len("small")).await.unwrap();
    assert_eq!((info.len, info.capacity, info.closed), (0, 2, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_wait_up_to_their_timeout() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let consumer = connect(&server).await;
    let started = Instant::now();
    let got = within("pull", consumer.pull("idle", Duration::from_millis(150)))
        .await
        .unwrap();
    assert_eq!(got, None);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // A queue made by a pull and left empty is forgotten.
    assert_eq!(queues.info("idle"), None);

    // A waiting pull is woken by a push from another connection.
    let puller = consumer.clone();
    let waiting = tokio::spawn(async move { puller.pull("idle", Duration::from_secs(10)).await });
    until(&queues, "idle", "the pull waits", |info| {
        info.waiting_pulls == 1
    })
    .await;
    let producer = connect(&server).await;
    within("push", producer.push("idle", tree!("wake")))
        .await
        .unwrap();
    let got = within("woken pull", waiting).await.unwrap().unwrap();
    assert_eq!(got, Some(tree!("wake")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pull_takes_nothing() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let consumer = connect(&server).await;
    // Boxed, so that dropping it below drops the future itself.
    let mut pull = Box::pin(consumer.pull("q", Duration::from_secs(10)));
    tokio::select! {
        got = &mut pull => panic!("nothing was pushed, yet the pull ended: {got:?}"),
        () = until(&queues, "q", "the pull waits", |info| info.waiting_pulls == 1) => {}
    }
    // Dropped while waiting: its call is cancelled, and the server withdraws
    // it (and forgets the queue it made, now empty).
    drop(pull);
    until_state(&queues, "q", "the cancelled pull is withdrawn", |info| {
        info.is_none()
    })
    .await;
    let producer = connect(&server).await;
    within("push", producer.push("q", tree!(1))).await.unwrap();
    let got = within("pull", consumer.pull("q", Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(got, Some(tree!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_item_returns_when_its_consumer_disappears() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let producer = connect(&server).await;
    for n in 0..3 {
        within("push", producer.push("jobs", tree!(n)))
            .await
            .unwrap();
    }
    // Consumer A leases job 0, and dies (its client, and so its connection,
    // goes away) before acknowledging it.
    let doomed = connect(&server).await;
    let leased = within("pull", doomed.pull_acked("jobs", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("an item");
    assert_eq!(leased.item, tree!(0));
    let info = within("len", producer.len("jobs")).await.unwrap();
    assert_eq!((info.len, info.leased), (2, 1));
    drop(doomed);
    until(&queues, "jobs", "the lease returns", |info| {
        info.leased == 0
    })
    .await;

    // Consumer B gets job 0 back, at the front.
    let survivor = connect(&server).await;
    let again = within("pull", survivor.pull_acked("jobs", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("job 0 again");
    assert_eq!(again.item, tree!(0));
    // Another connection cannot acknowledge B's lease.
    let error = within("ack", producer.ack(again.lease)).await.unwrap_err();
    assert!(matches!(error, QueueError::UnknownLease(_)), "{error}");
    within("ack", survivor.ack(again.lease)).await.unwrap();
    let error = within("ack twice", survivor.ack(again.lease))
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::UnknownLease(_)), "{error}");

    // An ack timeout gives the item back while its consumer lives.
    let slow = within(
        "pull",
        survivor.pull_acked("jobs", Duration::ZERO, Some(Duration::from_millis(100))),
    )
    .await
    .unwrap()
    .expect("job 1");
    assert_eq!(slow.item, tree!(1));
    until(&queues, "jobs", "the expired lease returns", |info| {
        info.leased == 0 && info.len == 2
    })
    .await;
    let error = within("late ack", survivor.ack(slow.lease))
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::UnknownLease(_)), "{error}");

    // Giving back on purpose.
    let batch = within(
        "pull",
        survivor.pull_batch_acked("jobs", 5, Duration::ZERO, None),
    )
    .await
    .unwrap()
    .expect("jobs 1 and 2");
    assert_eq!(batch.item, vec![tree!(1), tree!(2)]);
    within("requeue", survivor.requeue(batch.lease))
        .await
        .unwrap();
    let all = within("pull", survivor.pull_batch("jobs", 5, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(all, vec![tree!(1), tree!(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consumer_gets_an_item_its_dead_peer_leased() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let producer = connect(&server).await;
    within("push", producer.push("jobs", tree!("only")))
        .await
        .unwrap();
    let doomed = connect(&server).await;
    let leased = within("pull", doomed.pull_acked("jobs", Duration::ZERO, None))
        .await
        .unwrap()
        .expect("the item");
    // B waits on the (now empty) queue before A dies.
    let survivor = connect(&server).await;
    let waiting = tokio::spawn(async move {
        survivor
            .pull_acked("jobs", Duration::from_secs(10), None)
            .await
    });
    until(&queues, "jobs", "B waits", |info| info.waiting_pulls == 1).await;
    doomed.client().close();
    drop((doomed, leased));
    let got = within("B's pull", waiting).await.unwrap().unwrap();
    assert_eq!(got.expect("the item came back").item, tree!("only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_batch_stacks_the_run_that_agrees() {
    let (server, _queues) = serve(QueueConfig::default()).await;
    let client = connect(&server).await;
    for i in 0..3 {
        let frame = Array::from_vec([2, 2], vec![i as f32; 4]).unwrap();
        within(
            "push",
            client.push("frames", tree!({"frame": (frame), "i": i})),
        )
        .await
        .unwrap();
    }
    // Another shape: it does not stack with the first three.
    let odd = Array::from_vec([3], vec![9.0f32; 3]).unwrap();
    within(
        "push",
        client.push("frames", tree!({"frame": (odd), "i": 3})),
    )
    .await
    .unwrap();

    let stacked = within("pull", client.pull_stacked("frames", 10, Duration::ZERO))
        .await
        .unwrap()
        .expect("items");
    assert_eq!(stacked.count, 3);
    let frames = stacked.tree.get("frame").unwrap().as_array().unwrap();
    assert_eq!(frames.dtype(), DType::F32);
    assert_eq!(frames.shape(), &[3, 2, 2]);
    let values = frames.as_slice::<f32>().unwrap();
    assert_eq!(&values[..4], &[0.0; 4]);
    assert_eq!(&values[8..], &[2.0; 4]);
    let index = stacked.tree.get("i").unwrap().as_array().unwrap();
    assert_eq!(index.as_slice::<i64>().unwrap(), &[0, 1, 2]);

    let rest = within("pull", client.pull_stacked("frames", 10, Duration::ZERO))
        .await
        .unwrap()
        .expect("the odd one");
    assert_eq!(rest.count, 1);
    assert_eq!(
        rest.tree.get("frame").unwrap().as_array().unwrap().shape(),
        &[1, 3]
    );
    let none = within("pull", client.pull_stacked("frames", 10, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(none, None);

    // Unstacked, `max` bounds the batch.
    for n in 0..5 {
        within("push", client.push("plain", tree!(n)))
            .await
            .unwrap();
    }
    let two = within("pull", client.pull_batch("plain", 2, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(two, vec![tree!(0), tree!(1)]);
    let rest = within("pull", client.pull_batch("plain", 10, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(rest, vec![tree!(2), tree!(3), tree!(4)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_queue_drains_then_fails() {
    let (server, queues) = serve(QueueConfig::default()).await;
    let client = connect(&server).await;
    within("push", client.push("done", tree!(1))).await.unwrap();
    within("push", client.push("done", tree!(2))).await.unwrap();
    assert_eq!(within("close", client.close("done")).await.unwrap(), 2);
    let error = within("push", client.push("done", tree!(3)))
        .await
        .unwrap_err();
    let QueueError::Closed(remote) = &error else {
        panic!("expected Closed, got {error}");
    };
    assert_eq!(remote.kind, ErrorKind::BadRequest);
    assert_eq!(remote.type_name, wire::QUEUE_CLOSED);
    for expected in [1, 2] {
        let got = within("pull", client.pull("done", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(got, Some(tree!(expected)));
    }
    let error = within("pull", client.pull("done", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
    assert!(within("len", client.len("done")).await.unwrap().closed);

    // Closing wakes waiting pulls and pushes with the error.
    let puller = connect(&server).await;
    let waiting_pull =
        tokio::spawn(async move { puller.pull("later", Duration::from_secs(10)).await });
    until(&queues, "later", "the pull waits", |info| {
        info.waiting_pulls == 1
    })
    .await;
    within("declare", client.declare("full", Some(1)))
        .await
        .unwrap();
    within("push", client.push("full", tree!(0))).await.unwrap();
    let pusher = client.clone();
    let waiting_push = tokio::spawn(async move {
        pusher
            .push_wait("full", tree!(1), Duration::from_secs(10))
            .await
    });
    until(&queues, "full", "the push waits", |info| {
        info.waiting_pushes == 1
    })
    .await;
    within("close", client.close("later")).await.unwrap();
    within("close", client.close("full")).await.unwrap();
    let error = within("waiting pull", waiting_pull)
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
    let error = within("waiting push", waiting_push)
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
    // The item queued before the close is still there to drain.
    let got = within("pull", client.pull("full", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got, Some(tree!(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_are_refused_with_their_reason() {
    let (server, _queues) = serve(QueueConfig::default()).await;
    let client = connect(&server).await;
    let raw = client.client();
    let cases = [
        (wire::PUSH, tree!({"item": 1}), "queue"),
        (wire::PUSH, tree!({"queue": "q"}), "item"),
        (wire::PUSH, tree!([1, 2]), "map"),
        (
            wire::PULL,
            tree!({"queue": "q", "timeout": -1.0}),
            "timeout",
        ),
        (wire::PULL_BATCH, tree!({"queue": "q"}), "max"),
        (wire::PULL_BATCH, tree!({"queue": "q", "max": 0}), "max"),
        (wire::ACK, tree!({"lease": "x"}), "lease"),
        (
            wire::DECLARE,
            tree!({"queue": "q", "capacity": 2, "unbounded": true}),
            "both",
        ),
    ];
    for (function, args, mentions) in cases {
        let error = within(function, raw.call(function, args.clone()))
            .await
            .unwrap_err();
        let remote = error
            .remote()
            .unwrap_or_else(|| panic!("{function}: {error}"));
        assert_eq!(remote.kind, ErrorKind::BadRequest, "{function} {args}");
        assert_eq!(remote.type_name, wire::BAD_ARGUMENTS);
        assert!(
            remote.message.contains(mentions),
            "{function} {args}: {}",
            remote.message
        );
    }
    // Queue refusals are not failures of the server's functions.
    server.check().expect("no function failure recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_queues_is_bounded() {
    let (server, _queues) = serve(QueueConfig::default().with_max_queues(2)).await;
    let client = connect(&server).await;
    within("push", client.push("a", tree!(1))).await.unwrap();
    within("push", client.push("b", tree!(1))).await.unwrap();
    let error = within("push", client.push("c", tree!(1)))
        .await
        .unwrap_err();
    let QueueError::Refused(remote) = &error else {
        panic!("expected Refused, got {error}");
    };
    assert_eq!(remote.type_name, wire::TOO_MANY_QUEUES);
    // Draining a queue made by its first use frees its place.
    within("pull", client.pull("a", Duration::ZERO))
        .await
        .unwrap();
    within("push", client.push("c", tree!(1))).await.unwrap();
}
