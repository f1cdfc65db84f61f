//! Functions bound with options: worker pools of their own, bounded admission,
//! ordered completion hooks, deferred answers and queues.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{wait_until, within, Fixture, WAIT};
use teleport_client::{CallError, Error, ErrorKind};
use teleport_protocol::{tree, Array, Tree};
use teleport_server::{stack_calls, Context, Function, HandlerError, Responder, Workers};

/// A door a blocking function waits at until the test opens it (bounded, so a
/// bug fails the test instead of hanging it).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let (open, timeout) = self.opened.wait_timeout_while(open, WAIT, |o| !*o).unwrap();
        assert!(*open && !timeout.timed_out(), "the gate was never opened");
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// What happened on the server, in order.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn push(&self, event: impl Into<String>) {
        self.0.lock().unwrap().push(event.into());
    }

    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn position(&self, event: &str) -> usize {
        let events = self.events();
        events
            .iter()
            .position(|e| e == event)
            .unwrap_or_else(|| panic!("{event:?} is not in {events:?}"))
    }
}

/// Awaits calls already sent (a call goes out when it is made), in order.
async fn all<F: Future>(calls: Vec<F>) -> Vec<F::Output> {
    let mut results = Vec::with_capacity(calls.len());
    for call in calls {
        results.push(call.await);
    }
    results
}

#[tokio::test]
async fn on_a_shared_pool_of_one_a_fast_call_waits_behind_a_slow_one() {
    let (gate, log) = (Arc::new(Gate::default()), Arc::new(Log::default()));
    let (slow_gate, slow_log, fast_log) = (gate.clone(), log.clone(), log.clone());
    let fixture = Fixture::start_with(move |b| {
        b.workers(1)
            .bind(
                "slow",
                Function::blocking(move |_| {
                    slow_log.push("slow start");
                    slow_gate.wait();
                    slow_log.push("slow end");
                    Ok(tree!(null))
                }),
            )
            .bind(
                "fast",
                Function::blocking(move |_| {
                    fast_log.push("fast start");
                    Ok(tree!(null))
                }),
            )
    })
    .await;
    let client = fixture.client().await;
    let slow = client.call("slow", tree!(null));
    wait_until("the slow call starts", || log.events().len() == 1).await;
    let fast = client.call("fast", tree!(null));
    // Both calls are admitted; the fast one can only be waiting for the worker.
    wait_until("both calls run", || fixture.server.running() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open();
    within("slow", slow).await.unwrap();
    within("fast", fast).await.unwrap();
    assert_eq!(log.events(), ["slow start", "slow end", "fast start"]);
}

#[tokio::test]
async fn a_function_with_its_own_pool_does_not_wait_behind_slow_calls_of_others() {
    let (gate, log) = (Arc::new(Gate::default()), Arc::new(Log::default()));
    let (slow_gate, slow_log, fast_log) = (gate.clone(), log.clone(), log.clone());
    let fixture = Fixture::start_with(move |b| {
        b.workers(1)
            .bind(
                "slow",
                Function::blocking(move |_| {
                    slow_log.push("slow start");
                    slow_gate.wait();
                    slow_log.push("slow end");
                    Ok(tree!(null))
                }),
            )
            .bind(
                "fast",
                Function::blocking(move |_| {
                    fast_log.push("fast start");
                    Ok(tree!("fast"))
                })
                .workers(Workers::Own(1)),
            )
    })
    .await;
    let client = fixture.client().await;
    let slow = client.call("slow", tree!(null));
    wait_until("the slow call starts", || log.events().len() == 1).await;
    // The shared pool's one worker is taken; the fast call needs none of it.
    let fast = within(
        "fast, while slow holds the shared pool",
        client.call("fast", tree!(null)),
    )
    .await
    .unwrap();
    assert_eq!(fast, tree!("fast"));
    assert_eq!(log.events(), ["slow start", "fast start"]);
    gate.open();
    within("slow", slow).await.unwrap();
}

#[tokio::test]
async fn max_concurrent_bounds_the_calls_running_at_once() {
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, m) = (running.clone(), most.clone());
    let fixture = Fixture::start_with(move |b| {
        b.bind(
            "limited",
            Function::blocking(move |args: Tree| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Wait (bounded) for a second call to overlap, so that a slow
                // machine cannot keep the most from reaching the bound.
                let started = std::time::Instant::now();
                while m.load(Ordering::SeqCst) < 2 && started.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(20));
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(args)
            })
            .workers(Workers::Own(4))
            .max_concurrent(2),
        )
    })
    .await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..8).map(|i| client.call("limited", tree!(i))).collect();
    let results = within("8 calls", all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((i as i64)));
    }
    // Four workers and eight calls at once: only the admission bound holds
    // them to two.
    assert_eq!(most.load(Ordering::SeqCst), 2);
}

