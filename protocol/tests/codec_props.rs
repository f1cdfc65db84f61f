//! Property tests of the codec: random messages of every kind, with random trees
//! (every dtype, empty, rank-0 and larger arrays, nested maps and lists, every
//! scalar leaf including NaN and empty strings and bytes), survive `encode` and
//! the incremental `Decoder` fed in random chunkings. The result is the same for
//! every chunking, and every decoded non-empty array and bytes leaf starts on a
//! 64-byte boundary.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use teleport_protocol::*;

/// Equality that compares floats by their bits, so NaN equals itself.
fn same_tree(a: &Tree, b: &Tree) -> bool {
    match (a, b) {
        (Tree::Float(x), Tree::Float(y)) => x.to_bits() == y.to_bits(),
        (Tree::List(x), Tree::List(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_tree(x, y))
        }
        (Tree::Map(x), Tree::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((kx, vx), (ky, vy))| kx == ky && same_tree(vx, vy))
        }
        _ => a == b,
    }
}

fn same_message(a: &Message, b: &Message) -> bool {
    match (a, b) {
        (Message::Call(x), Message::Call(y)) => {
            x.request_id == y.request_id
                && x.method == y.method
                && x.timeout == y.timeout
                && same_tree(&x.args, &y.args)
        }
        (Message::Reply(x), Message::Reply(y)) => {
            x.request_id == y.request_id
                && match (&x.result, &y.result) {
                    (Ok(x), Ok(y)) => same_tree(x, y),
                    (Err(x), Err(y)) => x == y,
                    _ => false,
                }
        }
        _ => a == b,
    }
}

/// Every non-empty array and bytes leaf of `t` starts on a 64-byte boundary.
fn check_aligned(t: &Tree) -> Result<(), TestCaseError> {
    let mut stack = vec![t];
    while let Some(node) = stack.pop() {
        match node {
            Tree::Array(a) if !a.is_empty() => {
                prop_assert!(a.is_aligned_to(64), "array {a:?} not 64-aligned");
            }
            Tree::Bytes(b) if !b.is_empty() => {
                prop_assert_eq!(b.as_ptr() as usize % 64, 0, "bytes leaf not 64-aligned");
            }
            Tree::List(l) => stack.extend(l),
            Tree::Map(m) => stack.extend(m.values()),
            _ => {}
        }
    }
    Ok(())
}

fn message_tree(m: &Message) -> Option<&Tree> {
    match m {
        Message::Call(c) => Some(&c.args),
        Message::Reply(Reply { result: Ok(t), .. }) => Some(t),
        _ => None,
    }
}

/// Deterministic filler bytes, so a large array costs proptest no shrinking effort.
fn fill(len: usize, seed: u64, dtype: DType) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if dtype == DType::Bool {
                (x & 1) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        // Rank 0 to 4, small dimensions, zero included.
        4 => prop::collection::vec(0usize..5, 0..5),
        // Large-ish.
        1 => prop_oneof![Just(vec![1000usize]), Just(vec![33, 65]), Just(vec![2, 3, 4, 5])],
        // Empty, with a dimension that would overflow times the item size.
        1 => (any::<usize>(), any::<bool>())
            .prop_map(|(d, first)| if first { vec![0, d] } else { vec![d, 0] }),
    ]
}

fn array() -> impl Strategy<Value = Array> {
    (dtype(), shape(), any::<u64>()).prop_filter_map(
        "shape too large for its dtype",
        |(dtype, shape, seed)| {
            let n: usize = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))?
                .checked_mul(dtype.size())?;
            Array::new(dtype, shape, fill(n, seed, dtype)).ok()
        },
    )
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(-f64::NAN),
        Just(f64::from_bits(0x7ff0_0000_0000_0001)), // a signalling NaN
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::MIN_POSITIVE / 2.0),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), ".{0,12}", "[a-z]{1,4}"]
}

fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        Just(Tree::None),
        any::<bool>().prop_map(Tree::Bool),
        prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX)].prop_map(Tree::Int),
        float().prop_map(Tree::Float),
        text().prop_map(Tree::Str),
        prop::collection::vec(any::<u8>(), 0..100).prop_map(|b| Tree::Bytes(Bytes::from(b))),
        array().prop_map(Tree::Array),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Tree::List),
            prop::collection::vec((text(), inner), 0..6).prop_map(|entries| {
                let mut m = Map::new();
                for (k, v) in entries {
                    m.insert(k, v);
                }
                Tree::Map(m)
            }),
        ]
    })
}

fn remote_error() -> impl Strategy<Value = RemoteError> {
    (any::<u8>(), text(), text())
        .prop_map(|(k, t, m)| RemoteError::new(ErrorKind::from_code(k), t, m))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (text(), prop::option::of(text()))
            .prop_map(|(agent, token)| Message::Hello(Hello { agent, token })),
        (
            any::<u64>(),
            text(),
            prop::option::of(prop_oneof![any::<u64>(), Just(0u64), Just(u64::MAX)]),
            tree()
        )
            .prop_map(|(request_id, method, t, args)| {
                Message::Call(Call {
                    request_id,
                    method,
                    timeout: t.map(Duration::from_micros),
                    args,
                })
            }),
        (
            any::<u64>(),
            prop_oneof![
                3 => tree().prop_map(Ok),
                1 => remote_error().prop_map(Err),
            ]
        )
            .prop_map(|(request_id, result)| Message::Reply(Reply { request_id, result })),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        any::<u64>().prop_map(|request_id| Message::Cancel { request_id }),
        (any::<u8>(), text()).prop_map(|(r, message)| Message::Goodbye(Goodbye {
            reason: GoodbyeReason::from_code(r),
            message,
        })),
    ]
}

