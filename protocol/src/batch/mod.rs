//! Batching: stacking trees along a new axis 0 and splitting them back.
//!
//! A batched server function receives the arguments of N calls as one tree whose
//! arrays have gained a leading axis of length N, and its result is split back
//! into N replies. [`stack`], [`stack_compatible`] and [`split`] are those steps
//! as pure functions.
//!
//! # What stacks into what
//!
//! Members stack when their trees have the same structure: the same node kinds,
//! maps with the same keys in the same order, lists of the same length, and arrays
//! of the same dtype and shape (exactly what [`Tree::layout`](crate::Tree::layout) compares). Then:
//!
//! | leaf in each of the N members | leaf in the stacked tree             |
//! |-------------------------------|--------------------------------------|
//! | array, dtype `d`, shape `s`   | array, dtype `d`, shape `[N, s..]`   |
//! | `Int`                         | `int64` array of shape `[N]`         |
//! | `Float`                       | `float64` array of shape `[N]`       |
//! | `Bool`                        | `bool` array of shape `[N]`          |
//! | `None`                        | `None`                               |
//! | `Str`                         | a list of the N strings, one per row |
//! | `Bytes`                       | a list of the N bytes, one per row   |
//!
//! `Int` and `Float` are different kinds, as in a [`Layout`](crate::Layout): a member that sends
//! `1` where the others send `1.0` does not stack with them.
//!
//! [`split`] is the inverse: every array leaf must have leading dimension N and
//! is cut into N arrays along axis 0; `None` stays `None`; a non-empty list whose
//! elements are all strings, or all bytes, is such a column of N rows and row `i`
//! gets element `i`. (A list the members held is stacked to a list of stacked
//! children, so a list of plain strings in a stacked tree can only be a column:
//! `split(stack(trees))` gives back `trees`.) Scalars
//! stacked into arrays therefore come back from a split as rank-0 arrays (an `Int`
//! becomes a rank-0 `int64` array), not as scalars.
//!
//! # Copies
//!
//! [`stack`] allocates one buffer per array leaf of the result, aligned to
//! [`ALIGN`](crate::wire::ALIGN) (64) bytes like the arrays the decoder produces, and copies each
//! member's bytes into it exactly once. [`split`] copies no array data: the parts
//! share the batched array's buffer.
//!
//! # Recursion
//!
//! The functions here recurse once per level of nesting. Trees decoded from the
//! wire are at most [`Limits::max_depth`](crate::Limits::max_depth) deep (64 by
//! default), which keeps that bounded; a tree built locally and nested many
//! thousands of levels deep could exhaust the stack (as dropping it could).
//!
//! # Errors
//!
//! Every error names the node it is about with a [`TreePath`] such as
//! `obs.image[2]`, and the batch member (an index into the input) it found wrong.

mod compatible;
mod split;
mod stack;
#[cfg(test)]
mod tests;

use alloc::string::String;
use alloc::vec::Vec;

use crate::{DType, TreePath};

pub use compatible::{stack_compatible, StackOutcome};
pub use split::split;
pub use stack::stack;

/// Why trees could not be stacked into one batch.
///
/// `member` is the index (into the input) of the tree that was found wrong and
/// `reference` the index of the tree it was compared with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// No trees were given.
    #[error("cannot stack an empty batch: give at least one tree")]
    Empty,

    /// A node has a different kind (array, int, map, ...) than in the reference.
    #[error(
        "batch member {member} differs at {}: found {found}, expected {expected} (as in member {reference})",
        .path.at()
    )]
    Kind {
        member: usize,
        reference: usize,
        path: TreePath,
        expected: &'static str,
        found: &'static str,
    },

    /// A list has a different length than in the reference.
    #[error(
        "batch member {member} differs at {}: list of length {found}, expected length {expected} (as in member {reference})",
        .path.at()
    )]
    ListLength {
        member: usize,
        reference: usize,
        path: TreePath,
        expected: usize,
        found: usize,
    },

    /// A map's keys differ from the reference's. `index` is the first position
    /// where they differ; `None` means the map has no key there.
    #[error(
        "batch member {member} differs at {}: {} (maps must have the same keys in the same order, as in member {reference})",
        .path.at(),
        key_difference(*.index, .expected.as_deref(), .found.as_deref())
    )]
    MapKeys {
        member: usize,
        reference: usize,
        path: TreePath,
        index: usize,
        expected: Option<String>,
        found: Option<String>,
    },

    /// An array has a different dtype than in the reference.
    #[error(
        "batch member {member} differs at {}: dtype {found}, expected {expected} (as in member {reference})",
        .path.at()
    )]
    DType {
        member: usize,
        reference: usize,
        path: TreePath,
        expected: DType,
        found: DType,
    },

    /// An array has a different shape than in the reference.
    #[error(
        "batch member {member} differs at {}: shape {found:?}, expected {expected:?} (as in member {reference})",
        .path.at()
    )]
    Shape {
        member: usize,
        reference: usize,
        path: TreePath,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A string or bytes leaf, which has no array form to stack into.
    ///
    /// No longer produced: strings and bytes stack as a list with one element
    /// per row. Kept so that code matching on it still compiles.
    #[error(
        "cannot stack the {kind} at {} (batch member {member}): only arrays, ints, floats, bools and None stack; pass {kind} outside the batched argument or as an array",
        .path.at()
    )]
    Unstackable {
        member: usize,
        path: TreePath,
        kind: &'static str,
    },

    /// The stacked array would not fit in the address space.
    #[error(
        "stacking {count} arrays of shape {shape:?} at {} overflows the address space",
        .path.at()
    )]
    SizeOverflow {
        path: TreePath,
        count: usize,
        shape: Vec<usize>,
    },
}

