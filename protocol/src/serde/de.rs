//! The deserializer: a [`Tree`] to any `Deserialize` value.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ::serde::de::value::SeqDeserializer;
use ::serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use ::serde::forward_to_deserialize_any;
use bytes::Bytes;

use super::array::ARRAY_TOKEN;
use super::tree_impls::TREE_TOKEN;
use super::{SerdeError, SerdeErrorKind};
use crate::{Array, Map, Tree};

/// Reads a value out of an owned [`Tree`].
pub(crate) struct TreeDeserializer(pub(crate) Tree);

/// The portable form of an array, `{dtype, shape, data}`, for visitors that
/// are not the array's own (`deserialize_any`, as `untagged` and `flatten`
/// use). Shares the data.
fn portable(array: Array) -> Tree {
    let (dtype, shape, data) = array.into_parts();
    let mut map = Map::with_capacity(3);
    map.push_unchecked("dtype".into(), Tree::Str(dtype.name().into()));
    map.push_unchecked(
        "shape".into(),
        Tree::List(shape.into_iter().map(|d| Tree::Int(d as i64)).collect()),
    );
    map.push_unchecked("data".into(), Tree::Bytes(data));
    Tree::Map(map)
}

fn byte_buf(bytes: Bytes) -> Vec<u8> {
    // No copy when the bytes are a uniquely held `Vec`.
    Vec::from(bytes)
}

