//! The `extern "C"` surface and nothing else: null checks, catch_unwind,
//! return codes, error messages written into the caller's buffer. Every
//! function here is declared in include/shmprom.h (a test checks both
//! agree).

use crate::cells::{claim_plane, claim_spare, f64_add, f64_set, spare_held, sum_cell};
use crate::expose::{render, shared, Format};
use crate::registry::{self, Def, DefineError, Kind, SeriesError};
use crate::series::TableError;
use crate::zone::{
    OpenError, PrefaultHow, PrefaultMethod, PrefaultPart, Zone, DEFAULT_CELLS_PER_SERIES,
};
use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod gateway;
pub use gateway::*;
mod rules;
pub use rules::*;

/// Bumped whenever a function, a signature or a struct of the C ABI
/// changes (4: shmprom_zone_prefault; 6: shmprom_rec_*; 7: the zone's
/// cells_per_series; 8: shmprom_zone_populate_ahead).
pub const SHMPROM_ABI_VERSION: u32 = 8;

pub const SHMPROM_OK: c_int = 0;
pub const SHMPROM_EINVAL: c_int = -1;
pub const SHMPROM_EFULL: c_int = -2;
pub const SHMPROM_ENOENT: c_int = -3;
pub const SHMPROM_EOS: c_int = -4;
pub const SHMPROM_EPANIC: c_int = -5;
pub const SHMPROM_ESTUCK: c_int = -6;
pub const SHMPROM_ETOOLONG: c_int = -7;

/// `how` of shmprom_zone_prefault: allocate every page and map it here.
pub const SHMPROM_PREFAULT_ALLOCATE: u32 = 0;
/// `how` of shmprom_zone_prefault: map the zone's pages into this process.
pub const SHMPROM_PREFAULT_MAP: u32 = 1;
/// `how` of shmprom_zone_prefault: as ALLOCATE, the series table only.
pub const SHMPROM_PREFAULT_ALLOCATE_TABLE: u32 = 2;
/// `how` of shmprom_zone_prefault: as MAP, the series table only.
pub const SHMPROM_PREFAULT_MAP_TABLE: u32 = 3;

/// Opaque zone handle (the base of the shared mapping).
#[repr(C)]
pub struct shmprom_zone {
    _private: [u8; 0],
}

/// What LuaJIT needs to update cells without a call.
#[repr(C)]
pub struct shmprom_zone_info {
    /// Cell 0 of plane 0; cell `i` of plane `p` is `cells[p * plane_stride + i]`.
    pub cells: *mut f64,
    /// Cells per plane.
    pub plane_stride: u64,
    /// Moves whenever series are deleted or families retired.
    pub epoch: *const u32,
    /// Planes including the shared plane 0.
    pub planes: u32,
    /// [`SHMPROM_ABI_VERSION`] of this library.
    pub abi: u32,
}

/// Writes `msg` NUL-terminated into `err` (truncated to `errlen`).
fn set_err(err: *mut c_char, errlen: usize, msg: &str) {
    if err.is_null() || errlen == 0 {
        return;
    }
    let n = msg.len().min(errlen - 1);
    // SAFETY: the caller promises `err` holds `errlen` writable bytes; we
    // write n + 1 <= errlen of them.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
        *err.add(n) = 0;
    }
}

/// Runs `f`, turning a panic into `$panic_rc` with a message.
macro_rules! guard {
    ($err:expr, $errlen:expr, $panic_rc:expr, $body:block) => {{
        match catch_unwind(AssertUnwindSafe(|| $body)) {
            Ok(r) => r,
            Err(_) => {
                set_err($err, $errlen, "internal error (panic) in libshmprom");
                $panic_rc
            }
        }
    }};
}

/// Returns `$rc` with a message when `$p` is null.
macro_rules! nonnull {
    ($p:expr, $err:expr, $errlen:expr, $rc:expr, $what:expr) => {
        if $p.is_null() {
            set_err($err, $errlen, concat!($what, " is NULL"));
            return $rc;
        }
    };
}

/// Label values kept on the stack by [`collect_in`]; more take the heap.
const STACK_VALUES: usize = 8;

