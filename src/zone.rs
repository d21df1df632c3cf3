//! The shared mapping: header, layout, planes, and the zone table that keeps
//! each named zone alive for the whole life of the process (the nginx master
//! keeps it across reloads, workers inherit it at fork).

use crate::registry::FamilyRec;
use crate::series::{Arena, CellStore, FreeLists, Slot, Table, CELL_LISTS};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

/// "SHMPROM1" little-endian.
pub const MAGIC: u64 = 0x314d_4f52_504d_4853;
/// Bumped whenever the in-zone layout changes.
pub const LAYOUT_VERSION: u32 = 7;
/// Error kinds counted in the header (index = kind code from the ABI).
pub const ERROR_KINDS: [&str; 6] = [
    "bad_value",
    "bad_labels",
    "series_dropped",
    "stuck_insert",
    "internal",
    "key_too_long",
];
/// Largest number of planes a zone can have (plane 0 is the shared one).
pub const MAX_PLANES: u32 = 256;
/// Smallest zone accepted.
pub const MIN_SIZE: u64 = 256 * 1024;

/// One per-writer plane's owner record, alone on its cache line.
#[repr(C, align(64))]
pub struct PlaneRec {
    /// Owner pid; 0 when never claimed. While a claim is under way the
    /// word is `pid | CLAIMING` (bit 31, see crate::planes): held, but not
    /// yet counted for livesum gauges.
    pub pid: AtomicU32,
    _pad: u32,
    /// Owner's start time (clock ticks since boot) to tell pid reuse apart.
    pub start: AtomicU64,
    /// How many times the plane was claimed (first claims and adoptions).
    pub claims: AtomicU64,
}

/// The zone header at offset 0 of the mapping.
#[repr(C)]
pub struct Header {
    pub magic: u64,
    pub layout_version: u32,
    pub planes: u32,
    pub size: u64,
    pub families_off: u64,
    pub families_cap: u64,
    pub planes_off: u64,
    pub slots_off: u64,
    pub slots_cap: u64,
    pub keys_off: u64,
    pub keys_cap: u64,
    pub cells_off: u64,
    pub cells_cap: u64,
    /// Bumped on every delete, reset or family retirement: workers drop
    /// their label caches when it moves. Read by Lua through a pointer.
    pub epoch: AtomicU32,
    _pad0: u32,
    pub keys_used: AtomicU64,
    pub cells_used: AtomicU64,
    pub slots_used: AtomicU64,
    pub families_used: AtomicU64,
    pub render_ns: AtomicU64,
    pub render_bytes: AtomicU64,
    pub errors: [AtomicU64; 8],
    /// New series that took a deleted series' slot.
    pub reused: AtomicU64,
    /// Series removed by the idle-series expiry (TTL).
    pub expired: AtomicU64,
    /// Seconds before a deleted series' room is reused (0: the default).
    pub reuse_grace: AtomicU32,
    _pad1: u32,
    /// Free key blocks (see series::FreeLists).
    pub blocks_free: AtomicU64,
    /// Free cell runs per width, and the width of each list.
    pub cells_free: [AtomicU64; CELL_LISTS],
    pub cells_free_width: [AtomicU32; CELL_LISTS],
    /// See series::Table::clean_gate.
    pub clean_gate: AtomicU64,
    /// Guards family definition only (never the update path).
    pub define_lock: libc::pthread_mutex_t,
}

