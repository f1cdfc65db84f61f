//! The error of [`to_tree`](super::to_tree) and [`from_tree`](super::from_tree).

use alloc::string::{String, ToString};
use core::fmt;

use crate::path::PathSegment;
use crate::{TreeError, TreePath};

/// Why a value did not convert to or from a [`Tree`](crate::Tree), and where.
///
/// It displays as ``at `weights[3]`: invalid type: string "x", expected f32``:
/// the [`path`](SerdeError::path) of the node inside the tree (map keys and
/// list indices; struct fields are map keys), then [what](SerdeError::kind)
/// went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at {}: {kind}", path.at())]
pub struct SerdeError {
    path: TreePath,
    kind: SerdeErrorKind,
}

/// What went wrong in a [`SerdeError`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SerdeErrorKind {
    /// A message from a `Serialize` or `Deserialize` implementation.
    #[error("{0}")]
    Message(String),
    /// An integer that does not fit: a tree's ints are `i64`, so a `u64` or
    /// `u128` above `i64::MAX` does not convert (it is never wrapped), and a
    /// tree's int may not fit the Rust type it is read into.
    #[error("integer {value} is out of range for {target}")]
    IntOutOfRange {
        /// The integer.
        value: i128,
        /// The type it did not fit (`i64` when serializing).
        target: String,
    },
    /// The node (or value) is of another kind than the type expects.
    #[error("invalid type: {found}, expected {expected}")]
    WrongKind {
        /// What the type wanted.
        expected: String,
        /// What the tree held.
        found: String,
    },
    /// The node is of the right kind but its value is not acceptable.
    #[error("invalid value: {found}, expected {expected}")]
    InvalidValue {
        /// What the type wanted.
        expected: String,
        /// What the tree held.
        found: String,
    },
    /// A list or map of the wrong length (a tuple or array of fixed size).
    #[error("invalid length {len}, expected {expected}")]
    InvalidLength {
        /// The length found.
        len: usize,
        /// What the type wanted.
        expected: String,
    },
    /// A struct field is missing from its map.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A map has a key the struct does not know (with `deny_unknown_fields`).
    #[error("unknown field `{field}`, expected one of {expected:?}")]
    UnknownField {
        /// The key.
        field: String,
        /// The struct's fields.
        expected: &'static [&'static str],
    },
    /// An enum variant name the enum does not know.
    #[error("unknown variant `{variant}`, expected one of {expected:?}")]
    UnknownVariant {
        /// The name found.
        variant: String,
        /// The enum's variants.
        expected: &'static [&'static str],
    },
    /// A map key that is not a string (nor a char, integer or bool, which are
    /// written as strings): a tree's maps have string keys.
    #[error("a map key must be a string, found {0}")]
    KeyNotString(&'static str),
    /// An [`Array`](crate::Array) in its portable form (dtype, shape and
    /// data) that does not make an array.
    #[error("not an array: {0}")]
    Array(TreeError),
}

impl SerdeError {
    pub(crate) fn new(kind: SerdeErrorKind) -> SerdeError {
        SerdeError {
            path: TreePath::root(),
            kind,
        }
    }

    /// Where in the tree the error is: the keys and indices from the root.
    pub fn path(&self) -> &TreePath {
        &self.path
    }

    /// What went wrong.
    pub fn kind(&self) -> &SerdeErrorKind {
        &self.kind
    }

    /// Puts `segment` in front of the path: called by each level the error
    /// passes on its way up.
    pub(crate) fn under(mut self, segment: PathSegment) -> SerdeError {
        let mut path = TreePath::root();
        path.push(segment);
        for s in self.path.segments() {
            path.push(s.clone());
        }
        self.path = path;
        self
    }

    pub(crate) fn under_key(self, key: &str) -> SerdeError {
        self.under(PathSegment::Key(key.into()))
    }

    pub(crate) fn under_index(self, index: usize) -> SerdeError {
        self.under(PathSegment::Index(index))
    }

    pub(crate) fn wrong_kind(expected: impl fmt::Display, found: impl fmt::Display) -> SerdeError {
        SerdeError::new(SerdeErrorKind::WrongKind {
            expected: expected.to_string(),
            found: found.to_string(),
        })
    }
}

impl ::serde::ser::Error for SerdeError {
    fn custom<T: fmt::Display>(msg: T) -> SerdeError {
        SerdeError::new(SerdeErrorKind::Message(msg.to_string()))
    }
}

impl ::serde::de::Error for SerdeError {
    fn custom<T: fmt::Display>(msg: T) -> SerdeError {
        SerdeError::new(SerdeErrorKind::Message(msg.to_string()))
    }

    fn invalid_type(unexp: ::serde::de::Unexpected<'_>, exp: &dyn ::serde::de::Expected) -> Self {
        SerdeError::wrong_kind(exp, unexp)
    }

    fn invalid_value(unexp: ::serde::de::Unexpected<'_>, exp: &dyn ::serde::de::Expected) -> Self {
        use ::serde::de::Unexpected;
        let kind = match unexp {
            Unexpected::Signed(value) => SerdeErrorKind::IntOutOfRange {
                value: value.into(),
                target: exp.to_string(),
            },
            Unexpected::Unsigned(value) => SerdeErrorKind::IntOutOfRange {
                value: value.into(),
                target: exp.to_string(),
            },
            other => SerdeErrorKind::InvalidValue {
                expected: exp.to_string(),
                found: other.to_string(),
            },
        };
        SerdeError::new(kind)
    }

    fn invalid_length(len: usize, exp: &dyn ::serde::de::Expected) -> Self {
        SerdeError::new(SerdeErrorKind::InvalidLength {
            len,
            expected: exp.to_string(),
        })
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        SerdeError::new(SerdeErrorKind::UnknownVariant {
            variant: variant.into(),
            expected,
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        SerdeError::new(SerdeErrorKind::UnknownField {
            field: field.into(),
            expected,
        })
    }

    fn missing_field(field: &'static str) -> Self {
        SerdeError::new(SerdeErrorKind::MissingField(field))
    }
}
