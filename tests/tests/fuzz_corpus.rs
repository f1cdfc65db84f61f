//! Runs every fuzz target body (`teleport_integration_tests::fuzz_bodies`) over
//! every file of its corpus in `fuzz/corpus/<target>/` and over a fixed number
//! of deterministic pseudo-random inputs, so the targets' checks run on stable
//! in every `cargo test`, without cargo-fuzz.
//!
//! `TELEPORT_WRITE_SEEDS=1` first (re)writes the generated seed files into the
//! corpus.

use std::path::PathBuf;

use teleport_integration_tests::fuzz_bodies::{seeds, TARGETS};

/// Pseudo-random inputs per target (fewer in debug builds, which are slower).
const RANDOM_INPUTS: usize = if cfg!(debug_assertions) { 2000 } else { 20_000 };

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn run(target: &str, body: fn(&[u8]), input: &[u8], what: &str) {
    let result = std::panic::catch_unwind(|| body(input));
    if let Err(e) = result {
        let msg = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("?");
        panic!(
            "target {target} failed on {what} ({} bytes): {msg}",
            input.len()
        );
    }
}

#[test]
fn every_target_passes_its_corpus_and_seeds() {
    if std::env::var_os("TELEPORT_WRITE_SEEDS").is_some() {
        seeds::write_corpus(&corpus_dir()).unwrap();
    }
    for (target, body) in TARGETS {
        let dir = corpus_dir().join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("target {target} has no corpus at {}: {e}", dir.display()));
        let mut files = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                run(target, *body, &bytes, &path.display().to_string());
                files += 1;
            }
        }
        assert!(
            files > 0,
            "target {target}: corpus {} is empty",
            dir.display()
        );
        eprintln!("{target}: {files} corpus files passed");
        for (name, bytes) in seeds::for_target(target) {
            run(target, *body, &bytes, &format!("seed {name}"));
        }
    }
}

#[test]
fn every_target_survives_pseudo_random_inputs() {
    for (target, body) in TARGETS {
        // A fixed xorshift seed per target: the same inputs on every run.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ target.len() as u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = seeds::for_target(target).into_iter().map(|s| s.1).collect();
        for i in 0..RANDOM_INPUTS {
            let len = (next() % 512) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Every fourth input mutates a seed instead: flipped bytes in a
            // valid message reach deeper than pure noise.
            if i % 4 == 0 && !seeds.is_empty() {
                input = seeds[(next() as usize) % seeds.len()].clone();
                for _ in 0..1 + next() % 4 {
                    if !input.is_empty() {
                        let at = (next() as usize) % input.len();
                        input[at] = next() as u8;
                    }
                }
            }
            run(target, *body, &input, &format!("pseudo-random input {i}"));
        }
    }
}
