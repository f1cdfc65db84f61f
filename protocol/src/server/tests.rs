use super::*;
use crate::{tree, Call};
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

fn at(n: u64) -> Timestamp {
    Timestamp::ZERO + Duration::from_secs(n)
}

fn at_ms(n: u64) -> Timestamp {
    Timestamp::ZERO + Duration::from_millis(n)
}

fn drain(s: &mut ServerProtocol) -> Vec<ServerOutput> {
    let mut v = Vec::new();
    while let Some(o) = s.poll_output() {
        v.push(o);
    }
    v
}

fn hello(token: Option<&str>) -> Message {
    Message::Hello(Hello {
        agent: "cli".into(),
        token: token.map(Into::into),
    })
}

fn call(id: RequestId, timeout: Option<u64>) -> Call {
    Call {
        request_id: id,
        method: "f".into(),
        timeout: timeout.map(Duration::from_secs),
        args: tree!([1]),
    }
}

fn head(id: RequestId) -> CallHead {
    CallHead {
        request_id: id,
        method: "f".into(),
        timeout: None,
    }
}

fn server(config: ServerConfig) -> ServerProtocol {
    let mut s = ServerProtocol::new(at(0), config);
    s.handle_message(at(0), hello(None)).unwrap();
    assert!(matches!(
        &drain(&mut s)[..],
        [ServerOutput::Transmit(Message::Hello(_))]
    ));
    s
}

fn with_token(token: &str) -> ServerConfig {
    ServerConfig {
        token: Some(token.into()),
        ..ServerConfig::default()
    }
}

/// Opens stream `stream` and delivers `call` on it.
fn deliver(s: &mut ServerProtocol, now: Timestamp, stream: StreamIndex, c: Call) {
    s.call_opened(now, stream);
    s.call_received(now, stream, c);
}

fn admitted(out: &[ServerOutput]) -> Vec<RequestId> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Admitted { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn started(out: &[ServerOutput]) -> Vec<RequestId> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Arguments { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// The error replies in `out`: (stream, request id, kind, stop_reading).
fn refusals(out: &[ServerOutput]) -> Vec<(StreamIndex, RequestId, ErrorKind, Option<StreamCode>)> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Reply {
                stream,
                reply:
                    Reply {
                        request_id,
                        result: Err(e),
                    },
                stop_reading,
            } => Some((*stream, *request_id, e.kind, *stop_reading)),
            _ => None,
        })
        .collect()
}

fn resets(out: &[ServerOutput]) -> Vec<(StreamIndex, StreamCode)> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Reset { stream, code } => Some((*stream, *code)),
            _ => None,
        })
        .collect()
}

fn goodbye(out: &[ServerOutput]) -> Option<GoodbyeReason> {
    out.iter().find_map(|o| match o {
        ServerOutput::Transmit(Message::Goodbye(g)) => Some(g.reason),
        _ => None,
    })
}

fn close(out: &[ServerOutput]) -> Option<CloseCode> {
    out.iter().find_map(|o| match o {
        ServerOutput::Close { code, .. } => Some(*code),
        _ => None,
    })
}

#[test]
fn handshake_without_token() {
    let mut s = ServerProtocol::new(at(0), ServerConfig::default());
    assert!(!s.is_authenticated());
    assert_eq!(s.poll_timeout(), Some(at(10)), "the Hello deadline");
    s.handle_message(at(0), hello(Some("anything"))).unwrap();
    match &drain(&mut s)[..] {
        [ServerOutput::Transmit(Message::Hello(h))] => {
            assert_eq!(h.agent, DEFAULT_AGENT);
            assert_eq!(h.token, None);
        }
        other => panic!("{other:?}"),
    }
    assert!(s.is_authenticated());
    assert_eq!(s.peer_agent(), Some("cli"));
}

