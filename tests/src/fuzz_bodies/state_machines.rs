//! The `state_machines` target: a client and a server state machine driven by
//! an arbitrary sequence of events, with their documented guarantees checked
//! after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use arbitrary::{Arbitrary, Result, Unstructured};
use teleport_protocol::client::{ClientConfig, ClientOutput, ClientProtocol, StartCallError};
use teleport_protocol::server::{ServerConfig, ServerOutput, ServerProtocol};
use teleport_protocol::{
    decode_message, encode, Array, Call, ErrorKind, Goodbye, GoodbyeReason, Hello, Limits, Message,
    RemoteError, Reply, RequestId, Timestamp, Tree,
};

use super::util::same_message;

/// One event. Indices (`u8`) pick among the ids the harness knows, or name an
/// id nobody uses.
#[derive(Arbitrary, Debug)]
enum Op {
    Start {
        method: u8,
        timeout_ms: Option<u16>,
        payload: u8,
    },
    Cancel(u8),
    ReplyFailed(u8),
    Advance(u16),
    AdvanceToClientTimer,
    AdvanceToServerTimer,
    ClientTimeout,
    ServerTimeout,
    DeliverToServer,
    DeliverToClient,
    DropToServer,
    DropToClient,
    SwapToServer,
    SwapToClient,
    AppReply {
        pick: u8,
        ok: bool,
    },
    InjectToServer(Hostile),
    InjectToClient(Hostile),
    HeardFromServer,
    ClientClose,
    ServerClose,
    ServerShutdown,
    ClientLost,
    ServerLost,
    ClientViolation,
    ServerViolation,
}

/// A message neither state machine sent: what a buggy or hostile peer might.
#[derive(Arbitrary, Debug)]
enum Hostile {
    Hello { token: u8 },
    Call { id: u8, timeout_us: Option<u64> },
    Reply { id: u8, ok: bool },
    Ping(u64),
    Pong(u64),
    Cancel(u8),
    Goodbye(u8),
}

const TOKEN: &str = "secret";

fn id_of(b: u8) -> RequestId {
    match b {
        255 => u64::MAX,
        254 => 0,
        b => u64::from(b % 16),
    }
}

impl Hostile {
    fn message(self) -> Message {
        match self {
            Hostile::Hello { token } => Message::Hello(Hello {
                agent: "hostile".into(),
                token: match token % 3 {
                    0 => None,
                    1 => Some(TOKEN.into()),
                    _ => Some("wrong".into()),
                },
            }),
            Hostile::Call { id, timeout_us } => Message::Call(Call {
                request_id: id_of(id),
                method: "m".into(),
                timeout: timeout_us.map(Duration::from_micros),
                args: Tree::Int(1),
            }),
            Hostile::Reply { id, ok } => Message::Reply(Reply {
                request_id: id_of(id),
                result: if ok {
                    Ok(Tree::None)
                } else {
                    Err(RemoteError::new(ErrorKind::Handler, "E", "injected"))
                },
            }),
            Hostile::Ping(nonce) => Message::Ping { nonce },
            Hostile::Pong(nonce) => Message::Pong { nonce },
            Hostile::Cancel(id) => Message::Cancel {
                request_id: id_of(id),
            },
            Hostile::Goodbye(r) => Message::Goodbye(Goodbye {
                reason: GoodbyeReason::from_code(r),
                message: "injected".into(),
            }),
        }
    }
}

/// Sends a message over the "wire": encodes and decodes it, as a transport would.
fn wire(m: Message) -> Message {
    let bytes = encode(&m).expect("messages encode").to_vec();
    let back = decode_message(&bytes, &Limits::default()).expect("encoded messages decode");
    assert!(same_message(&m, &back));
    back
}

fn ms(n: impl Into<u64>) -> Duration {
    Duration::from_millis(n.into())
}