/// The `n` strings `get(0..n)` into `stack` when they fit (no allocation:
/// the miss path and the directives' recorder run this per call), else
/// into `heap`; None when `get` gives None for one.
fn collect_in<'s, 'a>(
    n: usize,
    mut get: impl FnMut(usize) -> Option<&'a [u8]>,
    stack: &'s mut [&'a [u8]; STACK_VALUES],
    heap: &'s mut Vec<&'a [u8]>,
) -> Option<&'s [&'a [u8]]> {
    if n > STACK_VALUES {
        *heap = (0..n).map(&mut get).collect::<Option<Vec<_>>>()?;
        return Some(heap);
    }
    for (i, slot) in stack[..n].iter_mut().enumerate() {
        *slot = get(i)?;
    }
    Some(&stack[..n])
}

/// Borrows `n` (ptr, len) strings given by C.
///
/// # Safety
/// `ptrs` and `lens` must point at `n` entries each, and each pointer at
/// `len` readable bytes (any pointer when its len is 0).
unsafe fn slices<'a>(
    n: u32,
    ptrs: *const *const c_char,
    lens: *const usize,
) -> Option<Vec<&'a [u8]>> {
    (0..n as usize)
        // SAFETY: i < n entries, per the contract passed on.
        .map(|i| unsafe { nth(ptrs, lens, i) })
        .collect()
}

/// [`slices`] through [`collect_in`]: on the stack when they fit.
///
/// # Safety
/// `ptrs` and `lens` must point at `n` entries each, and each pointer at
/// `len` readable bytes (any pointer when its len is 0).
unsafe fn slices_in<'s, 'a>(
    n: u32,
    ptrs: *const *const c_char,
    lens: *const usize,
    stack: &'s mut [&'a [u8]; STACK_VALUES],
    heap: &'s mut Vec<&'a [u8]>,
) -> Option<&'s [&'a [u8]]> {
    collect_in(
        n as usize,
        // SAFETY: i < n entries, per the contract passed on.
        |i| unsafe { nth(ptrs, lens, i) },
        stack,
        heap,
    )
}

/// String `i` of (ptrs, lens); None when a non-empty one is NULL.
///
/// # Safety
/// `ptrs` and `lens` hold more than `i` entries (may be NULL: None), and
/// `ptrs[i]` points at `lens[i]` readable bytes unless that is 0.
unsafe fn nth<'a>(ptrs: *const *const c_char, lens: *const usize, i: usize) -> Option<&'a [u8]> {
    if ptrs.is_null() || lens.is_null() {
        return None;
    }
    // SAFETY: i < the entries both hold, per the contract.
    let (p, l) = unsafe { (*ptrs.add(i), *lens.add(i)) };
    // SAFETY: p points at l readable bytes unless l is 0, per the contract.
    unsafe { bytes(p, l) }
}

/// Bytes at (p, len); empty when len is 0, None when p is NULL otherwise.
///
/// # Safety
/// A non-NULL `p` points at `len` readable bytes.
unsafe fn bytes<'a>(p: *const c_char, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        Some(&[])
    } else if p.is_null() {
        None
    } else {
        // SAFETY: per the contract.
        Some(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
    }
}

/// A process's recorders of one kind for the nginx module, one per zone (by
/// base address). Boxed so their addresses stay put; re-opening a zone's
/// recorder (init_by_lua runs again on every reload, in the master)
/// rebuilds it in place.
struct PerZone<T>(std::sync::Mutex<Vec<(usize, Box<T>)>>);

// SAFETY: a recorder holds the zone's base pointer and process-local
// caches; the list is only touched under the mutex, and a recorder's
// contents only by the thread that runs the requests of its process (the
// nginx worker's event loop), or by the master before it forks.
unsafe impl<T> Sync for PerZone<T> {}

impl<T> PerZone<T> {
    const fn new() -> Self {
        PerZone(std::sync::Mutex::new(Vec::new()))
    }

    /// Puts `rec` in place of zone `base`'s recorder, or adds it; returns
    /// its address. No recorder of the zone may be in use meanwhile.
    fn put(&self, base: usize, rec: T) -> *mut T {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match list.iter_mut().find(|(b, _)| *b == base) {
            Some((_, r)) => {
                **r = rec;
                r
            }
            None => {
                list.push((base, Box::new(rec)));
                &mut list.last_mut().expect("just pushed").1
            }
        };
        &mut **slot as *mut T
    }
}

fn zone(z: *const shmprom_zone) -> Zone {
    // SAFETY: callers pass a handle from shmprom_zone_open (checked non-null).
    unsafe { Zone::from_ptr(z as *mut u8) }
}

/// The ABI version of this library ([`SHMPROM_ABI_VERSION`]).
#[no_mangle]
pub extern "C" fn shmprom_abi_version() -> u32 {
    SHMPROM_ABI_VERSION
}

