//! End-to-end calls over QUIC on loopback: results, errors, concurrency,
//! deadlines, cancellation, limits and shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{wait_until, within, Fixture};
use teleport_client::{CallError, Error, ErrorKind};
use teleport_protocol::{tree, Array, DType, Limits, Map, Tree};

fn all_dtypes() -> Tree {
    let mut map = Map::new();
    for (i, dtype) in DType::ALL.iter().enumerate() {
        let data: Vec<u8> = (0..6 * dtype.size())
            .map(|b| (b * 7 + i) as u8 % 2)
            .collect();
        map.insert(dtype.name(), Array::new(*dtype, [2usize, 3], data).unwrap());
    }
    map.insert("empty", Array::zeros(DType::F32, [0usize, 4]).unwrap());
    map.insert("scalar", Array::scalar(2.5f64));
    map.insert(
        "nested",
        tree!({"list": [1, "two", null, true, 3.5, (bytes::Bytes::from_static(b"raw"))]}),
    );
    Tree::Map(map)
}

#[tokio::test]
async fn echo_returns_every_dtype_intact_and_aligned() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let args = all_dtypes();
    let result = within("echo", client.call("echo", args.clone()))
        .await
        .unwrap();
    assert_eq!(result, args);
    for array in result.arrays() {
        assert!(
            array.is_aligned_to(64),
            "{:?} is not 64-byte aligned",
            array.dtype()
        );
    }
}

#[tokio::test]
async fn a_function_gets_its_arguments_and_returns_its_result() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let sum = within("add", client.call("add", tree!({"a": 2, "b": 40})))
        .await
        .unwrap();
    assert_eq!(sum, tree!(42));
    let floats = Array::from_vec1((1..=1000).map(|x| x as f32).collect::<Vec<_>>());
    let total = within("sum", client.call("sum_f32", Tree::Array(floats)))
        .await
        .unwrap();
    assert_eq!(total, tree!(500500.0));
    assert!(client.server_agent().unwrap().contains("server"));
}

#[tokio::test]
async fn errors_are_clear_and_the_connection_carries_on() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;

    let err = within("fail", client.call("fail", tree!(null)))
        .await
        .unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.kind, ErrorKind::Handler);
    assert_eq!(remote.type_name, "ValueError");
    assert!(err.to_string().contains("always fails"), "{err}");

    let err = within("unknown", client.call("nope", tree!(null)))
        .await
        .unwrap_err();
    let remote = err.remote().unwrap();
    assert_eq!(remote.kind, ErrorKind::UnknownMethod);
    assert!(
        remote.message.contains("\"nope\"") && remote.message.contains("echo"),
        "{err}"
    );

    let err = within("panic", client.call("panic", tree!(null)))
        .await
        .unwrap_err();
    assert_eq!(err.remote().unwrap().kind, ErrorKind::Panic);

    let err = within("bad args", client.call("add", tree!({"a": 1})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"b\""), "{err}");

    // After all that, the same connection still works.
    let ok = within("add", client.call("add", tree!({"a": 1, "b": 1})))
        .await
        .unwrap();
    assert_eq!(ok, tree!(2));
}

#[tokio::test]
async fn many_concurrent_calls_beyond_max_in_flight_all_complete() {
    let fixture = Fixture::start().await;
    let client = within(
        "connect",
        fixture.client_builder().max_in_flight(4).connect(),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..100i64)
        .map(|i| client.call("add", tree!({"a": (i), "b": 1})))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let result = within("concurrent call", call).await.unwrap();
        assert_eq!(result, tree!(((i as i64) + 1)));
    }
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn several_clients_share_a_server() {
    let fixture = Fixture::start().await;
    let mut tasks = Vec::new();
    for c in 0..4i64 {
        let client = fixture.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..20i64 {
                let r = client
                    .call("add", tree!({"a": (c), "b": (i)}))
                    .await
                    .unwrap();
                assert_eq!(r, tree!((c + i)));
            }
        }));
    }
    for task in tasks {
        within("client task", task).await.unwrap();
    }
}

