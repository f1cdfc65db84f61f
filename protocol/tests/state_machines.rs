//! A client and a server state machine wired back to back in memory, through the
//! real codec, on a virtual clock: handshakes, limits, heartbeats, dead peers and
//! deadlines, tested deterministically in microseconds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use teleport_protocol::client::{CallError, ClientConfig, ClientOutput, ClientProtocol};
use teleport_protocol::server::{ServerConfig, ServerOutput, ServerProtocol};
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

/// One direction of the connection: encoded messages in flight, and the
/// decoder at the receiving end (fed as one continuous byte stream).
struct Link {
    in_flight: VecDeque<Vec<u8>>,
    decoder: Decoder,
    /// When false, every message sent is lost.
    up: bool,
    sent: usize,
}

impl Link {
    fn new() -> Link {
        Link {
            in_flight: VecDeque::new(),
            decoder: Decoder::new(Limits::default()),
            up: true,
            sent: 0,
        }
    }

    fn send(&mut self, m: &Message) {
        self.sent += 1;
        let bytes = encode(m).expect("encodable").to_vec();
        if self.up {
            self.in_flight.push_back(bytes);
        }
    }

    /// Decodes the next message in flight, feeding it in uneven chunks.
    fn receive(&mut self) -> Option<Message> {
        let bytes = self.in_flight.pop_front()?;
        let mut got = None;
        for chunk in bytes.chunks(7) {
            let mut input = chunk;
            while !input.is_empty() {
                if let Some(m) = self.decoder.feed(&mut input).expect("valid bytes") {
                    assert!(got.is_none(), "one message per send");
                    got = Some(m);
                }
            }
        }
        assert!(self.decoder.is_at_boundary());
        got
    }
}

#[derive(Debug, Clone, PartialEq)]
enum AppEvent {
    Cancelled(RequestId),
    Expired(RequestId),
}

/// The pair harness.
struct Pair {
    now: Timestamp,
    client: ClientProtocol,
    server: ServerProtocol,
    c2s: Link,
    s2c: Link,
    /// Calls completed at the client, in order.
    completed: Vec<(RequestId, Result<Tree, CallError>)>,
    /// Requests the server application holds: id -> (method, args, deadline).
    requests: BTreeMap<RequestId, (String, Tree, Option<Timestamp>)>,
    /// Most requests the application held at once.
    max_requests: usize,
    app_events: Vec<AppEvent>,
    client_closed: bool,
    server_closed: bool,
    /// Every message the client sent, even if lost.
    client_sent: Vec<Message>,
    server_sent: Vec<Message>,
}

impl Pair {
    fn new(client: ClientConfig, server: ServerConfig) -> Pair {
        let mut pair = Pair {
            now: Timestamp::ZERO,
            client: ClientProtocol::new(client, Timestamp::ZERO),
            server: ServerProtocol::new(server),
            c2s: Link::new(),
            s2c: Link::new(),
            completed: Vec::new(),
            requests: BTreeMap::new(),
            max_requests: 0,
            app_events: Vec::new(),
            client_closed: false,
            server_closed: false,
            client_sent: Vec::new(),
            server_sent: Vec::new(),
        };
        pair.pump();
        pair
    }

    /// A pair past its handshake.
    fn connected(client: ClientConfig, server: ServerConfig) -> Pair {
        let mut pair = Pair::new(client, server);
        pair.deliver_all();
        assert!(pair.client.is_handshake_complete());
        assert!(pair.server.is_authenticated());
        pair
    }

    /// Drains both state machines' outputs into the links and the records.
    fn pump(&mut self) {
        while let Some(o) = self.client.poll_output() {
            match o {
                ClientOutput::Transmit(m) => {
                    self.c2s.send(&m);
                    self.client_sent.push(m);
                }
                ClientOutput::Completed { id, result } => self.completed.push((id, result)),
                ClientOutput::Close => {
                    assert!(!self.client_closed, "Close is emitted once");
                    self.client_closed = true;
                }
                other => panic!("unknown output {other:?}"),
            }
        }
        while let Some(o) = self.server.poll_output() {
            match o {
                ServerOutput::Transmit(m) => {
                    self.s2c.send(&m);
                    self.server_sent.push(m);
                }
                ServerOutput::Request {
                    id,
                    method,
                    args,
                    deadline,
                } => {
                    let old = self.requests.insert(id, (method, args, deadline));
                    assert!(
                        old.is_none(),
                        "request {id} handed to the application twice"
                    );
                    self.max_requests = self.max_requests.max(self.requests.len());
                }
                ServerOutput::Cancelled(id) => {
                    assert!(
                        self.requests.remove(&id).is_some(),
                        "cancelled {id} not open"
                    );
                    self.app_events.push(AppEvent::Cancelled(id));
                }
                ServerOutput::Expired(id) => {
                    assert!(self.requests.remove(&id).is_some(), "expired {id} not open");
                    self.app_events.push(AppEvent::Expired(id));
                }
                ServerOutput::Close => {
                    assert!(!self.server_closed, "Close is emitted once");
                    self.server_closed = true;
                }
                other => panic!("unknown output {other:?}"),
            }
        }
        assert_eq!(self.requests.len(), self.server.open_requests());
    }

