//! Named peers end to end, on loopback: discovery through a peer in the
//! middle, name clashes, a peer that restarts, deferred and queue functions,
//! timeouts, blocking calls and callbacks.

use std::future::Future;
use std::time::Duration;

use teleport_peer::{Function, Identity, Peer, PeerBuilder, PeerError, RefusalKind};
use teleport_protocol::{tree, Tree};

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("the test did not finish in time")
}

/// A peer named `name` that answers `whoami` with its name and a tag (to
/// tell a restarted peer from the one before), trusting whoever answers at
/// an address (`accept_any`), with short timeouts.
fn builder(name: &str, tag: &str) -> PeerBuilder {
    let (me, tag) = (name.to_owned(), tag.to_owned());
    Peer::builder()
        .name(name)
        .accept_any()
        .timeout(Duration::from_secs(10))
        .liveness_timeout(Duration::from_millis(500))
        .define("whoami", move |_: Tree| {
            let (me, tag) = (me.clone(), tag.clone());
            async move { Ok(tree!({"name": (me), "tag": (tag)})) }
        })
}

async fn peer(name: &str) -> Peer {
    builder(name, "first").listen("127.0.0.1:0").await.unwrap()
}

fn addr(peer: &Peer) -> std::net::SocketAddr {
    peer.local_addr().unwrap()
}

