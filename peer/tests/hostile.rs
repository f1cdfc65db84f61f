//! Peers against clients that do not play by the rules: plain teleport
//! clients calling the reserved functions with notices, greetings and
//! questions a well-behaved peer would not send. And the edges of calls:
//! concurrent first calls, a peer's own name, a timeout of `Duration::MAX`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use teleport_client::Client;
use teleport_peer::{Fingerprint, Identity, Peer, PeerBuilder, PeerError, HELLO, LOOKUP, REFUSE};
use teleport_protocol::{to_tree, tree, Tree};

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("the test did not finish in time")
}

fn builder(name: &str) -> PeerBuilder {
    let me = name.to_owned();
    Peer::builder()
        .name(name)
        .accept_any()
        .timeout(Duration::from_secs(10))
        .liveness_timeout(Duration::from_millis(500))
        .define("whoami", move |_: Tree| {
            let me = me.clone();
            async move { Ok(tree!({"name": (me)})) }
        })
}

async fn peer(name: &str) -> Peer {
    builder(name).listen("127.0.0.1:0").await.unwrap()
}

fn addr(peer: &Peer) -> SocketAddr {
    peer.local_addr().unwrap()
}

/// A plain teleport client to `target`'s server, with a certificate of its
/// own (whose fingerprint comes back too).
async fn stranger(target: &Peer) -> (Client, Fingerprint) {
    let identity = Identity::self_signed(["localhost"]).unwrap();
    let fingerprint = identity.fingerprint();
    let client = Client::builder(addr(target))
        .pin(target.fingerprint())
        .identity(identity)
        .connect()
        .await
        .unwrap();
    (client, fingerprint)
}

/// The arguments of `_peer.hello`, as docs/peers.md describes them.
#[derive(Serialize)]
struct Greeting {
    version: u32,
    name: String,
    fingerprint: String,
    addrs: Vec<String>,
}

fn greeting(name: &str, fingerprint: Fingerprint, addrs: &[SocketAddr]) -> Tree {
    to_tree(&Greeting {
        version: 1,
        name: name.into(),
        fingerprint: fingerprint.to_string(),
        addrs: addrs.iter().map(ToString::to_string).collect(),
    })
    .unwrap()
}

/// The type name of a call's remote error (panics on success or a local error).
fn remote_type(result: Result<Tree, teleport_client::Error>) -> String {
    let error = result.expect_err("the call was refused");
    error
        .remote()
        .unwrap_or_else(|| panic!("not a remote error: {error}"))
        .type_name
        .clone()
}