/// Binds "step": sleeps `args.sleep` seconds, returns `args.id` and hands it
/// to the hook, which waits at `hook_gate` before logging it. Every step is
/// logged.
fn bind_step(
    builder: teleport_server::ServerBuilder,
    options: impl FnOnce(Function<i64>) -> Function<i64>,
    log: Arc<Log>,
    hook_gate: Arc<Gate>,
) -> teleport_server::ServerBuilder {
    let hook_log = log.clone();
    let step = Function::blocking(move |args: Tree| {
        let id = args.get("id")?.as_int()?;
        log.push(format!("start {id}"));
        std::thread::sleep(Duration::from_secs_f64(args.get("sleep")?.as_float()?));
        log.push(format!("end {id}"));
        Ok((tree!(id), id))
    })
    .hook(move |id: i64| {
        hook_gate.wait();
        hook_log.push(format!("hook {id}"));
    });
    builder.bind("step", options(step))
}

fn hooks(log: &Log) -> Vec<String> {
    log.events()
        .into_iter()
        .filter(|e| e.starts_with("hook"))
        .collect()
}

#[tokio::test]
async fn the_hook_sees_by_products_in_request_order_when_later_calls_finish_first() {
    let log = Arc::new(Log::default());
    let hook_gate = Arc::new(Gate::default());
    hook_gate.open();
    let (l, g) = (log.clone(), hook_gate.clone());
    let fixture =
        Fixture::start_with(move |b| bind_step(b, |f| f.workers(Workers::Own(3)), l, g)).await;
    let client = fixture.client().await;
    let mut calls = Vec::new();
    for (id, sleep) in [(0, 1.0), (1, 0.0), (2, 0.3)] {
        calls.push(client.call("step", tree!({"id": id, "sleep": sleep})));
        // Each call arrives after the one before has started.
        let started = format!("start {id}");
        wait_until(&started, || log.events().contains(&started)).await;
    }
    let results = within("3 steps", all(calls)).await;
    for (id, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((id as i64)));
    }
    wait_until("three hooks", || hooks(&log).len() == 3).await;
    assert_eq!(hooks(&log), ["hook 0", "hook 1", "hook 2"]);
    // The later calls did finish first.
    assert!(log.position("end 1") < log.position("end 0"));
    assert!(log.position("end 2") < log.position("end 0"));
    // Each hook ran after its own call ended, and 1's waited for 0's.
    assert!(log.position("end 0") < log.position("hook 0"));
}

#[tokio::test]
async fn results_are_not_delayed_by_a_slow_hook() {
    let log = Arc::new(Log::default());
    let hook_gate = Arc::new(Gate::default());
    let (l, g) = (log.clone(), hook_gate.clone());
    let fixture = Fixture::start_with(move |b| bind_step(b, |f| f, l, g)).await;
    let client = fixture.client().await;
    // The hook is stuck at its gate, yet both results arrive.
    for id in 0..2 {
        let result = within(
            "a result while the hook waits",
            client.call("step", tree!({"id": id, "sleep": 0.0})),
        )
        .await
        .unwrap();
        assert_eq!(result, tree!(id));
    }
    assert!(hooks(&log).is_empty(), "{:?}", log.events());
    hook_gate.open();
    wait_until("two hooks", || hooks(&log).len() == 2).await;
    assert_eq!(hooks(&log), ["hook 0", "hook 1"]);
}