/// The crate version as a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn shmprom_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Opens (creating on first use in this process) the zone `name`, its
/// regions shared for series of `cells_per_series` cells on average (0:
/// the default, [`DEFAULT_CELLS_PER_SERIES`]). Returns 0, 1 when the zone
/// already existed with another size, plane count or share (it is kept as
/// it was), or a negative error code.
///
/// # Safety
/// `name` must hold `name_len` bytes; `path` is NULL or a NUL-terminated
/// string; `out` is writable; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_zone_open(
    name: *const c_char,
    name_len: usize,
    size: u64,
    planes: u32,
    cells_per_series: f64,
    path: *const c_char,
    out: *mut *mut shmprom_zone,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(name, err, errlen, SHMPROM_EINVAL, "name");
    nonnull!(out, err, errlen, SHMPROM_EINVAL, "out");
    guard!(err, errlen, SHMPROM_EPANIC, {
        // SAFETY: name holds name_len bytes per the contract.
        let n = unsafe { std::slice::from_raw_parts(name as *const u8, name_len) };
        let Ok(n) = std::str::from_utf8(n) else {
            set_err(err, errlen, "zone name is not UTF-8");
            return SHMPROM_EINVAL;
        };
        let p = if path.is_null() {
            None
        } else {
            // SAFETY: a non-null path is NUL-terminated per the contract.
            match unsafe { std::ffi::CStr::from_ptr(path) }.to_str() {
                Ok(s) => Some(s),
                Err(_) => {
                    set_err(err, errlen, "zone path is not UTF-8");
                    return SHMPROM_EINVAL;
                }
            }
        };
        let cells = if cells_per_series == 0.0 {
            DEFAULT_CELLS_PER_SERIES
        } else {
            cells_per_series
        };
        match Zone::open_for(n, size, planes, cells, p) {
            Ok((zn, differs)) => {
                // SAFETY: out is writable per the contract.
                unsafe { *out = zn.as_ptr() as *mut shmprom_zone };
                if differs {
                    set_err(err, errlen, "zone already open with another size, plane count or cells_per_series; kept as it was (restart nginx to change it)");
                    1
                } else {
                    SHMPROM_OK
                }
            }
            Err(OpenError::Invalid(m)) => {
                set_err(err, errlen, &m);
                SHMPROM_EINVAL
            }
            Err(OpenError::Os(m)) => {
                set_err(err, errlen, &m);
                SHMPROM_EOS
            }
        }
    })
}

/// Fills `out` with the pointers LuaJIT updates cells through.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_zone_get_info(
    z: *const shmprom_zone,
    out: *mut shmprom_zone_info,
) -> c_int {
    if z.is_null() || out.is_null() {
        return SHMPROM_EINVAL;
    }
    guard!(std::ptr::null_mut(), 0, SHMPROM_EPANIC, {
        let zn = zone(z);
        let h = zn.header();
        let info = shmprom_zone_info {
            cells: zn.cell_ptr(0, 0) as *mut f64,
            plane_stride: h.cells_cap,
            epoch: h.epoch.as_ptr() as *const u32,
            planes: h.planes,
            abi: SHMPROM_ABI_VERSION,
        };
        // SAFETY: out is writable per the contract.
        unsafe { out.write(info) };
        SHMPROM_OK
    })
}

/// Claims a per-writer plane for process `pid` (see cells::claim_plane).
/// Returns the plane (>= 1), 0 when none is free (use the shared plane), or
/// a negative error code.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_plane_claim(z: *mut shmprom_zone, pid: u32) -> c_int {
    if z.is_null() {
        return SHMPROM_EINVAL;
    }
    guard!(std::ptr::null_mut(), 0, SHMPROM_EPANIC, {
        claim_plane(&zone(z), pid) as c_int
    })
}

/// Claims a spare owner record for process `pid`, which holds no plane
/// (see cells::claim_spare): spare `s` owns cell `s` past each livesum
/// gauge series' cell on the shared plane. Returns the spare (>= 1), 0 when
/// none is free, or a negative error code.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_spare_claim(z: *mut shmprom_zone, pid: u32) -> c_int {
    if z.is_null() {
        return SHMPROM_EINVAL;
    }
    guard!(std::ptr::null_mut(), 0, SHMPROM_EPANIC, {
        claim_spare(&zone(z), pid) as c_int
    })
}

/// 1 when process `pid` holds spare `spare` (1-based), else 0: a plane
/// claimed since (by any caller in the process) gave the spare back.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_spare_held(z: *const shmprom_zone, spare: u32, pid: u32) -> c_int {
    if z.is_null() {
        return 0;
    }
    guard!(std::ptr::null_mut(), 0, 0, {
        spare_held(&zone(z), spare, pid) as c_int
    })
}

