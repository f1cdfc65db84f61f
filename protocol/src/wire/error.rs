use alloc::string::String;

use crate::message::Kind;

/// Why a byte sequence is not a valid message.
///
/// After any error the [`Decoder`](super::Decoder) that returned it is unusable:
/// the framing of the stream is lost. Over QUIC that costs one stream (one call);
/// the connection and every other call carry on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("not a teleport message: magic bytes {0:02x?}, expected \"TLPT\"")]
    BadMagic([u8; 4]),
    #[error("unsupported wire format version {found} (this side speaks version {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("reserved preamble flags {0:#06x} are set; they must be zero")]
    ReservedFlags(u16),
    #[error("header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("data of {len} bytes exceeds the limit of {max} bytes")]
    DataTooLarge { len: u64, max: u64 },
    #[error("a {kind:?} message carries no data, but declares {len} data bytes")]
    UnexpectedData { kind: Kind, len: u64 },
    /// A header value runs past the header's end, overflows its type, or (a
    /// string) is not UTF-8; `what` names the field, `offset` is where the value
    /// starts in the header.
    #[error("malformed header at byte {offset}: {what}")]
    MalformedHeader { offset: usize, what: &'static str },
    /// A varint with a shorter encoding (a last byte of `00` after others):
    /// every value has exactly one encoding.
    #[error("varint for {what} at header byte {offset} is not in its shortest form")]
    NonCanonicalVarint { offset: usize, what: &'static str },
    /// An option tag other than `00` (none) or `01` (some).
    #[error("option tag of {what} at header byte {offset} is {byte:#04x}; it must be 00 or 01")]
    BadOption {
        offset: usize,
        byte: u8,
        what: &'static str,
    },
    /// A bool node whose byte is other than `00` (false) or `01` (true).
    #[error("bool at header byte {offset} is {byte:#04x}; it must be 00 or 01")]
    BadBool { offset: usize, byte: u8 },
    #[error("{len} unread bytes at the end of the header")]
    TrailingHeaderBytes { len: usize },
    #[error("tree nesting exceeds the depth limit of {max}")]
    TooDeep { max: usize },
    #[error("tree exceeds the limit of {max} nodes")]
    TooManyNodes { max: usize },
    #[error("array of rank {rank} exceeds the rank limit of {max}")]
    RankTooLarge { rank: u64, max: usize },
    #[error("name of {len} bytes exceeds the limit of {max} bytes")]
    NameTooLong { len: usize, max: usize },
    #[error("unknown dtype code {0}")]
    UnknownDType(u8),
    #[error("duplicate map key {0:?}")]
    DuplicateKey(String),
    #[error("data region at offset {found} should start at offset {expected}")]
    MisplacedRegion { expected: u64, found: u64 },
    #[error("a declared size overflows 64 bits")]
    SizeOverflow,
    #[error("a declared size does not fit in this platform's address space")]
    TooLargeForPlatform,
    /// A padding byte (after the header, or between data regions) is not zero.
    /// `offset` counts from the start of the message.
    #[error("padding byte at message byte {offset} is {byte:#04x}; padding must be zero")]
    NonZeroPadding { offset: u64, byte: u8 },
    /// An element of a bool array is other than `0` or `1`. `offset` counts
    /// from the start of the message.
    #[error("bool array element at message byte {offset} is {byte:#04x}; it must be 0 or 1")]
    BadBoolElement { offset: u64, byte: u8 },
    /// A Reply carrying an error must carry nothing else: no tree in the
    /// header, no data section.
    #[error(
        "an error Reply carries {header_bytes} header bytes after the error and {data_len} data \
         bytes; an error Reply carries no tree and no data"
    )]
    ErrorReplyWithData { header_bytes: usize, data_len: u64 },
    #[error("data section is {declared} bytes but the tree's regions end at {expected}")]
    DataLengthMismatch { declared: u64, expected: u64 },
    #[error("the stream ended inside a message ({needed} more bytes were expected)")]
    Truncated { needed: u64 },
    #[error("{len} bytes follow the end of the message")]
    TrailingBytes { len: usize },
    #[error("the decoder already failed; the rest of this stream cannot be framed")]
    Poisoned,
}

impl DecodeError {
    /// True when the message was well-formed but exceeded a configured [`Limits`]
    /// value; a server answers these with an over-limit error rather than a
    /// bad-request error.
    ///
    /// [`Limits`]: crate::Limits
    pub fn is_over_limit(&self) -> bool {
        matches!(
            self,
            DecodeError::HeaderTooLarge { .. }
                | DecodeError::DataTooLarge { .. }
                | DecodeError::TooDeep { .. }
                | DecodeError::TooManyNodes { .. }
                | DecodeError::RankTooLarge { .. }
                | DecodeError::NameTooLong { .. }
                | DecodeError::TooLargeForPlatform
        )
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("the header could not be serialised: {0}")]
    Header(postcard::Error),
    #[error("the message's total size overflows 64 bits")]
    SizeOverflow,
}
