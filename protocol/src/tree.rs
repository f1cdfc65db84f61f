//! The array tree: maps and lists whose leaves are arrays and small scalars.

use alloc::string::String;
use alloc::vec::Vec;
use bytes::Bytes;

use crate::{Array, DType, Element};

/// A tree of arrays: what a call sends and what a reply returns.
///
/// Maps keep insertion order and have unique string keys; a tuple is a [`Tree::List`].
#[derive(Clone, Debug, PartialEq)]
pub enum Tree {
    /// No value (Python's `None`).
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A UTF-8 string, carried in the message header.
    Str(String),
    /// Raw bytes, carried beside the arrays and never re-encoded.
    Bytes(Bytes),
    Array(Array),
    List(Vec<Tree>),
    Map(Map),
}

/// A map with string keys that keeps insertion order.
///
/// Lookups are linear: the maps sent in practice are small, and order matters more.
#[derive(Clone, Default, PartialEq)]
pub struct Map {
    entries: Vec<(String, Tree)>,
}

impl core::fmt::Debug for Map {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A compact, JSON-like rendering for people: `{"obs": float32[2, 3], "step": 3}`.
/// Arrays and bytes show their type and shape, never their data.
impl core::fmt::Display for Tree {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Tree::None => f.write_str("null"),
            Tree::Bool(b) => write!(f, "{b}"),
            Tree::Int(i) => write!(f, "{i}"),
            Tree::Float(x) => write!(f, "{x:?}"),
            Tree::Str(s) => write!(f, "{s:?}"),
            Tree::Bytes(b) => write!(f, "bytes[{}]", b.len()),
            Tree::Array(a) => write!(f, "{a}"),
            Tree::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Tree::Map(map) => {
                f.write_str("{")?;
                for (i, (key, value)) in map.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{key:?}: {value}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// What went wrong when building or reading a tree or an array.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    #[error("expected {expected}, found {found}")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    #[error("missing key {0:?}")]
    MissingKey(String),
    #[error("index {index} is out of range for length {len}")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("expected dtype {expected}, found {found}")]
    WrongDType { expected: DType, found: DType },
    #[error("expected shape {expected:?}, found {found:?}")]
    WrongShape {
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{dtype} array of shape {shape:?} needs {expected} bytes, got {actual}")]
    DataLength {
        dtype: DType,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("array size overflows the address space")]
    SizeOverflow,
    #[error("bool element {index} is {byte}; a bool array holds only 0 and 1")]
    BadBool { index: usize, byte: u8 },
    #[error("{dtype} data is not aligned to {align} bytes; use to_vec() to copy it")]
    Misaligned { dtype: DType, align: usize },
    #[error("a rank-0 array has no axis 0")]
    RankZero,
    #[error("typed views of multi-byte dtypes need a little-endian host; use the raw bytes")]
    BigEndianHost,
    #[error("the array is not in standard (C-contiguous) layout")]
    NotContiguous,
}

impl Tree {
    /// A short name of this node's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Tree::None => "none",
            Tree::Bool(_) => "bool",
            Tree::Int(_) => "int",
            Tree::Float(_) => "float",
            Tree::Str(_) => "string",
            Tree::Bytes(_) => "bytes",
            Tree::Array(_) => "array",
            Tree::List(_) => "list",
            Tree::Map(_) => "map",
        }
    }

    /// An empty map.
    pub fn map() -> Tree {
        Tree::Map(Map::new())
    }

    fn wrong(&self, expected: &'static str) -> TreeError {
        TreeError::WrongKind {
            expected,
            found: self.kind_name(),
        }
    }

    /// The child under `key` of a map node.
    pub fn get(&self, key: &str) -> Result<&Tree, TreeError> {
        self.as_map()?
            .get(key)
            .ok_or_else(|| TreeError::MissingKey(key.into()))
    }

    /// The child at `index` of a list node.
    pub fn at(&self, index: usize) -> Result<&Tree, TreeError> {
        let list = self.as_list()?;
        list.get(index).ok_or(TreeError::IndexOutOfRange {
            index,
            len: list.len(),
        })
    }

    pub fn as_map(&self) -> Result<&Map, TreeError> {
        match self {
            Tree::Map(m) => Ok(m),
            other => Err(other.wrong("map")),
        }
    }

    pub fn as_list(&self) -> Result<&[Tree], TreeError> {
        match self {
            Tree::List(l) => Ok(l),
            other => Err(other.wrong("list")),
        }
    }

