//! Value cells: per-writer planes, f64 arithmetic on shared cells, and
//! summing a series' planes for the renderer.
//!
//! Plane 0 is shared: anyone may write it, always with atomic
//! read-modify-write. Planes 1.. belong to one process each (an nginx
//! worker): only the owner writes them, with plain aligned 8-byte stores
//! (from LuaJIT, without a call); readers add the planes up.

use crate::planes::{self, Liveness, OwnerRec};
use crate::registry::{Family, Kind, MODE_LIVESUM};
use crate::zone::{owner_alive, proc_start_time, PlaneRec, Zone};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Adds `v` to an f64 stored as bits in `cell`, by compare-and-swap.
#[inline]
pub fn f64_add(cell: &AtomicU64, v: f64) {
    let mut cur = cell.load(Ordering::Relaxed);
    loop {
        let new = (f64::from_bits(cur) + v).to_bits();
        match cell.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Stores `v` into an f64 cell.
#[inline]
pub fn f64_set(cell: &AtomicU64, v: f64) {
    cell.store(v.to_bits(), Ordering::Relaxed);
}

/// Reads an f64 cell.
#[inline]
pub fn f64_get(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

/// Claims a plane for process `pid`: its own again if it has one, a free
/// one, or the plane of an owner that has died (adopted with its values:
/// counters are cumulative; its live-gauge shares are zeroed first).
/// Returns 0 when every plane is held by a live process: the caller then
/// writes the shared plane atomically. The protocol is
/// [`crate::planes::claim`].
pub fn claim_plane(z: &Zone, pid: u32) -> u32 {
    let start = proc_start_time(pid).unwrap_or(0);
    planes::claim(z.planes(), pid, start, &Procs, |i| {
        zero_live_shares(z, i as u32)
    })
}

/// Plane owners as the operating system sees them.
struct Procs;

impl Liveness for Procs {
    fn alive(&self, pid: u32, start: u64) -> bool {
        owner_alive(pid, start)
    }
    fn exists(&self, pid: u32) -> bool {
        if pid == 0 || pid > i32::MAX as u32 {
            return false;
        }
        // SAFETY: signal 0 only checks for existence and permission; pid
        // is positive, so no process group is addressed.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
}

impl OwnerRec for PlaneRec {
    fn word(&self) -> &AtomicU32 {
        &self.pid
    }
    fn start(&self) -> &AtomicU64 {
        &self.start
    }
    fn claims(&self) -> &AtomicU64 {
        &self.claims
    }
}

/// Zeroes plane `plane`'s cells of every livesum gauge series: the dead
/// owner's share of "live" values must not come back with the adopter.
fn zero_live_shares(z: &Zone, plane: u32) {
    let t = z.table();
    let fams = crate::registry::live_families(z);
    for i in 0..t.slots.len() {
        let Some(s) = t.get(i) else { continue };
        if let Some(f) = fams.iter().find(|f| f.id == s.family) {
            if f.kind == Kind::Gauge && f.mode == MODE_LIVESUM {
                f64_set(z.cell(plane, s.cell as u64), 0.0);
            }
        }
    }
}

/// Which planes count for livesum gauges at this moment (plane 0 always).
pub fn live_planes(z: &Zone) -> Vec<bool> {
    z.planes()
        .iter()
        .enumerate()
        .map(|(i, p)| i == 0 || planes::counts(p, &Procs))
        .collect()
}

/// Planes held by a live process (plane 0 not counted).
pub fn planes_in_use(z: &Zone) -> u64 {
    live_planes(z).iter().skip(1).filter(|a| **a).count() as u64
}

/// Sums cell `idx + k` over the planes that count for family `f`.
#[inline]
pub fn sum_cell(z: &Zone, f: &Family<'_>, live: &[bool], idx: u64) -> f64 {
    let livesum = f.kind == Kind::Gauge && f.mode == MODE_LIVESUM;
    if f.kind == Kind::Gauge && !livesum {
        return f64_get(z.cell(0, idx));
    }
    let mut s = 0.0;
    for (p, alive) in live.iter().enumerate() {
        if livesum && !alive {
            continue;
        }
        s += f64_get(z.cell(p as u32, idx));
    }
    s
}
