//! The serializer: any `Serialize` value to a [`Tree`].

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::Cell;

use ::serde::ser::{self, Serialize};
use bytes::Bytes;

use super::array::ARRAY_TOKEN;
use super::tree_impls::TREE_TOKEN;
use super::{SerdeError, SerdeErrorKind};
use crate::{Array, Map, Tree};

/// Builds a [`Tree`] from a value. `u8` is set when the value was a `u8`, so
/// a sequence of them (`Vec<u8>`, `[u8; N]`) can become [`Tree::Bytes`].
#[derive(Clone, Copy, Default)]
pub(crate) struct TreeSerializer<'a> {
    u8: Option<&'a Cell<bool>>,
}

fn int(value: i128, target: &str) -> Result<Tree, SerdeError> {
    i64::try_from(value).map(Tree::Int).map_err(|_| {
        SerdeError::new(SerdeErrorKind::IntOutOfRange {
            value,
            target: target.into(),
        })
    })
}

/// Serializes `value` as a child: errors get no segment here, the caller adds it.
fn child<T: Serialize + ?Sized>(value: &T) -> Result<Tree, SerdeError> {
    value.serialize(TreeSerializer::default())
}

fn variant_map(variant: &'static str, content: Tree) -> Tree {
    let mut map = Map::with_capacity(1);
    map.push_unchecked(variant.into(), content);
    Tree::Map(map)
}

impl<'a> ser::Serializer for TreeSerializer<'a> {
    type Ok = Tree;
    type Error = SerdeError;
    type SerializeSeq = SeqSerializer;
    type SerializeTuple = SeqSerializer;
    type SerializeTupleStruct = SeqSerializer;
    type SerializeTupleVariant = VariantSerializer<SeqSerializer>;
    type SerializeMap = MapSerializer;
    type SerializeStruct = MapSerializer;
    type SerializeStructVariant = VariantSerializer<MapSerializer>;

