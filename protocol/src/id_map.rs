//! A hash map for keys the peer cannot pick freely, on the path of every call.
//!
//! The state machines look a call up several times per call. An ordered map
//! (a B-tree) moves its values on every insert and remove and allocates and
//! frees nodes as ids go by, which profiles put at a few percent of a small
//! call's CPU (`docs/performance.md`, "Cheaper bookkeeping per call"). A hash
//! map with FxHash is cheaper, and safe only for keys whose values the peer
//! does not choose: a client's own request ids (consecutive) and QUIC stream
//! indices (which the transport hands out in order, within a window of the
//! streams the peer may have open). Request ids chosen by the peer stay in
//! ordered maps: with Fx, a peer could send ids that all fall into one bucket.
//! Iteration order is not key order; callers that emit outputs while
//! iterating sort the keys first, so outputs stay deterministic.

use core::hash::BuildHasherDefault;

use rustc_hash::FxHasher;

pub(crate) type IdMap<K, V> = hashbrown::HashMap<K, V, BuildHasherDefault<FxHasher>>;
