//! Comparisons and checks shared by the bodies.

use teleport_protocol::{DecodeError, Decoder, Limits, Message, Reply, Tree};

/// Equality that compares floats by their bits, so a NaN equals itself.
pub(crate) fn same_tree(a: &Tree, b: &Tree) -> bool {
    // Iterative: the decoder bounds depth, but a comparison should not recurse
    // on untrusted depth either.
    let mut stack = vec![(a, b)];
    while let Some((a, b)) = stack.pop() {
        match (a, b) {
            (Tree::Float(x), Tree::Float(y)) => {
                if x.to_bits() != y.to_bits() {
                    return false;
                }
            }
            (Tree::List(x), Tree::List(y)) => {
                if x.len() != y.len() {
                    return false;
                }
                stack.extend(x.iter().zip(y));
            }
            (Tree::Map(x), Tree::Map(y)) => {
                if x.len() != y.len() {
                    return false;
                }
                for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
                    if kx != ky {
                        return false;
                    }
                    stack.push((vx, vy));
                }
            }
            (Tree::List(_) | Tree::Map(_) | Tree::Float(_), _) => return false,
            _ => {
                if a != b {
                    return false;
                }
            }
        }
    }
    true
}

/// [`same_tree`] for whole messages.
pub(crate) fn same_message(a: &Message, b: &Message) -> bool {
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

/// The tree a message carries, if any.
pub(crate) fn message_tree(m: &Message) -> Option<&Tree> {
    match m {
        Message::Call(c) => Some(&c.args),
        Message::Reply(Reply { result: Ok(t), .. }) => Some(t),
        _ => None,
    }
}

/// Panics unless every non-empty array and bytes leaf of `m` starts on a
/// 64-byte boundary.
pub(crate) fn assert_aligned(m: &Message) {
    let Some(t) = message_tree(m) else { return };
    let mut stack = vec![t];
    while let Some(node) = stack.pop() {
        match node {
            Tree::Array(a) => assert!(a.is_empty() || a.is_aligned_to(64), "{a:?} not aligned"),
            Tree::Bytes(b) => assert!(
                b.is_empty() || b.as_ptr() as usize % 64 == 0,
                "bytes leaf not aligned"
            ),
            Tree::List(l) => stack.extend(l),
            Tree::Map(m) => stack.extend(m.values()),
            _ => {}
        }
    }
}

/// What a decoder made of a stream: the messages, then how it ended (the first
/// error, or `finish()`'s verdict).
pub(crate) struct Decoded {
    pub(crate) messages: Vec<Message>,
    pub(crate) end: Result<(), DecodeError>,
}

/// Feeds `bytes` to a fresh decoder in chunks whose sizes come from `sizes`
/// (cycled; each at least 1) and stops at the first error.
pub(crate) fn decode_chunked(bytes: &[u8], sizes: &[usize], limits: &Limits) -> Decoded {
    let mut d = Decoder::new(limits.clone());
    let mut messages = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(1);
        let n = n.clamp(1, rest.len());
        i += 1;
        let (mut chunk, tail) = rest.split_at(n);
        rest = tail;
        while !chunk.is_empty() {
            let before = chunk.len();
            match d.feed(&mut chunk) {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => assert!(chunk.is_empty(), "feed returned None with input left"),
                Err(e) => {
                    // A failed decoder stays failed.
                    assert_eq!(d.feed(&mut &b"x"[..]), Err(DecodeError::Poisoned));
                    return Decoded {
                        messages,
                        end: Err(e),
                    };
                }
            }
            assert!(chunk.len() < before, "feed made no progress");
        }
    }
    let end = d.finish();
    Decoded { messages, end }
}