#[test]
fn handshake_with_the_right_token() {
    let mut s = ServerProtocol::new(at(0), with_token("s3cret"));
    s.handle_message(at(0), hello(Some("s3cret"))).unwrap();
    assert!(s.is_authenticated());
    assert!(!format!("{s:?}").contains("s3cret"));
}

#[test]
fn a_server_that_dialled_its_client_presents_its_token_only_to_an_accepted_hello() {
    let config = ServerConfig {
        present_token: Some("pr00f".into()),
        ..with_token("s3cret")
    };
    // A client refused gets no token back.
    let mut s = ServerProtocol::new(at(0), config.clone());
    let _ = s.handle_message(at(0), hello(Some("wrong")));
    let out = drain(&mut s);
    assert!(
        !out.iter()
            .any(|o| matches!(o, ServerOutput::Transmit(Message::Hello(_)))),
        "{out:?}"
    );
    // An accepted one does.
    let mut s = ServerProtocol::new(at(0), config);
    s.handle_message(at(0), hello(Some("s3cret"))).unwrap();
    match &drain(&mut s)[..] {
        [ServerOutput::Transmit(Message::Hello(h))] => {
            assert_eq!(h.token.as_deref(), Some("pr00f"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{s:?}").contains("pr00f"));
}

#[test]
fn wrong_or_missing_token_is_refused_and_closed_as_unauthenticated() {
    for given in [Some("s3creT"), Some("s3cret "), Some(""), None] {
        let mut s = ServerProtocol::new(at(0), with_token("s3cret"));
        s.call_opened(at(0), 0);
        let err = s.handle_message(at(0), hello(given)).unwrap_err();
        assert_eq!(err, ServerMessageError::Unauthenticated);
        let out = drain(&mut s);
        assert_eq!(goodbye(&out), Some(GoodbyeReason::Unauthenticated));
        assert_eq!(close(&out), None, "the Goodbye gets a chance to arrive");
        // Nothing reaches the application afterwards.
        s.call_received(at(0), 0, call(1, None));
        s.handle_message(at(0), hello(Some("s3cret"))).unwrap();
        assert!(drain(&mut s).is_empty());
        // Closed once the Goodbye is acknowledged, with the refusal's code.
        s.goodbye_acknowledged(at(0));
        assert_eq!(close(&drain(&mut s)), Some(CloseCode::Unauthenticated));
        assert!(s.is_closed());
    }
}

#[test]
fn a_refused_client_is_closed_at_the_close_timeout_without_an_acknowledgement() {
    let mut s = ServerProtocol::new(at(0), with_token("t"));
    let _ = s.handle_message(at(0), hello(None));
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(at(2)));
    s.handle_timeout(at(2));
    assert_eq!(close(&drain(&mut s)), Some(CloseCode::Unauthenticated));
}

#[test]
fn empty_token_still_needs_a_token() {
    let mut s = ServerProtocol::new(at(0), with_token(""));
    assert!(s.handle_message(at(0), hello(None)).is_err());
    let mut s = ServerProtocol::new(at(0), with_token(""));
    assert!(s.handle_message(at(0), hello(Some(""))).is_ok());
}

#[test]
fn anything_but_a_hello_first_is_a_protocol_error() {
    for first in [Message::Call(call(1, None)), Message::Ping { nonce: 1 }] {
        let mut s = ServerProtocol::new(at(0), ServerConfig::default());
        let err = s.handle_message(at(0), first).unwrap_err();
        assert!(matches!(err, ServerMessageError::NoHello { .. }));
        let out = drain(&mut s);
        assert!(admitted(&out).is_empty());
        assert_eq!(goodbye(&out), Some(GoodbyeReason::ProtocolError));
        s.goodbye_acknowledged(at(0));
        assert_eq!(close(&drain(&mut s)), Some(CloseCode::ProtocolError));
    }
}

#[test]
fn no_hello_in_time_closes_with_a_protocol_error() {
    let config = ServerConfig {
        hello_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let mut s = ServerProtocol::new(at(0), config);
    s.call_opened(at(1), 0);
    s.call_received(at(1), 0, call(1, None));
    assert!(drain(&mut s).is_empty(), "no call before the Hello");
    s.handle_timeout(at(2));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(at(3));
    match &drain(&mut s)[..] {
        [ServerOutput::Close { code, reason }] => {
            assert_eq!(*code, CloseCode::ProtocolError);
            assert!(reason.contains("no Hello"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(s.is_closed());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn calls_before_the_hello_wait_for_it() {
    let mut s = ServerProtocol::new(at(0), ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, None));
    assert!(drain(&mut s).is_empty());
    s.handle_message(at(0), hello(None)).unwrap();
    assert_eq!(started(&drain(&mut s)), vec![1]);
}

#[test]
fn a_call_is_admitted_then_started_with_its_deadline() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(10), 0, call(5, Some(3)));
    match &drain(&mut s)[..] {
        [ServerOutput::Admitted {
            stream: 0,
            id: 5,
            method,
            deadline,
        }, ServerOutput::Arguments {
            stream: 0,
            id: 5,
            args,
        }] => {
            assert_eq!(method, "f");
            assert_eq!(*deadline, Some(at(13)));
            assert_eq!(args, &tree!([1]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.poll_timeout(), Some(at(13)));
    assert!(s.reply(at(11), 5, Ok(tree!(2))));
    assert!(matches!(
        &drain(&mut s)[..],
        [ServerOutput::Reply {
            stream: 0,
            reply: Reply {
                request_id: 5,
                result: Ok(_)
            },
            stop_reading: None,
        }]
    ));
    assert!(!s.reply(at(11), 5, Ok(tree!(2))), "answered once");
    assert!(!s.reply(at(11), 99, Ok(tree!(2))), "never opened");
    assert_eq!(s.streams(), 1, "the reply is being written");
    s.reply_sent(at(11), 0);
    assert_eq!(s.streams(), 0);
}

#[test]
fn calls_are_admitted_in_stream_order_whatever_order_they_arrive_in() {
    let mut s = server(ServerConfig::default());
    for stream in 0..4 {
        s.call_opened(at(0), stream);
    }
    // The tasks of later streams ran first.
    s.call_received(at(0), 3, call(13, None));
    s.call_received(at(0), 1, call(11, None));
    assert!(drain(&mut s).is_empty(), "stream 0 is still arriving");
    s.call_received(at(0), 0, call(10, None));
    let out = drain(&mut s);
    assert_eq!(admitted(&out), vec![10, 11]);
    assert_eq!(started(&out), vec![10, 11]);
    s.call_received(at(0), 2, call(12, None));
    let out = drain(&mut s);
    assert_eq!(admitted(&out), vec![12, 13]);
}

#[test]
fn a_large_call_is_admitted_at_its_header_and_holds_up_no_later_call() {
    let mut s = server(ServerConfig::default());
    s.call_opened(at(0), 0);
    s.call_opened(at(0), 1);
    s.call_received(at(0), 1, call(2, None));
    assert!(drain(&mut s).is_empty());
    // The first call's header: admitted first, its arguments still arriving.
    s.call_head(at(0), 0, head(1));
    let out = drain(&mut s);
    assert_eq!(admitted(&out), vec![1, 2]);
    assert_eq!(started(&out), vec![2]);
    s.call_progress(at(1), 0);
    s.call_args(at(2), 0, tree!([7]));
    assert_eq!(started(&drain(&mut s)), vec![1]);
}

#[test]
fn a_stalled_stream_is_refused_and_releases_the_calls_behind_it() {
    let config = ServerConfig {
        call_progress_timeout: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let mut s = server(config);
    s.call_opened(at(0), 0);
    deliver(&mut s, at(1), 1, call(2, None));
    assert!(drain(&mut s).is_empty());
    s.call_progress(at(3), 0);
    s.handle_timeout(at(7));
    assert!(
        drain(&mut s).is_empty(),
        "progress at 3 moved the bound to 8"
    );
    s.handle_timeout(at(8));
    let out = drain(&mut s);
    assert_eq!(
        refusals(&out),
        vec![(0, 0, ErrorKind::BadRequest, Some(StreamCode::Refused))]
    );
    assert_eq!(admitted(&out), vec![2]);
}

#[test]
fn a_stalled_upload_of_an_admitted_call_stops_it() {
    let config = ServerConfig {
        call_progress_timeout: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let mut s = server(config);
    s.call_opened(at(0), 0);
    s.call_head(at(0), 0, head(1));
    drain(&mut s);
    s.handle_timeout(at(5));
    let out = drain(&mut s);
    assert!(
        out.contains(&ServerOutput::Stop { stream: 0, id: 1 }),
        "{out:?}"
    );
    assert_eq!(
        refusals(&out),
        vec![(0, 1, ErrorKind::BadRequest, Some(StreamCode::Refused))]
    );
    assert!(!s.is_open(1));
    // Arguments arriving after all are dropped.
    s.call_args(at(6), 0, tree!(1));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn refusals_before_the_application() {
    let capacity = Arc::new(Capacity::new(2));
    let config = ServerConfig {
        max_in_flight: 2,
        capacity: Some(capacity.clone()),
        methods: Some(Arc::new(["f".into()].into_iter().collect())),
        ..ServerConfig::default()
    };
    let mut s = server(config.clone());
    // Over the per-connection limit.
    deliver(&mut s, at(0), 0, call(1, None));
    deliver(&mut s, at(0), 1, call(2, None));
    deliver(&mut s, at(0), 2, call(3, None));
    let out = drain(&mut s);
    assert_eq!(admitted(&out), vec![1, 2]);
    assert_eq!(refusals(&out), vec![(2, 3, ErrorKind::OverLimit, None)]);
    assert_eq!(capacity.in_use(), 2);
    // Over the server-wide capacity, on another connection.
    let mut other = server(config);
    deliver(&mut other, at(0), 0, call(1, None));
    assert_eq!(
        refusals(&drain(&mut other)),
        vec![(0, 1, ErrorKind::Overloaded, None)]
    );
    // An unknown method, a reserved id, an id in use.
    let unknown = Call {
        method: "g".into(),
        ..call(4, None)
    };
    assert!(s.reply(at(0), 1, Ok(Tree::None)));
    deliver(&mut s, at(0), 3, unknown);
    deliver(&mut s, at(0), 4, call(0, None));
    deliver(&mut s, at(0), 5, call(2, None));
    let out = drain(&mut s);
    assert_eq!(
        refusals(&out),
        [
            (3, 4, ErrorKind::UnknownMethod, None),
            (4, 0, ErrorKind::BadRequest, None),
            (5, 2, ErrorKind::BadRequest, None),
        ]
    );
    let unknown_message = out.iter().find_map(|o| match o {
        ServerOutput::Reply {
            stream: 3,
            reply: Reply { result: Err(e), .. },
            ..
        } => Some(e.message.clone()),
        _ => None,
    });
    assert!(unknown_message.unwrap().contains("[\"f\"]"));
    // Dropping the connection gives its places back.
    drop(s);
    assert_eq!(capacity.in_use(), 0);
}

#[test]
fn a_refusal_at_the_header_stops_reading_the_arguments() {
    let config = ServerConfig {
        max_in_flight: 1,
        ..ServerConfig::default()
    };
    let mut s = server(config);
    deliver(&mut s, at(0), 0, call(1, None));
    s.call_opened(at(0), 1);
    s.call_head(at(0), 1, head(2));
    assert_eq!(
        refusals(&drain(&mut s)),
        vec![(1, 2, ErrorKind::OverLimit, Some(StreamCode::Refused))]
    );
}

#[test]
fn a_zero_timeout_is_already_expired_the_stream_is_reset_and_nothing_runs() {
    let mut s = server(ServerConfig::default());
    let zero = Call {
        timeout: Some(Duration::ZERO),
        ..call(1, None)
    };
    deliver(&mut s, at(0), 0, zero);
    let out = drain(&mut s);
    assert!(admitted(&out).is_empty());
    assert_eq!(resets(&out), vec![(0, StreamCode::Expired)]);
    assert_eq!(s.streams(), 0);
    // The id is free again at once.
    deliver(&mut s, at(0), 1, call(1, None));
    assert_eq!(started(&drain(&mut s)), vec![1]);
}

#[test]
fn unreadable_call_streams_are_answered_as_documented() {
    let mut s = server(ServerConfig::default());
    let cases = [
        (CallStreamError::Empty, Some((ErrorKind::BadRequest, None))),
        (
            CallStreamError::Malformed("bad magic".into()),
            Some((ErrorKind::BadRequest, Some(StreamCode::Refused))),
        ),
        (
            CallStreamError::OverLimit("data_len".into()),
            Some((ErrorKind::OverLimit, Some(StreamCode::Refused))),
        ),
        (
            CallStreamError::NotACall(crate::Kind::Ping),
            Some((ErrorKind::BadRequest, Some(StreamCode::Refused))),
        ),
        (
            CallStreamError::TrailingBytes,
            Some((ErrorKind::BadRequest, Some(StreamCode::Refused))),
        ),
        (CallStreamError::Reset(7), None),
    ];
    for (stream, (error, expected)) in cases.into_iter().enumerate() {
        let stream = stream as StreamIndex;
        s.call_opened(at(0), stream);
        s.call_unreadable(at(0), stream, error);
        let out = drain(&mut s);
        match expected {
            Some((kind, stop)) => assert_eq!(refusals(&out), vec![(stream, 0, kind, stop)]),
            None => assert!(refusals(&out).is_empty(), "{out:?}"),
        }
    }
}

#[test]
fn cancel_stops_the_call_and_resets_its_stream() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, Some(5)));
    drain(&mut s);
    s.handle_message(at(1), Message::Cancel { request_id: 1 })
        .unwrap();
    assert_eq!(
        drain(&mut s),
        vec![
            ServerOutput::Stop { stream: 0, id: 1 },
            ServerOutput::Reset {
                stream: 0,
                code: StreamCode::Cancelled
            }
        ]
    );
    assert_eq!(
        s.poll_timeout(),
        Some(at(601)),
        "only the idle timer is left"
    );
    assert!(!s.reply(at(2), 1, Ok(Tree::None)));
    s.handle_message(at(1), Message::Cancel { request_id: 1 })
        .unwrap();
    assert!(drain(&mut s).is_empty());
}

#[test]
fn a_deadline_stops_the_call_and_resets_its_stream() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, Some(5)));
    deliver(&mut s, at(0), 1, call(2, Some(2)));
    deliver(&mut s, at(0), 2, call(3, None));
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(at(2)));
    s.handle_timeout(at(5));
    let out = drain(&mut s);
    assert_eq!(
        resets(&out),
        vec![(1, StreamCode::Expired), (0, StreamCode::Expired)]
    );
    assert!(!s.reply(at(6), 1, Ok(Tree::None)));
    assert!(s.reply(at(6), 3, Ok(Tree::None)));
}

#[test]
fn a_reply_after_an_unhandled_deadline_resets_the_stream() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, Some(2)));
    drain(&mut s);
    assert!(!s.reply(at(2), 1, Ok(Tree::None)));
    assert_eq!(resets(&drain(&mut s)), vec![(0, StreamCode::Expired)]);
    assert_eq!(s.open_requests(), 0);
}

#[test]
fn ping_is_answered() {
    let mut s = server(ServerConfig::default());
    s.handle_message(at(0), Message::Ping { nonce: 9 }).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![ServerOutput::Transmit(Message::Pong { nonce: 9 })]
    );
}

#[test]
fn a_client_goodbye_stops_its_calls_and_closes() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::Normal,
        message: String::new(),
    });
    s.handle_message(at(0), bye).unwrap();
    let out = drain(&mut s);
    assert_eq!(out[0], ServerOutput::Stop { stream: 0, id: 1 });
    assert_eq!(close(&out), Some(CloseCode::Normal));
    assert!(s.is_closed());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn shutdown_lets_replies_out_before_its_goodbye_then_waits_for_the_client() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    s.begin_shutdown(at(1), at(6));
    assert!(s.is_shutting_down());
    deliver(&mut s, at(1), 1, call(2, None));
    let out = drain(&mut s);
    assert_eq!(refusals(&out), vec![(1, 2, ErrorKind::ShuttingDown, None)]);
    s.reply_sent(at(1), 1);
    assert!(s.reply(at(2), 1, Ok(Tree::None)));
    let out = drain(&mut s);
    assert_eq!(goodbye(&out), None, "the reply is not written yet");
    s.reply_sent(at(3), 0);
    let out = drain(&mut s);
    assert_eq!(goodbye(&out), Some(GoodbyeReason::ShuttingDown));
    assert_eq!(close(&out), None, "the client closes first");
    // The acknowledgement of a normal goodbye does not close: the client may
    // still be reading replies.
    s.goodbye_acknowledged(at(3));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(at(5)), "the close timeout");
    s.handle_timeout(at(5));
    assert_eq!(close(&drain(&mut s)), Some(CloseCode::ShuttingDown));
}

