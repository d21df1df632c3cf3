//! Value cells: per-writer planes, f64 arithmetic on shared cells, and
//! summing a series' planes for the renderer.
//!
//! Plane 0 is shared: anyone may write it, always with atomic
//! read-modify-write. Planes 1.. belong to one process each (an nginx
//! worker): only the owner writes them, with plain aligned 8-byte stores
//! (from LuaJIT, without a call); readers add the planes up.

use crate::registry::{Family, Kind, MODE_LIVESUM};
use crate::zone::{owner_alive, proc_start_time, Zone};
use std::sync::atomic::{AtomicU64, Ordering};

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
/// writes the shared plane atomically.
pub fn claim_plane(z: &Zone, pid: u32) -> u32 {
    let start = proc_start_time(pid).unwrap_or(0);
    let planes = z.planes();
    for (i, p) in planes.iter().enumerate().skip(1) {
        if p.pid.load(Ordering::Acquire) == pid && p.start.load(Ordering::Acquire) == start {
            return i as u32;
        }
    }
    for (i, p) in planes.iter().enumerate().skip(1) {
        if p.pid.load(Ordering::Acquire) == 0
            && p.pid
                .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            p.start.store(start, Ordering::Release);
            p.claims.fetch_add(1, Ordering::Relaxed);
            return i as u32;
        }
    }
    for (i, p) in planes.iter().enumerate().skip(1) {
        let owner = p.pid.load(Ordering::Acquire);
        let ostart = p.start.load(Ordering::Acquire);
        if owner != 0
            && !owner_alive(owner, ostart)
            && p.pid
                .compare_exchange(owner, pid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            p.start.store(start, Ordering::Release);
            p.claims.fetch_add(1, Ordering::Relaxed);
            zero_live_shares(z, i as u32);
            return i as u32;
        }
    }
    0
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
        .map(|(i, p)| {
            i == 0
                || owner_alive(
                    p.pid.load(Ordering::Acquire),
                    p.start.load(Ordering::Acquire),
                )
        })
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