struct Harness {
    now: Timestamp,
    client: ClientProtocol,
    server: ServerProtocol,
    c2s: VecDeque<Message>,
    s2c: VecDeque<Message>,
    client_max: usize,
    server_max: usize,
    /// Calls the client accepted and has not completed.
    outstanding: BTreeSet<RequestId>,
    /// Every id the client ever returned.
    started: Vec<RequestId>,
    /// Requests the server handed to the application and did not end, with
    /// their deadlines.
    server_open: BTreeMap<RequestId, Option<Timestamp>>,
    client_close_seen: bool,
    server_close_seen: bool,
}

impl Harness {
    fn new(u: &mut Unstructured<'_>) -> Result<Harness> {
        let mut cc = ClientConfig::default();
        cc.max_in_flight = u.int_in_range(0..=4)?;
        cc.ping_interval = if u.arbitrary()? {
            Some(ms(u.int_in_range(0..=2000u16)?))
        } else {
            None
        };
        cc.max_age = if u.arbitrary()? {
            Some(ms(u.int_in_range(0..=5000u16)?))
        } else {
            None
        };
        cc.default_timeout = if u.arbitrary()? {
            Some(ms(u.int_in_range(0..=3000u16)?))
        } else {
            None
        };
        cc.keep_calls = u.arbitrary()?;
        let mut sc = ServerConfig::default();
        sc.max_in_flight = u.int_in_range(0..=4)?;
        if u.arbitrary()? {
            sc.token = Some(TOKEN.into());
        }
        cc.token = match u.int_in_range(0..=3u8)? {
            0 => None,
            1 => Some("wrong".into()),
            _ => Some(TOKEN.into()),
        };
        let now = Timestamp::ZERO;
        let client = ClientProtocol::new(cc, now);
        let server = ServerProtocol::new(sc);
        let mut h = Harness {
            now,
            client_max: client.config().max_in_flight,
            server_max: server.config().max_in_flight,
            client,
            server,
            c2s: VecDeque::new(),
            s2c: VecDeque::new(),
            outstanding: BTreeSet::new(),
            started: Vec::new(),
            server_open: BTreeMap::new(),
            client_close_seen: false,
            server_close_seen: false,
        };
        assert!(h.client_max >= 1 && h.server_max >= 1);
        h.drain_client();
        Ok(h)
    }

    fn pick_client_id(&self, b: u8) -> RequestId {
        if self.started.is_empty() || b >= 200 {
            id_of(b)
        } else {
            self.started[usize::from(b) % self.started.len()]
        }
    }

    fn drain_client(&mut self) {
        while let Some(out) = self.client.poll_output() {
            assert!(
                !self.client_close_seen,
                "client output after Close: {out:?}"
            );
            match out {
                ClientOutput::Transmit(m) => self.c2s.push_back(wire(m)),
                ClientOutput::Completed { id, .. } => {
                    assert!(
                        self.outstanding.remove(&id),
                        "call {id} completed twice or never started"
                    );
                }
                ClientOutput::Close => self.client_close_seen = true,
                other => panic!("unknown client output {other:?}"),
            }
        }
        assert_eq!(self.client.in_flight(), self.outstanding.len());
        assert!(self.client.in_flight() <= self.client_max);
        if self.client.is_closed() {
            assert!(self.outstanding.is_empty(), "closed client with open calls");
            assert!(self.client_close_seen);
            assert_eq!(self.client.poll_timeout(), None);
        }
    }

    /// `may_request`: whether this input may hand requests to the application
    /// (only while the client is authenticated).
    fn drain_server(&mut self, may_request: bool) {
        while let Some(out) = self.server.poll_output() {
            assert!(
                !self.server_close_seen,
                "server output after Close: {out:?}"
            );
            match out {
                ServerOutput::Transmit(m) => self.s2c.push_back(wire(m)),
                ServerOutput::Request { id, deadline, .. } => {
                    assert!(may_request, "request {id} before authentication");
                    assert!(
                        self.server_open.len() < self.server_max,
                        "more than max_in_flight requests"
                    );
                    assert!(
                        self.server_open.insert(id, deadline).is_none(),
                        "request {id} handed out twice"
                    );
                }
                ServerOutput::Cancelled(id) => {
                    assert!(self.server_open.remove(&id).is_some(), "{id} ended twice");
                }
                ServerOutput::Expired(id) => {
                    let deadline = self.server_open.remove(&id);
                    let deadline = deadline
                        .expect("expired a request not open")
                        .expect("expired a request without deadline");
                    assert!(deadline <= self.now);
                }
                ServerOutput::Close => self.server_close_seen = true,
                other => panic!("unknown server output {other:?}"),
            }
        }
        assert_eq!(self.server.open_requests(), self.server_open.len());
        assert!(self.server.open_requests() <= self.server_max);
        if self.server.is_closed() {
            assert!(
                self.server_open.is_empty(),
                "closed server with open requests"
            );
            assert!(self.server_close_seen);
        }
    }