#[tokio::test]
async fn a_large_reply_does_not_hold_up_small_calls() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let big = client.call("zeros", tree!({"bytes": (128 << 20)}));
    let big = tokio::spawn(big);
    // Small calls made while the large reply is in transit complete before it.
    let mut small_done = 0;
    for i in 0..5i64 {
        let r = within("small call", client.call("add", tree!({"a": (i), "b": 0}))).await;
        assert_eq!(r.unwrap(), tree!((i)));
        small_done += 1;
    }
    let big_finished_first = big.is_finished();
    let big = within("big call", big).await.unwrap().unwrap();
    assert_eq!(
        big.get("data").unwrap().as_array().unwrap().nbytes(),
        128 << 20
    );
    assert_eq!(small_done, 5);
    assert!(
        !big_finished_first,
        "the small calls waited for the 128 MiB reply"
    );
}

#[tokio::test]
async fn a_large_array_arrives_byte_for_byte() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let n = 48 << 20;
    let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    let array = Array::new(DType::U8, [n / 1024, 1024], data.clone()).unwrap();
    let result = within("large echo", client.call("echo", tree!({"x": (array)})))
        .await
        .unwrap();
    let back = result.get("x").unwrap().as_array().unwrap();
    assert_eq!(back.shape(), [n / 1024, 1024]);
    assert!(back.data()[..] == data[..], "the array came back changed");
    assert!(back.is_aligned_to(64));
}

#[tokio::test]
async fn a_deadline_fails_the_call_and_the_server_drops_it() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let err = within(
        "call with deadline",
        client.call_with_timeout("sleep", tree!(10.0), Duration::from_millis(200)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::DeadlineExceeded { .. })),
        "{err}"
    );
    // The server gets the deadline too and stops the function.
    wait_until("server drops the call", || {
        fixture.counters.sleeps_dropped.load(Ordering::SeqCst) > 0
    })
    .await;
    let ok = within("next call", client.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));
}

#[tokio::test]
async fn cancelling_a_call_stops_it_on_the_server() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let pending = client.call("sleep", tree!(30.0));
    wait_until("the function starts", || {
        fixture.counters.sleeps_started.load(Ordering::SeqCst) > 0
    })
    .await;
    pending.cancel();
    let err = within("cancelled call", pending).await.unwrap_err();
    assert!(matches!(err, Error::Call(CallError::Cancelled)), "{err}");
    wait_until("the function is stopped", || {
        fixture.counters.sleeps_dropped.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(client.in_flight(), 0);
    let ok = within("next call", client.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));
}

#[tokio::test]
async fn the_error_of_a_dropped_call_is_raised_by_the_next_call() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    // A dropped call still runs: a fire-and-forget call is not lost.
    drop(client.call("sleep", tree!(0.0)));
    drop(client.call("fail", tree!(null)));
    wait_until("the dropped calls finish", || client.in_flight() == 0).await;
    assert_eq!(fixture.counters.sleeps_started.load(Ordering::SeqCst), 1);
    let err = within("next call", client.call("add", tree!({"a": 1, "b": 2})))
        .await
        .unwrap_err();
    match &err {
        Error::Unobserved { method, error } => {
            assert_eq!(method, "fail");
            assert_eq!(error.remote().unwrap().type_name, "ValueError");
        }
        other => panic!("expected the unobserved error, got {other}"),
    }
    // Reported once; the call after works.
    let ok = within("call after", client.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));

    // It can be turned off.
    let quiet = within(
        "connect",
        fixture
            .client_builder()
            .raise_unobserved_errors(false)
            .connect(),
    )
    .await
    .unwrap();
    drop(quiet.call("fail", tree!(null)));
    wait_until("the dropped call finishes", || quiet.in_flight() == 0).await;
    let ok = within("next call", quiet.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));
}

#[tokio::test]
async fn the_server_never_sees_more_than_the_clients_in_flight_limit() {
    let fixture = Fixture::start().await;
    let client = within(
        "connect",
        fixture.client_builder().max_in_flight(3).connect(),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..12).map(|_| client.call("hold", tree!(0.05))).collect();
    for call in calls {
        within("held call", call).await.unwrap();
    }
    let max = fixture.counters.max_holding.load(Ordering::SeqCst);
    assert!(
        max <= 3,
        "the server ran {max} calls at once, over the client's limit of 3"
    );
    assert!(max >= 2, "calls did not overlap at all ({max})");
}