fn define_err(e: DefineError, err: *mut c_char, errlen: usize) -> i64 {
    match e {
        DefineError::Invalid(m) => {
            set_err(err, errlen, &m);
            SHMPROM_EINVAL as i64
        }
        DefineError::Full(m) => {
            set_err(err, errlen, &m);
            SHMPROM_EFULL as i64
        }
    }
}

/// Defines a metric family (or finds the same one). `kind`: 0 counter,
/// 1 gauge, 2 histogram; `mode`: 0 set, 1 livesum (gauges). Returns the
/// family id (>= 0) or a negative error code.
///
/// # Safety
/// Every (pointer, length) pair must describe readable memory; `labels` and
/// `label_lens` hold `nlabels` entries; `buckets` holds `nbuckets` doubles.
#[no_mangle]
pub unsafe extern "C" fn shmprom_family_define(
    z: *mut shmprom_zone,
    name: *const c_char,
    name_len: usize,
    help: *const c_char,
    help_len: usize,
    kind: u32,
    mode: u32,
    nlabels: u32,
    labels: *const *const c_char,
    label_lens: *const usize,
    nbuckets: u32,
    buckets: *const f64,
    err: *mut c_char,
    errlen: usize,
) -> i64 {
    let einval = SHMPROM_EINVAL as i64;
    nonnull!(z, err, errlen, einval, "zone");
    nonnull!(name, err, errlen, einval, "name");
    guard!(err, errlen, SHMPROM_EPANIC as i64, {
        // SAFETY: name holds name_len bytes per the contract.
        let n = unsafe { std::slice::from_raw_parts(name as *const u8, name_len) };
        let help: &[u8] = if help.is_null() || help_len == 0 {
            b""
        } else {
            // SAFETY: help holds help_len bytes per the contract.
            unsafe { std::slice::from_raw_parts(help as *const u8, help_len) }
        };
        // SAFETY: labels/label_lens hold nlabels entries per the contract.
        let Some(ls) = (unsafe { slices(nlabels, labels, label_lens) }) else {
            set_err(err, errlen, "label names are NULL");
            return einval;
        };
        let mut lnames = Vec::with_capacity(ls.len());
        for l in ls {
            match std::str::from_utf8(l) {
                Ok(s) => lnames.push(s),
                Err(_) => {
                    set_err(err, errlen, "label name is not UTF-8");
                    return einval;
                }
            }
        }
        let bs = if nbuckets == 0 {
            Vec::new()
        } else if buckets.is_null() {
            set_err(err, errlen, "buckets is NULL");
            return einval;
        } else {
            // SAFETY: buckets holds nbuckets doubles per the contract.
            unsafe { std::slice::from_raw_parts(buckets, nbuckets as usize) }.to_vec()
        };
        let Ok(n) = std::str::from_utf8(n) else {
            set_err(err, errlen, "metric name is not UTF-8");
            return einval;
        };
        let Some(kind) = Kind::from_u32(kind) else {
            set_err(err, errlen, "unknown metric kind");
            return einval;
        };
        let def = Def {
            name: n,
            help,
            kind,
            mode,
            labels: lnames,
            buckets: bs,
        };
        match registry::define(&zone(z), &def) {
            Ok(id) => id as i64,
            Err(e) => define_err(e, err, errlen),
        }
    })
}

fn series_err(e: SeriesError, err: *mut c_char, errlen: usize) -> i64 {
    let (rc, msg) = match e {
        SeriesError::NoFamily => (SHMPROM_ENOENT, "no such family".to_string()),
        SeriesError::LabelCount { want, got } => (
            SHMPROM_EINVAL,
            format!("expected {want} label values, got {got}"),
        ),
        SeriesError::Table(TableError::Full) => (
            SHMPROM_EFULL,
            "zone full: new series refused (counted in shmprom_series_dropped_total)".into(),
        ),
        SeriesError::Table(TableError::Stuck) => (
            SHMPROM_ESTUCK,
            "series insert left unfinished by a dead process".into(),
        ),
        SeriesError::Table(TableError::KeyTooLong) => (
            SHMPROM_ETOOLONG,
            format!(
                "label values too long (more than {} bytes in all)",
                crate::series::MAX_KEY_BYTES
            ),
        ),
    };
    set_err(err, errlen, &msg);
    rc as i64
}

