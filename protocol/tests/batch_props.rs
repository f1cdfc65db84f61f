//! Property tests of `batch::stack`, `batch::split` and `batch::stack_compatible`.

use bytes::Bytes;
use proptest::prelude::*;
use teleport_protocol::batch::{split, stack, stack_compatible};
use teleport_protocol::{Array, DType, Map, Tree};

/// A tree's structure without values, from which trees of one layout are drawn.
#[derive(Clone, Debug)]
enum Skel {
    None,
    Bool,
    Int,
    Float,
    Str,
    Bytes,
    Array(DType, Vec<usize>),
    List(Vec<Skel>),
    Map(Vec<(String, Skel)>),
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// Structures; with `strings`, leaves may also be strings and bytes (which
/// stack as a list, one per row).
fn skel(strings: bool) -> impl Strategy<Value = Skel> {
    let mut leaves = vec![
        Just(Skel::None).boxed(),
        Just(Skel::Bool).boxed(),
        Just(Skel::Int).boxed(),
        Just(Skel::Float).boxed(),
        (dtype(), prop::collection::vec(0usize..4, 0..4))
            .prop_map(|(d, s)| Skel::Array(d, s))
            .boxed(),
    ];
    if strings {
        leaves.push(Just(Skel::Str).boxed());
        leaves.push(Just(Skel::Bytes).boxed());
    }
    nest(leaves)
}

/// Structures whose leaves come back from a stack and a split exactly as they
/// were: strings, bytes, arrays and `None` (no scalars, which come back as
/// rank-0 arrays).
fn exact_skel() -> impl Strategy<Value = Skel> {
    nest(vec![
        Just(Skel::Str).boxed(),
        Just(Skel::Bytes).boxed(),
        Just(Skel::None).boxed(),
        (dtype(), prop::collection::vec(0usize..3, 0..3))
            .prop_map(|(d, s)| Skel::Array(d, s))
            .boxed(),
    ])
}

/// Lists and maps of `leaves`, a few levels deep.
fn nest(leaves: Vec<BoxedStrategy<Skel>>) -> impl Strategy<Value = Skel> {
    prop::strategy::Union::new(leaves).prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Skel::List),
            prop::collection::vec(("[a-c.]{0,2}", inner), 0..4).prop_map(|entries| {
                // Map keys are unique: keep the first of each.
                let mut seen = Vec::new();
                Skel::Map(
                    entries
                        .into_iter()
                        .filter(|(k, _)| {
                            let new = !seen.contains(k);
                            seen.push(k.clone());
                            new
                        })
                        .collect(),
                )
            }),
        ]
    })
}

/// Trees with structure `skel` and arbitrary values.
fn tree(skel: &Skel) -> BoxedStrategy<Tree> {
    match skel {
        Skel::None => Just(Tree::None).boxed(),
        Skel::Bool => any::<bool>().prop_map(Tree::Bool).boxed(),
        Skel::Int => any::<i64>().prop_map(Tree::Int).boxed(),
        Skel::Float => any::<f64>().prop_map(Tree::Float).boxed(),
        Skel::Str => ".{0,3}".prop_map(Tree::Str).boxed(),
        Skel::Bytes => prop::collection::vec(any::<u8>(), 0..4)
            .prop_map(|b| Tree::Bytes(Bytes::from(b)))
            .boxed(),
        Skel::Array(dtype, shape) => {
            let (dtype, shape) = (*dtype, shape.clone());
            let len = shape.iter().product::<usize>() * dtype.size();
            prop::collection::vec(any::<u8>(), len)
                .prop_map(move |mut data| {
                    if dtype == DType::Bool {
                        data.iter_mut().for_each(|b| *b &= 1);
                    }
                    Tree::Array(Array::new(dtype, shape.clone(), data).unwrap())
                })
                .boxed()
        }
        Skel::List(items) => items
            .iter()
            .map(tree)
            .collect::<Vec<_>>()
            .prop_map(Tree::List)
            .boxed(),
        Skel::Map(entries) => {
            let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
            entries
                .iter()
                .map(|(_, s)| tree(s))
                .collect::<Vec<_>>()
                .prop_map(move |values| {
                    Tree::Map(keys.iter().cloned().zip(values).collect::<Map>())
                })
                .boxed()
        }
    }
}

