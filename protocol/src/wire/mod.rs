//! The wire format: a fixed preamble, a postcard header, then the data regions.
//!
//! `docs/wire-format.md` at the repository root is the normative description,
//! byte by byte; this module is its implementation. In short:
//!
//! ```text
//! preamble  24 bytes   magic "TLPT", version, kind, flags (u16 LE),
//!                      header_len (u64 LE), data_len (u64 LE)
//! header    header_len bytes of postcard: the kind's fields, then the tree as a
//!                      pre-order list of nodes
//! padding   zero bytes up to the next multiple of 64 from the message start
//!                      (present only when data_len > 0)
//! data      data_len bytes: every array and bytes leaf, in pre-order, each at
//!                      the next multiple of 64 after the previous one's end
//! ```

mod decode;
mod encode;
mod error;

pub use decode::{decode_message, CallHeader, DataAllocator, DataBuffer, Decoder};
pub use encode::{encode, Encoded};
pub use error::{DecodeError, EncodeError};

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"TLPT";

/// The format version this crate reads and writes.
pub const VERSION: u8 = 1;

/// Bytes in the fixed preamble.
pub const PREAMBLE_LEN: usize = 24;

/// The alignment of the data section and of every data region within it.
pub const ALIGN: usize = 64;

/// Tree node tags in the header (postcard enum discriminants).
pub(crate) mod tag {
    pub(crate) const NONE: u32 = 0;
    pub(crate) const BOOL: u32 = 1;
    pub(crate) const INT: u32 = 2;
    pub(crate) const FLOAT: u32 = 3;
    pub(crate) const STR: u32 = 4;
    pub(crate) const BYTES: u32 = 5;
    pub(crate) const ARRAY: u32 = 6;
    pub(crate) const LIST: u32 = 7;
    pub(crate) const MAP: u32 = 8;
}

/// `n` rounded up to a multiple of [`ALIGN`], or `None` on overflow.
pub(crate) fn align_up(n: u64) -> Option<u64> {
    let a = ALIGN as u64;
    n.checked_add(a - 1).map(|v| v & !(a - 1))
}

/// The per-kind fields that open the header. `serde` + postcard give the exact
/// bytes documented in `docs/wire-format.md` (the decoder reads them by hand,
/// strictly: see `decode.rs`).
pub(crate) mod head {
    use serde::Serialize;

    #[derive(Serialize)]
    pub(crate) struct Hello<'a> {
        pub(crate) agent: &'a str,
        pub(crate) token: Option<&'a str>,
    }

    #[derive(Serialize)]
    pub(crate) struct Call<'a> {
        pub(crate) request_id: u64,
        pub(crate) method: &'a str,
        pub(crate) timeout_us: Option<u64>,
    }

    #[derive(Serialize)]
    pub(crate) struct Reply<'a> {
        pub(crate) request_id: u64,
        pub(crate) error: Option<Error<'a>>,
    }

    #[derive(Serialize)]
    pub(crate) struct Error<'a> {
        pub(crate) kind: u8,
        pub(crate) type_name: &'a str,
        pub(crate) message: &'a str,
    }

    #[derive(Serialize)]
    pub(crate) struct Goodbye<'a> {
        pub(crate) reason: u8,
        pub(crate) message: &'a str,
    }
}
