//! One QUIC stream carries one call: the request one way, the reply the other.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use teleport_protocol::{encode, Decoder, Limits, Message};

use crate::memory::LargeMessageMemory;
use crate::TransportError;

/// Application error codes for abandoning a stream (`RESET_STREAM` and
/// `STOP_SENDING`), so the peer can tell why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamCode {
    /// The caller cancelled the call.
    Cancelled,
    /// The call's deadline passed.
    Expired,
    /// The message broke the protocol or a limit.
    Refused,
    /// The side is shutting down.
    ShuttingDown,
}

impl StreamCode {
    /// The code on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            StreamCode::Cancelled => 1,
            StreamCode::Expired => 2,
            StreamCode::Refused => 3,
            StreamCode::ShuttingDown => 4,
        }
    }
}

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
        let _ = self.inner.reset(code.to_u32().into());
    }

    /// Waits until the peer has received everything (after [`finish`](Self::finish))
    /// or stopped reading. Returns the stop code if it stopped.
    pub async fn stopped(&mut self) -> Result<Option<u64>, TransportError> {
        match self.inner.stopped().await {
            Ok(code) => Ok(code.map(|c| c.into_inner())),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(e.into()),
            Err(quinn::StoppedError::ZeroRttRejected) => Err(TransportError::ConnectionFailed(
                "0-RTT data rejected".into(),
            )),
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
}

impl RecvStream {
    pub(crate) fn new(inner: quinn::RecvStream, limits: Limits) -> RecvStream {
        RecvStream {
            inner,
            decoder: Decoder::new(limits).with_allocator(Arc::new(LargeMessageMemory)),
            leftover: Bytes::new(),
        }
    }

    /// Reads the next message, or `None` if the peer finished the stream
    /// cleanly between messages.
    ///
    /// `on_bytes` is told the size of every chunk that arrives, so a caller can
    /// count a large message still arriving as a sign that the peer is alive.
    /// Every array of the message is 64-byte aligned: the one copy of its bytes
    /// is the decoder's, from quinn's buffers into the message's own memory.
    pub async fn receive(
        &mut self,
        mut on_bytes: impl FnMut(usize),
    ) -> Result<Option<Message>, TransportError> {
        loop {
            if !self.leftover.is_empty() {
                let mut input: &[u8] = &self.leftover;
                let before = input.len();
                let result = self.decoder.feed(&mut input);
                let consumed = before - input.len();
                let _ = self.leftover.split_to(consumed);
                if let Some(message) = result? {
                    return Ok(Some(message));
                }
                continue;
            }
            match self.inner.read_chunk(usize::MAX, true).await? {
                Some(chunk) => {
                    on_bytes(chunk.bytes.len());
                    self.leftover = chunk.bytes;
                }
                None => {
                    return match self.decoder.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(TransportError::Truncated(e)),
                    };
                }
            }
        }
    }

    /// Notes, without waiting, whether the peer has finished the stream with
    /// nothing after the last message. Call it when no more messages are
    /// expected: dropping a stream whose end was not read makes quinn send the
    /// peer a `STOP_SENDING`, an extra frame per call. Returns true if the end
    /// was read.
    pub fn try_finish(&mut self) -> bool {
        if !self.leftover.is_empty() {
            return false;
        }
        match self.inner.read_chunk(usize::MAX, true).now_or_never() {
            Some(Ok(None)) => true,
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
        let _ = self.inner.stop(code.to_u32().into());
    }
}
