//! Fuzz target `proto_handshake`: the property is `fuzz_checks::proto_handshake` in
//! `tests/fuzz_checks/mod.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::proto_handshake(data));