#[test]
fn shutdown_ends_when_the_client_closes() {
    let mut s = server(ServerConfig::default());
    s.begin_shutdown(at(0), at(5));
    assert_eq!(goodbye(&drain(&mut s)), Some(GoodbyeReason::ShuttingDown));
    s.connection_lost(at(0));
    assert!(
        drain(&mut s).is_empty(),
        "no close for a connection that is gone"
    );
    assert!(s.is_closed());
}

#[test]
fn the_end_of_the_grace_period_stops_what_is_left() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    s.begin_shutdown(at(0), at(4));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(at(4));
    let out = drain(&mut s);
    assert!(out.contains(&ServerOutput::Stop { stream: 0, id: 1 }));
    assert_eq!(resets(&out), vec![(0, StreamCode::ShuttingDown)]);
    assert_eq!(goodbye(&out), Some(GoodbyeReason::ShuttingDown));
}

#[test]
fn an_idle_connection_is_closed_normally() {
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_secs(60)),
        peer_timeout: None,
        ..ServerConfig::default()
    };
    let mut s = server(config);
    deliver(&mut s, at(10), 0, call(1, None));
    drain(&mut s);
    s.handle_timeout(at(100));
    assert!(drain(&mut s).is_empty(), "a call is open");
    assert!(s.reply(at(100), 1, Ok(Tree::None)));
    s.reply_sent(at(100), 0);
    drain(&mut s);
    s.handle_message(at(130), Message::Ping { nonce: 1 })
        .unwrap();
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(at(190)));
    s.handle_timeout(at(190));
    assert_eq!(goodbye(&drain(&mut s)), Some(GoodbyeReason::Normal));
    s.handle_timeout(at(192));
    assert_eq!(close(&drain(&mut s)), Some(CloseCode::Normal));
}