/// A zone opened in this process: the base of the mapping and its length.
#[derive(Clone, Copy)]
pub struct Zone {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics or
// through regions handed out by atomic allocation; the pointer is valid for
// the life of the process (zones are never unmapped).
unsafe impl Send for Zone {}
// SAFETY: as above.
unsafe impl Sync for Zone {}

struct Opened {
    name: String,
    zone: Zone,
}

static ZONES: Mutex<Vec<Opened>> = Mutex::new(Vec::new());

/// Errors from opening a zone.
#[derive(Debug)]
pub enum OpenError {
    Invalid(String),
    Os(String),
}

/// Parses "32m", "512k", "1g" or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// The cells per series a zone's shares are sized for unless told
/// otherwise: counters and gauges (one cell) with some histograms.
pub const DEFAULT_CELLS_PER_SERIES: f64 = 1.25;

/// The most cells per series a zone's shares can be sized for (a histogram
/// of the most buckets takes [`crate::registry::MAX_BUCKETS`] + 2).
pub const MAX_CELLS_PER_SERIES: f64 = 1024.0;

/// Where each region goes for a zone of `size` bytes and `planes` planes.
pub struct Layout {
    pub families_off: u64,
    pub families_cap: u64,
    pub planes_off: u64,
    pub slots_off: u64,
    pub slots_cap: u64,
    pub keys_off: u64,
    pub keys_cap: u64,
    pub cells_off: u64,
    pub cells_cap: u64,
}

impl Layout {
    /// Splits the zone: fixed header, family records and plane records, then
    /// the rest shared out so that a typical series (short labels, a counter)
    /// fills slots, keys and cells at about the same rate.
    pub fn compute(size: u64, planes: u32) -> Result<Layout, String> {
        Self::compute_for(size, planes, DEFAULT_CELLS_PER_SERIES)
    }

    /// Whether the zone of header `h` was shared out as this layout shares
    /// (the same table and key arena; the cells get the rest).
    fn shares_of(&self, h: &Header) -> bool {
        self.slots_cap == h.slots_cap && self.keys_cap == h.keys_cap
    }

