//! `from_tree(to_tree(x)) == x` for arbitrary values of a few test types, and
//! array leaves keep their bytes.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use teleport_protocol::{from_tree, to_tree, Array, Tree};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Action {
    Stop,
    Move(i32),
    Turn { angle: f64, speed: Option<u16> },
    Say(String, bool),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Record {
    id: u64,
    name: String,
    score: f32,
    tags: Vec<String>,
    raw: Vec<u8>,
    maybe: Option<i64>,
    actions: Vec<Action>,
    counts: BTreeMap<String, u32>,
    pair: (i8, char),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WithArrays {
    obs: Array,
    extra: Vec<Array>,
    record: Option<Record>,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Stop),
        any::<i32>().prop_map(Action::Move),
        (-1e9f64..1e9, any::<Option<u16>>())
            .prop_map(|(angle, speed)| Action::Turn { angle, speed }),
        (".{0,8}", any::<bool>()).prop_map(|(s, b)| Action::Say(s, b)),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        0..=i64::MAX as u64,
        ".{0,12}",
        -1e6f32..1e6,
        prop::collection::vec(".{0,4}", 0..4),
        prop::collection::vec(any::<u8>(), 0..16),
        any::<Option<i64>>(),
        prop::collection::vec(action(), 0..5),
        prop::collection::btree_map(".{0,6}", any::<u32>(), 0..4),
        (any::<i8>(), any::<char>()),
    )
        .prop_map(
            |(id, name, score, tags, raw, maybe, actions, counts, pair)| Record {
                id,
                name,
                score,
                tags,
                raw,
                maybe,
                actions,
                counts,
                pair,
            },
        )
}

fn array() -> impl Strategy<Value = Array> {
    prop_oneof![
        prop::collection::vec(any::<f32>().prop_filter("not NaN", |x| !x.is_nan()), 0..12)
            .prop_map(Array::from_vec1),
        prop::collection::vec(any::<i64>(), 0..6).prop_map(|v| {
            let n = v.len();
            Array::from_vec([1, n], v).unwrap()
        }),
        any::<u8>().prop_map(Array::scalar),
    ]
}

proptest! {
    #[test]
    fn records_round_trip(r in record()) {
        let tree = to_tree(&r).unwrap();
        prop_assert_eq!(from_tree::<Record>(tree.clone()).unwrap(), r.clone());
        // A tree in a struct field comes back the same too.
        prop_assert_eq!(from_tree::<Tree>(to_tree(&tree).unwrap()).unwrap(), tree);
    }

    #[test]
    fn arrays_round_trip_without_copies(obs in array(), extra in prop::collection::vec(array(), 0..3), record in prop::option::of(record())) {
        let value = WithArrays { obs, extra, record };
        let tree = to_tree(&value).unwrap();
        let leaves: Vec<*const u8> = tree.arrays().map(|a| a.data().as_ptr()).collect();
        let mut originals = vec![value.obs.data().as_ptr()];
        originals.extend(value.extra.iter().map(|a| a.data().as_ptr()));
        prop_assert_eq!(&leaves, &originals);
        let back: WithArrays = from_tree(tree).unwrap();
        prop_assert_eq!(back.obs.data().as_ptr(), originals[0]);
        prop_assert_eq!(back, value);
    }
}
