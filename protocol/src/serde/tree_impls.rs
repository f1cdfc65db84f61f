//! `Serialize` and `Deserialize` for [`Tree`] itself, so a struct can hold a
//! free-form subtree.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ::serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use ::serde::ser::{SerializeMap, Serializer};
use ::serde::{Deserialize, Serialize};
use bytes::Bytes;

use crate::{Map, Tree};

/// The newtype-struct name a [`Tree`] serializes under (see
/// [`ARRAY_TOKEN`](super::array::ARRAY_TOKEN)).
pub(crate) const TREE_TOKEN: &str = "$teleport::private::Tree";

/// Inside [`to_tree`](super::to_tree) the tree goes in whole (its arrays and
/// bytes are shared, not copied). Elsewhere it serializes as its structure:
/// none as unit, maps as maps, lists as sequences, bytes with
/// `serialize_bytes` and arrays in their portable form.
impl Serialize for Tree {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[cfg(feature = "std")]
        if let Some(id) = super::array::stash::put(|| self.clone()) {
            return serializer.serialize_newtype_struct(TREE_TOKEN, &id);
        }
        serializer.serialize_newtype_struct(TREE_TOKEN, &Structure(self))
    }
}

struct Structure<'a>(&'a Tree);

impl Serialize for Structure<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Tree::None => serializer.serialize_unit(),
            Tree::Bool(b) => serializer.serialize_bool(*b),
            Tree::Int(i) => serializer.serialize_i64(*i),
            Tree::Float(f) => serializer.serialize_f64(*f),
            Tree::Str(s) => serializer.serialize_str(s),
            Tree::Bytes(b) => serializer.serialize_bytes(b),
            Tree::Array(a) => a.serialize(serializer),
            Tree::List(items) => serializer.collect_seq(items.iter().map(Structure)),
            Tree::Map(map) => {
                let mut m = serializer.serialize_map(Some(map.len()))?;
                for (k, v) in map.iter() {
                    m.serialize_entry(k, &Structure(v))?;
                }
                m.end()
            }
        }
    }
}

/// Inside [`from_tree`](super::from_tree) the subtree comes out whole.
/// Elsewhere any self-describing input makes a tree: unit and none become
/// [`Tree::None`], sequences lists, maps maps (keys must be strings), bytes
/// [`Tree::Bytes`]. An array's portable form stays a map there.
impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Tree, D::Error> {
        deserializer.deserialize_newtype_struct(TREE_TOKEN, TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
        #[cfg(feature = "std")]
        if let Some(tree) = super::array::stash::receive() {
            return Ok(tree);
        }
        d.deserialize_any(TreeVisitor)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Tree, E> {
        Ok(Tree::None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Tree, E> {
        Ok(Tree::None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Tree, E> {
        Ok(Tree::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tree, E> {
        i64::try_from(v)
            .map(Tree::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"a tree's int (i64)"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Tree, E> {
        Ok(Tree::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::Str(v.into()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Tree, E> {
        Ok(Tree::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Tree, E> {
        Ok(Tree::Bytes(Bytes::copy_from_slice(v)))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Tree, E> {
        Ok(Tree::Bytes(Bytes::from(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element::<Tree>()? {
            items.push(item);
        }
        Ok(Tree::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Tree, A::Error> {
        let mut map = Map::with_capacity(access.size_hint().unwrap_or(0).min(4096));
        while let Some((k, v)) = access.next_entry::<String, Tree>()? {
            map.insert(k, v);
        }
        Ok(Tree::Map(map))
    }
}
