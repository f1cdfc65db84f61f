//! Hostile and malformed input: every limit (exceeded by one fails with its own
//! error, at the limit succeeds) and every class of malformed message the format
//! describes. The decoder must answer each with a specific [`DecodeError`] and
//! never panic, recurse without bound or reserve memory a message has not paid
//! for with header bytes.

use std::time::Duration;

use bytes::Bytes;
use teleport_protocol::wire::PREAMBLE_LEN;
use teleport_protocol::*;

// ---------------------------------------------------------------- helpers

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

fn string(s: &str) -> Vec<u8> {
    let mut out = varint(s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

fn preamble(kind: u8, header_len: u64, data_len: u64) -> Vec<u8> {
    let mut out = b"TLPT".to_vec();
    out.push(1);
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out
}

/// A whole message: preamble, `header`, the padding, and `data_len` zero bytes.
fn raw(kind: u8, header: &[u8], data_len: u64) -> Vec<u8> {
    let mut out = preamble(kind, header.len() as u64, data_len);
    out.extend_from_slice(header);
    if data_len > 0 {
        while out.len() % 64 != 0 {
            out.push(0);
        }
        out.resize(out.len() + data_len as usize, 0);
    }
    out
}

const CALL: u8 = 2;
const REPLY: u8 = 3;
const PING: u8 = 4;

/// A Call header: request id 1, method "m", no timeout, then `tree`.
fn call_header(tree: &[u8]) -> Vec<u8> {
    let mut h = vec![1];
    h.extend(string("m"));
    h.push(0);
    h.extend_from_slice(tree);
    h
}

fn call(tree: &[u8], data_len: u64) -> Vec<u8> {
    raw(CALL, &call_header(tree), data_len)
}

fn list(n: u64) -> Vec<u8> {
    let mut out = vec![7];
    out.extend(varint(n));
    out
}

fn map(n: u64) -> Vec<u8> {
    let mut out = vec![8];
    out.extend(varint(n));
    out
}

fn bytes_node(offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![5];
    out.extend(varint(offset));
    out.extend(varint(len));
    out
}

fn array_node(dtype: u8, offset: u64, shape: &[u64]) -> Vec<u8> {
    let mut out = vec![6, dtype];
    out.extend(varint(offset));
    out.extend(varint(shape.len() as u64));
    for &d in shape {
        out.extend(varint(d));
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_message(bytes, &Limits::default())
}

fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    // Whole, and byte by byte: the same answer.
    let whole = decode_message(bytes, limits);
    let mut d = Decoder::new(limits.clone());
    let mut got = None;
    for b in bytes {
        let mut input = std::slice::from_ref(b);
        match d.feed(&mut input) {
            Ok(Some(m)) => got = Some(Ok(m)),
            Ok(None) => {}
            Err(e) => {
                got = Some(Err(e));
                break;
            }
        }
    }
    let chunked = match got {
        Some(r) => r,
        None => d.finish().map(|()| unreachable!("a message was expected")),
    };
    match (&whole, &chunked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("whole {whole:?} vs byte by byte {chunked:?}"),
    }
    whole
}

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

fn nested_lists(depth: usize) -> Tree {
    let mut t = Tree::Int(1);
    for _ in 0..depth {
        t = Tree::List(vec![t]);
    }
    t
}

fn enc(m: &Message) -> Vec<u8> {
    encode(m).unwrap().to_vec()
}

fn call_of(args: Tree) -> Message {
    Message::Call(Call {
        request_id: 1,
        method: "m".into(),
        timeout: Some(Duration::from_millis(5)),
        args,
    })
}

// ---------------------------------------------------------------- limits

#[test]
fn header_len_limit() {
    let bytes = enc(&call_of(tree!({"a": [1, 2, "three"]})));
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert!(decode_with(&bytes, &limits(|l| l.max_header_len = header_len)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_header_len = header_len - 1)),
        Err(DecodeError::HeaderTooLarge {
            len: header_len,
            max: header_len - 1
        })
    );
}

#[test]
fn data_len_limit() {
    let a = Array::from_vec([2, 3], vec![1.0f32; 6]).unwrap();
    let bytes = enc(&call_of(tree!([(a), (Bytes::from_static(b"xyz"))])));
    let data_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    assert_eq!(data_len, 64 + 3);
    assert!(decode_with(&bytes, &limits(|l| l.max_data_len = data_len)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_data_len = data_len - 1)),
        Err(DecodeError::DataTooLarge {
            len: data_len,
            max: data_len - 1
        })
    );
}

#[test]
fn depth_limit() {
    for depth in [1, 2, 5, 64] {
        let bytes = enc(&call_of(nested_lists(depth)));
        assert!(decode_with(&bytes, &limits(|l| l.max_depth = depth)).is_ok());
        assert_eq!(
            decode_with(&bytes, &limits(|l| l.max_depth = depth - 1)),
            Err(DecodeError::TooDeep { max: depth - 1 })
        );
    }
    // Maps nest the same way, and an empty container adds no level.
    let bytes = enc(&call_of(tree!({"a": {"b": [{}, []]}})));
    assert!(decode_with(&bytes, &limits(|l| l.max_depth = 3)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_depth = 2)),
        Err(DecodeError::TooDeep { max: 2 })
    );
    // A scalar root needs no depth at all.
    assert!(decode_with(&enc(&call_of(tree!(1))), &limits(|l| l.max_depth = 0)).is_ok());
}

