//! The sans-IO core of Teleport: the array tree, the wire format, and the request
//! state machines.
//!
//! This crate does no IO and reads no clock. Callers pass bytes in and take
//! bytes out, and pass the current time in as a [`Timestamp`]. That is what lets
//! the same code run under tokio + QUIC, in a browser over WebTransport, in a
//! custom event loop, or in a simulator that advances time by hand.
//!
//! # Pieces
//!
//! - [`Tree`], [`Array`], [`DType`]: the values calls send and return.
//! - [`encode`] and [`Decoder`]: the wire format (see `docs/wire-format.md`).
//!   Encoding produces a gather list that references array buffers without
//!   copying them; decoding is incremental and copies array data exactly once,
//!   into 64-byte-aligned memory.
//! - [`serde`]: any `Serialize` type to a [`Tree`] and back ([`to_tree`],
//!   [`from_tree`]), with [`Array`] fields kept zero-copy.
//! - [`batch`]: stacking trees along a new axis 0 and splitting them back.
//! - [`client`] and [`server`]: the state machines of each side, and
//!   [`batcher`]: the batching policy. Each follows the same run-loop
//!   contract: feed inputs with the current time first, drain `poll_output()`
//!   until it is empty, and call `handle_timeout` at `poll_timeout()`. Every
//!   rule a user can observe (the order calls are admitted in, deadlines
//!   wherever a call waits, pings and dead peers, the Hello deadline, draining
//!   and closing, reconnection and its backoff, re-sending idempotent calls)
//!   lives in them, so tests drive them on a virtual clock.
//!
//! # `no_std`
//!
//! The crate is `#![no_std]` and needs only `alloc`. The default `std` feature
//! adds `std::error::Error` impls through the dependencies; the `ndarray`
//! feature adds conversions to and from `ndarray` arrays.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod array;
mod backoff;
pub mod batch;
pub mod batcher;
pub mod client;
mod codes;
mod deadlines;
mod dtype;
mod id_map;
mod limits;
mod liveness;
mod message;
#[cfg(feature = "ndarray")]
mod ndarray_conv;
mod path;
pub mod serde;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
mod time;
mod tree;
pub mod wire;

pub use array::Array;
pub use backoff::Backoff;
pub use batch::{SplitError, StackError, StackOutcome};
pub use codes::{CloseCode, StreamCode};
pub use dtype::{DType, Element};
pub use limits::Limits;
pub use message::{
    Call, ErrorKind, Goodbye, GoodbyeReason, Hello, Kind, Message, RemoteError, Reply, RequestId,
};
pub use path::{PathSegment, TreePath};
pub use serde::{from_tree, to_tree, SerdeError};
pub use time::Timestamp;
pub use tree::{Layout, LayoutNode, Map, Tree, TreeError};
pub use wire::{decode_message, encode, DecodeError, Decoder, EncodeError, Encoded};

/// Re-exported for the [`tree!`] macro; not part of the API.
#[doc(hidden)]
pub use alloc::vec as __alloc_vec;

/// Re-exports of the element types that have no home in `core`.
pub use half::{bf16, f16};
pub use num_complex::{Complex32, Complex64};
