//! The gateway preset's C entry points: for the nginx module
//! (`nginx-module/`), which records each request from its log phase
//! through the hooks handed to it by `resty.shmprom.gateway`.

// the C names of include/shmprom.h
#![allow(non_camel_case_types)]

use super::{
    bytes, set_err, shmprom_zone, zone, PerZone, SHMPROM_ABI_VERSION, SHMPROM_EINVAL, SHMPROM_OK,
};
use crate::gateway::{Attempt, Gateway, Request};
use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Opaque per-process gateway recorder.
#[repr(C)]
pub struct shmprom_gw {
    _private: [u8; 0],
}

/// One attempt to a storage node (an entry of `$upstream_addr`).
#[repr(C)]
pub struct shmprom_gw_attempt {
    /// The peer's name (not NUL-terminated).
    pub node: *const c_char,
    /// Bytes at `node`.
    pub node_len: usize,
    /// The node's status; 0: none ("-").
    pub status: u32,
    /// 1: nginx tried another node of the same group after this one.
    pub retried: u32,
    /// Seconds; negative: none ("-").
    pub time: f64,
}

/// The facts of one request at its log phase.
#[repr(C)]
pub struct shmprom_gw_request {
    /// The request method (not NUL-terminated).
    pub method: *const c_char,
    /// Bytes at `method`.
    pub method_len: usize,
    /// The Depth request header; NULL when absent.
    pub depth: *const c_char,
    /// Bytes at `depth`.
    pub depth_len: usize,
    /// `$status`.
    pub status: u32,
    /// 1: the response was sent completely (`$request_completion`).
    pub complete: u32,
    /// Seconds (`$request_time`).
    pub duration: f64,
    /// `$request_length`.
    pub received: u64,
    /// `$bytes_sent`.
    pub sent: u64,
    /// `$body_bytes_sent`.
    pub body_sent: u64,
    /// The request body's size; negative: unknown.
    pub content_length: i64,
    /// Entries at `attempts`.
    pub nattempts: u32,
    /// The attempts to storage nodes, in the order nginx made them.
    pub attempts: *const shmprom_gw_attempt,
}

/// Callback of a request entering the gateway or leaving it.
pub type shmprom_gw_fn = Option<unsafe extern "C" fn(gw: *mut shmprom_gw)>;
/// Callback recording one request.
pub type shmprom_gw_record_fn =
    Option<unsafe extern "C" fn(gw: *mut shmprom_gw, r: *const shmprom_gw_request)>;

/// What the nginx module calls, and with which state.
#[repr(C)]
pub struct shmprom_gw_hooks {
    /// [`SHMPROM_ABI_VERSION`] of the library the hooks belong to.
    pub abi: u32,
    /// The recorder the functions are called with.
    pub gw: *mut shmprom_gw,
    /// A request entered the gateway ([`shmprom_gw_begin`]).
    pub begin: shmprom_gw_fn,
    /// A request counted by `begin` left ([`shmprom_gw_end`]).
    pub end: shmprom_gw_fn,
    /// Records one request ([`shmprom_gw_record`]).
    pub record: shmprom_gw_record_fn,
}

/// The gateway recorders of this process, one per zone.
static RECORDERS: PerZone<Gateway> = PerZone::new();

/// Makes (or remakes) this process's recorder for zone `z`, given the ids
/// of the preset's ten families in the order of `gateway::FAMILIES`.
/// Returns NULL with a message in `err` when they are not the preset's.
///
/// Call it where no request is being recorded (init_by_lua): a recorder
/// remade in place must not be in use.
///
/// # Safety
/// `z` comes from shmprom_zone_open; `families` holds `n` ids; `err` holds
/// `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmprom_gw_open(
    z: *mut shmprom_zone,
    families: *const u32,
    n: u32,
    err: *mut c_char,
    errlen: usize,
) -> *mut shmprom_gw {
    if z.is_null() || families.is_null() || n != 10 {
        set_err(
            err,
            errlen,
            "shmprom_gw_open: needs a zone and 10 family ids",
        );
        return std::ptr::null_mut();
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut ids = [0u32; 10];
        // SAFETY: families holds n == 10 ids per the contract.
        ids.copy_from_slice(unsafe { std::slice::from_raw_parts(families, 10) });
        let zn = zone(z);
        let base = zn.as_ptr() as usize;
        let gw = match Gateway::new(zn, ids) {
            Ok(g) => g,
            Err(e) => {
                set_err(err, errlen, &e.0);
                return std::ptr::null_mut();
            }
        };
        RECORDERS.put(base, gw) as *mut shmprom_gw
    }));
    r.unwrap_or_else(|_| {
        set_err(err, errlen, "internal error (panic) in libshmprom");
        std::ptr::null_mut()
    })
}