fn field(reply: &Tree, key: &str) -> String {
    reply.get(key).unwrap().as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finds_c_through_b_and_c_calls_a_back() {
    bounded(async {
        let b = peer("B").await;
        let a = peer("A").await;
        let c = peer("C").await;
        assert_eq!(a.connect(addr(&b)).await.unwrap(), "B");
        assert_eq!(c.connect(addr(&b)).await.unwrap(), "B");
        // A knows only B.
        let known: Vec<String> = a.peers().into_iter().map(|p| p.name).collect();
        assert_eq!(known, ["B"]);

        let reply = a.call("C", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "C");
        // A is now connected to C directly, pinned to C's certificate.
        let to_c = a.peers().into_iter().find(|p| p.name == "C").unwrap();
        assert!(to_c.connected);
        assert_eq!(to_c.fingerprint, c.fingerprint());
        assert_eq!(to_c.addrs, [addr(&c)]);

        // C learned A from A's greeting and calls it back by name.
        let reply = c.call("A", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "A");
        // And a function's own error reaches the caller as a remote error.
        let error = a
            .call("C", "no_such_function", Tree::None)
            .await
            .unwrap_err();
        assert!(error.remote().is_some(), "{error}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_two_hops_away_is_found() {
    bounded(async {
        // A - B - D - C: B does not know C, D does.
        let (a, b, d, c) = (
            peer("A").await,
            peer("B").await,
            peer("D").await,
            peer("C").await,
        );
        a.connect(addr(&b)).await.unwrap();
        b.connect(addr(&d)).await.unwrap();
        c.connect(addr(&d)).await.unwrap();
        let reply = a.call("C", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "C");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_clash_is_refused_on_both_sides() {
    bounded(async {
        let b = peer("B").await;
        let c = peer("C").await;
        c.connect(addr(&b)).await.unwrap();

        // Another peer named C (another certificate) connects to B, which
        // knows C and finds it still answers.
        let impostor = peer("C").await;
        let error = impostor.connect(addr(&b)).await.unwrap_err();
        assert!(error.is_name_clash(), "{error}");
        assert!(error.to_string().contains("\"C\""), "{error}");
        let refused = b.refusals();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].kind, RefusalKind::NameClash);
        assert_eq!(refused[0].name, "C");
        assert_eq!(refused[0].fingerprint, Some(impostor.fingerprint()));
        // B still reaches the real C.
        let reply = b.call("C", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "C");

        // The other way round: B connects to the impostor and refuses it,
        // and tells it so.
        let error = b.connect(addr(&impostor)).await.unwrap_err();
        assert!(error.is_name_clash(), "{error}");
        let told = impostor.refusals();
        assert!(
            told.iter()
                .any(|r| r.kind == RefusalKind::NameClash && r.refused_by == "B"),
            "{told:?}"
        );
        // A peer with this peer's own name is refused too.
        let twin = peer("B").await;
        let error = twin.connect(addr(&b)).await.unwrap_err();
        assert!(error.is_name_clash(), "{error}");
        let error = b.connect(addr(&twin)).await.unwrap_err();
        assert!(error.is_name_clash(), "{error}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_found_again() {
    bounded(async {
        let b = peer("B").await;
        let a = peer("A").await;
        let c = peer("C").await;
        a.connect(addr(&b)).await.unwrap();
        c.connect(addr(&b)).await.unwrap();
        let reply = a.call("C", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "tag"), "first");
        let old_addr = addr(&c);
        drop(c);

        // A new process named C: a new certificate, a new port, connected to B.
        let restarted = builder("C", "second").listen("127.0.0.1:0").await.unwrap();
        assert_ne!(addr(&restarted), old_addr);
        restarted.connect(addr(&b)).await.unwrap();

        let reply = a.call("C", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "tag"), "second");
        let to_c = a.peers().into_iter().find(|p| p.name == "C").unwrap();
        assert_eq!(to_c.fingerprint, restarted.fingerprint());
        // And the restarted peer calls A back by name.
        let reply = restarted.call("A", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "A");
    })
    .await;
}

/// Peer B with `identity`, listening on `port` (0: any), tagged `tag`: run
/// again with the same identity and port, it is the same peer restarted.
async fn b_at(identity: &Identity, port: u16, tag: &str) -> Peer {
    builder("B", tag)
        .identity(identity.clone())
        .listen(("127.0.0.1", port))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_by_address_is_kept_up() {
    bounded(async {
        // B keeps its certificate across the restart, and its port.
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let b = b_at(&identity, 0, "first").await;
        let port = addr(&b).port();
        let a = peer("A").await;
        a.connect(addr(&b)).await.unwrap();
        b.shutdown(Duration::from_millis(100)).await;
        drop(b);
        let b = b_at(&identity, port, "second").await;
        // A reconnects to the address by itself.
        let reply = a.call("B", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "tag"), "second");
        drop(b);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_peer_already_linked_by_name_keeps_its_address_up() {
    bounded(async {
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let b = b_at(&identity, 0, "first").await;
        let port = addr(&b).port();
        let a = peer("A").await;
        let c = peer("C").await;
        a.connect(addr(&c)).await.unwrap();
        b.connect(addr(&c)).await.unwrap();
        // A links to B by name (through C), then connects to B's address:
        // the link it already has must now be kept up at that address.
        a.call("B", "whoami", Tree::None).await.unwrap();
        a.connect(addr(&b)).await.unwrap();
        drop(c);
        b.shutdown(Duration::from_millis(100)).await;
        drop(b);
        let b_connected = |a: &Peer| a.peers().into_iter().any(|p| p.name == "B" && p.connected);
        // Past the liveness timeout (500 ms) the link is down for good; only
        // the promise of `connect` brings it back.
        tokio::time::timeout(Duration::from_secs(5), async {
            while b_connected(&a) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("A sees B gone");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = b_at(&identity, port, "second").await;
        // No call: A reconnects by itself (backing off at most 5 s).
        tokio::time::timeout(Duration::from_secs(10), async {
            while !b_connected(&a) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("A connects to B's address again by itself");
        let reply = a.call("B", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "tag"), "second");
        drop(b);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_and_queue_functions_on_a_peer() {
    bounded(async {
        let (builder, queue) = builder("learner", "first")
            .define(
                "later",
                Function::deferred(|args, responder| {
                    // Answer from another thread, later.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(20));
                        responder.respond(Ok(args));
                    });
                }),
            )
            .define_queue("batch", 64);
        let learner = builder.listen("127.0.0.1:0").await.unwrap();
        tokio::spawn(async move {
            while let Some(calls) = queue.recv_batch(8).await {
                for (args, responder) in calls {
                    let n = args.get("n").unwrap().as_int().unwrap();
                    responder.respond(Ok(tree!({"doubled": (n * 2)})));
                }
            }
        });
        let actor = peer("actor").await;
        actor.connect(addr(&learner)).await.unwrap();

        let reply = actor
            .call("learner", "later", tree!({"x": 7}))
            .await
            .unwrap();
        assert_eq!(reply.get("x").unwrap().as_int().unwrap(), 7);
        let calls: Vec<_> = (0..10)
            .map(|n| actor.call("learner", "batch", tree!({"n": (n as i64)})))
            .collect();
        for (n, call) in calls.into_iter().enumerate() {
            let reply = call.await.unwrap();
            assert_eq!(
                reply.get("doubled").unwrap().as_int().unwrap(),
                2 * n as i64
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_time_out() {
    bounded(async {
        let slow = builder("slow", "first")
            .define("sleep", |_: Tree| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                Ok(Tree::None)
            })
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let caller = peer("caller").await;
        caller.connect(addr(&slow)).await.unwrap();

        // A per-call timeout (the function sleeps 20 s; the test's bound is
        // 30 s in all, so the timeouts below are what ended the calls).
        let error = caller
            .call_with_timeout("slow", "sleep", Tree::None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(error.is_timeout(), "{error}");

        // The default timeout (moolib's set_timeout).
        caller.set_timeout(Duration::from_millis(300));
        assert_eq!(caller.timeout(), Duration::from_millis(300));
        let error = caller.call("slow", "sleep", Tree::None).await.unwrap_err();
        assert!(error.is_timeout(), "{error}");

        // A name nobody knows: discovery gives up at the timeout.
        let error = caller
            .call("nobody", "whoami", Tree::None)
            .await
            .unwrap_err();
        assert!(error.is_not_found(), "{error}");
        assert!(error.to_string().contains("\"nobody\""), "{error}");
    })
    .await;
}

#[test]
fn call_blocking_and_callbacks() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = runtime.block_on(async {
        let b = peer("B").await;
        let a = peer("A").await;
        a.connect(addr(&b)).await.unwrap();
        (a, b)
    });
    // From a thread without a runtime.
    let reply = a.call_blocking("B", "whoami", Tree::None).unwrap();
    assert_eq!(field(&reply, "name"), "B");

    let (tx, rx) = std::sync::mpsc::channel();
    a.call_with_callback("B", "whoami", Tree::None, move |result| {
        tx.send(result).unwrap();
    });
    let reply = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the callback ran")
        .unwrap();
    assert_eq!(field(&reply, "name"), "B");

    // Inside the runtime, blocking is refused rather than stalling it.
    let inside = runtime.block_on(async { a.call_blocking("B", "whoami", Tree::None) });
    assert!(matches!(inside, Err(PeerError::BlockingInRuntime)));
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_is_pinned_by_name_or_refused() {
    bounded(async {
        let b = peer("B").await;
        // Neither a pin nor accept_any: nothing to trust B with.
        let strict = Peer::builder()
            .name("strict")
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let error = strict.connect(addr(&b)).await.unwrap_err();
        assert!(matches!(error, PeerError::Untrusted { .. }), "{error}");

        // Pinned by name: trusted.
        let pinned = Peer::builder()
            .name("pinned")
            .trust("B", b.fingerprint())
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        assert_eq!(pinned.connect(addr(&b)).await.unwrap(), "B");

        // The pin names another certificate: refused, though accept_any is on.
        let other = Identity::self_signed(["localhost"]).unwrap();
        let wrong = Peer::builder()
            .name("wrong")
            .accept_any()
            .trust("B", other.fingerprint())
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let error = wrong.connect(addr(&b)).await.unwrap_err();
        assert!(matches!(error, PeerError::Untrusted { .. }), "{error}");

        // A cohort with a token: a peer without it cannot connect.
        let guarded = Peer::builder()
            .name("guarded")
            .token("secret")
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let member = Peer::builder()
            .name("member")
            .token("secret")
            .trust("guarded", guarded.fingerprint())
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        assert_eq!(member.connect(addr(&guarded)).await.unwrap(), "guarded");
        let outsider = Peer::builder()
            .name("outsider")
            .trust("guarded", guarded.fingerprint())
            .connect_timeout(Duration::from_secs(2))
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let error = outsider.connect(addr(&guarded)).await.unwrap_err();
        assert!(
            matches!(&error, PeerError::Connect { .. }) && error.to_string().contains("token"),
            "{error}"
        );

        // Reserved names cannot be defined; default names are unique.
        let error = Peer::builder()
            .define("_peer.hello", |args: Tree| async move { Ok(args) })
            .listen("127.0.0.1:0")
            .await
            .unwrap_err();
        assert!(matches!(error, PeerError::ReservedName(_)), "{error}");
        let (x, y) = (
            Peer::builder().start().unwrap(),
            Peer::builder().start().unwrap(),
        );
        assert_ne!(x.name(), y.name());
        assert!(x.name().starts_with("peer-"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_is_kept_up_past_the_liveness_timeout() {
    bounded(async {
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let b = b_at(&identity, 0, "first").await;
        let port = addr(&b).port();
        let a = peer("A").await;
        a.connect(addr(&b)).await.unwrap();
        b.shutdown(Duration::from_millis(100)).await;
        drop(b);
        // Gone for longer than A's liveness timeout (500 ms): A's link is
        // dropped, and A goes on connecting to the address.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!a.peers().iter().any(|p| p.name == "B" && p.connected));
        let b = b_at(&identity, port, "second").await;
        let reply = a.call("B", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "tag"), "second");
        drop(b);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introduction_against_a_pin_and_max_hops_zero_find_nothing() {
    bounded(async {
        let b = peer("B").await;
        let c = peer("C").await;
        c.connect(addr(&b)).await.unwrap();
        // A pins C to another certificate: B's introduction of C is refused.
        let other = Identity::self_signed(["localhost"]).unwrap();
        let a = builder("A", "first")
            .trust("C", other.fingerprint())
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        a.connect(addr(&b)).await.unwrap();
        let error = a
            .call_with_timeout("C", "whoami", Tree::None, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(error.is_not_found(), "{error}");
        assert!(error.to_string().contains("pins"), "{error}");

        // D asks with max_hops 0: B knows only E's neighbour F, not E.
        let e = peer("E").await;
        let f = peer("F").await;
        b.connect(addr(&f)).await.unwrap();
        e.connect(addr(&f)).await.unwrap();
        let d = builder("D", "first")
            .max_hops(0)
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        d.connect(addr(&b)).await.unwrap();
        let error = d
            .call_with_timeout("E", "whoami", Tree::None, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(error.is_not_found(), "{error}");
        // With hops left (the default, 2), B passes the question on to F.
        let g = peer("G").await;
        g.connect(addr(&b)).await.unwrap();
        let reply = g.call("E", "whoami", Tree::None).await.unwrap();
        assert_eq!(field(&reply, "name"), "E");
        drop((c, e, f));
    })
    .await;
}