#[test]
fn node_limit() {
    // Map, two keys, two values (one a list of two): 1 + 2 + 1 + 1 + 2 = 7 nodes.
    let bytes = enc(&call_of(tree!({"a": 1, "b": [2, 3]})));
    assert!(decode_with(&bytes, &limits(|l| l.max_nodes = 7)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_nodes = 6)),
        Err(DecodeError::TooManyNodes { max: 6 })
    );
    // A flat list: the declared count is checked before room is reserved.
    let bytes = enc(&call_of(Tree::List(vec![Tree::None; 100])));
    assert!(decode_with(&bytes, &limits(|l| l.max_nodes = 101)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_nodes = 100)),
        Err(DecodeError::TooManyNodes { max: 100 })
    );
    // A scalar root is one node.
    let bytes = enc(&call_of(tree!(1)));
    assert!(decode_with(&bytes, &limits(|l| l.max_nodes = 1)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_nodes = 0)),
        Err(DecodeError::TooManyNodes { max: 0 })
    );
}

#[test]
fn rank_limit() {
    for rank in [1usize, 3, 32] {
        let a = Array::zeros(DType::U8, vec![1; rank]).unwrap();
        let bytes = enc(&call_of(Tree::Array(a)));
        assert!(decode_with(&bytes, &limits(|l| l.max_rank = rank)).is_ok());
        assert_eq!(
            decode_with(&bytes, &limits(|l| l.max_rank = rank - 1)),
            Err(DecodeError::RankTooLarge {
                rank: rank as u64,
                max: rank - 1
            })
        );
    }
    // Rank 0 always fits.
    let bytes = enc(&call_of(Tree::Array(Array::scalar(1.5f64))));
    assert!(decode_with(&bytes, &limits(|l| l.max_rank = 0)).is_ok());
}

#[test]
fn name_len_limit_applies_to_every_name() {
    let name = "n".repeat(40);
    let cases = vec![
        (
            "method",
            Message::Call(Call {
                request_id: 1,
                method: name.clone(),
                timeout: None,
                args: Tree::None,
            }),
        ),
        (
            "agent",
            Message::Hello(Hello {
                agent: name.clone(),
                token: None,
            }),
        ),
        (
            "token",
            Message::Hello(Hello {
                agent: "a".into(),
                token: Some(name.clone()),
            }),
        ),
        (
            "error type name",
            Message::Reply(Reply {
                request_id: 1,
                result: Err(RemoteError::new(ErrorKind::Handler, name.clone(), "")),
            }),
        ),
        (
            "map key",
            call_of(Tree::Map(
                [(name.clone(), Tree::None)].into_iter().collect(),
            )),
        ),
        (
            "nested map key",
            call_of(tree!([
                1,
                (Tree::Map([(name.clone(), 2)].into_iter().collect()))
            ])),
        ),
    ];
    for (what, m) in cases {
        let bytes = enc(&m);
        assert_eq!(
            decode_with(&bytes, &limits(|l| l.max_name_len = 40)).as_ref(),
            Ok(&m),
            "{what}"
        );
        assert_eq!(
            decode_with(&bytes, &limits(|l| l.max_name_len = 39)),
            Err(DecodeError::NameTooLong { len: 40, max: 39 }),
            "{what}"
        );
    }
    // Free text is not a name: goodbye and error messages, strings in the tree.
    let long = "x".repeat(100);
    for m in [
        Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Normal,
            message: long.clone(),
        }),
        call_of(Tree::Str(long.clone())),
        Message::Reply(Reply {
            request_id: 2,
            result: Err(RemoteError::new(ErrorKind::Handler, "E", long.clone())),
        }),
    ] {
        assert!(decode_with(&enc(&m), &limits(|l| l.max_name_len = 1)).is_ok());
    }
}

#[test]
fn limit_errors_are_reported_as_over_limit() {
    assert!(DecodeError::TooDeep { max: 1 }.is_over_limit());
    assert!(DecodeError::NameTooLong { len: 2, max: 1 }.is_over_limit());
    assert!(!DecodeError::BadMagic(*b"HTTP").is_over_limit());
    assert!(!DecodeError::SizeOverflow.is_over_limit());
}

// ---------------------------------------------------------------- preamble

#[test]
fn bad_magic_version_kind_and_flags() {
    let good = enc(&Message::Ping { nonce: 1 });
    let mut b = good.clone();
    b[0..4].copy_from_slice(b"GET ");
    assert_eq!(decode(&b), Err(DecodeError::BadMagic(*b"GET ")));
    // Rejected as soon as the preamble is complete, before any header byte.
    let mut d = Decoder::new(Limits::default());
    assert_eq!(
        d.feed(&mut &b[..PREAMBLE_LEN]),
        Err(DecodeError::BadMagic(*b"GET "))
    );
    assert_eq!(d.feed(&mut &good[..]), Err(DecodeError::Poisoned));
    assert_eq!(d.finish(), Err(DecodeError::Poisoned));

    for v in [0u8, 2, 255] {
        let mut b = good.clone();
        b[4] = v;
        assert_eq!(
            decode(&b),
            Err(DecodeError::UnsupportedVersion {
                found: v,
                supported: 1
            })
        );
    }
    for k in [0u8, 8, 255] {
        let mut b = good.clone();
        b[5] = k;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(k)));
    }
    for f in [1u16, 0x8000] {
        let mut b = good.clone();
        b[6..8].copy_from_slice(&f.to_le_bytes());
        assert_eq!(decode(&b), Err(DecodeError::ReservedFlags(f)));
    }
}

