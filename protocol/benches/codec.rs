//! Codec micro-benchmarks, each beside a reference measured in the same run.
//!
//! `cargo bench -p teleport-protocol --bench codec`
//!
//! - `small/*`: encode and decode of a tiny call (calls/s).
//! - `large/*`: a 64 MiB float32 array: encoding (a gather list, no copy),
//!   decoding whole and in 64 KiB chunks (one copy into aligned memory), and
//!   `memcpy` of the same bytes into a fresh buffer as the reference.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use teleport_protocol::{encode, tree, Array, Call, Decoder, Limits, Message};

fn call(args: teleport_protocol::Tree) -> Message {
    Message::Call(Call {
        request_id: 1,
        method: "add".into(),
        timeout: None,
        args,
    })
}

fn decode_all(bytes: &[u8], chunk: usize) -> Message {
    let mut decoder = Decoder::new(Limits::default());
    for piece in bytes.chunks(chunk) {
        let mut input = piece;
        if let Some(m) = decoder.feed(&mut input).unwrap() {
            return m;
        }
    }
    panic!("incomplete message");
}

fn small(c: &mut Criterion) {
    let mut g = c.benchmark_group("small");
    g.throughput(Throughput::Elements(1));
    let msg = call(tree!({"foo": 1, "bar": 1}));
    let bytes = encode(&msg).unwrap().to_vec();
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&msg)).unwrap()));
    g.bench_function("decode", |b| {
        b.iter(|| decode_all(black_box(&bytes), usize::MAX))
    });
    let kib = call(tree!({"x": (Array::from_vec1(vec![1.0f32; 256]))}));
    let kib_bytes = encode(&kib).unwrap().to_vec();
    g.bench_function("encode_1KiB_array", |b| {
        b.iter(|| encode(black_box(&kib)).unwrap())
    });
    g.bench_function("decode_1KiB_array", |b| {
        b.iter(|| decode_all(black_box(&kib_bytes), usize::MAX))
    });
    g.finish();
}

fn large(c: &mut Criterion) {
    const LEN: usize = 64 << 20;
    let mut g = c.benchmark_group("large");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(LEN as u64));
    let msg = call(tree!({"x": (Array::from_vec1(vec![0.5f32; LEN / 4]))}));
    let bytes = encode(&msg).unwrap().to_vec();
    let payload = &bytes[bytes.len() - LEN..];

    g.bench_function("memcpy", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(LEN);
            v.extend_from_slice(black_box(payload));
            v
        })
    });
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&msg)).unwrap()));
    g.bench_function("decode", |b| {
        b.iter(|| decode_all(black_box(&bytes), usize::MAX))
    });
    g.bench_function("decode_64KiB_chunks", |b| {
        b.iter(|| decode_all(black_box(&bytes), 64 << 10))
    });
    g.finish();
}

criterion_group!(benches, small, large);
criterion_main!(benches);