    pub fn as_array(&self) -> Result<&Array, TreeError> {
        match self {
            Tree::Array(a) => Ok(a),
            other => Err(other.wrong("array")),
        }
    }

    pub fn into_array(self) -> Result<Array, TreeError> {
        match self {
            Tree::Array(a) => Ok(a),
            other => Err(other.wrong("array")),
        }
    }

    pub fn as_bool(&self) -> Result<bool, TreeError> {
        match self {
            Tree::Bool(b) => Ok(*b),
            other => Err(other.wrong("bool")),
        }
    }

    pub fn as_int(&self) -> Result<i64, TreeError> {
        match self {
            Tree::Int(i) => Ok(*i),
            other => Err(other.wrong("int")),
        }
    }

    /// A float, or an int widened to a float.
    pub fn as_float(&self) -> Result<f64, TreeError> {
        match self {
            Tree::Float(f) => Ok(*f),
            Tree::Int(i) => Ok(*i as f64),
            other => Err(other.wrong("float")),
        }
    }

    pub fn as_str(&self) -> Result<&str, TreeError> {
        match self {
            Tree::Str(s) => Ok(s),
            other => Err(other.wrong("string")),
        }
    }

    pub fn as_bytes(&self) -> Result<&Bytes, TreeError> {
        match self {
            Tree::Bytes(b) => Ok(b),
            other => Err(other.wrong("bytes")),
        }
    }

    /// A typed view of the array at this node (see [`Array::as_slice`]).
    pub fn as_slice<T: Element>(&self) -> Result<&[T], TreeError> {
        self.as_array()?.as_slice()
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Tree::None)
    }

    /// Every array in the tree, in depth-first order.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        let mut stack = alloc::vec![self];
        core::iter::from_fn(move || {
            while let Some(node) = stack.pop() {
                match node {
                    Tree::Array(a) => return Some(a),
                    Tree::List(l) => stack.extend(l.iter().rev()),
                    Tree::Map(m) => stack.extend(m.values().rev()),
                    _ => {}
                }
            }
            None
        })
    }

    /// The total bytes held by arrays and bytes leaves.
    pub fn data_len(&self) -> usize {
        let mut total = 0usize;
        let mut stack = alloc::vec![self];
        while let Some(node) = stack.pop() {
            match node {
                Tree::Array(a) => total = total.saturating_add(a.nbytes()),
                Tree::Bytes(b) => total = total.saturating_add(b.len()),
                Tree::List(l) => stack.extend(l.iter()),
                Tree::Map(m) => stack.extend(m.values()),
                _ => {}
            }
        }
        total
    }
}

impl Map {
    pub fn new() -> Map {
        Map::default()
    }

