//! What the server's and the client's connection drivers share: the clock
//! their state machines see, the one timer that calls `handle_timeout`, and
//! the control stream's writer and reader.
//!
//! A driver in this project decides nothing: it moves bytes and time between
//! the network and a state machine of `teleport-protocol`, which sits behind a
//! mutex that every task touching the connection locks (quinn's own model).
//! These pieces are the parts of that job that do not depend on which side
//! the machine is, written once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use teleport_protocol::{Message, Timestamp};
use tokio::sync::{mpsc, Notify};

use crate::{RecvStream, SendStream, TransportError};

/// The time a state machine sees: monotonic, measured from when the clock was
/// made. It is tokio's clock, so a test with paused time moves it too.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Now, as a [`Timestamp`].
    pub fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.origin.elapsed())
    }

    /// `at` as a tokio instant, for sleeping until it (a time too far to
    /// represent becomes a year from now).
    pub fn instant(&self, at: Timestamp) -> Instant {
        self.origin
            .checked_add(at.since_origin())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    }
}

/// "No deadline" in [`Timer`]'s armed slot.
const UNARMED: u64 = u64::MAX;

/// The one timer of a state machine: a task sleeps until the machine's
/// `poll_timeout()` and then calls its `handle_timeout`.
///
/// After every input, the driver calls [`rearm`](Timer::rearm) with the
/// machine's new `poll_timeout()`; it wakes the timer task only if the new
/// deadline is earlier than the one it sleeps until (a wake-up per call
/// would cost a context switch per call, and most calls move no deadline
/// earlier). A timer that fires early finds nothing due, which the machines
/// allow.
#[derive(Debug, Default)]
pub struct Timer {
    notify: Notify,
    /// What the task sleeps until, in µs of the clock; [`UNARMED`] if none.
    armed: AtomicU64,
    stopped: AtomicBool,
}

fn micros(at: Timestamp) -> u64 {
    u64::try_from(at.since_origin().as_micros()).unwrap_or(UNARMED - 1)
}

impl Timer {
    /// A timer with nothing armed.
    pub fn new() -> Timer {
        Timer {
            notify: Notify::new(),
            armed: AtomicU64::new(UNARMED),
            stopped: AtomicBool::new(false),
        }
    }

    /// The machine's next deadline is now `next`: wake the task if it must
    /// fire earlier than it is set to.
    pub fn rearm(&self, next: Option<Timestamp>) {
        let Some(next) = next else { return };
        let next = micros(next);
        if self.armed.fetch_min(next, Ordering::AcqRel) > next {
            self.notify.notify_one();
        }
    }

    /// Ends [`run`](Timer::run).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Runs the timer of the machine in `state` until [`stop`](Timer::stop):
    /// sleeps until `poll_timeout` and calls `on_timeout` with the time then
    /// (`on_timeout` calls the machine's `handle_timeout` and carries out its
    /// outputs). Sleeps without a deadline while there is none: an idle
    /// connection costs nothing.
    pub async fn run<S>(
        &self,
        clock: &Clock,
        state: &Mutex<S>,
        poll_timeout: impl Fn(&S) -> Option<Timestamp>,
        mut on_timeout: impl FnMut(&mut S, Timestamp),
    ) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let next = {
                let state = state.lock().unwrap_or_else(|p| p.into_inner());
                let next = poll_timeout(&state);
                self.armed
                    .store(next.map_or(UNARMED, micros), Ordering::Release);
                next
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.instant(at)) => {
                            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                            on_timeout(&mut state, clock.now());
                        }
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// The sending end of a control stream: messages go out in order.
#[derive(Clone, Debug)]
pub struct ControlSender {
    queue: mpsc::UnboundedSender<Message>,
}

impl ControlSender {
    /// Queues `message`; false if the writer has stopped (the stream failed
    /// or a Goodbye was already sent).
    pub fn send(&self, message: Message) -> bool {
        self.queue.send(message).is_ok()
    }
}

/// Starts the task that writes a control stream's messages in order.
///
/// A `Goodbye` is the last message of a control stream: after it the writer
/// finishes the stream, waits until the peer has acknowledged it, calls
/// `on_goodbye_acknowledged` (the machine decides what that means) and ends.
/// The writer sets no time limit of its own: the machines' close timers bound
/// how long anyone waits.
pub fn spawn_control_writer(
    mut send: SendStream,
    on_goodbye_acknowledged: impl FnOnce() + Send + 'static,
) -> ControlSender {
    let (queue, mut messages) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let goodbye = matches!(message, Message::Goodbye(_));
            if let Err(e) = send.send(&message).await {
                tracing::debug!(error = %e, "the control stream could not be written");
                return;
            }
            if goodbye {
                send.finish();
                if send.stopped().await.is_ok() {
                    on_goodbye_acknowledged();
                }
                return;
            }
        }
    });
    ControlSender { queue }
}

/// Reads a control stream until it ends: every chunk's size goes to
/// `on_bytes` (a sign of life), every message (or the stream's end, `None`, or
/// its failure) to `on_message`, which returns false to stop reading.
pub async fn read_control<B, M>(mut recv: RecvStream, mut on_bytes: B, mut on_message: M)
where
    B: FnMut(usize) + Send,
    M: FnMut(Result<Option<Message>, TransportError>) -> bool + Send,
{
    loop {
        let received = recv.receive(&mut on_bytes).await;
        let ended = !matches!(received, Ok(Some(_)));
        if !on_message(received) || ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_the_deadline_and_rearms_earlier_only() {
        let clock = Clock::new();
        let timer = Arc::new(Timer::new());
        // The "machine": a deadline and the times it was handled at.
        let state = Arc::new(Mutex::new((
            Some(Timestamp::from_micros(50_000)),
            Vec::new(),
        )));
        let task = {
            let (timer, state) = (timer.clone(), state.clone());
            tokio::spawn(async move {
                timer
                    .run(
                        &clock,
                        &state,
                        |s: &(Option<Timestamp>, Vec<Timestamp>)| s.0,
                        |s, now| {
                            s.1.push(now);
                            s.0 = None;
                        },
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // An earlier deadline wakes the task; a later one would not need to.
        state.lock().unwrap().0 = Some(Timestamp::from_micros(20_000));
        timer.rearm(Some(Timestamp::from_micros(20_000)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fired = state.lock().unwrap().1.clone();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert!(fired[0] >= Timestamp::from_micros(20_000));
        assert!(fired[0] < Timestamp::from_micros(50_000));
        timer.stop();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("stop ends the timer")
            .unwrap();
    }
}
