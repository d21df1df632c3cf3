//! The plane owner protocol: claiming a per-writer plane, and adopting the
//! plane of an owner that has died.
//!
//! Kept apart from [`crate::cells`] (which applies it to a zone) so that it
//! builds under `--cfg loom`: the owner records are generic over
//! [`OwnerRec`] and the liveness check (kill(2) and /proc in the real build)
//! is the [`Liveness`] trait, so a model can say "owner A is dead".
//!
//! An owner is a (pid, start time) pair kept in two words, which no reader
//! can load at once. So a claim goes in two steps:
//!
//! 1. compare-and-swap the owner word from what was seen (0, or a dead
//!    owner) to `pid | CLAIMING`: this decides who gets the plane;
//! 2. write the start time, zero an adopted plane's livesum shares, then
//!    store `pid` (Release): the claim is complete.
//!
//! A word with [`CLAIMING`] set is never judged by its start time (which
//! may still be the previous owner's): it is held while its process exists,
//! and its cells do not count for livesum gauges yet. A claimer killed
//! between the two steps leaves a `CLAIMING` word that the next claimer
//! adopts once the process is gone.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Set in an owner word while its claim is being finished. Pids are below
/// 2^22 on Linux, so no complete owner word has it.
pub const CLAIMING: u32 = 1 << 31;

/// One plane's owner record (see `zone::PlaneRec`).
pub trait OwnerRec {
    /// Owner pid, with [`CLAIMING`] while the claim is unfinished; 0 when
    /// never claimed.
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
    /// A process `pid` exists, whatever its start time: for an owner caught
    /// half-way through its claim.
    fn exists(&self, pid: u32) -> bool;
}

/// Claims a plane of `planes` for process `me` (started at `start`): its
/// own again if it has one, a free one, or the plane of an owner that has
/// died (`on_adopt(i)` runs for an adopted plane `i` before the claim is
/// complete, so no reader counts the plane's livesum shares until it has
/// run). Returns 0 when every plane is held by a live process, and for a pid
/// that cannot be an owner (0, or with [`CLAIMING`] set). Plane 0 is never
/// claimed.
pub fn claim<R: OwnerRec, L: Liveness>(
    planes: &[R],
    me: u32,
    start: u64,
    life: &L,
    on_adopt: impl FnMut(usize),
) -> u32 {
    claim_from(planes, 1, me, start, life, on_adopt).map_or(0, |i| i as u32)
}

/// [`claim`] over the records from index `first` on: the index of the
/// record claimed, or None. The zone's spare owner records (which have no
/// shared record 0) are claimed with `first` = 0.
pub fn claim_from<R: OwnerRec, L: Liveness>(
    planes: &[R],
    first: usize,
    me: u32,
    start: u64,
    life: &L,
    mut on_adopt: impl FnMut(usize),
) -> Option<usize> {
    if me == 0 || me & CLAIMING != 0 {
        return None;
    }
    for (i, p) in planes.iter().enumerate().skip(first) {
        if p.word().load(Ordering::Acquire) == me && p.start().load(Ordering::Acquire) == start {
            return Some(i);
        }
    }
    for (i, p) in planes.iter().enumerate().skip(first) {
        if p.word().load(Ordering::Acquire) == 0
            && p.word()
                .compare_exchange(0, me | CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            complete(p, me, start);
            return Some(i);
        }
    }
    for (i, p) in planes.iter().enumerate().skip(first) {
        let w = p.word().load(Ordering::Acquire);
        if w != 0
            && !held(p, w, life)
            && p.word()
                .compare_exchange(w, me | CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            on_adopt(i);
            complete(p, me, start);
            return Some(i);
        }
    }
    None
}

/// Gives up record `p` held by `me` (started at `start`), whose livesum
/// shares the caller has already moved elsewhere and zeroed: it is free
/// again for the next claimer. Returns false (and changes nothing) when
/// `me` does not hold it.
pub fn release<R: OwnerRec>(p: &R, me: u32, start: u64) -> bool {
    if me == 0
        || p.word().load(Ordering::Acquire) != me
        || p.start().load(Ordering::Acquire) != start
    {
        return false;
    }
    // Release: whoever claims the record next (Acquire on the word) sees
    // the zeroed shares.
    p.word()
        .compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed)
        .is_ok()
}

/// Whether `me` (started at `start`) holds record `p` with its claim
/// complete.
pub fn holds<R: OwnerRec>(p: &R, me: u32, start: u64) -> bool {
    me != 0 && p.word().load(Ordering::Acquire) == me && p.start().load(Ordering::Acquire) == start
}

/// Step 2 of a claim: the start time, the count, then the owner word
/// without [`CLAIMING`], released so that whoever loads it (Acquire) sees
/// the start time and an adopted plane's zeroed shares.
fn complete<R: OwnerRec>(p: &R, me: u32, start: u64) {
    p.start().store(start, Ordering::Relaxed);
    p.claims().fetch_add(1, Ordering::Relaxed);
    p.word().store(me, Ordering::Release);
}

/// Whether owner word `w` (loaded from `p`) still holds the plane.
fn held<R: OwnerRec, L: Liveness>(p: &R, w: u32, life: &L) -> bool {
    if w & CLAIMING != 0 {
        life.exists(w & !CLAIMING)
    } else {
        life.alive(w, p.start().load(Ordering::Acquire))
    }
}

/// Whether plane `p`'s cells count for livesum gauges now: its claim is
/// complete and its owner is running.
pub fn counts<R: OwnerRec, L: Liveness>(p: &R, life: &L) -> bool {
    let w = p.word().load(Ordering::Acquire);
    w != 0 && w & CLAIMING == 0 && life.alive(w, p.start().load(Ordering::Acquire))
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
