//! A hash map for keys the peer cannot pick freely, on the path of every call.
//!
//! The state machines look a call up several times per call. An ordered map
//! (a B-tree) moves its values on every insert and remove and allocates and
//! frees nodes as ids go by, which profiles put at a few percent of a small
//! call's CPU (`docs/performance.md`, "Cheaper bookkeeping per call"). A hash
//! map with FxHash is cheaper, and fit only for keys whose values the peer
//! does not choose: a client's own request ids (consecutive) and the
//! server's stream indices (its own counter, in accept order). A peer still
//! chooses which of its streams stay open, so it could leave open only those
//! that share a bucket; that costs a lookup chain as long as its open
//! streams, which the stream limit bounds, like the gate's removal from the
//! middle. Request ids chosen by the peer stay in ordered maps: with Fx, a
//! peer could send any number of ids that all fall into one bucket.
//! Iteration order is not key order; callers that emit outputs while
//! iterating sort the keys first, so outputs stay deterministic.

use core::hash::BuildHasherDefault;

use rustc_hash::FxHasher;

pub(crate) type IdMap<K, V> = hashbrown::HashMap<K, V, BuildHasherDefault<FxHasher>>;