    fn deliver_to_server(&mut self, m: Message) {
        let authenticated = self.server.is_authenticated();
        let _ = self.server.handle_message(self.now, m);
        self.drain_server(authenticated);
    }

    fn deliver_to_client(&mut self, m: Message) {
        let _ = self.client.handle_message(self.now, m);
        self.drain_client();
    }

    fn client_timer(&mut self) {
        self.client.handle_timeout(self.now);
        self.drain_client();
        if let Some(t) = self.client.poll_timeout() {
            assert!(
                t > self.now,
                "client timer at {t:?} is not after {:?}",
                self.now
            );
        }
    }

    fn server_timer(&mut self) {
        self.server.handle_timeout(self.now);
        self.drain_server(false);
        if let Some(t) = self.server.poll_timeout() {
            assert!(
                t > self.now,
                "server timer at {t:?} is not after {:?}",
                self.now
            );
        }
    }

    fn step(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Start {
                method,
                timeout_ms,
                payload,
            } => {
                let args = if payload % 4 == 0 {
                    Tree::Array(Array::from_vec1(vec![payload; usize::from(payload % 9)]))
                } else {
                    Tree::List(vec![Tree::Int(i64::from(payload)), Tree::Str("x".into())])
                };
                let timeout = timeout_ms.map(ms);
                let was_closed = self.client.is_closed();
                match self
                    .client
                    .start_call(now, format!("m{}", method % 4), args, timeout)
                {
                    Ok(id) => {
                        assert!(!was_closed);
                        assert!(self.outstanding.len() < self.client_max);
                        assert!(self.outstanding.insert(id), "id {id} reused while open");
                        self.started.push(id);
                    }
                    Err(StartCallError::AtCapacity { max_in_flight }) => {
                        assert_eq!(max_in_flight, self.client_max);
                        assert_eq!(self.outstanding.len(), self.client_max);
                        assert!(!was_closed);
                    }
                    Err(StartCallError::Closed { .. }) => assert!(was_closed),
                    Err(e) => panic!("unknown start error {e:?}"),
                }
                self.drain_client();
            }
            Op::Cancel(b) => {
                let id = self.pick_client_id(b);
                let pending = self.outstanding.contains(&id);
                assert_eq!(self.client.is_pending(id), pending);
                assert_eq!(self.client.cancel(id, now), pending);
                self.drain_client();
                assert!(!self.outstanding.contains(&id));
            }
            Op::ReplyFailed(b) => {
                let id = self.pick_client_id(b);
                let pending = self.outstanding.contains(&id);
                assert_eq!(self.client.reply_failed(id, now, "fuzz"), pending);
                self.drain_client();
                assert!(!self.outstanding.contains(&id));
            }
            Op::Advance(n) => self.now = now + ms(n),
            Op::AdvanceToClientTimer => {
                if let Some(t) = self.client.poll_timeout() {
                    self.now = now.max(t);
                }
                self.client_timer();
            }
            Op::AdvanceToServerTimer => {
                if let Some(t) = self.server.poll_timeout() {
                    self.now = now.max(t);
                }
                self.server_timer();
            }
            Op::ClientTimeout => self.client_timer(),
            Op::ServerTimeout => self.server_timer(),
            Op::DeliverToServer => {
                if let Some(m) = self.c2s.pop_front() {
                    self.deliver_to_server(m);
                }
            }
            Op::DeliverToClient => {
                if let Some(m) = self.s2c.pop_front() {
                    self.deliver_to_client(m);
                }
            }
            Op::DropToServer => drop(self.c2s.pop_front()),
            Op::DropToClient => drop(self.s2c.pop_front()),
            Op::SwapToServer => {
                if self.c2s.len() >= 2 {
                    self.c2s.swap(0, 1);
                }
            }
            Op::SwapToClient => {
                if self.s2c.len() >= 2 {
                    self.s2c.swap(0, 1);
                }
            }
            Op::AppReply { pick, ok } => {
                let id = if self.server_open.is_empty() || pick >= 200 {
                    id_of(pick)
                } else {
                    *self
                        .server_open
                        .keys()
                        .nth(usize::from(pick) % self.server_open.len())
                        .expect("in range")
                };
                let open = self.server_open.remove(&id);
                assert_eq!(self.server.is_open(id), open.is_some());
                let result = if ok {
                    Ok(Tree::Int(i64::from(pick)))
                } else {
                    Err(RemoteError::new(ErrorKind::Handler, "E", "app error"))
                };
                let sent = self.server.reply(id, result, now);
                match open {
                    None => assert!(!sent, "reply to {id}, which is not open, was sent"),
                    Some(deadline) => {
                        let expired = deadline.is_some_and(|d| d <= now);
                        assert_eq!(sent, !expired, "reply to open request {id}");
                    }
                }
                self.drain_server(false);
                assert!(!self.server.is_open(id));
            }
            Op::InjectToServer(h) => self.deliver_to_server(wire(h.message())),
            Op::InjectToClient(h) => self.deliver_to_client(wire(h.message())),
            Op::HeardFromServer => {
                self.client.heard_from_peer(now);
                self.drain_client();
            }
            Op::ClientClose => {
                self.client.close(now);
                self.drain_client();
                assert!(self.client.is_closed());
            }
            Op::ServerClose => {
                self.server.close(now);
                self.drain_server(false);
                assert!(self.server.is_closed());
            }
            Op::ServerShutdown => {
                self.server.begin_shutdown();
                self.drain_server(false);
                assert!(self.server.is_shutting_down());
            }
            Op::ClientLost => self.client_lost(),
            Op::ServerLost => {
                self.server.connection_lost();
                self.drain_server(false);
                assert!(self.server.is_closed());
            }
            Op::ClientViolation => {
                self.client.protocol_violation(now, "fuzz");
                self.drain_client();
                assert!(self.client.is_closed());
            }
            Op::ServerViolation => {
                self.server.protocol_violation(now, "fuzz");
                self.drain_server(false);
                assert!(self.server.is_closed());
            }
        }
    }

    fn client_lost(&mut self) {
        let was_closed = self.client.is_closed();
        let lost = self.client.connection_lost("fuzz");
        if was_closed {
            assert!(lost.is_empty());
        } else {
            let ids: BTreeSet<RequestId> = lost.iter().map(|l| l.id).collect();
            assert_eq!(ids, self.outstanding, "lost calls are the pending ones");
            let keep = self.client.config().keep_calls;
            assert!(lost.iter().all(|l| l.call.is_some() == keep));
        }
        self.drain_client();
        assert!(self.client.is_closed());
    }
}

/// Drives a client and a server through the events the bytes describe. Checks,
/// after every step: every call the client accepted completes exactly once (and
/// all have completed once it is closed); `in_flight` never exceeds
/// `max_in_flight`, nor the server's open requests its `max_in_flight`; every
/// server request ends exactly once, by a reply (refused only past its
/// deadline), a cancel or an expiry; no request reaches the application before
/// authentication; `Close` is the last output; timers are never in the past
/// after `handle_timeout`.
pub fn state_machines(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut h) = Harness::new(&mut u) else {
        return;
    };
    for _ in 0..2000 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.arbitrary::<Op>() else { break };
        h.step(op);
    }
    // The end of the connection: everything completes.
    h.client_lost();
    h.server.connection_lost();
    h.drain_server(false);
    assert!(h.outstanding.is_empty());
    assert!(h.server_open.is_empty());
    assert!(h.client_close_seen && h.server_close_seen);
}