/// Finds or creates the series of `family` with these label values.
/// Returns its first cell index (>= 0) or a negative error code.
///
/// # Safety
/// `values`/`value_lens` hold `nvalues` entries describing readable bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_series_get(
    z: *mut shmprom_zone,
    family: u32,
    nvalues: u32,
    values: *const *const c_char,
    value_lens: *const usize,
    err: *mut c_char,
    errlen: usize,
) -> i64 {
    let einval = SHMPROM_EINVAL as i64;
    nonnull!(z, err, errlen, einval, "zone");
    guard!(err, errlen, SHMPROM_EPANIC as i64, {
        let mut stack = [&[][..]; STACK_VALUES];
        let mut heap = Vec::new();
        // SAFETY: per the contract above.
        let Some(vs) = (unsafe { slices_in(nvalues, values, value_lens, &mut stack, &mut heap) })
        else {
            set_err(err, errlen, "label values are NULL");
            return einval;
        };
        match registry::series_get(&zone(z), family, vs) {
            Ok(c) => c as i64,
            Err(e) => series_err(e, err, errlen),
        }
    })
}

/// Deletes a series. Returns 1 if it was deleted, 0 if there was none, or a
/// negative error code.
///
/// # Safety
/// As for shmprom_series_get.
#[no_mangle]
pub unsafe extern "C" fn shmprom_series_del(
    z: *mut shmprom_zone,
    family: u32,
    nvalues: u32,
    values: *const *const c_char,
    value_lens: *const usize,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    guard!(err, errlen, SHMPROM_EPANIC, {
        let mut stack = [&[][..]; STACK_VALUES];
        let mut heap = Vec::new();
        // SAFETY: per the contract above.
        let Some(vs) = (unsafe { slices_in(nvalues, values, value_lens, &mut stack, &mut heap) })
        else {
            set_err(err, errlen, "label values are NULL");
            return SHMPROM_EINVAL;
        };
        match registry::series_del(&zone(z), family, vs) {
            Ok(d) => d as c_int,
            Err(e) => series_err(e, err, errlen) as c_int,
        }
    })
}

/// Deletes every series of `family` (an unlabelled one restarts at 0).
///
/// # Safety
/// `z` comes from shmprom_zone_open; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_family_reset(
    z: *mut shmprom_zone,
    family: u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    guard!(err, errlen, SHMPROM_EPANIC, {
        match registry::family_reset(&zone(z), family) {
            Ok(()) => SHMPROM_OK,
            Err(e) => series_err(e, err, errlen) as c_int,
        }
    })
}

fn cell_ok(z: &Zone, plane: u32, cell: u64) -> bool {
    let h = z.header();
    plane < h.planes && cell < h.cells_cap
}

/// Atomically adds `v` to cell `cell` of `plane` (the shared plane 0, or a
/// plane of a writer that cannot do plain stores). Out-of-range is ignored.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_cell_add(z: *mut shmprom_zone, plane: u32, cell: u64, v: f64) {
    if z.is_null() {
        return;
    }
    let zn = zone(z);
    if cell_ok(&zn, plane, cell) {
        f64_add(zn.cell(plane, cell), v);
    }
}

/// Atomically stores `v` into cell `cell` of `plane`.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_cell_set(z: *mut shmprom_zone, plane: u32, cell: u64, v: f64) {
    if z.is_null() {
        return;
    }
    let zn = zone(z);
    if cell_ok(&zn, plane, cell) {
        f64_set(zn.cell(plane, cell), v);
    }
}

/// Reads cell `cell + k` of a series of `family` summed over the planes
/// that count (what /metrics would show for it). NaN on bad arguments.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_cell_get(
    z: *const shmprom_zone,
    family: u32,
    cell: u64,
    k: u32,
) -> f64 {
    if z.is_null() {
        return f64::NAN;
    }
    catch_unwind(|| {
        let zn = zone(z);
        let Some(f) = registry::family(&zn, family) else {
            return f64::NAN;
        };
        // a livesum gauge's further cells are the spares' shares, summed
        // into its value
        let livesum = f.kind == registry::Kind::Gauge && f.mode == registry::MODE_LIVESUM;
        let width = if livesum { 1 } else { f.width };
        if k >= width || !cell_ok(&zn, 0, cell + k as u64) {
            return f64::NAN;
        }
        let live = crate::cells::live_planes(&zn);
        sum_cell(&zn, &f, &live, cell + k as u64)
    })
    .unwrap_or(f64::NAN)
}