#[tokio::test]
async fn with_max_concurrent_one_the_next_call_waits_for_the_previous_hook() {
    let log = Arc::new(Log::default());
    let hook_gate = Arc::new(Gate::default());
    let (l, g) = (log.clone(), hook_gate.clone());
    let fixture = Fixture::start_with(move |b| bind_step(b, |f| f.max_concurrent(1), l, g)).await;
    let client = fixture.client().await;
    let first = within(
        "the first result, before its hook",
        client.call("step", tree!({"id": 0, "sleep": 0.0})),
    )
    .await
    .unwrap();
    assert_eq!(first, tree!(0));
    let second = client.call("step", tree!({"id": 1, "sleep": 0.0}));
    // Admitted by the connection, waiting for the function's one slot, which
    // the first call holds until its hook has run.
    // (or, were the slot released too early, already running).
    wait_until("the second call is admitted", || {
        fixture.server.running() == 1 || log.events().contains(&"start 1".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !log.events().contains(&"start 1".to_owned()),
        "{:?}",
        log.events()
    );
    hook_gate.open();
    assert_eq!(within("the second call", second).await.unwrap(), tree!(1));
    assert!(log.position("hook 0") < log.position("start 1"));
    wait_until("the second hook", || hooks(&log).len() == 2).await;
}

#[tokio::test]
async fn a_deferred_function_answers_later_from_another_thread_or_task() {
    let fixture = Fixture::start_with(|b| {
        b.bind(
            "thread",
            Function::deferred(|args: Tree, responder: Responder| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    responder.respond(Ok(tree!({"from": "thread", "args": args})));
                });
            }),
        )
        .bind(
            "task",
            Function::deferred(|args: Tree, responder: Responder| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    responder.respond(Ok(tree!({"from": "task", "args": args})));
                });
            }),
        )
        .bind(
            "refuse",
            Function::deferred(|_, responder: Responder| {
                std::thread::spawn(move || {
                    responder.respond(Err(HandlerError::with_type("ValueError", "not today")))
                });
            }),
        )
    })
    .await;
    let client = fixture.client().await;
    // Both calls go out before either is awaited.
    let (thread, task) = (
        client.call("thread", tree!(1)),
        client.call("task", tree!(2)),
    );
    let (thread, task) = (within("thread", thread).await, within("task", task).await);
    assert_eq!(thread.unwrap(), tree!({"from": "thread", "args": 1}));
    assert_eq!(task.unwrap(), tree!({"from": "task", "args": 2}));
    let err = within("refuse", client.call("refuse", tree!(null)))
        .await
        .unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.kind, ErrorKind::Handler);
    assert_eq!(remote.type_name, "ValueError");
    assert_eq!(remote.message, "not today");
}

#[tokio::test]
async fn a_dropped_responder_fails_the_call_clearly() {
    let fixture = Fixture::start_with(|b| {
        b.bind("forget", Function::deferred(|_, responder| drop(responder)))
    })
    .await;
    let client = fixture.client().await;
    let err = within("forget", client.call("forget", tree!(null)))
        .await
        .unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.kind, ErrorKind::Handler);
    assert_eq!(
        remote.message,
        "the function dropped its responder without answering"
    );
    let failure = fixture.server.check().unwrap_err();
    assert_eq!(failure.method, "forget");
    // The connection carries on.
    assert_eq!(
        within("echo", client.call("echo", tree!(3))).await.unwrap(),
        tree!(3)
    );
}

#[tokio::test]
async fn answering_an_expired_deferred_call_is_harmless() {
    let kept: Arc<Mutex<Vec<Responder>>> = Arc::default();
    let k = kept.clone();
    let fixture = Fixture::start_with(move |b| {
        b.bind(
            "keep",
            Function::deferred(move |_, responder| k.lock().unwrap().push(responder)),
        )
    })
    .await;
    let client = fixture.client().await;
    let err = within(
        "a call nobody answers in time",
        client.call_with_timeout("keep", tree!(null), Duration::from_millis(200)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::DeadlineExceeded { .. })),
        "{err}"
    );
    // The server dropped the expired call, so its responder knows.
    wait_until("the responder sees the expiry", || {
        kept.lock()
            .unwrap()
            .first()
            .is_some_and(Responder::is_cancelled)
    })
    .await;
    let responder = kept.lock().unwrap().pop().unwrap();
    responder.respond(Ok(tree!("too late")));
    wait_until("the call no longer runs", || fixture.server.running() == 0).await;
    assert_eq!(
        within("echo", client.call("echo", tree!(4))).await.unwrap(),
        tree!(4)
    );
    assert!(fixture.server.check().is_ok());
}

