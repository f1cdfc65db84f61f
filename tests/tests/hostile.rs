//! Hostile peers over the network: raw QUIC connections speaking the wire
//! format by hand declare huge sections and stop, open floods of streams and
//! connections, trickle, and send garbage. Each gets a clear error or a closed
//! stream or connection, the server's receive memory stays within its
//! budgets, and a good client keeps working throughout.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{raw_connection, raw_session, within, Fixture};
use teleport_protocol::{encode, tree, Array, Call, DType, ErrorKind, Message, Reply, Tree};
use teleport_quic::{RecvStream, SendStream, TransportError};

const MIB: usize = 1 << 20;

fn call(id: u64, method: &str, args: Tree) -> Message {
    Message::Call(Call {
        request_id: id,
        method: method.into(),
        timeout: None,
        args,
    })
}

/// The bytes of a call to `echo` with one `u8` array of `declared` bytes,
/// up to the start of its data section: what a peer sends before it stops.
fn call_prefix(id: u64, declared: usize) -> Vec<u8> {
    // Zeroed memory the kernel hands out untouched: no cost until read.
    let args = tree!({"data": (Array::zeros(DType::U8, [declared]).unwrap())});
    let encoded = encode(&call(id, "echo", args)).unwrap();
    let total = encoded.len() as usize;
    let mut prefix = Vec::new();
    for chunk in encoded.into_chunks() {
        let want = (total - declared).saturating_sub(prefix.len());
        if want == 0 {
            break;
        }
        prefix.extend_from_slice(&chunk[..want.min(chunk.len())]);
    }
    assert_eq!(prefix.len(), total - declared);
    prefix
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A `Call` of `echo` whose argument is a map of a million keys, each `none`.
fn million_key_map_call() -> Vec<u8> {
    let mut header = Vec::new();
    varint(&mut header, 7); // request id
    varint(&mut header, 4);
    header.extend_from_slice(b"echo");
    header.push(0); // no timeout
    header.push(8); // map
    varint(&mut header, 1_000_000);
    for i in 0..1_000_000u32 {
        let key = i.to_string();
        varint(&mut header, key.len() as u64);
        header.extend_from_slice(key.as_bytes());
        header.push(0); // none
    }
    let mut message = b"TLPT".to_vec();
    message.extend_from_slice(&[1, 2, 0, 0]); // version 1, Call, no flags
    message.extend_from_slice(&(header.len() as u64).to_le_bytes());
    message.extend_from_slice(&0u64.to_le_bytes());
    message.extend_from_slice(&header);
    message
}

/// Held by the tests that measure the process's resident memory and by those
/// that hold hundreds of MiB, so the measured never see the others' arrays.
static RESIDENT_MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's resident memory, from `/proc/self/status` (0 elsewhere).
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<usize>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// What `raw_session` returns: endpoint, connection, control stream.
type Session = (
    teleport_quic::Connector,
    teleport_quic::Connection,
    (SendStream, RecvStream),
);

/// `count` sessions of `raw_session`, each its own connection.
async fn raw_sessions(fixture: &Fixture, count: usize) -> Vec<Session> {
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        sessions.push(raw_session(fixture).await);
    }
    sessions
}

/// `per_connection` calls on each session's connection, each declaring
/// `declared` bytes of data and sending one byte of it, then nothing.
async fn stalled_calls(
    sessions: &[Session],
    per_connection: u64,
    declared: usize,
) -> Vec<(SendStream, RecvStream)> {
    let mut streams = Vec::new();
    for (_, connection, _) in sessions {
        for id in 0..per_connection {
            let (mut send, recv) = connection.open_stream().await.unwrap();
            let mut bytes = call_prefix(id + 1, declared);
            bytes.push(0); // one data byte, then nothing
            send.send_raw(&bytes).await.unwrap();
            streams.push((send, recv));
        }
    }
    streams
}

