//! Batched functions end to end on loopback: concurrent calls from one or many
//! clients run as one call of the function, each caller gets its own row back,
//! and one bad call, a bad result or a cancelled call never breaks the others.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_until, within, Fixture};
use futures_util::future::join_all;
use teleport_client::{CallError, Error, ErrorKind};
use teleport_protocol::{tree, Array, DType, Map, Tree};
use teleport_server::{BatchPolicy, Function, HandlerError, Server, ServerError};

/// Long enough that a batch is released only when full: a test that needs all
/// its calls in one batch fills it exactly. Still well under `common::WAIT`.
const FILL_ONLY: Duration = Duration::from_secs(10);

fn policy(max_batch: usize, max_wait: Duration) -> BatchPolicy {
    BatchPolicy {
        max_batch,
        max_wait,
    }
}

/// The batch sizes a batched function saw, in order.
#[derive(Debug, Default)]
struct Seen(Mutex<Vec<usize>>);

impl Seen {
    fn record(&self, size: usize) {
        self.0.lock().unwrap().push(size);
    }

    fn sizes(&self) -> Vec<usize> {
        self.0.lock().unwrap().clone()
    }
}

/// `{"x": float32 [k]}` per call, so `[N, k]` per batch; answers `{"y": 2x}`.
fn doubler(seen: Arc<Seen>) -> impl Fn(Tree) -> Result<Tree, HandlerError> + Send + Sync {
    move |batch: Tree| {
        let x = batch.get("x")?.as_array()?;
        seen.record(x.shape()[0]);
        let doubled: Vec<f32> = x.as_slice::<f32>()?.iter().map(|v| v * 2.0).collect();
        Ok(tree!({"y": (Array::from_vec(x.shape().to_vec(), doubled)?)}))
    }
}

fn call_args(values: &[f32]) -> Tree {
    tree!({"x": (Array::from_vec1(values.to_vec()))})
}

fn row(seed: usize) -> Vec<f32> {
    (0..4).map(|i| (seed * 10 + i) as f32).collect()
}

fn assert_doubled(result: &Tree, values: &[f32]) {
    let y = result.get("y").unwrap().as_array().unwrap();
    assert_eq!(y.shape(), &[values.len()], "each caller gets its own row");
    let expected: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
    assert_eq!(y.as_slice::<f32>().unwrap(), &expected[..]);
}

#[tokio::test]
async fn concurrent_calls_from_one_client_are_batched_and_each_gets_its_row() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(8, Duration::from_millis(20))),
        )
    })
    .await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..32)
        .map(|i| client.call("double", call_args(&row(i))))
        .collect();
    let results = within("32 batched calls", join_all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_doubled(&result.unwrap(), &row(i));
    }
    let sizes = seen.sizes();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        32,
        "every call ran once: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|&n| n <= 8),
        "no batch over max_batch: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > 1),
        "calls in flight together were batched: {sizes:?}"
    );
}

#[tokio::test]
async fn calls_from_many_clients_share_batches() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(4, FILL_ONLY)),
        )
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(fixture.client().await);
    }
    // One call per client fills the batch of 4: it can only run with a call
    // of every client in it.
    let calls: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| client.call("double", call_args(&row(i))))
        .collect();
    let results = within("one call per client", join_all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_doubled(&result.unwrap(), &row(i));
    }
    assert_eq!(seen.sizes(), vec![4]);

    // And many calls from each, all at once.
    let calls: Vec<_> = clients
        .iter()
        .enumerate()
        .flat_map(|(c, client)| {
            (0..8).map(move |i| client.call("double", call_args(&row(c * 8 + i))))
        })
        .collect();
    let results = within("8 calls per client", join_all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_doubled(&result.unwrap(), &row(i));
    }
    assert_eq!(seen.sizes().iter().sum::<usize>(), 4 + 32);
}

#[tokio::test]
async fn a_lone_call_is_flushed_after_max_wait() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(64, Duration::from_millis(50))),
        )
    })
    .await;
    let client = fixture.client().await;
    let result = within(
        "a lone batched call",
        client.call("double", call_args(&row(3))),
    )
    .await
    .unwrap();
    assert_doubled(&result, &row(3));
    assert_eq!(seen.sizes(), vec![1]);
}

