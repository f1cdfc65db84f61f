use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use ::serde::{Deserialize, Serialize};
use bytes::Bytes;

use super::*;
use crate::{tree, Array, DType, Tree};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Inner {
    x: i32,
    y: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Shape {
    Unit,
    Newtype(u8),
    Tuple(i64, String),
    Struct { w: u32, h: u32 },
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Outer {
    name: String,
    weights: Vec<f32>,
    inner: Inner,
    shapes: Vec<Shape>,
    raw: Vec<u8>,
    pair: (bool, char),
    none: Option<i8>,
    unit: (),
}

fn outer() -> Outer {
    Outer {
        name: "n".into(),
        weights: vec![0.5, 1.5],
        inner: Inner {
            x: -3,
            y: Some(2.5),
        },
        shapes: vec![
            Shape::Unit,
            Shape::Newtype(7),
            Shape::Tuple(1, "t".into()),
            Shape::Struct { w: 2, h: 3 },
        ],
        raw: vec![1, 2, 3],
        pair: (true, 'c'),
        none: None,
        unit: (),
    }
}

#[test]
fn structs_enums_options_and_bytes_map_as_documented() {
    let t = to_tree(&outer()).unwrap();
    let expected = tree!({
        "name": "n",
        "weights": [0.5, 1.5],
        "inner": {"x": -3, "y": 2.5},
        "shapes": ["Unit", {"Newtype": 7}, {"Tuple": [1, "t"]}, {"Struct": {"w": 2, "h": 3}}],
        "raw": (Bytes::from_static(&[1, 2, 3])),
        "pair": [true, "c"],
        "none": null,
        "unit": null,
    });
    assert_eq!(t, expected);
    // Field order is kept.
    let keys: Vec<&str> = t.as_map().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["name", "weights", "inner", "shapes", "raw", "pair", "none", "unit"]
    );
    assert_eq!(from_tree::<Outer>(t).unwrap(), outer());
}

#[test]
fn an_array_field_keeps_its_allocation_both_ways() {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Batch {
        images: Array,
        labels: Vec<String>,
        nested: Vec<Option<Array>>,
    }
    let images = Array::from_vec([2, 3], vec![1.0f32; 6]).unwrap();
    let ptr = images.data().as_ptr();
    let batch = Batch {
        images,
        labels: vec!["a".into()],
        nested: vec![None, Some(Array::scalar(3i64))],
    };
    let t = to_tree(&batch).unwrap();
    let leaf = t.get("images").unwrap().as_array().unwrap();
    assert_eq!(leaf.data().as_ptr(), ptr);
    assert_eq!(leaf.shape(), &[2, 3]);
    assert_eq!(
        t.get("nested").unwrap().at(1).unwrap().as_array().unwrap(),
        &Array::scalar(3i64)
    );
    let back: Batch = from_tree(t).unwrap();
    assert_eq!(back.images.data().as_ptr(), ptr);
    assert_eq!(back, batch);
}

#[test]
fn a_bare_array_and_a_tree_field_pass_through() {
    let a = Array::from_vec1(vec![1u16, 2, 3]);
    let t = to_tree(&a).unwrap();
    assert_eq!(t, Tree::Array(a.clone()));
    let back: Array = from_tree(t).unwrap();
    assert_eq!(back.data().as_ptr(), a.data().as_ptr());

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct WithTree {
        id: u32,
        extra: Tree,
    }
    let extra = tree!({"a": (a.clone()), "b": (Bytes::from_static(b"xy")), "c": [1, null]});
    let w = WithTree { id: 1, extra };
    let t = to_tree(&w).unwrap();
    assert_eq!(
        t.get("extra")
            .unwrap()
            .get("a")
            .unwrap()
            .as_array()
            .unwrap()
            .data()
            .as_ptr(),
        a.data().as_ptr()
    );
    assert_eq!(from_tree::<WithTree>(t).unwrap(), w);
}

#[test]
fn maps_with_non_string_keys_and_untagged_and_flatten() {
    let mut m = BTreeMap::new();
    m.insert(3u32, "three".to_string());
    m.insert(10, "ten".into());
    let t = to_tree(&m).unwrap();
    assert_eq!(t, tree!({"3": "three", "10": "ten"}));
    assert_eq!(from_tree::<BTreeMap<u32, String>>(t).unwrap(), m);

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(untagged)]
    enum Either {
        Num(i64),
        Text(String),
        Pair { a: f64, b: Vec<i32> },
    }
    for v in [
        Either::Num(3),
        Either::Text("x".into()),
        Either::Pair { a: 1.0, b: vec![2] },
    ] {
        let t = to_tree(&v).unwrap();
        assert_eq!(from_tree::<Either>(t).unwrap(), v);
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Flat {
        id: u8,
        #[serde(flatten)]
        inner: Inner,
    }
    let f = Flat {
        id: 1,
        inner: Inner { x: 2, y: None },
    };
    let t = to_tree(&f).unwrap();
    assert_eq!(t, tree!({"id": 1, "x": 2, "y": null}));
    assert_eq!(from_tree::<Flat>(t).unwrap(), f);

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "type")]
    enum Tagged {
        A { x: i32 },
        B,
    }
    let t = to_tree(&Tagged::A { x: 1 }).unwrap();
    assert_eq!(t, tree!({"type": "A", "x": 1}));
    assert_eq!(from_tree::<Tagged>(t).unwrap(), Tagged::A { x: 1 });
    assert_eq!(
        from_tree::<Tagged>(tree!({"type": "B"})).unwrap(),
        Tagged::B
    );
}

