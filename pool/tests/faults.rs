//! The pool when servers are busy, refuse calls, retire or leave, and the
//! endpoint workers dial: busy servers never end a map, a terminal error
//! comes last, `size_hint` counts unanswered inputs, names are checked
//! against CA-signed certificates, dialling in needs the token.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream as _, StreamExt};
use teleport_client::{Client, ClientTls, ErrorKind, Identity};
use teleport_pool::{Pool, PoolError};
use teleport_protocol::{tree, Tree};
use teleport_server::{Server, ServerBuilder};
use tokio::sync::watch;
use tokio::time::timeout;

use common::{until, LIMIT};

/// A server binding `g` (x + 2) and `gated` (x + 2 once the gate opens),
/// counting the `gated` calls running.
async fn gated_server(
    builder: ServerBuilder,
    gate: watch::Receiver<bool>,
) -> (Server, Arc<AtomicUsize>) {
    let running = Arc::new(AtomicUsize::new(0));
    let counter = running.clone();
    let server = builder
        .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) })
        .bind("gated", move |x: Tree| {
            let mut gate = gate.clone();
            let running = counter.clone();
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(tree!((x.as_int()? + 2)))
            }
        })
        .listen("127.0.0.1:0")
        .await
        .expect("a test server");
    (server, running)
}

async fn pool_over(server: &Server, qsize: usize, server_wait: Duration) -> Pool {
    let pool = timeout(
        LIMIT,
        Pool::builder()
            .server(server.local_addr(), server.fingerprint())
            .qsize(qsize)
            .server_wait(server_wait)
            .connect_timeout(Duration::from_secs(5))
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .start(),
    )
    .await
    .expect("started in time")
    .expect("a pool");
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    pool
}

