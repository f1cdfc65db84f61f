//! `#[serde(with = "teleport_protocol::serde::ndarray")]` for `ndarray` fields
//! (the `ndarray` feature).
//!
//! An `ndarray::Array<T, D>` field (any [`Element`] `T`, any dimension `D`)
//! serializes as an [`Array`], so [`to_tree`](super::to_tree) makes it an
//! array leaf, and other serializers see an array's portable form.
//!
//! Copies: serde lends the field by reference, so serializing copies the
//! elements once into the new [`Array`] (which then goes into the tree without
//! another copy). Deserializing copies them once out of the tree's array into
//! the `ndarray` array, which must own its buffer. To avoid both copies, make
//! the field an [`Array`] and view it with [`Array::view`].
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use teleport_protocol::serde::{from_tree, to_tree};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Step {
//!     #[serde(with = "teleport_protocol::serde::ndarray")]
//!     obs: ndarray::Array2<f32>,
//!     reward: f64,
//! }
//!
//! let step = Step { obs: ndarray::Array2::zeros((2, 3)), reward: 1.0 };
//! let tree = to_tree(&step).unwrap();
//! assert_eq!(tree.to_string(), r#"{"obs": float32[2, 3], "reward": 1.0}"#);
//! assert_eq!(from_tree::<Step>(tree).unwrap(), step);
//! ```

use ::ndarray::{ArrayBase, Data, Dimension};
use ::serde::de::Error as _;
use ::serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Array, Element};

/// Serializes `a` as an [`Array`] (one copy of the elements).
pub fn serialize<S, A, T, D>(a: &ArrayBase<A, D>, serializer: S) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    A: Data<Elem = T>,
    T: Element,
    D: Dimension,
{
    Array::copy_from_ndarray(a).serialize(serializer)
}

/// Deserializes an [`Array`] of dtype `T` with `D`'s number of axes into an
/// `ndarray` array (one copy of the elements).
pub fn deserialize<'de, De, T, D>(deserializer: De) -> Result<::ndarray::Array<T, D>, De::Error>
where
    De: Deserializer<'de>,
    T: Element,
    D: Dimension,
{
    let array = Array::deserialize(deserializer)?;
    let a = array.to_ndarray::<T>().map_err(De::Error::custom)?;
    let ndim = a.ndim();
    a.into_dimensionality::<D>().map_err(|_| {
        De::Error::custom(alloc::format!(
            "expected an array with {} axes, found {ndim}",
            D::NDIM.map_or_else(
                || alloc::string::String::from("any number of"),
                |n| alloc::format!("{n}")
            )
        ))
    })
}