fn known_addrs(peer: &Peer, name: &str) -> Option<Vec<SocketAddr>> {
    peer.peers()
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| p.addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_notice_from_a_stranger_changes_no_link() {
    bounded(async {
        let learner = peer("learner").await;
        let b = peer("b").await;
        b.connect(addr(&learner)).await.unwrap();
        let (client, _) = stranger(&b).await;
        let notice = tree!({
            "refused_by": "learner",
            "kind": "NameClash",
            "name": "b",
            "message": "go away"
        });
        client.call(REFUSE, notice).await.unwrap();
        // Recorded, and nothing else: the link to the learner stays.
        assert!(b.refusals().iter().any(|r| r.message == "go away"));
        let to_learner = b.peers().into_iter().find(|p| p.name == "learner");
        assert!(to_learner.is_some_and(|p| p.connected));
        let reply = b.call("learner", "whoami", Tree::None).await.unwrap();
        assert_eq!(reply, tree!({"name": "learner"}));
        // A malformed notice is refused.
        let error = client.call(REFUSE, tree!({"refused_by": 5})).await;
        assert_eq!(remote_type(error), "BadRefusal");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_must_carry_the_certificate_its_connection_presented() {
    bounded(async {
        let learner = peer("learner").await;
        let b = peer("b").await;
        b.connect(addr(&learner)).await.unwrap();
        let (client, own) = stranger(&b).await;
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();

        // The learner's (public) fingerprint under its name, pointing
        // elsewhere: refused, and the learner's addresses stay.
        let claim = greeting("learner", learner.fingerprint(), &[elsewhere]);
        assert_eq!(remote_type(client.call(HELLO, claim).await), "Untrusted");
        assert_eq!(known_addrs(&b, "learner"), Some(vec![addr(&learner)]));
        // Under another name: refused too.
        let claim = greeting("mallory", learner.fingerprint(), &[elsewhere]);
        assert_eq!(remote_type(client.call(HELLO, claim).await), "Untrusted");
        assert_eq!(known_addrs(&b, "mallory"), None);

        // Its own certificate under a new name: accepted.
        let reply = client
            .call(HELLO, greeting("mallory", own, &[elsewhere]))
            .await
            .unwrap();
        assert_eq!(reply.get("name").and_then(Tree::as_str).ok(), Some("b"));
        assert_eq!(known_addrs(&b, "mallory"), Some(vec![elsewhere]));
        // One connection greets under one name.
        let other = greeting("trudy", own, &[elsewhere]);
        assert_eq!(remote_type(client.call(HELLO, other).await), "BadGreeting");

        // A client without a certificate does not get through TLS.
        let bare = async {
            let client = Client::builder(addr(&b))
                .pin(b.fingerprint())
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await?;
            let args = greeting("anon", own, &[]);
            client
                .call_with_timeout(HELLO, args, Duration::from_secs(1))
                .await
        };
        let outcome = bare.await;
        assert!(
            matches!(&outcome, Err(e) if e.remote().is_none()),
            "a client without a certificate greeted: {outcome:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_bounded_and_forgets_peers_that_left() {
    bounded(async {
        let b = builder("b")
            .max_peers(3)
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let mut clients = Vec::new();
        for i in 0..3 {
            let (client, own) = stranger(&b).await;
            client
                .call(HELLO, greeting(&format!("n{i}"), own, &[]))
                .await
                .unwrap();
            clients.push(client);
        }
        // Full of connected peers: a fourth is refused.
        let (late, late_fp) = stranger(&b).await;
        let refused = late.call(HELLO, greeting("n3", late_fp, &[])).await;
        assert_eq!(remote_type(refused), "DirectoryFull");
        assert_eq!(b.peers().len(), 3);

        // One leaves: its entry may be forgotten, and the fourth gets in.
        // (The server learns of the close asynchronously; a fresh connection
        // per attempt, since each greets under one name.)
        clients.remove(0).close();
        loop {
            let (client, own) = stranger(&b).await;
            match client.call(HELLO, greeting("n3", own, &[])).await {
                Ok(_) => break,
                Err(error) => {
                    assert_eq!(remote_type(Err(error)), "DirectoryFull");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let names: Vec<String> = b.peers().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_are_bounded_by_the_asked_peers_own_settings() {
    bounded(async {
        // b passes no question on (max_hops 0) whatever it is asked; c,
        // linked from b, knows d.
        let b = builder("b")
            .max_hops(0)
            .listen("127.0.0.1:0")
            .await
            .unwrap();
        let c = peer("c").await;
        let d = peer("d").await;
        b.connect(addr(&c)).await.unwrap();
        c.connect(addr(&d)).await.unwrap();
        let (client, _) = stranger(&b).await;
        let question = tree!({"name": "d", "hops": (u32::MAX as i64), "path": []});
        let reply = client.call(LOOKUP, question).await.unwrap();
        assert_eq!(reply.get("found").ok(), Some(&Tree::None), "{reply:?}");

        // A path too long is refused, not cut.
        let path: Vec<String> = (0..17).map(|i| format!("p{i}")).collect();
        let question = to_tree(&lookup("d", 1, path)).unwrap();
        assert_eq!(
            remote_type(client.call(LOOKUP, question).await),
            "BadLookup"
        );

        // e passes questions on, but only to peers it has a link to: f
        // greeted it (f connected to e), e has no link to f, and f knows g.
        let e = peer("e").await;
        let f = peer("f").await;
        let g = peer("g").await;
        f.connect(addr(&e)).await.unwrap();
        f.connect(addr(&g)).await.unwrap();
        let (client, _) = stranger(&e).await;
        let question = tree!({"name": "g", "hops": 2, "path": []});
        let reply = client.call(LOOKUP, question).await.unwrap();
        assert_eq!(reply.get("found").ok(), Some(&Tree::None), "{reply:?}");
        let to_f = e.peers().into_iter().find(|p| p.name == "f").unwrap();
        assert!(!to_f.connected, "a stranger's question made e connect to f");
    })
    .await;
}

/// The arguments of `_peer.lookup`.
#[derive(Serialize)]
struct Lookup {
    name: String,
    hops: u32,
    path: Vec<String>,
}

fn lookup(name: &str, hops: u32, path: Vec<String>) -> Lookup {
    Lookup {
        name: name.into(),
        hops,
        path,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_to_a_name_do_not_both_win() {
    bounded(async {
        let b = peer("b").await;
        // The name's holder listens at a UDP socket that never answers, so
        // checking whether it is alive takes the whole liveness timeout.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let (holder, holder_fp) = stranger(&b).await;
        holder
            .call(HELLO, greeting("x", holder_fp, &[silent_addr]))
            .await
            .unwrap();
        // Two other certificates claim it at once: one may take it (the
        // holder does not answer), not both.
        let (first, first_fp) = stranger(&b).await;
        let (second, second_fp) = stranger(&b).await;
        let (one, two) = tokio::join!(
            first.call(HELLO, greeting("x", first_fp, &[silent_addr])),
            second.call(HELLO, greeting("x", second_fp, &[silent_addr])),
        );
        let won: Vec<Fingerprint> = [(one, first_fp), (two, second_fp)]
            .into_iter()
            .filter_map(|(result, fp)| match result {
                Ok(_) => Some(fp),
                Err(error) => {
                    assert_eq!(remote_type(Err(error)), "NameClash");
                    None
                }
            })
            .collect();
        assert_eq!(won.len(), 1, "both claims won");
        let x = b.peers().into_iter().find(|p| p.name == "x").unwrap();
        assert_eq!(x.fingerprint, won[0]);
        drop(silent);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_to_a_peer_found_by_name_all_succeed() {
    bounded(async {
        let b = peer("B").await;
        let a = peer("A").await;
        let c = peer("C").await;
        a.connect(addr(&b)).await.unwrap();
        c.connect(addr(&b)).await.unwrap();
        let calls: Vec<_> = (0..4).map(|_| a.call("C", "whoami", Tree::None)).collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), tree!({"name": "C"}));
        }
        assert!(a.peers().iter().any(|p| p.name == "C" && p.connected));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calling_its_own_name_is_a_clear_error() {
    bounded(async {
        let a = peer("A").await;
        let error = a.call("A", "whoami", Tree::None).await.unwrap_err();
        assert!(
            matches!(&error, PeerError::OwnName(name) if name == "A"),
            "{error}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_of_duration_max_is_no_timeout() {
    bounded(async {
        let b = peer("B").await;
        let a = peer("A").await;
        a.connect(addr(&b)).await.unwrap();
        a.set_timeout(Duration::MAX);
        let reply = a.call("B", "whoami", Tree::None).await.unwrap();
        assert_eq!(reply, tree!({"name": "B"}));
        let reply = a
            .call_with_timeout("B", "whoami", Tree::None, Duration::MAX)
            .await
            .unwrap();
        assert_eq!(reply, tree!({"name": "B"}));
    })
    .await;
}
