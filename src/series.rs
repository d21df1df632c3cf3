//! The lock-free label-set table: open addressing over fixed slots in the
//! zone, key records in chains of fixed-size blocks, value cells allocated
//! per series and reused after the series is deleted.
//!
//! Every key record is a chain of 24-byte blocks taken from one pool, so a
//! block given back by any series can serve any other, whatever the length
//! of their keys: the pool cannot fragment. Cells are given back per width
//! (a counter's 1, a histogram's buckets + 2) on free lists of their own.
//!
//! A slot moves EMPTY -> CLAIMED -> TENTATIVE -> READY, and READY -> DEAD
//! when the series is deleted. A new series goes into the first reusable
//! DEAD slot of its chain, or else the EMPTY slot that ends it; it keeps
//! the dead series' key blocks and cells when they fit. When the zone runs
//! out of room, `clean` turns dead slots that no live chain passes through
//! back to EMPTY (marking them CLEANING while it checks), and gives the
//! key blocks and cells of every reusable dead slot back to the pools.
//!
//! Because two processes inserting the same key may pick different slots
//! (one a DEAD slot, one the EMPTY end), a new series is published
//! TENTATIVE first (sequentially consistent), then the chain is scanned
//! again: of two tentative copies of one key at least one sees the other;
//! the later one in probe order gives way, the earlier one waits for the
//! later to settle, and a copy that finds the key READY gives way. Waits go
//! only from earlier to later slots, so they cannot form a cycle. Lookups
//! wait out CLAIMED and TENTATIVE slots of their hash.
//!
//! Deleted slots are reused only a grace period after the delete:
//! workers drop cached cell indexes when the zone epoch moves, and the
//! grace covers a worker caught between its epoch check and its store.

use crate::sync::{fence, spin_hint, AtomicU32, AtomicU64, Ordering};

const STATE_SHIFT: u32 = 61;
const HASH_MASK: u64 = (1 << STATE_SHIFT) - 1;
const EMPTY: u64 = 0;
const CLAIMED: u64 = 1;
const TENTATIVE: u64 = 2;
const READY: u64 = 3;
const DEAD: u64 = 4;
/// A dead slot being checked for return to EMPTY (see [`Table::clean`]).
const CLEANING: u64 = 5;

/// Slot field value: no key record / no cells attached.
const NONE: u32 = u32::MAX;
/// Record tag bit: the record's series is dead; low bits: when (seconds).
const DEAD_TAG: u32 = 0x8000_0000;
/// Key record header: tag (family or DEAD_TAG|secs), len|cap, width.
/// Bytes of one key block.
pub const BLOCK: u64 = 24;
/// Key bytes in a record's first block (after next, tag and meta words).
const FIRST_KEY: usize = 12;
/// Key bytes in each further block (after the next word).
const MORE_KEY: usize = 20;
/// Free-list heads for cells, one per width in use.
pub const CELL_LISTS: usize = 16;

/// Seconds a deleted series' slot, key record and cells wait before reuse.
/// The default of [`Table::grace`].
pub const REUSE_GRACE_SECS: u32 = 5;

/// How long a lookup waits for another process to finish an insert of the
/// same key before giving up (the other process may have died mid-insert).
const CLAIM_SPIN_LIMIT: u32 = 1 << 20;

/// Longest encoded label-value key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 16 * 1024;

fn state(w: u64) -> u64 {
    w >> STATE_SHIFT
}

/// One slot of the table: 16 bytes.
#[repr(C)]
pub struct Slot {
    /// state (3 high bits) | 61 bits of the key hash; 0 is EMPTY.
    pub word: AtomicU64,
    /// 1 + byte offset of the key record in the key arena (0: no record).
    pub key: AtomicU32,
    /// 1 + index of the series' first cell, the same in every plane (0: none).
    pub cell: AtomicU32,
}

impl Slot {
    /// The key record's offset (fields hold value + 1; 0 means none, which
    /// is what fresh zero-filled memory says).
    fn rec_off(&self) -> u32 {
        self.key.load(Ordering::Relaxed).wrapping_sub(1)
    }
    fn set_rec_off(&self, off: u32) {
        self.key.store(off + 1, Ordering::Relaxed)
    }
    /// The first cell's index, or NONE.
    fn cell_idx(&self) -> u32 {
        self.cell.load(Ordering::Relaxed).wrapping_sub(1)
    }
    fn set_cell_idx(&self, c: u32) {
        self.cell.store(c + 1, Ordering::Relaxed)
    }
}

/// Why an insert or lookup did not give a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// No slot, key room or cell room left: the new series is refused.
    Full,
    /// Another process claimed this key and never finished (it died).
    Stuck,
    /// The key is longer than [`MAX_KEY_BYTES`].
    KeyTooLong,
}

/// A bump allocator over a byte region shared by every process.
pub struct Arena<'a> {
    pub base: *mut u8,
    pub cap: u64,
    pub used: &'a AtomicU64,
}

// SAFETY: the arena is shared memory meant for several processes (or
// threads): regions are handed out by an atomic bump, written by their one
// owner before a release store publishes them, and read after an acquire.
unsafe impl Send for Arena<'_> {}
// SAFETY: as above.
unsafe impl Sync for Arena<'_> {}

impl Arena<'_> {
    /// Reserves `len` bytes aligned to `align` (a power of two); returns the
    /// offset, or None when the arena cannot hold them.
    pub fn alloc(&self, len: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two());
        self.alloc_at_multiple(len, align)
    }

    /// Reserves `len` bytes at an offset that is a multiple of `unit` (any
    /// unit: key blocks are 24 bytes and sit at multiples of 24, whatever
    /// else the arena holds, such as family strings).
    pub fn alloc_at_multiple(&self, len: u64, unit: u64) -> Option<u64> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let start = cur.div_ceil(unit) * unit;
            let end = start.checked_add(len)?;
            if end > self.cap {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(start),
                Err(now) => cur = now,
            }
        }
    }

    /// Pointer to `off` inside the arena.
    ///
    /// # Safety
    /// `off` must be below `cap`.
    pub unsafe fn at(&self, off: u64) -> *mut u8 {
        // SAFETY: the caller keeps `off` inside the region of `cap` bytes.
        unsafe { self.base.add(off as usize) }
    }
}

/// The value cells behind the table.
pub trait CellStore {
    /// Sets `width` cells from `cell` to zero in every plane.
    fn zero(&self, cell: u32, width: u32);
    /// A word that links free runs of cells: the shared plane's cell
    /// `cell`, unused while the run is free. Always the std atomic (under
    /// loom too): it lives in the zone's plain memory.
    fn link(&self, cell: u32) -> &std::sync::atomic::AtomicU64;
}

/// Heads of the free lists: key blocks, and cells per width.
pub struct FreeLists<'a> {
    /// Free key blocks: (tag << 32) | (block + 1), 0 for empty; the tag
    /// keeps a pop from mistaking a recycled head (ABA).
    pub blocks: &'a AtomicU64,
    /// Free cell runs, one list per width, heads as for `blocks`.
    pub cells: &'a [AtomicU64],
    /// The width each cell list holds (0: not yet taken).
    pub widths: &'a [AtomicU32],
}

/// What a [`Table::clean`] gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Freed {
    /// Dead slots returned to EMPTY (room for new label sets).
    pub slots: u64,
    /// Key records and cells of dead series returned to the pools (room
    /// for their keys and values).
    pub records: u64,
}

/// A view of the table inside a zone (or, in tests, inside heap memory).
pub struct Table<'a> {
    pub slots: &'a [Slot],
    pub keys: Arena<'a>,
    /// Cells handed out so far (in cells of 8 bytes, per plane).
    pub cells_used: &'a AtomicU64,
    pub cells_cap: u64,
    /// Slots that ever left EMPTY.
    pub slots_used: &'a AtomicU64,
    /// Series whose slot was reused (a self-metric).
    pub reused: &'a AtomicU64,
    pub cells: &'a (dyn CellStore + Sync),
    /// Seconds a deleted series waits before its slot is reused
    /// ([`REUSE_GRACE_SECS`] unless the zone says otherwise).
    pub grace: u32,
    /// Key blocks and cells given back for reuse.
    pub free: FreeLists<'a>,
    /// The last clean that found nothing: (seconds << 1) | 1. A refused
    /// insert in that same second does not scan the table again, so a
    /// full zone costs each refused series a probe, not a scan of every
    /// slot. None: every refused insert cleans (tests).
    pub clean_gate: Option<&'a AtomicU64>,
}

/// Blocks a key record of `len` bytes takes.
pub fn blocks_for(len: usize) -> u32 {
    if len <= FIRST_KEY {
        1
    } else {
        1 + (len - FIRST_KEY).div_ceil(MORE_KEY) as u32
    }
}

/// A live series found while iterating the table. Its key bytes are read
/// with [`Table::read_key`].
#[derive(Clone, Copy, Debug)]
pub struct SeriesRef {
    pub slot: usize,
    pub family: u32,
    pub cell: u32,
    /// First block of the key record.
    rec: u32,
    /// Key length in bytes.
    len: u32,
}

