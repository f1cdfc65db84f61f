//! Paths to nodes inside a [`Tree`](crate::Tree), for error messages.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Where a node sits inside a tree: the map keys and list indices leading to it.
///
/// It displays the way a user would write it: map keys joined by dots and list
/// indices in brackets, as in `obs.image[2]`. A key that is empty or holds
/// anything but letters, digits, `_` and `-` is quoted in brackets instead
/// (`meta["file.name"]`), so every path reads back unambiguously. The root
/// displays as `<root>`.
///
/// ```
/// use teleport_protocol::{PathSegment, TreePath};
/// let path: TreePath = [
///     PathSegment::Key("obs".into()),
///     PathSegment::Key("image".into()),
///     PathSegment::Index(2),
///     PathSegment::Key("a.b".into()),
/// ]
/// .into_iter()
/// .collect();
/// assert_eq!(path.to_string(), r#"obs.image[2]["a.b"]"#);
/// assert_eq!(TreePath::root().to_string(), "<root>");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TreePath(Vec<PathSegment>);

/// One step of a [`TreePath`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSegment {
    /// The child under this key of a map.
    Key(String),
    /// The child at this index of a list.
    Index(usize),
}

impl TreePath {
    /// The path of the root node (no segments).
    pub fn root() -> TreePath {
        TreePath(Vec::new())
    }

    /// True for the root's path.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The segments from the root down.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// Appends a segment.
    pub fn push(&mut self, segment: PathSegment) {
        self.0.push(segment);
    }

    /// Removes and returns the last segment.
    pub fn pop(&mut self) -> Option<PathSegment> {
        self.0.pop()
    }

    /// The path as it reads inside an error message: `` `obs.image[2]` ``, or
    /// `the root`.
    pub(crate) fn at(&self) -> At<'_> {
        At(self)
    }
}

impl FromIterator<PathSegment> for TreePath {
    fn from_iter<I: IntoIterator<Item = PathSegment>>(iter: I) -> TreePath {
        TreePath(iter.into_iter().collect())
    }
}

/// True when `key` can be written after a dot without quoting.
fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
}

/// Writes one segment; `first` says whether it starts the path (no dot before a key).
pub(crate) fn write_segment(
    f: &mut fmt::Formatter<'_>,
    first: bool,
    segment: SegmentRef<'_>,
) -> fmt::Result {
    match segment {
        SegmentRef::Index(i) => write!(f, "[{i}]"),
        SegmentRef::Key(k) if is_bare_key(k) => {
            if !first {
                f.write_str(".")?;
            }
            f.write_str(k)
        }
        // `Debug` of a `str` quotes and escapes it.
        SegmentRef::Key(k) => write!(f, "[{k:?}]"),
    }
}

/// A borrowed [`PathSegment`]: what the tree walkers keep while they descend, so
/// that no key is cloned unless an error is reported.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SegmentRef<'a> {
    Key(&'a str),
    Index(usize),
}

impl SegmentRef<'_> {
    pub(crate) fn to_owned(self) -> PathSegment {
        match self {
            SegmentRef::Key(k) => PathSegment::Key(k.into()),
            SegmentRef::Index(i) => PathSegment::Index(i),
        }
    }
}

impl PathSegment {
    fn as_ref(&self) -> SegmentRef<'_> {
        match self {
            PathSegment::Key(k) => SegmentRef::Key(k),
            PathSegment::Index(i) => SegmentRef::Index(*i),
        }
    }
}

impl fmt::Display for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str("<root>");
        }
        for (i, segment) in self.0.iter().enumerate() {
            write_segment(f, i == 0, segment.as_ref())?;
        }
        Ok(())
    }
}

/// See [`TreePath::at`].
pub(crate) struct At<'a>(&'a TreePath);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_root() {
            f.write_str("the root")
        } else {
            write!(f, "`{}`", self.0)
        }
    }
}

/// The path of the node a walker is at, as borrowed segments.
#[derive(Debug, Default)]
pub(crate) struct Cursor<'a>(Vec<SegmentRef<'a>>);

impl<'a> Cursor<'a> {
    pub(crate) fn push(&mut self, segment: SegmentRef<'a>) {
        self.0.push(segment);
    }

    pub(crate) fn pop(&mut self) {
        self.0.pop();
    }

    /// An owned copy, for an error.
    pub(crate) fn path(&self) -> TreePath {
        TreePath(self.0.iter().map(|s| s.to_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn path(segments: &[SegmentRef<'_>]) -> TreePath {
        let mut c = Cursor::default();
        for s in segments {
            c.push(*s);
        }
        c.path()
    }

    #[test]
    fn formats_keys_and_indices() {
        use SegmentRef::{Index, Key};
        assert_eq!(path(&[]).to_string(), "<root>");
        assert_eq!(path(&[Key("obs")]).to_string(), "obs");
        assert_eq!(
            path(&[Key("obs"), Key("image"), Index(2)]).to_string(),
            "obs.image[2]"
        );
        assert_eq!(path(&[Index(0), Key("x")]).to_string(), "[0].x");
        assert_eq!(path(&[Index(0), Index(3)]).to_string(), "[0][3]");
        assert_eq!(
            path(&[Key("a.b"), Key(""), Key("q\"x")]).to_string(),
            r#"["a.b"][""]["q\"x"]"#
        );
        assert_eq!(
            path(&[Key("snake_case-key"), Key("über")]).to_string(),
            "snake_case-key.über"
        );
        // A key that looks like a path, or like the root, is quoted.
        assert_eq!(path(&[Key("<root>")]).to_string(), r#"["<root>"]"#);
        assert_eq!(path(&[Key("a[0]")]).to_string(), r#"["a[0]"]"#);
    }

    #[test]
    fn at_reads_inside_a_sentence() {
        assert_eq!(TreePath::root().at().to_string(), "the root");
        let mut p = TreePath::root();
        p.push(PathSegment::Key("x".into()));
        p.push(PathSegment::Index(1));
        assert_eq!(p.at().to_string(), "`x[1]`");
        assert_eq!(p.pop(), Some(PathSegment::Index(1)));
        assert_eq!(p.segments(), &[PathSegment::Key("x".into())]);
    }
}
