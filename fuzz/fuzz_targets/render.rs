//! Families and series from the input in a real zone, rendered as text and
//! OpenMetrics, parsed and compared with a model. See fuzz/src/targets.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmprom_fuzz::targets::render(data));
