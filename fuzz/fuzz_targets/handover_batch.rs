//! Fuzz target `handover_batch`: the property is
//! `fuzz_checks::handover_batch` in `tests/fuzz_checks/mod.rs`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::handover_batch(data));
