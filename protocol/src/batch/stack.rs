//! [`stack`]: N trees of one structure into one tree with a new axis 0.

use alloc::vec::Vec;
use core::borrow::Borrow;
use core::mem::discriminant;

use bytes::Bytes;

use super::StackError;
use crate::path::{Cursor, SegmentRef};
use crate::wire::ALIGN;
use crate::{Array, Map, Tree};

/// Stacks trees of identical structure into one tree whose arrays have a new
/// leading axis of length `trees.len()`.
///
/// See the [module docs](crate::batch) for what each leaf becomes. Each member's array
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
/// structure, dtype or shape differs from member 0's.
pub fn stack<T: Borrow<Tree>>(trees: &[T]) -> Result<Tree, StackError> {
    let nodes: Vec<&Tree> = trees.iter().map(Borrow::borrow).collect();
    if nodes.is_empty() {
        return Err(StackError::Empty);
    }
    let ids: Vec<usize> = (0..nodes.len()).collect();
    Walk::new(&ids, true).node(&nodes)
}

/// Compares the corresponding nodes of the batch members and, when `build` is
/// set, builds the stacked node (otherwise it only checks, and returns `None`s).
pub(super) struct Walk<'a, 'i> {
    /// The input index of each node passed to [`Walk::node`]; `ids[0]` is the
    /// reference the others are compared with.
    ids: &'i [usize],
    build: bool,
    cursor: Cursor<'a>,
}

impl<'a, 'i> Walk<'a, 'i> {
    pub(super) fn new(ids: &'i [usize], build: bool) -> Self {
        Walk {
            ids,
            build,
            cursor: Cursor::default(),
        }
    }

    /// `nodes` is never empty and has one node per entry of `ids`.
    pub(super) fn node(&mut self, nodes: &[&'a Tree]) -> Result<Tree, StackError> {
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
            // No array form: a list with one element per row, as numpy
            // stacks strings (bytes leaves share their buffers).
            Tree::Str(_) | Tree::Bytes(_) => Ok(if self.build {
                Tree::List(nodes.iter().map(|t| (*t).clone()).collect())
            } else {
                Tree::None
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
