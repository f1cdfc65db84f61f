//! Serving one call stream: reading the call, running it when the state
//! machine says so, and writing the reply (or abandoning the stream), doing
//! exactly what the machine's outputs for its stream say. [`start`] runs the
//! first step in the accept loop and spawns the rest only if it waits.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use teleport_protocol::server::{CallHead, CallStreamError, StreamIndex};
use teleport_protocol::Message;
use teleport_quic::{Progress, RecvStream, SendStream, TransportError};

use super::state::{Action, Conn};

/// How long a call's first step may run in the accept loop's task. A
/// function that computes longer than this before it first waits holds up
/// the calls behind it on the connection, so after such a step the next
/// [`SPAWNED_AFTER_LONG_STEP`] calls of the connection start in tasks of
/// their own. (A step can also run long because the thread was preempted;
/// that costs only those calls' tasks.)
pub(crate) const INLINE_STEP_LIMIT: Duration = Duration::from_micros(200);

/// Calls started in tasks of their own after a long first step: a function
/// that always computes long before it waits delays the calls behind it on
/// one call in this many.
pub(crate) const SPAWNED_AFTER_LONG_STEP: u32 = 64;

/// Starts serving one call: its first step runs here, in the accept loop's
/// task, and only a call that then waits (for its arguments, a worker, a
/// timer, a slow reader) gets a task of its own. A small call is read,
/// answered and written in that one step: no task to spawn, schedule and
/// wake (`docs/performance.md`, "Small calls in the accept loop").
/// `spawn_next` counts the calls still to be spawned after a long step.
pub(crate) fn start<F>(serve: F, spawn_next: &AtomicU32)
where
    F: Future<Output = ()> + Send + 'static,
{
    // Only the accept loop touches the count: no race between load and store.
    let to_spawn = spawn_next.load(Ordering::Relaxed);
    if to_spawn > 0 {
        spawn_next.store(to_spawn - 1, Ordering::Relaxed);
        tokio::spawn(serve);
        return;
    }
    let mut serve = Box::pin(serve);
    let started = Instant::now();
    // A waker that does nothing: a call that waits is spawned right after,
    // and its task's first poll looks at everything again, registering its
    // own waker. A panic that escapes the call (the function's own panics
    // are its call's error already) ends this call alone, as it would end
    // a task of its own, not the accept loop.
    let polled = catch_unwind(AssertUnwindSafe(|| {
        serve.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }));
    if started.elapsed() > INLINE_STEP_LIMIT {
        spawn_next.store(SPAWNED_AFTER_LONG_STEP, Ordering::Relaxed);
    }
    match polled {
        Ok(Poll::Ready(())) => {}
        Ok(Poll::Pending) => drop(tokio::spawn(serve)),
        Err(panic) => {
            tracing::error!(
                panic = %crate::function::panic_text(&*panic),
                "serving a call panicked; the call is abandoned"
            );
            // Its drop may panic too; it must not reach the accept loop.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(serve)));
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Starts a call that adds `by` to `ran` and does nothing else.
    fn start_counting(ran: &Arc<AtomicUsize>, by: usize, spawn_next: &AtomicU32) {
        let counted = ran.clone();
        start(
            async move {
                counted.fetch_add(by, Ordering::SeqCst);
            },
            spawn_next,
        );
    }

    /// Waits (bounded) for a call to send on `done`'s other end.
    async fn finished(finished: tokio::sync::oneshot::Receiver<()>, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap_or_else(|_| panic!("{what} within 5 s"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_call_that_finishes_in_its_first_step_runs_in_place() {
        let spawn_next = AtomicU32::new(0);
        let ran = Arc::new(AtomicUsize::new(0));
        start_counting(&ran, 1, &spawn_next);
        // Done before `start` returned: no task was needed.
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(spawn_next.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_call_that_waits_goes_on_in_a_task_of_its_own() {
        let spawn_next = AtomicU32::new(0);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        start(
            async move {
                let _ = wait.await;
                let _ = done.send(());
            },
            &spawn_next,
        );
        go.send(()).unwrap();
        finished(done_rx, "the spawned call finished").await;
        assert_eq!(spawn_next.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_panic_in_a_first_step_ends_that_call_only() {
        let spawn_next = AtomicU32::new(0);
        start(async { panic!("while serving") }, &spawn_next);
        // The accept loop carries on and serves the next call (in a task if
        // printing the panic made the step a long one).
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        start(
            async move {
                let _ = done.send(());
            },
            &spawn_next,
        );
        finished(done_rx, "the next call was served").await;
    }

    #[tokio::test]
    async fn after_a_long_first_step_the_next_calls_start_in_tasks() {
        let spawn_next = AtomicU32::new(0);
        start(
            async {
                // Computes (here: sleeps the thread) past the limit.
                std::thread::sleep(INLINE_STEP_LIMIT * 5);
            },
            &spawn_next,
        );
        assert_eq!(spawn_next.load(Ordering::SeqCst), SPAWNED_AFTER_LONG_STEP);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..SPAWNED_AFTER_LONG_STEP {
            start_counting(&ran, 1, &spawn_next);
        }
        // None of them ran in place: each waits for its task.
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a call ran in place");
        assert_eq!(spawn_next.load(Ordering::SeqCst), 0);
        // The one after them runs in place again.
        start_counting(&ran, 1000, &spawn_next);
        assert_eq!(ran.load(Ordering::SeqCst), 1000);
        // The spawned ones still run.
        tokio::time::timeout(Duration::from_secs(5), async {
            while ran.load(Ordering::SeqCst) < 1000 + SPAWNED_AFTER_LONG_STEP as usize {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the spawned calls ran");
    }
}
