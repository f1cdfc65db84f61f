//! JSON in and out for `teleport call`: arguments typed in a shell, results
//! printed for a human.

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use teleport::protocol::{bf16, f16, Complex32, Complex64};
use teleport::{Array, DType, Element, Map, Tree};

use crate::builtins::{parse_dtype, parse_shape};

/// How many leading values of an array the printed summary shows.
const SHOWN_VALUES: usize = 8;

/// Reads call arguments from JSON: objects become maps, arrays lists, and
/// numbers, strings, booleans and null scalars. An object with the single key
/// `"__array__"` builds an array:
/// `{"__array__": {"dtype": "f32", "shape": [2, 3], "fill": 1.0}}`, or with
/// `"data": [..]` (row-major values) instead of `"fill"`.
pub(crate) fn tree_from_json(value: &Value) -> anyhow::Result<Tree> {
    Ok(match value {
        Value::Null => Tree::None,
        Value::Bool(b) => Tree::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Tree::Int(i),
            None => Tree::Float(n.as_f64().context("a number JSON cannot hold as f64")?),
        },
        Value::String(s) => Tree::Str(s.clone()),
        Value::Array(items) => Tree::List(
            items
                .iter()
                .map(tree_from_json)
                .collect::<anyhow::Result<_>>()?,
        ),
        Value::Object(object) => {
            if let (1, Some(spec)) = (object.len(), object.get("__array__")) {
                return array_from_json(spec).map(Tree::Array);
            }
            let mut map = Map::with_capacity(object.len());
            for (key, value) in object {
                map.insert(key.clone(), tree_from_json(value)?);
            }
            Tree::Map(map)
        }
    })
}

fn array_from_json(spec: &Value) -> anyhow::Result<Array> {
    let spec = tree_from_json(spec)?;
    let dtype_name = spec
        .get("dtype")
        .and_then(|d| d.as_str())
        .map_err(|e| anyhow!("__array__ needs \"dtype\" (say \"f32\"): {e}"))?;
    let dtype = parse_dtype(dtype_name).map_err(|e| anyhow!("{}", e.message()))?;
    let shape = spec
        .get("shape")
        .map_err(|e| anyhow!("__array__ needs \"shape\" (say [2, 3]): {e}"))
        .and_then(|s| parse_shape(s).map_err(|e| anyhow!("{}", e.message())))?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .context("the shape's element count overflows")?;
    let values: Vec<f64> = match (spec.get("data"), spec.get("fill")) {
        (Ok(data), _) => {
            let data = data
                .as_list()
                .context("\"data\" must be a list of numbers")?;
            if data.len() != count {
                bail!(
                    "\"data\" has {} values but shape {shape:?} holds {count}",
                    data.len()
                );
            }
            data.iter().map(number).collect::<anyhow::Result<_>>()?
        }
        (Err(_), Ok(fill)) => vec![number(fill)?; count],
        (Err(_), Err(_)) => vec![0.0; count],
    };
    // `as` saturates float-to-int conversions: fine for values a person typed.
    let array = match dtype {
        DType::Bool => {
            let bools: Vec<bool> = values.iter().map(|&v| v != 0.0).collect();
            Array::from_bools(shape, &bools)
        }
        DType::I8 => typed(shape, &values, |v| v as i8),
        DType::I16 => typed(shape, &values, |v| v as i16),
        DType::I32 => typed(shape, &values, |v| v as i32),
        DType::I64 => typed(shape, &values, |v| v as i64),
        DType::U8 => typed(shape, &values, |v| v as u8),
        DType::U16 => typed(shape, &values, |v| v as u16),
        DType::U32 => typed(shape, &values, |v| v as u32),
        DType::U64 => typed(shape, &values, |v| v as u64),
        DType::F16 => typed(shape, &values, f16::from_f64),
        DType::BF16 => typed(shape, &values, bf16::from_f64),
        DType::F32 => typed(shape, &values, |v| v as f32),
        DType::F64 => typed(shape, &values, |v| v),
        DType::Complex64 => typed(shape, &values, |v| Complex32::new(v as f32, 0.0)),
        DType::Complex128 => typed(shape, &values, |v| Complex64::new(v, 0.0)),
        other => bail!("building {other} arrays from JSON is not supported"),
    };
    Ok(array?)
}

fn typed<T: Element>(
    shape: Vec<usize>,
    values: &[f64],
    convert: impl Fn(f64) -> T,
) -> Result<Array, teleport::TreeError> {
    Array::from_vec(shape, values.iter().map(|&v| convert(v)).collect())
}

fn number(tree: &Tree) -> anyhow::Result<f64> {
    match tree {
        Tree::Int(i) => Ok(*i as f64),
        Tree::Float(f) => Ok(*f),
        Tree::Bool(b) => Ok(f64::from(u8::from(*b))),
        other => bail!("expected a number, found {}", other.kind_name()),
    }
}

