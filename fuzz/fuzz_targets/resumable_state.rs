//! Fuzz target `resumable_state`: the property is
//! `fuzz_checks::resumable_state` in `tests/fuzz_checks/mod.rs`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::resumable_state(data));
