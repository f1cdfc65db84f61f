//! Encoding a message into a gather list: one buffer for the preamble and header,
//! then the caller's own array buffers, never copied.

use alloc::vec::Vec;
use bytes::Bytes;
use serde::Serialize;

use super::{align_up, head, tag, EncodeError, ALIGN, MAGIC, PREAMBLE_LEN, VERSION};
use crate::message::Message;
use crate::Tree;

/// Zero bytes to pad data regions with, shared by every message.
static ZEROS: [u8; ALIGN] = [0; ALIGN];

/// An encoded message as a list of buffers to write in order (a gather list).
///
/// The first buffer holds the preamble, header and padding; the rest are the
/// tree's array and bytes-leaf buffers themselves (reference-counted, not copied)
/// with static zero padding between them. Hand them to a vectored write.
#[derive(Clone, Debug)]
pub struct Encoded {
    chunks: Vec<Bytes>,
    len: u64,
}

impl Encoded {
    /// The buffers to send, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    pub fn into_chunks(self) -> Vec<Bytes> {
        self.chunks
    }

    /// Total bytes across all chunks.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: every message has at least a preamble.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole message in one contiguous buffer. This copies the array data;
    /// use it for tests, test vectors and small messages, not on the data path.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

/// Appends the postcard encoding of `value` to `buf`.
fn put<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> Result<(), EncodeError> {
    *buf = postcard::to_extend(value, core::mem::take(buf)).map_err(EncodeError::Header)?;
    Ok(())
}

/// Serialises a shape as a postcard sequence of `u64`.
struct Shape<'a>(&'a [usize]);

impl Serialize for Shape<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|&d| d as u64))
    }
}

/// The gather list being built: a slot for the head, then each data region's
/// buffer in order with the zero padding before it.
struct Regions {
    chunks: Vec<Bytes>,
    /// The data section's end so far (an empty region counts at its offset).
    end: u64,
    /// The bytes of the data section in `chunks` so far.
    written: u64,
}

impl Regions {
    /// Places a region of `data` and returns its offset in the data section.
    fn place(&mut self, data: &Bytes) -> Result<u64, EncodeError> {
        let offset = align_up(self.end).ok_or(EncodeError::SizeOverflow)?;
        self.end = offset
            .checked_add(data.len() as u64)
            .ok_or(EncodeError::SizeOverflow)?;
        if !data.is_empty() {
            self.pad_to(offset);
            self.chunks.push(data.clone());
            self.written = self.end;
        }
        Ok(offset)
    }

    /// Zero padding up to `offset`: under 64 bytes by construction.
    fn pad_to(&mut self, offset: u64) {
        let gap = (offset - self.written) as usize;
        if gap > 0 {
            self.chunks.push(Bytes::from_static(&ZEROS[..gap]));
            self.written = offset;
        }
    }
}