/// Hashes a family id and encoded key (64-bit multiply-xorshift mix).
pub fn hash_key(family: u32, key: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = (family as u64 ^ key.len() as u64).wrapping_mul(K);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(29);
    }
    // fmix64
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A key record's fixed part.
struct Rec {
    tag: u32,
    len: u32,
    width: u32,
}

/// The home slot of a 61-bit hash in a table of `n` slots: the hash
/// scaled to 0..n (multiply, then keep the high bits), so any `n` works,
/// power of two or not, and the home comes from the hash's high bits.
/// Uniform: each slot is the home of floor or ceil of 2^61 / n hashes.
fn home_slot(h: u64, n: usize) -> usize {
    debug_assert!(h <= HASH_MASK);
    ((h as u128 * n as u128) >> STATE_SHIFT) as usize
}

impl<'a> Table<'a> {
    /// The home slot of hash `h` (already masked with HASH_MASK).
    fn home(&self, h: u64) -> usize {
        home_slot(h, self.slots.len())
    }

    /// The slot probed after slot `i`: the next one, wrapping at the end.
    fn after(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// Probes from slot `from` forward to slot `to`, wrapping at the end:
    /// (to - from) mod n, in 0..n.
    fn dist(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.slots.len() - from
        }
    }

    /// Most slots that may leave EMPTY: 15/16 of the table. New series
    /// prefer reusable dead slots, so under churn the table fills with dead
    /// slots that new chains meet rather than with fresh ones.
    pub fn slot_limit(&self) -> u64 {
        self.slots.len() as u64 * 15 / 16
    }

    /// Blocks in the key pool.
    fn nblocks(&self) -> u32 {
        (self.keys.cap / BLOCK).min((NONE - 1) as u64) as u32
    }

    /// Pointer to block `b`.
    ///
    /// # Safety
    /// `b` must be below `nblocks()`.
    unsafe fn block(&self, b: u32) -> *mut u8 {
        // SAFETY: b < nblocks keeps the block inside the arena.
        unsafe { self.keys.at(b as u64 * BLOCK) }
    }

    /// A block's first word: 1 + the next block of its chain (0: the
    /// end), or of its free list while it is free. Always the std atomic,
    /// even under loom: it lives in the arena's plain memory.
    fn next(&self, b: u32) -> &std::sync::atomic::AtomicU32 {
        debug_assert!(b < self.nblocks());
        // SAFETY: b < nblocks (every caller checks or got b from the
        // pool); blocks are 8-aligned and their first word is only
        // accessed atomically.
        unsafe { &*(self.block(b) as *const std::sync::atomic::AtomicU32) }
    }

    /// The record's tag word (family id, or DEAD_TAG | seconds).
    fn tag(&self, b: u32) -> &std::sync::atomic::AtomicU32 {
        debug_assert!(b < self.nblocks());
        // SAFETY: as for `next`; the second word of a first block is only
        // accessed atomically.
        unsafe { &*(self.block(b).add(4) as *const std::sync::atomic::AtomicU32) }
    }

    /// Reads the fixed part of the record starting at block `b`.
    ///
    /// # Safety
    /// `b` must come from a slot whose state (not EMPTY or CLAIMED) was
    /// loaded with acquire ordering: the record is then written.
    unsafe fn rec(&self, b: u32) -> Rec {
        // SAFETY: per the contract, b is a first block inside the pool,
        // written before the slot's publishing store.
        let meta = unsafe { (self.block(b).add(8) as *const u32).read() };
        Rec {
            tag: self.tag(b).load(Ordering::Acquire),
            len: meta & 0xffff,
            width: meta >> 16,
        }
    }

    /// Calls `f` with each piece of the key of `len` bytes whose record
    /// starts at block `b`, in order, until it returns false. Returns false
    /// if the chain ended early or left the pool (a record torn by reuse).
    ///
    /// # Safety
    /// As for `rec`.
    unsafe fn walk_key(&self, b: u32, len: u32, mut f: impl FnMut(&[u8]) -> bool) -> bool {
        let n = self.nblocks();
        let mut left = len as usize;
        let mut cur = b;
        let mut first = true;
        loop {
            if cur >= n {
                return false;
            }
            let (skip, room) = if first {
                (12, FIRST_KEY)
            } else {
                (4, MORE_KEY)
            };
            let take = left.min(room);
            // SAFETY: cur < nblocks; the piece lies inside the block.
            let piece =
                unsafe { std::slice::from_raw_parts(self.block(cur).add(skip) as *const u8, take) };
            if !f(piece) {
                return true;
            }
            left -= take;
            if left == 0 {
                return true;
            }
            cur = self
                .next(cur)
                .load(std::sync::atomic::Ordering::Acquire)
                .wrapping_sub(1);
            first = false;
        }
    }

    /// Appends the key bytes of a live series to `out` (cleared first).
    /// False if the record changed under the reader (the series was
    /// deleted and its room reused meanwhile): skip it.
    pub fn read_key(&self, s: &SeriesRef, out: &mut Vec<u8>) -> bool {
        out.clear();
        // SAFETY: `s` came from `get`, which loaded READY with acquire.
        let whole = unsafe {
            self.walk_key(s.rec, s.len, |p| {
                out.extend_from_slice(p);
                true
            })
        };
        whole && out.len() == s.len as usize && self.tag(s.rec).load(Ordering::Acquire) == s.family
    }

    /// Whether slot's published record is (family, key).
    fn key_eq(&self, slot: &Slot, family: u32, key: &[u8]) -> bool {
        let b = slot.rec_off();
        if b == NONE || b >= self.nblocks() {
            return false;
        }
        // SAFETY: the caller loaded a TENTATIVE or READY state with acquire.
        let r = unsafe { self.rec(b) };
        if r.tag != family || r.len as usize != key.len() {
            return false;
        }
        let mut at = 0;
        let mut same = true;
        // SAFETY: as above.
        let whole = unsafe {
            self.walk_key(b, r.len, |p| {
                same = key[at..at + p.len()] == *p;
                at += p.len();
                same
            })
        };
        whole && same && at == key.len()
    }

    /// Waits while a slot is CLAIMED (or TENTATIVE too), returning the
    /// word it settled to.
    fn settle(&self, slot: &Slot, mut w: u64, tentative_too: bool) -> Result<u64, TableError> {
        let mut spins = 0u32;
        while state(w) == CLAIMED
            || state(w) == CLEANING
            || (tentative_too && state(w) == TENTATIVE)
        {
            spins += 1;
            if spins > CLAIM_SPIN_LIMIT {
                if state(w) == CLEANING {
                    // the cleaner died: dead again is always safe
                    let dead = (DEAD << STATE_SHIFT) | (w & HASH_MASK);
                    let _ = slot
                        .word
                        .compare_exchange(w, dead, Ordering::SeqCst, Ordering::SeqCst);
                    w = slot.word.load(Ordering::SeqCst);
                    continue;
                }
                return Err(TableError::Stuck);
            }
            spin_hint();
            w = slot.word.load(Ordering::SeqCst);
        }
        Ok(w)
    }

    /// Loads a slot's word, waiting out a cleaning (which may end the chain).
    fn load_settled(&self, slot: &Slot) -> Result<u64, TableError> {
        let w = slot.word.load(Ordering::SeqCst);
        if state(w) == CLEANING {
            return self.settle(slot, w, false);
        }
        Ok(w)
    }

