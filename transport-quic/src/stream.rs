//! One QUIC stream carries one call: the request one way, the reply the other.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use teleport_protocol::wire::CallHeader;
use teleport_protocol::{encode, Decoder, Limits, Message, StreamCode};

use crate::endpoint::WaitingCredit;
use crate::memory::{charge, BudgetedMemory, LargeMessageMemory, MemoryBudget, Reservation};
use crate::recycle::Recycler;
use crate::TransportError;

/// A message encoded for sending: its gather list, and how much of it is written.
#[derive(Debug)]
pub struct Outgoing {
    chunks: Vec<Bytes>,
    next: usize,
}

impl Outgoing {
    /// Encodes `message` (array data is referenced, not copied).
    pub fn new(message: &Message) -> Result<Outgoing, TransportError> {
        Ok(Outgoing {
            chunks: encode(message)?.into_chunks(),
            next: 0,
        })
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub struct SendStream {
    inner: quinn::SendStream,
}

impl SendStream {
    pub(crate) fn new(inner: quinn::SendStream) -> SendStream {
        SendStream { inner }
    }

    /// Writes one message. Array data goes from the message's own buffers to
    /// quinn without a copy (a gather write of the encoded chunks).
    pub async fn send(&mut self, message: &Message) -> Result<(), TransportError> {
        let mut chunks: Vec<Bytes> = encode(message)?.into_chunks();
        self.inner.write_all_chunks(&mut chunks).await?;
        Ok(())
    }

    /// [`send`](Self::send), calling `on_written` with the size of every
    /// piece QUIC takes after the first. QUIC takes a stream's bytes only as
    /// far as the peer's flow-control credit reaches, so each piece after
    /// the first is a sign that the peer is reading; the first (all of a
    /// small message) shows nothing, and is not reported.
    pub async fn send_watching(
        &mut self,
        message: &Message,
        mut on_written: impl FnMut(usize),
    ) -> Result<(), TransportError> {
        let mut chunks: Vec<Bytes> = encode(message)?.into_chunks();
        let mut pending = &mut chunks[..];
        let mut first = true;
        while !pending.is_empty() {
            let written = self.inner.write_chunks(pending).await?;
            pending = &mut pending[written.chunks..];
            if !std::mem::take(&mut first) {
                on_written(written.bytes);
            }
        }
        Ok(())
    }

    /// Writes as much of `message` as fits now, without waiting. Returns true
    /// once all of it is written; otherwise finish with
    /// [`send_outgoing`](Self::send_outgoing). Lets a caller send a small
    /// message from where it is, without a task to wait in.
    pub fn try_send_now(&mut self, message: &mut Outgoing) -> Result<bool, TransportError> {
        while message.next < message.chunks.len() {
            let pending = &mut message.chunks[message.next..];
            match self.inner.write_chunks(pending).now_or_never() {
                None => return Ok(false),
                Some(written) => message.next += written?.chunks,
            }
        }
        Ok(true)
    }

    /// Writes the rest of `message`.
    pub async fn send_outgoing(&mut self, message: &mut Outgoing) -> Result<(), TransportError> {
        let pending = &mut message.chunks[message.next..];
        self.inner.write_all_chunks(pending).await?;
        message.next = message.chunks.len();
        Ok(())
    }

    /// Writes bytes as they are, for tools and tests that speak the wire format
    /// themselves (or want to send something malformed on purpose).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.inner.write_all(bytes).await?;
        Ok(())
    }

    /// Says no more messages follow. The bytes already written are still
    /// delivered (and retransmitted) after this returns.
    pub fn finish(&mut self) {
        // Finishing twice, or after a reset, is not an error worth reporting.
        let _ = self.inner.finish();
    }

    /// Abandons the stream: unsent bytes are dropped and the peer sees `code`.
    pub fn reset(&mut self, code: StreamCode) {
        let _ = self.inner.reset(varint(code.code()));
    }

    /// Waits until the peer has acknowledged everything (after
    /// [`finish`](Self::finish)) or stopped reading. Returns the stop code if
    /// it stopped.
    pub async fn stopped(&mut self) -> Result<Option<StreamCode>, TransportError> {
        match self.inner.stopped().await {
            Ok(code) => Ok(code.map(|c| StreamCode::from_code(c.into_inner()))),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(e.into()),
            Err(quinn::StoppedError::ZeroRttRejected) => {
                Err(TransportError::Misuse("0-RTT data rejected".into()))
            }
        }
    }
}

/// The receiving half of a stream: decodes the messages that arrive on it.
#[derive(Debug)]
pub struct RecvStream {
    inner: quinn::RecvStream,
    decoder: Decoder,
    /// Bytes of the last chunk beyond the message it completed.
    leftover: Bytes,
    /// The peer's end of the stream was read (so `try_finish` needs no
    /// second look, which would take the connection's lock).
    ended: bool,
    /// Where data sections are charged, if they are.
    memory: Option<Arc<BudgetedMemory>>,
    /// The reservation of the data section arriving now.
    reservation: Option<Arc<Reservation>>,
    /// Flow-control credit for while this stream waits for memory.
    credit: Option<Arc<WaitingCredit>>,
}

impl RecvStream {
    pub(crate) fn new(
        inner: quinn::RecvStream,
        limits: Limits,
        budget: Option<&Arc<MemoryBudget>>,
        credit: Option<Arc<WaitingCredit>>,
        recycler: &Arc<Recycler>,
        unbudgeted: &Arc<LargeMessageMemory>,
    ) -> RecvStream {
        // A budgeted stream's allocator is its own: it hands the stream the
        // reservation of the buffer it made.
        let memory =
            budget.map(|b| Arc::new(BudgetedMemory::new(b.clone(), Some(recycler.clone()))));
        let decoder = Decoder::new(limits);
        let decoder = match &memory {
            Some(memory) => decoder.with_allocator(memory.clone()),
            None => decoder.with_allocator(unbudgeted.clone()),
        };
        RecvStream {
            inner,
            decoder,
            leftover: Bytes::new(),
            ended: false,
            memory,
            reservation: None,
            credit,
        }
    }