/// Writes a result as JSON. Arrays are summarised (dtype, shape, the first
/// few values), raw bytes by their length, and floats JSON cannot hold
/// (NaN, infinities) as strings.
pub(crate) fn tree_to_json(tree: &Tree) -> Value {
    match tree {
        Tree::None => Value::Null,
        Tree::Bool(b) => Value::Bool(*b),
        Tree::Int(i) => json!(i),
        Tree::Float(f) if f.is_finite() => json!(f),
        Tree::Float(f) => Value::String(f.to_string()),
        Tree::Str(s) => Value::String(s.clone()),
        Tree::Bytes(b) => json!({"__bytes__": {"len": b.len()}}),
        Tree::Array(a) => json!({"__array__": {
            "dtype": a.dtype().name(),
            "shape": a.shape(),
            "first": first_values(a, SHOWN_VALUES),
        }}),
        Tree::List(items) => Value::Array(items.iter().map(tree_to_json).collect()),
        Tree::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.to_owned(), tree_to_json(v)))
                .collect(),
        ),
    }
}

/// The first `n` values of an array, read from its little-endian bytes (so
/// alignment does not matter).
fn first_values(array: &Array, n: usize) -> Vec<Value> {
    let size = array.dtype().size();
    let float = |f: f64| {
        if f.is_finite() {
            json!(f)
        } else {
            Value::String(f.to_string())
        }
    };
    array
        .data()
        .chunks_exact(size)
        .take(n)
        .map(|b| match array.dtype() {
            DType::Bool => json!(b[0] != 0),
            DType::I8 => json!(i8::from_le_bytes(le(b))),
            DType::U8 => json!(b[0]),
            DType::I16 => json!(i16::from_le_bytes(le(b))),
            DType::U16 => json!(u16::from_le_bytes(le(b))),
            DType::I32 => json!(i32::from_le_bytes(le(b))),
            DType::U32 => json!(u32::from_le_bytes(le(b))),
            DType::I64 => json!(i64::from_le_bytes(le(b))),
            DType::U64 => json!(u64::from_le_bytes(le(b))),
            DType::F16 => float(f16::from_le_bytes(le(b)).to_f64()),
            DType::BF16 => float(bf16::from_le_bytes(le(b)).to_f64()),
            DType::F32 => float(f32::from_le_bytes(le(b)).into()),
            DType::F64 => float(f64::from_le_bytes(le(b))),
            DType::Complex64 => json!([
                float(f32::from_le_bytes(le(b)).into()),
                float(f32::from_le_bytes(le(&b[4..])).into())
            ]),
            DType::Complex128 => json!([
                float(f64::from_le_bytes(le(b))),
                float(f64::from_le_bytes(le(&b[8..])))
            ]),
            _ => Value::Null,
        })
        .collect()
}

/// The first `N` bytes of `bytes`, which holds at least that many (one
/// element of the dtype being read).
fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_lists_and_scalars_become_trees() {
        let value: Value =
            serde_json::from_str(r#"{"a": 1, "b": [1.5, "x", null, true]}"#).unwrap();
        let tree = tree_from_json(&value).unwrap();
        assert_eq!(tree.get("a").unwrap().as_int().unwrap(), 1);
        assert_eq!(tree.get("b").unwrap().at(1).unwrap().as_str().unwrap(), "x");
        assert_eq!(tree_to_json(&tree), value);
    }

    #[test]
    fn array_specs_build_arrays() {
        let value = json!({"__array__": {"dtype": "f32", "shape": [2, 3], "fill": 1.5}});
        let tree = tree_from_json(&value).unwrap();
        let array = tree.as_array().unwrap();
        assert_eq!(array.shape(), &[2, 3]);
        assert_eq!(array.as_slice::<f32>().unwrap(), &[1.5; 6]);
        let shown = tree_to_json(&tree);
        assert_eq!(shown["__array__"]["dtype"], "float32");
        assert_eq!(shown["__array__"]["first"].as_array().unwrap().len(), 6);

        let value = json!({"__array__": {"dtype": "int64", "shape": [3], "data": [1, -2, 3]}});
        let tree = tree_from_json(&value).unwrap();
        assert_eq!(
            tree.as_array().unwrap().as_slice::<i64>().unwrap(),
            &[1, -2, 3]
        );
        assert_eq!(tree_to_json(&tree)["__array__"]["first"], json!([1, -2, 3]));
    }

    #[test]
    fn bad_array_specs_say_what_is_wrong() {
        let err = tree_from_json(&json!({"__array__": {"shape": [2]}})).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let err =
            tree_from_json(&json!({"__array__": {"dtype": "f32", "shape": [2], "data": [1]}}))
                .unwrap_err();
        assert!(err.to_string().contains("holds 2"), "{err}");
    }
}
