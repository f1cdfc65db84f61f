//! The incremental decoder: bytes in, in chunks of any size; messages out.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use bytes::Bytes;
use core::time::Duration;

use super::{align_up, tag, DecodeError, ALIGN, MAGIC, PREAMBLE_LEN, VERSION};
use crate::message::{
    Call, ErrorKind, Goodbye, GoodbyeReason, Hello, Kind, Message, RemoteError, Reply,
};
use crate::{Array, DType, Limits, Map, Tree};

/// Reads a stream of messages from bytes that arrive in chunks of any size.
///
/// Feed it with [`Decoder::feed`] until it yields a message; the result is the same
/// whatever the chunking. Every declared length is checked against [`Limits`]
/// before memory is reserved for it. Array data is copied once, from the input
/// chunks into a buffer aligned to 64 bytes, and every array in the message is a
/// view into that buffer.
///
/// ```
/// use teleport_protocol::{encode, tree, Decoder, Limits, Message};
/// let bytes = encode(&Message::Ping { nonce: 7 }).unwrap().to_vec();
/// let mut decoder = Decoder::new(Limits::default());
/// let mut msgs = Vec::new();
/// for chunk in bytes.chunks(5) {
///     let mut input = chunk;
///     while !input.is_empty() {
///         if let Some(m) = decoder.feed(&mut input).unwrap() {
///             msgs.push(m);
///         }
///     }
/// }
/// assert_eq!(msgs, [Message::Ping { nonce: 7 }]);
/// ```
pub struct Decoder {
    limits: Limits,
    state: State,
    allocator: Option<Arc<dyn DataAllocator>>,
}

impl core::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Decoder")
            .field("limits", &self.limits)
            .field("state", &self.state)
            .field("custom_allocator", &self.allocator.is_some())
            .finish()
    }
}

/// The header fields of a `Call` whose data is still arriving; see
/// [`Decoder::partial_call`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallHeader<'a> {
    /// The client's id for the call.
    pub request_id: u64,
    /// The function's name.
    pub method: &'a str,
    /// The timeout as sent.
    pub timeout: Option<Duration>,
}

/// Supplies the memory a message's data section is received into.
///
/// The default is an ordinary heap allocation. An IO layer may do better for
/// large messages, for example memory backed by huge pages, which makes the one
/// copy on receive several times faster for arrays of hundreds of MiB.
pub trait DataAllocator: Send + Sync {
    /// A writable buffer of exactly `len` bytes starting on a 64-byte boundary,
    /// or `None` to use the default for this size. A buffer of the wrong length
    /// or alignment is not used (the decoder falls back to the default).
    fn allocate(&self, len: usize) -> Option<Box<dyn DataBuffer>>;
}

/// Memory that a [`DataAllocator`] hands out: any owned, writable bytes.
pub trait DataBuffer: AsRef<[u8]> + AsMut<[u8]> + Send + 'static {}

impl<T: AsRef<[u8]> + AsMut<[u8]> + Send + 'static> DataBuffer for T {}

/// Lets a [`Bytes`] own a buffer from a [`DataAllocator`].
struct Owned(Box<dyn DataBuffer>);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

#[derive(Debug)]
enum State {
    Preamble {
        buf: [u8; PREAMBLE_LEN],
        filled: usize,
    },
    Header {
        preamble: Preamble,
        buf: Vec<u8>,
    },
    Data(DataState),
    Failed,
}

#[derive(Debug)]
struct DataState {
    message: Message,
    regions: Vec<Region>,
    /// Where the data section starts in the message, for error offsets.
    data_start: u64,
    buf: DataBuf,
    remaining: usize,
}

/// Where the data section is being written.
enum DataBuf {
    /// Heap memory; `skip` bytes at the start reach 64-byte alignment.
    Heap { buf: Vec<u8>, skip: usize },
    /// Memory from a [`DataAllocator`], filled up to `filled`.
    Custom {
        buf: Box<dyn DataBuffer>,
        filled: usize,
    },
}

impl core::fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DataBuf::Heap { buf, .. } => write!(f, "Heap({} bytes)", buf.len()),
            DataBuf::Custom { filled, .. } => write!(f, "Custom({filled} bytes)"),
        }
    }
}