#[test]
fn only_calls_and_replies_carry_data() {
    for kind in [1u8, 4, 5, 6, 7] {
        let b = raw(kind, &[0], 1);
        assert!(
            matches!(decode(&b), Err(DecodeError::UnexpectedData { len: 1, .. })),
            "kind {kind}"
        );
    }
}

// ---------------------------------------------------------------- truncation

fn samples() -> Vec<Message> {
    vec![
        Message::Ping { nonce: 300 },
        Message::Hello(Hello {
            agent: "agent".into(),
            token: Some("tok".into()),
        }),
        call_of(tree!({
            "x": (Array::from_vec([2, 3], vec![1.0f32; 6]).unwrap()),
            "b": (Bytes::from_static(b"hello")),
            "e": (Array::zeros(DType::I64, [0]).unwrap()),
            "s": [1, 2.5, "s", null, true],
        })),
        Message::Reply(Reply {
            request_id: 7,
            result: Err(RemoteError::new(ErrorKind::BadRequest, "T", "m")),
        }),
        Message::Reply(Reply {
            request_id: 8,
            result: Ok(Tree::Array(Array::scalar(7u16))),
        }),
    ]
}

#[test]
fn truncated_at_every_offset() {
    for m in samples() {
        let bytes = enc(&m);
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];
            let needed = if cut < PREAMBLE_LEN {
                (PREAMBLE_LEN - cut) as u64
            } else {
                (bytes.len() - cut) as u64
            };
            assert_eq!(
                decode(prefix),
                Err(DecodeError::Truncated { needed }),
                "{m:?} cut at {cut}"
            );
            // Fed in two pieces, then finished.
            let mut d = Decoder::new(Limits::default());
            let half = cut / 2;
            for mut piece in [&prefix[..half], &prefix[half..]] {
                assert_eq!(d.feed(&mut piece), Ok(None));
                assert!(piece.is_empty());
            }
            let at_boundary = cut == 0;
            assert_eq!(d.is_at_boundary(), at_boundary);
            if at_boundary {
                assert_eq!(d.finish(), Ok(()));
            } else {
                assert_eq!(d.finish(), Err(DecodeError::Truncated { needed }));
            }
        }
        assert_eq!(decode(&bytes).as_ref(), Ok(&m));
    }
}

/// Regression: `decode_message` of no bytes at all reached an `unreachable!`.
#[test]
fn empty_input_is_truncated_not_a_panic() {
    assert_eq!(
        decode(&[]),
        Err(DecodeError::Truncated {
            needed: PREAMBLE_LEN as u64
        })
    );
}

#[test]
fn header_cut_short_inside_a_value() {
    // A header whose declared length ends in the middle of the tree.
    let full = call_header(&[list(2), vec![2, 2], vec![4, 3], b"abc".to_vec()].concat());
    let cut = &full[..full.len() - 1];
    assert!(matches!(
        decode(&raw(CALL, cut, 0)),
        Err(DecodeError::MalformedHeader { what: "string", .. })
    ));
    // A list promising more children than there are.
    assert!(matches!(
        decode(&call(&[list(3), vec![0, 0]].concat(), 0)),
        Err(DecodeError::MalformedHeader { .. })
    ));
}

// ---------------------------------------------------------------- sizes

#[test]
fn lengths_that_overflow_64_bits() {
    let big = Limits::unlimited();
    // 24 + header_len, rounded up to 64, overflows.
    for header_len in [u64::MAX, u64::MAX - 23, u64::MAX - 40] {
        let p = preamble(CALL, header_len, 1);
        assert_eq!(
            decode_with(&p, &big),
            Err(DecodeError::SizeOverflow),
            "{header_len}"
        );
    }
    // Regression: the bytes still needed overflowed in finish().
    let p = preamble(CALL, 8, u64::MAX);
    let mut d = Decoder::new(big.clone());
    assert_eq!(d.feed(&mut &p[..]), Ok(None));
    assert_eq!(d.finish(), Err(DecodeError::Truncated { needed: u64::MAX }));

    // Array dimensions whose product overflows, or whose product times the
    // item size does.
    for (dtype, shape) in [
        (5u8, vec![1u64 << 32, 1 << 32]),
        (12, vec![1 << 62]),
        (14, vec![3, 1 << 62]),
        (0, vec![u64::MAX, 2, 0]),
    ] {
        assert_eq!(
            decode_with(&call(&array_node(dtype, 0, &shape), 64), &big),
            Err(DecodeError::SizeOverflow),
            "{shape:?}"
        );
    }
    // A region whose end overflows.
    let tree = [list(2), bytes_node(0, 1), bytes_node(64, u64::MAX)].concat();
    assert_eq!(
        decode_with(&call(&tree, 100), &big),
        Err(DecodeError::SizeOverflow)
    );
    // The next region's aligned start overflows.
    let tree = [list(2), bytes_node(0, u64::MAX - 10), bytes_node(0, 0)].concat();
    let mut msg = [
        preamble(CALL, call_header(&tree).len() as u64, u64::MAX),
        call_header(&tree),
    ]
    .concat();
    msg.resize(64, 0); // the padding: the header is parsed once it is complete
    assert_eq!(decode_with(&msg, &big), Err(DecodeError::SizeOverflow));
    // A varint longer than a u64.
    let tree = [vec![2], vec![0xff; 11]].concat();
    assert!(matches!(
        decode(&call(&tree, 0)),
        Err(DecodeError::MalformedHeader { what: "int", .. })
    ));
}

