//! The `roundtrip` target: structured messages through encode and decode.

use std::time::Duration;

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use teleport_protocol::{
    decode_message, encode, Array, Call, DType, ErrorKind, Goodbye, GoodbyeReason, Hello, Limits,
    Map, Message, RemoteError, Reply, Tree,
};

use super::util::{assert_aligned, decode_chunked, same_message};

/// Bytes of array and bytes-leaf data one input may make, in total.
const DATA_BUDGET: usize = 256 << 10;

struct Builder<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    data_left: usize,
    nodes_left: usize,
}

impl Builder<'_, '_> {
    fn text(&mut self) -> Result<String> {
        Ok(match self.u.int_in_range(0..=3u8)? {
            0 => String::new(),
            1 => "k".repeat(self.u.int_in_range(1..=3)?),
            _ => {
                let s: &str = self.u.arbitrary()?;
                s.chars().take(40).collect()
            }
        })
    }

    /// `len` bytes: taken from the input while it lasts, then a pattern.
    fn data(&mut self, len: usize, dtype: Option<DType>) -> Result<Bytes> {
        let take = len.min(self.u.len());
        let mut v = self.u.bytes(take)?.to_vec();
        v.extend((v.len()..len).map(|i| (i * 31 + 7) as u8));
        if dtype == Some(DType::Bool) {
            for b in &mut v {
                *b &= 1;
            }
        }
        Ok(Bytes::from(v))
    }

    fn shape(&mut self) -> Result<Vec<usize>> {
        Ok(match self.u.int_in_range(0..=9u8)? {
            // Empty, with a dimension that overflows times the item size.
            0 => {
                let d: usize = self.u.arbitrary()?;
                if self.u.arbitrary()? {
                    vec![0, d]
                } else {
                    vec![d, 0]
                }
            }
            // Large-ish.
            1 => vec![self.u.int_in_range(64..=4096)?],
            // Rank 0 to 5, small dimensions.
            _ => {
                let rank = self.u.int_in_range(0..=5)?;
                (0..rank)
                    .map(|_| self.u.int_in_range(0..=4))
                    .collect::<Result<_>>()?
            }
        })
    }

    fn array(&mut self) -> Result<Tree> {
        let dtype = DType::ALL[self.u.choose_index(DType::ALL.len())?];
        let shape = self.shape()?;
        let len = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()));
        let Some(len) = len.filter(|&l| l <= self.data_left) else {
            return Ok(Tree::None);
        };
        self.data_left -= len;
        let data = self.data(len, Some(dtype))?;
        Ok(Tree::Array(
            Array::new(dtype, shape, data).expect("length matches shape"),
        ))
    }

    fn float(&mut self) -> Result<f64> {
        Ok(match self.u.int_in_range(0..=5u8)? {
            0 => f64::NAN,
            1 => f64::from_bits(0x7ff0_0000_0000_0001),
            2 => f64::NEG_INFINITY,
            3 => -0.0,
            _ => f64::from_bits(self.u.arbitrary()?),
        })
    }

    fn tree(&mut self, depth: usize) -> Result<Tree> {
        if self.nodes_left == 0 {
            return Ok(Tree::None);
        }
        self.nodes_left -= 1;
        let max = if depth >= 6 { 6 } else { 8 };
        Ok(match self.u.int_in_range(0..=max)? {
            0 => Tree::None,
            1 => Tree::Bool(self.u.arbitrary()?),
            2 => Tree::Int(self.u.arbitrary()?),
            3 => Tree::Float(self.float()?),
            4 => Tree::Str(self.text()?),
            5 => {
                let len = self.u.int_in_range(0..=200usize)?.min(self.data_left);
                self.data_left -= len;
                Tree::Bytes(self.data(len, None)?)
            }
            6 => self.array()?,
            7 => {
                let n = self.u.int_in_range(0..=6)?;
                Tree::List(
                    (0..n)
                        .map(|_| self.tree(depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
            _ => {
                let n = self.u.int_in_range(0..=6)?;
                let mut m = Map::new();
                for _ in 0..n {
                    let k = self.text()?;
                    let v = self.tree(depth + 1)?;
                    m.insert(k, v);
                }
                Tree::Map(m)
            }
        })
    }

    fn message(&mut self) -> Result<Message> {
        Ok(match self.u.int_in_range(0..=9u8)? {
            0 => Message::Hello(Hello {
                agent: self.text()?,
                token: if self.u.arbitrary()? {
                    Some(self.text()?)
                } else {
                    None
                },
            }),
            1..=3 => Message::Call(Call {
                request_id: self.u.arbitrary()?,
                method: self.text()?,
                timeout: self
                    .u
                    .arbitrary::<Option<u64>>()?
                    .map(Duration::from_micros),
                args: self.tree(0)?,
            }),
            4..=6 => Message::Reply(Reply {
                request_id: self.u.arbitrary()?,
                result: if self.u.ratio(1, 4)? {
                    Err(RemoteError::new(
                        ErrorKind::from_code(self.u.arbitrary()?),
                        self.text()?,
                        self.text()?,
                    ))
                } else {
                    Ok(self.tree(0)?)
                },
            }),
            7 => Message::Ping {
                nonce: self.u.arbitrary()?,
            },
            8 => Message::Cancel {
                request_id: self.u.arbitrary()?,
            },
            _ => Message::Goodbye(Goodbye {
                reason: GoodbyeReason::from_code(self.u.arbitrary()?),
                message: self.text()?,
            }),
        })
    }
}

/// Builds a message from the bytes, encodes it, and decodes it whole and in
/// chunkings taken from the bytes: every result equals the original (floats by
/// bits) and every non-empty array and bytes leaf is 64-byte aligned.
pub fn roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut b = Builder {
        u: &mut u,
        data_left: DATA_BUDGET,
        nodes_left: 300,
    };
    let Ok(message) = b.message() else { return };
    let sizes: Vec<usize> = (0..4)
        .map(|_| u.int_in_range(1..=300usize).unwrap_or(1))
        .collect();

    let encoded = encode(&message).expect("a valid message encodes");
    let bytes = encoded.to_vec();
    assert_eq!(bytes.len() as u64, encoded.len());
    let limits = Limits::default();

    let whole = decode_message(&bytes, &limits).expect("an encoded message decodes");
    assert!(same_message(&whole, &message), "{whole:?} != {message:?}");
    assert_aligned(&whole);

    // Byte by byte only for small messages: it is slow for large ones.
    let one = if bytes.len() <= 8192 { 1 } else { 7 };
    for sizes in [&sizes[..], &[one], &[64]] {
        let got = decode_chunked(&bytes, sizes, &limits);
        assert_eq!(got.end, Ok(()));
        assert_eq!(got.messages.len(), 1);
        assert!(same_message(&got.messages[0], &message));
        assert_aligned(&got.messages[0]);
    }
}