impl DataBuf {
    fn heap(len: usize) -> Result<DataBuf, DecodeError> {
        // The extra ALIGN - 1 bytes let the data start on a 64-byte boundary.
        let capacity = len
            .checked_add(ALIGN - 1)
            .ok_or(DecodeError::TooLargeForPlatform)?;
        // A failed reservation (a size the allocator cannot provide, possible
        // when the limits allow it) is an error, not an abort.
        let mut buf = Vec::new();
        buf.try_reserve_exact(capacity)
            .map_err(|_| DecodeError::TooLargeForPlatform)?;
        let skip = (ALIGN - (buf.as_ptr() as usize) % ALIGN) % ALIGN;
        buf.resize(skip, 0);
        Ok(DataBuf::Heap { buf, skip })
    }

    fn new(len: usize, allocator: Option<&Arc<dyn DataAllocator>>) -> Result<DataBuf, DecodeError> {
        if let Some(mut buf) = allocator.and_then(|a| a.allocate(len)) {
            let mem = (*buf).as_mut();
            if mem.len() == len && (mem.as_ptr() as usize) % ALIGN == 0 {
                return Ok(DataBuf::Custom { buf, filled: 0 });
            }
        }
        DataBuf::heap(len)
    }

    /// Appends input. The room was reserved up front, so nothing reallocates
    /// and the alignment holds.
    fn extend(&mut self, input: &[u8]) {
        match self {
            DataBuf::Heap { buf, .. } => buf.extend_from_slice(input),
            DataBuf::Custom { buf, filled } => {
                (**buf).as_mut()[*filled..*filled + input.len()].copy_from_slice(input);
                *filled += input.len();
            }
        }
    }

