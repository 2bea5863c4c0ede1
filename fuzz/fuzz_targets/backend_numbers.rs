#![no_main]
// The body is regatta::fuzzing::backend_numbers, shared with the corpus replay in `cargo test`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| regatta::fuzzing::backend_numbers(data));