/// Counts an error of kind `kind` in shmprom_errors_total (0 bad_value,
/// 1 bad_labels, 2 series_dropped, 3 stuck_insert, 4 internal,
/// 5 key_too_long).
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_error_count(z: *mut shmprom_zone, kind: u32) {
    if !z.is_null() {
        zone(z).count_error(kind as usize);
    }
}

/// Renders the zone: `format` 0 = Prometheus text 0.0.4, 1 = OpenMetrics
/// 1.0. On success `*out`/`*len` hold a buffer to release with
/// shmprom_buf_free.
///
/// # Safety
/// `out` and `len` are writable; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_render(
    z: *mut shmprom_zone,
    format: u32,
    out: *mut *mut u8,
    len: *mut usize,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    nonnull!(out, err, errlen, SHMPROM_EINVAL, "out");
    nonnull!(len, err, errlen, SHMPROM_EINVAL, "len");
    guard!(err, errlen, SHMPROM_EPANIC, {
        let fmt = match format {
            0 => Format::Text,
            1 => Format::OpenMetrics,
            _ => {
                set_err(err, errlen, "unknown format");
                return SHMPROM_EINVAL;
            }
        };
        let buf = render(&zone(z), fmt).into_boxed_slice();
        let n = buf.len();
        let p = Box::into_raw(buf) as *mut u8;
        // SAFETY: out and len are writable per the contract.
        unsafe {
            *out = p;
            *len = n;
        }
        SHMPROM_OK
    })
}

/// Releases a buffer from shmprom_render.
///
/// # Safety
/// `buf`/`len` must come from one shmprom_render call, released once.
#[no_mangle]
pub unsafe extern "C" fn shmprom_buf_free(buf: *mut u8, len: usize) {
    if buf.is_null() {
        return;
    }
    // SAFETY: buf/len are a Box<[u8]> leaked by shmprom_render.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf, len)) });
}

/// Checks the zone's internal consistency. Returns 0, or SHMPROM_EINVAL
/// with what is wrong in `err`.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_check(
    z: *mut shmprom_zone,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    guard!(err, errlen, SHMPROM_EPANIC, {
        match crate::check::check(&zone(z)) {
            Ok(summary) => {
                set_err(err, errlen, &summary);
                SHMPROM_OK
            }
            Err(m) => {
                set_err(err, errlen, &m);
                SHMPROM_EINVAL
            }
        }
    })
}

/// Renders off the calling thread, sharing renders between scrapers: returns
/// 1 with `*out`/`*len`/`*handle` set when a render of `format` that started
/// at or after `not_before_ns` (shmprom_clock_ns time) is ready (release it with
/// shmprom_render_release); 0 while one is running (this call starts one if
/// none is): call again; a negative code on failure. The same as
/// shmprom_render_poll_enc with encoding 0.
///
/// # Safety
/// `out`, `len` and `handle` are writable; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_render_poll(
    z: *mut shmprom_zone,
    format: u32,
    not_before_ns: u64,
    out: *mut *const u8,
    len: *mut usize,
    handle: *mut *const std::ffi::c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: the same contract.
    unsafe { shmprom_render_poll_enc(z, format, 0, not_before_ns, out, len, handle, err, errlen) }
}

/// As shmprom_render_poll, with the body in content coding `encoding`:
/// 0 identity (the text itself), 1 gzip (one gzip member of the text,
/// compressed on the render thread and shared by the scrapers of that
/// render).
///
/// # Safety
/// `out`, `len` and `handle` are writable; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_render_poll_enc(
    z: *mut shmprom_zone,
    format: u32,
    encoding: u32,
    not_before_ns: u64,
    out: *mut *const u8,
    len: *mut usize,
    handle: *mut *const std::ffi::c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    nonnull!(out, err, errlen, SHMPROM_EINVAL, "out");
    nonnull!(len, err, errlen, SHMPROM_EINVAL, "len");
    nonnull!(handle, err, errlen, SHMPROM_EINVAL, "handle");
    guard!(err, errlen, SHMPROM_EPANIC, {
        let fmt = match format {
            0 => Format::Text,
            1 => Format::OpenMetrics,
            _ => {
                set_err(err, errlen, "unknown format");
                return SHMPROM_EINVAL;
            }
        };
        let enc = match encoding {
            0 => shared::Encoding::Identity,
            1 => shared::Encoding::Gzip,
            _ => {
                set_err(err, errlen, "unknown encoding");
                return SHMPROM_EINVAL;
            }
        };
        match shared::poll(zone(z), fmt, not_before_ns, enc) {
            shared::Poll::Ready(r) => {
                let Some(body) = r.body(enc) else {
                    set_err(err, errlen, "render has no body in that encoding");
                    return SHMPROM_EPANIC;
                };
                let (p, n) = (body.as_ptr(), body.len());
                // SAFETY: out, len, handle are writable per the contract; the
                // Arc's count taken by into_raw keeps the body alive until
                // shmprom_render_release.
                unsafe {
                    *out = p;
                    *len = n;
                    *handle = std::sync::Arc::into_raw(r) as *const std::ffi::c_void;
                }
                1
            }
            shared::Poll::Pending => 0,
            shared::Poll::Failed => {
                set_err(err, errlen, "render thread failed");
                SHMPROM_EPANIC
            }
        }
    })
}