    /// Bytes written so far.
    fn filled(&self) -> usize {
        match self {
            DataBuf::Heap { buf, skip } => buf.len() - skip,
            DataBuf::Custom { filled, .. } => *filled,
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            // `Bytes::from` keeps the allocation (no copy), so the alignment holds.
            DataBuf::Heap { buf, skip } => Bytes::from(buf).slice(skip..),
            DataBuf::Custom { buf, .. } => Bytes::from_owner(Owned(buf)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Preamble {
    kind: Kind,
    header_len: usize,
    /// Header plus the padding that follows it.
    header_total: usize,
    data_len: u64,
}

/// A data region of the body, as declared in the header.
#[derive(Clone, Copy, Debug)]
struct Region {
    offset: u64,
    len: u64,
    /// The region of a bool array: every byte must be `0` or `1`.
    bools: bool,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            state: State::Preamble {
                buf: [0; PREAMBLE_LEN],
                filled: 0,
            },
            allocator: None,
        }
    }

    /// Receives data sections into memory from `allocator`.
    pub fn with_allocator(mut self, allocator: Arc<dyn DataAllocator>) -> Decoder {
        self.allocator = Some(allocator);
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The header of the `Call` being received, once its header is decoded
    /// and while its data section is still arriving: what a server needs to
    /// admit the call before its arrays are complete. `None` otherwise (a
    /// call with no data section is returned whole by [`feed`](Self::feed)).
    pub fn partial_call(&self) -> Option<CallHeader<'_>> {
        match &self.state {
            State::Data(DataState {
                message: Message::Call(call),
                ..
            }) => Some(CallHeader {
                request_id: call.request_id,
                method: &call.method,
                timeout: call.timeout,
            }),
            _ => None,
        }
    }

    /// True between messages: no partial message is buffered.
    pub fn is_at_boundary(&self) -> bool {
        matches!(self.state, State::Preamble { filled: 0, .. })
    }

    /// Call when the input has ended: fails if it ended inside a message.
    pub fn finish(&self) -> Result<(), DecodeError> {
        let needed = match &self.state {
            State::Preamble { filled: 0, .. } => return Ok(()),
            State::Preamble { filled, .. } => (PREAMBLE_LEN - filled) as u64,
            // Saturating: with very large limits the sum may not fit in 64 bits.
            State::Header { preamble, buf } => {
                ((preamble.header_total - buf.len()) as u64).saturating_add(preamble.data_len)
            }
            State::Data(d) => d.remaining as u64,
            State::Failed => return Err(DecodeError::Poisoned),
        };
        Err(DecodeError::Truncated { needed })
    }

    /// Consumes bytes from the front of `input` and returns a message when one is
    /// complete. Stops right after a message's last byte, so the rest of `input`
    /// (the next message) is left for the next call.
    ///
    /// After an error the decoder stays failed: the stream's framing is lost.
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<Message>, DecodeError> {
        self.feed_bounded(input, usize::MAX)
    }

    /// [`feed`](Self::feed), writing at most `max_data` bytes of a data
    /// section in this call (headers are consumed as usual). With 0 it stops
    /// at the start of a data section, after its buffer is allocated; see
    /// [`data_progress`](Self::data_progress). Lets an IO layer charge the
    /// memory of a data section to a budget as its bytes arrive.
    pub fn feed_bounded(
        &mut self,
        input: &mut &[u8],
        max_data: usize,
    ) -> Result<Option<Message>, DecodeError> {
        let result = self.feed_inner(input, max_data);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// While a data section arrives: how many of its bytes were written, and
    /// its declared length.
    pub fn data_progress(&self) -> Option<(usize, usize)> {
        match &self.state {
            State::Data(d) => Some((d.buf.filled(), d.buf.filled() + d.remaining)),
            _ => None,
        }
    }

    fn feed_inner(
        &mut self,
        input: &mut &[u8],
        max_data: usize,
    ) -> Result<Option<Message>, DecodeError> {
        loop {
            match &mut self.state {
                State::Failed => return Err(DecodeError::Poisoned),
                State::Preamble { buf, filled } => {
                    let n = (PREAMBLE_LEN - *filled).min(input.len());
                    buf[*filled..*filled + n].copy_from_slice(&input[..n]);
                    *filled += n;
                    *input = &input[n..];
                    if *filled < PREAMBLE_LEN {
                        return Ok(None);
                    }
                    let preamble = parse_preamble(buf, &self.limits)?;
                    self.state = State::Header {
                        preamble,
                        buf: Vec::new(),
                    };
                }
                State::Header { preamble, buf } => {
                    let preamble = *preamble;
                    let total = preamble.header_total;
                    let message = if buf.is_empty() && input.len() >= total {
                        // The whole header is in this chunk: parse it in place.
                        let (h, rest) = input.split_at(total);
                        *input = rest;
                        parse_header_and_padding(&preamble, h, &self.limits)?
                    } else {
                        let n = (total - buf.len()).min(input.len());
                        buf.extend_from_slice(&input[..n]);
                        *input = &input[n..];
                        if buf.len() < total {
                            return Ok(None);
                        }
                        parse_header_and_padding(&preamble, buf, &self.limits)?
                    };
                    let (message, regions) = message;
                    if preamble.data_len == 0 {
                        self.reset();
                        return Ok(Some(message));
                    }
                    // Checked against the limit in parse_preamble.
                    let data_len = usize::try_from(preamble.data_len)
                        .map_err(|_| DecodeError::TooLargeForPlatform)?;
                    self.state = State::Data(DataState {
                        message,
                        regions,
                        data_start: (PREAMBLE_LEN as u64).saturating_add(total as u64),
                        buf: DataBuf::new(data_len, self.allocator.as_ref())?,
                        remaining: data_len,
                    });
                }
                State::Data(d) => {
                    let n = d.remaining.min(input.len()).min(max_data);
                    if n == 0 && d.remaining > 0 {
                        return Ok(None);
                    }
                    // The one copy on receive.
                    d.buf.extend(&input[..n]);
                    d.remaining -= n;
                    *input = &input[n..];
                    if d.remaining > 0 {
                        return Ok(None);
                    }
                    let State::Data(d) = core::mem::replace(
                        &mut self.state,
                        State::Preamble {
                            buf: [0; PREAMBLE_LEN],
                            filled: 0,
                        },
                    ) else {
                        unreachable!("matched State::Data above")
                    };
                    let data = d.buf.freeze();
                    check_data(&data, &d.regions, d.data_start)?;
                    let mut message = d.message;
                    attach_data(&mut message, &data, &d.regions);
                    return Ok(Some(message));
                }
            }
        }
    }

    fn reset(&mut self) {
        self.state = State::Preamble {
            buf: [0; PREAMBLE_LEN],
            filled: 0,
        };
    }
}

/// Decodes exactly one message from `bytes`, which must hold nothing else.
pub fn decode_message(bytes: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    let mut decoder = Decoder::new(limits.clone());
    let mut input = bytes;
    match decoder.feed(&mut input)? {
        Some(message) if input.is_empty() => Ok(message),
        Some(_) => Err(DecodeError::TrailingBytes { len: input.len() }),
        None => {
            decoder.finish()?;
            // Only empty input leaves the decoder at a message boundary.
            Err(DecodeError::Truncated {
                needed: PREAMBLE_LEN as u64,
            })
        }
    }
}

fn parse_preamble(buf: &[u8; PREAMBLE_LEN], limits: &Limits) -> Result<Preamble, DecodeError> {
    let magic: [u8; 4] = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: buf[4],
            supported: VERSION,
        });
    }
    let kind = Kind::from_code(buf[5]).ok_or(DecodeError::UnknownKind(buf[5]))?;
    let flags = u16::from_le_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    let header_len = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let data_len = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    if header_len > limits.max_header_len {
        return Err(DecodeError::HeaderTooLarge {
            len: header_len,
            max: limits.max_header_len,
        });
    }
    if data_len > limits.max_data_len {
        return Err(DecodeError::DataTooLarge {
            len: data_len,
            max: limits.max_data_len,
        });
    }
    if data_len > 0 && !matches!(kind, Kind::Call | Kind::Reply) {
        return Err(DecodeError::UnexpectedData {
            kind,
            len: data_len,
        });
    }
    let header_total = if data_len > 0 {
        align_up(
            (PREAMBLE_LEN as u64)
                .checked_add(header_len)
                .ok_or(DecodeError::SizeOverflow)?,
        )
        .ok_or(DecodeError::SizeOverflow)?
            - PREAMBLE_LEN as u64
    } else {
        header_len
    };
    Ok(Preamble {
        kind,
        header_len: usize::try_from(header_len).map_err(|_| DecodeError::TooLargeForPlatform)?,
        header_total: usize::try_from(header_total)
            .map_err(|_| DecodeError::TooLargeForPlatform)?,
        data_len,
    })
}