/// Array-only trees of every structure and dtype, each member's data distinct.
fn stackable_shapes(member: usize) -> Vec<Tree> {
    let mut all_dtypes = Map::new();
    for (i, dtype) in DType::ALL.iter().enumerate() {
        let data: Vec<u8> = (0..6 * dtype.size())
            .map(|b| ((b * 7 + i + member) % 2) as u8)
            .collect();
        all_dtypes.insert(dtype.name(), Array::new(*dtype, [2usize, 3], data).unwrap());
    }
    all_dtypes.insert("empty", Array::zeros(DType::F32, [0usize, 4]).unwrap());
    all_dtypes.insert("rank0", Array::scalar(2.5f64 + member as f64));
    all_dtypes.insert("none", Tree::None);
    let v = |n: i32| Array::from_vec1(vec![n + member as i32, -n]);
    vec![
        tree!({}),
        tree!([]),
        tree!(null),
        tree!((Array::scalar(member as u8))),
        tree!({"a": {"b": {"c": [[], {}, [(v(1)), [(v(2)), [(v(3))]]]]}}}),
        Tree::Map(all_dtypes),
    ]
}

#[tokio::test]
async fn trees_of_every_shape_come_back_as_the_unbatched_function_gives_them() {
    let seen = Arc::new(Seen::default());
    let recorder = seen.clone();
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "echo_batched",
            Function::blocking(move |batch| {
                recorder.record(3);
                Ok(batch)
            })
            .batch(policy(3, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let shapes = stackable_shapes(0).len();
    for shape in 0..shapes {
        let args: Vec<Tree> = (0..3).map(|m| stackable_shapes(m)[shape].clone()).collect();
        let calls: Vec<_> = args
            .iter()
            .map(|a| client.call("echo_batched", a.clone()))
            .collect();
        let results = within("a batch of one shape", join_all(calls)).await;
        for (args, result) in args.iter().zip(results) {
            let unbatched = within("unbatched echo", client.call("echo", args.clone()))
                .await
                .unwrap();
            assert_eq!(result.unwrap(), unbatched, "shape {shape}");
        }
    }
    assert_eq!(seen.sizes().len(), shapes, "one batch per shape");

    // Scalars stack into 1-d arrays, so each caller gets a rank-0 array back.
    let calls: Vec<_> = [tree!(7), tree!(8), tree!(9)]
        .into_iter()
        .map(|a| client.call("echo_batched", a))
        .collect();
    let results = within("a batch of ints", join_all(calls)).await;
    for (n, result) in [7i64, 8, 9].into_iter().zip(results) {
        assert_eq!(result.unwrap(), tree!((Array::scalar(n))));
    }
}

#[tokio::test]
async fn a_call_that_does_not_stack_gets_its_own_error_and_the_others_are_served() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(4, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let odd = call_args(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let calls = vec![
        client.call("double", call_args(&row(0))),
        client.call("double", odd),
        client.call("double", call_args(&row(2))),
        client.call("double", tree!({"x": "text"})),
    ];
    let mut results = within("a batch with two bad calls", join_all(calls))
        .await
        .into_iter();
    assert_doubled(&results.next().unwrap().unwrap(), &row(0));
    let shape = results.next().unwrap().unwrap_err();
    assert_doubled(&results.next().unwrap().unwrap(), &row(2));
    let text = results.next().unwrap().unwrap_err();
    for (err, says) in [(shape, "shape [5], expected [4]"), (text, "str")] {
        let remote = err.remote().expect("a remote error");
        assert_eq!(remote.kind, ErrorKind::BadRequest, "{err}");
        assert!(
            remote.message.contains("at `x`") && remote.message.contains(says),
            "the error names the path and the mismatch: {err}"
        );
    }
    assert_eq!(seen.sizes(), vec![2]);
    assert!(
        fixture.server.check().is_ok(),
        "a bad call is not a function failure"
    );
}

#[tokio::test]
async fn a_result_without_the_batch_dimension_fails_every_call_clearly() {
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "sum_all",
            Function::blocking(|batch: Tree| {
                let total: f32 = batch.get("x")?.as_slice::<f32>()?.iter().sum();
                Ok(tree!({"total": (Array::from_vec1(vec![total]))}))
            })
            .batch(policy(3, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..3)
        .map(|i| client.call("sum_all", call_args(&row(i))))
        .collect();
    for err in within("a batch of 3", join_all(calls)).await {
        let err = err.unwrap_err();
        let remote = err.remote().expect("a remote error");
        assert_eq!(remote.kind, ErrorKind::Handler, "{err}");
        assert_eq!(remote.type_name, "BatchResultError");
        assert!(
            remote
                .message
                .contains("leading dimension equals the batch size 3")
                && remote.message.contains("total"),
            "{err}"
        );
    }
    let failure = fixture.server.check().unwrap_err();
    assert_eq!(failure.method, "sum_all");
}

#[tokio::test]
async fn an_error_or_panic_of_the_function_fails_every_call_of_its_batch_only() {
    fn picky(batch: Tree) -> Result<Tree, HandlerError> {
        let x = batch.get("x")?.as_slice::<f32>()?;
        if x.contains(&-1.0) {
            return Err(HandlerError::with_type("ValueError", "no -1 please"));
        }
        if x.contains(&-2.0) {
            panic!("deliberate panic in a batched function");
        }
        Ok(batch)
    }
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "picky",
            Function::blocking(picky).batch(policy(2, FILL_ONLY)),
        )
        .bind(
            "picky_async",
            Function::new(|batch| async { picky(batch) }).batch(policy(2, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    for method in ["picky", "picky_async"] {
        for (bad, kind, says) in [
            (-1.0, ErrorKind::Handler, "no -1 please"),
            (-2.0, ErrorKind::Panic, "deliberate panic"),
        ] {
            let calls = vec![
                client.call(method, call_args(&[bad])),
                client.call(method, call_args(&[5.0])),
            ];
            for result in within("a failing batch", join_all(calls)).await {
                let err = result.unwrap_err();
                let remote = err.remote().expect("a remote error");
                assert_eq!(remote.kind, kind, "{method}: {err}");
                assert!(remote.message.contains(says), "{method}: {err}");
            }
        }
        let calls = vec![
            client.call(method, call_args(&[1.0])),
            client.call(method, call_args(&[2.0])),
        ];
        for (result, x) in within("the next batch", join_all(calls))
            .await
            .into_iter()
            .zip([1.0f32, 2.0])
        {
            assert_eq!(result.unwrap(), call_args(&[x]), "{method}");
        }
    }
}

#[tokio::test]
async fn cancelled_calls_and_closed_clients_do_not_break_the_batch() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(4, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let leaving = fixture.client().await;
    let first = client.call("double", call_args(&row(0)));
    let cancelled = client.call("double", call_args(&row(1)));
    let orphaned = leaving.call("double", call_args(&row(2)));
    wait_until("3 calls queued for their batch", || {
        fixture.server.running() >= 3
    })
    .await;
    cancelled.cancel();
    let err = within("the cancelled call", cancelled).await.unwrap_err();
    assert!(matches!(err, Error::Call(CallError::Cancelled)), "{err}");
    leaving.close();
    let err = within("the closed client's call", orphaned)
        .await
        .unwrap_err();
    assert!(err.remote().is_none(), "failed locally: {err}");
    wait_until("the server drops both", || fixture.server.running() <= 1).await;

    // The two withdrawn calls still hold places in the queue (they are left
    // out when the batch runs), so one more call fills it.
    let calls = vec![first, client.call("double", call_args(&row(3)))];
    let results = within("the rest of the batch", join_all(calls)).await;
    for (result, seed) in results.into_iter().zip([0, 3]) {
        assert_doubled(&result.unwrap(), &row(seed));
    }
    assert_eq!(seen.sizes(), vec![2], "withdrawn calls take no row");
}

#[tokio::test]
async fn a_call_that_expires_while_queued_takes_no_row() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(3, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let waiting = client.call("double", call_args(&row(0)));
    let expiring =
        client.call_with_timeout("double", call_args(&row(1)), Duration::from_millis(100));
    let err = within("the expiring call", expiring).await.unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::DeadlineExceeded { .. })),
        "{err}"
    );
    wait_until("the server drops the expired call", || {
        fixture.server.running() <= 1
    })
    .await;
    let calls = vec![waiting, client.call("double", call_args(&row(2)))];
    let results = within("the rest of the batch", join_all(calls)).await;
    for (result, seed) in results.into_iter().zip([0, 2]) {
        assert_doubled(&result.unwrap(), &row(seed));
    }
    assert_eq!(seen.sizes(), vec![2], "the expired call takes no row");
}

#[tokio::test]
async fn blocking_and_async_batched_functions_can_call_another_server() {
    let inner_batches = Arc::new(AtomicUsize::new(0));
    let counter = inner_batches.clone();
    let inner = Server::builder()
        .bind("double", move |args: Tree| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { doubler(Arc::default())(args) }
        })
        .listen("127.0.0.1:0")
        .await
        .unwrap();
    let to_inner = within(
        "connecting to the inner server",
        teleport_client::Client::builder(inner.local_addr())
            .pin(inner.fingerprint())
            .connect(),
    )
    .await
    .unwrap();
    // A blocking function runs on a worker thread: it reaches async code
    // through the runtime it was bound in. An async one just awaits.
    let runtime = tokio::runtime::Handle::current();
    let (blocking_client, async_client) = (to_inner.clone(), to_inner);
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "proxy",
            Function::blocking(move |batch: Tree| {
                Ok(runtime.block_on(blocking_client.call("double", batch))?)
            })
            .batch(policy(4, FILL_ONLY)),
        )
        .bind(
            "proxy_async",
            Function::new(move |batch: Tree| {
                let client = async_client.clone();
                async move { Ok(client.call("double", batch).await?) }
            })
            .batch(policy(4, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    for (method, batches_before) in [("proxy", 0), ("proxy_async", 1)] {
        let calls: Vec<_> = (0..4)
            .map(|i| client.call(method, call_args(&row(i))))
            .collect();
        for (i, result) in within("proxied batch", join_all(calls))
            .await
            .into_iter()
            .enumerate()
        {
            assert_doubled(&result.unwrap(), &row(i));
        }
        assert_eq!(
            inner_batches.load(Ordering::SeqCst),
            batches_before + 1,
            "{method}: one inner call per batch"
        );
    }
    within("inner shutdown", inner.shutdown(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn shutdown_runs_queued_calls_without_waiting_for_max_wait() {
    let seen = Arc::new(Seen::default());
    let function = doubler(seen.clone());
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "double",
            Function::blocking(function).batch(policy(64, FILL_ONLY)),
        )
    })
    .await;
    let client = fixture.client().await;
    let queued = client.call("double", call_args(&row(1)));
    wait_until("the call is queued", || fixture.server.running() >= 1).await;
    let started = std::time::Instant::now();
    let (result, ()) = within("shutdown with a queued call", async {
        tokio::join!(queued, fixture.server.shutdown(Duration::from_secs(5)))
    })
    .await;
    assert_doubled(&result.unwrap(), &row(1));
    assert!(
        started.elapsed() < FILL_ONLY,
        "the queued call ran at shutdown, not after max_wait"
    );
}

#[tokio::test]
async fn a_policy_of_zero_calls_per_batch_is_refused_at_listen() {
    let err = Server::builder()
        .bind(
            "never",
            Function::blocking(Ok).batch(policy(0, Duration::ZERO)),
        )
        .listen("127.0.0.1:0")
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::BatchPolicy { .. }), "{err}");
    assert!(err.to_string().contains("\"never\""), "{err}");
}

#[tokio::test]
async fn a_server_that_drops_out_mid_batch_is_replaced_on_the_same_port() {
    // A batch that cannot fill holds its calls until the server goes away.
    let identity = teleport_quic::Identity::self_signed(["localhost"]).unwrap();
    let first = {
        let (identity, function) = (identity.clone(), doubler(Arc::default()));
        Fixture::start_with(move |b| {
            b.identity(identity).bind(
                "double",
                Function::blocking(function).batch(policy(64, FILL_ONLY)),
            )
        })
        .await
    };
    let addr = first.server.local_addr();
    let client = within(
        "connect",
        first
            .client_builder()
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .connect(),
    )
    .await
    .unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|i| client.call("double", call_args(&row(i))))
        .collect();
    // Give the calls time to reach the batch, then take the server away with
    // a grace period too short for the batch to fill.
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(
        "shutdown",
        first.server.shutdown(Duration::from_millis(200)),
    )
    .await;
    for outcome in within("the calls of the lost batch", join_all(waiting)).await {
        // Served by the shutdown's flush, or failed with a connection error:
        // never left hanging, never a wrong row.
        match outcome {
            Ok(result) => assert_eq!(result.get("y").unwrap().as_array().unwrap().shape(), &[4]),
            Err(e) => assert!(e.is_connection_error(), "unexpected error: {e}"),
        }
    }

    // A new server on the same port, with the same identity: the client
    // reconnects and batches again.
    let seen = Arc::new(Seen::default());
    let second = Server::builder()
        .identity(identity)
        .bind(
            "double",
            Function::blocking(doubler(seen.clone())).batch(policy(4, Duration::from_millis(20))),
        )
        .listen(addr)
        .await
        .expect("the port is free again");
    let calls: Vec<_> = (0..8)
        .map(|i| client.call("double", call_args(&row(i))))
        .collect();
    let results = within("batched calls on the new server", join_all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_doubled(&result.unwrap(), &row(i));
    }
    assert!(seen.sizes().iter().any(|&n| n > 1), "{:?}", seen.sizes());
    second.shutdown(Duration::from_secs(1)).await;
}