#[test]
fn client_only_messages_on_the_control_stream_are_a_protocol_error() {
    for msg in [
        Message::Reply(Reply {
            request_id: 1,
            result: Ok(Tree::None),
        }),
        hello(None),
        Message::Call(call(2, None)),
    ] {
        let mut s = server(ServerConfig::default());
        deliver(&mut s, at(0), 0, call(1, None));
        drain(&mut s);
        let err = s.handle_message(at(0), msg).unwrap_err();
        assert!(matches!(err, ServerMessageError::Unexpected { .. }));
        let out = drain(&mut s);
        assert!(out.contains(&ServerOutput::Stop { stream: 0, id: 1 }));
        assert_eq!(goodbye(&out), Some(GoodbyeReason::ProtocolError));
        s.goodbye_acknowledged(at(0));
        assert_eq!(close(&drain(&mut s)), Some(CloseCode::ProtocolError));
    }
}

#[test]
fn connection_lost_stops_open_calls() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(4, None));
    drain(&mut s);
    s.connection_lost(at(0));
    assert_eq!(drain(&mut s), vec![ServerOutput::Stop { stream: 0, id: 4 }]);
    s.connection_lost(at(0));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn zero_max_in_flight_means_one() {
    let config = ServerConfig {
        max_in_flight: 0,
        ..ServerConfig::default()
    };
    let mut s = server(config);
    deliver(&mut s, at_ms(0), 0, call(1, None));
    assert_eq!(started(&drain(&mut s)), vec![1]);
}

