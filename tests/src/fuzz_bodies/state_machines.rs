//! The `state_machines` target: a client and a server state machine back to
//! back (`teleport_protocol::sim::Pair`), driven by an arbitrary sequence of
//! events, including messages and streams neither machine sent, with their
//! documented guarantees checked throughout.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use teleport_protocol::client::{CallError, CallOptions, ClientConfig};
use teleport_protocol::server::ServerConfig;
use teleport_protocol::sim::Pair;
use teleport_protocol::{
    Array, Call, ErrorKind, Goodbye, GoodbyeReason, Hello, Message, RemoteError, Reply, RequestId,
    Timestamp, Tree,
};

/// One event. Indices (`u8`) pick among what the harness knows.
#[derive(Arbitrary, Debug)]
enum Op {
    Start {
        method: u8,
        timeout_ms: Option<u16>,
        payload: u8,
        idempotent: bool,
    },
    Cancel(u8),
    Abandon(u8),
    ToServer(u8),
    ToClient(u8),
    Advance(u16),
    AdvanceToNextTimer,
    Answer {
        pick: u8,
        ok: bool,
    },
    Connect,
    AnswerConnect,
    InjectToServer(Hostile),
    InjectCallStream(Hostile),
    InjectGarbageStream(Vec<u8>),
    InjectToClient(Hostile),
    InjectOnCallStream {
        pick: u8,
        message: Hostile,
    },
    ClientClose,
    ServerShutdown {
        grace_ms: u16,
    },
    LoseConnection,
    Partition(bool),
    ServerDown(bool),
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
                method: "m0".into(),
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

fn ms(n: impl Into<u64>) -> Duration {
    Duration::from_millis(n.into())
}

fn pick<T: Copy>(items: &[T], index: u8) -> Option<T> {
    (!items.is_empty()).then(|| items[usize::from(index) % items.len()])
}

fn pair(u: &mut Unstructured<'_>) -> arbitrary::Result<Pair> {
    let mut client = ClientConfig::default();
    client.max_in_flight = usize::from(u.int_in_range(1u8..=6)?);
    client.token = u.arbitrary::<bool>()?.then(|| TOKEN.into());
    client.raise_unobserved = u.arbitrary()?;
    client.resend_lost_calls = u.arbitrary()?;
    if u.arbitrary()? {
        client.reconnect = None;
    }
    let mut server = ServerConfig::default();
    server.max_in_flight = usize::from(u.int_in_range(1u8..=6)?);
    server.token = u.arbitrary::<bool>()?.then(|| TOKEN.into());
    server.methods = Some(std::sync::Arc::new(
        (0..3).map(|m| format!("m{m}")).collect(),
    ));
    if u.arbitrary()? {
        server.call_progress_timeout = Some(ms(u.int_in_range(1u16..=5000)?));
    }
    Ok(Pair::new(client, server))
}

/// Drives a client and a server through the events the bytes describe. The
/// harness checks, after every input: every call the client accepted
/// completes exactly once; `in_flight` never exceeds `max_in_flight`, nor the
/// calls the server application holds its `max_in_flight`; calls are admitted
/// in stream order and only after authentication. This body checks too: no
/// call outlives its deadline; timers are never in the past after time
/// moved; and once the client is closed and time passes, every call has
/// completed and no timer is left.
pub fn state_machines(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut p) = pair(&mut u) else {
        return;
    };
    let mut deadlines: Vec<(RequestId, Timestamp)> = Vec::new();
    // `FUZZ_TRACE=1` prints the events, to read a crash's input.
    let trace = std::env::var_os("FUZZ_TRACE").is_some();
    for _ in 0..2000 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.arbitrary::<Op>() else { break };
        if trace {
            eprintln!("{:?} {op:?}", p.now);
        }
        step(&mut p, op, &mut deadlines);
        for &(id, deadline) in &deadlines {
            if p.now > deadline {
                assert!(
                    !p.pending().contains(&id),
                    "call {id} is still pending past its deadline"
                );
            }
        }
    }
    p.network_up = true;
    p.server_up = true;
    // Longer than any call's timeout (at most 65.5 s), the connect timeout
    // and the longest reconnection backoff together: every timer has fired.
    p.advance(p.now + Duration::from_secs(120), true);
    p.close_client();
    p.advance(p.now + Duration::from_secs(60), true);
    assert!(
        p.pending().is_empty(),
        "calls never completed: {:?}",
        p.pending()
    );
    assert_eq!(p.client.poll_timeout(), None);
    for (_, result) in &p.completed {
        if let Err(e) = result {
            // Every failure says something.
            assert!(!format!("{e}").is_empty());
        }
    }
}

