#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bootlace_fuzz_harness::confine::run(data));