#[tokio::test]
async fn blocking_functions_run_on_a_bounded_worker_pool() {
    let fixture = Fixture::start_with(|b| b.workers(2)).await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..8)
        .map(|_| client.call("hold_blocking", tree!(0.05)))
        .collect();
    for call in calls {
        within("blocking call", call).await.unwrap();
    }
    let max = fixture.counters.max_holding.load(Ordering::SeqCst);
    assert_eq!(max, 2, "expected exactly the pool's 2 workers busy at once");
}

#[tokio::test]
async fn a_server_over_its_total_limit_answers_overloaded() {
    let fixture = Fixture::start_with(|b| b.max_in_flight_total(2)).await;
    let (a, b) = (fixture.client().await, fixture.client().await);
    let calls: Vec<_> = (0..3)
        .flat_map(|_| [a.call("hold", tree!(0.3)), b.call("hold", tree!(0.3))])
        .collect();
    let mut overloaded = 0;
    for call in calls {
        match within("call", call).await {
            Ok(_) => {}
            Err(e) if e.remote().is_some_and(|r| r.kind == ErrorKind::Overloaded) => {
                overloaded += 1
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(overloaded >= 1, "no call was refused");
    assert!(fixture.counters.max_holding.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn results_can_be_awaited_in_any_order() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let slow = client.call("sleep", tree!(0.2));
    let fast = client.call("add", tree!({"a": 1, "b": 1}));
    // The fast result is there before the slow one, whichever is awaited first.
    assert_eq!(within("fast", fast).await.unwrap(), tree!(2));
    assert_eq!(within("slow", slow).await.unwrap(), tree!("slept"));
    let calls: Vec<_> = (0..10i64)
        .map(|i| client.call("add", tree!({"a": (i), "b": 0})))
        .collect();
    for (i, call) in calls.into_iter().enumerate().rev() {
        assert_eq!(within("reversed", call).await.unwrap(), tree!((i as i64)));
    }
}

#[tokio::test]
async fn trees_of_every_shape_come_back_equal() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let shapes = [
        tree!({}),
        tree!([]),
        tree!(null),
        tree!(true),
        tree!(-7),
        tree!(1.5),
        tree!(""),
        tree!((bytes::Bytes::new())),
        tree!((Array::zeros(DType::F64, [0usize]).unwrap())),
        tree!((Array::scalar(3u8))),
        tree!({"a": {"b": {"c": [[], {}, [1, [2, [3]]]]}}}),
        all_dtypes(),
    ];
    for shape in shapes {
        let back = within("echo", client.call("echo", shape.clone()))
            .await
            .unwrap();
        assert_eq!(back, shape);
    }
}

#[tokio::test]
async fn check_reports_the_first_function_failure() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    assert!(fixture.server.check().is_ok());
    within("ok call", client.call("echo", tree!(1)))
        .await
        .unwrap();
    assert!(fixture.server.check().is_ok());
    let _ = within("failing call", client.call("fail", tree!(null))).await;
    let _ = within("panicking call", client.call("panic", tree!(null))).await;
    let failure = fixture.server.check().unwrap_err();
    assert_eq!(failure.method, "fail");
    assert_eq!(failure.error.type_name, "ValueError");
    assert!(failure.to_string().contains("always fails"), "{failure}");
}

#[tokio::test]
async fn a_server_restarted_on_the_same_port_serves_new_clients() {
    let identity = teleport_quic::Identity::self_signed(["localhost"]).unwrap();
    let first = {
        let identity = identity.clone();
        Fixture::start_with(move |b| b.identity(identity)).await
    };
    let addr = first.server.local_addr();
    // Without reconnecting, so that a call to the stopped server fails at once.
    let client = within(
        "connecting",
        first.client_builder().reconnect(false).connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );
    within("shutdown", first.server.shutdown(Duration::from_secs(1))).await;
    let err = within("call to the stopped server", client.call("echo", tree!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Call(ref e) if e.is_connection_error()),
        "{err}"
    );

    let counters = std::sync::Arc::new(common::Counters::default());
    let second = common::test_functions(teleport_server::Server::builder(), counters)
        .identity(identity)
        .listen(addr)
        .await
        .expect("the port is free again");
    // The same identity: the pin clients hold stays valid.
    let client = within(
        "reconnect",
        teleport_client::Client::builder(addr)
            .pin(second.fingerprint())
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(2))).await.unwrap(),
        tree!(2)
    );
}