    /// [`compute`](Self::compute) for series of `cells` cells on average
    /// (1 for counters and gauges, buckets + 2 for a histogram's label
    /// set): the slots and key blocks get the share such series leave
    /// them, so a zone of histograms runs out of its regions together
    /// instead of its cells long before its table.
    pub fn compute_for(size: u64, planes: u32, cells: f64) -> Result<Layout, String> {
        if !(1.0..=MAX_CELLS_PER_SERIES).contains(&cells) {
            return Err(format!(
                "cells per series must be 1..{MAX_CELLS_PER_SERIES}, got {cells}"
            ));
        }
        if size < MIN_SIZE {
            return Err(format!("zone size {size} is below the minimum {MIN_SIZE}"));
        }
        if planes == 0 || planes > MAX_PLANES {
            return Err(format!("planes must be 1..{MAX_PLANES}, got {planes}"));
        }
        let hdr = align_up(std::mem::size_of::<Header>() as u64, 64);
        let families_cap = (size / (64 * 1024)).clamp(64, 4096);
        let families_off = hdr;
        let planes_off = align_up(
            families_off + families_cap * std::mem::size_of::<FamilyRec>() as u64,
            64,
        );
        // the plane records, then one spare owner record per worker plane
        // (see Zone::spares)
        let slots_off = align_up(planes_off + (2 * planes as u64 - 1) * 64, 64);
        let rest = size - slots_off;
        // Per series budget: 16 B / (15/16) of slot, ~1.25 key blocks of
        // 24 B (short label values fit one; the pool is shared by all
        // series, so longer keys borrow from shorter ones), 8 B x planes x
        // `cells` (by default ~1.25: histograms need more).
        let cell_bytes = (8.0 * cells * planes as f64).round() as u64;
        let per_series = 17 + 30 + cell_bytes;
        // The slots' share in whole slots, any count (the table needs no
        // power of two), rounded down to a multiple of 16 so that 15/16 of
        // it (the slot limit) is exact: one usable slot per series
        // budgeted. The key and cell arenas get the rest, ~1.25 blocks and
        // cells per usable slot, so for short counters they outlast the
        // table, as they must, or under churn the room held by dead slots
        // strands while fresh slots find the arenas empty. Longer keys and
        // histograms use up that quarter: churned fast (dead series keep
        // their room for the reuse grace) they can run the arenas out
        // before the table.
        let slots_cap = (rest * 17 / per_series / 16) & !15;
        let keys_off = align_up(slots_off + slots_cap * 16, 64);
        let after_slots = size - keys_off;
        let keys_cap = (after_slots * 30 / (30 + cell_bytes)).min(u32::MAX as u64);
        let cells_off = align_up(keys_off + keys_cap, 64);
        let cells_cap = (size - cells_off) / (8 * planes as u64);
        if cells_cap < 16 || slots_cap < 16 {
            return Err(format!("zone size {size} is too small for {planes} planes"));
        }
        Ok(Layout {
            families_off,
            families_cap,
            planes_off,
            slots_off,
            slots_cap,
            keys_off,
            keys_cap,
            cells_off,
            cells_cap,
        })
    }
}

fn os_err(what: &str) -> OpenError {
    OpenError::Os(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl Zone {
    /// Opens the zone called `name` in this process, creating it on first
    /// use. An anonymous shared mapping unless `path` names a file (in
    /// /dev/shm, say) whose values then survive restarts. Returns the zone
    /// and whether it existed already with another size or plane count.
    pub fn open(
        name: &str,
        size: u64,
        planes: u32,
        path: Option<&str>,
    ) -> Result<(Zone, bool), OpenError> {
        Self::open_for(name, size, planes, DEFAULT_CELLS_PER_SERIES, path)
    }

    /// [`open`](Self::open) with the regions shared for series of `cells`
    /// cells on average ([`Layout::compute_for`]). The flag also says when
    /// the zone existed with regions shared for another `cells`; a zone
    /// file made so is refused.
    pub fn open_for(
        name: &str,
        size: u64,
        planes: u32,
        cells: f64,
        path: Option<&str>,
    ) -> Result<(Zone, bool), OpenError> {
        if name.is_empty() || name.len() > 255 {
            return Err(OpenError::Invalid("zone name must be 1..255 bytes".into()));
        }
        let mut zones = ZONES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = zones.iter().find(|o| o.name == name) {
            let h = o.zone.header();
            let differs = h.size != size
                || h.planes != planes
                || Layout::compute_for(size, planes, cells).map_or(true, |l| !l.shares_of(h));
            return Ok((o.zone, differs));
        }
        let layout = Layout::compute_for(size, planes, cells).map_err(OpenError::Invalid)?;
        let zone = match path {
            None => Self::map_anon(size)?,
            Some(p) => Self::map_file(p, size)?,
        };
        let h = zone.header();
        if h.magic == MAGIC {
            if h.layout_version != LAYOUT_VERSION
                || h.size != size
                || h.planes != planes
                || !layout.shares_of(h)
            {
                return Err(OpenError::Invalid(format!(
                    "zone file {} was made with another layout (version {}, size {}, planes {}, {} slots); remove it or use the same settings",
                    path.unwrap_or("?"),
                    h.layout_version,
                    h.size,
                    h.planes,
                    h.slots_cap
                )));
            }
        } else {
            zone.init(size, planes, &layout)?;
        }
        pin_library();
        zones.push(Opened {
            name: name.to_string(),
            zone,
        });
        Ok((zone, false))
    }

    fn map_anon(size: u64) -> Result<Zone, OpenError> {
        // SAFETY: a fresh anonymous shared mapping; no existing memory is
        // affected. MAP_SHARED makes it shared with children forked later.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        Ok(Zone {
            base: p as *mut u8,
            len: size as usize,
        })
    }

    fn map_file(path: &str, size: u64) -> Result<Zone, OpenError> {
        let c = std::ffi::CString::new(path)
            .map_err(|_| OpenError::Invalid("zone path contains a NUL byte".into()))?;
        // SAFETY: c is a valid NUL-terminated path; flags and mode are plain
        // integers.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(os_err(&format!("open {path}")));
        }
        // SAFETY: fd is an open file descriptor we own; st is written by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = os_err("fstat");
            // SAFETY: fd is ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: fd is ours; growing (or keeping) the file to `size`.
        if st.st_size as u64 != size && unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            let e = os_err("ftruncate");
            // SAFETY: fd is ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: maps the whole file, which is `size` bytes long now.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        // SAFETY: the mapping keeps the file referenced; the fd is ours.
        unsafe { libc::close(fd) };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        Ok(Zone {
            base: p as *mut u8,
            len: size as usize,
        })
    }

