//! Fuzz targets for shmprom: the target bodies live in [`targets`], shared
//! with the stable replay test of the main crate (tests/fuzz_replay.rs).
pub mod targets;
