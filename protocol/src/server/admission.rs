//! Admission: calls are admitted in stream order once their header is in,
//! refused (with the reason on their own stream) or left to wait for
//! capacity; a stream whose bytes stop coming is answered at its progress
//! deadline.

use super::*;

/// The streams not yet admitted or refused, in stream order. Streams are
/// reported in the order the transport accepted them, so a new one goes at
/// the back and admission takes from the front: no tree to keep per call.
/// One that leaves from the middle (a reset, a refusal) is found by binary
/// search; there are at most as many as the peer may have streams open.
#[derive(Debug, Default)]
pub(super) struct Gate(VecDeque<StreamIndex>);

impl Gate {
    pub(super) fn insert(&mut self, stream: StreamIndex) {
        match self.0.back() {
            Some(&last) if last >= stream => {
                if let Err(at) = self.0.binary_search(&stream) {
                    self.0.insert(at, stream);
                }
            }
            _ => self.0.push_back(stream),
        }
    }

    pub(super) fn remove(&mut self, stream: &StreamIndex) {
        if let Ok(at) = self.0.binary_search(stream) {
            self.0.remove(at);
        }
    }

    pub(super) fn first(&self) -> Option<&StreamIndex> {
        self.0.front()
    }

    pub(super) fn pop_first(&mut self) -> Option<StreamIndex> {
        self.0.pop_front()
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

impl ServerProtocol {
    /// Admits or refuses the streams at the front of the gate, in order, for
    /// as long as the front one has its header.
    pub(super) fn run_gate(&mut self, now: Timestamp) {
        if !matches!(self.phase, Phase::Open | Phase::Draining) {
            return;
        }
        while let Some(&stream) = self.gate.first() {
            let ready = matches!(
                self.streams.get(&stream),
                Some(Stream::Arriving { head: Some(_), .. })
            );
            if !ready {
                break;
            }
            self.gate.pop_first();
            let Some(Stream::Arriving {
                head: Some(head),
                args,
            }) = self.streams.remove(&stream)
            else {
                unreachable!("checked above");
            };
            self.admit(now, stream, head, args);
        }
    }

    pub(super) fn admit(
        &mut self,
        now: Timestamp,
        stream: StreamIndex,
        head: CallHead,
        args: Option<Tree>,
    ) {
        let CallHead {
            request_id: id,
            method,
            timeout,
        } = head;
        // Refusals name the call; an unfinished upload is no longer read.
        let stop = args.is_none().then_some(StreamCode::Refused);
        // Re-inserted so `answer_stream` can mark it replying.
        self.streams.insert(
            stream,
            Stream::Arriving {
                head: None,
                args: None,
            },
        );
        if self.phase == Phase::Draining {
            return self.answer_stream(
                stream,
                id,
                ErrorKind::ShuttingDown,
                String::from(
                    "the server is shutting down and takes no new calls; retry on another server \
                     or later",
                ),
                stop,
            );
        }
        if id == 0 {
            return self.answer_stream(
                stream,
                0,
                ErrorKind::BadRequest,
                String::from("request id 0 is reserved; number calls from 1"),
                stop,
            );
        }
        if self.open.contains_key(&id) {
            return self.answer_stream(
                stream,
                id,
                ErrorKind::BadRequest,
                format!("request id {id} is already in use by an open call"),
                stop,
            );
        }
        let deadline = timeout.map(|t| now + t);
        if deadline.is_some_and(|d| d <= now) {
            // A timeout of zero: the caller has already given up.
            self.streams.remove(&stream);
            self.timers.remove(Timer::Progress(stream));
            self.out.push_back(ServerOutput::Reset {
                stream,
                code: StreamCode::Expired,
            });
            return self.after_call_ended(now);
        }
        if let Some(methods) = &self.config.methods {
            if !methods.contains(&method) {
                let names: Vec<&str> = methods.iter().map(String::as_str).collect();
                return self.answer_stream(
                    stream,
                    id,
                    ErrorKind::UnknownMethod,
                    format!("no function is bound as {method:?}; bound: {names:?}"),
                    stop,
                );
            }
        }
        if self.open.len() >= self.config.max_in_flight {
            return self.answer_stream(
                stream,
                id,
                ErrorKind::OverLimit,
                format!(
                    "more than {} calls in flight on one connection; lower the client's \
                     max_in_flight",
                    self.config.max_in_flight
                ),
                stop,
            );
        }
        if let Some(capacity) = &self.config.capacity {
            if !capacity.try_acquire() {
                let max = capacity.max();
                return self.answer_stream(
                    stream,
                    id,
                    ErrorKind::Overloaded,
                    format!(
                        "the server is running {max} calls, its limit; retry later or on another \
                         server"
                    ),
                    stop,
                );
            }
        }
        self.open.insert(id, Open { stream, deadline });
        if let Some(d) = deadline {
            self.timers.set(Timer::Call(id), d);
        }
        let args_done = args.is_some();
        self.streams
            .insert(stream, Stream::Admitted { id, args_done });
        self.out.push_back(ServerOutput::Admitted {
            stream,
            id,
            method,
            deadline,
        });
        if let Some(args) = args {
            self.out
                .push_back(ServerOutput::Arguments { stream, id, args });
        }
    }

    /// Answers the call on `stream` with an error, before or instead of the
    /// application.
    pub(super) fn answer_stream(
        &mut self,
        stream: StreamIndex,
        id: RequestId,
        kind: ErrorKind,
        message: String,
        stop_reading: Option<StreamCode>,
    ) {
        self.timers.remove(Timer::Progress(stream));
        self.streams.insert(stream, Stream::Replying);
        self.out.push_back(ServerOutput::Reply {
            stream,
            reply: Reply {
                request_id: id,
                result: Err(RemoteError::new(kind, SERVER_ERROR_TYPE, message)),
            },
            stop_reading,
        });
    }

    /// A call stream made no progress within the progress timeout.
    pub(super) fn stalled(&mut self, now: Timestamp, stream: StreamIndex) {
        let Some(timeout) = self.config.call_progress_timeout else {
            return;
        };
        let id = match self.streams.get(&stream) {
            Some(Stream::Arriving { head, .. }) => head.as_ref().map_or(0, |h| h.request_id),
            Some(Stream::Admitted {
                id,
                args_done: false,
            }) => {
                let id = *id;
                self.open.remove(&id);
                self.end_open(id);
                self.out.push_back(ServerOutput::Stop { stream, id });
                id
            }
            _ => return,
        };
        self.gate.remove(&stream);
        self.answer_stream(
            stream,
            id,
            ErrorKind::BadRequest,
            format!(
                "the call stopped arriving: no byte of it for {timeout:?} (the server's \
                 call_progress_timeout)"
            ),
            Some(StreamCode::Refused),
        );
        self.run_gate(now);
    }

    pub(super) fn arm_progress(&mut self, now: Timestamp, stream: StreamIndex) {
        if let Some(t) = self.config.call_progress_timeout {
            self.timers.set(Timer::Progress(stream), now + t);
        }
    }
}
