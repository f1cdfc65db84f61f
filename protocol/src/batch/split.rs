//! [`split`]: a batched tree back into its N members.

use alloc::vec;
use alloc::vec::Vec;

use super::SplitError;
use crate::path::{Cursor, SegmentRef};
use crate::{Map, Tree};

/// Splits a batched tree into `n` trees, cutting every array along axis 0 without
/// copying its data.
///
/// The inverse of [`stack`](fn@super::stack); see the [module docs](crate::batch).
/// Every array leaf must have leading dimension `n`; `None` leaves are repeated
/// into every part; a non-empty list of strings only, or of bytes only, must
/// have `n` elements and element `i` goes to part `i`. With `n == 0` the tree
/// is still checked and the result is empty.
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
/// dimension `n`: a scalar, a string or bytes leaf outside a list of them, a
/// rank-0 array, or an array whose leading dimension differs; or a list of
/// strings or bytes whose length is not `n`.
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
        Tree::List(list) if column_kind(list).is_some() => {
            if list.len() != n {
                return Err(SplitError::ColumnLength {
                    path: cursor.path(),
                    kind: column_kind(list).unwrap_or_default(),
                    expected: n,
                    found: list.len(),
                });
            }
            // Bytes leaves keep sharing their buffers; strings are copied.
            Ok(list.clone())
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

/// `Some("strings")` or `Some("bytes")` when `list` is the stacked form of a
/// string or bytes leaf: non-empty, and every element a string, or every
/// element bytes.
fn column_kind(list: &[Tree]) -> Option<&'static str> {
    match list.first()? {
        Tree::Str(_) if list.iter().all(|t| matches!(t, Tree::Str(_))) => Some("strings"),
        Tree::Bytes(_) if list.iter().all(|t| matches!(t, Tree::Bytes(_))) => Some("bytes"),
        _ => None,
    }
}
