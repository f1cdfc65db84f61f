//! Unit tests of stacking, the compatibility check and splitting.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use bytes::Bytes;

use super::*;
use crate::wire::ALIGN;
use crate::{bf16, f16, tree, Array, Complex32, Complex64, DType, Element, PathSegment, Tree};

fn arr<T: Element>(shape: &[usize], values: Vec<T>) -> Tree {
    Tree::Array(Array::from_vec(shape, values).unwrap())
}

fn key_path(segments: &[&str]) -> TreePath {
    segments
        .iter()
        .map(|s| match s.parse::<usize>() {
            Ok(i) => PathSegment::Index(i),
            Err(_) => PathSegment::Key(String::from(*s)),
        })
        .collect()
}

fn set(tree: &mut Tree, keys: &[&str], value: Tree) {
    let mut node = tree;
    for key in keys {
        let Tree::Map(m) = node else {
            panic!("not a map")
        };
        node = m.get_mut(key).unwrap();
    }
    *node = value;
}

fn obs(v: f32, step: i64) -> Tree {
    tree!({
        "obs": {"image": [(arr(&[2], vec![v, v + 1.0])), null], "done": false},
        "step": step,
        "reward": (v as f64),
    })
}

#[test]
fn stacks_arrays_scalars_and_none() {
    let batched = stack(&[obs(1.0, 10), obs(3.0, 11), obs(5.0, 12)]).unwrap();
    let image = batched.get("obs").unwrap().get("image").unwrap();
    let a = image.at(0).unwrap().as_array().unwrap();
    assert_eq!(a.shape(), &[3, 2]);
    assert_eq!(a.as_slice::<f32>().unwrap(), &[1., 2., 3., 4., 5., 6.]);
    assert!(a.is_aligned_to(ALIGN));
    assert!(image.at(1).unwrap().is_none());
    let done = batched.get("obs").unwrap().get("done").unwrap();
    assert_eq!(done.as_array().unwrap().dtype(), DType::Bool);
    assert_eq!(done.as_array().unwrap().to_bools().unwrap(), [false; 3]);
    assert_eq!(
        batched.get("step").unwrap().as_slice::<i64>().unwrap(),
        &[10, 11, 12]
    );
    assert_eq!(
        batched.get("reward").unwrap().as_slice::<f64>().unwrap(),
        &[1., 3., 5.]
    );
    // Key order is kept.
    let keys: Vec<&str> = batched.as_map().unwrap().keys().collect();
    assert_eq!(keys, ["obs", "step", "reward"]);
}

#[test]
fn borrowed_members_stack_too() {
    let (a, b) = (obs(1.0, 1), obs(2.0, 2));
    assert_eq!(stack(&[&a, &b]).unwrap(), stack(&[a, b]).unwrap());
}

#[test]
fn single_member_and_bare_leaves() {
    let one = stack(&[arr(&[3], vec![1u8, 2, 3])]).unwrap();
    assert_eq!(one.as_array().unwrap().shape(), &[1, 3]);
    assert_eq!(stack(&[Tree::None, Tree::None]).unwrap(), Tree::None);
    let ints = stack(&[Tree::Int(-1), Tree::Int(i64::MAX)]).unwrap();
    assert_eq!(ints.as_slice::<i64>().unwrap(), &[-1, i64::MAX]);
    let bools = stack(&[Tree::Bool(true), Tree::Bool(false)]).unwrap();
    assert_eq!(bools.as_array().unwrap().to_bools().unwrap(), [true, false]);
    assert_eq!(stack(&[tree!([]), tree!([])]).unwrap(), tree!([]));
    assert_eq!(stack(&[Tree::map(), Tree::map()]).unwrap(), Tree::map());
}

#[test]
fn rank0_members_stack_to_shape_n() {
    let members: Vec<Tree> = (0..4)
        .map(|i| Tree::Array(Array::scalar(i as u16)))
        .collect();
    let batched = stack(&members).unwrap();
    let a = batched.as_array().unwrap();
    assert_eq!(a.shape(), &[4]);
    assert_eq!(a.as_slice::<u16>().unwrap(), &[0, 1, 2, 3]);
    assert_eq!(split(&batched, 4).unwrap(), members);
}

