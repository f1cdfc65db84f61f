//! The client and the server state machines back to back on a virtual clock
//! (`teleport_protocol::sim`): handshakes, order, limits, heartbeats, dead
//! peers, deadlines wherever a call waits, draining, reconnection and
//! re-sending, tested deterministically in microseconds.

use std::time::Duration;

use proptest::prelude::*;
use teleport_protocol::client::{CallError, CallOptions, ClientConfig, ConnectError};
use teleport_protocol::server::ServerConfig;
use teleport_protocol::sim::{Observed, Pair};
use teleport_protocol::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn at(d: Duration) -> Timestamp {
    Timestamp::ZERO + d
}

fn pair() -> Pair {
    Pair::connected(ClientConfig::default(), ServerConfig::default())
}

#[test]
fn handshake_and_a_call() {
    let mut p = pair();
    assert_eq!(p.connect_results, vec![Ok(())]);
    let id = p.start("f", tree!([1, 2]), None);
    p.settle();
    assert_eq!(p.take_request(), Some((id, tree!([1, 2]))));
    assert!(p.answer(id, Ok(tree!(3))));
    p.settle();
    assert_eq!(p.result_of(id), Some(&Ok(tree!(3))));
    assert_eq!(p.client.poll_timeout(), None, "idle: no timer");
}