    fn serialize_bool(self, v: bool) -> Result<Tree, SerdeError> {
        Ok(Tree::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v))
    }
    fn serialize_i128(self, v: i128) -> Result<Tree, SerdeError> {
        int(v, "a tree's int (i64)")
    }
    fn serialize_u8(self, v: u8) -> Result<Tree, SerdeError> {
        if let Some(flag) = self.u8 {
            flag.set(true);
        }
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Tree, SerdeError> {
        Ok(Tree::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Tree, SerdeError> {
        int(v.into(), "a tree's int (i64)")
    }
    fn serialize_u128(self, v: u128) -> Result<Tree, SerdeError> {
        match i128::try_from(v) {
            Ok(v) => int(v, "a tree's int (i64)"),
            Err(_) => Err(SerdeError::new(SerdeErrorKind::IntOutOfRange {
                value: i128::MAX,
                target: "a tree's int (i64)".into(),
            })),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<Tree, SerdeError> {
        Ok(Tree::Float(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Tree, SerdeError> {
        Ok(Tree::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<Tree, SerdeError> {
        Ok(Tree::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Tree, SerdeError> {
        Ok(Tree::Str(v.into()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Tree, SerdeError> {
        Ok(Tree::Bytes(Bytes::copy_from_slice(v)))
    }
    fn serialize_none(self) -> Result<Tree, SerdeError> {
        Ok(Tree::None)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Tree, SerdeError> {
        child(value)
    }
    fn serialize_unit(self) -> Result<Tree, SerdeError> {
        Ok(Tree::None)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Tree, SerdeError> {
        Ok(Tree::None)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Tree, SerdeError> {
        Ok(Tree::Str(variant.into()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<Tree, SerdeError> {
        if name == ARRAY_TOKEN || name == TREE_TOKEN {
            return resolve(name, child(value)?);
        }
        child(value)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Tree, SerdeError> {
        let content = child(value).map_err(|e| e.under_key(variant))?;
        Ok(variant_map(variant, content))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqSerializer, SerdeError> {
        Ok(SeqSerializer::new(len, true))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqSerializer, SerdeError> {
        Ok(SeqSerializer::new(Some(len), true))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqSerializer, SerdeError> {
        Ok(SeqSerializer::new(Some(len), false))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSerializer<SeqSerializer>, SerdeError> {
        Ok(VariantSerializer {
            variant,
            inner: SeqSerializer::new(Some(len), false),
        })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<MapSerializer, SerdeError> {
        Ok(MapSerializer::new(len.unwrap_or(0)))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<MapSerializer, SerdeError> {
        Ok(MapSerializer::new(len))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSerializer<MapSerializer>, SerdeError> {
        Ok(VariantSerializer {
            variant,
            inner: MapSerializer::new(len),
        })
    }
}

/// The value behind what `Array::serialize` or `Tree::serialize` wrote
/// inside its newtype `name`: a handle into the side table, an array's
/// portable form, or a tree's structure.
fn resolve(name: &str, inner: Tree) -> Result<Tree, SerdeError> {
    #[cfg(feature = "std")]
    if let Tree::Int(id) = inner {
        return u64::try_from(id)
            .ok()
            .and_then(super::array::stash::take)
            .ok_or_else(|| SerdeError::wrong_kind("an array or tree", "an unknown handle"));
    }
    if name == TREE_TOKEN {
        return Ok(inner);
    }
    match inner {
        portable @ Tree::Map(_) => super::from_tree::<Array>(portable).map(Tree::Array),
        other => Err(SerdeError::wrong_kind("an array", other.kind_name())),
    }
}

/// Lists, and `Bytes` for a sequence of `u8`s.
pub(crate) struct SeqSerializer {
    items: Vec<Tree>,
    /// Every element so far was a `u8` (and this sequence may become bytes).
    all_u8: bool,
}

impl SeqSerializer {
    fn new(len: Option<usize>, may_be_bytes: bool) -> SeqSerializer {
        SeqSerializer {
            items: Vec::with_capacity(len.unwrap_or(0).min(4096)),
            all_u8: may_be_bytes,
        }
    }

    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        let index = self.items.len();
        let was_u8 = Cell::new(false);
        let item = value
            .serialize(TreeSerializer { u8: Some(&was_u8) })
            .map_err(|e| e.under_index(index))?;
        // Only a bare `u8` sets the flag: the element's own children are
        // serialized without it.
        self.all_u8 &= was_u8.get() && matches!(item, Tree::Int(_));
        self.items.push(item);
        Ok(())
    }

    fn finish(self) -> Tree {
        if self.all_u8 && !self.items.is_empty() {
            let bytes: Vec<u8> = self
                .items
                .iter()
                .map(|t| match t {
                    Tree::Int(i) => *i as u8,
                    _ => unreachable!("every element is a u8"),
                })
                .collect();
            return Tree::Bytes(Bytes::from(bytes));
        }
        Tree::List(self.items)
    }
}

impl ser::SerializeSeq for SeqSerializer {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTuple for SeqSerializer {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleStruct for SeqSerializer {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(self.finish())
    }
}

/// Maps and structs. Keys must serialize as strings (chars, integers and
/// bools are written as strings).
pub(crate) struct MapSerializer {
    map: Map,
    key: Option<String>,
}

impl MapSerializer {
    fn new(len: usize) -> MapSerializer {
        MapSerializer {
            map: Map::with_capacity(len.min(4096)),
            key: None,
        }
    }

    fn entry<T: Serialize + ?Sized>(&mut self, key: String, value: &T) -> Result<(), SerdeError> {
        let value = child(value).map_err(|e| e.under_key(&key))?;
        self.map.insert(key, value);
        Ok(())
    }
}

impl ser::SerializeMap for MapSerializer {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), SerdeError> {
        self.key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ser::Error::custom("serialize_value called before serialize_key"))?;
        self.entry(key, value)
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(Tree::Map(self.map))
    }
}

impl ser::SerializeStruct for MapSerializer {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerdeError> {
        self.entry(key.into(), value)
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(Tree::Map(self.map))
    }
}

/// `{variant: content}` for tuple and struct variants.
pub(crate) struct VariantSerializer<S> {
    variant: &'static str,
    inner: S,
}

impl ser::SerializeTupleVariant for VariantSerializer<SeqSerializer> {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        let variant = self.variant;
        self.inner.push(value).map_err(|e| e.under_key(variant))
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(variant_map(self.variant, Tree::List(self.inner.items)))
    }
}

impl ser::SerializeStructVariant for VariantSerializer<MapSerializer> {
    type Ok = Tree;
    type Error = SerdeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerdeError> {
        let variant = self.variant;
        self.inner
            .entry(key.into(), value)
            .map_err(|e| e.under_key(variant))
    }
    fn end(self) -> Result<Tree, SerdeError> {
        Ok(variant_map(self.variant, Tree::Map(self.inner.map)))
    }
}

/// Map keys: strings, or scalars written as strings.
struct KeySerializer;

fn not_string(kind: &'static str) -> SerdeError {
    SerdeError::new(SerdeErrorKind::KeyNotString(kind))
}

impl ser::Serializer for KeySerializer {
    type Ok = String;
    type Error = SerdeError;
    type SerializeSeq = ser::Impossible<String, SerdeError>;
    type SerializeTuple = ser::Impossible<String, SerdeError>;
    type SerializeTupleStruct = ser::Impossible<String, SerdeError>;
    type SerializeTupleVariant = ser::Impossible<String, SerdeError>;
    type SerializeMap = ser::Impossible<String, SerdeError>;
    type SerializeStruct = ser::Impossible<String, SerdeError>;
    type SerializeStructVariant = ser::Impossible<String, SerdeError>;

    fn serialize_bool(self, v: bool) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_i8(self, v: i8) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_i128(self, v: i128) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_u128(self, v: u128) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_f32(self, _v: f32) -> Result<String, SerdeError> {
        Err(not_string("float"))
    }
    fn serialize_f64(self, _v: f64) -> Result<String, SerdeError> {
        Err(not_string("float"))
    }
    fn serialize_char(self, v: char) -> Result<String, SerdeError> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, SerdeError> {
        Ok(v.into())
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<String, SerdeError> {
        Err(not_string("bytes"))
    }
    fn serialize_none(self) -> Result<String, SerdeError> {
        Err(not_string("none"))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<String, SerdeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<String, SerdeError> {
        Err(not_string("unit"))
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, SerdeError> {
        Err(not_string("unit struct"))
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, SerdeError> {
        Ok(variant.into())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<String, SerdeError> {
        if name == ARRAY_TOKEN || name == TREE_TOKEN {
            return match resolve(name, child(value)?)? {
                Tree::Str(s) => Ok(s),
                other => Err(not_string(other.kind_name())),
            };
        }
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, SerdeError> {
        Err(not_string("enum variant with content"))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, SerdeError> {
        Err(not_string("list"))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, SerdeError> {
        Err(not_string("list"))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, SerdeError> {
        Err(not_string("list"))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, SerdeError> {
        Err(not_string("enum variant with content"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, SerdeError> {
        Err(not_string("map"))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, SerdeError> {
        Err(not_string("map"))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, SerdeError> {
        Err(not_string("enum variant with content"))
    }
}
