//! Any `Serialize` value to a [`Tree`] and back: [`to_tree`] and [`from_tree`].
//!
//! Your own types can be call arguments and results: derive `Serialize` and
//! `Deserialize`, and [`Array`] fields go into the tree as array leaves
//! without their data being copied.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use teleport_protocol::serde::{from_tree, to_tree};
//! use teleport_protocol::{Array, Tree};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Batch {
//!     images: Array,
//!     labels: Vec<String>,
//!     scale: Option<f32>,
//! }
//!
//! let batch = Batch {
//!     images: Array::from_vec([2, 4, 4], vec![0u8; 32]).unwrap(),
//!     labels: vec!["cat".into(), "dog".into()],
//!     scale: None,
//! };
//! let tree = to_tree(&batch).unwrap();
//! assert_eq!(tree.to_string(), r#"{"images": uint8[2, 4, 4], "labels": ["cat", "dog"], "scale": null}"#);
//! // The array leaf shares the field's bytes: nothing was copied.
//! let leaf = tree.get("images").unwrap().as_array().unwrap();
//! assert_eq!(leaf.data().as_ptr(), batch.images.data().as_ptr());
//!
//! let back: Batch = from_tree(tree).unwrap();
//! assert_eq!(back, batch);
//!
//! // Errors say where and what.
//! let err = from_tree::<Batch>(teleport_protocol::tree!({"images": 1})).unwrap_err();
//! assert_eq!(err.to_string(), "at `images`: invalid type: int, expected an array");
//! ```
//!
//! # The mapping
//!
//! | Rust (serde data model)                          | [`Tree`]                                   |
//! |--------------------------------------------------|--------------------------------------------|
//! | `bool`                                           | [`Tree::Bool`]                             |
//! | integers                                         | [`Tree::Int`]; a `u64`/`i128`/`u128` outside `i64` is an error, never wrapped |
//! | `f32`, `f64`                                     | [`Tree::Float`]                            |
//! | `char`, `String`, `&str`                         | [`Tree::Str`]                              |
//! | `serialize_bytes` (`serde_bytes`), and a non-empty sequence or tuple of only `u8`s (`Vec<u8>`, `[u8; N]`) | [`Tree::Bytes`] |
//! | `()`, unit structs, `None`                       | [`Tree::None`]                             |
//! | `Some(x)`, newtype structs                       | what `x` is                                |
//! | sequences, tuples, tuple structs                 | [`Tree::List`]                             |
//! | structs, maps                                    | [`Tree::Map`], in field (or iteration) order |
//! | unit variant `E::A`                              | `Tree::Str("A")`                           |
//! | other variants `E::B(x)`, `E::C { .. }`          | `{"B": x}`, `{"C": {..}}` (externally tagged, as in serde_json) |
//! | [`Array`]                                        | [`Tree::Array`], sharing the data          |
//! | [`Tree`]                                         | itself, sharing arrays and bytes           |
//!
//! Map keys must be strings; chars, integers, bools and unit variants are
//! written as strings (and parsed back). Reading is the inverse, and is
//! lenient where serde_json is: an int reads as a float, a list as a struct
//! (fields in order), and `deserialize_any` works, so `#[serde(untagged)]`,
//! `#[serde(flatten)]` and internally tagged enums work too.
//!
//! # Arrays without copies
//!
//! serde's data model has no n-dimensional array. [`Array`] serializes as a
//! newtype struct with a reserved name that this module's serializer and
//! deserializer recognise, as `serde_json::value::RawValue` does. With the
//! `std` feature, [`to_tree`] and [`from_tree`] then move the array (its
//! [`Bytes`](bytes::Bytes) is reference counted) through a thread-local side
//! table instead of through serde, so its data is never copied. Without
//! `std`, and where serde buffers values (`untagged`, `flatten`, internally
//! tagged enums), an array goes through its portable form and its data is
//! copied once.
//!
//! With any other serializer (serde_json, postcard, ...) an [`Array`] is its
//! portable form: a struct `{"dtype": "float32", "shape": [2, 3], "data":
//! <bytes>}`, with the C-order little-endian data written by
//! `serialize_bytes` (serde_json writes a list of numbers), and it reads back
//! from that form with one copy of the data. A [`Tree`] serializes as its
//! structure (none as unit), and deserializes from any self-describing input.
//!
//! # `ndarray` fields
//!
//! With the `ndarray` feature, [`ndarray`] is a module for
//! `#[serde(with = "teleport_protocol::serde::ndarray")]` on an
//! `ndarray::Array<T, D>` field, which then goes into the tree as an array
//! leaf (copied once, as serde only lends the field; see the module).

mod array;
mod de;
mod error;
#[cfg(feature = "ndarray")]
pub mod ndarray;
mod ser;
mod tree_impls;

use ::serde::de::DeserializeOwned;
use ::serde::Serialize;

pub use error::{SerdeError, SerdeErrorKind};

#[cfg(doc)]
use crate::Array;
use crate::Tree;

/// The tree of `value`: see the [module](self) for the mapping.
///
/// Fails (saying where in the value) on an integer outside `i64`, a map key
/// that is not a string, or an error of `value`'s `Serialize` impl.
pub fn to_tree<T: Serialize + ?Sized>(value: &T) -> Result<Tree, SerdeError> {
    #[cfg(feature = "std")]
    let _session = array::stash::Session::enter();
    value.serialize(ser::TreeSerializer::default())
}

/// A `T` read out of `tree`: see the [module](self) for the mapping.
///
/// The tree is consumed, so strings, bytes and arrays move into `T` (arrays
/// and bytes without copying).
pub fn from_tree<T: DeserializeOwned>(tree: Tree) -> Result<T, SerdeError> {
    #[cfg(feature = "std")]
    let _session = array::stash::Session::enter();
    T::deserialize(de::TreeDeserializer(tree))
}

/// Like [`from_tree`], from a borrowed tree: clones it first (arrays and
/// bytes are shared, not copied; strings and the structure are).
pub fn from_tree_ref<T: DeserializeOwned>(tree: &Tree) -> Result<T, SerdeError> {
    from_tree(tree.clone())
}

#[cfg(test)]
mod tests;