/// A cursor over the header that reads the postcard values of section 3 of
/// `docs/wire-format.md`, strictly: a varint in other than its shortest form, an
/// option tag or a bool other than `00`/`01`, a value that overflows its type or
/// runs past the header's end, and a string that is not UTF-8 are all errors, so
/// a header has exactly one encoding. Errors name the header offset where the
/// offending value starts.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn malformed(offset: usize, what: &'static str) -> DecodeError {
        DecodeError::MalformedHeader { offset, what }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(
        &mut self,
        n: usize,
        start: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(Self::malformed(start, what));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let start = self.pos;
        Ok(self.bytes(1, start, what)?[0])
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(DecodeError::BadBool { offset, byte }),
        }
    }

    /// `true` for some (`01`), `false` for none (`00`).
    fn option(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(DecodeError::BadOption { offset, byte, what }),
        }
    }

    /// An unsigned LEB128 varint of a `bits`-bit type, in its shortest form.
    fn varint(&mut self, bits: u32, what: &'static str) -> Result<u64, DecodeError> {
        let start = self.pos;
        let max_bytes = bits.div_ceil(7);
        let mut value = 0u64;
        for i in 0..max_bytes {
            let byte = self.u8(what).map_err(|_| Self::malformed(start, what))?;
            let shift = 7 * i;
            let group = u64::from(byte & 0x7f);
            if i + 1 == max_bytes && (byte & 0x80 != 0 || group >> (bits - shift) != 0) {
                // Longer than the type allows, or overflowing it.
                return Err(Self::malformed(start, what));
            }
            value |= group << shift;
            if byte & 0x80 == 0 {
                // A last byte of zero adds nothing: a shorter form exists.
                if byte == 0 && i > 0 {
                    return Err(DecodeError::NonCanonicalVarint {
                        offset: start,
                        what,
                    });
                }
                return Ok(value);
            }
        }
        Err(Self::malformed(start, what))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        // Fits: the varint was checked against 32 bits.
        Ok(self.varint(32, what)? as u32)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.varint(64, what)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let z = self.varint(64, what)?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn f64(&mut self, what: &'static str) -> Result<f64, DecodeError> {
        let start = self.pos;
        let b = self.bytes(8, start, what)?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| Self::malformed(start, what))?;
        let b = self.bytes(len, start, what)?;
        core::str::from_utf8(b).map_err(|_| Self::malformed(start, what))
    }

    /// A string that is a name: checked against `max_name_len`.
    fn name(&mut self, what: &'static str, limits: &Limits) -> Result<&'a str, DecodeError> {
        let name = self.str(what)?;
        check_name(name, limits)?;
        Ok(name)
    }
}