#[test]
fn an_array_inside_untagged_is_copied_but_arrives() {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(untagged)]
    enum Input {
        Array { data: Array },
        Number(f64),
    }
    let a = Array::from_vec([2], vec![1.0f64, 2.0]).unwrap();
    let t = to_tree(&Input::Array { data: a.clone() }).unwrap();
    assert_eq!(t.get("data").unwrap().as_array().unwrap(), &a);
    assert_eq!(from_tree::<Input>(t).unwrap(), Input::Array { data: a });
}

#[test]
fn errors_name_the_path_and_the_problem() {
    // Wrong kind, deep inside.
    let mut t = to_tree(&outer()).unwrap();
    if let Tree::Map(m) = &mut t {
        let w = m.get_mut("weights").unwrap();
        *w = tree!([1.0, 2.0, 3.0, "x"]);
    }
    let err = from_tree::<Outer>(t).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at `weights[3]`: invalid type: string \"x\", expected f32"
    );
    assert!(matches!(err.kind(), SerdeErrorKind::WrongKind { .. }));

    // Missing field.
    let err = from_tree::<Outer>(tree!({"name": "n"})).unwrap_err();
    assert_eq!(err.to_string(), "at the root: missing field `weights`");
    let err = from_tree::<Vec<Inner>>(tree!([{"x": 1, "y": null}, {"y": 1.0}])).unwrap_err();
    assert_eq!(err.to_string(), "at `[1]`: missing field `x`");
    assert_eq!(err.kind(), &SerdeErrorKind::MissingField("x"));

    // Integer out of range, both ways.
    let err = from_tree::<Inner>(tree!({"x": 3_000_000_000i64, "y": null})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at `x`: integer 3000000000 is out of range for i32"
    );
    let err = to_tree(&[0u64, u64::MAX]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at `[1]`: integer 18446744073709551615 is out of range for a tree's int (i64)"
    );
    assert_eq!(
        from_tree::<u8>(Tree::Int(-1))
            .unwrap_err()
            .path()
            .to_string(),
        "<root>"
    );

    // Enums.
    let err = from_tree::<Shape>(tree!({"Newtype": 300})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at `Newtype`: integer 300 is out of range for u8"
    );
    let err = from_tree::<Shape>(tree!("Nope")).unwrap_err();
    assert!(
        matches!(err.kind(), SerdeErrorKind::UnknownVariant { .. }),
        "{err}"
    );
    let err = from_tree::<Shape>(tree!([1])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at the root: invalid type: list, expected an enum: a string, or a map with one key"
    );

    // Keys that are no strings.
    let mut m = BTreeMap::new();
    m.insert(vec![1u8], 1);
    let err = to_tree(&m).unwrap_err();
    assert_eq!(
        err.to_string(),
        "at the root: a map key must be a string, found list"
    );

    // Too long a list for a tuple.
    let err = from_tree::<(i32, i32)>(tree!([1, 2, 3])).unwrap_err();
    assert!(
        matches!(err.kind(), SerdeErrorKind::InvalidLength { len: 3, .. }),
        "{err}"
    );
}