#[test]
fn huge_declared_sizes_fail_before_allocating() {
    // At the preamble, by the default limits.
    assert_eq!(
        decode(&preamble(CALL, 10, 1 << 60)),
        Err(DecodeError::DataTooLarge {
            len: 1 << 60,
            max: Limits::default().max_data_len
        })
    );
    assert_eq!(
        decode(&preamble(PING, 1 << 60, 0)),
        Err(DecodeError::HeaderTooLarge {
            len: 1 << 60,
            max: Limits::default().max_header_len
        })
    );
    // Without limits, a valid header declaring 2^60 bytes of data: reserving
    // that much fails, and is reported instead of aborting the process.
    let tree = bytes_node(0, 1 << 60);
    let header = call_header(&tree);
    let mut msg = preamble(CALL, header.len() as u64, 1 << 60);
    msg.extend_from_slice(&header);
    msg.resize(64, 0);
    let mut d = Decoder::new(Limits::unlimited());
    assert_eq!(d.feed(&mut &msg[..]), Err(DecodeError::TooLargeForPlatform));
    // Without limits, a header declaring 2^60 bytes is buffered only as it
    // arrives.
    let mut d = Decoder::new(Limits::unlimited());
    let mut msg = preamble(CALL, 1 << 60, 0);
    msg.extend_from_slice(&[0; 100]);
    assert_eq!(d.feed(&mut &msg[..]), Ok(None));
    assert_eq!(
        d.finish(),
        Err(DecodeError::Truncated {
            needed: (1 << 60) - 100
        })
    );
    // Containers and ranks declaring 2^60 entries.
    for tree in [list(1 << 60), map(1 << 60)] {
        assert_eq!(
            decode(&call(&tree, 0)),
            Err(DecodeError::TooManyNodes {
                max: Limits::default().max_nodes
            })
        );
        assert!(matches!(
            decode_with(&call(&tree, 0), &Limits::unlimited()),
            Err(DecodeError::MalformedHeader { .. })
        ));
    }
    let tree = array_node(5, 0, &[]);
    let mut tree = tree[..tree.len() - 1].to_vec();
    tree.extend(varint(1 << 60));
    assert_eq!(
        decode(&call(&tree, 0)),
        Err(DecodeError::RankTooLarge {
            rank: 1 << 60,
            max: 32
        })
    );
    assert!(matches!(
        decode_with(&call(&tree, 0), &Limits::unlimited()),
        Err(DecodeError::MalformedHeader { .. })
    ));
}

/// Regression: each nested container could reserve room for as many children
/// as the header has bytes, so 64 nested lists each declaring ~N children
/// reserved 64·N entries from a header of N bytes. Children declared by open
/// containers now count together.
#[test]
fn nested_containers_cannot_promise_more_than_the_header_holds() {
    let n = 10_000u64;
    let mut tree = Vec::new();
    for _ in 0..3 {
        tree.extend(list(n));
    }
    tree.resize(tree.len() + n as usize, 0); // room for ~n children
    let err = decode(&call(&tree, 0)).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::MalformedHeader {
                what: "container declares more children than the header has bytes",
                ..
            }
        ),
        "{err:?}"
    );
    // The same against the node limit: the second list's children would
    // exceed it together with the first's.
    let mut tree = [list(600), list(600)].concat();
    tree.resize(tree.len() + 2000, 0);
    assert_eq!(
        decode_with(&call(&tree, 0), &limits(|l| l.max_nodes = 1000)),
        Err(DecodeError::TooManyNodes { max: 1000 })
    );
    // Maps count two nodes (key and value) per entry.
    let mut tree = [map(300), string("k"), map(300)].concat();
    tree.resize(tree.len() + 2000, 0);
    assert_eq!(
        decode_with(&call(&tree, 0), &limits(|l| l.max_nodes = 1000)),
        Err(DecodeError::TooManyNodes { max: 1000 })
    );
    // Exactly what fits is fine: [[0, 0], 0, 0]
    let tree = [list(3), list(2), vec![0, 0, 0, 0]].concat();
    assert_eq!(
        decode(&call(&tree, 0)).unwrap(),
        call_of_plain(tree!([[null, null], null, null]))
    );
}

fn call_of_plain(args: Tree) -> Message {
    Message::Call(Call {
        request_id: 1,
        method: "m".into(),
        timeout: None,
        args,
    })
}