#[tokio::test]
async fn a_queue_is_consumed_by_an_app_task_and_a_thread() {
    let queue = Arc::new(Mutex::new(None));
    let q = queue.clone();
    let fixture = Fixture::start_with(move |b| {
        let (b, call_queue) = b.bind_queue("queued", 16);
        *q.lock().unwrap() = Some(call_queue);
        b
    })
    .await;
    let queue = queue.lock().unwrap().take().unwrap();
    let task_queue = queue.clone();
    let served_by_task = Arc::new(AtomicUsize::new(0));
    let s = served_by_task.clone();
    let task = tokio::spawn(async move {
        while let Some((args, responder)) = task_queue.recv().await {
            s.fetch_add(1, Ordering::SeqCst);
            responder.respond(Ok(tree!({"task": args})));
        }
    });
    let client = fixture.client().await;
    let calls: Vec<_> = (0..5).map(|i| client.call("queued", tree!(i))).collect();
    let results = within("5 queued calls", all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!({"task": (i as i64)}));
    }
    assert_eq!(served_by_task.load(Ordering::SeqCst), 5);
    task.abort();
    let _ = task.await;

    // A thread outside the runtime takes calls with `recv_blocking`.
    let thread_queue = queue.clone();
    let thread = std::thread::spawn(move || {
        let (args, responder) = thread_queue.recv_blocking().expect("a call");
        responder.respond(Ok(tree!({"thread": args})));
    });
    let result = within("a call taken by a thread", client.call("queued", tree!(9)))
        .await
        .unwrap();
    assert_eq!(result, tree!({"thread": 9}));
    thread.join().unwrap();
}

#[tokio::test]
async fn recv_batch_stacks_what_is_queued_and_splits_the_result() {
    let queue = Arc::new(Mutex::new(None));
    let q = queue.clone();
    let fixture = Fixture::start_with(move |b| {
        let (b, call_queue) = b.bind_queue("double", 16);
        *q.lock().unwrap() = Some(call_queue);
        b
    })
    .await;
    let queue = queue.lock().unwrap().take().unwrap();
    let client = fixture.client().await;
    let row = |x: f32| Tree::Array(Array::from_vec1(vec![x, x + 1.0]));
    let calls: Vec<_> = [0.0, 10.0, 20.0]
        .into_iter()
        .map(|x| client.call("double", row(x)))
        .collect();
    // A call whose array has another shape does not stack with the others.
    let odd = client.call("double", Tree::Array(Array::from_vec1(vec![1.0f32; 3])));
    wait_until("four calls queued", || queue.len() == 4).await;

    let taken = within("a batch", queue.recv_batch(8)).await.unwrap();
    assert_eq!(taken.len(), 4);
    let batch = stack_calls(taken).expect("three calls stack");
    assert_eq!(batch.len(), 3);
    let stacked = batch.args().as_array().unwrap();
    assert_eq!(stacked.shape(), &[3, 2]);
    let doubled: Vec<f32> = stacked
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .map(|x| x * 2.0)
        .collect();
    let result = Array::new(
        stacked.dtype(),
        [3usize, 2],
        doubled
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    batch.respond(Ok(Tree::Array(result)));

    let results = within("the batched calls", all(calls)).await;
    for (x, result) in [0.0f32, 10.0, 20.0].into_iter().zip(results) {
        let result = result.unwrap();
        assert_eq!(
            result.as_slice::<f32>().unwrap(),
            &[x * 2.0, (x + 1.0) * 2.0]
        );
    }
    let err = within("the odd call", odd).await.unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.kind, ErrorKind::BadRequest);
    assert!(remote.message.contains("do not stack"), "{err}");
}

