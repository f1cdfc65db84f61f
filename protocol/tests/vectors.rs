//! Test vectors: encoded messages committed as files, checked in both directions.
//!
//! For each vector, `vectors/NAME.bin` holds the exact bytes and `vectors/NAME.txt`
//! a readable description with an annotated hex dump. The test checks that this
//! crate encodes the message to exactly those bytes and decodes those bytes to
//! exactly the message, so another implementation can prove byte compatibility
//! against the same files.
//!
//! After a deliberate format change, regenerate with
//! `TELEPORT_UPDATE_VECTORS=1 cargo test -p teleport-protocol --test vectors`
//! and bump the format version.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use teleport_protocol::wire::PREAMBLE_LEN;
use teleport_protocol::*;

struct Vector {
    name: &'static str,
    description: &'static str,
    message: Message,
}

fn vectors() -> Vec<Vector> {
    let f32_2x3 = Array::from_vec([2, 3], vec![0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let mut dtypes = Map::new();
    for d in DType::ALL {
        // Two elements whose bytes count up from 1, so every byte is visible;
        // bool elements are true and false (a bool byte is 0 or 1).
        let bytes: Vec<u8> = match d {
            DType::Bool => vec![1, 0],
            _ => (1..=2 * d.size() as u8).collect(),
        };
        dtypes.insert(d.name(), Array::new(d, [2], bytes).unwrap());
    }
    vec![
        Vector {
            name: "ping",
            description: "Ping with nonce 1. No tree, no data section.",
            message: Message::Ping { nonce: 1 },
        },
        Vector {
            name: "pong",
            description: "Pong answering nonce 300 (a two-byte varint).",
            message: Message::Pong { nonce: 300 },
        },
        Vector {
            name: "hello_token",
            description: "Client hello: agent \"teleport-rs/0.1\", token \"secret\".",
            message: Message::Hello(Hello {
                agent: "teleport-rs/0.1".into(),
                token: Some("secret".into()),
            }),
        },
        Vector {
            name: "hello_server",
            description: "Server hello: agent \"server\", no token.",
            message: Message::Hello(Hello {
                agent: "server".into(),
                token: None,
            }),
        },
        Vector {
            name: "cancel",
            description: "Cancel request 7.",
            message: Message::Cancel { request_id: 7 },
        },
        Vector {
            name: "goodbye",
            description: "Goodbye, reason 1 (shutting down), message \"bye\".",
            message: Message::Goodbye(Goodbye {
                reason: GoodbyeReason::ShuttingDown,
                message: "bye".into(),
            }),
        },
        Vector {
            name: "call_scalars",
            description: "Call 1 of \"add\" with timeout 1.5 s (1500000 us) and the map \
                          {\"foo\": int 1, \"bar\": float -2.5}. Scalars live in the header; \
                          no data section.",
            message: Message::Call(Call {
                request_id: 1,
                method: "add".into(),
                timeout: Some(Duration::from_micros(1_500_000)),
                args: tree!({"foo": 1, "bar": (-2.5)}),
            }),
        },
        Vector {
            name: "call_array",
            description: "Call 2 of \"echo\", no timeout, args {\"x\": float32 array of \
                          shape [2, 3] holding 0..6}. The header is padded to byte 64; the \
                          24 data bytes follow.",
            message: Message::Call(Call {
                request_id: 2,
                method: "echo".into(),
                timeout: None,
                args: tree!({"x": (f32_2x3)}),
            }),
        },
        Vector {
            name: "reply_nested",
            description: "Reply 3, ok, tree {\"a\": [int8 [3] = 1,2,3; bytes \"hi\"; \
                          string \"s\"; none; true], \"b\": {}, \"c\": [], \"d\": uint8 [0]}. \
                          Regions: int8 at 0 (3 bytes), bytes at 64 (2 bytes), empty uint8 \
                          at 128; data_len 128.",
            message: Message::Reply(Reply {
                request_id: 3,
                result: Ok(tree!({
                    "a": [
                        (Array::from_vec1(vec![1i8, 2, 3])),
                        (Bytes::from_static(b"hi")),
                        "s",
                        null,
                        true
                    ],
                    "b": {},
                    "c": [],
                    "d": (Array::zeros(DType::U8, [0]).unwrap())
                })),
            }),
        },
        Vector {
            name: "reply_error",
            description: "Reply 4, error: kind 0 (handler error), type \"ValueError\", \
                          message \"bad value\".",
            message: Message::Reply(Reply {
                request_id: 4,
                result: Err(RemoteError::new(
                    ErrorKind::Handler,
                    "ValueError",
                    "bad value",
                )),
            }),
        },
        Vector {
            name: "reply_all_dtypes",
            description: "Reply 5, ok: a map from each dtype name (in code order, bool to \
                          complex128) to a 1-d array of 2 elements whose bytes count 1, 2, 3, \
                          ... (bool: true, false, bytes 01 00). Each region starts on a \
                          64-byte boundary.",
            message: Message::Reply(Reply {
                request_id: 5,
                result: Ok(Tree::Map(dtypes)),
            }),
        },
        Vector {
            name: "call_rank0_and_large_ints",
            description: "Call 2^64-1 of \"m\", timeout 0, args [int64 rank-0 array = -1, \
                          int i64::MIN, int i64::MAX, float 0.5, empty string].",
            message: Message::Call(Call {
                request_id: u64::MAX,
                method: "m".into(),
                timeout: Some(Duration::ZERO),
                args: tree!([(Array::scalar(-1i64)), (i64::MIN), (i64::MAX), 0.5, ""]),
            }),
        },
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// A hex dump of `bytes` in 16-byte rows, with the message's sections labelled.
fn annotated_hex(bytes: &[u8]) -> String {
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let data_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let header_end = PREAMBLE_LEN + header_len;
    let data_start = bytes.len() - data_len;
    let mut out = String::new();
    let mut section = |name: &str, range: std::ops::Range<usize>| {
        if range.is_empty() {
            return;
        }
        writeln!(out, "{name} (bytes {}..{}):", range.start, range.end).unwrap();
        for row in bytes[range].chunks(16) {
            let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(out, "  {}", hex.join(" ")).unwrap();
        }
    };
    section("preamble", 0..PREAMBLE_LEN);
    section("header", PREAMBLE_LEN..header_end);
    section("padding", header_end..data_start);
    section("data", data_start..bytes.len());
    out
}

fn describe(v: &Vector, bytes: &[u8]) -> String {
    format!(
        "{name}: {desc}\n\nTotal {len} bytes.\n\n{hex}",
        name = v.name,
        desc = v.description,
        len = bytes.len(),
        hex = annotated_hex(bytes)
    )
}

#[test]
fn vectors_match_in_both_directions() {
    let update = std::env::var_os("TELEPORT_UPDATE_VECTORS").is_some();
    for v in vectors() {
        let encoded = encode(&v.message).unwrap().to_vec();
        let bin = dir().join(format!("{}.bin", v.name));
        let txt = dir().join(format!("{}.txt", v.name));
        if update {
            std::fs::write(&bin, &encoded).unwrap();
            std::fs::write(&txt, describe(&v, &encoded)).unwrap();
        }
        let stored = std::fs::read(&bin)
            .unwrap_or_else(|e| panic!("{}: {e}; regenerate the vectors", bin.display()));
        assert_eq!(encoded, stored, "encoder disagrees with {}", bin.display());
        let decoded = decode_message(&stored, &Limits::default()).unwrap();
        assert_eq!(
            decoded,
            v.message,
            "decoder disagrees with {}",
            bin.display()
        );
        let stored_txt = std::fs::read_to_string(&txt).unwrap();
        assert_eq!(
            stored_txt,
            describe(&v, &stored),
            "{} is stale",
            txt.display()
        );
    }
}

#[test]
fn every_vector_file_is_checked() {
    let names: Vec<_> = vectors().iter().map(|v| v.name).collect();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.extension().is_some_and(|e| e == "bin") {
            assert!(
                names.contains(&stem.as_str()),
                "unchecked vector {}",
                path.display()
            );
        }
    }
}