    /// Returns dead slots to EMPTY where no live chain passes through them,
    /// so the table does not fill with dead slots under churn, and gives
    /// every reusable dead slot's key blocks and cells back to the pools
    /// (a full key pool or cell arena gets room from them). Returns how
    /// many slots and records were freed.
    ///
    /// A slot k is marked CLEANING, then the cluster after it is scanned
    /// (sequentially consistent): a live, tentative or claimed slot whose
    /// probe chain passes k keeps k dead. An insert that claimed a slot
    /// past k after the scan went by sees k CLEANING or EMPTY in its own
    /// re-scan and gives way.
    pub fn clean(&self, now: u32) -> Freed {
        let mut freed = Freed::default();
        for k in 0..self.slots.len() {
            let slot = &self.slots[k];
            let w = slot.word.load(Ordering::SeqCst);
            if state(w) != DEAD || !self.reusable(slot, now) {
                continue;
            }
            let cleaning = (CLEANING << STATE_SHIFT) | (w & HASH_MASK);
            if slot
                .word
                .compare_exchange(w, cleaning, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            fence(Ordering::SeqCst);
            let mut free = true;
            let mut j = self.after(k);
            for _ in 1..self.slots.len() {
                let wj = self.slots[j].word.load(Ordering::SeqCst);
                if wj == EMPTY {
                    break;
                }
                let st = state(wj);
                if st != DEAD && st != CLEANING {
                    // j's chain runs from its home to j: does it pass k?
                    let home = self.home(wj & HASH_MASK);
                    if self.dist(home, j) >= self.dist(k, j) {
                        free = false;
                        break;
                    }
                }
                j = self.after(j);
            }
            // the slot is ours while CLEANING: its record and cells go
            // back to the pools either way (the grace period is over)
            if self.detach(slot) {
                freed.records += 1;
            }
            let to = if free { EMPTY } else { w };
            if slot
                .word
                .compare_exchange(cleaning, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
                && free
            {
                self.slots_used.fetch_sub(1, Ordering::Relaxed);
                freed.slots += 1;
            }
        }
        freed
    }

    /// Whether a DEAD slot may take a new series at time `now` (seconds).
    fn reusable(&self, slot: &Slot, now: u32) -> bool {
        let off = slot.rec_off();
        if off == NONE || off >= self.nblocks() {
            return true;
        }
        let tag = self.tag(off).load(Ordering::Acquire);
        if tag & DEAD_TAG == 0 {
            return false; // killed, not yet stamped
        }
        let t = tag & !DEAD_TAG;
        t == 0 || now.wrapping_sub(t) & !DEAD_TAG >= self.grace
    }

    /// Finds the READY slot for (family, key), if any.
    pub fn find(&self, family: u32, key: &[u8]) -> Result<Option<usize>, TableError> {
        let h = hash_key(family, key) & HASH_MASK;
        let mut i = self.home(h);
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            let mut w = self.load_settled(slot)?;
            if w == EMPTY {
                return Ok(None);
            }
            if w & HASH_MASK == h {
                w = self.settle(slot, w, true)?;
                if state(w) == READY && self.key_eq(slot, family, key) {
                    return Ok(Some(i));
                }
            }
            i = self.after(i);
        }
        Ok(None)
    }

    /// Returns the cell index of (family, key), inserting the series with
    /// `width` zeroed cells if it is not there. The bool is true when this
    /// call created it. `now` is the time in seconds (for slot reuse).
    pub fn get_or_insert(
        &self,
        family: u32,
        key: &[u8],
        width: u32,
        now: u32,
    ) -> Result<(u32, bool), TableError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(TableError::KeyTooLong);
        }
        let h = hash_key(family, key) & HASH_MASK;
        let mut cleaned = false;
        for _ in 0..64 {
            let mut no_room = false;
            match self.try_insert(family, key, width, now, h, &mut no_room) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(TableError::Full) if !cleaned => {
                    // try once more after a clean, even if this one freed
                    // nothing (or was skipped): another process's clean may
                    // have filled the pools since our attempt
                    cleaned = true;
                    let idle = ((now as u64) << 1) | 1;
                    match self.clean_gate {
                        Some(g) if g.load(Ordering::Relaxed) == idle => {}
                        Some(g) => {
                            let freed = self.clean(now);
                            // only what was missing counts: emptied slots
                            // give no room for keys and cells (a refused
                            // fill leaves its slot dead, and the next
                            // clean empties it: without this, every
                            // refusal of a zone whose arenas are full
                            // scanned the whole table)
                            let helped = if no_room {
                                freed.records > 0
                            } else {
                                freed.slots + freed.records > 0
                            };
                            g.store(if helped { 0 } else { idle }, Ordering::Relaxed);
                        }
                        None => {
                            self.clean(now);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(TableError::Stuck)
    }

    /// One attempt; None when a race was lost and the caller should retry.
    /// A refusal for want of key or cell room (not of slots) sets
    /// `no_room`.
    fn try_insert(
        &self,
        family: u32,
        key: &[u8],
        width: u32,
        now: u32,
        h: u64,
        no_room: &mut bool,
    ) -> Result<Option<(u32, bool)>, TableError> {
        let home = self.home(h);
        let mut reuse: Option<(usize, u64)> = None;
        let mut end = None;
        let mut i = home;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            let mut w = self.load_settled(slot)?;
            if w == EMPTY {
                end = Some(i);
                break;
            }
            if state(w) == DEAD {
                if reuse.is_none() && self.reusable(slot, now) {
                    reuse = Some((i, w));
                }
            } else if w & HASH_MASK == h {
                w = self.settle(slot, w, true)?;
                if state(w) == READY && self.key_eq(slot, family, key) {
                    return Ok(Some((slot.cell_idx(), false)));
                }
            }
            i = self.after(i);
        }
        let (target, expect) = match (reuse, end) {
            (Some(r), _) => r,
            (None, Some(e)) => {
                if self.slots_used.load(Ordering::Relaxed) >= self.slot_limit() {
                    return Err(TableError::Full);
                }
                // no slot is taken for a series the arenas cannot hold
                if !self.may_have_room(key.len(), width) {
                    *no_room = true;
                    return Err(TableError::Full);
                }
                (e, EMPTY)
            }
            (None, None) => return Err(TableError::Full),
        };
        let slot = &self.slots[target];
        let claimed = (CLAIMED << STATE_SHIFT) | h;
        if slot
            .word
            .compare_exchange(expect, claimed, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(None);
        }
        if expect == EMPTY {
            self.slots_used.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        let cell = match self.fill(slot, family, key, width) {
            Some(c) => c,
            None => {
                slot.word
                    .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
                *no_room = true;
                return Err(TableError::Full);
            }
        };
        slot.word
            .store((TENTATIVE << STATE_SHIFT) | h, Ordering::SeqCst);
        // store-load ordering against a competitor's (or a cleaner's) store
        // and scan: at least one of two sides sees the other
        fence(Ordering::SeqCst);
        // Look for another copy of this key published meanwhile.
        let my_pos = self.dist(home, target);
        let mut j = home;
        let mut passed = false;
        for _ in 0..self.slots.len() {
            if j == target {
                passed = true;
            } else {
                let sj = &self.slots[j];
                let mut wj = self.load_settled(sj)?;
                if wj == EMPTY {
                    if !passed {
                        // a cleaner emptied a slot of our chain before our
                        // slot: nobody could find us; start again
                        self.give_way(slot, h);
                        return Ok(None);
                    }
                    break;
                }
                if wj & HASH_MASK == h {
                    wj = self.settle(sj, wj, false)?;
                    let st = state(wj);
                    if (st == TENTATIVE || st == READY) && self.key_eq(sj, family, key) {
                        let pos = self.dist(home, j);
                        if st == TENTATIVE && pos > my_pos {
                            // the later copy gives way or wins: wait for it
                            wj = self.settle(sj, wj, true)?;
                        }
                        if state(wj) == READY || (state(wj) == TENTATIVE && pos < my_pos) {
                            self.give_way(slot, h);
                            if state(wj) == READY {
                                return Ok(Some((sj.cell_idx(), false)));
                            }
                            return Ok(None);
                        }
                    }
                }
            }
            j = self.after(j);
        }
        slot.word
            .store((READY << STATE_SHIFT) | h, Ordering::Release);
        Ok(Some((cell, true)))
    }

    /// Whether a new series of `width` cells and a key of `key_len` bytes
    /// may find room: a block in the pool or room for all its blocks in
    /// the key arena, and a run of `width` cells given back or room in the
    /// cell arena. A racy look, never false while the room is there (a
    /// pool holding a block counts as room, however many the key needs):
    /// an insert that passes it may still find too little, and then leaves
    /// its slot dead, as a lost race for the room does.
    fn may_have_room(&self, key_len: usize, width: u32) -> bool {
        let pool = (self.free.blocks.load(Ordering::Acquire) as u32).wrapping_sub(1);
        let blocks = (pool != NONE && pool < self.nblocks()) || {
            let cur = self.keys.used.load(Ordering::Relaxed);
            let need = blocks_for(key_len) as u64 * BLOCK;
            cur.div_ceil(BLOCK) * BLOCK + need <= self.keys.cap
        };
        if !blocks {
            return false;
        }
        let given_back = self.cell_list(width, false).is_some_and(|i| {
            let c = (self.free.cells[i].load(Ordering::Acquire) as u32).wrapping_sub(1);
            c != NONE && (c as u64) < self.cells_cap
        });
        let end = self.cells_used.load(Ordering::Relaxed) + width as u64;
        given_back || (end <= self.cells_cap && end < (NONE - 1) as u64)
    }

    /// Withdraws a TENTATIVE copy that lost: DEAD, reusable at once.
    fn give_way(&self, slot: &Slot, h: u64) {
        let off = slot.rec_off();
        if off < self.nblocks() {
            self.tag(off).store(DEAD_TAG, Ordering::Release);
        }
        slot.word
            .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
    }

    /// Attaches a key record and zeroed cells to a CLAIMED slot, reusing
    /// what a dead series left: its blocks (as many as the new key needs;
    /// the rest go back to the pool) and its cells when the width is the
    /// same (else they go back to their width's list). None when the zone
    /// has no room: the slot then keeps what it had, consistent.
    fn fill(&self, slot: &Slot, family: u32, key: &[u8], width: u32) -> Option<u32> {
        let old_b = slot.rec_off();
        let old_cell = slot.cell_idx();
        let old = (old_b != NONE && old_b < self.nblocks())
            // SAFETY: a DEAD slot's record was published before; we own the slot.
            .then(|| unsafe { self.rec(old_b) });
        let need = blocks_for(key.len());
        let have = old.as_ref().map_or(0, |r| blocks_for(r.len as usize));
        // Secure the extra blocks and the cells before changing anything.
        let mut extra = NONE; // a private chain of the extra blocks
        let mut extra_last = NONE;
        for _ in have..need {
            match self.block_pop().or_else(|| self.block_bump()) {
                Some(b) => {
                    self.next(b)
                        .store(extra.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
                    if extra == NONE {
                        extra_last = b;
                    }
                    extra = b;
                }
                None => {
                    if extra != NONE {
                        self.blocks_push(extra, extra_last);
                    }
                    return None;
                }
            }
        }
        let reuse_cells = matches!(&old, Some(r) if old_cell != NONE && r.width == width);
        let cell = if reuse_cells {
            self.cells.zero(old_cell, width);
            old_cell
        } else if let Some(c) = self.cells_pop(width) {
            self.cells.zero(c, width);
            c
        } else {
            match self.alloc_cells(width) {
                Some(c) => c, // never used: still zero
                None => {
                    if extra != NONE {
                        self.blocks_push(extra, extra_last);
                    }
                    return None;
                }
            }
        };
        // The chain: the old record's first `need` blocks, then the extra
        // ones; the old record's surplus goes back to the pool below.
        let first = if have == 0 { extra } else { old_b };
        let mut surplus = None;
        if have > 0 {
            let mut b = old_b;
            for _ in 1..have.min(need) {
                b = self
                    .next(b)
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .wrapping_sub(1);
            }
            if have > need {
                let rest = self
                    .next(b)
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .wrapping_sub(1);
                let mut last = rest;
                for _ in need + 1..have {
                    last = self
                        .next(last)
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .wrapping_sub(1);
                }
                surplus = Some((rest, last));
                self.next(b).store(0, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.next(b)
                    .store(extra.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
            }
        }
        slot.set_cell_idx(cell);
        // Write the header and the key along the chain. The blocks are
        // ours: fresh or popped ones, or the dead series' whose slot we
        // claimed; nobody reads them before our TENTATIVE store but for
        // readers that loaded the old DEAD state, who read only the tag.
        let mut b = first;
        let mut rest = key;
        let mut at_first = true;
        loop {
            let (skip, room) = if at_first {
                (12, FIRST_KEY)
            } else {
                (4, MORE_KEY)
            };
            let take = rest.len().min(room);
            // SAFETY: b < nblocks (from the pool or the old record); the
            // bytes written lie inside the block; the block is ours (above).
            unsafe {
                let p = self.block(b);
                if at_first {
                    (p.add(8) as *mut u32).write(key.len() as u32 | (width << 16));
                }
                std::ptr::copy_nonoverlapping(rest.as_ptr(), p.add(skip), take);
            }
            rest = &rest[take..];
            if rest.is_empty() {
                break;
            }
            b = self
                .next(b)
                .load(std::sync::atomic::Ordering::Relaxed)
                .wrapping_sub(1);
            at_first = false;
        }
        self.tag(first).store(family, Ordering::Release);
        slot.set_rec_off(first);
        // Nobody reaches the old record's surplus or the old cells any
        // more: the slot was dead for the grace period and now points at
        // the new record and cells.
        if let Some((rest, last)) = surplus {
            self.blocks_push(rest, last);
        }
        if let Some(r) = &old {
            if old_cell != NONE && !reuse_cells {
                self.cells_push(r.width, old_cell);
            }
        }
        Some(cell)
    }

    /// Gives a dead slot's key record and cells back to the pools; the
    /// slot is left with none. The caller owns the slot (CLEANING).
    fn detach(&self, slot: &Slot) -> bool {
        let b = slot.rec_off();
        if b == NONE || b >= self.nblocks() {
            return false;
        }
        // SAFETY: a DEAD slot's record was published before; we own the slot.
        let r = unsafe { self.rec(b) };
        let mut last = b;
        for _ in 1..blocks_for(r.len as usize) {
            last = self
                .next(last)
                .load(std::sync::atomic::Ordering::Relaxed)
                .wrapping_sub(1);
        }
        let cell = slot.cell_idx();
        slot.key.store(0, Ordering::Relaxed);
        slot.cell.store(0, Ordering::Relaxed);
        self.blocks_push(b, last);
        if cell != NONE {
            self.cells_push(r.width, cell);
        }
        true
    }

    /// A never used block from the arena.
    fn block_bump(&self) -> Option<u32> {
        let off = self.keys.alloc_at_multiple(BLOCK, BLOCK)?;
        let b = off / BLOCK;
        (b < self.nblocks() as u64).then_some(b as u32)
    }

    /// Gives the chain `first` ..= `last` (linked by their next words) back
    /// to the block pool.
    fn blocks_push(&self, first: u32, last: u32) {
        let head = self.free.blocks;
        let mut cur = head.load(Ordering::Acquire);
        loop {
            self.next(last)
                .store(cur as u32, std::sync::atomic::Ordering::Relaxed);
            let new = (((cur >> 32) + 1) << 32) | (first as u64 + 1);
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes one block from the pool, if any; its next word is 0.
    fn block_pop(&self) -> Option<u32> {
        let head = self.free.blocks;
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let b = (cur as u32).wrapping_sub(1);
            if b == NONE || b >= self.nblocks() {
                return None;
            }
            // a stale head's block may be in use by now: its word is then
            // garbage, and the tag makes the exchange fail
            let next = self.next(b).load(std::sync::atomic::Ordering::Relaxed);
            let new = (((cur >> 32) + 1) << 32) | next as u64;
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.next(b).store(0, std::sync::atomic::Ordering::Relaxed);
                    return Some(b);
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The cell list for `width`, taking a free head if `create`.
    fn cell_list(&self, width: u32, create: bool) -> Option<usize> {
        for (i, w) in self.free.widths.iter().enumerate() {
            let mut cur = w.load(Ordering::Acquire);
            if cur == 0 && create {
                cur = match w.compare_exchange(0, width, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => width,
                    Err(now) => now,
                };
            }
            if cur == width {
                return Some(i);
            }
            if cur == 0 {
                return None; // lists are taken in order: no later one has it
            }
        }
        None
    }

    /// Gives a run of `width` cells back for series of the same width.
    /// With every list taken by other widths the run stays unused.
    fn cells_push(&self, width: u32, cell: u32) {
        let Some(i) = self.cell_list(width, true) else {
            return;
        };
        let head = &self.free.cells[i];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            self.cells
                .link(cell)
                .store(cur & 0xffff_ffff, std::sync::atomic::Ordering::Relaxed);
            let new = (((cur >> 32) + 1) << 32) | (cell as u64 + 1);
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes a run of `width` cells given back earlier, if any (not zeroed).
    fn cells_pop(&self, width: u32) -> Option<u32> {
        let i = self.cell_list(width, false)?;
        let head = &self.free.cells[i];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let c = (cur as u32).wrapping_sub(1);
            if c == NONE || c as u64 >= self.cells_cap {
                return None;
            }
            let next = self
                .cells
                .link(c)
                .load(std::sync::atomic::Ordering::Relaxed)
                & 0xffff_ffff;
            let new = (((cur >> 32) + 1) << 32) | next;
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(c),
                Err(now) => cur = now,
            }
        }
    }

    /// Reserves `width` consecutive cells (in every plane).
    pub fn alloc_cells(&self, width: u32) -> Option<u32> {
        let mut cur = self.cells_used.load(Ordering::Relaxed);
        loop {
            let end = cur + width as u64;
            if end > self.cells_cap || end >= (NONE - 1) as u64 {
                return None;
            }
            match self.cells_used.compare_exchange_weak(
                cur,
                end,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(cur as u32),
                Err(now) => cur = now,
            }
        }
    }

    /// Marks the series in slot `i` deleted at time `now` (seconds).
    /// Returns false if it was not live.
    pub fn kill(&self, i: usize, now: u32) -> bool {
        let slot = &self.slots[i];
        let w = slot.word.load(Ordering::Acquire);
        if state(w) != READY {
            return false;
        }
        let dead = (DEAD << STATE_SHIFT) | (w & HASH_MASK);
        if slot
            .word
            .compare_exchange(w, dead, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let off = slot.rec_off();
        if off < self.nblocks() {
            // never exactly DEAD_TAG, which means "reusable at once"
            self.tag(off)
                .store(DEAD_TAG | (now & !DEAD_TAG).max(1), Ordering::Release);
        }
        true
    }

    /// The live series in slot `i`, if it holds one.
    pub fn get(&self, i: usize) -> Option<SeriesRef> {
        let slot = &self.slots[i];
        let w = slot.word.load(Ordering::Acquire);
        if state(w) != READY {
            return None;
        }
        let b = slot.rec_off();
        if b >= self.nblocks() {
            return None;
        }
        // SAFETY: READY was loaded with acquire just above.
        let r = unsafe { self.rec(b) };
        if r.tag & DEAD_TAG != 0 {
            return None; // deleted since the state load
        }
        Some(SeriesRef {
            slot: i,
            family: r.tag,
            cell: slot.cell_idx(),
            rec: b,
            len: r.len,
        })
    }

    /// The blocks of a live series' key record (for the zone check).
    pub fn record_blocks(&self, s: &SeriesRef) -> Vec<u32> {
        let mut v = vec![s.rec];
        let mut b = s.rec;
        for _ in 1..blocks_for(s.len as usize) {
            b = self
                .next(b)
                .load(std::sync::atomic::Ordering::Acquire)
                .wrapping_sub(1);
            if b >= self.nblocks() {
                break;
            }
            v.push(b);
        }
        v
    }

    /// The blocks on the free list, or why the list is broken (a link out
    /// of the pool, or a cycle). For a quiet zone: the zone check.
    pub fn free_blocks(&self) -> Result<Vec<u32>, String> {
        let n = self.nblocks();
        let mut v = Vec::new();
        let mut b = (self.free.blocks.load(Ordering::Acquire) as u32).wrapping_sub(1);
        while b != NONE {
            if b >= n || v.len() > n as usize {
                return Err(format!("free key block list broken at {b}"));
            }
            v.push(b);
            b = self
                .next(b)
                .load(std::sync::atomic::Ordering::Acquire)
                .wrapping_sub(1);
        }
        Ok(v)
    }

    /// The free cell runs as (first cell, width), or why a list is broken.
    pub fn free_cells(&self) -> Result<Vec<(u32, u32)>, String> {
        let mut v = Vec::new();
        for (head, w) in self.free.cells.iter().zip(self.free.widths) {
            let width = w.load(Ordering::Acquire);
            let mut c = (head.load(Ordering::Acquire) as u32).wrapping_sub(1);
            while c != NONE {
                if c as u64 >= self.cells_cap || v.len() as u64 > self.cells_cap {
                    return Err(format!("free cell list of width {width} broken at {c}"));
                }
                v.push((c, width));
                c = ((self
                    .cells
                    .link(c)
                    .load(std::sync::atomic::Ordering::Acquire)
                    & 0xffff_ffff) as u32)
                    .wrapping_sub(1);
            }
        }
        Ok(v)
    }

    /// Counts slots by state: (ready, claimed or tentative, dead).
    pub fn census(&self) -> (u64, u64, u64) {
        let (mut r, mut c, mut d) = (0, 0, 0);
        for s in self.slots {
            match state(s.word.load(Ordering::Acquire)) {
                READY => r += 1,
                CLAIMED | TENTATIVE => c += 1,
                DEAD | CLEANING => d += 1,
                _ => {}
            }
        }
        (r, c, d)
    }
}

/// `count` keys (family 1) whose home in a table of `n` slots is `home`
/// (for the tests and the loom models).
#[cfg(test)]
fn keys_homed(n: usize, home: usize, count: usize) -> Vec<[u8; 4]> {
    (0u32..)
        .map(|k| k.to_le_bytes())
        .filter(|k| home_slot(hash_key(1, k) & HASH_MASK, n) == home)
        .take(count)
        .collect()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Cells of one plane on the heap (links of free runs live here).
    struct Cells(Vec<std::sync::atomic::AtomicU64>);
    impl CellStore for Cells {
        fn zero(&self, cell: u32, width: u32) {
            for c in &self.0[cell as usize..(cell + width) as usize] {
                c.store(0, Ordering::Relaxed);
            }
        }
        fn link(&self, cell: u32) -> &std::sync::atomic::AtomicU64 {
            &self.0[cell as usize]
        }
    }

    struct Mem {
        slots: Vec<Slot>,
        keys: Vec<u64>,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
        reused: AtomicU64,
        store: Cells,
        blocks_free: AtomicU64,
        cells_free: Vec<AtomicU64>,
        cells_free_width: Vec<AtomicU32>,
    }

    /// `full` under the native build, `small` under Miri (which runs the
    /// same steps some thousand times slower).
    fn scale(full: u32, small: u32) -> u32 {
        if cfg!(miri) {
            small
        } else {
            full
        }
    }

    /// Slot counts to run a test with: `full` natively, `small` (one that
    /// is not a power of two) under Miri.
    fn sizes<'s>(full: &'s [usize], small: &'s [usize]) -> &'s [usize] {
        if cfg!(miri) {
            small
        } else {
            full
        }
    }

    fn mem(nslots: usize, key_bytes: usize) -> Mem {
        Mem {
            slots: (0..nslots)
                .map(|_| Slot {
                    word: AtomicU64::new(0),
                    key: AtomicU32::new(0),
                    cell: AtomicU32::new(0),
                })
                .collect(),
            keys: vec![0u64; key_bytes / 8],
            used: AtomicU64::new(0),
            cells: AtomicU64::new(0),
            slots_used: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            store: Cells(
                (0..scale(1 << 16, 1 << 10))
                    .map(|_| Default::default())
                    .collect(),
            ),
            blocks_free: AtomicU64::new(0),
            cells_free: (0..CELL_LISTS).map(|_| AtomicU64::new(0)).collect(),
            cells_free_width: (0..CELL_LISTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn table(m: &mut Mem, cells_cap: u64) -> Table<'_> {
        let cap = (m.keys.len() * 8) as u64;
        Table {
            slots: &m.slots,
            keys: Arena {
                base: m.keys.as_mut_ptr() as *mut u8,
                cap,
                used: &m.used,
            },
            cells_used: &m.cells,
            cells_cap,
            slots_used: &m.slots_used,
            reused: &m.reused,
            cells: &m.store,
            grace: REUSE_GRACE_SECS,
            free: FreeLists {
                blocks: &m.blocks_free,
                cells: &m.cells_free,
                widths: &m.cells_free_width,
            },
            clean_gate: None,
        }
    }

    /// Slot counts the tests run with: powers of two and others (the
    /// table takes any count).
    const SIZES: [usize; 4] = [16, 17, 64, 100];

    #[test]
    fn insert_find_kill() {
        for n in SIZES {
            insert_find_kill_in(n);
        }
    }

    fn insert_find_kill_in(n: usize) {
        let mut m = mem(n, 1024);
        let t = table(&mut m, 100);
        let (a, new) = t.get_or_insert(1, b"a", 2, 10).unwrap();
        assert!(new);
        let (a2, new2) = t.get_or_insert(1, b"a", 2, 10).unwrap();
        assert_eq!((a, false), (a2, new2));
        let (b, _) = t.get_or_insert(2, b"a", 2, 10).unwrap();
        assert_ne!(a, b, "same key bytes in another family is another series");
        let i = t.find(1, b"a").unwrap().unwrap();
        assert!(t.kill(i, 10));
        assert!(!t.kill(i, 10));
        assert_eq!(t.find(1, b"a").unwrap(), None);
        let (c, new3) = t.get_or_insert(1, b"a", 2, 11).unwrap();
        assert!(new3);
        assert_ne!(
            c, a,
            "within the grace period the dead series is not reused"
        );
        let j = t.find(1, b"a").unwrap().unwrap();
        assert!(t.kill(j, 20));
        let (d, _) = t.get_or_insert(1, b"a", 2, 20 + REUSE_GRACE_SECS).unwrap();
        assert_eq!(
            d, a,
            "after the grace period the first dead slot's cells are reused"
        );
        assert_eq!(t.reused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn churn_does_not_fill() {
        for &n in sizes(&[64, 67, 100], &[67]) {
            churn_does_not_fill_in(n);
        }
    }

    fn churn_does_not_fill_in(n: usize) {
        let mut m = mem(n, 1 << 12);
        let t = table(&mut m, 200);
        let mut now = 100;
        for round in 0..scale(500, 40) {
            let keys: Vec<[u8; 4]> = (0..20u32).map(|k| (round * 20 + k).to_le_bytes()).collect();
            for k in &keys {
                if let Err(e) = t.get_or_insert(3, k, 1, now) {
                    panic!(
                        "{n} slots, round {round}: {e:?}; slots {} cells {} keys {} census {:?}",
                        t.slots_used.load(Ordering::Relaxed),
                        t.cells_used.load(Ordering::Relaxed),
                        t.keys.used.load(Ordering::Relaxed),
                        t.census()
                    );
                }
            }
            for k in &keys {
                let i = t.find(3, k).unwrap().unwrap();
                assert!(t.kill(i, now));
            }
            now += REUSE_GRACE_SECS;
        }
        // 10,000 series (800 under Miri) went through a table of n slots:
        // every slot got cells and a key record at most once
        assert!(t.slots_used.load(Ordering::Relaxed) <= t.slot_limit());
        let cells = t.cells_used.load(Ordering::Relaxed);
        assert!(cells <= n as u64, "cells used {cells}");
        let keys = t.keys.used.load(Ordering::Relaxed);
        assert!(keys <= n as u64 * BLOCK, "key bytes used {keys}");
        assert_eq!(t.census().0, 0);
    }

    #[test]
    fn growing_keys_share_one_pool() {
        for &n in sizes(&[64, 67], &[67]) {
            growing_keys_share_one_pool_in(n);
        }
    }

    fn growing_keys_share_one_pool_in(n: usize) {
        // 10x the table's capacity of label sets whose keys grow from one
        // block to three and shrink again, in a key pool of 80 blocks (as
        // many as 60 live slots of one block, plus 20): dead slots' blocks
        // come back through the pool, so no insert is refused. Widths
        // change too: cells of a width go back to that width's list.
        let mut m = mem(n, 80 * BLOCK as usize);
        let t = table(&mut m, 300);
        let mut now = 100;
        let rounds = scale(400, 40);
        for round in 0..rounds {
            let len = [8, 20, 40, 5][(round / (rounds / 4)) as usize];
            let width = 1 + 2 * ((round / (rounds / 8)) % 2);
            let keys: Vec<Vec<u8>> = (0..20u32)
                .map(|k| {
                    let mut v = vec![b'x'; len];
                    v[..4].copy_from_slice(&(round * 20 + k).to_le_bytes());
                    v
                })
                .collect();
            for k in &keys {
                if let Err(e) = t.get_or_insert(3, k, width, now) {
                    panic!(
                        "{n} slots, round {round} (key {len} B, width {width}): {e:?}; keys {} of {} B, \
                         cells {}, census {:?}",
                        t.keys.used.load(Ordering::Relaxed),
                        t.keys.cap,
                        t.cells_used.load(Ordering::Relaxed),
                        t.census()
                    );
                }
            }
            for k in &keys {
                let i = t.find(3, k).unwrap().unwrap();
                let s = t.get(i).unwrap();
                let mut got = Vec::new();
                assert!(t.read_key(&s, &mut got));
                assert_eq!(&got, k);
                assert!(t.kill(i, now));
            }
            now += REUSE_GRACE_SECS;
        }
        assert!(t.keys.used.load(Ordering::Relaxed) <= 80 * BLOCK);
        // every block is either held by a dead slot or free, never both
        let free = t.free_blocks().unwrap();
        let mut seen = std::collections::HashSet::new();
        for b in &free {
            assert!(seen.insert(*b), "block {b} free twice");
        }
    }

    #[test]
    fn long_keys_round_trip() {
        let mut m = mem(61, 1 << 20);
        let t = table(&mut m, 1000);
        for len in [0, 1, 11, 12, 13, 31, 32, 33, 52, 53, 1000, MAX_KEY_BYTES] {
            let key: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let (c, new) = t.get_or_insert(9, &key, 2, 0).unwrap();
            assert!(new);
            assert_eq!(t.get_or_insert(9, &key, 2, 0).unwrap(), (c, false));
            let i = t.find(9, &key).unwrap().unwrap();
            let s = t.get(i).unwrap();
            assert_eq!(t.record_blocks(&s).len() as u32, blocks_for(len));
            let mut got = Vec::new();
            assert!(t.read_key(&s, &mut got));
            assert_eq!(got, key, "key of {len} bytes");
            if len > 0 {
                // same length, last byte differs: another series
                let mut other = key.clone();
                *other.last_mut().unwrap() ^= 1;
                assert_eq!(t.find(9, &other).unwrap(), None);
            }
        }
    }

    #[test]
    fn homes_are_uniform() {
        for n in [1, 16, 17, 100, 1000, 3001] {
            assert_eq!(home_slot(0, n), 0);
            assert_eq!(home_slot(HASH_MASK, n), n - 1);
            assert_eq!(home_slot(HASH_MASK / 2, n), (n - 1) / 2);
            assert_eq!(home_slot(HASH_MASK / 2 + 1, n), n / 2);
        }
        // the homes of many keys spread evenly: a chi-square test at about
        // six standard deviations
        for n in [17, 100, scale(1000, 60) as usize, scale(3001, 61) as usize] {
            let per = scale(200, 20) as usize;
            let mut count = vec![0u64; n];
            for k in 0..(n * per) as u32 {
                count[home_slot(hash_key(5, &k.to_le_bytes()) & HASH_MASK, n)] += 1;
            }
            let e = per as f64;
            let chi2: f64 = count.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
            let df = (n - 1) as f64;
            assert!(
                chi2 < df + 6.0 * (2.0 * df).sqrt(),
                "{n} slots: chi-square {chi2:.0} for {df} degrees of freedom"
            );
        }
    }

    #[test]
    fn chains_wrap_at_the_end() {
        // three keys homed at the last slot of 17 fill it and the first two
        // slots; a fourth, homed at slot 0, goes to slot 2
        let n = 17;
        let mut m = mem(n, 1 << 12);
        let t = table(&mut m, 100);
        let last = keys_homed(n, n - 1, 3);
        let zero = keys_homed(n, 0, 1);
        for k in last.iter().chain(&zero) {
            assert!(t.get_or_insert(1, k, 1, 10).unwrap().1);
        }
        let at = |k: &[u8]| t.find(1, k).unwrap().unwrap();
        let st = |i: usize| state(t.slots[i].word.load(Ordering::Relaxed));
        assert_eq!(
            [at(&last[0]), at(&last[1]), at(&last[2]), at(&zero[0])],
            [16, 0, 1, 2]
        );
        // the keys in slots 16 and 0 die; the chains of the keys in slots 1
        // and 2 pass slot 0, the first of them slot 16 too: both stay dead
        assert!(t.kill(16, 10));
        assert!(t.kill(0, 10));
        let now = 10 + REUSE_GRACE_SECS;
        t.clean(now);
        assert_eq!([st(16), st(0), st(1), st(2)], [DEAD, DEAD, READY, READY]);
        assert_eq!((at(&last[2]), at(&zero[0])), (1, 2));
        // the key in slot 1 dies: no live chain passes slot 16 any more
        // (the key in slot 2 is homed at 0), the one in slot 2 passes 0 and 1
        assert!(t.kill(1, now));
        t.clean(now + REUSE_GRACE_SECS);
        assert_eq!([st(16), st(0), st(1), st(2)], [EMPTY, DEAD, DEAD, READY]);
        assert_eq!(at(&zero[0]), 2);
        assert_eq!(t.find(1, &last[2]).unwrap(), None);
        // a key homed at slot 16 takes it again; one homed at 0 reuses slot 0
        let more = keys_homed(n, n - 1, 4);
        let now = now + 2 * REUSE_GRACE_SECS;
        assert!(t.get_or_insert(1, &more[3], 1, now).unwrap().1);
        assert_eq!(at(&more[3]), 16);
        let zero2 = keys_homed(n, 0, 2);
        assert!(t.get_or_insert(1, &zero2[1], 1, now).unwrap().1);
        assert_eq!(at(&zero2[1]), 0);
        // the key in slot 2 dies: after a clean only slot 1 is left dead
        // (the key in slot 0 is homed there; slot 1 is passed by no chain
        // either, but cleaning it needs it reusable)
        assert!(t.kill(2, now));
        t.clean(now + REUSE_GRACE_SECS);
        assert_eq!([st(16), st(0), st(1), st(2)], [READY, READY, EMPTY, EMPTY]);
        assert_eq!(t.census(), (2, 0, 0));
        assert_eq!(t.slots_used.load(Ordering::Relaxed), 2);
    }

    /// Random inserts, deletes, cleans and lookups against a model of the
    /// live series, on tables of sizes that are not powers of two.
    #[test]
    fn random_ops_match_a_model() {
        for (seed, &n) in sizes(&[17, 100, 1000, 3001], &[17]).iter().enumerate() {
            random_ops_in(n, seed as u64 + 1, scale(40_000, 300));
        }
    }

    fn random_ops_in(n: usize, seed: u64, steps: u32) {
        use std::collections::{HashMap, HashSet};
        // two key blocks and three cells per slot: with keys of one or two
        // blocks and widths 1 to 3, any of the three can run out first
        let mut m = mem(n, n * 2 * BLOCK as usize);
        let cells_cap = (3 * n as u64).min(m.store.0.len() as u64);
        let t = table(&mut m, cells_cap);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let width = |fam: u32| fam + 1;
        // each id has one key, of 1 to 30 bytes (one or two blocks)
        let key_of = |id: u64| {
            let mut k = id.to_string().into_bytes();
            k.resize(1 + (id % 30) as usize, b'.');
            k
        };
        let mut live: HashMap<(u32, Vec<u8>), u32> = HashMap::new();
        let mut now = 100u32;
        let check = |t: &Table<'_>, live: &HashMap<(u32, Vec<u8>), u32>, step: u32| {
            for ((fam, key), &cell) in live {
                let i = t.find(*fam, key).unwrap();
                let i = i.unwrap_or_else(|| panic!("{n} slots, step {step}: {fam}/{key:?} lost"));
                let s = t.get(i).unwrap();
                assert_eq!((s.family, s.cell), (*fam, cell), "{n} slots, step {step}");
            }
            let mut keys = HashSet::new();
            let mut cells = HashSet::new();
            let mut got = Vec::new();
            for i in 0..t.slots.len() {
                let Some(s) = t.get(i) else { continue };
                assert!(t.read_key(&s, &mut got));
                let k = (s.family, got.clone());
                assert_eq!(
                    live.get(&k),
                    Some(&s.cell),
                    "{n} slots, step {step}: slot {i}"
                );
                assert!(
                    keys.insert(k),
                    "{n} slots, step {step}: slot {i} a second copy"
                );
                for c in s.cell..s.cell + width(s.family) {
                    assert!(cells.insert(c), "{n} slots, step {step}: cell {c} shared");
                }
            }
            assert_eq!(t.census(), (live.len() as u64, 0, t.census().2));
        };
        // phases of mostly inserts (the table fills up and refuses new
        // series) and of mostly deletes (it empties out)
        let phase = scale(2000, 50).max(2 * n as u32);
        for step in 0..steps {
            let (ins, del) = if (step / phase) % 2 == 0 {
                (10, 2)
            } else {
                (3, 9)
            };
            let r = rand();
            let fam = (r % 3) as u32;
            let key = key_of((r >> 8) % (n as u64 / 2 + 1));
            let op = (r >> 40) % 16;
            match op {
                _ if op < ins => {
                    let dead = t.census().2;
                    let before = (
                        t.slots_used.load(Ordering::Relaxed),
                        t.cells_used.load(Ordering::Relaxed),
                        t.keys.used.load(Ordering::Relaxed),
                    );
                    let k = (fam, key);
                    match (t.get_or_insert(fam, &k.1, width(fam), now), live.get(&k)) {
                        (Ok((c, created)), Some(&c0)) => {
                            assert_eq!((c, created), (c0, false), "{n} slots, step {step}")
                        }
                        (Ok((c, created)), None) => {
                            assert!(created, "{n} slots, step {step}");
                            live.insert(k, c);
                        }
                        (Err(TableError::Full), None) => {
                            // refused only when something ran short
                            let rec = blocks_for(k.1.len()) as u64 * BLOCK;
                            assert!(
                                dead > 0
                                    || before.0 >= t.slot_limit()
                                    || before.1 + width(fam) as u64 > cells_cap
                                    || before.2 + rec > t.keys.cap,
                                "{n} slots, step {step}: spurious Full"
                            );
                        }
                        (r, _) => panic!("{n} slots, step {step}: {r:?} for {k:?}"),
                    }
                }
                _ if op < ins + del => {
                    let k = (fam, key);
                    match t.find(fam, &k.1).unwrap() {
                        Some(i) => {
                            assert!(t.kill(i, now));
                            assert!(live.remove(&k).is_some(), "{n} slots, step {step}");
                        }
                        None => assert!(!live.contains_key(&k), "{n} slots, step {step}"),
                    }
                }
                13 => {
                    t.clean(now);
                }
                14 => now += (r >> 48) as u32 % 4,
                _ => check(&t, &live, step),
            }
        }
        check(&t, &live, steps);
        assert!(
            t.reused.load(Ordering::Relaxed) > 0,
            "{n} slots: no slot reused"
        );
    }

    #[test]
    fn refuses_when_full() {
        let sizes: &[(usize, u64)] = if cfg!(miri) {
            &[(16, 15), (17, 15), (100, 93)]
        } else {
            &[(16, 15), (17, 15), (100, 93), (1000, 937)]
        };
        for &(n, limit) in sizes {
            let mut m = mem(n, 1 << 16);
            let t = table(&mut m, 1000);
            assert_eq!(t.slot_limit(), limit);
            let mut ok = 0;
            for i in 0..2 * n as u32 {
                match t.get_or_insert(0, &i.to_le_bytes(), 1, 0) {
                    Ok(_) => ok += 1,
                    Err(e) => assert_eq!(e, TableError::Full),
                }
            }
            assert_eq!(ok, limit, "15/16 of {n} slots");
            // existing keys are still found when the table is full
            for i in 0..2 * n as u32 {
                let r = t.get_or_insert(0, &i.to_le_bytes(), 1, 0);
                match t.find(0, &i.to_le_bytes()).unwrap() {
                    Some(j) => assert_eq!(r, Ok((t.get(j).unwrap().cell, false))),
                    None => assert_eq!(r, Err(TableError::Full)),
                }
            }
        }
        let mut m2 = mem(64, 1 << 16);
        let t2 = table(&mut m2, 3);
        assert!(t2.get_or_insert(0, b"x", 2, 0).is_ok());
        assert_eq!(t2.get_or_insert(0, b"y", 2, 0), Err(TableError::Full));
        let (_, claimed, dead) = t2.census();
        assert_eq!(
            (claimed, dead, t2.slots_used.load(Ordering::Relaxed)),
            (0, 0, 1),
            "a series the cells cannot hold takes no slot"
        );
        assert_eq!(
            t2.get_or_insert(0, &[0u8; MAX_KEY_BYTES + 1], 1, 0),
            Err(TableError::KeyTooLong)
        );
    }

    /// A zone whose cells are all taken refuses new series without
    /// touching the table, and its gate keeps refusals from cleaning more
    /// than once a second.
    #[test]
    fn refused_for_want_of_cells_leaves_the_table_alone() {
        let gate = AtomicU64::new(0);
        let mut m = mem(256, 1 << 16);
        let mut t = table(&mut m, 21 * 4);
        t.clean_gate = Some(&gate);
        for i in 0..4u32 {
            t.get_or_insert(0, &i.to_le_bytes(), 21, 5)
                .expect("room for 4");
        }
        for i in 4..200u32 {
            assert_eq!(
                t.get_or_insert(0, &i.to_le_bytes(), 21, 5),
                Err(TableError::Full)
            );
        }
        let (ready, claimed, dead) = t.census();
        assert_eq!((ready, claimed, dead), (4, 0, 0));
        assert_eq!(t.slots_used.load(Ordering::Relaxed), 4);
        assert_eq!(
            gate.load(Ordering::Relaxed),
            (5 << 1) | 1,
            "the gate is shut for second 5"
        );
        // a narrower series still fits in what is left? no: every cell is
        // taken; one of another width is refused too, and existing ones
        // are still found
        assert_eq!(t.get_or_insert(0, b"w", 1, 5), Err(TableError::Full));
        assert_eq!(
            t.get_or_insert(0, &2u32.to_le_bytes(), 21, 5).map(|r| r.1),
            Ok(false)
        );
    }

    /// The key pool holds a block, the key arena is full and a key needs
    /// two blocks: the room check lets the insert try, its fill fails and
    /// leaves the slot dead. The next clean empties that slot, which gives
    /// no room: the gate shuts all the same (before, it stayed open and
    /// every such refusal scanned the whole table).
    #[test]
    fn a_clean_that_frees_no_room_shuts_the_gate() {
        let gate = AtomicU64::new(0);
        // two key blocks in all
        let mut m = mem(256, (2 * BLOCK) as usize);
        let mut t = table(&mut m, 1000);
        t.clean_gate = Some(&gate);
        t.get_or_insert(0, b"a", 1, 0).unwrap();
        t.get_or_insert(0, b"b", 1, 0).unwrap();
        let i = t.find(0, b"a").unwrap().unwrap();
        assert!(t.kill(i, 0));
        // past the grace: the clean gives a's block to the pool
        let now = REUSE_GRACE_SECS + 1;
        assert_eq!(
            t.clean(now),
            Freed {
                slots: 1,
                records: 1
            }
        );
        let long = |k: u8| [k; FIRST_KEY + 1];
        for k in 0..20 {
            assert_eq!(t.get_or_insert(0, &long(k), 1, now), Err(TableError::Full));
        }
        assert_eq!(gate.load(Ordering::Relaxed), ((now as u64) << 1) | 1);
        let (_, _, dead) = t.census();
        assert!(
            dead >= 20,
            "no clean ran after the first refusal: the refusals' dead slots are still there ({dead})"
        );
        // the next second cleans once more and empties them
        assert_eq!(
            t.get_or_insert(0, &long(99), 1, now + 1),
            Err(TableError::Full)
        );
        let (_, _, dead) = t.census();
        assert!(dead <= 2, "{dead} dead slots after the next second's clean");
        // a short key still fits in the pooled block
        assert!(t.get_or_insert(0, b"c", 1, now + 1).unwrap().1);
    }

    #[test]
    fn threads_agree_on_cells() {
        for &n in sizes(&[1 << 12, 3001], &[251]) {
            threads_agree_on_cells_in(n);
        }
    }

    fn threads_agree_on_cells_in(n: usize) {
        let mut m = mem(n, scale(1 << 20, 1 << 14) as usize);
        let t = table(&mut m, scale(1 << 20, 1 << 10) as u64);
        // leave dead, reusable slots around so both insert paths race
        for k in 0..scale(500, 40) {
            t.get_or_insert(7, &(k + 100_000).to_le_bytes(), 3, 0)
                .unwrap();
            let i = t.find(7, &(k + 100_000).to_le_bytes()).unwrap().unwrap();
            t.kill(i, 1);
        }
        let results: Vec<Vec<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4u32)
                .map(|th| {
                    let t = &t;
                    s.spawn(move || {
                        // two threads see the dead slots as reusable, two not yet
                        let now = if th % 2 == 0 { 100 } else { 2 };
                        (0..scale(1000, 60))
                            .map(|k| t.get_or_insert(7, &k.to_le_bytes(), 3, now).unwrap().0)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results[1..] {
            assert_eq!(r, &results[0]);
        }
        assert_eq!(t.census().0, scale(1000, 60) as u64);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Cells of one plane (std atomics: the zone's plain memory).
    struct Cells(Vec<std::sync::atomic::AtomicU64>);
    impl CellStore for Cells {
        fn zero(&self, cell: u32, width: u32) {
            for c in &self.0[cell as usize..(cell + width) as usize] {
                c.store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
        fn link(&self, cell: u32) -> &std::sync::atomic::AtomicU64 {
            &self.0[cell as usize]
        }
    }

    struct Mem {
        slots: Vec<Slot>,
        keys: std::cell::UnsafeCell<Vec<u64>>,
        key_cap: u64,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
        reused: AtomicU64,
        store: Cells,
        blocks_free: AtomicU64,
        cells_free: Vec<AtomicU64>,
        cells_free_width: Vec<AtomicU32>,
    }
    // SAFETY: the key arena is written only in regions reserved by one
    // thread's atomic bump (or a slot it claimed) and read only after the
    // slot's acquire load, which is the protocol under test.
    unsafe impl Sync for Mem {}
    unsafe impl Send for Mem {}

    fn mem(n: usize) -> Arc<Mem> {
        mem_with(n, 1024)
    }

    fn mem_with(n: usize, key_cap: u64) -> Arc<Mem> {
        Arc::new(Mem {
            key_cap,
            slots: (0..n)
                .map(|_| Slot {
                    word: AtomicU64::new(0),
                    key: AtomicU32::new(0),
                    cell: AtomicU32::new(0),
                })
                .collect(),
            keys: std::cell::UnsafeCell::new(vec![0u64; 128]),
            used: AtomicU64::new(0),
            cells: AtomicU64::new(0),
            slots_used: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            store: Cells((0..64).map(|_| Default::default()).collect()),
            blocks_free: AtomicU64::new(0),
            cells_free: (0..CELL_LISTS).map(|_| AtomicU64::new(0)).collect(),
            cells_free_width: (0..CELL_LISTS).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    fn with_table<R>(m: &Mem, f: impl FnOnce(&Table<'_>) -> R) -> R {
        // SAFETY: see the Sync impl above; the Vec is never resized.
        let base = unsafe { (*m.keys.get()).as_mut_ptr() as *mut u8 };
        let t = Table {
            slots: &m.slots,
            keys: Arena {
                base,
                cap: m.key_cap,
                used: &m.used,
            },
            cells_used: &m.cells,
            cells_cap: 64,
            slots_used: &m.slots_used,
            reused: &m.reused,
            cells: &m.store,
            grace: REUSE_GRACE_SECS,
            free: FreeLists {
                blocks: &m.blocks_free,
                cells: &m.cells_free,
                widths: &m.cells_free_width,
            },
            clean_gate: None,
        };
        f(&t)
    }

    /// Runs `f` under loom with preemptions bounded (spin-waits would
    /// otherwise make the schedule space unbounded).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        crate::sync::loom_model(Some(3), f)
    }

    fn ins(m: &Mem, k: &[u8], now: u32) -> u32 {
        with_table(m, |t| t.get_or_insert(1, k, 1, now).unwrap().0)
    }

    /// The tables the races run in: (slots, home slot of the keys). Eight
    /// slots, keys homed at 0; and seven, keys homed at the last slot, so
    /// that their chains wrap around to slot 0.
    const TABLES: [(usize, usize); 2] = [(8, 0), (7, 6)];

    /// Two processes insert the same new key at once: both get one series.
    #[test]
    fn same_key_race() {
        for (n, home) in TABLES {
            let k = keys_homed(n, home, 1)[0];
            model(move || {
                let m = mem(n);
                let m2 = m.clone();
                let th = loom::thread::spawn(move || ins(&m2, &k, 0));
                let a = ins(&m, &k, 0);
                let b = th.join().unwrap();
                assert_eq!(a, b);
                with_table(&m, |t| assert_eq!(t.census(), (1, 0, 0)));
            });
        }
    }

    /// Different keys race for the same home slot while a third looks one up.
    #[test]
    fn colliding_keys_race() {
        for (n, home) in TABLES {
            let keys = keys_homed(n, home, 2);
            let (k0, k1) = (keys[0], keys[1]);
            model(move || {
                let m = mem(n);
                let m2 = m.clone();
                let th = loom::thread::spawn(move || ins(&m2, &k1, 0));
                let a = ins(&m, &k0, 0);
                let seen = with_table(&m, |t| t.find(1, &k1).unwrap());
                let b = th.join().unwrap();
                assert_ne!(a, b);
                if let Some(i) = seen {
                    with_table(&m, |t| assert_eq!(t.get(i).unwrap().cell, b));
                }
                with_table(&m, |t| {
                    assert_eq!(t.get_or_insert(1, &k0, 1, 0).unwrap(), (a, false));
                    assert_eq!(t.get_or_insert(1, &k1, 1, 0).unwrap(), (b, false));
                });
            });
        }
    }

    /// A dead series (key `other`) in the home slot of key `k`, killed at
    /// time 1: reusable from time 1 + grace on.
    fn dead_at_home(m: &Mem, other: &[u8]) {
        with_table(m, |t| {
            t.get_or_insert(1, other, 1, 0).unwrap();
            let i = t.find(1, other).unwrap().unwrap();
            assert!(t.kill(i, 1));
        });
    }

    /// The same key inserted at once by a process that may reuse a dead
    /// slot and one that may not (it takes the EMPTY end of the chain):
    /// still one live series, and both get its cells.
    #[test]
    fn reuse_race_keeps_one_copy() {
        for (n, home) in TABLES {
            let keys = keys_homed(n, home, 2);
            let (other, k) = (keys[0], keys[1]);
            model(move || {
                let m = mem(n);
                dead_at_home(&m, &other);
                let m2 = m.clone();
                let th = loom::thread::spawn(move || ins(&m2, &k, 100));
                let a = ins(&m, &k, 2);
                let b = th.join().unwrap();
                assert_eq!(a, b, "both got the same series");
                with_table(&m, |t| assert_eq!(t.census().0, 1, "one live copy"));
            });
        }
    }

    /// A cleaner empties a dead slot while an insert walks past it to the
    /// next EMPTY slot: the new series must stay findable (exactly one copy).
    #[test]
    fn clean_races_insert() {
        for (n, home) in TABLES {
            let keys = keys_homed(n, home, 2);
            let (other, k) = (keys[0], keys[1]);
            model(move || {
                let m = mem(n);
                dead_at_home(&m, &other);
                let m2 = m.clone();
                // at time 2 the dead slot is not reusable yet: the insert
                // goes past it
                let th = loom::thread::spawn(move || ins(&m2, &k, 2));
                with_table(&m, |t| t.clean(100));
                let a = th.join().unwrap();
                with_table(&m, |t| {
                    assert_eq!(t.get_or_insert(1, &k, 1, 2).unwrap(), (a, false));
                    assert_eq!(t.census().0, 1, "one live copy");
                });
            });
        }
    }

    /// The first of `make(0)`, `make(1)`, .. that is not in `not` and
    /// whose home (family 1) in a table of `n` slots is `home`.
    fn key_homed(n: usize, home: usize, not: &[Vec<u8>], make: impl Fn(u32) -> Vec<u8>) -> Vec<u8> {
        (0u32..)
            .map(make)
            .find(|k| home_slot(hash_key(1, k) & HASH_MASK, n) == home && !not.contains(k))
            .unwrap()
    }

    /// A key pool of three blocks, all held by three dead one-block
    /// series. One insert needs two blocks: it finds the pool empty, and
    /// `clean` must give a dead slot's block back, while a second insert
    /// (one block) goes in at the same time. Both succeed, and no block
    /// ends up in two places.
    ///
    /// In 8 slots both inserts take an EMPTY slot and both may clean (the
    /// homes the keys of this test had when a home was the hash's low
    /// bits). In 7, with chains wrapping from the last slot to the first,
    /// both take a dead slot: the two-block insert, a block short, leaves
    /// its slot dead again and cleans while the other reuses its slot.
    #[test]
    fn clean_feeds_pool_under_race() {
        // (slots, homes of the dead keys, of the two-block key, of the other)
        for (n, dead, long_home, short_home) in [(8, [5, 1, 2], 7, 4), (7, [6, 6, 1], 6, 0)] {
            let mut keys = vec![];
            for h in dead {
                let k = key_homed(n, h, &keys, |k| format!("d{k}").into_bytes());
                keys.push(k);
            }
            let long = key_homed(n, long_home, &[], |k| {
                let mut v = vec![b'a'; FIRST_KEY + 1];
                v[FIRST_KEY - 3..].copy_from_slice(&k.to_le_bytes());
                v
            });
            let short = key_homed(n, short_home, &keys, |k| format!("s{k}").into_bytes());
            crate::sync::loom_model(Some(2), move || {
                clean_feeds_pool_in(n, &keys, long.clone(), short.clone())
            });
        }
    }

    fn clean_feeds_pool_in(n: usize, dead: &[Vec<u8>], long: Vec<u8>, short: Vec<u8>) {
        let m = mem_with(n, 3 * BLOCK);
        with_table(&m, |t| {
            for key in dead {
                t.get_or_insert(1, key, 1, 0).unwrap();
                let i = t.find(1, key).unwrap().unwrap();
                assert!(t.kill(i, 1));
            }
        });
        let m2 = m.clone();
        let s2 = short.clone();
        let th = loom::thread::spawn(move || {
            with_table(&m2, |t| t.get_or_insert(1, &s2, 1, 100).map(|r| r.0))
        });
        let a = with_table(&m, |t| t.get_or_insert(1, &long, 1, 100).map(|r| r.0));
        let b = th.join().unwrap();
        let (a, b) = (a.expect("two-block insert"), b.expect("one-block insert"));
        assert_ne!(a, b);
        with_table(&m, |t| {
            let mut held = std::collections::HashSet::new();
            for k in [&long, &short] {
                let i = t.find(1, k).unwrap().expect("inserted key found");
                let s = t.get(i).unwrap();
                let mut got = Vec::new();
                assert!(t.read_key(&s, &mut got));
                assert_eq!(&got, k);
                for blk in t.record_blocks(&s) {
                    assert!(held.insert(blk), "block {blk} in two records");
                }
            }
            for blk in t.free_blocks().unwrap() {
                assert!(held.insert(blk), "block {blk} free and held");
            }
        });
    }
}