    /// Once the decoder has started a data section: takes its buffer's
    /// reservation, and fails if the section can never fit the budget.
    fn claim_reservation(&mut self) -> Result<(), TransportError> {
        let Some(memory) = &self.memory else {
            return Ok(());
        };
        let Some((_, total)) = self.decoder.data_progress() else {
            return Ok(());
        };
        if self.reservation.is_none() {
            self.reservation = memory.take();
            let (limit, budget) = memory.budget().tightest();
            if total > limit {
                return Err(TransportError::MemoryBudget {
                    needed: total,
                    budget,
                    limit,
                });
            }
            if let Some(reservation) = &self.reservation {
                reservation.claim(charge(total, total));
            }
        }
        Ok(())
    }

    /// How many bytes of data the decoder may write from the next `available`
    /// bytes of input: all of them without a budget; with one, as many as the
    /// reservation covers, grown to cover them if that may be granted now.
    /// [`Allowance::Wait`] if it must wait for memory. Fails if the message
    /// being received can never fit the budget.
    fn data_allowance(&mut self, available: usize) -> Result<Allowance, TransportError> {
        if self.memory.is_none() {
            return Ok(Allowance::Now(usize::MAX));
        }
        let Some((filled, total)) = self.decoder.data_progress() else {
            // Headers are bounded by the limits; the data section starts
            // with nothing allowed, so its buffer is made and charged first.
            return Ok(Allowance::Now(0));
        };
        self.claim_reservation()?;
        let Some(reservation) = &self.reservation else {
            // Granted whole when its buffer was made, or the decoder fell
            // back to memory of its own: nothing (more) to charge.
            return Ok(Allowance::Now(usize::MAX));
        };
        let end = filled.saturating_add(available).min(total);
        let target = charge(end, total);
        if !reservation.try_grow_to(target) {
            return Ok(Allowance::Wait(target));
        }
        Ok(Allowance::Now(
            reservation.held().min(total).saturating_sub(filled),
        ))
    }

    /// Waits until the reservation is `target` bytes; then what
    /// [`data_allowance`](Self::data_allowance) would say.
    async fn wait_for_memory(
        &mut self,
        target: usize,
        available: usize,
    ) -> Result<usize, TransportError> {
        if let Some(reservation) = &self.reservation {
            let _waiting = self.credit.as_ref().map(|credit| credit.waiting());
            reservation.grow_to(target).await;
        }
        match self.data_allowance(available)? {
            Allowance::Now(allowed) => Ok(allowed),
            // Granted meanwhile to `target`, so only more than that waits:
            // the next round asks again.
            Allowance::Wait(_) => Ok(0),
        }
    }

    /// Reads the next message, or `None` if the peer finished the stream
    /// cleanly between messages.
    ///
    /// `on_bytes` is told how many bytes arrived whenever the rest of the
    /// message must be waited for, so a caller can count a large message
    /// still arriving as a sign that the peer is alive (a message that
    /// arrives in one piece is told by its return).
    /// Every array of the message is 64-byte aligned: the one copy of its bytes
    /// is the decoder's, from quinn's buffers into the message's own memory.
    pub async fn receive(
        &mut self,
        mut on_bytes: impl FnMut(usize),
    ) -> Result<Option<Message>, TransportError> {
        self.receive_watching(|progress| {
            if let Progress::Bytes(n) = progress {
                on_bytes(n)
            }
        })
        .await
    }