/// Sets how many steps (0-19) of nice value the render threads of this
/// process for `z` run below the thread that starts them (default 5; 0:
/// the same priority), so that request traffic wins a busy machine's cores.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_render_set_nice(z: *mut shmprom_zone, nice: i32) {
    if z.is_null() {
        return;
    }
    let _ = catch_unwind(|| shared::set_nice(zone(z), nice));
}

/// Releases a render handed out by shmprom_render_poll.
///
/// # Safety
/// `handle` comes from shmprom_render_poll and is released once.
#[no_mangle]
pub unsafe extern "C" fn shmprom_render_release(handle: *const std::ffi::c_void) {
    if handle.is_null() {
        return;
    }
    // SAFETY: handle is an Arc<Rendered> leaked by shmprom_render_poll.
    drop(unsafe { std::sync::Arc::from_raw(handle as *const shared::Rendered) });
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of shmprom_render_poll.
#[no_mangle]
pub extern "C" fn shmprom_clock_ns() -> u64 {
    shared::clock_ns()
}

/// Deletes the series idle (value unchanged) for `ttl_secs` seconds or more
/// (see the ttl module). Returns how many, or a negative error code.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_sweep(z: *mut shmprom_zone, ttl_secs: u32) -> i64 {
    if z.is_null() {
        return SHMPROM_EINVAL as i64;
    }
    guard!(std::ptr::null_mut(), 0, SHMPROM_EPANIC as i64, {
        crate::ttl::sweep(&zone(z), ttl_secs) as i64
    })
}

