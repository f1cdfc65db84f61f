//! The connection's life as the client machine runs it: ending a connection
//! (re-sending what may run twice, failing the rest), failed attempts and their
//! backoff, and whether to keep trying.

use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use super::*;

impl ClientProtocol {
    /// Connection `conn` is over (lost, dead, refused by a goodbye, or broken
    /// by a protocol violation). Its calls in flight are sent again if they may
    /// run twice, else fail with `cause`; then the client reconnects, or
    /// stays lost. `said_goodbye`: the server ended it on purpose.
    pub(super) fn end_connection(
        &mut self,
        now: Timestamp,
        conn: ConnId,
        cause: CallError,
        said_goodbye: bool,
    ) {
        let lasted = match self.link {
            Link::Up { since, .. } => now - since,
            _ => Duration::ZERO,
        };
        if said_goodbye {
            self.out.push_back(ClientOutput::CloseConnection {
                conn,
                code: CloseCode::Normal,
                reason: String::from("the server said goodbye"),
            });
        }
        self.timers.remove(Timer::GoodbyeWait);
        self.last_error = Some(format!("{cause}"));
        self.link = Link::Idle;
        self.liveness.set_busy(now, false);
        let reconnect = self.config.reconnect;
        // Calls that may run twice go first on the next connection, in their
        // original order; the others fail.
        let lost = self.ids_in_order(|e| e.at == Where::InFlight { conn });
        let mut resend = Vec::new();
        for id in lost {
            let entry = self.calls.get_mut(&id).expect("listed above");
            if reconnect.is_some() && entry.idempotent && entry.args.is_some() {
                entry.at = Where::Queued { since: now };
                self.in_flight -= 1;
                self.stats.resent += 1;
                resend.push(id);
            } else {
                self.complete(now, id, Err(cause.clone()));
            }
        }
        for &id in resend.iter().rev() {
            self.queue.push_front(id);
        }
        // A normal goodbye (a server closes idle connections): connect again
        // when there is something to send, whether reconnecting is on or not.
        let idle_close = said_goodbye
            && matches!(
                cause,
                CallError::ServerClosed {
                    reason: GoodbyeReason::Normal,
                    ..
                }
            );
        let Some(backoff) = reconnect.or(idle_close.then(Backoff::default)) else {
            self.fail_all(now, &cause);
            self.link = Link::Lost { cause };
            return;
        };
        let queued: Vec<RequestId> = self.queue.iter().copied().collect();
        for id in queued {
            self.arm_connect_wait(now, id);
        }
        if idle_close && self.queue.is_empty() && !self.connect_waiting {
            return;
        }
        // A connection that did not last long counts as another failure, so
        // a server that accepts and then fails is not retried at full pace.
        self.failures = if lasted >= backoff.max {
            1
        } else {
            self.failures.saturating_add(1).max(1)
        };
        self.link = Link::Backoff;
        self.timers
            .set(Timer::Backoff, now + backoff.wait(self.failures));
    }

    /// The attempt in progress failed. `give_up` is the error a waiting
    /// `connect()` returns at once (a permanent failure); otherwise it waits
    /// on while attempts continue.
    pub(super) fn attempt_failed(
        &mut self,
        now: Timestamp,
        reason: String,
        give_up: Option<ConnectError>,
    ) {
        self.timers.remove(Timer::Attempt);
        self.last_error = Some(reason);
        self.link = Link::Idle;
        self.failures = self.failures.saturating_add(1);
        if let Some(error) = give_up {
            self.give_up_connect(error);
        }
        if !self.wants_connection() {
            self.stop_trying_if_unwanted();
            return;
        }
        let backoff = self.config.reconnect.unwrap_or_default();
        self.link = Link::Backoff;
        self.timers
            .set(Timer::Backoff, now + backoff.wait(self.failures));
    }

    /// Whether attempts should go on: reconnecting is on, or someone waits
    /// (a `connect()`, or queued calls).
    pub(super) fn wants_connection(&self) -> bool {
        self.config.reconnect.is_some() || self.connect_waiting || !self.queue.is_empty()
    }

    /// With nobody waiting and reconnecting off, stop attempting and fail the
    /// queued calls with the last error.
    pub(super) fn stop_trying_if_unwanted(&mut self) {
        if self.wants_connection() {
            return;
        }
        self.timers.remove(Timer::Backoff);
        if let Link::Connecting { conn } | Link::Handshaking { conn } = self.link {
            self.out.push_back(ClientOutput::CloseConnection {
                conn,
                code: CloseCode::Normal,
                reason: String::from("nobody waits for the connection"),
            });
        }
        if matches!(
            self.link,
            Link::Backoff | Link::Connecting { .. } | Link::Handshaking { .. }
        ) {
            self.link = Link::Idle;
        }
    }

    pub(super) fn give_up_connect(&mut self, error: ConnectError) {
        if self.connect_waiting {
            self.connect_waiting = false;
            self.timers.remove(Timer::ConnectDeadline);
            self.out.push_back(ClientOutput::ConnectResult(Err(error)));
        }
    }

    /// The timeout of the attempt about to start: doubling with each failure.
    pub(super) fn attempt_timeout(&self) -> Duration {
        let doublings = self.attempts.saturating_sub(1).min(16);
        self.config
            .first_attempt_timeout
            .checked_mul(1 << doublings)
            .unwrap_or(self.config.connect_timeout)
            .min(
                self.config
                    .connect_timeout
                    .max(self.config.first_attempt_timeout),
            )
    }

    pub(super) fn start_attempt(&mut self, now: Timestamp) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.attempts = self.attempts.saturating_add(1);
        self.link = Link::Connecting { conn };
        self.timers.remove(Timer::Backoff);
        self.timers
            .set(Timer::Attempt, now + self.attempt_timeout());
        self.out.push_back(ClientOutput::Connect { conn });
    }

    pub(super) fn finish_close(&mut self, conn: ConnId) {
        self.timers.remove(Timer::CloseWait);
        self.out.push_back(ClientOutput::CloseConnection {
            conn,
            code: CloseCode::Normal,
            reason: String::from("the client closed the connection"),
        });
        self.link = Link::Closed;
    }
}
