//! The lock-free label-set table: open addressing over fixed slots in the
//! zone, keys in a bump arena, value cells allocated once per series and
//! reused after the series is deleted.
//!
//! A slot moves EMPTY -> CLAIMED -> TENTATIVE -> READY, and READY -> DEAD
//! when the series is deleted. A slot never becomes EMPTY again, so probe
//! chains never break. A new series goes into the first reusable DEAD slot
//! of its chain, or else the EMPTY slot that ends it; it keeps the dead
//! series' key record and cells when they fit.
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
const REC_HDR: u64 = 12;

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
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let start = (cur + align - 1) & !(align - 1);
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

/// Zeroes cells of a reused series in every plane.
pub trait CellStore {
    /// Sets `width` cells from `cell` to zero in every plane.
    fn zero(&self, cell: u32, width: u32);
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
    /// Free key records by size class (capacity 8 << class bytes): a
    /// reused slot whose record is too small for the new key gives it back
    /// here. Each head is (tag << 32) | (offset + 1), 0 for empty; the tag
    /// keeps a pop from mistaking a recycled head (ABA).
    pub rec_free: &'a [AtomicU64],
}

/// Size classes of key records: capacities 8, 16, ... 16384 bytes.
pub const REC_CLASSES: usize = 12;

/// The size class whose capacity holds `len` key bytes.
fn rec_class(len: usize) -> usize {
    let cap = len.max(8).next_power_of_two();
    cap.trailing_zeros() as usize - 3
}

/// A live series found while iterating the table.
pub struct SeriesRef<'k> {
    pub slot: usize,
    pub family: u32,
    pub key: &'k [u8],
    pub cell: u32,
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
    cap: u32,
    width: u32,
}

impl<'a> Table<'a> {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Most slots that may leave EMPTY: 15/16 of the table. New series
    /// prefer reusable dead slots, so under churn the table fills with dead
    /// slots that new chains meet rather than with fresh ones.
    pub fn slot_limit(&self) -> u64 {
        self.slots.len() as u64 * 15 / 16
    }