// ---------------------------------------------------------------- regions

#[test]
fn regions_out_of_bounds_overlapping_or_misaligned() {
    let two = |first: Vec<u8>, second: Vec<u8>| [list(2), first, second].concat();
    // Past the end of the data section.
    assert_eq!(
        decode(&call(&bytes_node(0, 100), 64)),
        Err(DecodeError::DataLengthMismatch {
            declared: 64,
            expected: 100
        })
    );
    // The first region must start at 0.
    assert_eq!(
        decode(&call(&bytes_node(8, 8), 16)),
        Err(DecodeError::MisplacedRegion {
            expected: 0,
            found: 8
        })
    );
    // Overlapping, unaligned and gapped second regions.
    for found in [0u64, 10, 32, 63, 65, 128] {
        assert_eq!(
            decode(&call(&two(bytes_node(0, 10), bytes_node(found, 4)), 200)),
            Err(DecodeError::MisplacedRegion {
                expected: 64,
                found
            }),
            "{found}"
        );
    }
    // An empty region still has its place.
    assert_eq!(
        decode(&call(&two(bytes_node(0, 10), bytes_node(10, 0)), 64)),
        Err(DecodeError::MisplacedRegion {
            expected: 64,
            found: 10
        })
    );
    assert!(decode(&call(&two(bytes_node(0, 10), bytes_node(64, 0)), 64)).is_ok());
    // A data section longer than the regions, or with none at all.
    assert_eq!(
        decode(&call(&bytes_node(0, 10), 11)),
        Err(DecodeError::DataLengthMismatch {
            declared: 11,
            expected: 10
        })
    );
    assert_eq!(
        decode(&call(&[2, 2], 64)),
        Err(DecodeError::DataLengthMismatch {
            declared: 64,
            expected: 0
        })
    );
}

#[test]
fn shape_times_itemsize_must_equal_the_region() {
    let arr = array_node(11, 0, &[2, 3]); // float32 [2, 3]: 24 bytes
    assert!(decode(&call(&arr, 24)).is_ok());
    assert_eq!(
        decode(&call(&arr, 20)),
        Err(DecodeError::DataLengthMismatch {
            declared: 20,
            expected: 24
        })
    );
    assert_eq!(
        decode(&call(&arr, 30)),
        Err(DecodeError::DataLengthMismatch {
            declared: 30,
            expected: 24
        })
    );
    // complex128 rank 0: 16 bytes.
    assert!(decode(&call(&array_node(14, 0, &[]), 16)).is_ok());
    assert_eq!(
        decode(&call(&array_node(14, 0, &[]), 8)),
        Err(DecodeError::DataLengthMismatch {
            declared: 8,
            expected: 16
        })
    );
}

#[test]
fn padding_must_be_zero() {
    let m = call_of(tree!([
        (Bytes::from_static(b"ab")),
        (Bytes::from_static(b"cd"))
    ]));
    let bytes = enc(&m);
    assert_eq!(decode(&bytes), Ok(m));
    let data_start = bytes.len() - 66;
    // After the header, and between regions: each a one-byte covert channel
    // and a second encoding of the same message, so each is rejected.
    for (at, expected) in [
        (data_start - 1, data_start - 1),
        (data_start + 2, data_start + 2),
    ] {
        let mut bad = bytes.clone();
        bad[at] = 0xee;
        assert_eq!(
            decode_with(&bad, &Limits::default()),
            Err(DecodeError::NonZeroPadding {
                offset: expected as u64,
                byte: 0xee
            }),
            "{at}"
        );
    }
    // The padding before an empty region at the end of the data section.
    let m = call_of(tree!([(Bytes::from_static(b"ab")), (Bytes::new())]));
    let mut bytes = enc(&m);
    assert_eq!(decode(&bytes), Ok(m));
    let last = bytes.len() - 1;
    bytes[last] = 1;
    assert_eq!(
        decode_with(&bytes, &Limits::default()),
        Err(DecodeError::NonZeroPadding {
            offset: last as u64,
            byte: 1
        })
    );
}

#[test]
fn bool_array_elements_must_be_0_or_1() {
    let m = call_of(Tree::Array(
        Array::from_bools([4], &[true, false, false, true]).unwrap(),
    ));
    let bytes = enc(&m);
    assert_eq!(decode(&bytes), Ok(m));
    let data_start = bytes.len() - 4;
    for byte in [2u8, 0x80, 0xff] {
        let mut bad = bytes.clone();
        bad[data_start + 2] = byte;
        assert_eq!(
            decode_with(&bad, &Limits::default()),
            Err(DecodeError::BadBoolElement {
                offset: (data_start + 2) as u64,
                byte
            })
        );
    }
    // Other one-byte dtypes take any byte.
    let mut bytes = enc(&call_of(Tree::Array(Array::from_vec1(vec![0u8, 0, 0, 0]))));
    let last = bytes.len() - 1;
    bytes[last] = 0xff;
    assert!(decode(&bytes).is_ok());
}

