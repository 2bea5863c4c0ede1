#![no_main]
// The body is regatta::fuzzing::manifest, shared with the corpus replay in `cargo test`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| regatta::fuzzing::manifest(data));
