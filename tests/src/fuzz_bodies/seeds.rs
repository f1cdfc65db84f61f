//! Seed inputs for each target: starting points for the fuzzer and fixed cases
//! for the corpus test, which runs them whatever the corpus holds.
//! `fuzz/corpus/<target>/` started from them, written by [`write_corpus`] (run
//! `TELEPORT_WRITE_SEEDS=1 cargo test -p teleport-integration-tests --test
//! fuzz_corpus`), and holds what fuzzing found, minimised (see docs/fuzzing.md).

use std::path::Path;

/// The encoded test vectors of the wire format (`protocol/tests/vectors`).
const VECTORS: &[&[u8]] = &[
    include_bytes!("../../../protocol/tests/vectors/call_array.bin"),
    include_bytes!("../../../protocol/tests/vectors/call_rank0_and_large_ints.bin"),
    include_bytes!("../../../protocol/tests/vectors/call_scalars.bin"),
    include_bytes!("../../../protocol/tests/vectors/cancel.bin"),
    include_bytes!("../../../protocol/tests/vectors/goodbye.bin"),
    include_bytes!("../../../protocol/tests/vectors/hello_server.bin"),
    include_bytes!("../../../protocol/tests/vectors/hello_token.bin"),
    include_bytes!("../../../protocol/tests/vectors/ping.bin"),
    include_bytes!("../../../protocol/tests/vectors/pong.bin"),
    include_bytes!("../../../protocol/tests/vectors/reply_all_dtypes.bin"),
    include_bytes!("../../../protocol/tests/vectors/reply_error.bin"),
    include_bytes!("../../../protocol/tests/vectors/reply_nested.bin"),
];

/// Seeds of the `decode` target: each vector whole (one-shot chunking, small
/// limits) and byte by byte (tiny limits), a stream of three vectors, and a
/// truncated vector.
pub fn decode() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, v) in VECTORS.iter().enumerate() {
        out.push((format!("vector-{i:02}"), [&[0u8, 0][..], v].concat()));
    }
    for (i, v) in VECTORS.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        out.push((
            format!("vector-{i:02}-bytewise-tiny"),
            [&[1u8, 1][..], v].concat(),
        ));
    }
    out.push((
        "stream".into(),
        [&[37u8, 0][..], VECTORS[6], VECTORS[0], VECTORS[7]].concat(),
    ));
    let v = VECTORS[9];
    out.push((
        "truncated".into(),
        [&[5u8, 0][..], &v[..v.len() - 3]].concat(),
    ));
    out
}

/// Seeds of the `roundtrip` target: byte patterns that the builder turns into
/// calls and replies with trees of arrays.
pub fn roundtrip() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, len) in [16usize, 64, 256, 1024].into_iter().enumerate() {
        let mut x = 0x2545_f491_4f6c_dd1du64.wrapping_add(i as u64);
        let bytes = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        out.push((format!("random-{len}"), bytes));
    }
    // Calls (message choice 1), then a list of array leaves of every dtype.
    let mut calls = Vec::new();
    for d in 0..15u8 {
        calls.extend_from_slice(&[1, 7, 6, 6, d, 2, 3, 2]);
    }
    out.push(("arrays".into(), calls));
    out
}

/// Writes the `arbitrary` encoding of event sequences for the state machines.
struct Script(Vec<u8>);

