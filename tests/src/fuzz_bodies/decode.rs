//! The `decode` target: arbitrary bytes into the decoder.

use teleport_protocol::{decode_message, encode, DecodeError, Limits};

use super::util::{assert_aligned, decode_chunked, same_message};

/// Small limits, so that the fuzzer reaches every limit with short inputs and a
/// hostile input cannot make the decoder reserve more than a few MiB.
pub(crate) fn small_limits() -> Limits {
    let mut l = Limits::default();
    l.max_header_len = 64 << 10;
    l.max_data_len = 1 << 20;
    l.max_depth = 12;
    l.max_nodes = 2048;
    l.max_rank = 6;
    l.max_name_len = 64;
    l
}

/// Tighter still: the limits themselves are hit often.
fn tiny_limits() -> Limits {
    let mut l = Limits::default();
    l.max_header_len = 200;
    l.max_data_len = 4096;
    l.max_depth = 3;
    l.max_nodes = 24;
    l.max_rank = 3;
    l.max_name_len = 8;
    l
}

/// Chunk sizes from a seed byte: a short cycle of sizes from 1 to 256, or one
/// byte at a time.
fn chunk_sizes(seed: u8) -> Vec<usize> {
    if seed == 0 {
        return vec![usize::MAX];
    }
    if seed == 1 {
        return vec![1];
    }
    let mut x = u32::from(seed).wrapping_mul(0x9e37_79b9) | 1;
    (0..1 + seed % 7)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + (x % 256) as usize
        })
        .collect()
}

/// Input layout: byte 0 picks the chunking, byte 1 the limits (even: small,
/// odd: tiny); the rest is the byte stream. Never panics unless the decoder
/// has a bug:
///
/// - one-shot [`decode_message`] and chunked decoding agree (same message, or
///   same error);
/// - every decoded message has its arrays 64-byte aligned, re-encodes, decodes
///   again to an equal message (floats compared by bits), and re-encoding that
///   gives the same bytes (the encoding is canonical).
pub fn decode(data: &[u8]) {
    let (seed, limits, bytes) = match data {
        [s, l, rest @ ..] => (
            *s,
            if l % 2 == 0 {
                small_limits()
            } else {
                tiny_limits()
            },
            rest,
        ),
        _ => (0, small_limits(), data),
    };
    let whole = decode_message(bytes, &limits);
    let chunked = decode_chunked(bytes, &chunk_sizes(seed), &limits);

    match &whole {
        Ok(m) => {
            assert_eq!(chunked.end, Ok(()), "one-shot decoded, chunked failed");
            assert_eq!(chunked.messages.len(), 1);
            assert!(same_message(m, &chunked.messages[0]));
        }
        Err(DecodeError::TrailingBytes { len }) => {
            // The first message is fine; what follows is another stream.
            let first = &bytes[..bytes.len() - len];
            let m = decode_message(first, &limits).expect("the first message decodes alone");
            assert!(!chunked.messages.is_empty());
            assert!(same_message(&m, &chunked.messages[0]));
        }
        // No bytes: a stream with no message (fine), but not one message.
        Err(DecodeError::Truncated { .. }) if bytes.is_empty() => {
            assert!(chunked.messages.is_empty() && chunked.end.is_ok());
        }
        Err(e) => {
            assert!(
                chunked.messages.is_empty(),
                "one-shot failed, chunked decoded"
            );
            assert_eq!(&chunked.end, &Err(e.clone()), "different errors");
        }
    }

    for m in &chunked.messages {
        assert_aligned(m);
        let encoded = encode(m).expect("a decoded message encodes");
        let again = encoded.to_vec();
        assert_eq!(again.len() as u64, encoded.len());
        let m2 = decode_message(&again, &limits).expect("a re-encoded message decodes");
        assert!(same_message(m, &m2), "{m:?} != {m2:?}");
        assert_aligned(&m2);
        assert_eq!(
            encode(&m2).unwrap().to_vec(),
            again,
            "encoding is not canonical"
        );
    }
}