fn step(p: &mut Pair, op: Op, deadlines: &mut Vec<(RequestId, Timestamp)>) {
    match op {
        Op::Start {
            method,
            timeout_ms,
            payload,
            idempotent,
        } => {
            let args = if payload % 4 == 0 {
                Tree::Array(Array::from_vec1(vec![payload; usize::from(payload % 9)]))
            } else {
                Tree::List(vec![Tree::Int(i64::from(payload)), Tree::Str("x".into())])
            };
            let mut options = CallOptions::new().idempotent(idempotent);
            options.timeout = timeout_ms.map(ms);
            let name = format!("m{}", method % 4);
            if let Some(id) = p.start_with(&name, args, options) {
                if let Some(t) = options.timeout {
                    deadlines.push((id, p.now + t));
                }
            }
        }
        Op::Cancel(i) => {
            let pending: Vec<RequestId> = p.pending().iter().copied().collect();
            if let Some(id) = pick(&pending, i) {
                assert!(p.cancel(id));
                assert_eq!(p.result_of(id), Some(&Err(CallError::Cancelled)));
            }
        }
        Op::Abandon(i) => {
            let pending: Vec<RequestId> = p.pending().iter().copied().collect();
            if let Some(id) = pick(&pending, i) {
                p.abandon(id);
            }
        }
        Op::ToServer(i) => {
            p.deliver_to_server(usize::from(i));
        }
        Op::ToClient(i) => {
            p.deliver_to_client(usize::from(i));
        }
        Op::Advance(d) => advance(p, p.now + ms(d)),
        Op::AdvanceToNextTimer => {
            let next = [
                p.client.poll_timeout(),
                p.server().and_then(|s| s.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(t) = next {
                advance(p, t.max(p.now));
            }
        }
        Op::Answer { pick: i, ok } => {
            if let Some(id) = pick(&p.held(), i) {
                let result = if ok {
                    Ok(Tree::Int(i64::from(i)))
                } else {
                    Err(RemoteError::new(ErrorKind::Handler, "E", "app error"))
                };
                p.answer(id, result);
            }
        }
        Op::Connect => p.connect(),
        Op::AnswerConnect => {
            p.answer_connect();
        }
        Op::InjectToServer(h) => p.inject_to_server(&h.message()),
        Op::InjectCallStream(h) => {
            let bytes = teleport_protocol::encode(&h.message())
                .expect("messages encode")
                .to_vec();
            p.inject_call_stream(bytes);
        }
        Op::InjectGarbageStream(bytes) => p.inject_call_stream(bytes),
        Op::InjectToClient(h) => p.inject_to_client(&h.message()),
        Op::InjectOnCallStream { pick: i, message } => {
            let pending: Vec<RequestId> = p.pending().iter().copied().collect();
            if let Some(id) = pick(&pending, i) {
                p.inject_on_call_stream(id, &message.message());
            }
        }
        Op::ClientClose => {
            p.close_client();
            assert!(p.pending().is_empty(), "closing fails every pending call");
        }
        Op::ServerShutdown { grace_ms } => p.shutdown_server(ms(grace_ms)),
        Op::LoseConnection => p.lose_connection(),
        Op::Partition(down) => p.network_up = !down,
        Op::ServerDown(down) => p.server_up = !down,
    }
}

/// Moves the clock; afterwards no timer is due in the past.
fn advance(p: &mut Pair, to: Timestamp) {
    p.advance(to, false);
    for t in [
        p.client.poll_timeout(),
        p.server().and_then(|s| s.poll_timeout()),
    ]
    .into_iter()
    .flatten()
    {
        assert!(t > p.now, "a timer at {t:?} is not after {:?}", p.now);
    }
}