#[tokio::test]
async fn ipv6_loopback_works_and_port_zero_gives_a_real_port() {
    let server = common::test_functions(
        teleport_server::Server::builder(),
        std::sync::Arc::default(),
    )
    .listen("[::1]:0")
    .await
    .unwrap();
    let port = server.local_addr().port();
    assert_ne!(port, 0, "port 0 must give a real port");
    let client = within(
        "connect over IPv6",
        teleport_client::Client::builder(format!("[::1]:{port}"))
            .pin(server.fingerprint())
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(6))).await.unwrap(),
        tree!(6)
    );
}

#[tokio::test]
async fn clients_connect_by_host_name() {
    let fixture = Fixture::start().await;
    let port = fixture.server.local_addr().port();
    // `localhost` may resolve to ::1 as well as 127.0.0.1: the client tries
    // every address at once and keeps the one that answers.
    let client = within(
        "connect by name",
        teleport_client::Client::builder(format!("localhost:{port}"))
            .pin(fixture.server.fingerprint())
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(6))).await.unwrap(),
        tree!(6)
    );
    // No port: refused before any lookup (a DNS query would make the test
    // depend on the network).
    let err = within(
        "no port",
        teleport_client::Client::builder("localhost")
            .pin(fixture.server.fingerprint())
            .connect(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect {
                error: teleport_client::ConnectError::Failed(
                    teleport_protocol::client::ConnectFailure::Resolve(_)
                ),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("host:port"), "{err}");
}

#[tokio::test]
async fn a_call_over_the_servers_limits_is_refused_alone() {
    let fixture = Fixture::start_with(|b| {
        let mut limits = Limits::default();
        limits.max_data_len = 1 << 20;
        b.limits(limits)
    })
    .await;
    let client = fixture.client().await;
    let big = Array::zeros(DType::U8, [4 << 20]).unwrap();
    let err = within("over-limit call", client.call("echo", Tree::Array(big)))
        .await
        .unwrap_err();
    let remote = err
        .remote()
        .unwrap_or_else(|| panic!("expected a remote error: {err}"));
    assert_eq!(remote.kind, ErrorKind::OverLimit, "{err}");
    let ok = within("next call", client.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));
}

#[tokio::test]
async fn a_reply_over_the_clients_limits_fails_that_call_only() {
    let fixture = Fixture::start().await;
    let mut limits = Limits::default();
    limits.max_data_len = 1 << 20;
    let client = within("connect", fixture.client_builder().limits(limits).connect())
        .await
        .unwrap();
    let err = within(
        "over-limit reply",
        client.call("zeros", tree!({"bytes": (4 << 20)})),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::ReplyOverLimit { .. })),
        "{err}"
    );
    let ok = within("next call", client.call("add", tree!({"a": 1, "b": 2}))).await;
    assert_eq!(ok.unwrap(), tree!(3));
}

