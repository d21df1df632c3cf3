//! The lock-free label-set table: open addressing over fixed slots in the
//! zone, keys in a bump arena, value cells allocated once per series.
//!
//! A slot moves EMPTY -> CLAIMED -> READY (or CLAIMED -> DEAD when the zone
//! has no room for its key or cells, and READY -> DEAD when the series is
//! deleted). New series go only into EMPTY slots, so every process probing
//! for the same key walks the same sequence and meets the same first EMPTY
//! slot: two racing inserts of one key resolve on that slot's CAS, the loser
//! waits for the winner's READY and returns the winner's cells. The key
//! record and cell index are written before the READY store (release) and
//! read after the state load (acquire).

use crate::sync::{spin_hint, AtomicU32, AtomicU64, Ordering};

const STATE_SHIFT: u32 = 62;
const HASH_MASK: u64 = (1 << STATE_SHIFT) - 1;
const EMPTY: u64 = 0;
const CLAIMED: u64 = 1;
const READY: u64 = 2;
const DEAD: u64 = 3;

/// How long a lookup waits for another process to finish an insert of the
/// same key before giving up (the other process may have died mid-insert).
const CLAIM_SPIN_LIMIT: u32 = 1 << 20;

/// Longest encoded label-value key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 16 * 1024;

/// One slot of the table: 16 bytes.
#[repr(C)]
pub struct Slot {
    /// state (2 high bits) | 62 bits of the key hash; 0 is EMPTY.
    pub word: AtomicU64,
    /// Byte offset of the key record in the key arena.
    pub key: AtomicU32,
    /// Index of the series' first cell (the same index in every plane).
    pub cell: AtomicU32,
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

/// A view of the table inside a zone (or, in tests, inside heap memory).
pub struct Table<'a> {
    pub slots: &'a [Slot],
    pub keys: Arena<'a>,
    /// Cells handed out so far (in cells of 8 bytes, per plane).
    pub cells_used: &'a AtomicU64,
    pub cells_cap: u64,
    /// Slots that ever left EMPTY.
    pub slots_used: &'a AtomicU64,
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

impl<'a> Table<'a> {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Most slots that may leave EMPTY: 7/8 of the table keeps probes short.
    pub fn slot_limit(&self) -> u64 {
        (self.slots.len() as u64 / 8) * 7
    }

    /// Reads the key record at `off`: (family, key bytes).
    ///
    /// # Safety
    /// `off` must come from a slot whose READY state was loaded with acquire
    /// ordering (the record is then fully written and never changes).
    unsafe fn record(&self, off: u32) -> (u32, &'a [u8]) {
        // SAFETY: the record was allocated inside the arena by `insert` with
        // 8 header bytes (family, length) followed by `len` key bytes, all
        // written before the slot's READY release store that the caller
        // acquired; records are never modified after that.
        unsafe {
            let p = self.keys.at(off as u64);
            let fam = (p as *const u32).read_unaligned();
            let len = (p.add(4) as *const u32).read_unaligned();
            let bytes = std::slice::from_raw_parts(p.add(8), len as usize);
            (fam, bytes)
        }
    }

    /// Waits while a slot is CLAIMED, returning the word it settled to.
    fn settle(&self, slot: &Slot, mut w: u64) -> Result<u64, TableError> {
        let mut spins = 0u32;
        while w >> STATE_SHIFT == CLAIMED {
            spins += 1;
            if spins > CLAIM_SPIN_LIMIT {
                return Err(TableError::Stuck);
            }
            spin_hint();
            w = slot.word.load(Ordering::Acquire);
        }
        Ok(w)
    }

    /// Finds the READY slot for (family, key), if any.
    pub fn find(&self, family: u32, key: &[u8]) -> Result<Option<usize>, TableError> {
        let h = hash_key(family, key) & HASH_MASK;
        let mask = self.mask();
        let mut i = h as usize & mask;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            let mut w = slot.word.load(Ordering::Acquire);
            if w == EMPTY {
                return Ok(None);
            }
            if w & HASH_MASK == h {
                w = self.settle(slot, w)?;
                if w >> STATE_SHIFT == READY {
                    let off = slot.key.load(Ordering::Relaxed);
                    // SAFETY: READY was loaded with acquire just above.
                    let (f, k) = unsafe { self.record(off) };
                    if f == family && k == key {
                        return Ok(Some(i));
                    }
                }
            }
            i = (i + 1) & mask;
        }
        Ok(None)
    }