    fn init(&self, size: u64, planes: u32, l: &Layout) -> Result<(), OpenError> {
        let h = self.base as *mut Header;
        // SAFETY: the mapping is at least MIN_SIZE bytes, larger than the
        // header, page-aligned, and not yet visible to any other process
        // (children fork later; a file zone with a bad magic is ours to set).
        unsafe {
            (*h).layout_version = LAYOUT_VERSION;
            (*h).planes = planes;
            (*h).size = size;
            (*h).families_off = l.families_off;
            (*h).families_cap = l.families_cap;
            (*h).planes_off = l.planes_off;
            (*h).slots_off = l.slots_off;
            (*h).slots_cap = l.slots_cap;
            (*h).keys_off = l.keys_off;
            (*h).keys_cap = l.keys_cap;
            (*h).cells_off = l.cells_off;
            (*h).cells_cap = l.cells_cap;
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let rc = libc::pthread_mutex_init(&mut (*h).define_lock, &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(OpenError::Os(format!("pthread_mutex_init: error {rc}")));
            }
            std::sync::atomic::fence(Ordering::Release);
            (*h).magic = MAGIC;
        }
        Ok(())
    }

    /// Rebuilds a zone handle from the base pointer given out by [`Zone::as_ptr`].
    ///
    /// # Safety
    /// `p` must be the base of a zone opened in this process (or inherited
    /// from the process that opened it).
    pub unsafe fn from_ptr(p: *mut u8) -> Zone {
        // SAFETY: per the contract the header is initialised and mapped.
        let len = unsafe { (*(p as *const Header)).size } as usize;
        Zone { base: p, len }
    }

    /// Base of the mapping (the handle given to C and Lua).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// The zone header.
    pub fn header(&self) -> &Header {
        // SAFETY: base is a live mapping of `len` >= MIN_SIZE bytes with an
        // initialised header at offset 0, page-aligned.
        unsafe { &*(self.base as *const Header) }
    }

    fn region<T>(&self, off: u64, n: u64) -> &[T] {
        debug_assert!(off as usize + n as usize * std::mem::size_of::<T>() <= self.len);
        // SAFETY: the layout places `n` records of T at `off`, inside the
        // mapping, aligned to 64; T is made of atomics (or plain data only
        // written before the zone is shared), zero being a valid value.
        unsafe { std::slice::from_raw_parts(self.base.add(off as usize) as *const T, n as usize) }
    }

    /// Plane owner records.
    pub fn planes(&self) -> &[PlaneRec] {
        let h = self.header();
        self.region(h.planes_off, h.planes as u64)
    }

    /// Spare owner records, one per worker plane (`planes - 1`), after the
    /// plane records. A process that finds every plane held (the new
    /// workers of a reload, while the old ones drain) writes counters and
    /// histograms on the shared plane, and holds a spare for its share of
    /// livesum gauges: spare `s` (1-based) owns cell `s` past a livesum
    /// series' own cell on the shared plane, so that share drops out with
    /// its process as a plane's does (see crate::cells).
    pub fn spares(&self) -> &[PlaneRec] {
        let h = self.header();
        let n = h.planes as u64;
        self.region(h.planes_off + n * 64, n - 1)
    }

    /// How many spare owner records the zone has.
    pub fn nspares(&self) -> u32 {
        self.header().planes - 1
    }