fn check_name(name: &str, limits: &Limits) -> Result<(), DecodeError> {
    if name.len() > limits.max_name_len {
        return Err(DecodeError::NameTooLong {
            len: name.len(),
            max: limits.max_name_len,
        });
    }
    Ok(())
}

/// Parses the header (`buf[..header_len]`) and checks the padding that follows
/// it (the rest of `buf`) is zero.
fn parse_header_and_padding(
    preamble: &Preamble,
    buf: &[u8],
    limits: &Limits,
) -> Result<(Message, Vec<Region>), DecodeError> {
    let (header, padding) = buf.split_at(preamble.header_len);
    let parsed = parse_header(preamble, header, limits)?;
    if let Some(i) = padding.iter().position(|&b| b != 0) {
        return Err(DecodeError::NonZeroPadding {
            offset: (PREAMBLE_LEN + preamble.header_len + i) as u64,
            byte: padding[i],
        });
    }
    Ok(parsed)
}

/// Checks the data section once it is complete, in byte order: the padding
/// before each region is zero, and every element of a bool array is `0` or
/// `1`. `data_start` is the section's offset in the message, for the errors.
fn check_data(data: &[u8], regions: &[Region], data_start: u64) -> Result<(), DecodeError> {
    let at = |i: usize| data_start.saturating_add(i as u64);
    let mut end = 0usize;
    for r in regions {
        // Regions were validated against data_len, which is data.len().
        let (offset, len) = (r.offset as usize, r.len as usize);
        if let Some(i) = data[end..offset].iter().position(|&b| b != 0) {
            return Err(DecodeError::NonZeroPadding {
                offset: at(end + i),
                byte: data[end + i],
            });
        }
        if r.bools {
            let region = &data[offset..offset + len];
            if let Some(i) = region.iter().position(|&b| b > 1) {
                return Err(DecodeError::BadBoolElement {
                    offset: at(offset + i),
                    byte: region[i],
                });
            }
        }
        end = offset + len;
    }
    Ok(())
}

fn parse_header(
    preamble: &Preamble,
    header: &[u8],
    limits: &Limits,
) -> Result<(Message, Vec<Region>), DecodeError> {
    let mut r = Reader {
        buf: header,
        pos: 0,
    };
    let mut tree_parser = TreeParser {
        limits,
        data_len: preamble.data_len,
        end: 0,
        regions: Vec::new(),
        nodes: 0,
        promised: 0,
    };
    let message = match preamble.kind {
        Kind::Hello => {
            let agent = r.name("hello agent", limits)?;
            let token = match r.option("hello token")? {
                true => Some(r.name("hello token", limits)?),
                false => None,
            };
            Message::Hello(Hello {
                agent: agent.into(),
                token: token.map(String::from),
            })
        }
        Kind::Call => {
            let request_id = r.u64("call request id")?;
            let method = r.name("call method", limits)?.into();
            let timeout_us = match r.option("call timeout")? {
                true => Some(r.u64("call timeout")?),
                false => None,
            };
            let args = tree_parser.parse(&mut r)?;
            Message::Call(Call {
                request_id,
                method,
                timeout: timeout_us.map(Duration::from_micros),
                args,
            })
        }
        Kind::Reply => {
            let request_id = r.u64("reply request id")?;
            let result = match r.option("reply error")? {
                false => Ok(tree_parser.parse(&mut r)?),
                true => {
                    let kind = r.u8("error kind")?;
                    let type_name = r.name("error type name", limits)?;
                    let message = r.str("error message")?;
                    if r.remaining() > 0 || preamble.data_len > 0 {
                        return Err(DecodeError::ErrorReplyWithData {
                            header_bytes: r.remaining(),
                            data_len: preamble.data_len,
                        });
                    }
                    Err(RemoteError {
                        kind: ErrorKind::from_code(kind),
                        type_name: type_name.into(),
                        message: message.into(),
                    })
                }
            };
            Message::Reply(Reply { request_id, result })
        }
        Kind::Ping => Message::Ping {
            nonce: r.u64("ping nonce")?,
        },
        Kind::Pong => Message::Pong {
            nonce: r.u64("pong nonce")?,
        },
        Kind::Cancel => Message::Cancel {
            request_id: r.u64("cancel request id")?,
        },
        Kind::Goodbye => {
            let reason = r.u8("goodbye reason")?;
            let message = r.str("goodbye message")?;
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::from_code(reason),
                message: message.into(),
            })
        }
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingHeaderBytes { len: r.remaining() });
    }
    if tree_parser.end != preamble.data_len {
        return Err(DecodeError::DataLengthMismatch {
            declared: preamble.data_len,
            expected: tree_parser.end,
        });
    }
    Ok((message, tree_parser.regions))
}