/// Writes `root` as a pre-order node list, placing its data regions.
fn put_tree(buf: &mut Vec<u8>, root: &Tree, regions: &mut Regions) -> Result<(), EncodeError> {
    enum Item<'a> {
        Node(&'a Tree),
        Key(&'a str),
    }
    // An explicit stack: a deep tree must not overflow the call stack. The
    // root is not on it, so a tree that is one leaf allocates none.
    let mut stack = Vec::new();
    let mut next = Some(Item::Node(root));
    while let Some(item) = next.take().or_else(|| stack.pop()) {
        let node = match item {
            Item::Key(k) => {
                put(buf, k)?;
                continue;
            }
            Item::Node(n) => n,
        };
        match node {
            Tree::None => put(buf, &tag::NONE)?,
            Tree::Bool(b) => put(buf, &(tag::BOOL, *b))?,
            Tree::Int(i) => put(buf, &(tag::INT, *i))?,
            Tree::Float(f) => put(buf, &(tag::FLOAT, *f))?,
            Tree::Str(s) => put(buf, &(tag::STR, s.as_str()))?,
            Tree::Bytes(b) => {
                let offset = regions.place(b)?;
                put(buf, &(tag::BYTES, offset, b.len() as u64))?;
            }
            Tree::Array(a) => {
                let offset = regions.place(a.data())?;
                put(
                    buf,
                    &(tag::ARRAY, a.dtype().code(), offset, Shape(a.shape())),
                )?;
            }
            Tree::List(l) => {
                put(buf, &(tag::LIST, l.len() as u64))?;
                stack.extend(l.iter().rev().map(Item::Node));
            }
            Tree::Map(m) => {
                put(buf, &(tag::MAP, m.len() as u64))?;
                for (k, v) in m.iter().rev() {
                    stack.push(Item::Node(v));
                    stack.push(Item::Key(k));
                }
            }
        }
    }
    Ok(())
}

/// Encodes `message` into a gather list. Array data is referenced, not copied.
pub fn encode(message: &Message) -> Result<Encoded, EncodeError> {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[0u8; PREAMBLE_LEN]);
    // The head's slot comes first; it is filled in last.
    let mut chunks = Vec::with_capacity(4);
    chunks.push(Bytes::new());
    let mut regions = Regions {
        chunks,
        end: 0,
        written: 0,
    };
    match message {
        Message::Hello(h) => put(
            &mut buf,
            &head::Hello {
                agent: &h.agent,
                token: h.token.as_deref(),
            },
        )?,
        Message::Call(c) => {
            let timeout_us = c
                .timeout
                .map(|t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX));
            put(
                &mut buf,
                &head::Call {
                    request_id: c.request_id,
                    method: &c.method,
                    timeout_us,
                },
            )?;
            put_tree(&mut buf, &c.args, &mut regions)?;
        }
        Message::Reply(r) => match &r.result {
            Ok(tree) => {
                put(
                    &mut buf,
                    &head::Reply {
                        request_id: r.request_id,
                        error: None,
                    },
                )?;
                put_tree(&mut buf, tree, &mut regions)?;
            }
            Err(e) => put(
                &mut buf,
                &head::Reply {
                    request_id: r.request_id,
                    error: Some(head::Error {
                        kind: e.kind.code(),
                        type_name: &e.type_name,
                        message: &e.message,
                    }),
                },
            )?,
        },
        Message::Ping { nonce } | Message::Pong { nonce } => put(&mut buf, nonce)?,
        Message::Cancel { request_id } => put(&mut buf, request_id)?,
        Message::Goodbye(g) => put(
            &mut buf,
            &head::Goodbye {
                reason: g.reason.code(),
                message: &g.message,
            },
        )?,
    }

    let header_len = (buf.len() - PREAMBLE_LEN) as u64;
    let data_len = regions.end;
    if data_len > 0 {
        // The data section starts on a 64-byte boundary of the message, so a
        // receiver that holds the whole message in one aligned buffer (a file,
        // a datagram) can view arrays in place.
        let padded = align_up(buf.len() as u64).ok_or(EncodeError::SizeOverflow)? as usize;
        buf.resize(padded, 0);
    }
    buf[0..4].copy_from_slice(&MAGIC);
    buf[4] = VERSION;
    buf[5] = message.kind().code();
    buf[6..8].copy_from_slice(&0u16.to_le_bytes());
    buf[8..16].copy_from_slice(&header_len.to_le_bytes());
    buf[16..24].copy_from_slice(&data_len.to_le_bytes());

    let head_len = buf.len() as u64;
    // An empty region last in the tree still starts on a boundary, so the data
    // section can end in padding.
    regions.pad_to(data_len);
    let mut chunks = regions.chunks;
    chunks[0] = Bytes::from(buf);
    let len = head_len
        .checked_add(data_len)
        .ok_or(EncodeError::SizeOverflow)?;
    Ok(Encoded { chunks, len })
}