#[test]
fn a_stream_opened_after_the_goodbye_or_the_close_is_reset_not_left_waiting() {
    // Defect 5: a stream accepted after the machine closed got nothing, so the
    // task serving it waited forever. Every stream the machine will not take
    // is reset, so its task ends.
    let mut s = server(ServerConfig::default());
    s.begin_shutdown(at(0), at(5));
    assert_eq!(goodbye(&drain(&mut s)), Some(GoodbyeReason::ShuttingDown));
    s.call_opened(at(1), 0);
    assert_eq!(resets(&drain(&mut s)), vec![(0, StreamCode::ShuttingDown)]);
    s.handle_timeout(at(3));
    assert_eq!(close(&drain(&mut s)), Some(CloseCode::ShuttingDown));
    assert!(s.is_closed());
    s.call_opened(at(4), 1);
    assert_eq!(resets(&drain(&mut s)), vec![(1, StreamCode::ShuttingDown)]);
    s.call_received(at(4), 1, call(7, None));
    assert!(drain(&mut s).is_empty(), "the call is not admitted");
}

/// `docs/wire-format.md` §4 and §10: request id 0 is reserved; a Call with it
/// is answered on its stream by a Reply with id 0 and kind bad request, and
/// never reaches the application.
#[test]
fn a_call_with_request_id_0_is_refused_with_bad_request() {
    let mut s = server(ServerConfig::default());
    deliver(&mut s, at(0), 0, call(0, None));
    let out = drain(&mut s);
    assert!(admitted(&out).is_empty());
    assert_eq!(refusals(&out), vec![(0, 0, ErrorKind::BadRequest, None)]);
    let message = out.iter().find_map(|o| match o {
        ServerOutput::Reply {
            reply: Reply { result: Err(e), .. },
            ..
        } => Some(e.message.clone()),
        _ => None,
    });
    assert!(message.unwrap().contains("reserved"));
}