fn ints(results: Vec<Result<Tree, PoolError>>) -> Vec<i64> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")).as_int().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_busy_for_longer_than_server_wait_do_not_end_a_map() {
    let (open, gate) = watch::channel(false);
    let (server, running) = gated_server(Server::builder(), gate).await;
    let pool = pool_over(&server, 2, Duration::from_millis(100)).await;
    let collector = tokio::spawn(pool.map("gated", 0i64..6).collect::<Vec<_>>());
    until("both slots are taken", || {
        running.load(Ordering::SeqCst) == 2
    })
    .await;
    // Several times server_wait with every slot busy: still no error.
    tokio::time::sleep(Duration::from_millis(400)).await;
    open.send(true).unwrap();
    let results = timeout(LIMIT, collector).await.unwrap().unwrap();
    assert_eq!(ints(results), (2..8).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_as_overloaded_are_sent_again() {
    let (open, gate) = watch::channel(false);
    // The server runs one call at a time and refuses more as overloaded;
    // the pool sends it three at once.
    let (server, running) = gated_server(Server::builder().max_in_flight_total(1), gate).await;
    let pool = pool_over(&server, 3, Duration::from_secs(5)).await;
    let collector = tokio::spawn(pool.map("gated", 0i64..8).collect::<Vec<_>>());
    until("one call runs", || running.load(Ordering::SeqCst) == 1).await;
    // Long enough for refusals and backoffs.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let refused = server.stats().failed(ErrorKind::Overloaded);
    assert!(refused >= 2, "the server refused calls: {refused}");
    open.send(true).unwrap();
    let results = timeout(LIMIT, collector).await.unwrap().unwrap();
    assert_eq!(ints(results), (2..10).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_error_comes_after_the_results_in_flight() {
    let (open, gate) = watch::channel(false);
    let (server, running) = gated_server(Server::builder(), gate).await;
    let pool = pool_over(&server, 2, Duration::from_millis(100)).await;
    let mut map = pool.map("gated", 0i64..10);
    assert_eq!(map.size_hint(), (10, Some(10)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(r) = map.next().await {
            let _ = tx.send(r);
        }
    });
    until("both slots are taken", || {
        running.load(Ordering::SeqCst) == 2
    })
    .await;
    // Retired, the server finishes its two calls but takes no more: with
    // no server up, the map's next call gives up after server_wait.
    assert!(pool.retire_server(server.local_addr()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "nothing before the calls in flight");
    open.send(true).unwrap();
    let mut results = Vec::new();
    while let Some(r) = timeout(LIMIT, rx.recv()).await.unwrap() {
        results.push(r);
    }
    timeout(LIMIT, driver).await.unwrap().unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(results[0].as_ref().unwrap().as_int().unwrap(), 2);
    assert_eq!(results[1].as_ref().unwrap().as_int().unwrap(), 3);
    let last = results[2].as_ref().unwrap_err();
    assert!(matches!(last, PoolError::NoServers { .. }), "{last}");
    assert!(last.is_terminal());
    assert!(last.to_string().contains("server_wait"), "{last}");
    // The retired server is gone once its calls finished.
    until("the retired server is dropped", || {
        pool.servers().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_hint_counts_the_inputs_not_yet_answered() {
    let (_open, gate) = watch::channel(true);
    let (server, _) = gated_server(
        Server::builder().bind("add2_batch", |x: Tree| async move {
            if let Tree::Int(i) = x {
                return Ok(tree!((i + 2)));
            }
            let a = x.as_array()?;
            let y: Vec<i64> = a.as_slice::<i64>()?.iter().map(|v| v + 2).collect();
            Ok(Tree::Array(teleport_protocol::Array::from_vec(
                a.shape().to_vec(),
                y,
            )?))
        }),
        gate,
    )
    .await;
    let pool = pool_over(&server, 2, Duration::from_secs(5)).await;
    for (chunksize, ordered) in [(1, true), (4, true), (4, false), (3, false)] {
        let map = if ordered {
            pool.map("add2_batch", 0i64..10)
        } else {
            pool.map_unordered("add2_batch", 0i64..10)
        };
        let mut map = map.chunksize(chunksize);
        assert_eq!(map.size_hint(), (10, Some(10)));
        for yielded in 1..=10 {
            let r = timeout(LIMIT, map.next()).await.unwrap().unwrap();
            r.unwrap();
            let left = 10 - yielded;
            assert_eq!(
                map.size_hint(),
                (left, Some(left)),
                "chunksize {chunksize}, ordered {ordered}, after {yielded}"
            );
        }
        assert!(timeout(LIMIT, map.next()).await.unwrap().is_none());
        assert_eq!(map.size_hint(), (0, Some(0)));
    }
}

/// A CA, and a server certificate it signed for `localhost`, as PEM files
/// in `dir`.
fn ca_and_server(dir: &std::path::Path) -> (std::path::PathBuf, Identity) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        ca_path,
        Identity::from_pem_files(&cert_path, &key_path).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_trusted_by_a_ca_are_checked_for_the_name_given() {
    let dir = std::env::temp_dir().join(format!("teleport-pool-ca-{}", std::process::id()));
    let (ca, identity) = ca_and_server(&dir);
    // `localhost` resolves the same way for the server and the pool.
    let server = Server::builder()
        .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) })
        .identity(identity)
        .listen("localhost:0")
        .await
        .unwrap();
    let name = format!("localhost:{}", server.local_addr().port());
    for resolve in [false, true] {
        let tls = ClientTls::with_ca_roots_pem_file(&ca).unwrap();
        let builder = Pool::builder()
            .tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .server_wait(Duration::from_secs(5));
        let builder = if resolve {
            builder.resolve(name.clone())
        } else {
            builder.servers([name.clone()])
        };
        let pool = timeout(LIMIT, builder.start()).await.unwrap().unwrap();
        timeout(LIMIT, pool.wait_for_servers(1, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("resolve {resolve}: {e}"));
        let y = timeout(LIMIT, pool.submit("g", 1i64))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(y.as_int().unwrap(), 3);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dials the pool's worker endpoint as `teleport worker --connect` does.
async fn dial_in(
    pool: &Pool,
    server: &Server,
    token: &str,
) -> Result<teleport_server::DialedClient, teleport_server::ServerError> {
    let registration = pool.registration().unwrap();
    server
        .dial(
            registration.addr,
            ClientTls::pinned(registration.fingerprint),
            token,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_in_needs_the_token_and_is_bounded() {
    let (_open, gate) = watch::channel(true);
    let (a, ran_a) = gated_server(Server::builder(), gate.clone()).await;
    let (b, _) = gated_server(Server::builder(), gate).await;
    let pool = timeout(
        LIMIT,
        Pool::builder()
            .accept_workers("127.0.0.1:0", None)
            .max_registered_workers(1)
            .server_wait(Duration::from_secs(2))
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    // No token given: the pool made a random 256-bit one.
    let token = pool.token().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!format!("{:?}", pool.registration().unwrap()).contains(&token));

    // A worker with the wrong token is dropped before any call goes to it.
    let impostor = timeout(LIMIT, dial_in(&pool, &a, "not the token"))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, impostor.closed()).await.unwrap();
    until("the pool has no server", || pool.servers().is_empty()).await;
    assert_eq!(a.stats().calls_received, 0);
    assert_eq!(ran_a.load(Ordering::SeqCst), 0);

    // The right token: a server of the pool, called over its own connection.
    let worker = timeout(LIMIT, dial_in(&pool, &a, &token))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    let y = timeout(LIMIT, pool.submit("g", 40i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(y.as_int().unwrap(), 42);
    let name = &pool.servers()[0].name;
    assert!(
        name.starts_with("worker dialled in from 127.0.0.1:"),
        "{name}"
    );

    // One more is over max_registered_workers: refused without a handshake.
    let e = timeout(LIMIT, dial_in(&pool, &b, &token))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    assert_eq!(pool.servers().len(), 1);

    // A worker whose connection ends leaves the pool, and its place is free.
    drop(a);
    timeout(LIMIT, worker.closed()).await.unwrap();
    until("the pool has no server", || pool.servers().is_empty()).await;
    let worker = timeout(LIMIT, dial_in(&pool, &b, &token))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    // The pool goes: so does the connection its worker opened.
    drop(pool);
    timeout(LIMIT, worker.closed()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_all_waits_for_a_busy_server_instead_of_running_twice_elsewhere() {
    let (open, gate) = watch::channel(false);
    // Server a runs one call at a time and refuses more as overloaded.
    let (a, running) = gated_server(
        Server::builder()
            .max_in_flight_total(1)
            .bind("who", |_: Tree| async { Ok(tree!("a")) }),
        gate.clone(),
    )
    .await;
    let (b, _) = gated_server(
        Server::builder().bind("who", |_: Tree| async { Ok(tree!("b")) }),
        gate,
    )
    .await;
    let pool = timeout(
        LIMIT,
        Pool::builder()
            .server(a.local_addr(), a.fingerprint())
            .server(b.local_addr(), b.fingerprint())
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(40))
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    timeout(LIMIT, pool.wait_for_servers(2, LIMIT))
        .await
        .unwrap()
        .unwrap();
    // Another client keeps a's one slot busy.
    let other = Client::builder(a.local_addr().to_string().as_str())
        .pin(a.fingerprint())
        .connect()
        .await
        .unwrap();
    let held = tokio::spawn({
        let other = other.clone();
        async move { other.call("gated", tree!(1i64)).await }
    });
    until("a is busy", || running.load(Ordering::SeqCst) == 1).await;
    let all = tokio::spawn({
        let pool = pool.clone();
        async move { pool.run_on_all("who", 0i64).await }
    });
    // Refused and backing off, a's call waits for a, not for b.
    until("a refused the call", || {
        a.stats().failed(ErrorKind::Overloaded) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!all.is_finished(), "run_on_all waits for a");
    open.send(true).unwrap();
    timeout(LIMIT, held).await.unwrap().unwrap().unwrap();
    let results = timeout(LIMIT, all).await.unwrap().unwrap();
    let address_of = |name: &str| {
        pool.servers()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.addr)
    };
    let mut answers: Vec<_> = results
        .into_iter()
        .map(|(name, r)| {
            let who = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            (address_of(&name), who.as_str().unwrap().to_owned())
        })
        .collect();
    answers.sort();
    let mut expected = vec![
        (Some(a.local_addr()), "a".to_owned()),
        (Some(b.local_addr()), "b".to_owned()),
    ];
    expected.sort();
    assert_eq!(answers, expected, "each server ran it once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_pool_dials_it_again() {
    use teleport_netsim::{LinkConfig, Relay};
    let pool = timeout(
        LIMIT,
        Pool::builder()
            .accept_workers("127.0.0.1:0", None)
            .server_wait(Duration::from_secs(5))
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    let registration = pool.registration().unwrap();
    // The worker reaches the pool through a link that can go dark.
    let relay = Relay::start(
        registration.addr,
        LinkConfig::default(),
        LinkConfig::default(),
        7,
    )
    .unwrap();
    let mut transport = teleport_client::TransportConfig::default();
    // Silence is noticed in under a second on both sides (QUIC takes the
    // shorter idle timeout of the two).
    transport.idle_timeout = Duration::from_millis(800);
    transport.keep_alive = Some(Duration::from_millis(200));
    let functions = Server::builder()
        .bind("g", |x: Tree| async move { Ok(tree!((x.as_int()? + 2))) })
        .transport(transport);
    let mut options = teleport_pool::worker::WorkerOptions::default();
    options.connect = Some(relay.addr().to_string());
    options.pin = Some(registration.fingerprint);
    options.token = Some(registration.token.clone());
    options.redial_for = Duration::from_secs(15);
    let worker = tokio::spawn(teleport_pool::worker::serve(functions, options));
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    let y = timeout(LIMIT, pool.submit("g", 1i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(y.as_int().unwrap(), 3);

    // The link goes dark: both sides give the connection up.
    relay.set(LinkConfig::cut(), LinkConfig::cut());
    until("the lost worker leaves the pool", || {
        pool.servers().is_empty()
    })
    .await;
    assert!(
        !worker.is_finished(),
        "the worker dials again instead of exiting"
    );
    // The link comes back: the worker dials in again and gets work.
    relay.set(LinkConfig::default(), LinkConfig::default());
    timeout(LIMIT, pool.wait_for_servers(1, LIMIT))
        .await
        .unwrap()
        .unwrap();
    let y = timeout(LIMIT, pool.submit("g", 40i64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(y.as_int().unwrap(), 42);

    // The pool closing is no loss: the worker stops, successfully.
    drop(pool);
    timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
}