/// What a member looks like after a stack and a split: scalars become rank-0
/// arrays of int64, float64 or bool.
fn as_split(tree: &Tree) -> Tree {
    match tree {
        Tree::Bool(b) => Tree::Array(Array::from_bools([], &[*b]).unwrap()),
        Tree::Int(i) => Tree::Array(Array::scalar(*i)),
        Tree::Float(f) => Tree::Array(Array::scalar(*f)),
        Tree::List(l) => Tree::List(l.iter().map(as_split).collect()),
        Tree::Map(m) => Tree::Map(m.iter().map(|(k, v)| (k, as_split(v))).collect()),
        other => other.clone(),
    }
}

/// One structure (strings and bytes included) and 1 to 5 trees of it.
fn batch() -> impl Strategy<Value = Vec<Tree>> {
    skel(true).prop_flat_map(|s| prop::collection::vec(tree(&s), 1..6))
}

/// 0 to 6 trees of one or two structures, strings and bytes allowed.
fn mixed_batch() -> impl Strategy<Value = Vec<Tree>> {
    (skel(true), skel(true)).prop_flat_map(|(a, b)| {
        let one = prop_oneof![3 => tree(&a), 1 => tree(&b)];
        prop::collection::vec(one, 0..7)
    })
}

proptest! {
    #[test]
    fn split_inverts_stack(trees in batch()) {
        let n = trees.len();
        let stacked = stack(&trees).unwrap();
        for array in stacked.arrays() {
            prop_assert_eq!(array.shape().first(), Some(&n));
        }
        let parts = split(&stacked, n).unwrap();
        let expected: Vec<Tree> = trees.iter().map(as_split).collect();
        prop_assert_eq!(parts, expected);

        let out = stack_compatible(&trees);
        prop_assert_eq!(out.stacked, Some(stacked));
        prop_assert_eq!(out.members, (0..n).collect::<Vec<_>>());
        prop_assert!(out.rejected.is_empty());
    }

    /// Strings and bytes stack as a list at their path, one element per row,
    /// and split back: `split(stack(trees)) == trees`, and `stack(split(s)) ==
    /// s` for a stacked `s`.
    #[test]
    fn stack_then_split_is_the_identity_with_strings_and_bytes(
        trees in exact_skel().prop_flat_map(|s| prop::collection::vec(tree(&s), 1..6))
    ) {
        let n = trees.len();
        let stacked = stack(&trees).unwrap();
        let parts = split(&stacked, n).unwrap();
        prop_assert_eq!(&parts, &trees);
        prop_assert_eq!(stack(&parts).unwrap(), stacked);
    }

    #[test]
    fn never_panics_and_compatible_keeps_its_promises(trees in mixed_batch(), n in 0usize..5) {
        let stacked = stack(&trees);
        if let Ok(s) = &stacked {
            prop_assert_eq!(split(s, trees.len()).unwrap().len(), trees.len());
        }
        for t in &trees {
            let _ = split(t, n);
        }

        let out = stack_compatible(&trees);
        // Every input is either a member or rejected, once, in ascending order.
        let mut seen: Vec<usize> = out.members.clone();
        seen.extend(out.rejected.iter().map(|(i, _)| *i));
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..trees.len()).collect::<Vec<_>>());
        prop_assert!(out.members.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(out.rejected.windows(2).all(|w| w[0].0 < w[1].0));
        prop_assert_eq!(out.stacked.is_some(), !out.members.is_empty());
        for (i, err) in &out.rejected {
            prop_assert_eq!(err.member(), Some(*i), "{}", err);
        }

        if let Some(s) = &out.stacked {
            let members: Vec<&Tree> = out.members.iter().map(|&i| &trees[i]).collect();
            // Members all share one layout, and stacking them alone agrees.
            prop_assert!(members.iter().all(|t| t.layout() == members[0].layout()));
            prop_assert_eq!(s, &stack(&members).unwrap());
            let parts = split(s, members.len()).unwrap();
            let expected: Vec<Tree> = members.iter().map(|t| as_split(t)).collect();
            prop_assert_eq!(parts, expected);
            // The reference layout is the most common stackable one.
            for (i, _) in &out.rejected {
                let same = trees.iter().filter(|t| t.layout() == trees[*i].layout()).count();
                prop_assert!(same <= members.len() || stack(&[&trees[*i]]).is_err());
            }
        }
        // With one structure throughout, `stack` and `stack_compatible` agree.
        if stacked.is_ok() && !trees.is_empty() {
            prop_assert!(out.rejected.is_empty());
        }
    }
}