/// `docs/wire-format.md` §10: clients ping, the server only answers.
#[test]
fn the_server_never_pings() {
    let mut s = server(ServerConfig {
        peer_timeout: None,
        ..ServerConfig::default()
    });
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    for t in 1..120 {
        s.handle_timeout(at(t * 5));
        let out = drain(&mut s);
        assert!(
            !out.iter()
                .any(|o| matches!(o, ServerOutput::Transmit(Message::Ping { .. }))),
            "{out:?}"
        );
    }
}

fn peer_timeout(secs: u64) -> ServerConfig {
    ServerConfig {
        peer_timeout: Some(Duration::from_secs(secs)),
        ..ServerConfig::default()
    }
}

#[test]
fn a_silent_client_with_a_call_running_is_closed_at_the_peer_timeout() {
    let mut s = server(peer_timeout(10));
    deliver(&mut s, at(0), 0, call(1, None));
    assert_eq!(started(&drain(&mut s)), vec![1]);
    assert_eq!(s.poll_timeout(), Some(at(10)));
    // The client's pings while it waits are signs of life.
    s.handle_message(at(4), Message::Ping { nonce: 1 }).unwrap();
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(at(14)));
    s.handle_timeout(at(13));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(at(14)));
    s.handle_timeout(at(14));
    let out = drain(&mut s);
    assert!(
        out.contains(&ServerOutput::Stop { stream: 0, id: 1 }),
        "{out:?}"
    );
    assert_eq!(close(&out), Some(CloseCode::PeerTimeout), "{out:?}");
    assert_eq!(goodbye(&out), None, "a dead client is not said goodbye to");
    assert!(s.is_closed());
    assert_eq!(s.open_requests(), 0);
    assert_eq!(s.streams(), 0);
    assert!(
        !s.reply(at(15), 1, Ok(Tree::None)),
        "its result is discarded"
    );
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_reply_being_written_is_kept_while_it_makes_progress_then_the_client_is_timed_out() {
    let mut s = server(peer_timeout(10));
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    s.handle_message(at(5), Message::Ping { nonce: 1 }).unwrap();
    assert!(s.reply(at(6), 1, Ok(Tree::None)));
    drain(&mut s);
    // A large reply: QUIC takes its bytes as the client grants credit.
    for t in [8, 12, 17, 20] {
        s.heard(at(t));
        s.handle_timeout(at(t));
        assert!(drain(&mut s).is_empty(), "progress at {t}");
    }
    assert_eq!(s.poll_timeout(), Some(at(30)));
    // The client died: the write stalls.
    s.handle_timeout(at(30));
    let out = drain(&mut s);
    assert_eq!(close(&out), Some(CloseCode::PeerTimeout), "{out:?}");
}