#[tokio::test]
async fn the_server_refuses_calls_beyond_its_in_flight_limit() {
    let fixture = Fixture::start_with(|b| b.max_in_flight(2)).await;
    let client = within(
        "connect",
        fixture.client_builder().max_in_flight(8).connect(),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..6).map(|_| client.call("sleep", tree!(0.5))).collect();
    let mut ok = 0;
    let mut over = 0;
    for call in calls {
        match within("call", call).await {
            Ok(_) => ok += 1,
            Err(e) if e.remote().is_some_and(|r| r.kind == ErrorKind::OverLimit) => over += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(
        ok >= 2 && over >= 1 && ok + over == 6,
        "ok {ok}, over limit {over}"
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_calls_and_releases_the_port() {
    let fixture = Fixture::start().await;
    let addr = fixture.server.local_addr();
    // Without reconnecting, so that a call after the shutdown fails at once.
    let client = within(
        "connecting",
        fixture.client_builder().reconnect(false).connect(),
    )
    .await
    .unwrap();
    let running = client.call("sleep", tree!(0.3));
    wait_until("the function starts", || {
        fixture.counters.sleeps_started.load(Ordering::SeqCst) > 0
    })
    .await;
    let server = fixture.server;
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(5)).await });
    assert_eq!(
        within("running call", running).await.unwrap(),
        tree!("slept")
    );
    within("shutdown", shutdown).await.unwrap();
    // New calls fail with a clear error; the port can be bound again.
    let err = within(
        "call after shutdown",
        client.call("add", tree!({"a": 1, "b": 1})),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Call(ref e) if e.is_connection_error()),
        "{err}"
    );
    let again = teleport_server::Server::builder().listen(addr).await;
    assert!(again.is_ok(), "the port is still taken: {:?}", again.err());
}

#[tokio::test]
async fn closing_the_client_fails_its_pending_calls() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    let pending = client.call("sleep", tree!(30.0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.close();
    let err = within("pending call", pending).await.unwrap_err();
    assert!(matches!(err, Error::Call(CallError::Closed)), "{err}");
    let err = within("call after close", client.call("echo", tree!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Call(CallError::Closed)), "{err}");
}

#[test]
fn the_blocking_client_calls_from_plain_threads() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = runtime.block_on(Fixture::start());
    let client = teleport_client::BlockingClient::connect(fixture.client_builder()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4i64 {
            let client = &client;
            s.spawn(move || {
                let r = client.call("add", tree!({"a": (t), "b": 10})).unwrap();
                assert_eq!(r, tree!((t + 10)));
            });
        }
    });
    drop(client);
    runtime.block_on(fixture.server.shutdown(Duration::from_secs(1)));
}

#[tokio::test]
async fn stats_count_calls_by_outcome_connections_and_bytes() {
    let fixture = Fixture::start().await;
    let client = fixture.client().await;
    for i in 0..3 {
        within("echo", client.call("echo", tree!(i))).await.unwrap();
    }
    within("fail", client.call("fail", tree!(null)))
        .await
        .unwrap_err();
    within("unknown", client.call("no_such_function", tree!(null)))
        .await
        .unwrap_err();
    let cancelled = client.call("sleep", tree!(10.0));
    common::wait_until("the sleep runs", || fixture.server.running() == 1).await;
    cancelled.cancel();
    common::wait_until("the sleep is stopped", || {
        fixture.server.stats().calls_stopped == 1
    })
    .await;

    let server = fixture.server.stats();
    assert_eq!(server.calls_received, 6, "{server}");
    assert_eq!(server.calls_succeeded, 3, "{server}");
    assert_eq!(server.failed(teleport_protocol::ErrorKind::Handler), 1);
    assert_eq!(
        server.failed(teleport_protocol::ErrorKind::UnknownMethod),
        1
    );
    assert_eq!(server.failed_total(), 2);
    assert_eq!(server.calls_stopped, 1);
    assert_eq!(server.in_flight, 0);
    assert_eq!(
        (server.connections_open, server.connections_accepted),
        (1, 1)
    );
    assert!(
        server.bytes_received > 0 && server.bytes_sent > 0,
        "{server}"
    );

    let stats = client.stats();
    assert_eq!(stats.calls_started, 6, "{stats}");
    assert_eq!(stats.calls_succeeded, 3, "{stats}");
    assert_eq!(stats.calls_failed, 3, "{stats}");
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    assert!(stats.connected && stats.connections == 1, "{stats}");
    assert!(stats.bytes_sent > 0 && stats.bytes_received > 0, "{stats}");
    // The bytes of a connection that ended stay counted.
    client.close();
    within("closed", client.closed()).await;
    common::wait_until("the server sees the close", || {
        fixture.server.connections() == 0
    })
    .await;
    let after = fixture.server.stats();
    assert!(after.bytes_received >= server.bytes_received, "{after}");
    assert!(client.stats().bytes_sent >= stats.bytes_sent);
}