#[test]
fn a_bad_token_reaches_no_function_and_connect_says_why() {
    let mut client = ClientConfig::default();
    client.token = Some("wrong".into());
    let mut server = ServerConfig::default();
    server.token = Some("right".into());
    let mut p = Pair::new(client, server);
    p.connect();
    p.settle();
    assert!(p.held().is_empty());
    match &p.connect_results[..] {
        [Err(e @ ConnectError::Rejected { .. })] => {
            assert!(format!("{e}").contains("token"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn calls_are_admitted_in_the_order_made_however_their_streams_arrive() {
    let mut p = pair();
    let ids: Vec<_> = (0..10).map(|i| p.start("f", tree!(i), None)).collect();
    // Deliver the streams in a scrambled order (7, 3, 9, 0, ...).
    for pick in [7usize, 3, 9, 0, 5, 1, 8, 2, 6, 4, 0, 0, 0, 0] {
        p.deliver_to_server(pick);
    }
    p.settle();
    let admitted: Vec<RequestId> = p.admission_order().iter().map(|&(_, id)| id).collect();
    assert_eq!(admitted, ids);
}

#[test]
fn limits_hold_on_both_sides() {
    let mut client = ClientConfig::default();
    client.max_in_flight = 3;
    let mut server = ServerConfig::default();
    server.max_in_flight = 2;
    let mut p = Pair::connected(client, server);
    let ids: Vec<_> = (0..6).map(|_| p.start("f", Tree::None, None)).collect();
    assert_eq!((p.client.in_flight(), p.client.queued()), (3, 3));
    while p.deliver_to_server(0) {}
    // The third call in flight is over the server's limit.
    assert_eq!(p.held(), ids[..2]);
    p.settle();
    for &id in &ids[2..] {
        match p.result_of(id) {
            Some(Err(CallError::Remote(e))) => assert_eq!(e.kind, ErrorKind::OverLimit),
            other => panic!("{other:?}"),
        }
    }
    assert!(p.answer(ids[0], Ok(Tree::None)));
    p.settle();
    assert_eq!(p.result_of(ids[0]), Some(&Ok(Tree::None)));
    assert!(p.max_held <= 2);
}

#[test]
fn pongs_keep_a_long_call_alive() {
    let mut p = pair();
    let id = p.start("f", Tree::None, None);
    p.advance(at(secs(600)), true);
    assert!(
        p.pending().contains(&id),
        "a live server is never declared dead"
    );
    p.answer(id, Ok(Tree::None));
    p.settle();
    assert_eq!(p.result_of(id), Some(&Ok(Tree::None)));
}

#[test]
fn a_dead_server_is_detected_within_five_seconds_and_the_client_reconnects() {
    let mut p = pair();
    let id = p.start("f", Tree::None, None);
    p.settle();
    // The server dies: nothing gets through any more.
    p.network_up = false;
    p.server_up = false;
    let died = p.now;
    p.advance(died + secs(5), false);
    match p.result_of(id) {
        Some(Err(CallError::NotAlive { silent_for, .. })) => assert!(*silent_for <= secs(5)),
        other => panic!("{other:?}"),
    }
    // Back on the same port: the client finds it again.
    p.network_up = true;
    p.server_up = true;
    p.advance(p.now + secs(10), true);
    assert!(p.client.is_connected());
}

#[test]
fn a_deadline_cancels_the_call_on_the_server() {
    let mut p = pair();
    let id = p.start("f", Tree::None, Some(ms(1500)));
    p.settle();
    assert_eq!(p.held(), vec![id]);
    p.advance(at(ms(1500)), true);
    assert!(matches!(
        p.result_of(id),
        Some(Err(CallError::DeadlineExceeded { .. }))
    ));
    assert!(p.held().is_empty(), "the server dropped it");
    assert!(!p.answer(id, Ok(Tree::None)));
}

#[test]
fn the_server_expires_a_call_on_its_own_when_the_cancel_cannot_get_through() {
    let mut p = pair();
    let id = p.start("f", Tree::None, Some(secs(2)));
    p.settle();
    p.network_up = false;
    p.advance(at(secs(2)), false);
    // The server's own copy of the deadline fired too.
    assert!(p.held().is_empty());
    assert!(p.observed.contains(&Observed::Stopped { id }));
}

#[test]
fn a_call_waiting_for_its_turn_ends_at_its_deadline() {
    let mut client = ClientConfig::default();
    client.max_in_flight = 1;
    let mut p = Pair::connected(client, ServerConfig::default());
    let long = p.start("f", Tree::None, None);
    let short = p.start("f", Tree::None, Some(ms(500)));
    p.settle();
    p.advance(at(ms(500)), true);
    assert_eq!(
        p.result_of(short),
        Some(&Err(CallError::DeadlineExceeded { timeout: ms(500) }))
    );
    assert!(p.pending().contains(&long));
}

#[test]
fn graceful_shutdown_delivers_replies_before_its_goodbye() {
    let mut p = pair();
    let id = p.start("f", Tree::None, None);
    p.settle();
    p.shutdown_server(secs(5));
    // A call made during the drain is refused with ShuttingDown.
    let late = p.start("f", Tree::None, None);
    p.settle();
    match p.result_of(late) {
        Some(Err(CallError::Remote(e))) => assert_eq!(e.kind, ErrorKind::ShuttingDown),
        other => panic!("{other:?}"),
    }
    // The function returns right after the shutdown began.
    p.answer(id, Ok(tree!("result")));
    // The Goodbye and the reply race on different streams: the Goodbye first.
    p.deliver_to_client(0);
    p.settle();
    assert_eq!(p.result_of(id), Some(&Ok(tree!("result"))));
    assert!(p.server().is_none(), "closed: the client closed first");
}

#[test]
fn idempotent_calls_are_sent_again_after_a_loss_the_others_fail() {
    let mut p = pair();
    let plain = p.start("f", Tree::None, None);
    let again = p
        .start_with("f", tree!(7), CallOptions::default().idempotent(true))
        .unwrap();
    p.settle();
    p.lose_connection();
    assert!(matches!(
        p.result_of(plain),
        Some(Err(CallError::ConnectionLost { .. }))
    ));
    p.advance(p.now + secs(1), true);
    assert_eq!(p.take_request(), Some((again, tree!(7))));
    p.answer(again, Ok(tree!(8)));
    p.settle();
    assert_eq!(p.result_of(again), Some(&Ok(tree!(8))));
}

#[test]
fn a_server_that_starts_after_the_client_is_reached_within_a_second() {
    let mut client = ClientConfig::default();
    client.connect_timeout = secs(1);
    let mut p = Pair::new(client, ServerConfig::default());
    p.server_up = false;
    p.connect();
    // The first attempt's packets are lost: nobody answers.
    p.advance(at(ms(200)), false);
    p.server_up = true;
    p.advance(at(secs(1)), true);
    assert_eq!(p.connect_results, vec![Ok(())]);
}

#[test]
fn a_stuck_upload_does_not_hold_up_later_calls_forever() {
    let mut server = ServerConfig::default();
    server.call_progress_timeout = Some(secs(2));
    let mut p = Pair::connected(ClientConfig::default(), server);
    let stuck = p.start("f", Tree::None, None);
    let next = p.start("f", Tree::None, None);
    // Only the second stream gets through; the first never does.
    p.deliver_to_server(1);
    assert!(
        p.held().is_empty(),
        "admitted in order: waits for the first"
    );
    p.advance(p.now + secs(2), false);
    assert_eq!(p.held(), vec![next]);
    let _ = stuck;
}

#[derive(Debug, Clone)]
enum Event {
    Start {
        timeout_ms: Option<u16>,
        idempotent: bool,
    },
    Cancel(usize),
    Abandon(usize),
    ToServer(usize),
    ToClient(usize),
    Advance {
        ms: u16,
        deliver: bool,
    },
    Answer {
        pick: usize,
        ok: bool,
    },
    Connect,
    AnswerConnect,
    ServerShutdown {
        grace_ms: u16,
    },
    ClientClose,
    LoseConnection,
    Partition(bool),
    ServerDown(bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (proptest::option::of(0u16..3000), any::<bool>())
            .prop_map(|(timeout_ms, idempotent)| Event::Start { timeout_ms, idempotent }),
        1 => any::<usize>().prop_map(Event::Cancel),
        1 => any::<usize>().prop_map(Event::Abandon),
        5 => any::<usize>().prop_map(Event::ToServer),
        5 => any::<usize>().prop_map(Event::ToClient),
        3 => (0u16..4000, any::<bool>()).prop_map(|(ms, deliver)| Event::Advance { ms, deliver }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, ok)| Event::Answer { pick, ok }),
        1 => Just(Event::Connect),
        2 => Just(Event::AnswerConnect),
        1 => (0u16..3000).prop_map(|grace_ms| Event::ServerShutdown { grace_ms }),
        1 => Just(Event::ClientClose),
        1 => Just(Event::LoseConnection),
        1 => any::<bool>().prop_map(Event::Partition),
        1 => any::<bool>().prop_map(Event::ServerDown),
    ]
}

fn run_events(events: &[Event]) {
    let mut client = ClientConfig::default();
    client.max_in_flight = 4;
    let mut server = ServerConfig::default();
    server.max_in_flight = 3;
    let mut p = Pair::new(client, server);
    // Calls with a deadline, which must be over by then.
    let mut deadlines: Vec<(RequestId, Timestamp)> = Vec::new();
    for e in events {
        match *e {
            Event::Start {
                timeout_ms,
                idempotent,
            } => {
                let timeout = timeout_ms.map(|t| ms(u64::from(t)));
                let mut options = CallOptions::default().idempotent(idempotent);
                options.timeout = timeout;
                if let Some(id) = p.start_with("f", tree!([1, 2]), options) {
                    if let Some(t) = timeout {
                        deadlines.push((id, p.now + t));
                    }
                }
            }
            Event::Cancel(pick) | Event::Abandon(pick) => {
                let pending: Vec<_> = p.pending().iter().copied().collect();
                if !pending.is_empty() {
                    let id = pending[pick % pending.len()];
                    if matches!(e, Event::Cancel(_)) {
                        assert!(p.cancel(id));
                        assert!(matches!(p.result_of(id), Some(Err(CallError::Cancelled))));
                    } else {
                        p.abandon(id);
                    }
                }
            }
            Event::ToServer(pick) => {
                p.deliver_to_server(pick);
            }
            Event::ToClient(pick) => {
                p.deliver_to_client(pick);
            }
            Event::Advance { ms: d, deliver } => {
                let to = p.now + ms(u64::from(d));
                p.advance(to, deliver);
            }
            Event::Answer { pick, ok } => {
                let held = p.held();
                if !held.is_empty() {
                    let id = held[pick % held.len()];
                    let result = if ok {
                        Ok(tree!({"ok": true}))
                    } else {
                        Err(RemoteError::new(ErrorKind::Handler, "E", "failed"))
                    };
                    p.answer(id, result);
                }
            }
            Event::Connect => p.connect(),
            Event::AnswerConnect => {
                p.answer_connect();
            }
            Event::ServerShutdown { grace_ms } => p.shutdown_server(ms(u64::from(grace_ms))),
            Event::ClientClose => p.close_client(),
            Event::LoseConnection => p.lose_connection(),
            Event::Partition(down) => p.network_up = !down,
            Event::ServerDown(down) => p.server_up = !down,
        }
        // No call outlives its deadline, wherever it waits.
        for &(id, deadline) in &deadlines {
            if p.now > deadline {
                assert!(
                    !p.pending().contains(&id),
                    "call {id} is still pending past its deadline"
                );
            }
        }
    }
    // However the run went, every call completes once the client closes.
    p.network_up = true;
    p.advance(p.now + secs(3600), true);
    p.close_client();
    p.advance(p.now + secs(60), true);
    assert!(
        p.pending().is_empty(),
        "calls never completed: {:?}",
        p.pending()
    );
    assert_eq!(p.client.poll_timeout(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_events_keep_the_invariants(events in proptest::collection::vec(event(), 0..80)) {
        run_events(&events);
    }
}
