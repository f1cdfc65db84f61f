//! Integration tests of the Teleport workspace, and the bodies of its fuzz targets.
//!
//! The fuzz targets in `fuzz/` (built with cargo-fuzz on nightly) are one-line
//! calls into [`fuzz_bodies`], so the same code also runs on stable in
//! `tests/fuzz_corpus.rs`, over the committed corpus and a bounded number of
//! pseudo-random inputs.

pub mod fuzz_bodies;
