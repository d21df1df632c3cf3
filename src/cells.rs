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
/// writes the shared plane atomically (and may hold a spare, see
/// [`claim_spare`]). A process that held a spare until now gets its
/// livesum shares moved from the spare's cells to its plane, and the spare
/// is given back. The protocol is [`crate::planes::claim`].
pub fn claim_plane(z: &Zone, pid: u32) -> u32 {
    let start = proc_start_time(pid).unwrap_or(0);
    let p = planes::claim(z.planes(), pid, start, &Procs, |i| {
        zero_live_shares(z, i as u32)
    });
    if p > 0 {
        for (i, r) in z.spares().iter().enumerate() {
            if planes::holds(r, pid, start) {
                let spare = i as u32 + 1;
                for_each_livesum(z, |cell| {
                    let c = z.cell(0, cell + spare as u64);
                    let v = f64_get(c);
                    if v != 0.0 {
                        // only the spare's owner (this process) writes it
                        f64_add(z.cell(p, cell), v);
                        f64_set(c, 0.0);
                    }
                });
                planes::release(r, pid, start);
            }
        }
    }
    p
}

/// Claims a spare owner record for process `pid`, which holds no plane:
/// spare `s` (1-based) owns cell `s` past each livesum series' cell on the
/// shared plane, written there atomically, counted while `pid` runs. Its
/// own again if it has one, a free one, or a dead owner's (whose shares are
/// zeroed first). Returns 0 when every spare is held: the caller then keeps
/// its livesum share on the series' shared cell itself.
pub fn claim_spare(z: &Zone, pid: u32) -> u32 {
    let start = proc_start_time(pid).unwrap_or(0);
    planes::claim_from(z.spares(), 0, pid, start, &Procs, |i| {
        let spare = i as u64 + 1;
        for_each_livesum(z, |cell| f64_set(z.cell(0, cell + spare), 0.0));
    })
    .map_or(0, |i| i as u32 + 1)
}

/// Whether process `pid` holds spare `spare` (1-based) now: a plane claim
/// by the same process (through another caller in it) gives it back.
pub fn spare_held(z: &Zone, spare: u32, pid: u32) -> bool {
    pid != 0
        && (spare as usize)
            .checked_sub(1)
            .and_then(|i| z.spares().get(i))
            .is_some_and(|r| r.pid.load(Ordering::Acquire) == pid)
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

/// Calls `f(cell)` with the first cell of every livesum gauge series (a
/// scan of the whole table, skipped when no family is a livesum gauge).
fn for_each_livesum(z: &Zone, mut f: impl FnMut(u64)) {
    let fams = crate::registry::live_families(z);
    if !fams
        .iter()
        .any(|x| x.kind == Kind::Gauge && x.mode == MODE_LIVESUM)
    {
        // no livesum family: no need to read the whole slot array
        return;
    }
    let t = z.table();
    for i in 0..t.slots.len() {
        let Some(s) = t.get(i) else { continue };
        if let Some(fam) = fams.iter().find(|x| x.id == s.family) {
            if fam.kind == Kind::Gauge && fam.mode == MODE_LIVESUM {
                f(s.cell as u64);
            }
        }
    }
}

/// Zeroes plane `plane`'s cells of every livesum gauge series: the dead
/// owner's share of "live" values must not come back with the adopter.
fn zero_live_shares(z: &Zone, plane: u32) {
    for_each_livesum(z, |cell| f64_set(z.cell(plane, cell), 0.0));
}

/// Which planes and spares count for livesum gauges at one moment.
pub struct Live {
    /// Per plane (plane 0 always).
    pub planes: Vec<bool>,
    /// Per spare owner record (spare `s` at index `s - 1`).
    pub spares: Vec<bool>,
}

/// Which planes and spares count for livesum gauges at this moment.
pub fn live_planes(z: &Zone) -> Live {
    Live {
        planes: z
            .planes()
            .iter()
            .enumerate()
            .map(|(i, p)| i == 0 || planes::counts(p, &Procs))
            .collect(),
        spares: z
            .spares()
            .iter()
            .map(|p| planes::counts(p, &Procs))
            .collect(),
    }
}

/// Planes held by a live process (plane 0 not counted).
pub fn planes_in_use(live: &Live) -> u64 {
    live.planes.iter().skip(1).filter(|a| **a).count() as u64
}

/// Spares held by a live process.
pub fn spares_in_use(live: &Live) -> u64 {
    live.spares.iter().filter(|a| **a).count() as u64
}

/// Sums cell `idx` over the planes that count for family `f` (for a
/// livesum gauge, `idx` is the series' first cell: the spares' shares
/// follow it on the shared plane).
#[inline]
pub fn sum_cell(z: &Zone, f: &Family<'_>, live: &Live, idx: u64) -> f64 {
    let livesum = f.kind == Kind::Gauge && f.mode == MODE_LIVESUM;
    if f.kind == Kind::Gauge && !livesum {
        return f64_get(z.cell(0, idx));
    }
    let mut s = 0.0;
    for (p, alive) in live.planes.iter().enumerate() {
        if livesum && !alive {
            continue;
        }
        s += f64_get(z.cell(p as u32, idx));
    }
    if livesum {
        for (i, alive) in live.spares.iter().enumerate() {
            if *alive {
                s += f64_get(z.cell(0, idx + 1 + i as u64));
            }
        }
    }
    s
}
