//! The C entry points of the nginx module's `shmprom_inc` and
//! `shmprom_observe` directives: a recorder per zone, opened by
//! `resty.shmprom`'s `new()` in init_by_lua and handed to the module as
//! hooks; the module finds each directive's metric with it while nginx
//! reads its configuration, and records through it in the log phase.

// the C names of include/shmprom.h
#![allow(non_camel_case_types)]

use super::{
    bytes, collect_in, set_err, shmprom_zone, zone, PerZone, SHMPROM_ABI_VERSION, SHMPROM_EFULL,
    SHMPROM_EINVAL, SHMPROM_ENOENT, SHMPROM_EPANIC, SHMPROM_OK, STACK_VALUES,
};
use crate::rules::{RecordError, Rules};
use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Opaque per-process recorder of one zone's directives.
#[repr(C)]
pub struct shmprom_rec {
    _private: [u8; 0],
}

/// A string given or returned by length (not NUL-terminated).
#[repr(C)]
pub struct shmprom_str {
    /// The bytes; may be NULL when `len` is 0.
    pub data: *const c_char,
    /// Bytes at `data`.
    pub len: usize,
}

/// A family as the recorder finds it by name.
#[repr(C)]
pub struct shmprom_rec_family {
    /// Its id in the zone.
    pub id: u32,
    /// 0 counter, 1 gauge, 2 histogram.
    pub kind: u32,
    /// Its label names ([`shmprom_rec_label`] gives each).
    pub nlabels: u32,
}

/// Callback finding a family by name.
pub type shmprom_rec_find_fn = Option<
    unsafe extern "C" fn(
        rec: *mut shmprom_rec,
        name: *const c_char,
        len: usize,
        out: *mut shmprom_rec_family,
    ) -> c_int,
>;
/// Callback giving a family's label name.
pub type shmprom_rec_label_fn = Option<
    unsafe extern "C" fn(
        rec: *mut shmprom_rec,
        family: u32,
        i: u32,
        out: *mut shmprom_str,
    ) -> c_int,
>;
/// Callback recording one value.
pub type shmprom_rec_record_fn = Option<
    unsafe extern "C" fn(
        rec: *mut shmprom_rec,
        family: u32,
        value: f64,
        n: u32,
        values: *const shmprom_str,
    ) -> c_int,
>;

/// What the nginx module calls, and with which state.
#[repr(C)]
pub struct shmprom_rec_hooks {
    /// [`SHMPROM_ABI_VERSION`] of the library the hooks belong to.
    pub abi: u32,
    /// The recorder the functions are called with.
    pub rec: *mut shmprom_rec,
    /// The zone's name, for the module's messages (set by the caller; the
    /// module copies it).
    pub zone: *const c_char,
    /// Bytes at `zone`.
    pub zone_len: usize,
    /// Finds a family ([`shmprom_rec_find`]).
    pub find: shmprom_rec_find_fn,
    /// A family's label name ([`shmprom_rec_label`]).
    pub label: shmprom_rec_label_fn,
    /// Records one value ([`shmprom_rec_record`]).
    pub record: shmprom_rec_record_fn,
}

/// The directive recorders of this process, one per zone.
static RECORDERS: PerZone<Rules> = PerZone::new();

/// Makes (or remakes) this process's directive recorder for zone `z`.
/// Call it where no request is being recorded (init_by_lua): a recorder
/// remade in place must not be in use.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `err` holds `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_rec_open(
    z: *mut shmprom_zone,
    err: *mut c_char,
    errlen: usize,
) -> *mut shmprom_rec {
    if z.is_null() {
        set_err(err, errlen, "shmprom_rec_open: zone is NULL");
        return std::ptr::null_mut();
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        let zn = zone(z);
        RECORDERS.put(zn.as_ptr() as usize, Rules::new(zn)) as *mut shmprom_rec
    }));
    r.unwrap_or_else(|_| {
        set_err(err, errlen, "internal error (panic) in libshmprom");
        std::ptr::null_mut()
    })
}

/// Fills `out` with the hooks the nginx module calls for recorder `rec`
/// (`zone` NULL: the caller sets it).
///
/// # Safety
/// `rec` comes from shmprom_rec_open; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_rec_get_hooks(
    rec: *mut shmprom_rec,
    out: *mut shmprom_rec_hooks,
) -> c_int {
    if rec.is_null() || out.is_null() {
        return SHMPROM_EINVAL;
    }
    // SAFETY: out is writable per the contract.
    unsafe {
        out.write(shmprom_rec_hooks {
            abi: SHMPROM_ABI_VERSION,
            rec,
            zone: std::ptr::null(),
            zone_len: 0,
            find: Some(shmprom_rec_find),
            label: Some(shmprom_rec_label),
            record: Some(shmprom_rec_record),
        })
    };
    SHMPROM_OK
}