/// Reads a pre-order node list into a tree whose arrays and bytes leaves are
/// empty placeholders, recording their data regions in order.
struct TreeParser<'l> {
    limits: &'l Limits,
    data_len: u64,
    /// End of the last region placed so far.
    end: u64,
    regions: Vec<Region>,
    nodes: usize,
    /// Children that open lists and maps declared and that have not started yet,
    /// counted in nodes (a map entry is two: its key and its value). Each one
    /// still needs at least one node and one header byte, so a declared count is
    /// checked against what is left after all of them: the room reserved for
    /// every open container together stays within the header's size.
    promised: u64,
}

/// A list or map being filled.
enum Frame {
    List(Vec<Tree>, u64),
    Map(Map, u64, Option<String>),
}

impl TreeParser<'_> {
    fn count_node(&mut self) -> Result<(), DecodeError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(DecodeError::TooManyNodes {
                max: self.limits.max_nodes,
            });
        }
        Ok(())
    }

    fn region(&mut self, offset: u64, len: u64, bools: bool) -> Result<(), DecodeError> {
        let expected = align_up(self.end).ok_or(DecodeError::SizeOverflow)?;
        if offset != expected {
            return Err(DecodeError::MisplacedRegion {
                expected,
                found: offset,
            });
        }
        let end = offset.checked_add(len).ok_or(DecodeError::SizeOverflow)?;
        if end > self.data_len {
            return Err(DecodeError::DataLengthMismatch {
                declared: self.data_len,
                expected: end,
            });
        }
        self.end = end;
        self.regions.push(Region { offset, len, bools });
        Ok(())
    }

    /// Checks a container's declared child count (in nodes) before reserving
    /// room for it, and records the children as promised.
    fn children(&mut self, r: &Reader<'_>, n: u64, frames: usize) -> Result<usize, DecodeError> {
        if frames + 1 > self.limits.max_depth {
            return Err(DecodeError::TooDeep {
                max: self.limits.max_depth,
            });
        }
        // Every child takes at least one node and one header byte, and so does
        // every child that open containers declared before this one.
        let total = n.saturating_add(self.promised);
        if total > (self.limits.max_nodes - self.nodes) as u64 {
            return Err(DecodeError::TooManyNodes {
                max: self.limits.max_nodes,
            });
        }
        if total > r.remaining() as u64 {
            return Err(DecodeError::MalformedHeader {
                offset: r.pos,
                what: "container declares more children than the header has bytes",
            });
        }
        self.promised = total;
        usize::try_from(n).map_err(|_| DecodeError::TooLargeForPlatform)
    }

    fn parse(&mut self, r: &mut Reader<'_>) -> Result<Tree, DecodeError> {
        let mut frames: Vec<Frame> = Vec::new();
        loop {
            // A promised child starts here.
            match frames.last() {
                Some(Frame::List(..)) => self.promised -= 1,
                Some(Frame::Map(..)) => self.promised -= 2,
                None => {}
            }
            if let Some(Frame::Map(_, _, key)) = frames.last_mut() {
                let k = r.name("map key", self.limits)?;
                *key = Some(k.into());
                self.count_node()?;
            }
            let tag = r.u32("node tag")?;
            self.count_node()?;
            let mut node = match tag {
                tag::NONE => Tree::None,
                tag::BOOL => Tree::Bool(r.bool("bool")?),
                tag::INT => Tree::Int(r.i64("int")?),
                tag::FLOAT => Tree::Float(r.f64("float")?),
                tag::STR => Tree::Str(r.str("string")?.into()),
                tag::BYTES => {
                    let offset = r.u64("bytes offset")?;
                    let len = r.u64("bytes length")?;
                    self.region(offset, len, false)?;
                    Tree::Bytes(Bytes::new())
                }
                tag::ARRAY => {
                    let code = r.u8("array dtype")?;
                    let offset = r.u64("array offset")?;
                    let rank = r.u64("array rank")?;
                    let dtype = DType::from_code(code).ok_or(DecodeError::UnknownDType(code))?;
                    if rank > self.limits.max_rank as u64 {
                        return Err(DecodeError::RankTooLarge {
                            rank,
                            max: self.limits.max_rank,
                        });
                    }
                    if rank > r.remaining() as u64 {
                        return Err(DecodeError::MalformedHeader {
                            offset: r.pos,
                            what: "array rank exceeds the bytes left in the header",
                        });
                    }
                    let mut shape = Vec::with_capacity(rank as usize);
                    // product(dimensions), then times the item size, as the format
                    // says: a zero dimension anywhere makes the product zero even
                    // when the other dimensions together would overflow the item
                    // size's multiple (and `Array::new` accepts such shapes).
                    let mut count = 1u64;
                    for _ in 0..rank {
                        let dim = r.u64("array dimension")?;
                        count = count.checked_mul(dim).ok_or(DecodeError::SizeOverflow)?;
                        shape.push(
                            usize::try_from(dim).map_err(|_| DecodeError::TooLargeForPlatform)?,
                        );
                    }
                    let len = count
                        .checked_mul(dtype.size() as u64)
                        .ok_or(DecodeError::SizeOverflow)?;
                    self.region(offset, len, dtype == DType::Bool)?;
                    Tree::Array(Array::placeholder(dtype, shape))
                }
                tag::LIST => {
                    let n = r.u64("list length")?;
                    if n == 0 {
                        Tree::List(Vec::new())
                    } else {
                        let n = self.children(r, n, frames.len())?;
                        frames.push(Frame::List(Vec::with_capacity(n), n as u64));
                        continue;
                    }
                }
                tag::MAP => {
                    let n = r.u64("map length")?;
                    if n == 0 {
                        Tree::Map(Map::new())
                    } else {
                        // A key is a node too: it costs memory like one.
                        let n = self.children(r, n.saturating_mul(2), frames.len())? / 2;
                        frames.push(Frame::Map(Map::with_capacity(n), n as u64, None));
                        continue;
                    }
                }
                _ => {
                    return Err(DecodeError::MalformedHeader {
                        offset: r.pos,
                        what: "unknown node tag",
                    })
                }
            };
            // Attach the finished node to its parent; a parent that is now full is
            // itself finished, and so on up.
            loop {
                let Some(frame) = frames.last_mut() else {
                    return Ok(node);
                };
                let left = match frame {
                    Frame::List(items, left) => {
                        items.push(node);
                        left
                    }
                    Frame::Map(map, left, key) => {
                        let key = key.take().unwrap_or_default();
                        map.push_unchecked(key, node);
                        left
                    }
                };
                *left -= 1;
                if *left > 0 {
                    break;
                }
                node = match frames.pop() {
                    Some(Frame::List(items, _)) => Tree::List(items),
                    Some(Frame::Map(map, _, _)) => {
                        check_unique_keys(&map)?;
                        Tree::Map(map)
                    }
                    None => unreachable!("frames.last_mut() was Some"),
                };
            }
        }
    }
}

