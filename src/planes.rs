//! The plane owner protocol: claiming a per-writer plane, and adopting the
//! plane of an owner that has died.
//!
//! Kept apart from [`crate::cells`] (which applies it to a zone) so that it
//! builds under `--cfg loom`: the owner records are generic over
//! [`OwnerRec`] and the liveness check (kill(2) and /proc in the real build)
//! is the [`Liveness`] trait, so a model can say "owner A is dead".

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// One plane's owner record (see `zone::PlaneRec`).
pub trait OwnerRec {
    /// Owner pid; 0 when never claimed.
    fn word(&self) -> &AtomicU32;
    /// Owner's start time, to tell pid reuse apart.
    fn start(&self) -> &AtomicU64;
    /// How many times the plane was claimed.
    fn claims(&self) -> &AtomicU64;
}

/// Whether a plane's owner is still running.
pub trait Liveness {
    /// Process `pid` started at `start` is running.
    fn alive(&self, pid: u32, start: u64) -> bool;
}

/// Claims a plane of `planes` for process `me` (started at `start`): its
/// own again if it has one, a free one, or the plane of an owner that has
/// died (`on_adopt(i)` runs for an adopted plane `i`). Returns 0 when
/// every plane is held by a live process. Plane 0 is never claimed.
pub fn claim<R: OwnerRec, L: Liveness>(
    planes: &[R],
    me: u32,
    start: u64,
    life: &L,
    mut on_adopt: impl FnMut(usize),
) -> u32 {
    for (i, p) in planes.iter().enumerate().skip(1) {
        if p.word().load(Ordering::Acquire) == me && p.start().load(Ordering::Acquire) == start {
            return i as u32;
        }
    }
    for (i, p) in planes.iter().enumerate().skip(1) {
        if p.word().load(Ordering::Acquire) == 0
            && p.word()
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            p.start().store(start, Ordering::Release);
            p.claims().fetch_add(1, Ordering::Relaxed);
            return i as u32;
        }
    }
    for (i, p) in planes.iter().enumerate().skip(1) {
        let owner = p.word().load(Ordering::Acquire);
        let ostart = p.start().load(Ordering::Acquire);
        if owner != 0
            && !life.alive(owner, ostart)
            && p.word()
                .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            p.start().store(start, Ordering::Release);
            p.claims().fetch_add(1, Ordering::Relaxed);
            on_adopt(i);
            return i as u32;
        }
    }
    0
}

/// Whether plane `p`'s cells count for livesum gauges now: its owner is
/// running.
pub fn counts<R: OwnerRec, L: Liveness>(p: &R, life: &L) -> bool {
    let w = p.word().load(Ordering::Acquire);
    w != 0 && life.alive(w, p.start().load(Ordering::Acquire))
}