#[test]
fn empty_arrays_stack_and_split() {
    let e = || Tree::Array(Array::zeros(DType::F32, [0, 3]).unwrap());
    let batched = stack(&[e(), e()]).unwrap();
    assert_eq!(batched.as_array().unwrap().shape(), &[2, 0, 3]);
    assert_eq!(split(&batched, 2).unwrap(), [e(), e()]);

    // Shape [N, 0]: members of shape [0].
    let z = || Tree::Array(Array::zeros(DType::I8, [0]).unwrap());
    let batched = stack(&[z(), z(), z()]).unwrap();
    assert_eq!(batched.as_array().unwrap().shape(), &[3, 0]);
    let parts = split(&batched, 3).unwrap();
    assert_eq!(parts, [z(), z(), z()]);
}

#[test]
fn every_dtype_round_trips() {
    fn check<T: Element>(a: T, b: T) {
        let members = [arr(&[1, 2], vec![a, b]), arr(&[1, 2], vec![b, a])];
        let batched = stack(&members).unwrap();
        let array = batched.as_array().unwrap();
        assert_eq!(array.dtype(), T::DTYPE);
        assert_eq!(array.shape(), &[2, 1, 2]);
        assert_eq!(split(&batched, 2).unwrap(), members);
    }
    check(1i8, -2);
    check(1i16, -2);
    check(1i32, -2);
    check(1i64, -2);
    check(1u8, 2);
    check(1u16, 2);
    check(1u32, 2);
    check(1u64, u64::MAX);
    check(f16::ONE, f16::NEG_INFINITY);
    check(bf16::ONE, bf16::MIN);
    check(1f32, f32::NAN);
    check(1f64, -0.0);
    check(Complex32::new(1.0, -1.0), Complex32::new(0.5, 2.0));
    check(Complex64::new(1.0, -1.0), Complex64::new(0.5, 2.0));
    let bools = [
        Tree::Array(Array::from_bools([2], &[true, false]).unwrap()),
        Tree::Array(Array::from_bools([2], &[false, false]).unwrap()),
    ];
    assert_eq!(split(&stack(&bools).unwrap(), 2).unwrap(), bools);
}

#[test]
fn split_shares_the_batched_buffer() {
    let batched = arr(&[3, 4], (0..12).collect::<Vec<u32>>());
    let base = batched.as_array().unwrap().data().as_ptr() as usize;
    let parts = split(&batched, 3).unwrap();
    for (i, part) in parts.iter().enumerate() {
        let a = part.as_array().unwrap();
        assert_eq!(a.shape(), &[4]);
        assert_eq!(a.data().as_ptr() as usize, base + i * 16);
    }
    assert_eq!(parts[2].as_slice::<u32>().unwrap(), &[8, 9, 10, 11]);
}

#[test]
fn split_keeps_structure_and_zero_parts() {
    let batched = tree!({"a": [(arr(&[2, 1], vec![1i32, 2])), null], "b": {}});
    let parts = split(&batched, 2).unwrap();
    assert_eq!(
        parts[1],
        tree!({"a": [(arr(&[1], vec![2i32])), null], "b": {}})
    );
    // n = 0 checks the tree and returns nothing.
    let empty = tree!({"a": (Array::zeros(DType::F64, [0, 2]).unwrap())});
    assert_eq!(split(&empty, 0).unwrap(), Vec::<Tree>::new());
    assert!(split(&batched, 0).is_err());
    assert_eq!(
        split(&Tree::None, 3).unwrap(),
        [Tree::None, Tree::None, Tree::None]
    );
}