    pub fn with_capacity(capacity: usize) -> Map {
        Map {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// Sets `key` to `value`, keeping the key's position if it was present, and
    /// returns the old value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Tree>) -> Option<Tree> {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => Some(core::mem::replace(slot, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }

    /// Appends an entry without checking whether the key exists. Callers that
    /// already know the key is new (the decoder, which checks separately) use this.
    pub(crate) fn push_unchecked(&mut self, key: String, value: Tree) {
        self.entries.push((key, value));
    }

    pub fn get(&self, key: &str) -> Option<&Tree> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Tree> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut Tree> {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    pub fn remove(&mut self, key: &str) -> Option<Tree> {
        let pos = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(pos).1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &Tree)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Tree> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl IntoIterator for Map {
    type Item = (String, Tree);
    type IntoIter = alloc::vec::IntoIter<(String, Tree)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<K: Into<String>, V: Into<Tree>> FromIterator<(K, V)> for Map {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Map {
        let mut map = Map::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl<K: Into<String>, V: Into<Tree>> FromIterator<(K, V)> for Tree {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Tree {
        Tree::Map(iter.into_iter().collect())
    }
}

impl<V: Into<Tree>> FromIterator<V> for Tree {
    fn from_iter<I: IntoIterator<Item = V>>(iter: I) -> Tree {
        Tree::List(iter.into_iter().map(Into::into).collect())
    }
}

macro_rules! from_scalar {
    ($($t:ty => $variant:ident as $conv:ty),* $(,)?) => {
        $(impl From<$t> for Tree {
            fn from(v: $t) -> Tree {
                Tree::$variant(<$conv>::from(v))
            }
        })*
    };
}

from_scalar! {
    bool => Bool as bool,
    i8 => Int as i64, i16 => Int as i64, i32 => Int as i64, i64 => Int as i64,
    u8 => Int as i64, u16 => Int as i64, u32 => Int as i64,
    f32 => Float as f64, f64 => Float as f64,
    String => Str as String, &str => Str as String,
    Bytes => Bytes as Bytes,
    Array => Array as Array,
    Map => Map as Map,
}

impl From<()> for Tree {
    fn from(_: ()) -> Tree {
        Tree::None
    }
}

/// A length or an index. Panics above `i64::MAX`, which no length reaches.
impl From<usize> for Tree {
    fn from(v: usize) -> Tree {
        Tree::Int(i64::try_from(v).expect("a usize above i64::MAX does not fit a tree's int"))
    }
}

impl From<isize> for Tree {
    fn from(v: isize) -> Tree {
        Tree::Int(v as i64)
    }
}

impl From<char> for Tree {
    fn from(v: char) -> Tree {
        Tree::Str(v.into())
    }
}

impl From<&String> for Tree {
    fn from(v: &String) -> Tree {
        Tree::Str(v.clone())
    }
}

impl<T: Into<Tree>> From<Option<T>> for Tree {
    fn from(v: Option<T>) -> Tree {
        v.map_or(Tree::None, Into::into)
    }
}

impl From<Vec<Tree>> for Tree {
    fn from(v: Vec<Tree>) -> Tree {
        Tree::List(v)
    }
}

/// Bytes, as `to_tree` makes of a `Vec<u8>` (for a `uint8` array, use
/// [`Array::from_vec1`]).
impl From<Vec<u8>> for Tree {
    fn from(v: Vec<u8>) -> Tree {
        Tree::Bytes(Bytes::from(v))
    }
}

/// Bytes (copied).
impl From<&[u8]> for Tree {
    fn from(v: &[u8]) -> Tree {
        Tree::Bytes(Bytes::copy_from_slice(v))
    }
}

/// A 1-d bool array (copied: one byte per element).
impl From<&[bool]> for Tree {
    fn from(v: &[bool]) -> Tree {
        Tree::Array(Array::from_bools([v.len()], v).expect("a 1-d shape matches its length"))
    }
}

/// A 1-d bool array.
impl From<Vec<bool>> for Tree {
    fn from(v: Vec<bool>) -> Tree {
        Tree::from(v.as_slice())
    }
}

macro_rules! from_elements {
    ($($t:ty),* $(,)?) => {
        $(
            /// A 1-d array that takes over the vector (no copy).
            impl From<Vec<$t>> for Tree {
                fn from(v: Vec<$t>) -> Tree {
                    Tree::Array(Array::from_vec1(v))
                }
            }

            /// A 1-d array holding a copy of the slice.
            impl From<&[$t]> for Tree {
                fn from(v: &[$t]) -> Tree {
                    Tree::Array(
                        Array::from_slice([v.len()], v).expect("a 1-d shape matches its length"),
                    )
                }
            }
        )*
    };
}

// Every element type but `u8`, whose vectors and slices are bytes.
from_elements! {
    i8, i16, i32, i64, u16, u32, u64, f32, f64,
    half::f16, half::bf16, num_complex::Complex<f32>, num_complex::Complex<f64>,
}

/// Builds a [`Tree`] with JSON-like syntax.
///
/// Keys are string literals; values are `null`, nested `{..}` maps, `[..]`
/// lists, or any expression that converts [`Into<Tree>`](Tree) (see the
/// `From` impls of [`Tree`]: numbers, strings, options, [`Array`]s, and
/// vectors or slices of array elements, which become 1-d arrays). An
/// expression ends at the next top-level comma; it needs parentheses only
/// when it starts with `{` or `[` and goes on (`([1, 2].len())`).
///
/// ```
/// use teleport_protocol::{tree, Array, Tree};
/// let obs = Array::from_vec1(vec![1.0f32, 2.0, 3.0]);
/// let step = 2;
/// let t = tree!({
///     "step": step + 1,
///     "obs": obs.clone(),
///     "done": [false, true],
///     "info": { "name": "cartpole", "seed": null },
///     "weights": vec![0.5f32, 0.25],
/// });
/// assert_eq!(t.get("step").unwrap().as_int().unwrap(), 3);
/// assert_eq!(t.get("obs").unwrap().as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0]);
/// assert!(t.get("info").unwrap().get("seed").unwrap().is_none());
/// assert_eq!(t.get("weights").unwrap().as_slice::<f32>().unwrap(), &[0.5, 0.25]);
/// ```
///
/// A value of many tokens is read one token at a time, so very large literal
/// trees of long expressions may need a higher `#![recursion_limit]`.
#[macro_export]
macro_rules! tree {
    (null) => { $crate::Tree::None };
    // Fast paths: every value is a single token tree.
    ({ $($key:literal : $value:tt),* $(,)? }) => {{
        #[allow(unused_mut)]
        let mut map = $crate::Map::new();
        $( map.insert($key, $crate::tree!($value)); )*
        $crate::Tree::Map(map)
    }};
    ([ $($value:tt),* $(,)? ]) => {
        $crate::Tree::List($crate::__alloc_vec![$($crate::tree!($value)),*])
    };
    // Values of several tokens: munch each until its comma.
    ({ $($body:tt)+ }) => {{
        let mut map = $crate::Map::new();
        $crate::__tree_map!(map $($body)+);
        $crate::Tree::Map(map)
    }};
    ([ $($body:tt)+ ]) => {
        $crate::__tree_list!(() () $($body)+)
    };
    // A parenthesised expression: unwrap it here, so `tree!((a + b))` does not
    // trip the unused-parentheses lint at the call site.
    (( $value:expr )) => { $crate::Tree::from($value) };
    ($value:expr) => { $crate::Tree::from($value) };
}

/// The entries of a map in [`tree!`]; not part of the API.
#[doc(hidden)]
#[macro_export]
macro_rules! __tree_map {
    ($map:ident) => {};
    ($map:ident $key:literal : $($rest:tt)+) => {
        $crate::__tree_map!(@value $map $key () $($rest)+)
    };
    (@value $map:ident $key:literal ($($value:tt)+) , $($rest:tt)*) => {
        $map.insert($key, $crate::tree!($($value)+));
        $crate::__tree_map!($map $($rest)*);
    };
    (@value $map:ident $key:literal ($($value:tt)+)) => {
        $map.insert($key, $crate::tree!($($value)+));
    };
    (@value $map:ident $key:literal ($($value:tt)*) $next:tt $($rest:tt)*) => {
        $crate::__tree_map!(@value $map $key ($($value)* $next) $($rest)*)
    };
}

/// The elements of a list in [`tree!`]; not part of the API.
#[doc(hidden)]
#[macro_export]
macro_rules! __tree_list {
    // (elements done) (the element being read) tokens left
    (($($done:expr),*) ()) => {
        $crate::Tree::List($crate::__alloc_vec![$($done),*])
    };
    (($($done:expr),*) ($($value:tt)+) , $($rest:tt)*) => {
        $crate::__tree_list!(($($done,)* $crate::tree!($($value)+)) () $($rest)*)
    };
    (($($done:expr),*) ($($value:tt)+)) => {
        $crate::__tree_list!(($($done,)* $crate::tree!($($value)+)) ())
    };
    (($($done:expr),*) ($($value:tt)*) $next:tt $($rest:tt)*) => {
        $crate::__tree_list!(($($done),*) ($($value)* $next) $($rest)*)
    };
}

/// The structure of a tree without its data: keys, kinds, dtypes and shapes.
///
/// Two trees can be stacked into a batch exactly when their layouts are equal, so a
/// server groups batch members by layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layout(Vec<LayoutNode>);

/// One node of a [`Layout`], in depth-first order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LayoutNode {
    None,
    Bool,
    Int,
    Float,
    Str,
    Bytes,
    Array { dtype: DType, shape: Vec<usize> },
    List(usize),
    Map(Vec<String>),
}

impl Tree {
    /// This tree's [`Layout`].
    pub fn layout(&self) -> Layout {
        let mut nodes = Vec::new();
        let mut stack = alloc::vec![self];
        while let Some(node) = stack.pop() {
            nodes.push(match node {
                Tree::None => LayoutNode::None,
                Tree::Bool(_) => LayoutNode::Bool,
                Tree::Int(_) => LayoutNode::Int,
                Tree::Float(_) => LayoutNode::Float,
                Tree::Str(_) => LayoutNode::Str,
                Tree::Bytes(_) => LayoutNode::Bytes,
                Tree::Array(a) => LayoutNode::Array {
                    dtype: a.dtype(),
                    shape: a.shape().to_vec(),
                },
                Tree::List(l) => {
                    stack.extend(l.iter().rev());
                    LayoutNode::List(l.len())
                }
                Tree::Map(m) => {
                    stack.extend(m.values().rev());
                    LayoutNode::Map(m.keys().map(String::from).collect())
                }
            });
        }
        Layout(nodes)
    }
}

impl Layout {
    /// The nodes in depth-first order.
    pub fn nodes(&self) -> &[LayoutNode] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn display_is_compact_and_never_shows_array_data() {
        let obs = Array::from_vec([2, 3], vec![0.0f32; 6]).unwrap();
        let t = tree!({"obs": (obs), "step": 3, "ok": true, "x": 0.5, "name": "a\"b",
                       "none": null, "raw": (Bytes::from_static(b"xyz")), "l": [1, []]});
        assert_eq!(
            t.to_string(),
            r#"{"obs": float32[2, 3], "step": 3, "ok": true, "x": 0.5, "name": "a\"b", "none": null, "raw": bytes[3], "l": [1, []]}"#
        );
        assert_eq!(alloc::format!("{:?}", Map::new()), "{}");
    }

    #[test]
    fn macro_builds_nested_trees() {
        let a = Array::from_vec1(vec![1u8, 2]);
        let t = tree!({"a": 1, "b": [1.5, "x", null], "c": {}, "d": [], "e": (a.clone())});
        let m = t.as_map().unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b", "c", "d", "e"]);
        assert_eq!(t.get("b").unwrap().at(1).unwrap().as_str().unwrap(), "x");
        assert!(t.get("b").unwrap().at(2).unwrap().is_none());
        assert_eq!(t.get("e").unwrap().as_array().unwrap(), &a);
        assert_eq!(t.get("c").unwrap().as_map().unwrap().len(), 0);
    }

    #[test]
    fn macro_takes_expressions_and_from_is_unambiguous() {
        let x = 2;
        let name = String::from("n");
        let t = tree!({
            "a": x + 1,
            "b": vec![1.0f32, 2.0],
            "c": [x * 2, "s", vec![1i64, 2].len(), null],
            "d": {"e": Some(3u32), "f": None::<i32>, "g": &name},
            "h": &[1.5f64, 2.5][..],
            "i": vec![7u8, 8],
            "j": 'c',
        });
        assert_eq!(t.get("a").unwrap(), &Tree::Int(3));
        assert_eq!(t.get("b").unwrap().as_slice::<f32>().unwrap(), &[1.0, 2.0]);
        assert_eq!(t.get("c").unwrap(), &tree!([4, "s", 2, null]));
        assert_eq!(t.get("d").unwrap(), &tree!({"e": 3, "f": null, "g": "n"}));
        assert_eq!(t.get("h").unwrap().as_slice::<f64>().unwrap(), &[1.5, 2.5]);
        assert_eq!(t.get("i").unwrap().as_bytes().unwrap().as_ref(), &[7, 8]);
        assert_eq!(t.get("j").unwrap().as_str().unwrap(), "c");
        assert_eq!(tree!([x, x + 1,]), tree!([2, 3]));
        assert_eq!(Tree::from(5usize), Tree::Int(5));
        assert_eq!(Tree::from(5), Tree::Int(5));
        assert_eq!(
            Tree::from(vec![true, false]).as_array().unwrap().dtype(),
            DType::Bool
        );
    }

    #[test]
    fn accessors_give_clear_errors() {
        let t = tree!({"x": 1});
        assert_eq!(t.get("y").unwrap_err().to_string(), "missing key \"y\"");
        assert_eq!(
            t.get("x").unwrap().as_array().unwrap_err().to_string(),
            "expected array, found int"
        );
        assert!(matches!(
            tree!([1]).at(4),
            Err(TreeError::IndexOutOfRange { index: 4, len: 1 })
        ));
    }

    #[test]
    fn map_insert_keeps_position() {
        let mut m = Map::new();
        m.insert("a", 1);
        m.insert("b", 2);
        assert_eq!(m.insert("a", 3), Some(Tree::Int(1)));
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.remove("a"), Some(Tree::Int(3)));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn layout_ignores_values_but_not_shapes() {
        let a = |v: f32| Array::from_vec([2], vec![v, v]).unwrap();
        let t1 = tree!({"x": (a(1.0)), "n": 1});
        let t2 = tree!({"x": (a(2.0)), "n": 5});
        let t3 = tree!({"x": (Array::from_vec1(vec![1.0f32])), "n": 5});
        assert_eq!(t1.layout(), t2.layout());
        assert_ne!(t1.layout(), t3.layout());
    }

    #[test]
    fn arrays_iterates_in_order() {
        let t = tree!({"a": (Array::scalar(1u8)), "b": [(Array::scalar(2u8)), 3]});
        let vals: Vec<u8> = t.arrays().map(|a| a.as_slice::<u8>().unwrap()[0]).collect();
        assert_eq!(vals, [1, 2]);
        assert_eq!(t.data_len(), 2);
    }
}
