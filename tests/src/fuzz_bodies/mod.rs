//! Fuzz target bodies: each takes arbitrary bytes and panics only when it finds
//! a bug (a panic in the protocol crate, or a broken invariant it checks).
//!
//! - [`decode`]: arbitrary bytes, in arbitrary chunks, into a [`Decoder`]
//!   with small limits. Never panics; one-shot and chunked decoding agree; every
//!   decoded message re-encodes to bytes that decode to an equal message.
//! - [`roundtrip`]: a structured message (trees with arrays of every dtype)
//!   built from the bytes survives encode and chunked decoding, 64-byte aligned.
//! - [`state_machines`]: the bytes drive a client and a server state machine
//!   through an arbitrary sequence of events; their documented guarantees hold.
//!
//! [`TARGETS`] names them for the corpus runner; [`seeds`] makes seed inputs.
//!
//! [`Decoder`]: teleport_protocol::Decoder

mod decode;
mod roundtrip;
pub mod seeds;
mod state_machines;
mod util;

pub use decode::decode;
pub use roundtrip::roundtrip;
pub use state_machines::state_machines;

/// A fuzz target body.
pub type Body = fn(&[u8]);

/// Every target, by the name of its file in `fuzz/fuzz_targets/` and its
/// corpus directory `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Body)] = &[
    ("decode", decode),
    ("roundtrip", roundtrip),
    ("state_machines", state_machines),
];