#[tokio::test]
async fn recv_batch_takes_at_most_max_and_the_rest_stays_queued() {
    let queue = Arc::new(Mutex::new(None));
    let q = queue.clone();
    let fixture = Fixture::start_with(move |b| {
        let (b, call_queue) = b.bind_queue("q", 16);
        *q.lock().unwrap() = Some(call_queue);
        b
    })
    .await;
    let queue = queue.lock().unwrap().take().unwrap();
    let client = fixture.client().await;
    let calls: Vec<_> = (0..3).map(|i| client.call("q", tree!(i))).collect();
    wait_until("three calls queued", || queue.len() == 3).await;
    let first = within("a batch of two", queue.recv_batch(2)).await.unwrap();
    assert_eq!(first.len(), 2);
    let rest = within("the rest", queue.recv_batch(2)).await.unwrap();
    assert_eq!(rest.len(), 1);
    for (args, responder) in first.into_iter().chain(rest) {
        responder.respond(Ok(args));
    }
    let results = within("the calls", all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((i as i64)));
    }
}

#[tokio::test]
async fn a_queue_nobody_empties_refuses_calls_beyond_its_capacity() {
    let queue = Arc::new(Mutex::new(None));
    let q = queue.clone();
    let fixture = Fixture::start_with(move |b| {
        let (b, call_queue) = b.bind_queue("full", 2);
        *q.lock().unwrap() = Some(call_queue);
        b
    })
    .await;
    let queue = queue.lock().unwrap().take().unwrap();
    let client = fixture.client().await;
    let waiting: Vec<_> = (0..2).map(|i| client.call("full", tree!(i))).collect();
    wait_until("two calls queued", || queue.len() == 2).await;
    let err = within("a third call", client.call("full", tree!(2)))
        .await
        .unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert_eq!(remote.kind, ErrorKind::Overloaded);
    assert!(remote.message.contains("capacity"), "{err}");
    // The queued calls are still answered once someone takes them.
    for _ in 0..2 {
        let (args, responder) = within("a queued call", queue.recv()).await.unwrap();
        responder.respond(Ok(args));
    }
    let results = within("the queued calls", all(waiting)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((i as i64)));
    }
}

#[tokio::test]
async fn a_call_dropped_before_it_runs_does_not_hold_up_later_hooks() {
    let log = Arc::new(Log::default());
    let hook_gate = Arc::new(Gate::default());
    hook_gate.open();
    let (l, g) = (log.clone(), hook_gate.clone());
    let fixture =
        Fixture::start_with(move |b| bind_step(b, |f| f.workers(Workers::Own(1)), l, g)).await;
    let client = fixture.client().await;
    let first = client.call("step", tree!({"id": 0, "sleep": 1.0}));
    wait_until("the first call starts", || {
        log.events().contains(&"start 0".to_owned())
    })
    .await;
    // Its turn for the hook is taken, then it expires waiting for the one worker.
    let err = within(
        "a call that expires waiting for a worker",
        client.call_with_timeout(
            "step",
            tree!({"id": 1, "sleep": 0.0}),
            Duration::from_millis(100),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::DeadlineExceeded { .. })),
        "{err}"
    );
    wait_until("the server drops the expired call", || {
        fixture.server.running() == 1
    })
    .await;
    let third = client.call("step", tree!({"id": 2, "sleep": 0.0}));
    assert_eq!(within("the first call", first).await.unwrap(), tree!(0));
    assert_eq!(within("the third call", third).await.unwrap(), tree!(2));
    wait_until("two hooks", || hooks(&log).len() == 2).await;
    assert_eq!(hooks(&log), ["hook 0", "hook 2"]);
    assert!(
        !log.events().contains(&"start 1".to_owned()),
        "{:?}",
        log.events()
    );
}

