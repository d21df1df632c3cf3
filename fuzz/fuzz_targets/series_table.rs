//! Label-set insert / lookup / delete in the series table (heap memory),
//! checked against a model. See fuzz/src/targets.rs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmprom_fuzz::targets::series_table(data));