/// The recorder behind a handle.
///
/// # Safety
/// `rec` comes from shmprom_rec_open and no other reference to it is live
/// (one thread per process records).
unsafe fn recorder<'a>(rec: *mut shmprom_rec) -> &'a mut Rules {
    // SAFETY: per the contract.
    unsafe { &mut *(rec as *mut Rules) }
}

/// Finds the live family named (`name`, `len`): SHMPROM_OK with `out`
/// filled, SHMPROM_ENOENT when there is none.
///
/// # Safety
/// `rec` comes from shmprom_rec_open; `name` holds `len` bytes; `out` is
/// writable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_rec_find(
    rec: *mut shmprom_rec,
    name: *const c_char,
    len: usize,
    out: *mut shmprom_rec_family,
) -> c_int {
    if rec.is_null() || out.is_null() {
        return SHMPROM_EINVAL;
    }
    // SAFETY: per the contract.
    let (r, name) = unsafe { (recorder(rec), bytes(name, len)) };
    let Some(name) = name else {
        return SHMPROM_EINVAL;
    };
    catch_unwind(AssertUnwindSafe(|| match r.find(name) {
        Some(f) => {
            // SAFETY: out is writable per the contract.
            unsafe {
                out.write(shmprom_rec_family {
                    id: f.id,
                    kind: f.kind as u32,
                    nlabels: f.labels.len() as u32,
                })
            };
            SHMPROM_OK
        }
        None => SHMPROM_ENOENT,
    }))
    .unwrap_or(SHMPROM_EPANIC)
}

/// Label name `i` of family `family`, pointing into the zone (valid while
/// the zone is mapped): SHMPROM_OK, or SHMPROM_ENOENT.
///
/// # Safety
/// `rec` comes from shmprom_rec_open; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_rec_label(
    rec: *mut shmprom_rec,
    family: u32,
    i: u32,
    out: *mut shmprom_str,
) -> c_int {
    if rec.is_null() || out.is_null() {
        return SHMPROM_EINVAL;
    }
    // SAFETY: per the contract.
    let r = unsafe { recorder(rec) };
    catch_unwind(AssertUnwindSafe(|| {
        let Some(f) = crate::registry::family(r.zone(), family) else {
            return SHMPROM_ENOENT;
        };
        let Some(l) = f.labels.get(i as usize) else {
            return SHMPROM_ENOENT;
        };
        // SAFETY: out is writable per the contract; the name lives in the
        // zone's arena, mapped for the life of the process.
        unsafe {
            out.write(shmprom_str {
                data: l.as_ptr() as *const c_char,
                len: l.len(),
            })
        };
        SHMPROM_OK
    }))
    .unwrap_or(SHMPROM_EPANIC)
}

/// Records `value` for the series of `family` with the `n` label values at
/// `values` (in the family's label order): a counter adds it, a histogram
/// observes it. SHMPROM_OK; SHMPROM_EINVAL for a bad value or label count,
/// SHMPROM_ENOENT for no such counter or histogram (or a retired one:
/// redefined by a reload, out of the output; not counted), SHMPROM_EFULL
/// when the series could not be had. Every other failure is counted in the
/// zone's `shmprom_errors_total`.
///
/// # Safety
/// `rec` comes from shmprom_rec_open, called by the thread that runs this
/// process's requests; `values` holds `n` strings, each readable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_rec_record(
    rec: *mut shmprom_rec,
    family: u32,
    value: f64,
    n: u32,
    values: *const shmprom_str,
) -> c_int {
    if rec.is_null() || (n > 0 && values.is_null()) {
        return SHMPROM_EINVAL;
    }
    // SAFETY: per the contract.
    let r = unsafe { recorder(rec) };
    catch_unwind(AssertUnwindSafe(|| {
        let raw: &[shmprom_str] = if n == 0 {
            &[]
        } else {
            // SAFETY: values holds n entries per the contract.
            unsafe { std::slice::from_raw_parts(values, n as usize) }
        };
        let mut stack = [&[][..]; STACK_VALUES];
        let mut heap = Vec::new();
        // SAFETY: each string is readable per the contract.
        let get = |i: usize| unsafe { bytes(raw[i].data, raw[i].len) };
        let Some(vals) = collect_in(raw.len(), get, &mut stack, &mut heap) else {
            return SHMPROM_EINVAL;
        };
        match r.record(family, value, vals) {
            Ok(()) => SHMPROM_OK,
            Err(RecordError::BadValue | RecordError::LabelCount) => SHMPROM_EINVAL,
            Err(RecordError::NoFamily | RecordError::Retired) => SHMPROM_ENOENT,
            Err(RecordError::Series) => SHMPROM_EFULL,
        }
    }))
    .unwrap_or(SHMPROM_EPANIC)
}