async fn reply_on(recv: &mut RecvStream) -> Reply {
    match within("a reply", recv.receive(|_| {})).await {
        Ok(Some(Message::Reply(reply))) => reply,
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// A good client's calls, small and large, all answered correctly.
async fn good_client_works(fixture: &Fixture) {
    let client = fixture.client().await;
    assert_eq!(
        within("small call", client.call("add", tree!({"a": 2, "b": 3})))
            .await
            .unwrap(),
        tree!(5)
    );
    let array = Array::new(DType::U8, [MIB], vec![7u8; MIB]).unwrap();
    let back = within("1 MiB echo", client.call("echo", tree!((array.clone()))))
        .await
        .unwrap();
    assert_eq!(back, tree!((array)));
}

#[tokio::test]
async fn calls_that_declare_a_gigabyte_and_stop_cost_what_they_sent_and_time_out() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let fixture = Fixture::start_with(|b| {
        b.call_progress_timeout(Some(Duration::from_secs(2)))
            .max_in_flight(64)
    })
    .await;
    // Four connections, 64 calls each (the most in flight per connection),
    // each call declaring 1 GiB and sending one byte of it.
    let sessions = raw_sessions(&fixture, 4).await;
    let before = rss();
    let mut streams = stalled_calls(&sessions, 64, 1 << 30).await;
    // The calls of a connection declare together far more than its budget,
    // so one of them at a time may hold memory (its first 64 KiB step, for
    // its one byte); the others wait, holding nothing, until it completes.
    common::wait_until("the bytes are charged", || {
        fixture.server.receive_memory() >= 4 * (64 << 10)
    })
    .await;
    let reserved = fixture.server.receive_memory();
    let grown = rss().saturating_sub(before);
    eprintln!(
        "256 stalled 1 GiB calls on 4 connections: {reserved} bytes reserved, RSS grew {grown} bytes"
    );
    assert!(reserved <= 256 * (64 << 10), "{reserved} bytes reserved");
    assert!(grown < 64 * MIB, "RSS grew by {grown} bytes");

    // A good client is served while the stalled calls wait.
    good_client_works(&fixture).await;

    // The progress timeout refuses every stalled call with a clear error
    // and gives their memory back.
    for (_send, recv) in &mut streams {
        let reply = reply_on(recv).await;
        let error = reply.result.unwrap_err();
        assert!(
            error.message.contains("stalled")
                || error.message.contains("progress")
                || error.message.contains("no byte"),
            "{error}"
        );
    }
    common::wait_until("the memory is given back", || {
        fixture.server.receive_memory() == 0
    })
    .await;
    good_client_works(&fixture).await;
}

/// Sections between the first 64 KiB charging step and 8 MiB (the size that
/// always had a mapping of its own) must cost the pages the bytes filled, not
/// the size declared: the budget charges what arrived. (They went to a zeroed
/// heap buffer, resident whole, until 2026-12-04.)
#[tokio::test]
async fn calls_that_declare_megabytes_and_stop_cost_what_they_sent() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let fixture = Fixture::start_with(|b| {
        b.call_progress_timeout(Some(Duration::from_secs(6)))
            .max_in_flight(64)
    })
    .await;
    // 128 calls on two connections, each declaring 7 MiB and sending one
    // byte: 896 MiB declared in all, less than each connection's budget, so
    // every one may start at once. The progress timeout is long enough for
    // all 128 to be open before the first is refused, on a slow machine too.
    let sessions = raw_sessions(&fixture, 2).await;
    let before = rss();
    let mut streams = stalled_calls(&sessions, 64, 7 * MIB).await;
    common::wait_until("every call's byte is charged", || {
        fixture.server.receive_memory() >= 128 * (64 << 10)
    })
    .await;
    let reserved = fixture.server.receive_memory();
    let grown = rss().saturating_sub(before);
    eprintln!("128 stalled 7 MiB calls: {reserved} bytes reserved, RSS grew {grown} bytes");
    assert!(reserved <= 128 * (64 << 10), "{reserved} bytes reserved");
    assert!(grown < 64 * MIB, "RSS grew by {grown} bytes");
    good_client_works(&fixture).await;
    // The progress timeout refuses them and gives their memory back.
    for (_send, recv) in &mut streams {
        assert!(reply_on(recv).await.result.is_err());
    }
    common::wait_until("the memory is given back", || {
        fixture.server.receive_memory() == 0
    })
    .await;
}

#[tokio::test]
async fn declarations_over_the_budget_or_the_limit_are_refused_at_the_header() {
    let fixture = Fixture::start_with(|b| b.connection_receive_memory(64 * MIB)).await;
    let (_connector, connection, _control) = raw_session(&fixture).await;

    // 128 MiB: within the message limit, over the connection's budget.
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&call_prefix(1, 128 * MIB)).await.unwrap();
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OverLimit);
    assert!(
        error
            .message
            .contains("connection's receive memory budget of 67108864 bytes"),
        "{error}"
    );

    // A terabyte: over the message limit itself.
    let mut bytes = call_prefix(2, 64);
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&bytes).await.unwrap();
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OverLimit);
    assert!(error.message.contains("1099511627776"), "{error}");

    assert_eq!(fixture.server.receive_memory(), 0);
    good_client_works(&fixture).await;
}

