#![no_main]
// The body is regatta::fuzzing::front_head, shared with the corpus replay in `cargo test`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| regatta::fuzzing::front_head(data));