impl Script {
    /// The tag that makes a derived `Arbitrary` enum of `n` variants choose
    /// variant `i`: `(tag * n) >> 32 == i`.
    fn variant(&mut self, i: u64, n: u64) -> &mut Self {
        let tag = (i << 32).div_ceil(n);
        self.0.extend_from_slice(&(tag as u32).to_le_bytes());
        self
    }
    fn op(&mut self, i: u64) -> &mut Self {
        self.variant(i, 25)
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// `Op::Start` with a timeout in ms (`None`: no timeout).
    fn start(&mut self, timeout_ms: Option<u16>, payload: u8) -> &mut Self {
        self.op(0).bytes(&[1]);
        match timeout_ms {
            Some(t) => self.bytes(&[1]).bytes(&t.to_le_bytes()),
            None => self.bytes(&[0]),
        };
        self.bytes(&[payload])
    }
}

// Op variant indices, in declaration order.
const CANCEL: u64 = 1;
const ADVANCE: u64 = 3;
const TO_CLIENT_TIMER: u64 = 4;
const TO_SERVER_TIMER: u64 = 5;
const DELIVER_TO_SERVER: u64 = 8;
const DELIVER_TO_CLIENT: u64 = 9;
const SWAP_TO_SERVER: u64 = 12;
const APP_REPLY: u64 = 14;
const INJECT_TO_SERVER: u64 = 15;
const INJECT_TO_CLIENT: u64 = 16;
const CLIENT_CLOSE: u64 = 18;
const SERVER_SHUTDOWN: u64 = 20;
const SERVER_CLOSE: u64 = 19;

/// Seeds of the `state_machines` target: a normal exchange with a deadline, a
/// hostile client without the token, and a saturated, shutting-down server.
pub fn state_machines() -> Vec<(String, Vec<u8>)> {
    // Config bytes: client max_in_flight, ping (bool, u16 ms), max_age (bool,
    // u16 ms), default timeout (bool), keep_calls, server max_in_flight,
    // server token (bool), client token (0 none, 1 wrong, 2/3 right).
    let mut happy = Script(vec![4, 1, 0x03, 0xe8, 1, 0x13, 0x88, 0, 1, 4, 1, 2]);
    happy
        .start(Some(500), 4)
        .op(DELIVER_TO_SERVER)
        .op(DELIVER_TO_SERVER)
        .op(APP_REPLY)
        .bytes(&[0, 1])
        .op(DELIVER_TO_CLIENT)
        .op(DELIVER_TO_CLIENT)
        .start(Some(500), 5)
        .start(None, 8)
        .op(DELIVER_TO_SERVER)
        .op(ADVANCE)
        .bytes(&600u16.to_le_bytes())
        .op(TO_CLIENT_TIMER)
        .op(DELIVER_TO_SERVER)
        .op(TO_SERVER_TIMER)
        .op(CANCEL)
        .bytes(&[2])
        .op(DELIVER_TO_SERVER)
        .op(DELIVER_TO_SERVER)
        .op(CLIENT_CLOSE)
        .op(DELIVER_TO_SERVER);

    let mut hostile = Script(vec![2, 0, 0, 0, 1, 0, 1, 1]);
    hostile
        .op(INJECT_TO_SERVER)
        .variant(1, 7)
        .bytes(&[3, 0])
        .op(SWAP_TO_SERVER)
        .start(Some(10), 1)
        .op(DELIVER_TO_SERVER)
        .op(DELIVER_TO_SERVER)
        .op(INJECT_TO_CLIENT)
        .variant(1, 7)
        .bytes(&[1, 0])
        .op(DELIVER_TO_CLIENT);

    let mut saturated = Script(vec![1, 0, 0, 0, 0, 1, 0, 0]);
    saturated
        .start(None, 1)
        .start(None, 2)
        .op(DELIVER_TO_SERVER)
        .op(DELIVER_TO_SERVER)
        .op(INJECT_TO_SERVER)
        .variant(1, 7)
        .bytes(&[7, 1, 5, 0, 0, 0, 0, 0, 0, 0])
        .op(SERVER_SHUTDOWN)
        .op(INJECT_TO_SERVER)
        .variant(1, 7)
        .bytes(&[9, 0])
        .op(APP_REPLY)
        .bytes(&[0, 0])
        .op(SERVER_CLOSE)
        .op(DELIVER_TO_CLIENT)
        .op(DELIVER_TO_CLIENT)
        .op(DELIVER_TO_CLIENT)
        .op(DELIVER_TO_CLIENT);

    vec![
        ("happy".into(), happy.0),
        ("hostile".into(), hostile.0),
        ("saturated".into(), saturated.0),
    ]
}

/// The seeds of the target called `name`.
pub fn for_target(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "decode" => decode(),
        "roundtrip" => roundtrip(),
        "state_machines" => state_machines(),
        _ => Vec::new(),
    }
}

/// Writes every target's seeds into `corpus/<target>/seed-<name>`.
pub fn write_corpus(corpus: &Path) -> std::io::Result<()> {
    for (target, _) in super::TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in for_target(target) {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}