/// Fills `out` with the hooks the nginx module calls for recorder `gw`.
///
/// # Safety
/// `gw` comes from shmprom_gw_open; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_gw_get_hooks(
    gw: *mut shmprom_gw,
    out: *mut shmprom_gw_hooks,
) -> c_int {
    if gw.is_null() || out.is_null() {
        return SHMPROM_EINVAL;
    }
    // SAFETY: out is writable per the contract.
    unsafe {
        out.write(shmprom_gw_hooks {
            abi: SHMPROM_ABI_VERSION,
            gw,
            begin: Some(shmprom_gw_begin),
            end: Some(shmprom_gw_end),
            record: Some(shmprom_gw_record),
        })
    };
    SHMPROM_OK
}

/// The recorder behind a handle.
///
/// # Safety
/// `gw` comes from shmprom_gw_open and no other reference to it is live
/// (one thread per process records).
unsafe fn recorder<'a>(gw: *mut shmprom_gw) -> &'a mut Gateway {
    // SAFETY: per the contract.
    unsafe { &mut *(gw as *mut Gateway) }
}

/// A request entered the gateway: requests in flight + 1.
///
/// # Safety
/// `gw` comes from shmprom_gw_open; called by the thread that runs this
/// process's requests.
#[no_mangle]
pub unsafe extern "C" fn shmprom_gw_begin(gw: *mut shmprom_gw) {
    if gw.is_null() {
        return;
    }
    // SAFETY: per the contract.
    let g = unsafe { recorder(gw) };
    let _ = catch_unwind(AssertUnwindSafe(|| g.in_flight(1.0)));
}

/// A request counted by shmprom_gw_begin left: requests in flight - 1.
///
/// # Safety
/// As for shmprom_gw_begin.
#[no_mangle]
pub unsafe extern "C" fn shmprom_gw_end(gw: *mut shmprom_gw) {
    if gw.is_null() {
        return;
    }
    // SAFETY: per the contract.
    let g = unsafe { recorder(gw) };
    let _ = catch_unwind(AssertUnwindSafe(|| g.in_flight(-1.0)));
}

/// Attempts of one request taken from C (more are not recorded).
const MAX_ATTEMPTS: usize = 64;
/// Attempts converted on the stack; more take the heap.
const STACK_ATTEMPTS: usize = 4;

/// Records one request (what `gateway.log()` records in Lua). Requests
/// with a NULL method or node are not recorded.
///
/// # Safety
/// As for shmprom_gw_begin; `r` points at a request whose strings and
/// `nattempts` attempts are readable.
#[no_mangle]
pub unsafe extern "C" fn shmprom_gw_record(gw: *mut shmprom_gw, r: *const shmprom_gw_request) {
    if gw.is_null() || r.is_null() {
        return;
    }
    // SAFETY: per the contract.
    let (g, r) = unsafe { (recorder(gw), &*r) };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the request's strings are readable per the contract.
        let Some(method) = (unsafe { bytes(r.method, r.method_len) }) else {
            return;
        };
        let depth = if r.depth.is_null() {
            None
        } else {
            // SAFETY: as above.
            unsafe { bytes(r.depth, r.depth_len) }
        };
        let n = (r.nattempts as usize).min(MAX_ATTEMPTS);
        let raw: &[shmprom_gw_attempt] = if n == 0 || r.attempts.is_null() {
            &[]
        } else {
            // SAFETY: attempts holds nattempts >= n entries per the contract.
            unsafe { std::slice::from_raw_parts(r.attempts, n) }
        };
        // the usual request made one or two attempts: those stay on the
        // stack (a 64-entry array would cost more to fill than the record)
        const EMPTY: Attempt<'static> = Attempt {
            node: &[],
            status: 0,
            time: None,
            retried: false,
        };
        let mut stack = [EMPTY; STACK_ATTEMPTS];
        let mut heap = Vec::new();
        let attempts: &mut [Attempt<'_>] = if raw.len() <= STACK_ATTEMPTS {
            &mut stack[..raw.len()]
        } else {
            heap.resize(raw.len(), EMPTY);
            &mut heap
        };
        for (out, a) in attempts.iter_mut().zip(raw) {
            // SAFETY: the node name is readable per the contract.
            let Some(node) = (unsafe { bytes(a.node, a.node_len) }) else {
                return;
            };
            *out = Attempt {
                node,
                status: a.status,
                time: (a.time >= 0.0).then_some(a.time),
                retried: a.retried != 0,
            };
        }
        g.record(&Request {
            method,
            depth,
            status: r.status,
            complete: r.complete != 0,
            duration: r.duration,
            received: r.received,
            sent: r.sent,
            body_sent: r.body_sent,
            content_length: (r.content_length >= 0).then_some(r.content_length as u64),
            attempts,
        });
    }));
}