    /// The record's tag word. Always the std atomic, even under loom: it
    /// lives in the arena's plain memory (loom's atomics cannot).
    fn tag(&self, off: u32) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: `off` is the offset of a record allocated 4-aligned with a
        // 12-byte header inside the arena; its first word is only accessed
        // atomically.
        unsafe { &*(self.keys.at(off as u64) as *const std::sync::atomic::AtomicU32) }
    }

    /// Reads the fixed part of the record at `off`.
    ///
    /// # Safety
    /// `off` must come from a slot whose state (not EMPTY or CLAIMED) was
    /// loaded with acquire ordering: the record is then written.
    unsafe fn rec(&self, off: u32) -> Rec {
        // SAFETY: per the contract, 12 header bytes at `off`, written before
        // the slot's publishing store.
        unsafe {
            let p = self.keys.at(off as u64);
            let meta = (p.add(4) as *const u32).read_unaligned();
            Rec {
                tag: self.tag(off).load(Ordering::Acquire),
                len: meta & 0xffff,
                cap: (meta >> 16) * 8,
                width: (p.add(8) as *const u32).read_unaligned(),
            }
        }
    }

    /// Reads the key bytes of the record at `off`.
    ///
    /// # Safety
    /// As for `rec`.
    unsafe fn key_bytes(&self, off: u32, len: u32) -> &'a [u8] {
        // SAFETY: per the contract the record holds `len` key bytes after
        // its header, inside the arena.
        unsafe { std::slice::from_raw_parts(self.keys.at(off as u64 + REC_HDR), len as usize) }
    }

    /// Whether slot's published record is (family, key).
    fn key_eq(&self, slot: &Slot, family: u32, key: &[u8]) -> bool {
        let off = slot.rec_off();
        if off == NONE {
            return false;
        }
        // SAFETY: the caller loaded a TENTATIVE or READY state with acquire.
        let r = unsafe { self.rec(off) };
        // SAFETY: as above.
        r.tag == family
            && r.len as usize == key.len()
            && unsafe { self.key_bytes(off, r.len) } == key
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
    /// so the table does not fill with dead slots under churn. Their key
    /// records and cells stay attached for the next series that takes the
    /// slot. Returns how many slots were freed.
    ///
    /// A slot k is marked CLEANING, then the cluster after it is scanned
    /// (sequentially consistent): a live, tentative or claimed slot whose
    /// probe chain passes k keeps k dead. An insert that claimed a slot
    /// past k after the scan went by sees k CLEANING or EMPTY in its own
    /// re-scan and gives way.
    pub fn clean(&self, now: u32) -> u64 {
        let mask = self.mask();
        let mut freed = 0;
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
            let mut j = (k + 1) & mask;
            for _ in 1..self.slots.len() {
                let wj = self.slots[j].word.load(Ordering::SeqCst);
                if wj == EMPTY {
                    break;
                }
                let st = state(wj);
                if st != DEAD && st != CLEANING {
                    let home = (wj & HASH_MASK) as usize & mask;
                    if j.wrapping_sub(home) & mask >= j.wrapping_sub(k) & mask {
                        free = false;
                        break;
                    }
                }
                j = (j + 1) & mask;
            }
            let to = if free { EMPTY } else { w };
            if slot
                .word
                .compare_exchange(cleaning, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
                && free
            {
                self.slots_used.fetch_sub(1, Ordering::Relaxed);
                freed += 1;
            }
        }
        freed
    }

    /// Whether a DEAD slot may take a new series at time `now` (seconds).
    fn reusable(&self, slot: &Slot, now: u32) -> bool {
        let off = slot.rec_off();
        if off == NONE {
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
        let mask = self.mask();
        let mut i = h as usize & mask;
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
            i = (i + 1) & mask;
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
            match self.try_insert(family, key, width, now, h) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(TableError::Full) if !cleaned => {
                    cleaned = true;
                    if self.clean(now) == 0 {
                        return Err(TableError::Full);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(TableError::Stuck)
    }

    /// One attempt; None when a race was lost and the caller should retry.
    fn try_insert(
        &self,
        family: u32,
        key: &[u8],
        width: u32,
        now: u32,
        h: u64,
    ) -> Result<Option<(u32, bool)>, TableError> {
        let mask = self.mask();
        let home = h as usize & mask;
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
            i = (i + 1) & mask;
        }
        let (target, expect) = match (reuse, end) {
            (Some(r), _) => r,
            (None, Some(e)) => {
                if self.slots_used.load(Ordering::Relaxed) >= self.slot_limit() {
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
            // a cleaned slot keeps its old record and cells for reuse
            self.slots_used.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        let cell = match self.fill(slot, family, key, width) {
            Some(c) => c,
            None => {
                slot.word
                    .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
                return Err(TableError::Full);
            }
        };
        slot.word
            .store((TENTATIVE << STATE_SHIFT) | h, Ordering::SeqCst);
        // store-load ordering against a competitor's (or a cleaner's) store
        // and scan: at least one of two sides sees the other
        fence(Ordering::SeqCst);
        // Look for another copy of this key published meanwhile.
        let my_pos = target.wrapping_sub(home) & mask;
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
                        let pos = j.wrapping_sub(home) & mask;
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
            j = (j + 1) & mask;
        }
        slot.word
            .store((READY << STATE_SHIFT) | h, Ordering::Release);
        Ok(Some((cell, true)))
    }

    /// Withdraws a TENTATIVE copy that lost: DEAD, reusable at once.
    fn give_way(&self, slot: &Slot, h: u64) {
        let off = slot.rec_off();
        if off != NONE {
            self.tag(off).store(DEAD_TAG, Ordering::Release);
        }
        slot.word
            .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
    }

    /// Attaches a key record and zeroed cells to a CLAIMED slot, reusing
    /// what a dead series left when it fits. None when the zone is full.
    fn fill(&self, slot: &Slot, family: u32, key: &[u8], width: u32) -> Option<u32> {
        let old_off = slot.rec_off();
        let old_cell = slot.cell_idx();
        // SAFETY: a DEAD slot's record was published before; we own the slot.
        let old = (old_off != NONE).then(|| unsafe { self.rec(old_off) });
        // Secure both the record and the cells before changing the slot: a
        // slot left with a record whose width is not its cells' would hand
        // out overlapping cells later.
        let mut give_back = None;
        let off = match &old {
            Some(r) if r.cap as usize >= key.len() => old_off,
            _ => {
                let class = rec_class(key.len());
                let off = match self.rec_pop(class) {
                    Some(o) => o as u64,
                    None => {
                        let off = self.keys.alloc(REC_HDR + (8u64 << class), 4)?;
                        if off >= (NONE - 1) as u64 {
                            return None;
                        }
                        off
                    }
                };
                // SAFETY: the record is ours alone (just reserved, or just
                // taken off the free list).
                unsafe {
                    let p = self.keys.at(off);
                    (p.add(4) as *mut u32).write_unaligned((1u32 << class) << 16);
                }
                // the dead series' record, too small now, goes back for reuse
                if let Some(r) = &old {
                    give_back = Some((rec_class(r.cap as usize), old_off));
                }
                off as u32
            }
        };
        let reuse_cells = matches!(&old, Some(r) if old_cell != NONE && r.width == width);
        let cell = if reuse_cells {
            old_cell
        } else {
            // on failure a fresh record stays unused in the arena: the slot
            // keeps its old record and cells, consistent with each other
            self.alloc_cells(width)?
        };
        if reuse_cells {
            self.cells.zero(cell, width);
        }
        slot.set_cell_idx(cell);
        // SAFETY: the record at `off` is ours (a fresh one, or the dead
        // series' whose slot we claimed); nobody reads it before our
        // TENTATIVE store, but for readers that loaded the old DEAD state,
        // who read only the atomic tag.
        unsafe {
            let p = self.keys.at(off as u64);
            let meta = (p.add(4) as *const u32).read_unaligned() & 0xffff_0000;
            (p.add(4) as *mut u32).write_unaligned(meta | key.len() as u32);
            (p.add(8) as *mut u32).write_unaligned(width);
            std::ptr::copy_nonoverlapping(key.as_ptr(), p.add(REC_HDR as usize), key.len());
        }
        self.tag(off).store(family, Ordering::Release);
        slot.set_rec_off(off);
        if let Some((class, old_off)) = give_back {
            // nobody reaches the old record any more: the slot was dead for
            // the grace period and now points at the new one
            self.rec_push(class, old_off);
        }
        Some(cell)
    }

    /// The `next` link of a free record (its width word while it is free).
    fn rec_next(&self, off: u32) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: `off` is a record inside the arena, 4-aligned, with a
        // 12-byte header; its third word is accessed atomically while the
        // record is on a free list.
        unsafe { &*(self.keys.at(off as u64 + 8) as *const std::sync::atomic::AtomicU32) }
    }

    /// Gives record `off` (of `class`) back for reuse.
    fn rec_push(&self, class: usize, off: u32) {
        let head = &self.rec_free[class];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            self.rec_next(off)
                .store(cur as u32, std::sync::atomic::Ordering::Relaxed);
            let new = (((cur >> 32) + 1) << 32) | (off as u64 + 1);
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes a free record of `class`, if any.
    fn rec_pop(&self, class: usize) -> Option<u32> {
        let head = &self.rec_free[class];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let first = cur as u32;
            if first == 0 {
                return None;
            }
            let off = first - 1;
            let next = self
                .rec_next(off)
                .load(std::sync::atomic::Ordering::Relaxed);
            let new = (((cur >> 32) + 1) << 32) | next as u64;
            match head.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(off),
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
        if off != NONE {
            // never exactly DEAD_TAG, which means "reusable at once"
            self.tag(off)
                .store(DEAD_TAG | (now & !DEAD_TAG).max(1), Ordering::Release);
        }
        true
    }

    /// The live series in slot `i`, if it holds one.
    pub fn get(&self, i: usize) -> Option<SeriesRef<'a>> {
        let slot = &self.slots[i];
        let w = slot.word.load(Ordering::Acquire);
        if state(w) != READY {
            return None;
        }
        let off = slot.rec_off();
        // SAFETY: READY was loaded with acquire just above.
        let r = unsafe { self.rec(off) };
        if r.tag & DEAD_TAG != 0 {
            return None; // deleted since the state load
        }
        Some(SeriesRef {
            slot: i,
            family: r.tag,
            // SAFETY: as above.
            key: unsafe { self.key_bytes(off, r.len) },
            cell: slot.cell_idx(),
        })
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct NoCells;
    impl CellStore for NoCells {
        fn zero(&self, _: u32, _: u32) {}
    }

    struct Mem {
        slots: Vec<Slot>,
        keys: Vec<u64>,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
        reused: AtomicU64,
        rec_free: Vec<AtomicU64>,
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
            rec_free: (0..REC_CLASSES).map(|_| AtomicU64::new(0)).collect(),
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
            cells: &NoCells,
            grace: REUSE_GRACE_SECS,
            rec_free: &m.rec_free,
        }
    }

    #[test]
    fn insert_find_kill() {
        let mut m = mem(16, 1024);
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
        let mut m = mem(64, 1 << 12);
        let t = table(&mut m, 200);
        let mut now = 100;
        for round in 0..500u32 {
            let keys: Vec<[u8; 4]> = (0..20u32).map(|k| (round * 20 + k).to_le_bytes()).collect();
            for k in &keys {
                if let Err(e) = t.get_or_insert(3, k, 1, now) {
                    panic!(
                        "round {round}: {e:?}; slots {} cells {} keys {} census {:?}",
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
        // 10,000 series went through a table of 64 slots: every slot got
        // cells and a key record at most once
        assert!(t.slots_used.load(Ordering::Relaxed) <= 60);
        let cells = t.cells_used.load(Ordering::Relaxed);
        assert!(cells <= 64, "cells used {cells}");
        let keys = t.keys.used.load(Ordering::Relaxed);
        assert!(keys <= 64 * (REC_HDR + 8), "key bytes used {keys}");
        assert_eq!(t.census().0, 0);
    }

    #[test]
    fn growing_keys_reuse_records() {
        // keys that grow a size class every few rounds: the records given
        // back are taken again, the key arena stops growing
        let mut m = mem(64, 1 << 16);
        let t = table(&mut m, 1000);
        let mut now = 100;
        for round in 0..400u32 {
            let len = 4 + (round / 40) as usize * 3; // 4 .. 31 bytes
            let keys: Vec<Vec<u8>> = (0..20u32)
                .map(|k| {
                    let mut v = vec![b'x'; len];
                    v[..4].copy_from_slice(&(round * 20 + k).to_le_bytes());
                    v
                })
                .collect();
            for k in &keys {
                t.get_or_insert(3, k, 1, now).unwrap();
            }
            for k in &keys {
                let i = t.find(3, k).unwrap().unwrap();
                assert!(t.kill(i, now));
            }
            now += REUSE_GRACE_SECS;
        }
        let keys = t.keys.used.load(Ordering::Relaxed);
        // at most one record per slot per class seen (8, 16, 32 bytes)
        assert!(
            keys <= 64 * (3 * REC_HDR + 8 + 16 + 32),
            "key bytes used {keys}"
        );
    }

    #[test]
    fn refuses_when_full() {
        let mut m = mem(16, 1 << 16);
        let t = table(&mut m, 1000);
        let mut ok = 0;
        for i in 0..32u32 {
            match t.get_or_insert(0, &i.to_le_bytes(), 1, 0) {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e, TableError::Full),
            }
        }
        assert_eq!(ok, 15, "15/16 of 16 slots");
        // existing keys are still found when the table is full
        for i in 0..15u32 {
            assert!(t.get_or_insert(0, &i.to_le_bytes(), 1, 0).is_ok());
        }
        let mut m2 = mem(64, 1 << 16);
        let t2 = table(&mut m2, 3);
        assert!(t2.get_or_insert(0, b"x", 2, 0).is_ok());
        assert_eq!(t2.get_or_insert(0, b"y", 2, 0), Err(TableError::Full));
        let (_, claimed, dead) = t2.census();
        assert_eq!(
            (claimed, dead),
            (0, 1),
            "a refused insert leaves a dead slot"
        );
        assert_eq!(
            t2.get_or_insert(0, &[0u8; MAX_KEY_BYTES + 1], 1, 0),
            Err(TableError::KeyTooLong)
        );
    }

    #[test]
    fn threads_agree_on_cells() {
        let mut m = mem(1 << 12, 1 << 20);
        let t = table(&mut m, 1 << 20);
        // leave dead, reusable slots around so both insert paths race
        for k in 0..500u32 {
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
                        (0..1000u32)
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
        assert_eq!(t.census().0, 1000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct NoCells;
    impl CellStore for NoCells {
        fn zero(&self, _: u32, _: u32) {}
    }

    struct Mem {
        slots: Vec<Slot>,
        keys: std::cell::UnsafeCell<Vec<u64>>,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
        reused: AtomicU64,
        rec_free: Vec<AtomicU64>,
    }
    // SAFETY: the key arena is written only in regions reserved by one
    // thread's atomic bump (or a slot it claimed) and read only after the
    // slot's acquire load, which is the protocol under test.
    unsafe impl Sync for Mem {}
    unsafe impl Send for Mem {}

    fn mem(n: usize) -> Arc<Mem> {
        Arc::new(Mem {
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
            rec_free: (0..REC_CLASSES).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn with_table<R>(m: &Mem, f: impl FnOnce(&Table<'_>) -> R) -> R {
        // SAFETY: see the Sync impl above; the Vec is never resized.
        let base = unsafe { (*m.keys.get()).as_mut_ptr() as *mut u8 };
        let t = Table {
            slots: &m.slots,
            keys: Arena {
                base,
                cap: 1024,
                used: &m.used,
            },
            cells_used: &m.cells,
            cells_cap: 64,
            slots_used: &m.slots_used,
            reused: &m.reused,
            cells: &NoCells,
            grace: REUSE_GRACE_SECS,
            rec_free: &m.rec_free,
        };
        f(&t)
    }

    /// Runs `f` under loom with preemptions bounded (spin-waits would
    /// otherwise make the schedule space unbounded).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    fn ins(m: &Mem, k: &[u8], now: u32) -> u32 {
        with_table(m, |t| t.get_or_insert(1, k, 1, now).unwrap().0)
    }

    /// Two processes insert the same new key at once: both get one series.
    #[test]
    fn same_key_race() {
        model(|| {
            let m = mem(8);
            let m2 = m.clone();
            let th = loom::thread::spawn(move || ins(&m2, b"k", 0));
            let a = ins(&m, b"k", 0);
            let b = th.join().unwrap();
            assert_eq!(a, b);
            with_table(&m, |t| assert_eq!(t.census(), (1, 0, 0)));
        });
    }

    /// Different keys race for the same home slot while a third looks one up.
    #[test]
    fn colliding_keys_race() {
        model(|| {
            let m = mem(8);
            let mut keys = vec![];
            let mut k = 0u32;
            while keys.len() < 2 {
                if hash_key(1, &k.to_le_bytes()) & 7 == 0 {
                    keys.push(k.to_le_bytes());
                }
                k += 1;
            }
            let (k0, k1) = (keys[0], keys[1]);
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

    /// The same key inserted at once by a process that may reuse a dead
    /// slot and one that may not (it takes the EMPTY end of the chain):
    /// still one live series, and both get its cells.
    #[test]
    fn reuse_race_keeps_one_copy() {
        model(|| {
            let m = mem(8);
            // a dead series in the home slot of "k"
            let h = hash_key(1, b"k") as usize & 7;
            let mut other = 0u32;
            while hash_key(1, &other.to_le_bytes()) as usize & 7 != h {
                other += 1;
            }
            with_table(&m, |t| {
                t.get_or_insert(1, &other.to_le_bytes(), 1, 0).unwrap();
                let i = t.find(1, &other.to_le_bytes()).unwrap().unwrap();
                assert!(t.kill(i, 1));
            });
            let m2 = m.clone();
            let th = loom::thread::spawn(move || ins(&m2, b"k", 100));
            let a = ins(&m, b"k", 2);
            let b = th.join().unwrap();
            assert_eq!(a, b, "both got the same series");
            with_table(&m, |t| assert_eq!(t.census().0, 1, "one live copy"));
        });
    }

    /// A cleaner empties a dead slot while an insert walks past it to the
    /// next EMPTY slot: the new series must stay findable (exactly one copy).
    #[test]
    fn clean_races_insert() {
        model(|| {
            let m = mem(8);
            let h = hash_key(1, b"k") as usize & 7;
            let mut other = 0u32;
            while hash_key(1, &other.to_le_bytes()) as usize & 7 != h {
                other += 1;
            }
            with_table(&m, |t| {
                t.get_or_insert(1, &other.to_le_bytes(), 1, 0).unwrap();
                let i = t.find(1, &other.to_le_bytes()).unwrap().unwrap();
                assert!(t.kill(i, 1));
            });
            let m2 = m.clone();
            // at time 2 the dead slot is not reusable yet: the insert goes past it
            let th = loom::thread::spawn(move || ins(&m2, b"k", 2));
            with_table(&m, |t| t.clean(100));
            let a = th.join().unwrap();
            with_table(&m, |t| {
                assert_eq!(t.get_or_insert(1, b"k", 1, 2).unwrap(), (a, false));
                assert_eq!(t.census().0, 1, "one live copy");
            });
        });
    }
}