    /// [`receive`](Self::receive), also reporting the header of a `Call`
    /// once it is decoded, if its arrays are still to arrive (once per
    /// message, only for calls with a data section, and not for a call
    /// whose bytes are all here: that one is returned at once).
    pub async fn receive_watching(
        &mut self,
        mut watch: impl FnMut(Progress<'_>),
    ) -> Result<Option<Message>, TransportError> {
        // Progress is told only when the rest of the message must be waited
        // for (more bytes, or memory): a message that is all here goes to the
        // caller whole, in one step, and is itself the sign of progress.
        let mut told = Told::default();
        loop {
            if !self.leftover.is_empty() {
                let available = self.leftover.len();
                let allowed = match self.data_allowance(available)? {
                    Allowance::Now(allowed) => allowed,
                    Allowance::Wait(target) => {
                        told.tell(&self.decoder, &mut watch);
                        self.wait_for_memory(target, available).await?
                    }
                };
                let mut input: &[u8] = &self.leftover;
                let result = self.decoder.feed_bounded(&mut input, allowed);
                let consumed = available - input.len();
                let _ = self.leftover.split_to(consumed);
                if let Some(message) = result? {
                    // Its buffer holds the reservation from now on; it
                    // claims nothing more.
                    if let Some(reservation) = self.reservation.take() {
                        reservation.end_claim();
                    }
                    return Ok(Some(message));
                }
                self.claim_reservation()?;
                continue;
            }
            told.tell(&self.decoder, &mut watch);
            match self.inner.read_chunk(usize::MAX, true).await? {
                Some(chunk) => {
                    told.untold_bytes += chunk.bytes.len();
                    self.leftover = chunk.bytes;
                }
                None => {
                    self.ended = true;
                    return match self.decoder.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(TransportError::Truncated(e)),
                    };
                }
            }
        }
    }

    /// Waits for the end of a stream that carries one message, after that
    /// message: fails with [`TransportError::TrailingBytes`] if more bytes
    /// follow, or with the peer's reset.
    pub async fn expect_end(&mut self) -> Result<(), TransportError> {
        if !self.leftover.is_empty() {
            return Err(TransportError::TrailingBytes);
        }
        if self.ended {
            return Ok(());
        }
        match self.inner.read_chunk(usize::MAX, true).await? {
            None => {
                self.ended = true;
                Ok(())
            }
            Some(chunk) => {
                self.leftover = chunk.bytes;
                Err(TransportError::TrailingBytes)
            }
        }
    }

    /// Notes, without waiting, whether the peer has finished the stream with
    /// nothing after the last message. Call it when no more messages are
    /// expected: dropping a stream whose end was not read makes quinn send the
    /// peer a `STOP_SENDING`, an extra frame per call. Returns true if the end
    /// was read.
    pub fn try_finish(&mut self) -> bool {
        if self.ended {
            return true;
        }
        if !self.leftover.is_empty() {
            return false;
        }
        match self.inner.read_chunk(usize::MAX, true).now_or_never() {
            Some(Ok(None)) => {
                self.ended = true;
                true
            }
            Some(Ok(Some(chunk))) => {
                // More bytes after the message: keep them for `receive`.
                self.leftover = chunk.bytes;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: StreamCode) {
        let _ = self.inner.stop(varint(code.code()));
    }
}

/// What [`RecvStream::receive_watching`] has yet to report.
#[derive(Default)]
struct Told {
    untold_bytes: usize,
    header: bool,
}

impl Told {
    /// Reports the bytes that arrived since the last report and, once, the
    /// header of a call whose arrays are still to come.
    fn tell(&mut self, decoder: &Decoder, watch: &mut impl FnMut(Progress<'_>)) {
        if self.untold_bytes > 0 {
            watch(Progress::Bytes(std::mem::take(&mut self.untold_bytes)));
        }
        if !self.header {
            if let Some(header) = decoder.partial_call() {
                self.header = true;
                watch(Progress::CallHeader(header));
            }
        }
    }
}

/// How much data the decoder may write now.
enum Allowance {
    /// This many bytes.
    Now(usize),
    /// None until the reservation grows to this many bytes.
    Wait(usize),
}

/// What [`RecvStream::receive_watching`] reports while a message arrives.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// This many bytes arrived since the last report, and the message is
    /// not complete: more are awaited.
    Bytes(usize),
    /// The header of the `Call` being received; its arrays are still arriving.
    CallHeader(CallHeader<'a>),
}

fn varint(code: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::MAX)
}