#[tokio::test]
async fn a_call_waits_for_memory_held_by_arrays_still_in_use() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let kept: Arc<Mutex<Vec<Tree>>> = Arc::default();
    let fixture = Fixture::start_with(|b| {
        let kept = kept.clone();
        b.connection_receive_memory(8 * MIB)
            .bind("keep", move |args: Tree| {
                let kept = kept.clone();
                async move {
                    kept.lock().unwrap().push(args);
                    Ok(tree!(null))
                }
            })
    })
    .await;
    let client = fixture.client().await;
    let six = Array::zeros(DType::U8, [6 * MIB]).unwrap();
    within("keep", client.call("keep", tree!((six))))
        .await
        .unwrap();
    let held = fixture.server.receive_memory();
    assert!(held >= 6 * MIB, "{held}");

    // 4 MiB more do not fit the connection's 8 MiB: the call waits...
    let four = Array::new(DType::U8, [4 * MIB], vec![3u8; 4 * MIB]).unwrap();
    let pending = client.call("echo", tree!((four.clone())));
    let pending = tokio::spawn(pending);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "the call should wait for memory");
    assert!(fixture.server.receive_memory() <= 8 * MIB);

    // ... until the kept arrays are dropped.
    kept.lock().unwrap().clear();
    let back = within("the waiting call", pending).await.unwrap().unwrap();
    assert_eq!(back, tree!((four)));
    common::wait_until("all memory given back", || {
        fixture.server.receive_memory() == 0
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_caps_are_refused() {
    let fixture = Fixture::start_with(|b| b.max_connections(3).max_unauthenticated(2)).await;
    // Two connections that never say Hello take the unauthenticated places.
    let (_c1, silent1) = raw_connection(&fixture).await;
    let (_c2, _silent2) = raw_connection(&fixture).await;
    let tls = teleport_quic::ClientTls::pinned(fixture.server.fingerprint());
    let connector = teleport_quic::Connector::new(
        &tls,
        &teleport_quic::TransportConfig::default(),
        Default::default(),
    )
    .unwrap();
    let refused = within(
        "a third unauthenticated connection",
        connector.connect(fixture.server.local_addr(), "localhost"),
    )
    .await;
    assert!(
        matches!(refused, Err(TransportError::Refused(_))),
        "{refused:?}"
    );
    assert_eq!(fixture.server.stats().connections_refused, 1);

    // One leaves: a good client gets in (the third place overall).
    silent1.close(teleport_protocol::CloseCode::Normal, "bye");
    common::wait_until("the place is free", || fixture.server.connections() == 1).await;
    let client = fixture.client().await;
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );
    // Now 2 open (one unauthenticated); one more makes 3; a fourth is refused.
    let (_c3, _third, _control3) = raw_session(&fixture).await;
    let refused = within(
        "a fourth connection",
        connector.connect(fixture.server.local_addr(), "localhost"),
    )
    .await;
    assert!(
        matches!(refused, Err(TransportError::Refused(_))),
        "{refused:?}"
    );
    assert_eq!(
        within("call", client.call("echo", tree!(2))).await.unwrap(),
        tree!(2)
    );
}

#[tokio::test]
async fn idle_and_silent_connections_are_closed_despite_keep_alives() {
    let fixture = Fixture::start_with(|b| {
        b.idle_timeout(Some(Duration::from_millis(500)))
            .hello_timeout(Duration::from_millis(500))
    })
    .await;
    // The raw connections send QUIC keep-alives (15 s by default) but no
    // Teleport message: the idle one after its Hello, the silent one none.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(raw_session(&fixture).await);
    }
    let (_c, silent) = raw_connection(&fixture).await;
    within("the silent connection closes", silent.closed()).await;
    for (_connector, connection, (_send, mut recv)) in idle {
        // The server says goodbye on the control stream, then closes.
        let goodbye = within("goodbye", recv.receive(|_| {})).await;
        assert!(
            matches!(&goodbye, Ok(Some(Message::Goodbye(g))) if g.message.contains("idle")),
            "{goodbye:?}"
        );
        within("closed", connection.closed()).await;
    }
    common::wait_until("all closed", || fixture.server.connections() == 0).await;
    good_client_works(&fixture).await;
}

