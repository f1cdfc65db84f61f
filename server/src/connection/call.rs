//! The task serving one call stream: it reads the call, runs it when the
//! state machine says so, and writes the reply (or abandons the stream), doing
//! exactly what the machine's outputs for its stream say.

use std::sync::Arc;

use teleport_protocol::server::{CallHead, CallStreamError, StreamIndex};
use teleport_protocol::Message;
use teleport_quic::{Progress, RecvStream, SendStream, TransportError};

use super::state::{Action, Conn};

/// Serves call stream `stream` until the machine is done with it.
/// `in_span`: the task runs in a call span of its own, whose id and method
/// it records.
pub(crate) async fn serve_call(
    conn: Arc<Conn>,
    stream: StreamIndex,
    mut send: SendStream,
    mut recv: RecvStream,
    in_span: bool,
) {
    // Read from the clock only for the debug line that reports it.
    let started = tracing::enabled!(tracing::Level::DEBUG).then(std::time::Instant::now);
    let ended = |outcome: &str| {
        tracing::debug!(
            outcome,
            elapsed_us = started.map_or(0, |s| s.elapsed().as_micros() as u64),
            "call ended"
        );
    };
    // While the call arrives, the machine may already act on its stream: a
    // refusal at the header, a stalled upload, the connection's end.
    let mut next = tokio::select! {
        action = read_call(&conn, stream, &mut recv) => action,
        action = conn.next_action(stream) => Some(action),
    };
    loop {
        let action = match next.take() {
            Some(action) => action,
            None => conn.next_action(stream).await,
        };
        match action {
            Action::Run { id, method, job } => {
                // The call's span exists only with debug on (see `drive`).
                if in_span {
                    let span = tracing::Span::current();
                    span.record("id", id);
                    span.record("method", &*method);
                }
                tokio::select! {
                    outcome = job => next = conn.reply(stream, id, &method, outcome),
                    // A stop (cancel, expiry, shutdown) drops the job: an
                    // async function stops, a blocking one's result is
                    // discarded when its thread returns.
                    action = conn.next_action(stream) => next = Some(action),
                }
            }
            Action::Stop => {}
            Action::Write {
                reply,
                stop_reading,
            } => {
                match stop_reading {
                    Some(code) => recv.stop(code),
                    // Reading the end (usually seen already) spares the
                    // client a STOP_SENDING when the stream is dropped.
                    None => {
                        recv.try_finish();
                    }
                }
                // Done with before the reply goes: each touch of a stream
                // takes the connection's lock, and once the reply is written
                // the connection's driver is running, on another thread as
                // like as not.
                drop(recv);
                let outcome = reply.result.as_ref().map(|_| ()).map_err(|e| e.kind);
                // Each piece QUIC takes of a large reply shows the client
                // is reading it (the machine's peer timeout).
                let message = Message::Reply(reply);
                let sent = match send.send_watching(&message, |_| conn.heard()).await {
                    Ok(()) => {
                        // quinn delivers (and retransmits) a finished stream
                        // while the connection lives.
                        send.finish();
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, stream, "the reply could not be written");
                        false
                    }
                };
                conn.stream_done(stream, sent);
                match (sent, outcome) {
                    (false, _) => ended("reply not delivered"),
                    (true, Ok(())) => ended("ok"),
                    (true, Err(kind)) => ended(&format!("error ({kind})")),
                }
                return;
            }
            Action::Reset(code) => {
                send.reset(code);
                recv.stop(code);
                conn.stream_done(stream, false);
                ended(&format!("stream reset ({code})"));
                return;
            }
            Action::Ended => {
                conn.stream_done(stream, false);
                ended("connection ended");
                return;
            }
        }
    }
}

/// Reads the call on the stream and reports it (its header early, if its
/// arrays take a while), returning the stream's next action if the machine
/// had one at once. An action the machine takes on the header (a refusal)
/// waits in the stream's mailbox, where the caller's `select!` finds it and
/// stops this reading.
async fn read_call(conn: &Conn, stream: StreamIndex, recv: &mut RecvStream) -> Option<Action> {
    let received = recv
        .receive_watching(|progress| match progress {
            Progress::Bytes(_) => conn.call_progress(stream),
            Progress::CallHeader(header) => conn.call_head(
                stream,
                CallHead {
                    request_id: header.request_id,
                    method: header.method.to_owned(),
                    timeout: header.timeout,
                },
            ),
            _ => {}
        })
        .await;
    let error = match received {
        Ok(Some(Message::Call(call))) => {
            // The stream's end usually came with the call. If it has not,
            // the machine hears of the call's bytes (a call that arrived
            // whole was not reported as progress) before the wait for it.
            if !recv.try_finish() {
                conn.call_progress(stream);
            }
            match recv.expect_end().await {
                Ok(()) => return conn.call_received(stream, call),
                Err(e) => e,
            }
        }
        Ok(Some(other)) => {
            return conn.call_unreadable(stream, CallStreamError::NotACall(other.kind()))
        }
        Ok(None) => return conn.call_unreadable(stream, CallStreamError::Empty),
        Err(e) => e,
    };
    let error = match error {
        TransportError::Decode(e) | TransportError::Truncated(e) if e.is_over_limit() => {
            CallStreamError::OverLimit(e.to_string())
        }
        TransportError::Decode(e) | TransportError::Truncated(e) => {
            CallStreamError::Malformed(e.to_string())
        }
        TransportError::TrailingBytes => CallStreamError::TrailingBytes,
        e @ TransportError::MemoryBudget { .. } => CallStreamError::OverLimit(e.to_string()),
        TransportError::StreamReset(code) => CallStreamError::Reset(code.code()),
        // The whole connection is gone: the accept loop reports it.
        e if e.is_connection_error() => return None,
        e => CallStreamError::Malformed(e.to_string()),
    };
    conn.call_unreadable(stream, error)
}
