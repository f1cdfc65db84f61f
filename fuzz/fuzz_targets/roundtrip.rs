#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| teleport_integration_tests::fuzz_bodies::roundtrip(data));