#[tokio::test]
async fn a_slow_trickle_is_refused_once_bytes_stop_for_the_progress_timeout() {
    let fixture =
        Fixture::start_with(|b| b.call_progress_timeout(Some(Duration::from_millis(300)))).await;
    let (_connector, connection, _control) = raw_session(&fixture).await;
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    let bytes = call_prefix(1, 16 * MIB);
    // The header in pieces quicker than the timeout, then one byte a second.
    for piece in bytes.chunks(8) {
        send.send_raw(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..10 {
            if send.send_raw(&[0]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert!(!error.message.is_empty());
    trickle.abort();
    good_client_works(&fixture).await;
}

#[tokio::test]
async fn garbage_bombs_and_stream_floods_get_errors_and_a_good_client_is_served() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let fixture = Fixture::start().await;
    let (_connector, connection, _control) = raw_session(&fixture).await;
    let before = rss();

    // A depth bomb: lists nested past the depth limit (64).
    let mut bomb = tree!(1);
    for _ in 0..200 {
        bomb = Tree::from(vec![bomb]);
    }
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send(&call(1, "echo", bomb)).await.unwrap();
    send.finish();
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OverLimit, "{error}");

    // A map of a million keys, written by hand (section 5 of
    // docs/wire-format.md): past the node limit (2^20 nodes).
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&million_key_map_call()).await.unwrap();
    send.finish();
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OverLimit, "{error}");
    assert!(error.message.contains("nodes"), "{error}");

    // A list of 1.1 million nodes: the same limit.
    let wide: Tree = (0..1_100_000u32).map(|_| tree!(null)).collect();
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send(&call(2, "echo", wide)).await.unwrap();
    send.finish();
    let error = reply_on(&mut recv).await.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::OverLimit, "{error}");

    // Garbage, a truncated call and an oversized header declaration.
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&[0xff; 100]).await.unwrap();
    send.finish();
    assert_eq!(
        reply_on(&mut recv).await.result.unwrap_err().kind,
        ErrorKind::BadRequest
    );
    let mut huge_header = call_prefix(3, 64);
    huge_header[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&huge_header[..24]).await.unwrap();
    assert_eq!(
        reply_on(&mut recv).await.result.unwrap_err().kind,
        ErrorKind::OverLimit
    );

    // A thousand streams at once, each a call that stops after its header:
    // those past the 64 in flight are refused, the rest time out later.
    let mut flood = Vec::new();
    for id in 0..1000u64 {
        let (mut send, recv) = connection.open_stream().await.unwrap();
        send.send_raw(&call_prefix(100 + id, 4096)).await.unwrap();
        flood.push((send, recv));
    }
    let mut refused = 0;
    for (_send, recv) in flood.iter_mut().skip(64) {
        let error = reply_on(recv).await.result.unwrap_err();
        assert_eq!(error.kind, ErrorKind::OverLimit, "{error}");
        refused += 1;
    }
    assert_eq!(refused, 936);

    // Plain UDP garbage at the server's port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        let junk: Vec<u8> = (0..1200u32)
            .map(|j| (i.wrapping_mul(31) ^ j) as u8)
            .collect();
        udp.send_to(&junk, fixture.server.local_addr())
            .await
            .unwrap();
    }

    good_client_works(&fixture).await;
    let grown = rss().saturating_sub(before);
    eprintln!("after the bombs and floods RSS grew {grown} bytes");
    assert!(fixture.server.receive_memory() <= 64 * (64 << 10));
}

/// Eight 8 MiB echoes made at once on `client`'s connection, each checked.
async fn eight_echoes_at_once(client: &teleport_client::Client) {
    let calls: Vec<_> = (0..8u8)
        .map(|i| {
            let array = Array::new(DType::U8, [8 * MIB], vec![i; 8 * MIB]).unwrap();
            (
                array.clone(),
                tokio::spawn(client.call("echo", tree!((array)))),
            )
        })
        .collect();
    for (sent, call) in calls {
        let back = within("an echo", call).await.unwrap().unwrap();
        assert_eq!(back, tree!((sent)));
    }
}

/// Eight 8 MiB echoes at once on one connection whose budget holds 20 MiB:
/// grown in step, every upload would hold part of the budget and wait for
/// the rest for ever. They complete, some waiting for others, and the budget
/// is never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_uploads_than_the_budget_holds_all_complete() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let fixture = Fixture::start_with(|b| b.connection_receive_memory(20 * MIB)).await;
    let client = fixture.client().await;
    eight_echoes_at_once(&client).await;
    common::wait_until("all memory given back", || {
        fixture.server.receive_memory() == 0
    })
    .await;
}

/// The same with flow-control windows small against the arrays: the calls
/// waiting for memory fill their stream windows with data nobody reads, and
/// without more credit that data would take the whole connection window and
/// starve the call the budget lets through (and the client's pings with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_memory_do_not_starve_the_others_of_flow_control_credit() {
    let _measured_alone = RESIDENT_MEMORY.lock().await;
    let mut transport = teleport_quic::TransportConfig::default();
    transport.stream_receive_window = 2 * MIB as u64;
    transport.receive_window = 4 * MIB as u64;
    let fixture = Fixture::start_with(|b| {
        b.connection_receive_memory(20 * MIB)
            .transport(transport.clone())
    })
    .await;
    let client = within(
        "connecting",
        fixture.client_builder().transport(transport).connect(),
    )
    .await
    .unwrap();
    eight_echoes_at_once(&client).await;
}