/// What a function saw of its call's context, as a tree.
fn describe(ctx: &Context) -> Tree {
    tree!({
        "ip": (ctx.peer_addr().ip().to_string()),
        "port": (i64::from(ctx.peer_addr().port())),
        "agent": (ctx.agent()),
        "deadline": (ctx.deadline().is_some()),
        "remaining": (ctx.remaining().map_or(-1.0, |d| d.as_secs_f64())),
        "cancelled": (ctx.is_cancelled()),
    })
}

#[tokio::test]
async fn async_and_blocking_functions_see_the_callers_address_agent_and_deadline() {
    let fixture = Fixture::start_with(|b| {
        b.bind("ctx_async", |_: Tree, ctx: Context| async move {
            Ok(describe(&ctx))
        })
        .bind(
            "ctx_blocking",
            Function::blocking(|_: Tree, ctx: Context| Ok(describe(&ctx))),
        )
        .bind(
            "ctx_own_pool",
            Function::new(|_: Tree, ctx: Context| async move { Ok(describe(&ctx)) })
                .workers(Workers::Own(2))
                .max_concurrent(1),
        )
        .bind(
            "ctx_deferred",
            Function::deferred(|_, responder: Responder| {
                let seen = describe(responder.context());
                responder.respond(Ok(seen));
            }),
        )
    })
    .await;
    let client = fixture.client().await;
    let named = within(
        "connect with an agent",
        fixture.client_builder().agent("trainer-7").connect(),
    )
    .await
    .unwrap();
    let seen = within("ctx_async", named.call("ctx_async", tree!(null)))
        .await
        .unwrap();
    assert_eq!(seen.get("agent").unwrap().as_str().unwrap(), "trainer-7");
    let mut ports = Vec::new();
    for method in ["ctx_async", "ctx_blocking", "ctx_own_pool", "ctx_deferred"] {
        let plain = within(method, client.call(method, tree!(null)))
            .await
            .unwrap();
        assert_eq!(plain.get("ip").unwrap().as_str().unwrap(), "127.0.0.1");
        assert_eq!(
            plain.get("agent").unwrap().as_str().unwrap(),
            teleport_protocol::client::DEFAULT_AGENT
        );
        assert!(
            !plain.get("deadline").unwrap().as_bool().unwrap(),
            "{plain}"
        );
        assert!(!plain.get("cancelled").unwrap().as_bool().unwrap());
        ports.push(plain.get("port").unwrap().as_int().unwrap());

        let timed = within(
            method,
            client.call_with_timeout(method, tree!(null), Duration::from_secs(10)),
        )
        .await
        .unwrap();
        assert!(timed.get("deadline").unwrap().as_bool().unwrap(), "{timed}");
        let remaining = timed.get("remaining").unwrap().as_float().unwrap();
        assert!(remaining > 5.0 && remaining <= 10.0, "{timed}");
    }
    // One connection: one address, seen by every kind of function.
    assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
}

#[tokio::test]
async fn the_context_turns_cancelled_when_the_client_cancels_or_the_call_expires() {
    let log = Arc::new(Log::default());
    let (async_log, blocking_log) = (log.clone(), log.clone());
    let fixture = Fixture::start_with(move |b| {
        b.bind("wait_async", move |args: Tree, ctx: Context| {
            let log = async_log.clone();
            async move {
                let id = args.as_int()?;
                log.push(format!("start {id}"));
                // The future is dropped when the call stops; a task that
                // holds the context sees the stop.
                let watcher = ctx.clone();
                tokio::spawn(async move {
                    watcher.cancelled().await;
                    log.push(format!("cancelled {id}"));
                });
                tokio::time::sleep(WAIT).await;
                Ok(tree!(null))
            }
        })
        .bind(
            "wait_blocking",
            Function::blocking(move |args: Tree, ctx: Context| {
                let id = args.as_int()?;
                blocking_log.push(format!("start {id}"));
                let began = std::time::Instant::now();
                while !ctx.is_cancelled() && began.elapsed() < WAIT {
                    std::thread::sleep(Duration::from_millis(2));
                }
                blocking_log.push(format!("cancelled {id}"));
                Ok(tree!(null))
            }),
        )
    })
    .await;
    let client = fixture.client().await;
    for (method, base) in [("wait_async", 0), ("wait_blocking", 10)] {
        // Cancelled by the client.
        let call = client.call(method, tree!(base));
        let started = format!("start {base}");
        wait_until(&started, || log.events().contains(&started)).await;
        call.cancel();
        let cancelled = format!("cancelled {base}");
        wait_until(&cancelled, || log.events().contains(&cancelled)).await;
        // Expired.
        let id = base + 1;
        let err = within(
            "a call that expires",
            client.call_with_timeout(method, tree!(id), Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, Error::Call(CallError::DeadlineExceeded { .. })),
            "{err}"
        );
        let cancelled = format!("cancelled {id}");
        wait_until(&cancelled, || log.events().contains(&cancelled)).await;
    }
    wait_until("the calls are gone", || fixture.server.running() == 0).await;
}

