#![no_main]
// The body is regatta::fuzzing::token_request, shared with the corpus replay in `cargo test`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| regatta::fuzzing::token_request(data));