#[test]
fn an_error_reply_carries_no_tree_and_no_data() {
    // Reply 4, error kind 0, type "T", message "m".
    let mut h = vec![4, 1, 0];
    h.extend(string("T"));
    h.extend(string("m"));
    assert!(decode(&raw(REPLY, &h, 0)).is_ok());
    // A tree after the error.
    let with_tree = [h.clone(), vec![0]].concat();
    assert_eq!(
        decode_with(&raw(REPLY, &with_tree, 0), &Limits::default()),
        Err(DecodeError::ErrorReplyWithData {
            header_bytes: 1,
            data_len: 0
        })
    );
    // A data section (with or without a tree declaring it).
    assert_eq!(
        decode_with(&raw(REPLY, &h, 64), &Limits::default()),
        Err(DecodeError::ErrorReplyWithData {
            header_bytes: 0,
            data_len: 64
        })
    );
    let with_bytes = [h, bytes_node(0, 2)].concat();
    assert_eq!(
        decode_with(&raw(REPLY, &with_bytes, 2), &Limits::default()),
        Err(DecodeError::ErrorReplyWithData {
            header_bytes: 3,
            data_len: 2
        })
    );
}

// ---------------------------------------------------------------- depth bomb

#[test]
fn depth_bomb_fails_fast_without_recursion() {
    // A million nested one-element lists.
    let mut tree = Vec::new();
    for _ in 0..1_000_000 {
        tree.extend(list(1));
    }
    tree.push(0);
    let msg = call(&tree, 0);
    let start = std::time::Instant::now();
    assert_eq!(decode(&msg), Err(DecodeError::TooDeep { max: 64 }));
    // The same bomb with no depth limit and its end cut off: the explicit stack
    // grows to a million frames and is dropped without recursion.
    let cut = raw(CALL, &call_header(&tree[..tree.len() - 1]), 0);
    assert!(matches!(
        decode_with(&cut, &limits(|l| l.max_depth = usize::MAX)),
        Err(DecodeError::MalformedHeader { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------- header values

#[test]
fn malformed_header_values() {
    let malformed = |tree: &[u8]| match decode(&call(tree, 0)) {
        Err(DecodeError::MalformedHeader { what, .. }) => what,
        other => panic!("{tree:02x?}: {other:?}"),
    };
    // Header offsets: the call's fields take 4 bytes (see `call_header`).
    assert_eq!(
        decode(&call(&[1, 2], 0)),
        Err(DecodeError::BadBool { offset: 5, byte: 2 })
    );
    assert_eq!(malformed(&[9]), "unknown node tag");
    assert_eq!(malformed(&[0xff, 0xff, 0xff, 0xff, 0x7f]), "node tag");
    assert_eq!(malformed(&[4, 2, 0xc3, 0x28]), "string");
    assert_eq!(malformed(&[3, 0, 0]), "float");
    assert_eq!(malformed(&[8, 1, 1, 0xff, 0]), "map key");
    assert_eq!(
        decode(&call(&array_node(15, 0, &[]), 0)),
        Err(DecodeError::UnknownDType(15))
    );
    assert_eq!(
        decode(&call(
            &[map(2), string("k"), vec![0], string("k"), vec![0]].concat(),
            0
        )),
        Err(DecodeError::DuplicateKey("k".into()))
    );
    // Bytes after the last field, in the header and after the message.
    assert_eq!(
        decode(&raw(PING, &[1, 0], 0)),
        Err(DecodeError::TrailingHeaderBytes { len: 1 })
    );
    assert_eq!(
        decode(&call(&[0, 0, 0], 0)),
        Err(DecodeError::TrailingHeaderBytes { len: 2 })
    );
    let mut bytes = enc(&Message::Ping { nonce: 1 });
    bytes.extend_from_slice(b"garbage");
    assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes { len: 7 }));
    // A decoder fed the same stream yields the message and leaves the rest.
    let mut d = Decoder::new(Limits::default());
    let mut input = &bytes[..];
    assert_eq!(d.feed(&mut input), Ok(Some(Message::Ping { nonce: 1 })));
    assert_eq!(input, b"garbage");
    assert_eq!(d.feed(&mut input), Ok(None));
    assert_eq!(d.finish(), Err(DecodeError::Truncated { needed: 17 }));
}

#[test]
fn unknown_error_kinds_and_goodbye_reasons_are_accepted() {
    let mut h = vec![5]; // request id
    h.push(1); // some error
    h.push(200); // error kind 200
    h.extend(string("T"));
    h.extend(string("m"));
    let m = decode(&raw(3, &h, 0)).unwrap();
    let Message::Reply(Reply { result: Err(e), .. }) = m else {
        panic!("{m:?}")
    };
    assert_eq!(e.kind, ErrorKind::from_code(200));
    let mut h = vec![99];
    h.extend(string("bye"));
    assert_eq!(
        decode(&raw(7, &h, 0)),
        Ok(Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Unknown(99),
            message: "bye".into()
        }))
    );
}

// ---------------------------------------------------------------- strict encodings

#[test]
fn non_canonical_varints_are_rejected() {
    // Ping nonce 1 as `81 00`, and 0 as `80 00`, `80 80 00`.
    for (nonce, what) in [
        (vec![0x81, 0x00], "ping nonce"),
        (vec![0x80, 0x00], "ping nonce"),
    ] {
        assert_eq!(
            decode_with(&raw(PING, &nonce, 0), &Limits::default()),
            Err(DecodeError::NonCanonicalVarint { offset: 0, what })
        );
    }
    assert_eq!(
        decode(&raw(PING, &[0x80, 0x80, 0x00], 0)),
        Err(DecodeError::NonCanonicalVarint {
            offset: 0,
            what: "ping nonce"
        })
    );
    // The shortest forms, up to the longest: 0, 127, 128, u64::MAX.
    for v in [0u64, 127, 128, 300, u64::MAX] {
        assert_eq!(
            decode(&raw(PING, &varint(v), 0)),
            Ok(Message::Ping { nonce: v })
        );
    }
    // A ten-byte u64 whose last byte is 0: non-canonical, not an overflow.
    let mut long = vec![0xff; 9];
    long.push(0);
    assert!(matches!(
        decode(&raw(PING, &long, 0)),
        Err(DecodeError::NonCanonicalVarint { .. })
    ));
    // Every varint field: node tag (u32), list length, int (zigzag), region
    // offset, array rank and dimension, string length, request id.
    let at = |tree: &[u8]| match decode(&call(tree, 0)) {
        Err(DecodeError::NonCanonicalVarint { offset, what }) => (offset, what),
        other => panic!("{tree:02x?}: {other:?}"),
    };
    assert_eq!(at(&[0x80, 0x00]), (4, "node tag"));
    assert_eq!(at(&[7, 0x81, 0x00, 0]), (5, "list length"));
    assert_eq!(at(&[2, 0x82, 0x00]), (5, "int"));
    assert_eq!(at(&[4, 0x80, 0x00]), (5, "string"));
    assert_eq!(at(&[6, 5, 0x80, 0x00, 0]), (6, "array offset"));
    assert_eq!(at(&[6, 5, 0, 0x81, 0x00, 1]), (7, "array rank"));
    assert_eq!(at(&[6, 5, 0, 1, 0x80, 0x00]), (8, "array dimension"));
    let mut h = vec![0x81, 0x00];
    h.extend(string("m"));
    h.extend([0, 0]);
    assert_eq!(
        decode(&raw(CALL, &h, 0)),
        Err(DecodeError::NonCanonicalVarint {
            offset: 0,
            what: "call request id"
        })
    );
}

#[test]
fn option_tags_other_than_00_and_01_are_rejected() {
    // Call timeout: header `01 01 6d`, then the option at offset 3.
    for byte in [2u8, 0x80, 0xff] {
        let mut h = vec![1];
        h.extend(string("m"));
        h.extend([byte, 0, 0]);
        assert_eq!(
            decode_with(&raw(CALL, &h, 0), &Limits::default()),
            Err(DecodeError::BadOption {
                offset: 3,
                byte,
                what: "call timeout"
            })
        );
    }
    // Hello token.
    let h = [string("agent"), vec![2]].concat();
    assert_eq!(
        decode(&raw(1, &h, 0)),
        Err(DecodeError::BadOption {
            offset: 6,
            byte: 2,
            what: "hello token"
        })
    );
    // Reply error.
    assert_eq!(
        decode(&raw(REPLY, &[9, 2, 0], 0)),
        Err(DecodeError::BadOption {
            offset: 1,
            byte: 2,
            what: "reply error"
        })
    );
}

// ---------------------------------------------------------------- counting

/// `max_depth`: the root is at depth 0, the children of a container one deeper
/// than it; map keys sit at their value's depth. Every node's depth must be
/// `<= max_depth`. `max_nodes`: every node counts, the root and every map key
/// included; the count must be `<= max_nodes`. At the limit passes, one over
/// fails.
#[test]
fn depth_and_node_limits_count_as_documented() {
    // {"k": [1]}: map (depth 0), key + list (depth 1), int (depth 2); 4 nodes.
    let bytes = enc(&call_of(tree!({"k": [1]})));
    let ok = limits(|l| {
        l.max_depth = 2;
        l.max_nodes = 4
    });
    assert!(decode_with(&bytes, &ok).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_depth = 1)),
        Err(DecodeError::TooDeep { max: 1 })
    );
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_nodes = 3)),
        Err(DecodeError::TooManyNodes { max: 3 })
    );
    // An empty map at the root: one node, depth 0.
    let bytes = enc(&call_of(tree!({})));
    assert!(decode_with(
        &bytes,
        &limits(|l| {
            l.max_depth = 0;
            l.max_nodes = 1
        })
    )
    .is_ok());
    // {"a": 1, "b": 2}: 5 nodes, depth 1.
    let bytes = enc(&call_of(tree!({"a": 1, "b": 2})));
    assert!(decode_with(&bytes, &limits(|l| l.max_nodes = 5)).is_ok());
    assert_eq!(
        decode_with(&bytes, &limits(|l| l.max_nodes = 4)),
        Err(DecodeError::TooManyNodes { max: 4 })
    );
}