impl StackError {
    /// The path of the node the error is about (`None` for [`StackError::Empty`]).
    pub fn path(&self) -> Option<&TreePath> {
        match self {
            StackError::Empty => None,
            StackError::Kind { path, .. }
            | StackError::ListLength { path, .. }
            | StackError::MapKeys { path, .. }
            | StackError::DType { path, .. }
            | StackError::Shape { path, .. }
            | StackError::Unstackable { path, .. }
            | StackError::SizeOverflow { path, .. } => Some(path),
        }
    }

    /// The index of the batch member found wrong, where one was.
    pub fn member(&self) -> Option<usize> {
        match self {
            StackError::Empty | StackError::SizeOverflow { .. } => None,
            StackError::Kind { member, .. }
            | StackError::ListLength { member, .. }
            | StackError::MapKeys { member, .. }
            | StackError::DType { member, .. }
            | StackError::Shape { member, .. }
            | StackError::Unstackable { member, .. } => Some(*member),
        }
    }
}

/// The middle of a [`StackError::MapKeys`] message.
fn key_difference(index: usize, expected: Option<&str>, found: Option<&str>) -> String {
    use alloc::format;
    match (expected, found) {
        (Some(e), Some(f)) => format!("key {f:?} at position {index}, expected {e:?}"),
        (Some(e), None) => format!("missing key {e:?} (position {index})"),
        (None, Some(f)) => format!("unexpected key {f:?} (position {index})"),
        (None, None) => format!("keys differ at position {index}"),
    }
}

/// Why a batched tree could not be split into its members.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A leaf that is neither an array nor `None`, outside a list of strings
    /// or bytes.
    #[error(
        "cannot split the {kind} at {}: every leaf of a batched tree must be an array with leading dimension {expected} (the batch size) or None, or a string or bytes in a list with one per row",
        .path.at()
    )]
    NotAnArray {
        path: TreePath,
        kind: &'static str,
        expected: usize,
    },

    /// A list of strings (or of bytes), the stacked form of a string (bytes)
    /// leaf, whose length is not the batch size.
    #[error(
        "cannot split the list of {kind} at {}: it has {found} elements, expected {expected} (the batch size): strings and bytes split as a list with one element per row",
        .path.at()
    )]
    ColumnLength {
        path: TreePath,
        kind: &'static str,
        expected: usize,
        found: usize,
    },

    /// A rank-0 array, which has no axis to split.
    #[error(
        "cannot split the rank-0 {dtype} array at {}: it has no leading dimension; expected leading dimension {expected} (the batch size)",
        .path.at()
    )]
    RankZero {
        path: TreePath,
        dtype: DType,
        expected: usize,
    },

    /// An array whose leading dimension is not the batch size.
    #[error(
        "cannot split the array at {}: its leading dimension is {found} (shape {shape:?}), expected {expected} (the batch size)",
        .path.at()
    )]
    LeadingDim {
        path: TreePath,
        expected: usize,
        found: usize,
        shape: Vec<usize>,
    },
}

impl SplitError {
    /// The path of the node the error is about.
    pub fn path(&self) -> &TreePath {
        match self {
            SplitError::NotAnArray { path, .. }
            | SplitError::ColumnLength { path, .. }
            | SplitError::RankZero { path, .. }
            | SplitError::LeadingDim { path, .. } => path,
        }
    }
}