/// An async function that counts the calls running at once and logs its
/// starts.
fn counting_async(running: Arc<AtomicUsize>, most: Arc<AtomicUsize>, log: Arc<Log>) -> Function {
    Function::new(move |args: Tree| {
        let (running, most, log) = (running.clone(), most.clone(), log.clone());
        async move {
            let id = args.as_int()?;
            log.push(format!("start {id}"));
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(tree!(id))
        }
    })
}

#[tokio::test]
async fn an_async_function_with_max_concurrent_runs_that_many_calls_at_once_in_order() {
    let (running, most, log) = Default::default();
    let (r, m, l): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<Log>) = (running, most, log);
    let (most, log) = (m.clone(), l.clone());
    let fixture =
        Fixture::start_with(move |b| b.bind("counted", counting_async(r, m, l).max_concurrent(2)))
            .await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..8).map(|i| client.call("counted", tree!(i))).collect();
    let results = within("8 calls", all(calls)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((i as i64)));
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
    let starts: Vec<String> = (0..8).map(|i| format!("start {i}")).collect();
    assert_eq!(log.events(), starts);
}

#[tokio::test]
async fn an_async_function_with_its_own_pool_runs_its_calls_on_it_alone() {
    let (r, m, l): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<Log>) = Default::default();
    let (most, log) = (m.clone(), l.clone());
    let fixture = Fixture::start_with(move |b| {
        b.bind("pooled", counting_async(r, m, l).workers(Workers::Own(1)))
    })
    .await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..5).map(|i| client.call("pooled", tree!(i))).collect();
    // Other async functions do not wait for its pool.
    let other = within("hold, beside the pool", client.call("hold", tree!(0.0))).await;
    assert_eq!(other.unwrap(), tree!(null));
    let results = within("5 calls", all(calls)).await;
    assert!(results.into_iter().all(|r| r.is_ok()));
    assert_eq!(most.load(Ordering::SeqCst), 1);
    let starts: Vec<String> = (0..5).map(|i| format!("start {i}")).collect();
    assert_eq!(log.events(), starts);
}

/// Binds "tally" on one worker of its own: counts starts; its hook, slow,
/// counts finished hooks. Records the most starts ahead of finished hooks.
fn bind_tally(
    builder: teleport_server::ServerBuilder,
    bounded: bool,
    ahead: Arc<AtomicUsize>,
    hooks_done: Arc<AtomicUsize>,
) -> teleport_server::ServerBuilder {
    let started = Arc::new(AtomicUsize::new(0));
    let done = hooks_done.clone();
    let tally = Function::blocking(move |args: Tree| {
        let n = started.fetch_add(1, Ordering::SeqCst) + 1;
        ahead.fetch_max(n - done.load(Ordering::SeqCst), Ordering::SeqCst);
        Ok((args, ()))
    })
    .workers(Workers::Own(1))
    .hook(move |()| {
        std::thread::sleep(Duration::from_millis(20));
        hooks_done.fetch_add(1, Ordering::SeqCst);
    });
    let tally = if bounded {
        tally
    } else {
        tally.unbounded_hook_backlog()
    };
    builder.bind("tally", tally)
}