#[test]
fn bytes_and_integers_in_detail() {
    // A sequence of u8s is bytes; of other ints, or empty, a list.
    assert_eq!(
        to_tree(&[1u8, 2]).unwrap(),
        Tree::Bytes(Bytes::from_static(&[1, 2]))
    );
    assert_eq!(to_tree(&Vec::<u8>::new()).unwrap(), Tree::List(vec![]));
    assert_eq!(to_tree(&[1u16, 2]).unwrap(), tree!([1, 2]));
    assert_eq!(to_tree(&[Some(1u8)]).unwrap(), tree!([1]));
    assert_eq!(from_tree::<[u8; 2]>(tree!([1, 2])).unwrap(), [1, 2]);
    assert_eq!(
        from_tree::<Vec<u8>>(Tree::Bytes(Bytes::from_static(b"ab"))).unwrap(),
        b"ab"
    );
    // An int reads as a float.
    assert_eq!(from_tree::<f32>(Tree::Int(2)).unwrap(), 2.0);
    assert_eq!(to_tree(&(i64::MAX as u64)).unwrap(), Tree::Int(i64::MAX));
    assert_eq!(to_tree(&-5i128).unwrap(), Tree::Int(-5));
}

#[test]
fn other_formats_see_the_portable_array_form() {
    let a = Array::from_vec([2], vec![1.5f32, -2.0]).unwrap();
    let bytes = postcard::to_allocvec(&a).unwrap();
    let back: Array = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, a);
    assert!(back.is_aligned_to(4));

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct WithArray {
        a: Array,
        t: Tree,
    }
    let w = WithArray {
        a: Array::from_bools([3], &[true, false, true]).unwrap(),
        t: tree!({"k": [1, "s", null]}),
    };
    let bytes = postcard::to_allocvec(&w.a).unwrap();
    assert_eq!(postcard::from_bytes::<Array>(&bytes).unwrap(), w.a);
    // The portable form read through a tree is an array again.
    let portable =
        tree!({"dtype": "int16", "shape": [2], "data": (Bytes::from_static(&[1, 0, 2, 0]))});
    let arr: Array = from_tree(portable).unwrap();
    assert_eq!(arr.dtype(), DType::I16);
    assert_eq!(arr.to_vec::<i16>().unwrap(), vec![1, 2]);
    let err = from_tree::<Array>(tree!({"dtype": "int16", "shape": [3], "data": (Bytes::new())}))
        .unwrap_err();
    assert!(err.to_string().contains("needs 6 bytes"), "{err}");
}

#[test]
fn the_side_table_is_empty_after_each_call() {
    // A failing call leaves nothing behind for the next one.
    #[derive(Serialize)]
    struct Bad {
        a: Array,
        n: u64,
    }
    let bad = Bad {
        a: Array::scalar(1u8),
        n: u64::MAX,
    };
    assert!(to_tree(&bad).is_err());
    // Serializing an array outside `to_tree` gives the portable form.
    let bytes = postcard::to_allocvec(&bad.a).unwrap();
    assert_eq!(postcard::from_bytes::<Array>(&bytes).unwrap(), bad.a);
}