#[test]
fn an_upload_in_progress_is_a_sign_of_life() {
    let mut s = server(peer_timeout(10));
    s.call_opened(at(0), 0);
    s.call_head(at(0), 0, head(1));
    drain(&mut s);
    for t in (2..40).step_by(3) {
        s.call_progress(at(t), 0);
        s.handle_timeout(at(t));
        assert!(drain(&mut s).is_empty(), "progress at {t}");
    }
    s.call_args(at(40), 0, tree!(1));
    assert_eq!(started(&drain(&mut s)), vec![1]);
    assert_eq!(s.poll_timeout(), Some(at(50)));
}

#[test]
fn a_connection_holding_nothing_is_not_timed_out_for_silence() {
    let mut s = server(ServerConfig {
        idle_timeout: None,
        ..peer_timeout(10)
    });
    assert_eq!(s.poll_timeout(), None);
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    assert!(s.reply(at(1), 1, Ok(Tree::None)));
    s.reply_sent(at(1), 0);
    drain(&mut s);
    assert_eq!(s.poll_timeout(), None, "nothing held, no timer");
    s.handle_timeout(at(3600));
    assert!(drain(&mut s).is_empty());
    // A call after an hour of silence: the silence counts from it.
    deliver(&mut s, at(3600), 1, call(2, None));
    assert_eq!(started(&drain(&mut s)), vec![2]);
    assert_eq!(s.poll_timeout(), Some(at(3610)));
}

#[test]
fn without_a_peer_timeout_a_silent_client_keeps_its_calls() {
    let mut s = server(ServerConfig {
        peer_timeout: None,
        ..ServerConfig::default()
    });
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    s.handle_timeout(at(100_000));
    assert!(drain(&mut s).is_empty());
    assert!(s.is_open(1));
}

#[test]
fn a_draining_server_times_out_a_silent_client_too() {
    let mut s = server(peer_timeout(10));
    deliver(&mut s, at(0), 0, call(1, None));
    drain(&mut s);
    s.begin_shutdown(at(1), at(60));
    drain(&mut s);
    s.handle_timeout(at(10));
    let out = drain(&mut s);
    assert!(
        out.contains(&ServerOutput::Stop { stream: 0, id: 1 }),
        "{out:?}"
    );
    assert_eq!(close(&out), Some(CloseCode::PeerTimeout), "{out:?}");
}