#[test]
fn stack_errors_name_member_path_and_difference() {
    assert_eq!(stack::<Tree>(&[]), Err(StackError::Empty));

    let mut bad = obs(1.0, 1);
    set(
        &mut bad,
        &["obs", "image"],
        tree!([(arr(&[2], vec![1.0f64, 2.0])), null]),
    );
    let err = stack(&[obs(0.0, 0), obs(0.0, 0), bad]).unwrap_err();
    assert_eq!(
        err,
        StackError::DType {
            member: 2,
            reference: 0,
            path: key_path(&["obs", "image", "0"]),
            expected: DType::F32,
            found: DType::F64,
        }
    );
    assert_eq!(
        err.to_string(),
        "batch member 2 differs at `obs.image[0]`: dtype float64, expected float32 (as in member 0)"
    );
    assert_eq!(err.member(), Some(2));
    assert_eq!(err.path().unwrap().to_string(), "obs.image[0]");

    let err = stack(&[arr(&[2], vec![1u8, 2]), arr(&[3], vec![1u8, 2, 3])]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch member 1 differs at the root: shape [3], expected [2] (as in member 0)"
    );

    let err = stack(&[tree!({"x": 1}), tree!({"x": 1.0})]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch member 1 differs at `x`: found float, expected int (as in member 0)"
    );

    let err = stack(&[tree!([1, 2]), tree!([1])]).unwrap_err();
    assert!(matches!(
        err,
        StackError::ListLength {
            expected: 2,
            found: 1,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "batch member 1 differs at the root: list of length 1, expected length 2 (as in member 0)"
    );

    let err = stack(&[tree!({"a": 1, "b": 2}), tree!({"b": 2, "a": 1})]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch member 1 differs at the root: key \"b\" at position 0, expected \"a\" \
         (maps must have the same keys in the same order, as in member 0)"
    );
    let err = stack(&[tree!({"m": {"a": 1, "b": 2}}), tree!({"m": {"a": 1}})]).unwrap_err();
    assert!(
        err.to_string()
            .contains("at `m`: missing key \"b\" (position 1)"),
        "{err}"
    );
    let err = stack(&[tree!({"a": 1}), tree!({"a": 1, "c.d": 2})]).unwrap_err();
    assert!(
        err.to_string()
            .contains("unexpected key \"c.d\" (position 1)"),
        "{err}"
    );
}

#[test]
fn strings_and_bytes_stack_as_lists_and_split_back() {
    let members = [
        tree!({"a": [null, "x"], "name": "first", "raw": (Bytes::from_static(b"r0"))}),
        tree!({"a": [null, "y"], "name": "", "raw": (Bytes::new())}),
        tree!({"a": [null, "z"], "name": "third", "raw": (Bytes::from_static(b"r2"))}),
    ];
    let batched = stack(&members).unwrap();
    assert_eq!(
        batched,
        tree!({
            "a": [null, ["x", "y", "z"]],
            "name": ["first", "", "third"],
            "raw": [
                (Bytes::from_static(b"r0")),
                (Bytes::new()),
                (Bytes::from_static(b"r2"))
            ],
        })
    );
    // Strings and bytes come back as they were.
    assert_eq!(split(&batched, 3).unwrap(), members);
    // Bytes leaves share their buffers through the stack and the split.
    let raw = members[0].get("raw").unwrap().as_bytes().unwrap().as_ptr();
    let back = split(&batched, 3).unwrap();
    assert_eq!(
        back[0].get("raw").unwrap().as_bytes().unwrap().as_ptr(),
        raw
    );
    // A single member, and a string at the root.
    assert_eq!(stack(&[tree!("s")]).unwrap(), tree!(["s"]));
    assert_eq!(split(&tree!(["s"]), 1).unwrap(), [tree!("s")]);
    // A list of strings a member held stacks to a list of columns.
    let lists = [tree!(["a", "b"]), tree!(["c", "d"])];
    let batched = stack(&lists).unwrap();
    assert_eq!(batched, tree!([["a", "c"], ["b", "d"]]));
    assert_eq!(split(&batched, 2).unwrap(), lists);
    // A string where another member has bytes still differs in kind.
    let err = stack(&[tree!("s"), Tree::Bytes(Bytes::new())]).unwrap_err();
    assert!(matches!(err, StackError::Kind { member: 1, .. }), "{err}");
}

#[test]
fn a_column_of_the_wrong_length_does_not_split() {
    let t = tree!({"names": ["a", "b", "c"]});
    let err = split(&t, 2).unwrap_err();
    assert_eq!(
        err,
        SplitError::ColumnLength {
            path: key_path(&["names"]),
            kind: "strings",
            expected: 2,
            found: 3
        }
    );
    assert_eq!(
        err.to_string(),
        "cannot split the list of strings at `names`: it has 3 elements, expected 2 (the \
         batch size): strings and bytes split as a list with one element per row"
    );
    let t = tree!([(Bytes::new())]);
    assert!(matches!(
        split(&t, 2),
        Err(SplitError::ColumnLength { kind: "bytes", .. })
    ));
    // A mixed list is structure, and its strings are leaves that do not split.
    let t = tree!(["a", (Bytes::new())]);
    assert!(matches!(
        split(&t, 2),
        Err(SplitError::NotAnArray { kind: "string", .. })
    ));
}

#[test]
fn stacking_huge_empty_shapes_is_an_error_not_a_panic() {
    let huge = || Tree::Array(Array::new(DType::U8, [usize::MAX, 0], Bytes::new()).unwrap());
    let err = stack(&[huge(), huge()]).unwrap_err();
    assert!(
        matches!(err, StackError::SizeOverflow { count: 2, .. }),
        "{err}"
    );
    assert_eq!(err.member(), None);
}

#[test]
fn split_errors() {
    let t = tree!({"x": [(arr(&[2, 3], vec![0f32; 6])), 5]});
    let err = split(&t, 2).unwrap_err();
    assert_eq!(
        err,
        SplitError::NotAnArray {
            path: key_path(&["x", "1"]),
            kind: "int",
            expected: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "cannot split the int at `x[1]`: every leaf of a batched tree must be an array \
         with leading dimension 2 (the batch size) or None, or a string or bytes in a list \
         with one per row"
    );
    let err = split(&t, 3).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot split the array at `x[0]`: its leading dimension is 2 (shape [2, 3]), \
         expected 3 (the batch size)"
    );
    let err = split(&Tree::Array(Array::scalar(1.0f32)), 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot split the rank-0 float32 array at the root: it has no leading dimension; \
         expected leading dimension 1 (the batch size)"
    );
    for leaf in [
        tree!(true),
        tree!(1.5),
        tree!("s"),
        Tree::Bytes(Bytes::new()),
    ] {
        let err = split(&tree!({"k": (leaf.clone())}), 1).unwrap_err();
        assert!(
            matches!(&err, SplitError::NotAnArray { kind, .. } if *kind == leaf.kind_name()),
            "{err}"
        );
        assert_eq!(err.path().to_string(), "k");
    }
}

#[test]
fn compatible_takes_the_most_common_layout() {
    let good = |v: f32| obs(v, 0);
    let mut wrong_shape = obs(0.0, 0);
    set(&mut wrong_shape, &["reward"], Tree::Int(3));
    let other_keys = tree!({"s": "text"});

    // The malformed request comes first; it must not win.
    let trees = [wrong_shape, good(1.0), other_keys, good(2.0), good(3.0)];
    let out = stack_compatible(&trees);
    assert_eq!(out.members, [1, 3, 4]);
    let stacked = out.stacked.unwrap();
    assert_eq!(
        stacked.get("reward").unwrap().as_slice::<f64>().unwrap(),
        &[1.0, 2.0, 3.0]
    );
    assert_eq!(out.rejected.len(), 2);
    assert_eq!(out.rejected[0].0, 0);
    assert_eq!(
        out.rejected[0].1.to_string(),
        "batch member 0 differs at `reward`: found int, expected float (as in member 1)"
    );
    assert_eq!(out.rejected[1].0, 2);
    assert!(matches!(
        &out.rejected[1].1,
        StackError::MapKeys { member: 2, .. }
    ));
    // Members with strings stack with each other.
    let named = |n: &str| tree!({"x": 1, "name": (n)});
    let out = stack_compatible(&[named("a"), tree!(1), named("b")]);
    assert_eq!(out.members, [0, 2]);
    assert_eq!(
        out.stacked.unwrap().get("name").unwrap(),
        &tree!(["a", "b"])
    );
}

#[test]
fn compatible_ties_go_to_the_earliest_and_edge_cases() {
    let a = || tree!([1]);
    let b = || tree!([1, 2]);
    let out = stack_compatible(&[b(), a(), a(), b()]);
    assert_eq!(out.members, [0, 3]);
    assert_eq!(out.rejected.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);

    let out = stack_compatible::<Tree>(&[]);
    assert_eq!(out.stacked, None);
    assert!(out.members.is_empty() && out.rejected.is_empty());

    // A string and bytes: two layouts, one each; the earliest wins.
    let out = stack_compatible(&[tree!("x"), Tree::Bytes(Bytes::new())]);
    assert_eq!(out.stacked, Some(tree!(["x"])));
    assert_eq!(out.members, [0]);
    assert_eq!(out.rejected.len(), 1);

    // A stack that fails as a whole rejects every member with its error.
    let huge = || Tree::Array(Array::new(DType::U8, [usize::MAX, 0], Bytes::new()).unwrap());
    let out = stack_compatible(&[huge(), huge(), tree!(1)]);
    assert_eq!(out.stacked, None);
    assert!(out.members.is_empty());
    assert_eq!(
        out.rejected.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(matches!(out.rejected[0].1, StackError::SizeOverflow { .. }));
}

#[test]
fn compatible_agrees_with_stack_when_all_match() {
    let trees = [obs(1.0, 1), obs(2.0, 2)];
    let out = stack_compatible(&trees);
    assert_eq!(out.stacked, Some(stack(&trees).unwrap()));
    assert_eq!(out.members, [0, 1]);
    assert!(out.rejected.is_empty());
}
