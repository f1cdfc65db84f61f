//! Encodes calls holding arrays from 1 KiB to 256 MiB, decodes them in 64 KiB
//! chunks as a network receiver would, checks every byte, and prints the speed
//! beside a plain copy of the same bytes.
//!
//! `cargo run --release -p teleport-protocol --example codec_demo`

use std::time::{Duration, Instant};

use teleport_protocol::{encode, tree, Array, Call, Decoder, Limits, Message};

fn main() {
    println!(
        "{:>10}  {:>12}  {:>12}  {:>12}  {:>8}",
        "array", "encode", "decode", "memcpy", "ratio"
    );
    let mut size = 1usize << 10;
    while size <= 256 << 20 {
        let values: Vec<f32> = (0..size / 4).map(|i| i as f32).collect();
        let args = tree!({"x": (Array::from_vec1(values)), "step": 7});
        let message = Message::Call(Call {
            request_id: 1,
            method: "echo".into(),
            timeout: None,
            args,
        });

        // Best of several runs: small sizes are otherwise lost in timer noise.
        let runs = ((64 << 20) / size).clamp(3, 200);
        let mut encode_time = Duration::MAX;
        let mut decode_time = Duration::MAX;
        let mut copy_time = Duration::MAX;
        let mut decoded = None;
        for _ in 0..runs {
            let t = Instant::now();
            let encoded = encode(&message).expect("encode");
            encode_time = encode_time.min(t.elapsed());
            // A contiguous copy only to have bytes to feed; a transport sends the chunks.
            let wire = encoded.to_vec();

            let t = Instant::now();
            let mut decoder = Decoder::new(Limits::default());
            for chunk in wire.chunks(64 << 10) {
                let mut input = chunk;
                while !input.is_empty() {
                    if let Some(m) = decoder.feed(&mut input).expect("decode") {
                        decoded = Some(m);
                    }
                }
            }
            decode_time = decode_time.min(t.elapsed());

            let t = Instant::now();
            let mut copy = Vec::with_capacity(size);
            copy.extend_from_slice(&wire[wire.len() - size..]);
            copy_time = copy_time.min(t.elapsed());
            std::hint::black_box(&copy);
        }

        let decoded = decoded.expect("a whole message");
        assert_eq!(decoded, message, "round trip changed the message");
        let Message::Call(call) = decoded else {
            unreachable!()
        };
        let x = call
            .args
            .get("x")
            .and_then(|x| x.as_array().cloned())
            .expect("x");
        assert!(x.is_aligned_to(64), "received arrays are 64-byte aligned");

        let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
        println!(
            "{:>10}  {:>9.4} ms  {:>7.2} GB/s  {:>7.2} GB/s  {:>7.2}x",
            human(size),
            encode_time.as_secs_f64() * 1e3,
            gbps(decode_time),
            gbps(copy_time),
            decode_time.as_secs_f64() / copy_time.as_secs_f64(),
        );
        size *= 4;
    }
    println!("every byte checked; ratio = decode time / memcpy time");
}

fn human(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}
