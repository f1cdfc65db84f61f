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
//! of the same dtype and shape (exactly what [`Tree::layout`] compares). Then:
//!
//! | leaf in each of the N members | leaf in the stacked tree             |
//! |-------------------------------|--------------------------------------|
//! | array, dtype `d`, shape `s`   | array, dtype `d`, shape `[N, s..]`   |
//! | `Int`                         | `int64` array of shape `[N]`         |
//! | `Float`                       | `float64` array of shape `[N]`       |
//! | `Bool`                        | `bool` array of shape `[N]`          |
//! | `None`                        | `None`                               |
//! | `Str`, `Bytes`                | an error: they have no array form    |
//!
//! `Int` and `Float` are different kinds, as in a [`Layout`]: a member that sends
//! `1` where the others send `1.0` does not stack with them.
//!
//! [`split`] is the inverse for arrays: every array leaf must have leading
//! dimension N and is cut into N arrays along axis 0; `None` stays `None`. Scalars
//! stacked into arrays therefore come back from a split as rank-0 arrays (an `Int`
//! becomes a rank-0 `int64` array), not as scalars.
//!
//! # Copies
//!
//! [`stack`] allocates one buffer per array leaf of the result, aligned to
//! [`ALIGN`] (64) bytes like the arrays the decoder produces, and copies each
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

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::borrow::Borrow;
use core::mem::discriminant;

use bytes::Bytes;

use crate::path::{Cursor, SegmentRef};
use crate::wire::ALIGN;
use crate::{Array, DType, Layout, Map, Tree, TreePath};

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
    /// A leaf that is neither an array nor `None`.
    #[error(
        "cannot split the {kind} at {}: every leaf of a batched tree must be an array with leading dimension {expected} (the batch size) or None",
        .path.at()
    )]
    NotAnArray {
        path: TreePath,
        kind: &'static str,
        expected: usize,
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
            | SplitError::RankZero { path, .. }
            | SplitError::LeadingDim { path, .. } => path,
        }
    }
}

/// Stacks trees of identical structure into one tree whose arrays have a new
/// leading axis of length `trees.len()`.
///
/// See the [module docs](self) for what each leaf becomes. Each member's array
/// bytes are copied once, into one new 64-byte-aligned buffer per array leaf.
/// Members are compared with member 0; the first difference found is the error.
///
/// ```
/// use teleport_protocol::{batch, tree, Array};
///
/// let a = tree!({"obs": (Array::from_vec1(vec![1.0f32, 2.0])), "step": 7});
/// let b = tree!({"obs": (Array::from_vec1(vec![3.0f32, 4.0])), "step": 8});
/// let batched = batch::stack(&[a, b])?;
///
/// let obs = batched.get("obs")?.as_array()?;
/// assert_eq!(obs.shape(), &[2, 2]);
/// assert_eq!(obs.as_slice::<f32>()?, &[1.0, 2.0, 3.0, 4.0]);
/// assert_eq!(batched.get("step")?.as_slice::<i64>()?, &[7, 8]);
///
/// let bad = tree!({"obs": (Array::from_vec1(vec![1.0f64, 2.0])), "step": 9});
/// let err = batch::stack(&[batched.clone(), bad]).unwrap_err();
/// assert_eq!(err.member(), Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`StackError::Empty`] for no trees; otherwise the first node where a member's
/// structure, dtype or shape differs from member 0's, or a string or bytes leaf.
pub fn stack<T: Borrow<Tree>>(trees: &[T]) -> Result<Tree, StackError> {
    let nodes: Vec<&Tree> = trees.iter().map(Borrow::borrow).collect();
    if nodes.is_empty() {
        return Err(StackError::Empty);
    }
    let ids: Vec<usize> = (0..nodes.len()).collect();
    Walk::new(&ids, true).node(&nodes)
}

/// The result of [`stack_compatible`].
///
/// `members` and the indices in `rejected` are ascending and together cover
/// every input index exactly once.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StackOutcome {
    /// The stacked tree of the members, or `None` if no member could be stacked.
    /// Its leading dimension is `members.len()`.
    pub stacked: Option<Tree>,
    /// The indices (into the input) of the trees stacked, in order: row `i` of
    /// `stacked` is input `members[i]`.
    pub members: Vec<usize>,
    /// Every other input index, each with the reason it was left out.
    pub rejected: Vec<(usize, StackError)>,
}