impl<'de> de::Deserializer<'de> for TreeDeserializer {
    type Error = SerdeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self.0 {
            Tree::None => visitor.visit_unit(),
            Tree::Bool(b) => visitor.visit_bool(b),
            Tree::Int(i) => visitor.visit_i64(i),
            Tree::Float(f) => visitor.visit_f64(f),
            Tree::Str(s) => visitor.visit_string(s),
            Tree::Bytes(b) => visitor.visit_byte_buf(byte_buf(b)),
            Tree::Array(a) => TreeDeserializer(portable(a)).deserialize_any(visitor),
            Tree::List(items) => visit_list(items, visitor),
            Tree::Map(map) => visit_map(map, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self.0 {
            Tree::None => visitor.visit_none(),
            other => visitor.visit_some(TreeDeserializer(other)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        #[cfg(feature = "std")]
        if name == TREE_TOKEN || (name == ARRAY_TOKEN && matches!(self.0, Tree::Array(_))) {
            // The visitor is `Tree`'s or `Array`'s own: it takes the value
            // from the side table, whole.
            return super::array::stash::hand(self.0, || {
                visitor.visit_newtype_struct(TreeDeserializer(Tree::None))
            });
        }
        match self.0 {
            Tree::Array(a) if name == ARRAY_TOKEN => {
                visitor.visit_newtype_struct(TreeDeserializer(portable(a)))
            }
            // Not even the portable form.
            ref other if name == ARRAY_TOKEN && !matches!(other, Tree::Map(_) | Tree::List(_)) => {
                Err(SerdeError::wrong_kind("an array", describe(other)))
            }
            other => {
                let _ = (name, TREE_TOKEN);
                visitor.visit_newtype_struct(TreeDeserializer(other))
            }
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self.0 {
            Tree::List(items) => visit_list(items, visitor),
            // `Vec<u8>` and `[u8; N]` became bytes.
            Tree::Bytes(b) => {
                let mut seq = SeqDeserializer::<_, SerdeError>::new(b.into_iter());
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            other => TreeDeserializer(other).deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        match self.0 {
            Tree::Str(variant) => visitor.visit_enum(Enum {
                variant,
                content: None,
            }),
            Tree::Map(map) if map.len() == 1 => {
                let (variant, content) = map.into_iter().next().expect("one entry");
                visitor.visit_enum(Enum {
                    variant,
                    content: Some(content),
                })
            }
            other => Err(SerdeError::wrong_kind(
                "an enum: a string, or a map with one key",
                describe(&other),
            )),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct map struct identifier
    }
}

/// The kind of a node, for an error message: `map with 2 keys`, `int`.
fn describe(tree: &Tree) -> String {
    match tree {
        Tree::Map(m) => format!("map with {} keys", m.len()),
        other => other.kind_name().into(),
    }
}

fn visit_list<'de, V: Visitor<'de>>(items: Vec<Tree>, visitor: V) -> Result<V::Value, SerdeError> {
    let len = items.len();
    let mut seq = Seq {
        items: items.into_iter(),
        index: 0,
    };
    let value = visitor.visit_seq(&mut seq)?;
    if seq.items.len() > 0 {
        return Err(SerdeError::new(SerdeErrorKind::InvalidLength {
            len,
            expected: format!("{} elements", seq.index),
        }));
    }
    Ok(value)
}

fn visit_map<'de, V: Visitor<'de>>(map: Map, visitor: V) -> Result<V::Value, SerdeError> {
    let mut access = MapAccess {
        entries: map.into_iter(),
        value: None,
    };
    visitor.visit_map(&mut access)
}

struct Seq {
    items: alloc::vec::IntoIter<Tree>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Seq {
    type Error = SerdeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, SerdeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(TreeDeserializer(item))
            .map(Some)
            .map_err(|e| e.under_index(index))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess {
    entries: alloc::vec::IntoIter<(String, Tree)>,
    value: Option<(String, Tree)>,
}

impl<'de> de::MapAccess<'de> for MapAccess {
    type Error = SerdeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, SerdeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let k = seed
            .deserialize(KeyDeserializer(&key))
            .map_err(|e| e.under_key(&key))?;
        self.value = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, SerdeError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("next_value called before next_key"))?;
        seed.deserialize(TreeDeserializer(value))
            .map_err(|e| e.under_key(&key))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An enum: a variant name, with content unless it is a unit variant.
struct Enum {
    variant: String,
    content: Option<Tree>,
}

impl<'de> de::EnumAccess<'de> for Enum {
    type Error = SerdeError;
    type Variant = Variant;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Variant), SerdeError> {
        let value = seed.deserialize(KeyDeserializer(&self.variant))?;
        Ok((
            value,
            Variant {
                variant: self.variant,
                content: self.content,
            },
        ))
    }
}

struct Variant {
    variant: String,
    content: Option<Tree>,
}

impl Variant {
    fn content(self, expected: &str) -> Result<(String, Tree), SerdeError> {
        match self.content {
            Some(content) => Ok((self.variant, content)),
            None => Err(SerdeError::wrong_kind(
                expected,
                format!("unit variant `{}`", self.variant),
            )),
        }
    }
}

impl<'de> de::VariantAccess<'de> for Variant {
    type Error = SerdeError;

    fn unit_variant(self) -> Result<(), SerdeError> {
        match self.content {
            None | Some(Tree::None) => Ok(()),
            Some(other) => {
                Err(SerdeError::wrong_kind("unit variant", describe(&other))
                    .under_key(&self.variant))
            }
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, SerdeError> {
        let (variant, content) = self.content("newtype variant")?;
        seed.deserialize(TreeDeserializer(content))
            .map_err(|e| e.under_key(&variant))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        let (variant, content) = self.content("tuple variant")?;
        de::Deserializer::deserialize_seq(TreeDeserializer(content), visitor)
            .map_err(|e| e.under_key(&variant))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        let (variant, content) = self.content("struct variant")?;
        de::Deserializer::deserialize_any(TreeDeserializer(content), visitor)
            .map_err(|e| e.under_key(&variant))
    }
}

/// A map key (or a variant name): a string, parsed when the type wants a
/// number or a bool.
struct KeyDeserializer<'a>(&'a str);

macro_rules! parse_key {
    ($($method:ident => $visit:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
            match self.0.parse() {
                Ok(v) => visitor.$visit(v),
                Err(_) => visitor.visit_str(self.0),
            }
        })*
    };
}

impl<'de> de::Deserializer<'de> for KeyDeserializer<'_> {
    type Error = SerdeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        visitor.visit_str(self.0)
    }

    parse_key! {
        deserialize_bool => visit_bool,
        deserialize_i8 => visit_i8, deserialize_i16 => visit_i16,
        deserialize_i32 => visit_i32, deserialize_i64 => visit_i64,
        deserialize_i128 => visit_i128,
        deserialize_u8 => visit_u8, deserialize_u16 => visit_u16,
        deserialize_u32 => visit_u32, deserialize_u64 => visit_u64,
        deserialize_u128 => visit_u128,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    forward_to_deserialize_any! {
        f32 f64 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}