    fn deliver_c2s(&mut self) -> bool {
        let Some(m) = self.c2s.receive() else {
            return false;
        };
        let _ = self.server.handle_message(self.now, m);
        self.pump();
        true
    }

    fn deliver_s2c(&mut self) -> bool {
        let Some(m) = self.s2c.receive() else {
            return false;
        };
        self.client.heard_from_peer(self.now);
        let _ = self.client.handle_message(self.now, m);
        self.pump();
        true
    }

    /// Delivers messages both ways, at the current time, until none is in flight.
    fn deliver_all(&mut self) {
        while self.deliver_c2s() | self.deliver_s2c() {}
    }

    fn next_timeout(&self) -> Option<Timestamp> {
        [self.client.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves the clock to `to`, firing every timer on the way at its time;
    /// with `deliver`, messages arrive as soon as they are sent.
    fn advance(&mut self, to: Timestamp, deliver: bool) {
        loop {
            if deliver {
                self.deliver_all();
            }
            match self.next_timeout() {
                Some(t) if t <= to => {
                    assert!(t >= self.now, "timer in the past: {t:?} < {:?}", self.now);
                    self.now = t;
                    self.client.handle_timeout(t);
                    self.server.handle_timeout(t);
                    self.pump();
                    // No busy loop: after handling, the next timer is later.
                    for next in [self.client.poll_timeout(), self.server.poll_timeout()] {
                        assert!(next.is_none_or(|n| n > t), "timer did not advance");
                    }
                }
                _ => break,
            }
        }
        self.now = self.now.max(to);
    }

    fn start(&mut self, method: &str, args: Tree, timeout: Option<Duration>) -> RequestId {
        let id = self
            .client
            .start_call(self.now, method, args, timeout)
            .expect("call starts");
        self.pump();
        id
    }

    fn reply(&mut self, id: RequestId, result: Result<Tree, RemoteError>) -> bool {
        let sent = self.server.reply(id, result, self.now);
        if sent {
            self.requests.remove(&id);
        }
        self.pump();
        sent
    }

    fn result_of(&self, id: RequestId) -> &Result<Tree, CallError> {
        let hits: Vec<_> = self.completed.iter().filter(|(i, _)| *i == id).collect();
        assert_eq!(hits.len(), 1, "call {id} completed {} times", hits.len());
        &hits[0].1
    }

    fn pings_sent(&self) -> usize {
        self.client_sent
            .iter()
            .filter(|m| matches!(m, Message::Ping { .. }))
            .count()
    }
}

fn client_config() -> ClientConfig {
    ClientConfig::default()
}

fn server_config() -> ServerConfig {
    ServerConfig::default()
}

#[test]
fn handshake_ok() {
    let mut client = client_config();
    client.token = Some("tok".into());
    let mut server = server_config();
    server.token = Some("tok".into());
    let mut p = Pair::connected(client, server);
    assert!(p.client.peer_agent().unwrap().contains("server"));
    assert!(p.server.peer_agent().unwrap().contains("client"));
    let id = p.start("echo", tree!({"x": 1}), None);
    p.deliver_all();
    assert_eq!(p.requests[&id].0, "echo");
}

#[test]
fn bad_token_reaches_no_handler_and_fails_pipelined_calls() {
    let mut client = client_config();
    client.token = Some("wrong".into());
    let mut server = server_config();
    server.token = Some("right".into());
    let mut p = Pair::new(client, server);
    // Sent right behind the Hello, before the server answered.
    let a = p.start("secret_method", tree!([1]), None);
    p.deliver_all();
    assert_eq!(p.max_requests, 0, "no call reached the application");
    assert!(p.server_closed && p.client_closed);
    let err = p.result_of(a).clone().unwrap_err();
    match &err {
        CallError::ServerClosed { reason, .. } => {
            assert_eq!(*reason, GoodbyeReason::Unauthenticated)
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("token"), "{err}");
    assert!(p
        .client
        .start_call(p.now, "f", Tree::None, None)
        .unwrap_err()
        .is_closed());
}

#[test]
fn call_before_hello_is_refused() {
    let mut p = Pair::new(client_config(), server_config());
    // A hostile client skips the Hello: lose it, then send a call.
    p.c2s.in_flight.clear();
    let call = Message::Call(Call {
        request_id: 1,
        method: "f".into(),
        timeout: None,
        args: Tree::None,
    });
    p.c2s.send(&call);
    p.deliver_all();
    assert_eq!(p.max_requests, 0);
    assert!(p.server_closed);
    assert!(matches!(
        p.server_sent.as_slice(),
        [Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Unauthenticated,
            ..
        })]
    ));
}

#[test]
fn calls_complete_out_of_order() {
    let mut p = Pair::connected(client_config(), server_config());
    let ids: Vec<_> = (0..3).map(|i| p.start("f", tree!(i), None)).collect();
    p.deliver_all();
    for &i in &[2usize, 0, 1] {
        let args = p.requests[&ids[i]].1.clone();
        assert!(p.reply(ids[i], Ok(tree!({"echo": (args)}))));
        p.deliver_all();
    }
    let order: Vec<_> = p.completed.iter().map(|(id, _)| *id).collect();
    assert_eq!(order, vec![ids[2], ids[0], ids[1]]);
    for (i, &id) in ids.iter().enumerate() {
        let got = p.result_of(id).clone().unwrap();
        assert_eq!(got, tree!({"echo": (i as i64)}));
    }
    assert_eq!(p.client.in_flight(), 0);
}

#[test]
fn in_flight_limit_on_both_sides() {
    let mut client = client_config();
    client.max_in_flight = 3;
    let mut server = server_config();
    server.max_in_flight = 2;
    let mut p = Pair::connected(client, server);
    let ids: Vec<_> = (0..3).map(|_| p.start("f", Tree::None, None)).collect();
    let err = p
        .client
        .start_call(p.now, "f", Tree::None, None)
        .unwrap_err();
    assert!(err.is_at_capacity());
    p.deliver_all();
    // The server took two; the third was refused before the application.
    assert_eq!(p.max_requests, 2);
    match p.result_of(ids[2]) {
        Err(CallError::Remote(e)) => assert_eq!(e.kind, ErrorKind::OverLimit),
        other => panic!("{other:?}"),
    }
    assert!(p.client.can_start());
    assert!(p.reply(ids[0], Ok(Tree::None)));
    let d = p.start("f", Tree::None, None);
    p.deliver_all();
    assert!(p.requests.contains_key(&d));
    assert_eq!(p.max_requests, 2);
}

#[test]
fn pongs_keep_a_long_call_alive() {
    // ping every 5 s, dead after 30 s of silence.
    let mut p = Pair::connected(client_config(), server_config());
    let id = p.start("slow", Tree::None, None);
    p.advance(at(secs(4)), true);
    assert_eq!(p.pings_sent(), 0, "no ping before ping_interval");
    p.advance(at(secs(5)), true);
    assert_eq!(p.pings_sent(), 1, "ping after ping_interval of silence");
    // The server answers every ping, so the call outlives max_age many times over.
    p.advance(at(secs(300)), true);
    assert!(p.client.is_pending(id));
    assert_eq!(p.pings_sent(), 60);
    let pongs = p
        .server_sent
        .iter()
        .filter(|m| matches!(m, Message::Pong { .. }))
        .count();
    assert_eq!(pongs, 60);
    assert!(p.reply(id, Ok(tree!("done"))));
    p.deliver_all();
    assert_eq!(p.result_of(id), &Ok(tree!("done")));
    // Idle again: no more pings.
    let before = p.pings_sent();
    p.advance(at(secs(1000)), true);
    assert_eq!(p.pings_sent(), before);
}

#[test]
fn dead_server_is_detected_at_max_age() {
    let mut p = Pair::connected(client_config(), server_config());
    p.advance(at(secs(100)), true);
    // The network goes silent both ways.
    p.c2s.up = false;
    p.s2c.up = false;
    let ids: Vec<_> = (0..3).map(|_| p.start("f", Tree::None, None)).collect();
    p.advance(at(secs(129)), true);
    assert!(p.completed.is_empty());
    assert_eq!(p.pings_sent(), 5, "at 105, 110, ..., 125");
    p.advance(at(secs(200)), true);
    assert_eq!(p.completed.len(), 3);
    for id in ids {
        match p.result_of(id) {
            Err(
                e @ CallError::NotAlive {
                    silent_for,
                    max_age,
                },
            ) => {
                assert_eq!(*silent_for, secs(30));
                assert_eq!(*max_age, secs(30));
                assert!(e.to_string().contains("30s"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(p.client_closed);
    assert_eq!(p.client.poll_timeout(), None);
    let err = p
        .client
        .start_call(p.now, "f", Tree::None, None)
        .unwrap_err();
    assert!(err.is_closed());
}

#[test]
fn deadline_cancel_reaches_the_server_which_drops_the_late_reply() {
    let mut p = Pair::connected(client_config(), server_config());
    let id = p.start("slow", Tree::None, Some(ms(2000)));
    // The call takes 500 ms to arrive, so the server's deadline is later than
    // the client's.
    p.advance(at(ms(500)), false);
    p.deliver_all();
    assert_eq!(p.requests[&id].2, Some(at(ms(2500))));
    p.advance(at(ms(2000)), true);
    match p.result_of(id) {
        Err(CallError::DeadlineExceeded { timeout }) => assert_eq!(*timeout, ms(2000)),
        other => panic!("{other:?}"),
    }
    assert!(p.client_sent.contains(&Message::Cancel { request_id: id }));
    assert_eq!(p.app_events, vec![AppEvent::Cancelled(id)]);
    // The handler finishes late: its reply goes nowhere.
    let before = p.server_sent.len();
    assert!(!p.reply(id, Ok(Tree::None)));
    assert_eq!(p.server_sent.len(), before);
    assert_eq!(p.server.poll_timeout(), None);
}

#[test]
fn deadline_expires_on_the_server_when_the_cancel_is_lost() {
    let mut p = Pair::connected(client_config(), server_config());
    let id = p.start("slow", Tree::None, Some(ms(2000)));
    p.deliver_all();
    p.c2s.up = false;
    p.advance(at(ms(2000)), true);
    assert!(p.result_of(id).as_ref().unwrap_err().is_deadline_exceeded());
    assert_eq!(p.app_events, vec![AppEvent::Expired(id)]);
    assert!(!p.reply(id, Ok(Tree::None)));
    // A reply that crossed the cancel would have been ignored by the client too.
    let late = Message::Reply(Reply {
        request_id: id,
        result: Ok(Tree::None),
    });
    let err = p.client.handle_message(p.now, late).unwrap_err();
    assert!(!err.is_fatal());
    p.pump();
    assert_eq!(p.completed.len(), 1);
}

#[test]
fn idle_client_emits_nothing_and_has_no_timeout() {
    let mut p = Pair::connected(client_config(), server_config());
    let (c, s) = (p.c2s.sent, p.s2c.sent);
    assert_eq!(p.client.poll_timeout(), None);
    assert_eq!(p.server.poll_timeout(), None);
    p.advance(at(secs(3600)), true);
    assert_eq!((p.c2s.sent, p.s2c.sent), (c, s));
    // The first call after an idle hour is not declared dead.
    let id = p.start("f", Tree::None, None);
    p.deliver_all();
    p.advance(at(secs(3610)), true);
    assert!(p.client.is_pending(id));
}

#[test]
fn graceful_shutdown_drains_then_closes() {
    let mut p = Pair::connected(client_config(), server_config());
    let a = p.start("f", Tree::None, None);
    p.deliver_all();
    p.server.begin_shutdown();
    let b = p.start("f", Tree::None, None);
    p.deliver_all();
    match p.result_of(b) {
        Err(CallError::Remote(e)) => assert_eq!(e.kind, ErrorKind::ShuttingDown),
        other => panic!("{other:?}"),
    }
    assert!(!p.server.is_drained());
    assert!(p.reply(a, Ok(tree!(1))));
    assert!(p.server.is_drained());
    p.server.close(p.now);
    p.pump();
    p.deliver_all();
    assert_eq!(p.result_of(a), &Ok(tree!(1)));
    assert!(p.server_closed && p.client_closed);
    match p.client.close_cause() {
        Some(CallError::ServerClosed { reason, .. }) => {
            assert_eq!(*reason, GoodbyeReason::ShuttingDown)
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Random event sequences.

#[derive(Clone, Debug)]
enum Event {
    Start { timeout_ms: Option<u16> },
    Cancel(usize),
    DeliverToServer,
    DeliverToClient,
    DropToServer,
    DropToClient,
    Advance { ms: u16, deliver: bool },
    Reply { pick: usize, ok: bool },
    ServerPing,
    ClientClose,
    ServerShutdown,
    ConnectionLost,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => proptest::option::of(0u16..3000).prop_map(|timeout_ms| Event::Start { timeout_ms }),
        1 => any::<usize>().prop_map(Event::Cancel),
        4 => Just(Event::DeliverToServer),
        4 => Just(Event::DeliverToClient),
        1 => Just(Event::DropToServer),
        1 => Just(Event::DropToClient),
        3 => (0u16..4000, any::<bool>()).prop_map(|(ms, deliver)| Event::Advance { ms, deliver }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, ok)| Event::Reply { pick, ok }),
        1 => Just(Event::ServerPing),
        1 => Just(Event::ServerShutdown),
        1 => Just(Event::ClientClose),
        1 => Just(Event::ConnectionLost),
    ]
}

const CLIENT_LIMIT: usize = 4;
const SERVER_LIMIT: usize = 3;

fn run_events(events: &[Event]) {
    let mut client = client_config();
    client.max_in_flight = CLIENT_LIMIT;
    client.ping_interval = Some(ms(1000));
    client.max_age = Some(ms(5000));
    let mut server = server_config();
    server.max_in_flight = SERVER_LIMIT;
    let mut p = Pair::new(client, server);

    // The model: calls started and not yet completed.
    let mut open: BTreeSet<RequestId> = BTreeSet::new();
    let mut seen = 0;
    let mut check = |p: &Pair, open: &mut BTreeSet<RequestId>| {
        for (id, _) in &p.completed[seen..] {
            assert!(
                open.remove(id),
                "call {id} completed twice or never started"
            );
        }
        seen = p.completed.len();
        assert_eq!(open.len(), p.client.in_flight());
        assert!(p.client.in_flight() <= CLIENT_LIMIT);
        assert!(p.requests.len() <= SERVER_LIMIT);
        assert!(p.max_requests <= SERVER_LIMIT);
    };

    for e in events {
        match *e {
            Event::Start { timeout_ms } => {
                let timeout = timeout_ms.map(|t| ms(u64::from(t)));
                let can = p.client.can_start();
                match p.client.start_call(p.now, "f", tree!([1, 2]), timeout) {
                    Ok(id) => {
                        assert!(can);
                        assert!(open.insert(id), "id {id} reused while open");
                    }
                    Err(err) => {
                        assert!(!can);
                        assert!(err.is_at_capacity() || err.is_closed());
                    }
                }
                p.pump();
            }
            Event::Cancel(pick) => {
                if !open.is_empty() {
                    let id = *open.iter().nth(pick % open.len()).unwrap();
                    assert!(p.client.cancel(id, p.now));
                    p.pump();
                }
            }
            Event::DeliverToServer => {
                p.deliver_c2s();
            }
            Event::DeliverToClient => {
                p.deliver_s2c();
            }
            Event::DropToServer => {
                p.c2s.in_flight.pop_front();
            }
            Event::DropToClient => {
                p.s2c.in_flight.pop_front();
            }
            Event::Advance { ms: d, deliver } => {
                let to = p.now + ms(u64::from(d));
                p.advance(to, deliver);
            }
            Event::Reply { pick, ok } => {
                if !p.requests.is_empty() {
                    let id = *p.requests.keys().nth(pick % p.requests.len()).unwrap();
                    let result = if ok {
                        Ok(tree!({"ok": true}))
                    } else {
                        Err(RemoteError::new(ErrorKind::Handler, "E", "failed"))
                    };
                    p.reply(id, result);
                }
            }
            Event::ServerPing => {
                p.s2c.send(&Message::Ping { nonce: 5 });
            }
            Event::ServerShutdown => {
                p.server.begin_shutdown();
                if p.server.is_drained() {
                    p.server.close(p.now);
                }
                p.pump();
            }
            Event::ClientClose => {
                p.client.close(p.now);
                p.pump();
            }
            Event::ConnectionLost => {
                let lost = p.client.connection_lost("test");
                assert_eq!(lost.len(), open.len());
                p.server.connection_lost();
                p.pump();
            }
        }
        check(&p, &mut open);
    }

    // However the run went, every call completes once the connection ends.
    p.advance(p.now + secs(3600), true);
    check(&p, &mut open);
    p.client.close(p.now);
    p.pump();
    check(&p, &mut open);
    assert!(open.is_empty(), "calls never completed: {open:?}");
    assert!(p.client_closed);
    assert_eq!(p.client.poll_timeout(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_events_keep_the_invariants(events in proptest::collection::vec(event(), 0..80)) {
        run_events(&events);
    }
}