/// Stacks the members of a batch that agree in structure, and gives every other
/// member its own error, so that one malformed request never fails the others.
///
/// The reference structure is the most common [`Layout`] among the members that
/// can be stacked at all (those without string or bytes leaves); ties go to the
/// layout that arrived first (lowest index). Taking the most common layout rather
/// than member 0's means that a single bad request at the front of a batch costs
/// only that request. Each rejected member's error names the first node where it
/// differs from the reference member (the first member with the reference layout).
///
/// With no trees, the outcome is empty.
pub fn stack_compatible<T: Borrow<Tree>>(trees: &[T]) -> StackOutcome {
    let trees: Vec<&Tree> = trees.iter().map(Borrow::borrow).collect();
    let mut rejected = Vec::new();

    // Members whose own leaves cannot stack (strings, bytes) are out whatever the
    // others hold.
    let mut candidates: Vec<(usize, Layout)> = Vec::with_capacity(trees.len());
    for (i, tree) in trees.iter().enumerate() {
        match Walk::new(&[i], false).node(&[tree]) {
            Ok(_) => candidates.push((i, tree.layout())),
            Err(e) => rejected.push((i, e)),
        }
    }

    // The most common layout, ties to the earliest: (count, first index) per layout.
    let mut counts: BTreeMap<&Layout, (usize, usize)> = BTreeMap::new();
    for (i, layout) in &candidates {
        counts.entry(layout).or_insert((0, *i)).0 += 1;
    }
    let reference = counts
        .values()
        .max_by(|(c1, i1), (c2, i2)| c1.cmp(c2).then(i2.cmp(i1)))
        .map(|&(_, first)| first);

    let mut members = Vec::new();
    let mut stacked = None;
    if let Some(r) = reference {
        // Membership is decided by the same comparison that `stack` makes, so the
        // stack below agrees with it and each rejection gets a precise error.
        for (i, _) in &candidates {
            match Walk::new(&[r, *i], false).node(&[trees[r], trees[*i]]) {
                Ok(_) => members.push(*i),
                Err(e) => rejected.push((*i, e)),
            }
        }
        let nodes: Vec<&Tree> = members.iter().map(|&i| trees[i]).collect();
        match Walk::new(&members, true).node(&nodes) {
            Ok(tree) => stacked = Some(tree),
            Err(e) => rejected.extend(members.drain(..).map(|i| (i, e.clone()))),
        }
    }
    rejected.sort_by_key(|(i, _)| *i);
    StackOutcome {
        stacked,
        members,
        rejected,
    }
}

/// Compares the corresponding nodes of the batch members and, when `build` is
/// set, builds the stacked node (otherwise it only checks, and returns `None`s).
struct Walk<'a, 'i> {
    /// The input index of each node passed to [`Walk::node`]; `ids[0]` is the
    /// reference the others are compared with.
    ids: &'i [usize],
    build: bool,
    cursor: Cursor<'a>,
}

impl<'a, 'i> Walk<'a, 'i> {
    fn new(ids: &'i [usize], build: bool) -> Self {
        Walk {
            ids,
            build,
            cursor: Cursor::default(),
        }
    }