#[tokio::test]
async fn calls_run_at_most_workers_plus_one_ahead_of_their_hooks() {
    let (ahead, hooks_done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, h) = (ahead.clone(), hooks_done.clone());
    let fixture = Fixture::start_with(move |b| bind_tally(b, true, a, h)).await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..12).map(|i| client.call("tally", tree!(i))).collect();
    let results = within("12 calls", all(calls)).await;
    assert!(results.into_iter().all(|r| r.is_ok()));
    wait_until("12 hooks", || hooks_done.load(Ordering::SeqCst) == 12).await;
    // One worker: started <= finished hooks + 1 + 1.
    let most = ahead.load(Ordering::SeqCst);
    assert!(most <= 2, "calls ran {most} ahead of their hooks");
}

#[tokio::test]
async fn an_unbounded_hook_backlog_lets_calls_run_ahead() {
    let (ahead, hooks_done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, h) = (ahead.clone(), hooks_done.clone());
    let fixture = Fixture::start_with(move |b| bind_tally(b, false, a, h)).await;
    let client = fixture.client().await;
    let calls: Vec<_> = (0..12).map(|i| client.call("tally", tree!(i))).collect();
    let results = within("12 calls", all(calls)).await;
    assert!(results.into_iter().all(|r| r.is_ok()));
    // Each hook takes 20 ms and the calls almost nothing: they ran ahead.
    let most = ahead.load(Ordering::SeqCst);
    assert!(most > 2, "calls ran only {most} ahead of their hooks");
    wait_until("12 hooks", || hooks_done.load(Ordering::SeqCst) == 12).await;
}

#[tokio::test]
async fn options_that_cannot_work_together_fail_listen_clearly() {
    use teleport_server::{BatchPolicy, Server, ServerError};
    let policy = BatchPolicy {
        max_batch: 4,
        max_wait: Duration::from_millis(1),
    };
    let cases: Vec<(&str, teleport_server::ServerBuilder)> = vec![
        (
            "Context",
            Server::builder().bind(
                "f",
                Function::blocking(|args: Tree, _: Context| Ok(args)).batch(policy),
            ),
        ),
        (
            "hook",
            Server::builder().bind(
                "f",
                Function::blocking(|args: Tree| Ok(args))
                    .hook(|()| {})
                    .batch(policy),
            ),
        ),
        (
            "options",
            Server::builder().bind(
                "f",
                Function::deferred(|_, responder| drop(responder)).max_concurrent(2),
            ),
        ),
        (
            "options",
            Server::builder().bind(
                "f",
                Function::deferred(|_, responder| drop(responder)).batch(policy),
            ),
        ),
        (
            "by-product",
            Server::builder().bind("f", Function::blocking(|args: Tree| Ok((args, 1)))),
        ),
    ];
    for (what, builder) in cases {
        match builder.listen("127.0.0.1:0").await {
            Err(ServerError::InvalidFunction { method, reason }) => {
                assert_eq!(method, "f");
                assert!(reason.contains(what), "{what}: {reason}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_async_function_gets_an_ordered_hook_too() {
    let log = Arc::new(Log::default());
    let hook_log = log.clone();
    let fixture = Fixture::start_with(move |b| {
        b.bind(
            "step_async",
            Function::new(|args: Tree| async move {
                let id = args.get("id")?.as_int()?;
                let sleep = args.get("sleep")?.as_float()?;
                tokio::time::sleep(Duration::from_secs_f64(sleep)).await;
                Ok((tree!(id), id))
            })
            .workers(Workers::Own(3))
            .hook(move |id: i64| hook_log.push(format!("hook {id}"))),
        )
    })
    .await;
    let client = fixture.client().await;
    let calls: Vec<_> = [(0, 0.3), (1, 0.0), (2, 0.1)]
        .into_iter()
        .map(|(id, sleep)| client.call("step_async", tree!({"id": id, "sleep": sleep})))
        .collect();
    let results = within("3 async steps", all(calls)).await;
    for (id, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), tree!((id as i64)));
    }
    wait_until("three hooks", || hooks(&log).len() == 3).await;
    assert_eq!(hooks(&log), ["hook 0", "hook 1", "hook 2"]);
}