/// Sets how many seconds a deleted series' slot, key record and cells wait
/// before a new series may take them (0: the default of 5). Shorter lets a
/// zone absorb faster churn; the wait covers a worker caught between its
/// cache check and its store.
///
/// # Safety
/// `z` comes from shmprom_zone_open.
#[no_mangle]
pub unsafe extern "C" fn shmprom_zone_set_grace(z: *mut shmprom_zone, secs: u32) {
    if !z.is_null() {
        zone(z)
            .header()
            .reuse_grace
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Brings the whole zone into memory now rather than page by page at
/// first use. `how` is SHMPROM_PREFAULT_ALLOCATE (every page made resident,
/// allocated where it never was, and mapped writable here: in the process
/// that creates the zone) or SHMPROM_PREFAULT_MAP (the zone's pages mapped
/// into this process's page tables: in a process that inherited the zone
/// by fork); SHMPROM_PREFAULT_ALLOCATE_TABLE and SHMPROM_PREFAULT_MAP_TABLE
/// do the same for the series table only (records and slots: the part new
/// series touch at random). Safe on a live zone: no value changes. Returns 0 when done by
/// madvise, 1 when done by touching every page (kernels before 5.14), or a
/// negative error code.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_zone_prefault(
    z: *mut shmprom_zone,
    how: u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    nonnull!(z, err, errlen, SHMPROM_EINVAL, "zone");
    let (how, part) = match how {
        SHMPROM_PREFAULT_ALLOCATE => (PrefaultHow::Allocate, PrefaultPart::Zone),
        SHMPROM_PREFAULT_MAP => (PrefaultHow::Map, PrefaultPart::Zone),
        SHMPROM_PREFAULT_ALLOCATE_TABLE => (PrefaultHow::Allocate, PrefaultPart::Table),
        SHMPROM_PREFAULT_MAP_TABLE => (PrefaultHow::Map, PrefaultPart::Table),
        _ => {
            set_err(
                err,
                errlen,
                "prefault: how must be 0 (allocate) or 1 (map), or 2 or 3 (the same, the table only)",
            );
            return SHMPROM_EINVAL;
        }
    };
    guard!(err, errlen, SHMPROM_EPANIC, {
        match zone(z).prefault(how, part) {
            Ok(PrefaultMethod::Madvise) => 0,
            Ok(PrefaultMethod::Touch) => 1,
            Err(m) => {
                set_err(err, errlen, &m);
                SHMPROM_EOS
            }
        }
    })
}

/// Keeps the pages just past two of the zone's allocation frontiers, the
/// cells' in plane `plane` (the caller's own; 0 without one) and the key
/// arena's, in memory and mapped into this process, up to `ahead` bytes
/// past each, so that new series find their cells' and key blocks' pages
/// there instead of taking a page fault each in the request that creates
/// them. For a timer, off the request path. `marks` points at 2 words
/// this process keeps for the zone, zero at first (how far each region is
/// done; per process: a forked child starts again from zero). At most
/// `max_pages` pages are populated per call. Returns the pages populated,
/// or a negative error code.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `marks` points at 2 writable words;
/// `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_zone_populate_ahead(
    z: *mut shmprom_zone,
    plane: u32,
    ahead: u64,
    max_pages: u64,
    marks: *mut u64,
    err: *mut c_char,
    errlen: usize,
) -> i64 {
    nonnull!(z, err, errlen, SHMPROM_EINVAL as i64, "zone");
    nonnull!(marks, err, errlen, SHMPROM_EINVAL as i64, "marks");
    guard!(err, errlen, SHMPROM_EPANIC as i64, {
        // SAFETY: the caller gives 2 writable, aligned words at `marks`.
        let m = unsafe { &mut *(marks as *mut [u64; 2]) };
        match zone(z).populate_ahead(plane, ahead, max_pages, m) {
            Ok(n) => n as i64,
            Err(e) => {
                set_err(err, errlen, &e);
                SHMPROM_EOS as i64
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Polls until ready: (rc, body copy).
    fn poll_enc(z: *mut shmprom_zone, format: u32, enc: u32, nb: u64) -> (c_int, Vec<u8>) {
        let mut out: *const u8 = std::ptr::null();
        let mut len = 0usize;
        let mut handle: *const std::ffi::c_void = std::ptr::null();
        let mut err = [0 as c_char; 128];
        for _ in 0..20_000 {
            // SAFETY: every out-pointer is a live local; err holds 128 bytes.
            let rc = unsafe {
                shmprom_render_poll_enc(
                    z,
                    format,
                    enc,
                    nb,
                    &mut out,
                    &mut len,
                    &mut handle,
                    err.as_mut_ptr(),
                    err.len(),
                )
            };
            if rc != 0 {
                let body = if rc == 1 {
                    // SAFETY: rc 1: out holds len bytes until the release.
                    let b = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
                    // SAFETY: handle came from this poll, released once.
                    unsafe { shmprom_render_release(handle) };
                    b
                } else {
                    Vec::new()
                };
                return (rc, body);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("render did not finish");
    }

    #[test]
    fn render_poll_enc_gzip_and_identity() {
        let name = "ffi-poll-enc-test";
        let mut z: *mut shmprom_zone = std::ptr::null_mut();
        let mut err = [0 as c_char; 128];
        // SAFETY: name holds name.len() bytes; z and err are live locals.
        let rc = unsafe {
            shmprom_zone_open(
                name.as_ptr() as *const c_char,
                name.len(),
                1 << 20,
                2,
                0.0,
                std::ptr::null(),
                &mut z,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        assert_eq!(rc, SHMPROM_OK);
        // SAFETY: z comes from shmprom_zone_open; a null zone is ignored.
        unsafe {
            shmprom_render_set_nice(z, 2);
            shmprom_render_set_nice(std::ptr::null_mut(), 2);
        }
        let nb = shmprom_clock_ns();
        let (rc, plain) = poll_enc(z, 0, 0, nb);
        assert_eq!(rc, 1);
        assert!(plain.starts_with(b"# HELP "));
        let (rc, gz) = poll_enc(z, 0, 1, nb);
        assert_eq!(rc, 1);
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut text)
            .unwrap();
        assert_eq!(text, plain, "the same render, compressed");
        let (rc, om) = poll_enc(z, 1, 1, shmprom_clock_ns());
        assert_eq!(rc, 1);
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&om[..])
            .read_to_end(&mut text)
            .unwrap();
        assert!(text.ends_with(b"# EOF\n"));
        assert_eq!(poll_enc(z, 0, 2, nb).0, SHMPROM_EINVAL, "unknown encoding");
        assert_eq!(poll_enc(z, 2, 0, nb).0, SHMPROM_EINVAL, "unknown format");
    }
}