    /// `nodes` is never empty and has one node per entry of `ids`.
    fn node(&mut self, nodes: &[&'a Tree]) -> Result<Tree, StackError> {
        let first = nodes[0];
        for (k, node) in nodes.iter().enumerate().skip(1) {
            if discriminant(*node) != discriminant(first) {
                return Err(StackError::Kind {
                    member: self.ids[k],
                    reference: self.ids[0],
                    path: self.cursor.path(),
                    expected: first.kind_name(),
                    found: node.kind_name(),
                });
            }
        }
        match first {
            Tree::None => Ok(Tree::None),
            Tree::Str(_) | Tree::Bytes(_) => Err(StackError::Unstackable {
                member: self.ids[0],
                path: self.cursor.path(),
                kind: first.kind_name(),
            }),
            _ if !self.build && matches!(first, Tree::Bool(_) | Tree::Int(_) | Tree::Float(_)) => {
                Ok(Tree::None)
            }
            Tree::Bool(_) => {
                let values: Vec<bool> = nodes.iter().filter_map(|t| t.as_bool().ok()).collect();
                let array = Array::from_bools([values.len()], &values);
                Ok(Tree::Array(
                    array.expect("a 1-d shape matches its own length"),
                ))
            }
            Tree::Int(_) => {
                let values: Vec<i64> = nodes.iter().filter_map(|t| t.as_int().ok()).collect();
                Ok(Tree::Array(Array::from_vec1(values)))
            }
            Tree::Float(_) => {
                let values: Vec<f64> = nodes
                    .iter()
                    .filter_map(|t| match t {
                        Tree::Float(f) => Some(*f),
                        _ => None,
                    })
                    .collect();
                Ok(Tree::Array(Array::from_vec1(values)))
            }
            Tree::Array(_) => {
                let arrays: Vec<&Array> = nodes.iter().filter_map(|t| t.as_array().ok()).collect();
                self.arrays(&arrays)
            }
            Tree::List(_) => {
                let lists: Vec<&'a [Tree]> = nodes
                    .iter()
                    .filter_map(|t| match t {
                        Tree::List(l) => Some(l.as_slice()),
                        _ => None,
                    })
                    .collect();
                self.lists(&lists)
            }
            Tree::Map(_) => {
                let maps: Vec<&'a Map> = nodes.iter().filter_map(|t| t.as_map().ok()).collect();
                self.maps(&maps)
            }
        }
    }

    fn arrays(&mut self, arrays: &[&Array]) -> Result<Tree, StackError> {
        let first = arrays[0];
        for (k, a) in arrays.iter().enumerate().skip(1) {
            if a.dtype() != first.dtype() {
                return Err(StackError::DType {
                    member: self.ids[k],
                    reference: self.ids[0],
                    path: self.cursor.path(),
                    expected: first.dtype(),
                    found: a.dtype(),
                });
            }
            if a.shape() != first.shape() {
                return Err(StackError::Shape {
                    member: self.ids[k],
                    reference: self.ids[0],
                    path: self.cursor.path(),
                    expected: first.shape().to_vec(),
                    found: a.shape().to_vec(),
                });
            }
        }
        if !self.build {
            return Ok(Tree::None);
        }
        let overflow = || StackError::SizeOverflow {
            path: self.cursor.path(),
            count: arrays.len(),
            shape: first.shape().to_vec(),
        };
        let mut shape = Vec::with_capacity(first.ndim() + 1);
        shape.push(arrays.len());
        shape.extend_from_slice(first.shape());
        let len = first
            .nbytes()
            .checked_mul(arrays.len())
            .ok_or_else(overflow)?;
        let data =
            concat_aligned(arrays.iter().map(|a| &a.data()[..]), len).ok_or_else(overflow)?;
        // Fails only when the element count overflows although the bytes do not
        // (a zero-length axis beside huge ones).
        let array = Array::new(first.dtype(), shape, data).map_err(|_| overflow())?;
        Ok(Tree::Array(array))
    }

    fn lists(&mut self, lists: &[&'a [Tree]]) -> Result<Tree, StackError> {
        let len = lists[0].len();
        for (k, l) in lists.iter().enumerate().skip(1) {
            if l.len() != len {
                return Err(StackError::ListLength {
                    member: self.ids[k],
                    reference: self.ids[0],
                    path: self.cursor.path(),
                    expected: len,
                    found: l.len(),
                });
            }
        }
        let mut out = Vec::with_capacity(if self.build { len } else { 0 });
        let mut children = Vec::with_capacity(lists.len());
        for i in 0..len {
            children.clear();
            children.extend(lists.iter().map(|l| &l[i]));
            self.cursor.push(SegmentRef::Index(i));
            let child = self.node(&children)?;
            self.cursor.pop();
            if self.build {
                out.push(child);
            }
        }
        Ok(if self.build {
            Tree::List(out)
        } else {
            Tree::None
        })
    }

    fn maps(&mut self, maps: &[&'a Map]) -> Result<Tree, StackError> {
        let first = maps[0];
        for (k, m) in maps.iter().enumerate().skip(1) {
            if !m.keys().eq(first.keys()) {
                let mut expected = first.keys();
                let mut found = m.keys();
                let mut index = 0;
                let (expected, found) = loop {
                    match (expected.next(), found.next()) {
                        (Some(e), Some(f)) if e == f => index += 1,
                        (e, f) => break (e.map(Into::into), f.map(Into::into)),
                    }
                };
                return Err(StackError::MapKeys {
                    member: self.ids[k],
                    reference: self.ids[0],
                    path: self.cursor.path(),
                    index,
                    expected,
                    found,
                });
            }
        }
        let mut out = Map::with_capacity(if self.build { first.len() } else { 0 });
        let mut values: Vec<_> = maps.iter().map(|m| m.values()).collect();
        let mut children = Vec::with_capacity(maps.len());
        for key in first.keys() {
            children.clear();
            children.extend(values.iter_mut().filter_map(Iterator::next));
            self.cursor.push(SegmentRef::Key(key));
            let child = self.node(&children)?;
            self.cursor.pop();
            if self.build {
                // The keys are those of a valid map, hence unique.
                out.push_unchecked(key.into(), child);
            }
        }
        Ok(if self.build {
            Tree::Map(out)
        } else {
            Tree::None
        })
    }
}

/// Concatenates `parts` (`len` bytes in all) into a new buffer that starts on an
/// [`ALIGN`]-byte boundary, or `None` if `len` overflows with the padding.
fn concat_aligned<'b>(parts: impl Iterator<Item = &'b [u8]>, len: usize) -> Option<Bytes> {
    if len == 0 {
        return Some(Bytes::new());
    }
    let mut buf = Vec::with_capacity(len.checked_add(ALIGN - 1)?);
    let skip = (ALIGN - (buf.as_ptr() as usize) % ALIGN) % ALIGN;
    buf.resize(skip, 0);
    for part in parts {
        buf.extend_from_slice(part);
    }
    debug_assert_eq!(buf.len(), skip + len, "no reallocation");
    // `Bytes::from` takes the vector over without copying it.
    Some(Bytes::from(buf).slice(skip..))
}

/// Splits a batched tree into `n` trees, cutting every array along axis 0 without
/// copying its data.
///
/// The inverse of [`stack`] for arrays; see the [module docs](self). Every array
/// leaf must have leading dimension `n`; `None` leaves are repeated into every
/// part. With `n == 0` the tree is still checked and the result is empty.
///
/// ```
/// use teleport_protocol::{batch, tree, Array};
///
/// let logits = Array::from_vec([2, 3], vec![0.1f32, 0.2, 0.7, 0.5, 0.4, 0.1])?;
/// let result = tree!({"logits": (logits), "state": null});
/// let parts = batch::split(&result, 2)?;
///
/// assert_eq!(parts.len(), 2);
/// assert_eq!(parts[1].get("logits")?.as_slice::<f32>()?, &[0.5, 0.4, 0.1]);
/// assert!(parts[1].get("state")?.is_none());
///
/// let err = batch::split(&result, 3).unwrap_err();
/// assert_eq!(err.path().to_string(), "logits");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// The first leaf (depth first) that is not `None` or an array with leading
/// dimension `n`: a scalar, string or bytes leaf, a rank-0 array, or an array
/// whose leading dimension differs.
pub fn split(tree: &Tree, n: usize) -> Result<Vec<Tree>, SplitError> {
    split_node(tree, n, &mut Cursor::default())
}

fn split_node<'a>(
    tree: &'a Tree,
    n: usize,
    cursor: &mut Cursor<'a>,
) -> Result<Vec<Tree>, SplitError> {
    match tree {
        Tree::None => Ok(vec![Tree::None; n]),
        Tree::Array(a) => {
            let Some(&found) = a.shape().first() else {
                return Err(SplitError::RankZero {
                    path: cursor.path(),
                    dtype: a.dtype(),
                    expected: n,
                });
            };
            let wrong = || SplitError::LeadingDim {
                path: cursor.path(),
                expected: n,
                found,
                shape: a.shape().to_vec(),
            };
            if found != n {
                return Err(wrong());
            }
            (0..n)
                .map(|i| a.index_axis0(i).map(Tree::Array).map_err(|_| wrong()))
                .collect()
        }
        Tree::List(list) => {
            let mut parts: Vec<Vec<Tree>> =
                (0..n).map(|_| Vec::with_capacity(list.len())).collect();
            for (i, child) in list.iter().enumerate() {
                cursor.push(SegmentRef::Index(i));
                let children = split_node(child, n, cursor)?;
                cursor.pop();
                for (part, child) in parts.iter_mut().zip(children) {
                    part.push(child);
                }
            }
            Ok(parts.into_iter().map(Tree::List).collect())
        }
        Tree::Map(map) => {
            let mut parts: Vec<Map> = (0..n).map(|_| Map::with_capacity(map.len())).collect();
            for (key, child) in map.iter() {
                cursor.push(SegmentRef::Key(key));
                let children = split_node(child, n, cursor)?;
                cursor.pop();
                for (part, child) in parts.iter_mut().zip(children) {
                    // The keys are those of a valid map, hence unique.
                    part.push_unchecked(key.into(), child);
                }
            }
            Ok(parts.into_iter().map(Tree::Map).collect())
        }
        Tree::Bool(_) | Tree::Int(_) | Tree::Float(_) | Tree::Str(_) | Tree::Bytes(_) => {
            Err(SplitError::NotAnArray {
                path: cursor.path(),
                kind: tree.kind_name(),
                expected: n,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bf16, f16, tree, Complex32, Complex64, Element, PathSegment};
    use alloc::string::{String, ToString};

    fn arr<T: Element>(shape: &[usize], values: Vec<T>) -> Tree {
        Tree::Array(Array::from_vec(shape, values).unwrap())
    }

    fn key_path(segments: &[&str]) -> TreePath {
        segments
            .iter()
            .map(|s| match s.parse::<usize>() {
                Ok(i) => PathSegment::Index(i),
                Err(_) => PathSegment::Key(String::from(*s)),
            })
            .collect()
    }

    fn set(tree: &mut Tree, keys: &[&str], value: Tree) {
        let mut node = tree;
        for key in keys {
            let Tree::Map(m) = node else {
                panic!("not a map")
            };
            node = m.get_mut(key).unwrap();
        }
        *node = value;
    }

    fn obs(v: f32, step: i64) -> Tree {
        tree!({
            "obs": {"image": [(arr(&[2], vec![v, v + 1.0])), null], "done": false},
            "step": step,
            "reward": (v as f64),
        })
    }

    #[test]
    fn stacks_arrays_scalars_and_none() {
        let batched = stack(&[obs(1.0, 10), obs(3.0, 11), obs(5.0, 12)]).unwrap();
        let image = batched.get("obs").unwrap().get("image").unwrap();
        let a = image.at(0).unwrap().as_array().unwrap();
        assert_eq!(a.shape(), &[3, 2]);
        assert_eq!(a.as_slice::<f32>().unwrap(), &[1., 2., 3., 4., 5., 6.]);
        assert!(a.is_aligned_to(ALIGN));
        assert!(image.at(1).unwrap().is_none());
        let done = batched.get("obs").unwrap().get("done").unwrap();
        assert_eq!(done.as_array().unwrap().dtype(), DType::Bool);
        assert_eq!(done.as_array().unwrap().to_bools().unwrap(), [false; 3]);
        assert_eq!(
            batched.get("step").unwrap().as_slice::<i64>().unwrap(),
            &[10, 11, 12]
        );
        assert_eq!(
            batched.get("reward").unwrap().as_slice::<f64>().unwrap(),
            &[1., 3., 5.]
        );
        // Key order is kept.
        let keys: Vec<&str> = batched.as_map().unwrap().keys().collect();
        assert_eq!(keys, ["obs", "step", "reward"]);
    }

    #[test]
    fn borrowed_members_stack_too() {
        let (a, b) = (obs(1.0, 1), obs(2.0, 2));
        assert_eq!(stack(&[&a, &b]).unwrap(), stack(&[a, b]).unwrap());
    }

    #[test]
    fn single_member_and_bare_leaves() {
        let one = stack(&[arr(&[3], vec![1u8, 2, 3])]).unwrap();
        assert_eq!(one.as_array().unwrap().shape(), &[1, 3]);
        assert_eq!(stack(&[Tree::None, Tree::None]).unwrap(), Tree::None);
        let ints = stack(&[Tree::Int(-1), Tree::Int(i64::MAX)]).unwrap();
        assert_eq!(ints.as_slice::<i64>().unwrap(), &[-1, i64::MAX]);
        let bools = stack(&[Tree::Bool(true), Tree::Bool(false)]).unwrap();
        assert_eq!(bools.as_array().unwrap().to_bools().unwrap(), [true, false]);
        assert_eq!(stack(&[tree!([]), tree!([])]).unwrap(), tree!([]));
        assert_eq!(stack(&[Tree::map(), Tree::map()]).unwrap(), Tree::map());
    }

    #[test]
    fn rank0_members_stack_to_shape_n() {
        let members: Vec<Tree> = (0..4)
            .map(|i| Tree::Array(Array::scalar(i as u16)))
            .collect();
        let batched = stack(&members).unwrap();
        let a = batched.as_array().unwrap();
        assert_eq!(a.shape(), &[4]);
        assert_eq!(a.as_slice::<u16>().unwrap(), &[0, 1, 2, 3]);
        assert_eq!(split(&batched, 4).unwrap(), members);
    }

    #[test]
    fn empty_arrays_stack_and_split() {
        let e = || Tree::Array(Array::zeros(DType::F32, [0, 3]).unwrap());
        let batched = stack(&[e(), e()]).unwrap();
        assert_eq!(batched.as_array().unwrap().shape(), &[2, 0, 3]);
        assert_eq!(split(&batched, 2).unwrap(), [e(), e()]);

        // Shape [N, 0]: members of shape [0].
        let z = || Tree::Array(Array::zeros(DType::I8, [0]).unwrap());
        let batched = stack(&[z(), z(), z()]).unwrap();
        assert_eq!(batched.as_array().unwrap().shape(), &[3, 0]);
        let parts = split(&batched, 3).unwrap();
        assert_eq!(parts, [z(), z(), z()]);
    }

    #[test]
    fn every_dtype_round_trips() {
        fn check<T: Element>(a: T, b: T) {
            let members = [arr(&[1, 2], vec![a, b]), arr(&[1, 2], vec![b, a])];
            let batched = stack(&members).unwrap();
            let array = batched.as_array().unwrap();
            assert_eq!(array.dtype(), T::DTYPE);
            assert_eq!(array.shape(), &[2, 1, 2]);
            assert_eq!(split(&batched, 2).unwrap(), members);
        }
        check(1i8, -2);
        check(1i16, -2);
        check(1i32, -2);
        check(1i64, -2);
        check(1u8, 2);
        check(1u16, 2);
        check(1u32, 2);
        check(1u64, u64::MAX);
        check(f16::ONE, f16::NEG_INFINITY);
        check(bf16::ONE, bf16::MIN);
        check(1f32, f32::NAN);
        check(1f64, -0.0);
        check(Complex32::new(1.0, -1.0), Complex32::new(0.5, 2.0));
        check(Complex64::new(1.0, -1.0), Complex64::new(0.5, 2.0));
        let bools = [
            Tree::Array(Array::from_bools([2], &[true, false]).unwrap()),
            Tree::Array(Array::from_bools([2], &[false, false]).unwrap()),
        ];
        assert_eq!(split(&stack(&bools).unwrap(), 2).unwrap(), bools);
    }

    #[test]
    fn split_shares_the_batched_buffer() {
        let batched = arr(&[3, 4], (0..12).collect::<Vec<u32>>());
        let base = batched.as_array().unwrap().data().as_ptr() as usize;
        let parts = split(&batched, 3).unwrap();
        for (i, part) in parts.iter().enumerate() {
            let a = part.as_array().unwrap();
            assert_eq!(a.shape(), &[4]);
            assert_eq!(a.data().as_ptr() as usize, base + i * 16);
        }
        assert_eq!(parts[2].as_slice::<u32>().unwrap(), &[8, 9, 10, 11]);
    }

    #[test]
    fn split_keeps_structure_and_zero_parts() {
        let batched = tree!({"a": [(arr(&[2, 1], vec![1i32, 2])), null], "b": {}});
        let parts = split(&batched, 2).unwrap();
        assert_eq!(
            parts[1],
            tree!({"a": [(arr(&[1], vec![2i32])), null], "b": {}})
        );
        // n = 0 checks the tree and returns nothing.
        let empty = tree!({"a": (Array::zeros(DType::F64, [0, 2]).unwrap())});
        assert_eq!(split(&empty, 0).unwrap(), Vec::<Tree>::new());
        assert!(split(&batched, 0).is_err());
        assert_eq!(
            split(&Tree::None, 3).unwrap(),
            [Tree::None, Tree::None, Tree::None]
        );
    }

    #[test]
    fn stack_errors_name_member_path_and_difference() {
        assert_eq!(stack::<Tree>(&[]), Err(StackError::Empty));

        let mut bad = obs(1.0, 1);
        set(
            &mut bad,
            &["obs", "image"],
            tree!([(arr(&[2], vec![1.0f64, 2.0])), null]),
        );
        let err = stack(&[obs(0.0, 0), obs(0.0, 0), bad]).unwrap_err();
        assert_eq!(
            err,
            StackError::DType {
                member: 2,
                reference: 0,
                path: key_path(&["obs", "image", "0"]),
                expected: DType::F32,
                found: DType::F64,
            }
        );
        assert_eq!(
            err.to_string(),
            "batch member 2 differs at `obs.image[0]`: dtype float64, expected float32 (as in member 0)"
        );
        assert_eq!(err.member(), Some(2));
        assert_eq!(err.path().unwrap().to_string(), "obs.image[0]");

        let err = stack(&[arr(&[2], vec![1u8, 2]), arr(&[3], vec![1u8, 2, 3])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch member 1 differs at the root: shape [3], expected [2] (as in member 0)"
        );

        let err = stack(&[tree!({"x": 1}), tree!({"x": 1.0})]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch member 1 differs at `x`: found float, expected int (as in member 0)"
        );

        let err = stack(&[tree!([1, 2]), tree!([1])]).unwrap_err();
        assert!(matches!(
            err,
            StackError::ListLength {
                expected: 2,
                found: 1,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "batch member 1 differs at the root: list of length 1, expected length 2 (as in member 0)"
        );

        let err = stack(&[tree!({"a": 1, "b": 2}), tree!({"b": 2, "a": 1})]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch member 1 differs at the root: key \"b\" at position 0, expected \"a\" \
             (maps must have the same keys in the same order, as in member 0)"
        );
        let err = stack(&[tree!({"m": {"a": 1, "b": 2}}), tree!({"m": {"a": 1}})]).unwrap_err();
        assert!(
            err.to_string()
                .contains("at `m`: missing key \"b\" (position 1)"),
            "{err}"
        );
        let err = stack(&[tree!({"a": 1}), tree!({"a": 1, "c.d": 2})]).unwrap_err();
        assert!(
            err.to_string()
                .contains("unexpected key \"c.d\" (position 1)"),
            "{err}"
        );
    }

    #[test]
    fn strings_and_bytes_do_not_stack() {
        let err = stack(&[tree!({"a": [1, "x"]}), tree!({"a": [2, "y"]})]).unwrap_err();
        assert_eq!(
            err,
            StackError::Unstackable {
                member: 0,
                path: key_path(&["a", "1"]),
                kind: "string"
            }
        );
        assert!(
            err.to_string()
                .starts_with("cannot stack the string at `a[1]`"),
            "{err}"
        );
        let b = || Tree::Bytes(Bytes::from_static(b"raw"));
        let err = stack(&[b(), b()]).unwrap_err();
        assert!(matches!(err, StackError::Unstackable { kind: "bytes", .. }));
    }

    #[test]
    fn stacking_huge_empty_shapes_is_an_error_not_a_panic() {
        let huge = || Tree::Array(Array::new(DType::U8, [usize::MAX, 0], Bytes::new()).unwrap());
        let err = stack(&[huge(), huge()]).unwrap_err();
        assert!(
            matches!(err, StackError::SizeOverflow { count: 2, .. }),
            "{err}"
        );
        assert_eq!(err.member(), None);
    }

    #[test]
    fn split_errors() {
        let t = tree!({"x": [(arr(&[2, 3], vec![0f32; 6])), 5]});
        let err = split(&t, 2).unwrap_err();
        assert_eq!(
            err,
            SplitError::NotAnArray {
                path: key_path(&["x", "1"]),
                kind: "int",
                expected: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "cannot split the int at `x[1]`: every leaf of a batched tree must be an array \
             with leading dimension 2 (the batch size) or None"
        );
        let err = split(&t, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot split the array at `x[0]`: its leading dimension is 2 (shape [2, 3]), \
             expected 3 (the batch size)"
        );
        let err = split(&Tree::Array(Array::scalar(1.0f32)), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot split the rank-0 float32 array at the root: it has no leading dimension; \
             expected leading dimension 1 (the batch size)"
        );
        for leaf in [
            tree!(true),
            tree!(1.5),
            tree!("s"),
            Tree::Bytes(Bytes::new()),
        ] {
            let err = split(&tree!({"k": (leaf.clone())}), 1).unwrap_err();
            assert!(
                matches!(&err, SplitError::NotAnArray { kind, .. } if *kind == leaf.kind_name()),
                "{err}"
            );
            assert_eq!(err.path().to_string(), "k");
        }
    }

    #[test]
    fn compatible_takes_the_most_common_layout() {
        let good = |v: f32| obs(v, 0);
        let mut wrong_shape = obs(0.0, 0);
        set(&mut wrong_shape, &["reward"], Tree::Int(3));
        let with_string = tree!({"s": "text"});

        // The malformed request comes first; it must not win.
        let trees = [wrong_shape, good(1.0), with_string, good(2.0), good(3.0)];
        let out = stack_compatible(&trees);
        assert_eq!(out.members, [1, 3, 4]);
        let stacked = out.stacked.unwrap();
        assert_eq!(
            stacked.get("reward").unwrap().as_slice::<f64>().unwrap(),
            &[1.0, 2.0, 3.0]
        );
        assert_eq!(out.rejected.len(), 2);
        assert_eq!(out.rejected[0].0, 0);
        assert_eq!(
            out.rejected[0].1.to_string(),
            "batch member 0 differs at `reward`: found int, expected float (as in member 1)"
        );
        assert_eq!(out.rejected[1].0, 2);
        assert!(matches!(
            &out.rejected[1].1,
            StackError::Unstackable {
                member: 2,
                kind: "string",
                ..
            }
        ));
    }

    #[test]
    fn compatible_ties_go_to_the_earliest_and_edge_cases() {
        let a = || tree!([1]);
        let b = || tree!([1, 2]);
        let out = stack_compatible(&[b(), a(), a(), b()]);
        assert_eq!(out.members, [0, 3]);
        assert_eq!(out.rejected.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);

        let out = stack_compatible::<Tree>(&[]);
        assert_eq!(out.stacked, None);
        assert!(out.members.is_empty() && out.rejected.is_empty());

        let out = stack_compatible(&[tree!("x"), Tree::Bytes(Bytes::new())]);
        assert_eq!(out.stacked, None);
        assert!(out.members.is_empty());
        assert_eq!(out.rejected.len(), 2);

        // A stack that fails as a whole rejects every member with its error.
        let huge = || Tree::Array(Array::new(DType::U8, [usize::MAX, 0], Bytes::new()).unwrap());
        let out = stack_compatible(&[huge(), huge(), tree!(1)]);
        assert_eq!(out.stacked, None);
        assert!(out.members.is_empty());
        assert_eq!(
            out.rejected.iter().map(|r| r.0).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(matches!(out.rejected[0].1, StackError::SizeOverflow { .. }));
    }

    #[test]
    fn compatible_agrees_with_stack_when_all_match() {
        let trees = [obs(1.0, 1), obs(2.0, 2)];
        let out = stack_compatible(&trees);
        assert_eq!(out.stacked, Some(stack(&trees).unwrap()));
        assert_eq!(out.members, [0, 1]);
        assert!(out.rejected.is_empty());
    }
}
