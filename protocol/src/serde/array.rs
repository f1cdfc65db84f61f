//! `Serialize` and `Deserialize` for [`Array`], zero-copy through trees.
//!
//! serde's data model has no n-dimensional array, so an [`Array`] serializes
//! as a newtype struct with a reserved name, [`ARRAY_TOKEN`] (the trick
//! `serde_json::value::RawValue` uses). What is inside depends on who asks:
//!
//! - Inside [`to_tree`](super::to_tree) (with the `std` feature) the inside
//!   is a `u64` handle: the array itself waits in a thread-local side table,
//!   and the tree's serializer takes it out. Inside
//!   [`from_tree`](super::from_tree) the deserializer leaves the array in the
//!   table just before it calls the array's visitor, which takes it. Cloning an [`Array`] only
//!   bumps the reference count of its [`Bytes`](bytes::Bytes), so no data is
//!   copied.
//! - Anywhere else (serde_json, postcard, ...), and without `std`, the inside
//!   is the portable form: a struct `{dtype, shape, data}`, with `dtype` the
//!   NumPy-style name (`"float32"`), `shape` a list of integers and `data` the
//!   C-order little-endian bytes (serialized with `serialize_bytes`). Reading
//!   it back copies the data once, into memory aligned for the dtype.

use alloc::vec::Vec;
use core::fmt;

use ::serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use ::serde::ser::{SerializeStruct, Serializer};
use ::serde::{Deserialize, Serialize};
use bytes::Bytes;

use crate::{Array, DType};

/// The newtype-struct name an [`Array`] serializes under.
pub(crate) const ARRAY_TOKEN: &str = "$teleport::private::Array";
/// The struct name of the portable form.
pub(crate) const REPR_NAME: &str = "Array";
pub(crate) const REPR_FIELDS: &[&str] = &["dtype", "shape", "data"];

/// The side table arrays (and whole trees) wait in while a tree is built or read.
#[cfg(feature = "std")]
pub(crate) mod stash {
    use alloc::vec::Vec;
    use core::cell::RefCell;

    use crate::Tree;

    struct State {
        /// How many `to_tree`/`from_tree` calls are running on this thread.
        sessions: usize,
        next: u64,
        /// Values serialized as handles, waiting for the serializer.
        waiting: Vec<(u64, Tree)>,
        /// The value the deserializer hands to the visitor it calls next.
        handed: Option<Tree>,
    }

    std::thread_local! {
        static STATE: RefCell<State> = const {
            RefCell::new(State { sessions: 0, next: 0, waiting: Vec::new(), handed: None })
        };
    }

    /// Open while `to_tree` or `from_tree` runs; the table empties when the
    /// last one on the thread ends, so nothing outlives it.
    pub(crate) struct Session(());

    impl Session {
        pub(crate) fn enter() -> Session {
            STATE.with_borrow_mut(|s| s.sessions += 1);
            Session(())
        }
    }

    impl Drop for Session {
        fn drop(&mut self) {
            STATE.with_borrow_mut(|s| {
                s.sessions -= 1;
                if s.sessions == 0 {
                    s.waiting.clear();
                    s.handed = None;
                }
            });
        }
    }

    /// Leaves `value` in the table and returns its handle, if a session is open.
    pub(crate) fn put(value: impl FnOnce() -> Tree) -> Option<u64> {
        STATE.with_borrow_mut(|s| {
            if s.sessions == 0 {
                return None;
            }
            let id = s.next;
            s.next = s.next.wrapping_add(1);
            s.waiting.push((id, value()));
            Some(id)
        })
    }

    /// Takes the value left under `id`.
    pub(crate) fn take(id: u64) -> Option<Tree> {
        STATE.with_borrow_mut(|s| {
            let pos = s.waiting.iter().rposition(|(k, _)| *k == id)?;
            Some(s.waiting.swap_remove(pos).1)
        })
    }

    /// Runs `f` with `value` handed over: the first thing the visitor `f`
    /// calls does is [`receive`] it. Returns the value back if `f` did not.
    pub(crate) fn hand<R>(value: Tree, f: impl FnOnce() -> R) -> R {
        STATE.with_borrow_mut(|s| s.handed = Some(value));
        let result = f();
        STATE.with_borrow_mut(|s| s.handed = None);
        result
    }

    /// The value the tree's deserializer handed over, if it did.
    pub(crate) fn receive() -> Option<Tree> {
        STATE.with_borrow_mut(|s| s.handed.take())
    }
}

/// The portable form, borrowed.
struct Repr<'a>(&'a Array);

