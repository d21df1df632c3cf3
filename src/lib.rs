//! shmprom: Prometheus metrics for every nginx worker in one lock-free
//! shared-memory zone.
//!
//! The library is loaded by LuaJIT FFI (`lua/resty/shmprom.lua`) in the
//! nginx master from `init_by_lua*`, which opens the zone as an anonymous
//! shared mapping that every worker inherits. Workers update cells directly
//! (their own plane, plain stores) or through [`ffi`] calls (atomic adds on
//! the shared plane); `/metrics` is rendered here by [`expose`].
//!
//! Module map:
//! - [`zone`]: the mapping, its header and layout, the per-process zone table
//! - [`registry`]: metric families and label-key encoding
//! - [`series`]: the lock-free label-set table
//! - [`cells`]: planes and f64 cells
//! - [`planes`]: the plane claim and adoption protocol (also under loom)
//! - [`expose`]: Prometheus text 0.0.4 and OpenMetrics 1.0
//! - [`check`]: consistency check of a zone
//! - [`ttl`]: idle-series expiry
//! - [`gateway`]: the gateway preset's per-request recording for the nginx module
//! - [`rules`]: the nginx module's `shmprom_inc` / `shmprom_observe` recording
//! - [`writer`]: a recorder's writes into its process's plane
//! - [`ffi`]: the C ABI (include/shmprom.h)

// Under `--cfg loom` only the lock-free table, the plane owner protocol and
// their atomics are built:
// loom's atomics model threads in one process and cannot live in a shared
// mapping, so the zone and everything above it stay out of the model.
#[cfg(not(loom))]
pub mod cells;
#[cfg(not(loom))]
pub mod check;
#[cfg(not(loom))]
pub mod expose;
#[cfg(not(loom))]
pub mod ffi;
#[cfg(not(loom))]
pub mod gateway;
pub mod planes;
#[cfg(not(loom))]
pub mod registry;
#[cfg(not(loom))]
pub mod rules;
pub mod series;
mod sync;
#[cfg(not(loom))]
pub mod ttl;
#[cfg(not(loom))]
pub mod writer;
#[cfg(not(loom))]
pub mod zone;