    /// Family records.
    pub fn families(&self) -> &[FamilyRec] {
        let h = self.header();
        self.region(h.families_off, h.families_cap)
    }

    /// The label-set table.
    pub fn table(&self) -> Table<'_> {
        let h = self.header();
        Table {
            slots: self.region::<Slot>(h.slots_off, h.slots_cap),
            keys: Arena {
                // SAFETY: keys_off is inside the mapping per the layout.
                base: unsafe { self.base.add(h.keys_off as usize) },
                cap: h.keys_cap,
                used: &h.keys_used,
            },
            cells_used: &h.cells_used,
            cells_cap: h.cells_cap,
            slots_used: &h.slots_used,
            reused: &h.reused,
            cells: self,
            grace: match h.reuse_grace.load(Ordering::Relaxed) {
                0 => crate::series::REUSE_GRACE_SECS,
                g => g,
            },
            free: FreeLists {
                blocks: &h.blocks_free,
                cells: &h.cells_free,
                widths: &h.cells_free_width,
            },
            clean_gate: Some(&h.clean_gate),
        }
    }

    /// Byte offset from the base of cell `idx` of `plane`: the planes'
    /// cell regions follow one another from cells_off, cells_cap cells of
    /// 8 bytes each.
    fn cell_offset(&self, plane: u64, idx: u64) -> u64 {
        let h = self.header();
        h.cells_off + (plane * h.cells_cap + idx) * 8
    }

    /// Pointer to cell `idx` of `plane`.
    pub fn cell_ptr(&self, plane: u32, idx: u64) -> *mut u64 {
        let h = self.header();
        debug_assert!(plane < h.planes && idx < h.cells_cap);
        // SAFETY: plane < planes and idx < cells_cap keep the result inside
        // the cell region (planes x cells_cap x 8 bytes from cells_off).
        unsafe { self.base.add(self.cell_offset(plane as u64, idx) as usize) as *mut u64 }
    }

    /// Cell `idx` of `plane` as an atomic.
    pub fn cell(&self, plane: u32, idx: u64) -> &AtomicU64 {
        // SAFETY: cell_ptr is in bounds and 8-aligned; AtomicU64 has the
        // layout of u64; concurrent plain stores by a plane's owner are
        // aligned 8-byte stores, which readers see whole.
        unsafe { &*(self.cell_ptr(plane, idx) as *const AtomicU64) }
    }

    /// Bytes of the zone in use: the fixed regions, the table slots ever
    /// taken, and what the key and cell arenas handed out.
    pub fn bytes_used(&self) -> u64 {
        let h = self.header();
        h.slots_off
            + h.slots_used.load(Ordering::Relaxed).min(h.slots_cap) * 16
            + h.keys_used.load(Ordering::Relaxed).min(h.keys_cap)
            + h.cells_used.load(Ordering::Relaxed).min(h.cells_cap) * 8 * h.planes as u64
    }

    /// How much of each region new series take room from has been handed
    /// out, 0 to 1: the table's slots (against the 15/16 of them an insert
    /// may fill), the key arena (label values; family strings too) and the
    /// cell arena. A new series is refused when any of them has too little
    /// left. Room that deleted or expired series gave back is reused and
    /// still counts as handed out.
    pub fn fill_ratios(&self) -> [(&'static str, f64); 3] {
        let h = self.header();
        let ratio = |used: u64, cap: u64| {
            if cap == 0 {
                1.0
            } else {
                used.min(cap) as f64 / cap as f64
            }
        };
        [
            (
                "slots",
                ratio(
                    h.slots_used.load(Ordering::Relaxed),
                    self.table().slot_limit(),
                ),
            ),
            (
                "keys",
                ratio(h.keys_used.load(Ordering::Relaxed), h.keys_cap),
            ),
            (
                "cells",
                ratio(h.cells_used.load(Ordering::Relaxed), h.cells_cap),
            ),
        ]
    }

    /// Counts an error of kind `k` (index into [`ERROR_KINDS`]).
    pub fn count_error(&self, k: usize) {
        if let Some(c) = self.header().errors.get(k) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Invalidates every worker's label cache.
    pub fn bump_epoch(&self) {
        self.header().epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs `f` holding the definition lock (robust: a holder that died is
    /// taken over).
    pub fn with_define_lock<R>(&self, f: impl FnOnce() -> R) -> R {
        let m = &self.header().define_lock as *const _ as *mut libc::pthread_mutex_t;
        // SAFETY: the mutex was initialised process-shared and robust in init.
        let rc = unsafe { libc::pthread_mutex_lock(m) };
        if rc == libc::EOWNERDEAD {
            // SAFETY: we hold the mutex; its previous owner died. Definitions
            // are written so that a half-done one is harmless.
            unsafe { libc::pthread_mutex_consistent(m) };
        }
        let r = f();
        // SAFETY: we hold the mutex (rc was 0 or EOWNERDEAD).
        unsafe { libc::pthread_mutex_unlock(m) };
        r
    }
}

/// What [`Zone::prefault`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefaultHow {
    /// Makes every page of the zone resident, allocating the ones never
    /// touched, and maps them writable in this process: for the process
    /// that creates the zone (the nginx master, before workers fork).
    Allocate,
    /// Maps the zone's pages into this process's page tables: for a
    /// process that inherited the mapping (a worker). fork copies the
    /// mapping but not the page table entries of shared memory, so without
    /// this each page costs a worker a minor fault at its first touch.
    Map,
}

/// Which part of the zone [`Zone::prefault`] brings in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefaultPart {
    /// All of it.
    Zone,
    /// The header, family and owner records and the slot array of the
    /// series table: the part that new series touch at random (a new
    /// series lands on the slot of its hash: in a table sized for far more
    /// series than it holds, nearly every new series would fault a page of
    /// its own), while key blocks and cells are handed out in order and
    /// fault one page per many series.
    Table,
}

/// How [`Zone::prefault`] got there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefaultMethod {
    /// madvise(MADV_POPULATE_WRITE / MADV_POPULATE_READ), Linux 5.14 on.
    Madvise,
    /// One access per page, by [`Zone::touch_pages`] (older kernels).
    Touch,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl Zone {
    /// Brings the zone, or its table ([`PrefaultPart`]), in at once (see
    /// [`PrefaultHow`]) so that the first series to use a page does not
    /// pay its fault.
    ///
    /// Safe on a live zone, values being updated by other processes: the
    /// kernel populates without writing to the pages (MADV_POPULATE_WRITE
    /// faults them in as a write would, but stores nothing), and the
    /// fallback for kernels without it ([`Zone::touch_pages`]) only makes
    /// atomic accesses that leave every word as it is.
    ///
    /// With [`PrefaultHow::Allocate`] it first asks for transparent huge
    /// pages (MADV_HUGEPAGE): a hint, honoured only where the system allows
    /// them for shared memory (/sys/kernel/mm/transparent_hugepage/
    /// shmem_enabled `advise`, or a tmpfs mounted with `huge=advise` for a
    /// `path` zone); fewer TLB misses on the table, and a worker maps 2 MB
    /// at a time.
    pub fn prefault(&self, how: PrefaultHow, part: PrefaultPart) -> Result<PrefaultMethod, String> {
        let addr = self.base as *mut libc::c_void;
        let len = self.part_len(part);
        if how == PrefaultHow::Allocate {
            // SAFETY: advice on our own live mapping, `len` <= its length;
            // MADV_HUGEPAGE only changes how pages not yet there are
            // allocated, never the contents. Its result is ignored: a hint
            // (EINVAL on kernels built without transparent huge pages).
            unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
        }
        self.populate(0, len, how)
    }

    /// Populates bytes `off .. off + len` of the zone (`off` a multiple of
    /// the page size, the range inside the mapping) as [`Zone::prefault`]
    /// does: madvise, or one access per page on kernels before 5.14.
    fn populate(&self, off: usize, len: usize, how: PrefaultHow) -> Result<PrefaultMethod, String> {
        debug_assert!(off % page_size() == 0 && off + len <= self.len);
        let advice = match how {
            PrefaultHow::Allocate => libc::MADV_POPULATE_WRITE,
            PrefaultHow::Map => libc::MADV_POPULATE_READ,
        };
        // SAFETY: advice on our own live mapping: `off` is page-aligned
        // from its page-aligned base and `off + len` <= its length;
        // populating faults pages in (allocating zeroed ones where there
        // were none, as a first touch would) and changes no byte of the
        // zone.
        if unsafe { libc::madvise(self.base.add(off) as *mut libc::c_void, len, advice) } == 0 {
            return Ok(PrefaultMethod::Madvise);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            // a kernel before 5.14 does not know the advice
            self.touch_range(off, len, how);
            return Ok(PrefaultMethod::Touch);
        }
        Err(format!(
            "madvise({}) of {len} bytes: {e}",
            match how {
                PrefaultHow::Allocate => "MADV_POPULATE_WRITE",
                PrefaultHow::Map => "MADV_POPULATE_READ",
            },
        ))
    }

    /// Keeps the pages just past two allocation frontiers in memory and
    /// mapped into this process, ahead of use: the cell region's in plane
    /// `plane` (this process's own; 0, the shared plane, for a process
    /// without one) and the key arena's, up to `ahead` bytes past each.
    /// New series take cells and key blocks in order from these frontiers,
    /// so their first writes then find their pages there instead of each
    /// taking a page fault in the request that creates them. Meant to be
    /// called off the request path (a timer) now and then.
    ///
    /// `marks` is this process's record of how far each region (the
    /// plane's cells, the keys) is done, zone offsets; zero at first. It is
    /// per process: fork gives a child the mapping but not the page table
    /// entries of shared memory. At most `max_pages` pages are populated in
    /// one call, so that one call stays short, the cells' first (a
    /// histogram's label set takes more of them than of the keys). Returns
    /// the pages populated.
    pub fn populate_ahead(
        &self,
        plane: u32,
        ahead: u64,
        max_pages: u64,
        marks: &mut [u64; 2],
    ) -> Result<u64, String> {
        let h = self.header();
        let page = page_size() as u64;
        let cells_used = h.cells_used.load(Ordering::Relaxed).min(h.cells_cap);
        let keys_used = h.keys_used.load(Ordering::Relaxed).min(h.keys_cap);
        let plane = plane.min(h.planes.saturating_sub(1)) as u64;
        let cells_start = self.cell_offset(plane, 0);
        let regions = [
            (cells_start, cells_used * 8, h.cells_cap * 8),
            (h.keys_off, keys_used, h.keys_cap),
        ];
        let mut left = max_pages;
        let mut done = 0;
        for (r, (start, used, cap)) in regions.into_iter().enumerate() {
            let (frontier, end) = (start + used, start + cap);
            let want = frontier.saturating_add(ahead).min(end);
            let want = want
                .div_ceil(page)
                .saturating_mul(page)
                .min(self.len as u64);
            let first = frontier / page * page;
            // a mark from another region (the process's plane changed)
            // says nothing about this one
            let from = if (first..=want).contains(&marks[r]) {
                marks[r]
            } else {
                first
            };
            if want <= from || left == 0 {
                continue;
            }
            let to = want.min(from.saturating_add(left.saturating_mul(page)));
            self.populate(from as usize, (to - from) as usize, PrefaultHow::Allocate)?;
            marks[r] = to;
            let n = (to - from) / page;
            left -= n;
            done += n;
        }
        Ok(done)
    }

    /// Bytes from the base that `part` covers: the whole mapping, or up to
    /// the end of the slot array rounded up to a page.
    pub fn part_len(&self, part: PrefaultPart) -> usize {
        match part {
            PrefaultPart::Zone => self.len,
            PrefaultPart::Table => {
                let h = self.header();
                let end = (h.slots_off + h.slots_cap * 16) as usize;
                let page = page_size();
                end.div_ceil(page).saturating_mul(page).min(self.len)
            }
        }
    }

    /// The fallback of [`Zone::prefault`]: one access to the first word
    /// of every page. For [`PrefaultHow::Allocate`] a compare-and-swap of
    /// the word with the value just read: a write access (x86's `lock
    /// cmpxchg` writes whether or not it succeeds, so the page is
    /// allocated and mapped writable) that changes nothing, and that fails,
    /// leaving the word alone, when another process changed it in between,
    /// where a plain read then write could undo that update on a live
    /// zone. For [`PrefaultHow::Map`] a read.
    pub fn touch_pages(&self, how: PrefaultHow, part: PrefaultPart) {
        self.touch_range(0, self.part_len(part), how);
    }

    /// [`Zone::touch_pages`] for bytes `off .. off + len` (`off` a
    /// multiple of the page size, the range inside the mapping).
    fn touch_range(&self, off: usize, len: usize, how: PrefaultHow) {
        let page = page_size();
        let end = off + len;
        let mut off = off;
        while off < end {
            // SAFETY: off < end, inside the mapping; off is a
            // multiple of the page size, so the word is 8-aligned. Words of
            // the zone are updated by atomics or by aligned 8-byte stores,
            // which an atomic access of the same word never tears.
            let w = unsafe { &*(self.base.add(off) as *const AtomicU64) };
            let v = std::hint::black_box(w.load(Ordering::Relaxed));
            if how == PrefaultHow::Allocate {
                let _ = w.compare_exchange(v, v, Ordering::Relaxed, Ordering::Relaxed);
            }
            off += page;
        }
    }
}

/// Keeps this library loaded for the life of the process: LuaJIT unloads a
/// library when its clib object is collected, which would lose the zone table
/// across a reload.
fn pin_library() {
    let mut info: libc::Dl_info = unsafe {
        // SAFETY: Dl_info is plain data; zero is a valid initial value.
        std::mem::zeroed()
    };
    // SAFETY: dladdr only reads the address of one of our own functions.
    let ok = unsafe { libc::dladdr(pin_library as *const libc::c_void, &mut info) };
    if ok != 0 && !info.dli_fname.is_null() {
        // SAFETY: dli_fname is a valid C string from the loader; RTLD_NOLOAD
        // only takes a reference on an already-loaded object.
        unsafe {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NODELETE | libc::RTLD_NOLOAD,
            )
        };
    }
}

/// The start time of process `pid` in clock ticks since boot, from /proc.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command may contain spaces and parentheses: fields start after the last ')'
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether plane owner (pid, start) is still running.
pub fn owner_alive(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match proc_start_time(pid) {
        Some(s) => s == start,
        None => r == 0,
    }
}

impl CellStore for Zone {
    fn zero(&self, cell: u32, width: u32) {
        for p in 0..self.header().planes {
            for k in 0..width as u64 {
                self.cell(p, cell as u64 + k).store(0, Ordering::Relaxed);
            }
        }
    }
    fn link(&self, cell: u32) -> &AtomicU64 {
        self.cell(0, cell as u64)
    }
}

/// The monotonic clock in whole seconds (one clock for every process),
/// read through CLOCK_MONOTONIC_COARSE: the kernel's last tick, a few
/// milliseconds behind CLOCK_MONOTONIC at most, and read from memory
/// instead of the TSC (a new label set reads it once). Every stamp these
/// seconds are compared with comes from this function.
pub fn now_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}