/// Rejects a map with a repeated key: lookups would be ambiguous. Sorting keeps
/// this O(n log n) for a hostile map with a million keys.
fn check_unique_keys(map: &Map) -> Result<(), DecodeError> {
    if map.len() < 2 {
        return Ok(());
    }
    let mut keys: Vec<&str> = map.keys().collect();
    keys.sort_unstable();
    match keys.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(DecodeError::DuplicateKey(w[0].into())),
        None => Ok(()),
    }
}

/// Points every placeholder leaf of the message's tree at its region of `data`.
fn attach_data(message: &mut Message, data: &Bytes, regions: &[Region]) {
    let root = match message {
        Message::Call(c) => &mut c.args,
        Message::Reply(Reply { result: Ok(t), .. }) => t,
        _ => return,
    };
    let mut regions = regions.iter();
    // The root is not on the stack, so a tree that is one leaf allocates none.
    let mut stack = Vec::new();
    let mut next = Some(root);
    while let Some(node) = next.take().or_else(|| stack.pop()) {
        // Regions were validated against data_len, which is data.len().
        let mut slice = || {
            regions
                .next()
                .map(|r| data.slice(r.offset as usize..(r.offset + r.len) as usize))
                .unwrap_or_default()
        };
        match node {
            Tree::Array(a) => a.attach(slice()),
            Tree::Bytes(b) => *b = slice(),
            Tree::List(l) => stack.extend(l.iter_mut().rev()),
            Tree::Map(m) => stack.extend(m.values_mut().rev()),
            _ => {}
        }
    }
}
