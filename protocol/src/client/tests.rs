use super::*;
use crate::{tree, ErrorKind, RemoteError};
use alloc::vec;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn at(n: u64) -> Timestamp {
    Timestamp::ZERO + secs(n)
}

fn at_ms(n: u64) -> Timestamp {
    Timestamp::ZERO + ms(n)
}

fn drain(c: &mut ClientProtocol) -> Vec<ClientOutput> {
    let mut v = Vec::new();
    while let Some(o) = c.poll_output() {
        v.push(o);
    }
    v
}

fn server_hello() -> Message {
    Message::Hello(Hello {
        agent: "srv".into(),
        token: None,
    })
}

fn connect_outputs(out: &[ClientOutput]) -> Vec<ConnId> {
    out.iter()
        .filter_map(|o| match o {
            ClientOutput::Connect { conn } => Some(*conn),
            _ => None,
        })
        .collect()
}

fn sent(out: &[ClientOutput]) -> Vec<RequestId> {
    out.iter()
        .filter_map(|o| match o {
            ClientOutput::Send { call, .. } => Some(call.request_id),
            _ => None,
        })
        .collect()
}

fn transmitted(out: &[ClientOutput]) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            ClientOutput::Transmit { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn completed(out: &[ClientOutput]) -> Vec<(RequestId, Result<Tree, CallError>)> {
    out.iter()
        .filter_map(|o| match o {
            ClientOutput::Completed { id, result, .. } => Some((*id, result.clone())),
            _ => None,
        })
        .collect()
}

fn closes(out: &[ClientOutput]) -> Vec<ConnId> {
    out.iter()
        .filter_map(|o| match o {
            ClientOutput::CloseConnection { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

fn connect_result(out: &[ClientOutput]) -> Option<Result<(), ConnectError>> {
    out.iter().find_map(|o| match o {
        ClientOutput::ConnectResult(r) => Some(r.clone()),
        _ => None,
    })
}

/// Takes the client from its `Connect` through the handshake at `now`.
fn establish(c: &mut ClientProtocol, now: Timestamp) -> (ConnId, Vec<ClientOutput>) {
    let out = drain(c);
    let conn = *connect_outputs(&out).last().expect("a Connect");
    c.connected(now, conn);
    let hello = drain(c);
    assert!(
        matches!(&transmitted(&hello)[..], [Message::Hello(_)]),
        "{hello:?}"
    );
    c.handle_message(now, conn, server_hello()).unwrap();
    (conn, drain(c))
}

/// A client connected at time 0.
fn client(config: ClientConfig) -> (ClientProtocol, ConnId) {
    let mut c = ClientProtocol::new(at(0), config);
    c.connect(at(0));
    let (conn, out) = establish(&mut c, at(0));
    assert_eq!(connect_result(&out), Some(Ok(())));
    (c, conn)
}

fn start(c: &mut ClientProtocol, now: Timestamp, timeout: Option<Duration>) -> RequestId {
    let options = CallOptions {
        timeout,
        idempotent: None,
    };
    c.start_call(now, "f", Tree::None, options).unwrap()
}

fn reply(id: RequestId, result: Result<Tree, RemoteError>) -> Reply {
    Reply {
        request_id: id,
        result,
    }
}

#[test]
fn the_first_call_connects_and_goes_out_after_the_handshake() {
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    assert_eq!(c.poll_timeout(), None, "idle until asked");
    let id = start(&mut c, at(0), None);
    let (conn, out) = establish(&mut c, at_ms(3));
    assert_eq!(sent(&out), vec![id]);
    assert!(c.is_connected());
    assert_eq!(c.peer_agent(), Some("srv"));
    c.reply_received(at_ms(5), conn, id, reply(id, Ok(tree!(3))));
    assert_eq!(completed(&drain(&mut c)), vec![(id, Ok(tree!(3)))]);
    assert_eq!(c.poll_timeout(), None, "nothing pending: no timer");
}

#[test]
fn hello_carries_agent_and_token() {
    let config = ClientConfig {
        token: Some("t0k".into()),
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    c.connect(at(0));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connected(at(0), conn);
    match &transmitted(&drain(&mut c))[..] {
        [Message::Hello(h)] => {
            assert_eq!(h.agent, DEFAULT_AGENT);
            assert_eq!(h.token.as_deref(), Some("t0k"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{c:?}").contains("t0k"));
}

#[test]
fn calls_wait_for_a_slot_and_go_out_in_the_order_they_were_made() {
    let config = ClientConfig {
        max_in_flight: 2,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let ids: Vec<_> = (0..5).map(|_| start(&mut c, at(0), None)).collect();
    assert_eq!(sent(&drain(&mut c)), ids[..2]);
    assert_eq!((c.in_flight(), c.queued()), (2, 3));
    c.reply_received(at(1), conn, ids[1], reply(ids[1], Ok(Tree::None)));
    assert_eq!(sent(&drain(&mut c)), ids[2..3]);
    c.reply_received(at(1), conn, ids[0], reply(ids[0], Ok(Tree::None)));
    assert_eq!(sent(&drain(&mut c)), ids[3..4]);
}

#[test]
fn a_call_waiting_for_a_slot_ends_at_its_own_deadline() {
    let config = ClientConfig {
        max_in_flight: 1,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let long = start(&mut c, at(0), None);
    let waiting = start(&mut c, at(0), Some(ms(500)));
    assert_eq!(sent(&drain(&mut c)), vec![long]);
    // Pongs keep the long call's server alive meanwhile.
    c.heard_from_peer(at_ms(400), conn);
    assert_eq!(c.poll_timeout(), Some(at_ms(500)));
    c.handle_timeout(at_ms(500));
    let out = drain(&mut c);
    assert_eq!(
        completed(&out),
        vec![(
            waiting,
            Err(CallError::DeadlineExceeded { timeout: ms(500) })
        )]
    );
    assert!(
        transmitted(&out).is_empty(),
        "never sent: nothing to cancel"
    );
    assert!(c.is_pending(long));
}

#[test]
fn a_call_waiting_for_a_connection_ends_at_its_deadline_saying_why() {
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    let a = start(&mut c, at(0), Some(ms(700)));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connect_failed(
        at_ms(100),
        conn,
        ConnectFailure::Unreachable("no route".into()),
    );
    let mut now = at_ms(100);
    let mut done = Vec::new();
    while done.is_empty() {
        now = c.poll_timeout().unwrap();
        c.handle_timeout(now);
        let out = drain(&mut c);
        for conn in connect_outputs(&out) {
            c.connect_failed(now, conn, ConnectFailure::Unreachable("no route".into()));
        }
        done = completed(&out);
        done.extend(completed(&drain(&mut c)));
    }
    assert_eq!(now, at_ms(700));
    match &done[..] {
        [(id, Err(CallError::NotConnected { waited, last_error }))] => {
            assert_eq!(*id, a);
            assert_eq!(*waited, ms(700));
            assert_eq!(last_error.as_deref(), Some("no route"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_call_without_deadline_waits_for_a_connection_up_to_the_connect_timeout() {
    let config = ClientConfig {
        connect_timeout: secs(2),
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    let a = start(&mut c, at(0), None);
    let mut now = at(0);
    loop {
        let out = drain(&mut c);
        if let Some((id, result)) = completed(&out).pop() {
            assert_eq!(id, a);
            assert!(matches!(result, Err(CallError::NotConnected { .. })));
            break;
        }
        now = c.poll_timeout().unwrap();
        assert!(now <= at(2));
        c.handle_timeout(now);
    }
    assert_eq!(now, at(2));
}

#[test]
fn attempts_are_short_at_first_and_retried_so_a_late_server_is_reached() {
    // The server starts 200 ms after the client; the first attempt's
    // Initial was lost, and QUIC would retransmit only after ~1 s.
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    c.connect(at(0));
    let first = connect_outputs(&drain(&mut c))[0];
    assert_eq!(c.poll_timeout(), Some(at_ms(250)));
    c.handle_timeout(at_ms(250));
    let out = drain(&mut c);
    assert_eq!(closes(&out), vec![first], "the stale attempt is abandoned");
    let wait = c.poll_timeout().unwrap();
    assert_eq!(wait, at_ms(300), "after the initial backoff");
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, at_ms(310));
    assert_eq!(connect_result(&out), Some(Ok(())));
}

#[test]
fn attempt_timeouts_double() {
    let config = ClientConfig {
        reconnect: Some(Backoff {
            initial: ms(10),
            max: ms(10),
        }),
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    c.connect(at(0));
    let mut now = at(0);
    let mut lengths = Vec::new();
    for _ in 0..4 {
        drain(&mut c);
        let started = now;
        now = c.poll_timeout().unwrap();
        lengths.push(now - started);
        c.handle_timeout(now);
        drain(&mut c);
        now = c.poll_timeout().unwrap();
        c.handle_timeout(now);
    }
    assert_eq!(lengths, vec![ms(250), ms(500), ms(1000), ms(2000)]);
}

/// A server that finished the TLS handshake is there: a slow Hello from it
/// (a busy server, lost packets) is waited for, not abandoned at the short
/// attempt timeout, which would leave the server a connection whose close
/// may be lost and start another handshake on a server already struggling.
#[test]
fn a_server_past_the_tls_handshake_has_until_the_connect_timeout_to_say_hello() {
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    c.connect(at(0));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connected(at_ms(200), conn);
    drain(&mut c);
    // Well past the first attempt's 250 ms: nothing is abandoned.
    let next = c.poll_timeout().expect("a deadline");
    assert!(
        next >= at_ms(200) + ms(9_000),
        "the next deadline is at {next:?}"
    );
    c.handle_timeout(at_ms(3_000));
    let out = drain(&mut c);
    assert!(
        !out.iter().any(|o| matches!(
            o,
            ClientOutput::CloseConnection { .. } | ClientOutput::Connect { .. }
        )),
        "{out:?}"
    );
    c.handle_message(at_ms(3_000), conn, server_hello())
        .unwrap();
    assert_eq!(connect_result(&drain(&mut c)), Some(Ok(())));
}

#[test]
fn a_server_that_never_says_hello_fails_the_attempt_at_the_connect_timeout() {
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    c.connect(at(0));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connected(at_ms(100), conn);
    drain(&mut c);
    c.handle_timeout(at_ms(10_100));
    let out = drain(&mut c);
    assert!(
        out.iter()
            .any(|o| matches!(o, ClientOutput::CloseConnection { conn: c, .. } if *c == conn)),
        "{out:?}"
    );
    assert!(matches!(connect_result(&out), Some(Err(_))), "{out:?}");
}

#[test]
fn connect_gives_up_at_once_on_a_permanent_failure() {
    for failure in [
        ConnectFailure::Tls("certificate not pinned".into()),
        ConnectFailure::Resolve("no such host".into()),
    ] {
        let mut c = ClientProtocol::new(at(0), ClientConfig::default());
        c.connect(at(0));
        let conn = connect_outputs(&drain(&mut c))[0];
        c.connect_failed(at_ms(5), conn, failure.clone());
        assert_eq!(
            connect_result(&drain(&mut c)),
            Some(Err(ConnectError::Failed(failure)))
        );
    }
}

#[test]
fn connect_gives_up_when_the_server_refuses() {
    let mut c = ClientProtocol::new(at(0), ClientConfig::default());
    c.connect(at(0));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connected(at(0), conn);
    drain(&mut c);
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::Unauthenticated,
        message: "wrong token".into(),
    });
    c.handle_message(at(0), conn, bye).unwrap();
    let out = drain(&mut c);
    assert_eq!(closes(&out), vec![conn]);
    match connect_result(&out) {
        Some(Err(e @ ConnectError::Rejected { .. })) => {
            let text = format!("{e}");
            assert!(
                text.contains("wrong token") && text.contains("token"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A client that requires the server's token (a server that dialled in):
/// connected, with the server's `Hello` carrying `token`; returns the outputs.
fn hello_with_server_token(token: Option<&str>) -> (ClientProtocol, ConnId, Vec<ClientOutput>) {
    let config = ClientConfig {
        server_token: Some("s3cret".into()),
        token: Some("own secret".into()),
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    let id = start(&mut c, at(0), None);
    c.connect(at(0));
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connected(at(0), conn);
    match &transmitted(&drain(&mut c))[..] {
        // Nothing secret goes to a server before it proves itself, not even
        // the client's own token.
        [Message::Hello(h)] => assert_eq!(h.token, None),
        other => panic!("{other:?}"),
    }
    let hello = Message::Hello(Hello {
        agent: "worker".into(),
        token: token.map(Into::into),
    });
    c.handle_message(at_ms(1), conn, hello).unwrap();
    let out = drain(&mut c);
    assert!(
        token != Some("s3cret") || sent(&out) == vec![id],
        "the waiting call goes out once the server proved itself: {out:?}"
    );
    (c, conn, out)
}

#[test]
fn a_server_that_presents_the_required_token_gets_calls() {
    let (c, _conn, out) = hello_with_server_token(Some("s3cret"));
    assert!(c.is_connected());
    assert!(closes(&out).is_empty());
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn a_server_without_the_required_token_is_refused_before_any_call() {
    for token in [None, Some("s3creX"), Some("")] {
        let (c, conn, out) = hello_with_server_token(token);
        assert!(sent(&out).is_empty(), "{token:?}: {out:?}");
        assert_eq!(closes(&out), vec![conn], "{token:?}");
        assert!(
            out.iter().any(|o| matches!(
                o,
                ClientOutput::CloseConnection {
                    code: CloseCode::Unauthenticated,
                    ..
                }
            )),
            "{out:?}"
        );
        assert!(!c.is_connected());
        // The connect() waiting gives up at once, saying why.
        assert_eq!(
            connect_result(&out),
            Some(Err(ConnectError::ServerUnauthenticated))
        );
        let text = alloc::string::String::from(c.last_error().unwrap_or_default());
        assert!(text.contains("expected token"), "{text}");
    }
}

#[test]
fn calls_waiting_fail_at_once_when_no_connection_can_ever_come() {
    let config = ClientConfig {
        reconnect: None,
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    let id = start(&mut c, at(0), None);
    let conn = connect_outputs(&drain(&mut c))[0];
    c.connect_failed(at_ms(1), conn, ConnectFailure::Spent("dial again".into()));
    let out = drain(&mut c);
    match &completed(&out)[..] {
        [(done, Err(CallError::NotConnected { last_error, .. }))] => {
            assert_eq!(*done, id);
            assert!(last_error.as_deref().unwrap_or("").contains("dial again"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        connect_outputs(&out).is_empty(),
        "no more attempts: {out:?}"
    );
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn connect_gives_up_at_the_connect_timeout() {
    let config = ClientConfig {
        connect_timeout: secs(1),
        ..ClientConfig::default()
    };
    let mut c = ClientProtocol::new(at(0), config);
    c.connect(at(0));
    let mut result = None;
    while result.is_none() {
        let out = drain(&mut c);
        result = connect_result(&out);
        if result.is_none() {
            let now = c.poll_timeout().unwrap();
            assert!(now <= at(1));
            c.handle_timeout(now);
        }
    }
    assert!(matches!(result, Some(Err(ConnectError::TimedOut { .. }))));
}

#[test]
fn replies_complete_calls_in_any_order() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(0), None);
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    let err = RemoteError::new(ErrorKind::Handler, "ValueError", "bad");
    c.reply_received(at(1), conn, b, reply(b, Err(err.clone())));
    c.reply_received(at(1), conn, a, reply(a, Ok(tree!("ok"))));
    let done = completed(&drain(&mut c));
    assert_eq!(
        done,
        vec![
            (b, Err(CallError::Remote(err.clone()))),
            (a, Ok(tree!("ok")))
        ]
    );
    let e = done[0].1.clone().unwrap_err();
    assert!(e.is_remote());
    assert!(format!("{e}").contains("ValueError"));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_reply_with_id_zero_belongs_to_its_streams_call_and_another_id_is_a_violation() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(0), None);
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    let refused = RemoteError::new(ErrorKind::BadRequest, "teleport", "malformed");
    c.reply_received(at(1), conn, a, reply(0, Err(refused.clone())));
    assert_eq!(
        completed(&drain(&mut c)),
        vec![(a, Err(CallError::Remote(refused)))]
    );
    c.reply_received(at(1), conn, b, reply(a, Ok(Tree::None)));
    let out = drain(&mut c);
    assert!(matches!(
        &completed(&out)[..],
        [(_, Err(CallError::ProtocolViolation { .. }))]
    ));
    assert_eq!(closes(&out), vec![conn]);
}

#[test]
fn a_reply_for_an_unknown_id_on_the_control_stream_is_ignored() {
    let (mut c, conn) = client(ClientConfig::default());
    let err = c
        .handle_message(at(1), conn, Message::Reply(reply(42, Ok(Tree::None))))
        .unwrap_err();
    assert_eq!(err, ClientMessageError::UnknownRequest { id: 42 });
    assert!(!err.is_fatal());
    assert!(drain(&mut c).is_empty());
    assert!(c.is_connected());
}

#[test]
fn cancel_tells_the_server_only_about_sent_calls() {
    let config = ClientConfig {
        max_in_flight: 1,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let a = start(&mut c, at(0), Some(secs(5)));
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    assert!(c.cancel(at(1), b));
    let out = drain(&mut c);
    assert!(transmitted(&out).is_empty());
    assert_eq!(completed(&out), vec![(b, Err(CallError::Cancelled))]);
    assert!(c.cancel(at(1), a));
    let out = drain(&mut c);
    assert_eq!(transmitted(&out), vec![Message::Cancel { request_id: a }]);
    assert!(out.contains(&ClientOutput::AbandonCall {
        conn,
        id: a,
        code: StreamCode::Cancelled
    }));
    assert_eq!(completed(&out), vec![(a, Err(CallError::Cancelled))]);
    assert!(!c.cancel(at(1), a), "a second cancel is a no-op");
    // The reply crossing the cancel on the wire is dropped.
    c.reply_received(at(2), conn, a, reply(a, Ok(Tree::None)));
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), None, "no deadline left, idle");
}

#[test]
fn reply_failures_name_what_happened() {
    let (mut c, conn) = client(ClientConfig::default());
    let cases = [
        (
            ReplyFailure::OverLimit("data_len over 1 KiB".into()),
            "over this client's limits",
        ),
        (ReplyFailure::Reset(StreamCode::Refused), "abandoned"),
        (ReplyFailure::Malformed("bad magic".into()), "bad magic"),
        (ReplyFailure::Missing, "without a reply"),
    ];
    for (failure, text) in cases {
        let id = start(&mut c, at(0), None);
        drain(&mut c);
        c.reply_failed(at(1), conn, id, failure);
        let (_, result) = completed(&drain(&mut c)).remove(0);
        let e = result.unwrap_err();
        assert!(format!("{e}").contains(text), "{e}");
        assert!(!e.is_connection_error());
    }
    assert!(c.is_connected());
}

#[test]
fn ping_from_server_is_answered() {
    let (mut c, conn) = client(ClientConfig::default());
    c.handle_message(at(0), conn, Message::Ping { nonce: 77 })
        .unwrap();
    assert_eq!(
        transmitted(&drain(&mut c)),
        vec![Message::Pong { nonce: 77 }]
    );
}

#[test]
fn a_second_hello_is_a_protocol_violation() {
    let (mut c, conn) = client(ClientConfig::default());
    let err = c.handle_message(at(0), conn, server_hello()).unwrap_err();
    assert!(err.is_fatal());
    let out = drain(&mut c);
    match &transmitted(&out)[..] {
        [Message::Goodbye(g)] => assert_eq!(g.reason, GoodbyeReason::ProtocolError),
        other => panic!("{other:?}"),
    }
    assert_eq!(closes(&out), vec![conn]);
}

#[test]
fn unexpected_messages_close_with_a_protocol_error_and_fail_calls() {
    for msg in [
        Message::Cancel { request_id: 1 },
        Message::Call(Call {
            request_id: 1,
            method: "x".into(),
            timeout: None,
            args: Tree::None,
        }),
    ] {
        let (mut c, conn) = client(ClientConfig::default());
        let a = start(&mut c, at(0), None);
        drain(&mut c);
        assert!(c.handle_message(at(1), conn, msg).unwrap_err().is_fatal());
        let out = drain(&mut c);
        let done = completed(&out);
        assert_eq!(done[0].0, a);
        assert!(matches!(
            done[0].1,
            Err(CallError::ProtocolViolation { .. })
        ));
        // Later messages of that connection are ignored.
        c.handle_message(at(2), conn, Message::Ping { nonce: 1 })
            .unwrap();
        assert!(transmitted(&drain(&mut c)).is_empty());
    }
}

#[test]
fn the_servers_goodbye_lets_replies_already_sent_arrive() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(0), None);
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::ShuttingDown,
        message: "maintenance window".into(),
    });
    c.handle_message(at(1), conn, bye).unwrap();
    assert!(drain(&mut c).is_empty(), "the replies may still come");
    // A call made now waits for the next connection.
    let later = start(&mut c, at(1), None);
    assert!(sent(&drain(&mut c)).is_empty());
    c.reply_received(at(1), conn, a, reply(a, Ok(tree!(1))));
    assert_eq!(completed(&drain(&mut c)), vec![(a, Ok(tree!(1)))]);
    c.handle_timeout(at(3));
    let out = drain(&mut c);
    match &completed(&out)[..] {
        [(id, Err(e @ CallError::ServerClosed { .. }))] => {
            assert_eq!(*id, b);
            assert!(e.is_connection_error());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(closes(&out), vec![conn]);
    // Reconnects for the waiting call.
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, wait);
    assert_eq!(sent(&out), vec![later]);
}

#[test]
fn an_idle_servers_goodbye_leaves_the_client_idle_until_the_next_call() {
    let (mut c, conn) = client(ClientConfig::default());
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::Normal,
        message: "idle".into(),
    });
    c.handle_message(at(600), conn, bye).unwrap();
    assert_eq!(closes(&drain(&mut c)), vec![conn]);
    assert!(!c.is_connected());
    assert_eq!(c.poll_timeout(), None, "no reconnection without a call");
    let id = start(&mut c, at(700), None);
    let (_, out) = establish(&mut c, at(700));
    assert_eq!(sent(&out), vec![id]);
}

#[test]
fn idle_client_has_no_timer_and_sends_nothing() {
    let (mut c, conn) = client(ClientConfig::default());
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(at(3600));
    assert!(drain(&mut c).is_empty());
    let a = start(&mut c, at(3600), None);
    assert!(c.poll_timeout().is_some());
    c.reply_received(at(3601), conn, a, reply(a, Ok(Tree::None)));
    drain(&mut c);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn pings_at_most_once_per_interval_while_silent() {
    let config = ClientConfig {
        ping_interval: Some(secs(5)),
        max_age: Some(secs(30)),
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    start(&mut c, at(0), None);
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(at(5)));
    c.handle_timeout(at(4));
    assert!(drain(&mut c).is_empty(), "too early");
    c.handle_timeout(at(5));
    assert!(matches!(
        &transmitted(&drain(&mut c))[..],
        [Message::Ping { .. }]
    ));
    c.handle_timeout(at(7));
    c.handle_timeout(at(9));
    assert!(drain(&mut c).is_empty(), "one ping per interval");
    c.heard_from_peer(at(8), conn);
    assert_eq!(c.poll_timeout(), Some(at(13)));
}

#[test]
fn a_silent_server_is_declared_dead_within_the_default_max_age() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(100), None);
    let b = start(&mut c, at(100), None);
    drain(&mut c);
    let mut pings = 0;
    let mut now = at(100);
    let mut done = Vec::new();
    while done.len() < 2 {
        now = c.poll_timeout().unwrap();
        c.handle_timeout(now);
        let out = drain(&mut c);
        pings += transmitted(&out)
            .iter()
            .filter(|m| matches!(m, Message::Ping { .. }))
            .count();
        done.extend(completed(&out));
        if !done.is_empty() {
            assert_eq!(closes(&out), vec![conn]);
        }
    }
    assert_eq!(now, at(105), "dead peers are detected in 5 s by default");
    assert_eq!(pings, 4, "at 101, 102, 103, 104");
    for (id, result) in done {
        assert!(id == a || id == b);
        match result {
            Err(
                e @ CallError::NotAlive {
                    silent_for,
                    max_age,
                },
            ) => {
                assert_eq!((silent_for, max_age), (secs(5), secs(5)));
                assert!(format!("{e}").contains("max_age"));
                assert!(e.is_connection_error());
            }
            other => panic!("{other:?}"),
        }
    }
    // And then it reconnects.
    assert!(!c.is_connected());
    assert!(c.poll_timeout().is_some());
}

#[test]
fn signs_of_life_keep_a_long_call_alive() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(0), None);
    for s in 1..=600 {
        c.handle_timeout(at(s));
        c.heard_from_peer(at(s), conn);
    }
    assert!(c.is_pending(a));
    assert!(c.is_connected());
}

#[test]
fn no_pings_or_death_when_disabled() {
    let config = ClientConfig {
        ping_interval: None,
        max_age: None,
        ..ClientConfig::default()
    };
    let (mut c, _) = client(config);
    let a = start(&mut c, at(0), None);
    drain(&mut c);
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(at(10_000));
    assert!(drain(&mut c).is_empty());
    assert!(c.is_pending(a));
}

#[test]
fn a_deadline_fails_the_call_and_cancels_it_on_the_server() {
    let config = ClientConfig {
        max_age: None,
        ping_interval: None,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let a = start(&mut c, at_ms(0), Some(ms(1500)));
    let b = start(&mut c, at_ms(0), Some(secs(60)));
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(at_ms(1500)));
    c.handle_timeout(at_ms(1499));
    assert!(drain(&mut c).is_empty());
    c.handle_timeout(at_ms(1500));
    let out = drain(&mut c);
    assert_eq!(transmitted(&out), vec![Message::Cancel { request_id: a }]);
    assert!(out.contains(&ClientOutput::AbandonCall {
        conn,
        id: a,
        code: StreamCode::Expired
    }));
    let done = completed(&out);
    assert_eq!(
        done,
        vec![(a, Err(CallError::DeadlineExceeded { timeout: ms(1500) }))]
    );
    assert!(format!("{}", done[0].1.clone().unwrap_err()).contains("1.5s"));
    assert!(c.is_pending(b));
}

#[test]
fn the_timeout_sent_is_what_is_left_of_the_deadline() {
    let config = ClientConfig {
        max_in_flight: 1,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let a = start(&mut c, at(0), None);
    let b = start(&mut c, at(0), Some(secs(10)));
    drain(&mut c);
    c.reply_received(at(4), conn, a, reply(a, Ok(Tree::None)));
    let out = drain(&mut c);
    match out.iter().find_map(|o| match o {
        ClientOutput::Send { call, .. } => Some(call.clone()),
        _ => None,
    }) {
        Some(call) => {
            assert_eq!(call.request_id, b);
            assert_eq!(call.timeout, Some(secs(6)));
        }
        None => panic!("{out:?}"),
    }
}

#[test]
fn zero_timeout_fails_at_once() {
    let (mut c, _) = client(ClientConfig::default());
    let a = start(&mut c, at(1), Some(Duration::ZERO));
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(at(1)));
    c.handle_timeout(at(1));
    assert!(!c.is_pending(a));
}

#[test]
fn huge_timeout_never_overflows() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = start(&mut c, at(1), Some(Duration::MAX));
    c.heard_from_peer(at(1_000_000), conn);
    c.handle_timeout(at(1_000_000));
    assert!(c.is_pending(a));
}

#[test]
fn ids_are_never_zero_and_unique_among_pending_calls() {
    let (mut c, _) = client(ClientConfig::default());
    c.next_id = u64::MAX;
    let a = start(&mut c, at(0), None);
    let b = start(&mut c, at(0), None);
    c.next_id = a;
    let d = start(&mut c, at(0), None);
    assert_eq!((a, b), (u64::MAX, 1));
    assert!(d != a && d != b && d != 0);
}

#[test]
fn a_lost_connection_fails_its_calls_unless_idempotent_which_go_first_next_time() {
    let config = ClientConfig {
        max_in_flight: 2,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let plain = start(&mut c, at(0), None);
    let idempotent = c
        .start_call(
            at(0),
            "g",
            tree!([1, 2]),
            CallOptions::default().idempotent(true),
        )
        .unwrap();
    let queued = start(&mut c, at(0), None);
    drain(&mut c);
    c.connection_lost(at(1), conn, "reset by peer");
    let out = drain(&mut c);
    match &completed(&out)[..] {
        [(id, Err(e))] => {
            assert_eq!(*id, plain);
            assert!(format!("{e}").contains("reset by peer"));
            assert!(e.is_connection_error());
        }
        other => panic!("{other:?}"),
    }
    let wait = c.poll_timeout().unwrap();
    assert_eq!(wait, at(1) + ms(50));
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, wait);
    let sends: Vec<Call> = out
        .iter()
        .filter_map(|o| match o {
            ClientOutput::Send { call, .. } => Some(call.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        sends.iter().map(|c| c.request_id).collect::<Vec<_>>(),
        vec![idempotent, queued],
        "the re-sent call first, within the in-flight limit"
    );
    assert_eq!(sends[0].args, tree!([1, 2]));
}

#[test]
fn calls_lost_with_their_connection_are_resent_and_failed_in_the_order_they_were_made() {
    let config = ClientConfig {
        max_in_flight: 64,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let (mut idempotent, mut plain) = (Vec::new(), Vec::new());
    for i in 0..40 {
        if i % 2 == 0 {
            let options = CallOptions::default().idempotent(true);
            idempotent.push(c.start_call(at(0), "g", tree!([1]), options).unwrap());
        } else {
            plain.push(start(&mut c, at(0), None));
        }
    }
    drain(&mut c);
    c.connection_lost(at(1), conn, "reset by peer");
    let out = drain(&mut c);
    let failed: Vec<RequestId> = completed(&out).iter().map(|(id, _)| *id).collect();
    assert_eq!(failed, plain, "failed in the order they were made");
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, wait);
    assert_eq!(
        sent(&out),
        idempotent,
        "re-sent in the order they were made"
    );
}

#[test]
fn without_reconnecting_a_lost_connection_fails_everything_until_connect() {
    let config = ClientConfig {
        reconnect: None,
        resend_lost_calls: true,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let a = start(&mut c, at(0), None);
    drain(&mut c);
    c.connection_lost(at(1), conn, "gone");
    let out = drain(&mut c);
    assert_eq!(completed(&out).len(), 1, "not re-sent without reconnecting");
    assert!(!c.is_pending(a));
    assert_eq!(c.poll_timeout(), None);
    let err = c
        .start_call(at(2), "f", Tree::None, CallOptions::default())
        .unwrap_err();
    assert!(format!("{err}").contains("gone"), "{err}");
    c.connect(at(3));
    let (_, out) = establish(&mut c, at(3));
    assert_eq!(connect_result(&out), Some(Ok(())));
    start(&mut c, at(3), None);
    assert_eq!(sent(&drain(&mut c)).len(), 1);
}

#[test]
fn backoff_grows_for_connections_that_end_soon_after_opening() {
    let (mut c, mut conn) = client(ClientConfig::default());
    let mut waits = Vec::new();
    let mut now = at(0);
    for _ in 0..4 {
        c.connection_lost(now, conn, "accepted, then failed");
        drain(&mut c);
        let next = c.poll_timeout().unwrap();
        waits.push(next - now);
        c.handle_timeout(next);
        now = next;
        conn = establish(&mut c, now).0;
    }
    assert_eq!(waits, vec![ms(50), ms(100), ms(200), ms(400)]);
    // A connection that lasted starts the backoff over.
    now = now + secs(60);
    c.connection_lost(now, conn, "after a good while");
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(now + ms(50)));
}

#[test]
fn stale_events_of_an_old_connection_are_ignored() {
    let (mut c, old) = client(ClientConfig::default());
    c.connection_lost(at(1), old, "lost");
    drain(&mut c);
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    let (new, _) = establish(&mut c, wait);
    assert_ne!(old, new);
    c.connection_lost(at(2), old, "late news");
    c.handle_message(at(2), old, Message::Ping { nonce: 1 })
        .unwrap();
    assert!(drain(&mut c).is_empty());
    assert!(c.is_connected());
}

#[test]
fn close_says_goodbye_fails_everything_and_closes_when_acknowledged() {
    let config = ClientConfig {
        max_in_flight: 1,
        ..ClientConfig::default()
    };
    let (mut c, conn) = client(config);
    let a = start(&mut c, at(0), Some(secs(1)));
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    c.close(at(0));
    let out = drain(&mut c);
    assert!(
        sent(&out).is_empty(),
        "no queued call goes out while closing"
    );
    assert_eq!(
        completed(&out),
        vec![(a, Err(CallError::Closed)), (b, Err(CallError::Closed))]
    );
    match &transmitted(&out)[..] {
        [Message::Goodbye(g)] => assert_eq!(g.reason, GoodbyeReason::Normal),
        other => panic!("{other:?}"),
    }
    assert!(closes(&out).is_empty());
    assert!(c.is_closed());
    c.goodbye_acknowledged(at(0), conn);
    assert_eq!(closes(&drain(&mut c)), vec![conn]);
    assert_eq!(c.poll_timeout(), None);
    assert!(c
        .start_call(at(1), "f", Tree::None, CallOptions::default())
        .is_err());
}

#[test]
fn close_without_acknowledgement_closes_after_close_wait() {
    let (mut c, conn) = client(ClientConfig::default());
    c.close(at(0));
    drain(&mut c);
    assert_eq!(c.poll_timeout(), Some(at(1)));
    c.handle_timeout(at(1));
    assert_eq!(closes(&drain(&mut c)), vec![conn]);
}

#[test]
fn an_unobserved_failure_is_reported_once_by_the_next_call() {
    let (mut c, conn) = client(ClientConfig::default());
    let a = c
        .start_call(at(0), "lost", Tree::None, CallOptions::default())
        .unwrap();
    let b = start(&mut c, at(0), None);
    drain(&mut c);
    c.abandon(at(0), a);
    c.abandon(at(0), b);
    let err = RemoteError::new(ErrorKind::Handler, "ValueError", "x");
    c.reply_received(at(1), conn, a, reply(a, Err(err.clone())));
    c.reply_received(at(1), conn, b, reply(b, Err(err.clone())));
    drain(&mut c);
    match c.start_call(at(2), "f", Tree::None, CallOptions::default()) {
        Err(StartCallError::Unobserved { method, error }) => {
            assert_eq!(method, "lost");
            assert_eq!(error, CallError::Remote(err));
        }
        other => panic!("{other:?}"),
    }
    assert!(c
        .start_call(at(2), "f", Tree::None, CallOptions::default())
        .is_ok());
    // Cancelled calls are not failures to report.
    let d = start(&mut c, at(2), None);
    c.abandon(at(2), d);
    c.cancel(at(2), d);
    assert!(c
        .start_call(at(2), "f", Tree::None, CallOptions::default())
        .is_ok());
}

#[test]
fn unbounded_in_flight() {
    let config = ClientConfig {
        max_in_flight: usize::MAX,
        ..ClientConfig::default()
    };
    let (mut c, _) = client(config);
    for _ in 0..1000 {
        start(&mut c, at(0), None);
    }
    assert_eq!(sent(&drain(&mut c)).len(), 1000);
}

#[test]
fn a_call_the_server_stops_for_its_shutdown_goes_to_the_next_connection_if_idempotent() {
    let (mut c, conn) = client(ClientConfig::default());
    let plain = start(&mut c, at(0), None);
    let again = c
        .start_call(
            at(0),
            "f",
            tree!(1),
            CallOptions::default().idempotent(true),
        )
        .unwrap();
    drain(&mut c);
    c.reply_failed(
        at(1),
        conn,
        again,
        ReplyFailure::Reset(StreamCode::ShuttingDown),
    );
    let later = start(&mut c, at(1), None);
    let out = drain(&mut c);
    assert!(completed(&out).is_empty(), "sent again later, not failed");
    assert!(
        sent(&out).is_empty(),
        "nothing more goes to a server shutting down"
    );
    c.reply_failed(
        at(1),
        conn,
        plain,
        ReplyFailure::Reset(StreamCode::ShuttingDown),
    );
    let out = drain(&mut c);
    match &completed(&out)[..] {
        [(id, Err(e @ CallError::ServerClosed { .. }))] => {
            assert_eq!(*id, plain);
            assert!(e.is_connection_error());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(closes(&out), vec![conn]);
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, wait);
    assert_eq!(sent(&out), vec![again, later]);
}

#[test]
fn an_idempotent_call_refused_as_shutting_down_is_sent_to_the_next_connection() {
    let (mut c, conn) = client(ClientConfig::default());
    let id = c
        .start_call(
            at(0),
            "f",
            tree!(1),
            CallOptions::default().idempotent(true),
        )
        .unwrap();
    drain(&mut c);
    let refusal = RemoteError::new(ErrorKind::ShuttingDown, "teleport", "shutting down");
    c.reply_received(at(1), conn, id, reply(id, Err(refusal)));
    let out = drain(&mut c);
    assert!(completed(&out).is_empty());
    assert_eq!(closes(&out), vec![conn]);
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    let (_, out) = establish(&mut c, wait);
    assert_eq!(sent(&out), vec![id]);
}

#[test]
fn counts_follow_calls_connections_and_resends() {
    let (mut c, conn) = client(ClientConfig::default());
    assert_eq!(c.counts().connections, 1);
    let ok = c
        .start_call(at(0), "f", tree!(1), CallOptions::default())
        .unwrap();
    let again = c
        .start_call(
            at(0),
            "f",
            tree!(2),
            CallOptions::default().idempotent(true),
        )
        .unwrap();
    let bad = c
        .start_call(at(0), "f", tree!(3), CallOptions::default())
        .unwrap();
    drain(&mut c);
    c.reply_received(at(1), conn, ok, reply(ok, Ok(tree!(1))));
    let refusal = RemoteError::new(ErrorKind::ShuttingDown, "teleport", "shutting down");
    c.reply_received(at(1), conn, again, reply(again, Err(refusal)));
    c.cancel(at(1), bad);
    drain(&mut c);
    let counts = c.counts();
    assert_eq!(
        (
            counts.started,
            counts.succeeded,
            counts.failed,
            counts.resent
        ),
        (3, 1, 1, 1)
    );
    let wait = c.poll_timeout().unwrap();
    c.handle_timeout(wait);
    establish(&mut c, wait);
    assert_eq!(c.counts().connections, 2);
}
