//! A process's writes into the zone from Rust, for the nginx module's
//! recorders ([`crate::gateway::Gateway`], [`crate::rules::Rules`]): plain
//! stores on the plane this process claims, atomic adds on the shared plane
//! while it has none. The Lua wrapper does the same from LuaJIT; a process
//! claiming again gets the plane it already holds, so the wrapper and a
//! recorder in one worker write one plane (from one thread: the worker's
//! event loop).

use crate::cells::{claim_plane, f64_add};
use crate::zone::Zone;
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`PlaneWriter::claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This process has a plane (from before, or from this call).
    Held,
    /// Tried, and every plane is held by another live process.
    Refused,
    /// Not tried: the last attempt was less than a second ago.
    NotYet,
}

/// This process's plane, as a recorder sees it.
pub struct PlaneWriter {
    /// Cell 0 of this process's plane (null while it has none).
    own: *mut u64,
    /// Cells per plane (an index below it is inside every plane).
    cells_cap: u64,
    plane: u32,
    /// When to try claiming a plane again (seconds of the zone clock).
    next_claim: u32,
}

impl PlaneWriter {
    /// No plane yet: the first [`claim`](Self::claim) tries at once.
    pub fn new(zone: &Zone) -> PlaneWriter {
        PlaneWriter {
            own: std::ptr::null_mut(),
            cells_cap: zone.header().cells_cap,
            plane: 0,
            next_claim: 0,
        }
    }

    /// This process's plane (0: none, it writes the shared plane).
    pub fn plane(&self) -> u32 {
        self.plane
    }

    /// Whether this process writes a plane of its own.
    pub fn has_plane(&self) -> bool {
        !self.own.is_null()
    }

    /// Lets the next [`claim`](Self::claim) try at once.
    pub fn retry_now(&mut self) {
        self.next_claim = 0;
    }

    /// Claims a plane for this process when it has none, at most once a
    /// second (a claim reads /proc). A process that held a spare gets its
    /// livesum shares moved to the plane and the spare given back (see
    /// [`claim_plane`]).
    pub fn claim(&mut self, zone: &Zone) -> Claim {
        if self.plane > 0 {
            return Claim::Held;
        }
        let now = crate::zone::now_secs();
        if now < self.next_claim {
            return Claim::NotYet;
        }
        self.next_claim = now.saturating_add(1);
        self.plane = claim_plane(zone, pid());
        if self.plane == 0 {
            return Claim::Refused;
        }
        self.own = zone.cell_ptr(self.plane, 0);
        Claim::Held
    }

    /// Adds to a cell of this process's plane (plain load and store: only
    /// this process writes its plane) or of the shared plane (atomic).
    #[inline]
    pub fn add(&self, zone: &Zone, idx: u64, v: f64) {
        if !self.own.is_null() {
            self.add_own(idx, v);
        } else if idx < self.cells_cap {
            f64_add(zone.cell(0, idx), v);
        }
    }

    /// Adds to a cell of this process's plane; nothing without one.
    #[inline]
    pub fn add_own(&self, idx: u64, v: f64) {
        if idx >= self.cells_cap || self.own.is_null() {
            return;
        }
        // SAFETY: own is cell 0 of this process's plane and idx < cells_cap
        // keeps the cell inside it; cells are 8-aligned; AtomicU64 has the
        // layout of u64, and only this process writes its plane (readers
        // load whole 8-byte values).
        let c = unsafe { &*(self.own.add(idx as usize) as *const AtomicU64) };
        let cur = f64::from_bits(c.load(Ordering::Relaxed));
        c.store((cur + v).to_bits(), Ordering::Relaxed);
    }

    /// Counts `v` in the histogram series at `idx` with finite `bounds`:
    /// the first bucket whose bound is >= v (or +Inf), and the sum.
    #[inline]
    pub fn observe(&self, zone: &Zone, idx: u64, bounds: &[f64], v: f64) {
        self.add(zone, idx + bucket(bounds, v), 1.0);
        self.add(zone, idx + bounds.len() as u64 + 1, v);
    }
}

/// The 0-based bucket of `v` among finite `bounds`: the first bound >= v,
/// or `bounds.len()` (+Inf).
#[inline]
pub fn bucket(bounds: &[f64], v: f64) -> u64 {
    bounds.partition_point(|&b| b < v) as u64
}

/// This process's id.
pub fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_the_first_bound_at_or_above() {
        let b = [1.0, 2.0, 5.0];
        assert_eq!(bucket(&b, 0.5), 0);
        assert_eq!(bucket(&b, 1.0), 0);
        assert_eq!(bucket(&b, 1.5), 1);
        assert_eq!(bucket(&b, 5.0), 2);
        assert_eq!(bucket(&b, 6.0), 3);
        assert_eq!(bucket(&[], 6.0), 0);
    }
}