// ---------------------------------------------------------------- error order

/// When several errors apply, the one reported is fixed (section 7 of
/// `docs/wire-format.md`): stages in byte order (preamble, header, padding,
/// data), each checked once all its bytes are in; within the preamble magic,
/// version, kind, flags, header limit, data limit, data on a kind without data;
/// within the header, fields in order, each value before its limit.
#[test]
fn error_order_is_fixed() {
    let d = |b: &[u8]| decode_with(b, &Limits::default());
    let huge = 1u64 << 60;
    let with = |magic: &[u8; 4], version: u8, kind: u8, flags: u16, h: u64, dl: u64| {
        let mut p = magic.to_vec();
        p.push(version);
        p.push(kind);
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&h.to_le_bytes());
        p.extend_from_slice(&dl.to_le_bytes());
        p
    };
    // Each preamble check wins over every later one.
    assert_eq!(
        d(&with(b"XLPT", 9, 99, 1, huge, huge)),
        Err(DecodeError::BadMagic(*b"XLPT"))
    );
    assert_eq!(
        d(&with(b"TLPT", 9, 99, 1, huge, huge)),
        Err(DecodeError::UnsupportedVersion {
            found: 9,
            supported: 1
        })
    );
    assert_eq!(
        d(&with(b"TLPT", 1, 99, 1, huge, huge)),
        Err(DecodeError::UnknownKind(99))
    );
    assert_eq!(
        d(&with(b"TLPT", 1, PING, 1, huge, huge)),
        Err(DecodeError::ReservedFlags(1))
    );
    assert_eq!(
        d(&with(b"TLPT", 1, PING, 0, huge, huge)),
        Err(DecodeError::HeaderTooLarge {
            len: huge,
            max: Limits::default().max_header_len
        })
    );
    assert_eq!(
        d(&with(b"TLPT", 1, PING, 0, 1, huge)),
        Err(DecodeError::DataTooLarge {
            len: huge,
            max: Limits::default().max_data_len
        })
    );
    assert_eq!(
        d(&with(b"TLPT", 1, PING, 0, 1, 1)),
        Err(DecodeError::UnexpectedData {
            kind: Kind::Ping,
            len: 1
        })
    );
    // A complete preamble's error wins over truncation: nothing follows it.
    let p = with(b"TLPT", 1, CALL, 0, huge, 0);
    assert!(matches!(d(&p), Err(DecodeError::HeaderTooLarge { .. })));
    // An incomplete stage is truncated, whatever its bytes so far: a header
    // that is already malformed (tag 9) but not complete.
    let full = call(&[list(2), vec![9], vec![0]].concat(), 0);
    assert!(matches!(
        d(&full),
        Err(DecodeError::MalformedHeader {
            what: "unknown node tag",
            ..
        })
    ));
    assert_eq!(
        d(&full[..full.len() - 1]),
        Err(DecodeError::Truncated { needed: 1 })
    );
    // Within the header: the first bad field wins, and a value is checked
    // before its limit (a non-canonical method length beats the name limit).
    let mut h = vec![0x80, 0x00];
    h.extend([0x81, 0x00, b'm']);
    assert_eq!(
        decode_with(&raw(CALL, &h, 0), &limits(|l| l.max_name_len = 0)),
        Err(DecodeError::NonCanonicalVarint {
            offset: 0,
            what: "call request id"
        })
    );
    // A container: depth, then the node limit, then the bytes left.
    let tree = [list(1), list(1 << 40)].concat();
    assert_eq!(
        decode_with(
            &call(&tree, 0),
            &limits(|l| {
                l.max_depth = 1;
                l.max_nodes = 3
            })
        ),
        Err(DecodeError::TooDeep { max: 1 })
    );
    assert_eq!(
        decode_with(&call(&tree, 0), &limits(|l| l.max_nodes = 3)),
        Err(DecodeError::TooManyNodes { max: 3 })
    );
    // An array: dtype, then the rank limit, then the bytes left.
    let arr = [vec![6, 15, 0], varint(1 << 40)].concat();
    assert_eq!(d(&call(&arr, 0)), Err(DecodeError::UnknownDType(15)));
    let arr = [vec![6, 5, 0], varint(1 << 40)].concat();
    assert!(matches!(
        d(&call(&arr, 0)),
        Err(DecodeError::RankTooLarge { .. })
    ));
    // After the fields: trailing header bytes, then the data length.
    assert_eq!(
        d(&call(&[0, 0], 64)),
        Err(DecodeError::TrailingHeaderBytes { len: 1 })
    );
    // Header before padding before data.
    let m = call_of(Tree::Array(Array::from_bools([2], &[true, false]).unwrap()));
    let good = enc(&m);
    let data_start = good.len() - 2;
    let mut bad = good.clone();
    bad[data_start - 1] = 7; // header padding
    bad[data_start] = 2; // a bool element
    assert!(matches!(d(&bad), Err(DecodeError::NonZeroPadding { .. })));
    bad[data_start - 1] = 0;
    assert!(matches!(d(&bad), Err(DecodeError::BadBoolElement { .. })));
    bad[PREAMBLE_LEN] = 0x80; // request id `80 01`: the method's length is then 0x6d
    assert_eq!(
        d(&bad),
        Err(DecodeError::MalformedHeader {
            offset: 2,
            what: "call method"
        })
    );
    // A bad message followed by more bytes: its own error, not TrailingBytes.
    let mut bad = good.clone();
    bad[data_start] = 2;
    bad.extend_from_slice(b"more");
    assert!(matches!(
        decode(&bad),
        Err(DecodeError::BadBoolElement { .. })
    ));
}