    /// Returns the cell index of (family, key), inserting the series with
    /// `width` zeroed cells if it is not there. The bool is true when this
    /// call created it.
    pub fn get_or_insert(
        &self,
        family: u32,
        key: &[u8],
        width: u32,
    ) -> Result<(u32, bool), TableError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(TableError::KeyTooLong);
        }
        let h = hash_key(family, key) & HASH_MASK;
        let mask = self.mask();
        let mut i = h as usize & mask;
        let mut probes = 0usize;
        while probes < self.slots.len() {
            let slot = &self.slots[i];
            let mut w = slot.word.load(Ordering::Acquire);
            if w == EMPTY {
                if self.slots_used.load(Ordering::Relaxed) >= self.slot_limit() {
                    return Err(TableError::Full);
                }
                let claimed = (CLAIMED << STATE_SHIFT) | h;
                match slot.word.compare_exchange(
                    EMPTY,
                    claimed,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        self.slots_used.fetch_add(1, Ordering::Relaxed);
                        return self.fill(slot, h, family, key, width).map(|c| (c, true));
                    }
                    // Someone else took this slot: look at what it holds now
                    // without moving on (it may be our key).
                    Err(now) => w = now,
                }
            }
            if w & HASH_MASK == h {
                w = self.settle(slot, w)?;
                if w >> STATE_SHIFT == READY {
                    let off = slot.key.load(Ordering::Relaxed);
                    // SAFETY: READY was loaded with acquire (settle or above).
                    let (f, k) = unsafe { self.record(off) };
                    if f == family && k == key {
                        return Ok((slot.cell.load(Ordering::Relaxed), false));
                    }
                }
            }
            i = (i + 1) & mask;
            probes += 1;
        }
        Err(TableError::Full)
    }

    /// Allocates cells and key record for a CLAIMED slot and publishes it.
    fn fill(
        &self,
        slot: &Slot,
        h: u64,
        family: u32,
        key: &[u8],
        width: u32,
    ) -> Result<u32, TableError> {
        let cell = match self.alloc_cells(width) {
            Some(c) => c,
            None => {
                slot.word
                    .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
                return Err(TableError::Full);
            }
        };
        let off = match self.keys.alloc(8 + key.len() as u64, 4) {
            Some(o) if o <= u32::MAX as u64 => o,
            _ => {
                slot.word
                    .store((DEAD << STATE_SHIFT) | h, Ordering::Release);
                return Err(TableError::Full);
            }
        };
        // SAFETY: `off .. off + 8 + key.len()` was just reserved for us alone
        // in the arena; nobody reads it before the READY release below.
        unsafe {
            let p = self.keys.at(off);
            (p as *mut u32).write_unaligned(family);
            (p.add(4) as *mut u32).write_unaligned(key.len() as u32);
            std::ptr::copy_nonoverlapping(key.as_ptr(), p.add(8), key.len());
        }
        slot.key.store(off as u32, Ordering::Relaxed);
        slot.cell.store(cell, Ordering::Relaxed);
        slot.word
            .store((READY << STATE_SHIFT) | h, Ordering::Release);
        Ok(cell)
    }

    /// Reserves `width` consecutive cells (in every plane).
    pub fn alloc_cells(&self, width: u32) -> Option<u32> {
        let mut cur = self.cells_used.load(Ordering::Relaxed);
        loop {
            let end = cur + width as u64;
            if end > self.cells_cap || end > u32::MAX as u64 {
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

    /// Marks the series in slot `i` deleted. Returns false if it was not live.
    pub fn kill(&self, i: usize) -> bool {
        let slot = &self.slots[i];
        let w = slot.word.load(Ordering::Acquire);
        if w >> STATE_SHIFT != READY {
            return false;
        }
        let dead = (DEAD << STATE_SHIFT) | (w & HASH_MASK);
        slot.word
            .compare_exchange(w, dead, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The live series in slot `i`, if it holds one.
    pub fn get(&self, i: usize) -> Option<SeriesRef<'a>> {
        let slot = &self.slots[i];
        let w = slot.word.load(Ordering::Acquire);
        if w >> STATE_SHIFT != READY {
            return None;
        }
        let off = slot.key.load(Ordering::Relaxed);
        // SAFETY: READY was loaded with acquire just above.
        let (family, key) = unsafe { self.record(off) };
        Some(SeriesRef {
            slot: i,
            family,
            key,
            cell: slot.cell.load(Ordering::Relaxed),
        })
    }

    /// Counts slots by state: (ready, claimed, dead).
    pub fn census(&self) -> (u64, u64, u64) {
        let (mut r, mut c, mut d) = (0, 0, 0);
        for s in self.slots {
            match s.word.load(Ordering::Acquire) >> STATE_SHIFT {
                READY => r += 1,
                CLAIMED => c += 1,
                DEAD => d += 1,
                _ => {}
            }
        }
        (r, c, d)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Mem {
        slots: Vec<Slot>,
        keys: Vec<u64>,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
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
        }
    }

    #[test]
    fn insert_find_kill() {
        let mut m = mem(16, 1024);
        let t = table(&mut m, 100);
        let (a, new) = t.get_or_insert(1, b"a", 2).unwrap();
        assert!(new);
        let (a2, new2) = t.get_or_insert(1, b"a", 2).unwrap();
        assert_eq!((a, false), (a2, new2));
        let (b, _) = t.get_or_insert(2, b"a", 2).unwrap();
        assert_ne!(a, b, "same key bytes in another family is another series");
        let i = t.find(1, b"a").unwrap().unwrap();
        assert!(t.kill(i));
        assert!(!t.kill(i));
        assert_eq!(t.find(1, b"a").unwrap(), None);
        let (c, new3) = t.get_or_insert(1, b"a", 2).unwrap();
        assert!(new3);
        assert_ne!(c, a, "a deleted series comes back with fresh cells");
    }

    #[test]
    fn refuses_when_full() {
        let mut m = mem(16, 1 << 16);
        let t = table(&mut m, 1000);
        let mut ok = 0;
        for i in 0..32u32 {
            match t.get_or_insert(0, &i.to_le_bytes(), 1) {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e, TableError::Full),
            }
        }
        assert_eq!(ok, 14, "7/8 of 16 slots");
        // existing keys are still found when the table is full
        for i in 0..14u32 {
            assert!(t.get_or_insert(0, &i.to_le_bytes(), 1).is_ok());
        }
        let mut m2 = mem(64, 1 << 16);
        let t2 = table(&mut m2, 3);
        assert!(t2.get_or_insert(0, b"x", 2).is_ok());
        assert_eq!(t2.get_or_insert(0, b"y", 2), Err(TableError::Full));
        let (_, _, dead) = t2.census();
        assert_eq!(
            dead, 1,
            "a refused insert leaves a dead slot, not a claimed one"
        );
        assert_eq!(
            t2.get_or_insert(0, &[0u8; MAX_KEY_BYTES + 1], 1),
            Err(TableError::KeyTooLong)
        );
    }

    #[test]
    fn threads_agree_on_cells() {
        let mut m = mem(1 << 12, 1 << 20);
        let t = table(&mut m, 1 << 20);
        let results: Vec<Vec<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000u32)
                            .map(|k| t.get_or_insert(7, &k.to_le_bytes(), 3).unwrap().0)
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
        assert_eq!(t.cells_used.load(Ordering::Relaxed), 3000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct Mem {
        slots: Vec<Slot>,
        keys: std::cell::UnsafeCell<Vec<u64>>,
        used: AtomicU64,
        cells: AtomicU64,
        slots_used: AtomicU64,
    }
    // SAFETY: the key arena is written only in regions reserved by one
    // thread's atomic bump and read only after the slot's acquire load, which
    // is the protocol under test.
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
            keys: std::cell::UnsafeCell::new(vec![0u64; 64]),
            used: AtomicU64::new(0),
            cells: AtomicU64::new(0),
            slots_used: AtomicU64::new(0),
        })
    }

    fn with_table<R>(m: &Mem, f: impl FnOnce(&Table<'_>) -> R) -> R {
        // SAFETY: see the Sync impl above; the Vec is never resized.
        let base = unsafe { (*m.keys.get()).as_mut_ptr() as *mut u8 };
        let t = Table {
            slots: &m.slots,
            keys: Arena {
                base,
                cap: 512,
                used: &m.used,
            },
            cells_used: &m.cells,
            cells_cap: 64,
            slots_used: &m.slots_used,
        };
        f(&t)
    }

    /// Two processes insert the same new key at once: both get one series.
    #[test]
    fn same_key_race() {
        loom::model(|| {
            let m = mem(8);
            let m2 = m.clone();
            let th = loom::thread::spawn(move || {
                with_table(&m2, |t| t.get_or_insert(1, b"k", 1).unwrap().0)
            });
            let a = with_table(&m, |t| t.get_or_insert(1, b"k", 1).unwrap().0);
            let b = th.join().unwrap();
            assert_eq!(a, b);
            with_table(&m, |t| assert_eq!(t.census(), (1, 0, 0)));
        });
    }

    /// Different keys race for the same home slot while a third looks one up.
    #[test]
    fn colliding_keys_race() {
        loom::model(|| {
            let m = mem(8);
            // find two keys with the same home slot in an 8-slot table
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
            let th = loom::thread::spawn(move || {
                with_table(&m2, |t| t.get_or_insert(1, &k1, 1).unwrap().0)
            });
            let a = with_table(&m, |t| t.get_or_insert(1, &k0, 1).unwrap().0);
            let seen = with_table(&m, |t| t.find(1, &k1).unwrap());
            let b = th.join().unwrap();
            assert_ne!(a, b);
            if let Some(i) = seen {
                with_table(&m, |t| assert_eq!(t.get(i).unwrap().cell, b));
            }
            with_table(&m, |t| {
                assert_eq!(t.get_or_insert(1, &k0, 1).unwrap(), (a, false));
                assert_eq!(t.get_or_insert(1, &k1, 1).unwrap(), (b, false));
            });
        });
    }
}