impl Serialize for Repr<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct(REPR_NAME, 3)?;
        s.serialize_field("dtype", self.0.dtype().name())?;
        s.serialize_field("shape", self.0.shape())?;
        s.serialize_field("data", &RawBytes(self.0.data()))?;
        s.end()
    }
}

struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Serializes as a newtype struct of a reserved name: zero-copy inside
/// [`to_tree`](crate::serde::to_tree), the portable form `{dtype, shape,
/// data}` elsewhere (see [`crate::serde`]).
impl Serialize for Array {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[cfg(feature = "std")]
        if let Some(id) = stash::put(|| crate::Tree::Array(self.clone())) {
            return serializer.serialize_newtype_struct(ARRAY_TOKEN, &id);
        }
        serializer.serialize_newtype_struct(ARRAY_TOKEN, &Repr(self))
    }
}

/// Deserializes what [`Serialize`] wrote: zero-copy inside
/// [`from_tree`](crate::serde::from_tree), from the portable form `{dtype,
/// shape, data}` elsewhere, with one copy of the data.
impl<'de> Deserialize<'de> for Array {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Array, D::Error> {
        deserializer.deserialize_newtype_struct(ARRAY_TOKEN, ArrayVisitor)
    }
}

struct ArrayVisitor;

impl<'de> Visitor<'de> for ArrayVisitor {
    type Value = Array;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Array, D::Error> {
        #[cfg(feature = "std")]
        if let Some(tree) = stash::receive() {
            return tree.into_array().map_err(de::Error::custom);
        }
        d.deserialize_struct(REPR_NAME, REPR_FIELDS, ReprVisitor)
    }

    // Self-describing formats may skip the newtype and show the inside.

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Array, A::Error> {
        ReprVisitor.visit_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Array, A::Error> {
        ReprVisitor.visit_seq(seq)
    }
}

/// Reads a handle or the portable form.
struct ReprVisitor;

impl ReprVisitor {
    fn build<E: de::Error>(dtype: &str, shape: Vec<usize>, data: &[u8]) -> Result<Array, E> {
        let dtype = DType::ALL
            .iter()
            .copied()
            .find(|d| d.name() == dtype)
            .ok_or_else(|| E::invalid_value(de::Unexpected::Str(dtype), &"a dtype name"))?;
        Array::new(dtype, shape, aligned_copy(dtype, data)).map_err(E::custom)
    }
}

impl<'de> Visitor<'de> for ReprVisitor {
    type Value = Array;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array as {dtype, shape, data}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Array, A::Error> {
        let (mut dtype, mut shape, mut data) = (None, None, None);
        while let Some(key) = map.next_key::<alloc::string::String>()? {
            match key.as_str() {
                "dtype" => dtype = Some(map.next_value::<alloc::string::String>()?),
                "shape" => shape = Some(map.next_value::<Vec<usize>>()?),
                "data" => data = Some(map.next_value::<ByteBuf>()?.0),
                other => return Err(de::Error::unknown_field(other, REPR_FIELDS)),
            }
        }
        let dtype = dtype.ok_or_else(|| de::Error::missing_field("dtype"))?;
        let shape = shape.ok_or_else(|| de::Error::missing_field("shape"))?;
        let data = data.ok_or_else(|| de::Error::missing_field("data"))?;
        ReprVisitor::build(&dtype, shape, &data)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Array, A::Error> {
        let dtype: alloc::string::String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let shape: Vec<usize> = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let data: ByteBuf = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(2, &self))?;
        ReprVisitor::build(&dtype, shape, &data.0)
    }
}

/// Bytes from `deserialize_bytes`, or from a sequence of `u8` (as JSON has them).
pub(crate) struct ByteBuf(pub(crate) Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteBuf, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(ByteBuf(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A copy of `data` in memory aligned for `dtype`'s elements, so typed views
/// of the array work.
fn aligned_copy(dtype: DType, data: &[u8]) -> Bytes {
    fn typed<T: crate::Element>(data: &[u8]) -> Option<Bytes> {
        if data.len() % core::mem::size_of::<T>() != 0 {
            return None;
        }
        let values: Vec<T> = bytemuck::pod_collect_to_vec(data);
        Some(Array::from_vec1(values).into_data())
    }
    let aligned = match dtype.size() {
        2 => typed::<u16>(data),
        4 => typed::<u32>(data),
        8 => typed::<u64>(data),
        16 => typed::<num_complex::Complex<f64>>(data),
        _ => None,
    };
    // A length that is no multiple of the size is refused by `Array::new`.
    aligned.unwrap_or_else(|| Bytes::copy_from_slice(data))
}