/// Feeds `bytes` to a fresh decoder in chunks of the given sizes (cycled), and
/// returns every message it yields.
fn decode_chunked(bytes: &[u8], sizes: &[usize]) -> Result<Vec<Message>, DecodeError> {
    let mut d = Decoder::new(Limits::default());
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        let (mut chunk, tail) = rest.split_at(n);
        rest = tail;
        while !chunk.is_empty() {
            if let Some(m) = d.feed(&mut chunk)? {
                out.push(m);
            }
        }
    }
    d.finish()?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn every_chunking_decodes_the_same_aligned_message(
        m in message(),
        sizes in prop::collection::vec(1usize..200, 1..8),
    ) {
        let encoded = encode(&m).unwrap();
        let bytes = encoded.to_vec();
        prop_assert_eq!(bytes.len() as u64, encoded.len());

        let whole = decode_message(&bytes, &Limits::default()).unwrap();
        prop_assert!(same_message(&whole, &m), "{whole:?} != {m:?}");
        if let Some(t) = message_tree(&whole) {
            check_aligned(t)?;
        }

        for sizes in [sizes.as_slice(), &[1], &[bytes.len()], &[63, 64, 65]] {
            let got = decode_chunked(&bytes, sizes).unwrap();
            prop_assert_eq!(got.len(), 1);
            prop_assert!(same_message(&got[0], &m), "chunks {sizes:?}: {:?} != {m:?}", got[0]);
            if let Some(t) = message_tree(&got[0]) {
                check_aligned(t)?;
            }
        }
    }

    #[test]
    fn a_stream_of_messages_decodes_in_order_whatever_the_chunking(
        ms in prop::collection::vec(message(), 1..4),
        sizes in prop::collection::vec(1usize..300, 1..6),
    ) {
        let mut stream = Vec::new();
        for m in &ms {
            stream.extend_from_slice(&encode(m).unwrap().to_vec());
        }
        let got = decode_chunked(&stream, &sizes).unwrap();
        prop_assert_eq!(got.len(), ms.len());
        for (g, m) in got.iter().zip(&ms) {
            prop_assert!(same_message(g, m), "{g:?} != {m:?}");
            if let Some(t) = message_tree(g) {
                check_aligned(t)?;
            }
        }
    }
}

/// The shortest varint of `v`.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A Ping whose header is `nonce`, as given.
fn ping_with(nonce: &[u8]) -> Vec<u8> {
    let mut out = b"TLPT".to_vec();
    out.extend_from_slice(&[1, 4, 0, 0]);
    out.extend_from_slice(&(nonce.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(nonce);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A message has one encoding: any single-byte change to an encoded
    /// message is either rejected or decodes to a message that encodes to
    /// exactly the changed bytes (never a second encoding of some message).
    #[test]
    fn a_message_has_exactly_one_encoding(
        m in message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = encode(&m).unwrap().to_vec();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        if let Ok(other) = decode_message(&bytes, &Limits::default()) {
            prop_assert_eq!(encode(&other).unwrap().to_vec(), bytes, "{:?}", other);
        }
    }

    /// Every value decodes from its shortest varint, and no longer form of it
    /// (a last byte of zero) is accepted.
    #[test]
    fn only_shortest_varints_decode(v in any::<u64>(), shift in 0u32..64, extra in 1usize..4) {
        let v = v >> shift;
        let short = varint(v);
        prop_assert_eq!(
            decode_message(&ping_with(&short), &Limits::default()),
            Ok(Message::Ping { nonce: v })
        );
        let mut long = short.clone();
        // A u64 varint has at most 10 bytes; longer is an overflow, not this.
        let extra = extra.min(10 - long.len());
        prop_assume!(extra > 0);
        *long.last_mut().unwrap() |= 0x80;
        long.extend(std::iter::repeat_n(0x80, extra - 1));
        long.push(0);
        prop_assert_eq!(
            decode_message(&ping_with(&long), &Limits::default()),
            Err(DecodeError::NonCanonicalVarint { offset: 0, what: "ping nonce" })
        );
    }
}

/// The regression behind the dimension-order fix: an empty float64 array whose
/// other dimension times the item size overflows 64 bits. `Array::new` accepts it
/// (product of dimensions first, then the item size), so the decoder must too.
#[test]
fn empty_array_with_a_huge_dimension_round_trips() {
    for shape in [
        vec![1usize << 62, 0],
        vec![0, usize::MAX],
        vec![usize::MAX, 0],
    ] {
        let a = Array::new(DType::F64, shape.clone(), Bytes::new()).unwrap();
        let m = Message::Reply(Reply {
            request_id: 1,
            result: Ok(tree!([(a)])),
        });
        let bytes = encode(&m).unwrap().to_vec();
        assert_eq!(
            decode_message(&bytes, &Limits::default()).unwrap(),
            m,
            "{shape:?}"
        );
    }
}
