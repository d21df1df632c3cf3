//! The bodies of the fuzz targets, shared by the cargo-fuzz binaries
//! (fuzz/fuzz_targets/*.rs, nightly + libFuzzer) and by the stable replay
//! test of the main crate (tests/fuzz_replay.rs, which `#[path]`-includes
//! this file), so both run exactly the same checks.
//!
//! - [`series_table`]: insert / lookup / delete of label sets in the
//!   lock-free series table, on heap memory (as the unit tests in
//!   src/series.rs build it), against a model (a map of live keys).
//! - [`render`]: a real zone (`Zone::open`, unique name), families and
//!   series defined from the input, cells updated the way the Lua wrapper
//!   does; Prometheus text and OpenMetrics are rendered and parsed by a
//!   strict line parser here, and every value is compared with the model.
//!
//! Both panic on any disagreement: that is what the fuzzer reports.
//!
//! Depends only on std and the shmprom rlib.

#![allow(dead_code)]

use shmprom::cells::f64_add;
use shmprom::expose::{render as render_zone, Format};
use shmprom::registry::{self, Def, DefineError, Kind, SeriesError, MODE_LIVESUM, MODE_SET};
use shmprom::series::{
    blocks_for, Arena, CellStore, FreeLists, Slot, Table, TableError, BLOCK, CELL_LISTS,
    MAX_KEY_BYTES,
};
use shmprom::zone::{Zone, MIN_SIZE};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Reads fuzz input as a stream of small decisions; zeros when exhausted.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        if n <= 256 {
            self.byte() as usize % n
        } else {
            (((self.byte() as usize) << 8) | self.byte() as usize) % n
        }
    }
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1);
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
}

// ------------------------------------------------------------------ series table

struct Mem {
    slots: Vec<Slot>,
    keys: Vec<u64>,
    keys_used: AtomicU64,
    cells_used: AtomicU64,
    slots_used: AtomicU64,
    reused: AtomicU64,
    cells: Cells,
    blocks_free: AtomicU64,
    cells_free: Vec<AtomicU64>,
    cells_free_width: Vec<AtomicU32>,
}

/// The cells of the heap table (one plane): the table zeroes a reused
/// series' cells through [`CellStore`]; the target writes a marker into
/// every live series' cells and checks nobody else's insert touches them.
struct Cells(Vec<AtomicU64>);

impl CellStore for Cells {
    fn zero(&self, cell: u32, width: u32) {
        for c in &self.0[cell as usize..(cell + width) as usize] {
            c.store(0, Ordering::Relaxed);
        }
    }
    fn link(&self, cell: u32) -> &AtomicU64 {
        &self.0[cell as usize]
    }
}

fn mem(nslots: usize, key_bytes: usize, cells_cap: u64) -> Mem {
    Mem {
        slots: (0..nslots)
            .map(|_| Slot {
                word: AtomicU64::new(0),
                key: AtomicU32::new(0),
                cell: AtomicU32::new(0),
            })
            .collect(),
        keys: vec![0u64; key_bytes.div_ceil(8)],
        keys_used: AtomicU64::new(0),
        cells_used: AtomicU64::new(0),
        slots_used: AtomicU64::new(0),
        reused: AtomicU64::new(0),
        cells: Cells((0..cells_cap).map(|_| AtomicU64::new(0)).collect()),
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
            used: &m.keys_used,
        },
        cells_used: &m.cells_used,
        cells_cap,
        slots_used: &m.slots_used,
        reused: &m.reused,
        cells: &m.cells,
        grace: shmprom::series::REUSE_GRACE_SECS,
        free: FreeLists {
            blocks: &m.blocks_free,
            cells: &m.cells_free,
            widths: &m.cells_free_width,
        },
        clean_gate: None,
    }
}

fn key_from(inp: &mut Input<'_>, recent: &[(u32, Vec<u8>)]) -> (u32, Vec<u8>) {
    // half the time an earlier key again (hits, deletes of live keys)
    if !recent.is_empty() && inp.byte() & 1 == 0 {
        return recent[inp.below(recent.len())].clone();
    }
    let fam = inp.below(4) as u32;
    let k = match inp.below(16) {
        // a key over the limit, now and then
        0 => vec![inp.byte(); MAX_KEY_BYTES + 1 + inp.below(3)],
        1 => Vec::new(),
        _ => inp.bytes(40).to_vec(),
    };
    (fam, k)
}

/// SHMPROM_FUZZ_TRACE=1 prints every step of the targets (to reproduce a
/// failure by hand).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("SHMPROM_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

/// Insert / find / delete / clean over the series table on heap memory,
/// with a simulated clock (deleted slots are reused after the grace
/// period), checked against a model of the live keys and their cells.
pub fn series_table(data: &[u8]) {
    let mut inp = Input::new(data);
    // 16 .. 527 slots: a power of two when the first byte is below 128,
    // else 1 to 15 more (the table takes any count)
    let b = inp.byte();
    let extra = match b {
        128.. => 1 + (b as usize >> 3) % 15,
        _ => 0,
    };
    let nslots = (16usize << (b % 6)) + extra;
    let key_bytes = 64usize << inp.below(9); // 64 B .. 16 KiB
    let cells_cap = 8u64 << inp.below(10); // 8 .. 4096
    let mut m = mem(nslots, key_bytes, cells_cap);
    let cells: *const Cells = &m.cells;
    let t = table(&mut m, cells_cap);
    // SAFETY: `m` outlives `t` and this reference; the cells are atomics.
    let cells = unsafe { &*cells };
    let limit = t.slot_limit();
    let width_of = |fam: u32| fam + 1;
    let mut now: u32 = 1000;

    // (family, key) -> (slot, first cell, marker)
    let mut live: HashMap<(u32, Vec<u8>), (usize, u32, u64)> = HashMap::new();
    let mut recent: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut marker = 0u64;

    let mut steps = 0;
    while !inp.done() && steps < 4096 {
        steps += 1;
        match inp.below(8) {
            0..=2 => {
                let (fam, key) = key_from(&mut inp, &recent);
                let width = width_of(fam);
                let (_, _, dead0) = t.census();
                let before = (
                    t.slots_used.load(Ordering::Relaxed),
                    t.cells_used.load(Ordering::Relaxed),
                    t.keys.used.load(Ordering::Relaxed),
                );
                let r = t.get_or_insert(fam, &key, width, now);
                if trace() {
                    eprintln!("t={now} insert {fam}/{key:?} width {width} -> {r:?}");
                }
                if key.len() > MAX_KEY_BYTES {
                    assert_eq!(r, Err(TableError::KeyTooLong), "key of {} bytes", key.len());
                    continue;
                }
                match (r, live.get(&(fam, key.clone()))) {
                    (Ok((c, created)), Some(&(_, cell, _))) => {
                        assert!(!created, "live key inserted twice");
                        assert_eq!(c, cell, "live key answered with another cell");
                    }
                    (Ok((c, created)), None) => {
                        assert!(created, "new key not reported as created");
                        assert!(
                            c as u64 + width as u64 <= cells_cap,
                            "cells {c}+{width} beyond capacity {cells_cap}"
                        );
                        for k in c..c + width {
                            assert_eq!(
                                cells.0[k as usize].load(Ordering::Relaxed),
                                0,
                                "new series' cell {k} not zero"
                            );
                        }
                        let i = t
                            .find(fam, &key)
                            .expect("find after insert")
                            .expect("inserted key not found");
                        let s = t.get(i).expect("inserted slot not live");
                        let mut k2 = Vec::new();
                        assert!(t.read_key(&s, &mut k2), "key of a live series unreadable");
                        assert_eq!((s.family, &k2[..], s.cell), (fam, &key[..], c));
                        marker += 1;
                        for k in c..c + width {
                            cells.0[k as usize].store(marker, Ordering::Relaxed);
                        }
                        live.insert((fam, key.clone()), (i, c, marker));
                        recent.push((fam, key));
                        if recent.len() > 64 {
                            recent.remove(0);
                        }
                    }
                    (Err(TableError::Full), Some(_)) => panic!("live key refused as Full"),
                    (Err(TableError::Full), None) => {
                        // refusing is always allowed when something is
                        // short; with no dead slot, room for a slot and
                        // never used room in both arenas, it is not
                        let rec = blocks_for(key.len()) as u64 * BLOCK;
                        let room = dead0 == 0
                            && before.0 < limit
                            && before.1 + width as u64 <= cells_cap
                            && before.2 + rec <= t.keys.cap;
                        assert!(
                            !room,
                            "spurious Full: slots {}/{limit}, cells {}+{width}/{cells_cap}, \
                             keys {}+{rec}/{}",
                            before.0, before.1, before.2, t.keys.cap
                        );
                    }
                    (Err(e), _) => panic!("unexpected {e:?} in a single-threaded run"),
                }
            }
            3 => {
                let (fam, key) = key_from(&mut inp, &recent);
                let r = t.find(fam, &key).expect("find never fails single-threaded");
                match live.get(&(fam, key)) {
                    Some(&(i, _, _)) => assert_eq!(r, Some(i), "live key found in another slot"),
                    None => assert_eq!(r, None, "dead or unknown key found"),
                }
            }
            4 => {
                let (fam, key) = key_from(&mut inp, &recent);
                let r = t.find(fam, &key).expect("find");
                if trace() {
                    eprintln!("t={now} kill {fam}/{key:?} (slot {r:?})");
                }
                if let Some(i) = r {
                    assert!(t.kill(i, now), "kill of a live slot failed");
                    assert!(!t.kill(i, now), "second kill of a slot succeeded");
                    assert!(
                        live.remove(&(fam, key.clone())).is_some(),
                        "killed key not in the model"
                    );
                    assert_eq!(
                        t.find(fam, &key).expect("find"),
                        None,
                        "killed key still found"
                    );
                    assert!(t.get(i).is_none(), "killed slot still live");
                } else {
                    assert!(!live.contains_key(&(fam, key)), "live key not found");
                }
            }
            5 => {
                // time passes: 0 .. 7 s (the reuse grace is 5 s)
                now = now.wrapping_add(inp.below(8) as u32);
            }
            6 => {
                let freed = t.clean(now);
                if trace() {
                    eprintln!("t={now} clean: {freed:?} freed");
                }
            }
            _ => {
                let i = inp.below(nslots);
                if let Some(s) = t.get(i) {
                    let mut k = Vec::new();
                    assert!(t.read_key(&s, &mut k), "key of a live series unreadable");
                    let e = live.get(&(s.family, k)).map(|&(i2, c, _)| (i2, c));
                    assert_eq!(
                        e,
                        Some((i, s.cell)),
                        "slot {i} holds a series the model does not know"
                    );
                }
            }
        }
        let (ready, claimed, dead) = t.census();
        assert_eq!(ready as usize, live.len(), "census: live series");
        assert_eq!(claimed, 0, "census: a slot left CLAIMED or TENTATIVE");
        assert_eq!(
            ready + claimed + dead,
            t.slots_used.load(Ordering::Relaxed),
            "census vs slots_used"
        );
        // no key block or cell is both free and held, or held twice
        let mut held = HashSet::new();
        let mut held_cells = HashSet::new();
        for (&(fam, _), &(i, c, _)) in &live {
            let s = t.get(i).expect("live slot");
            for b in t.record_blocks(&s) {
                assert!(held.insert(b), "key block {b} held twice");
            }
            for k in c..c + width_of(fam) {
                assert!(held_cells.insert(k), "cell {k} held twice");
            }
        }
        for b in t.free_blocks().expect("free block list") {
            assert!(
                held.insert(b),
                "key block {b} free and held (or free twice)"
            );
        }
        for (c, w) in t.free_cells().expect("free cell lists") {
            for k in c..c + w {
                assert!(
                    held_cells.insert(k),
                    "cell {k} free and held (or free twice)"
                );
            }
        }
        for ((fam, key), &(_, c, mk)) in &live {
            for k in c..c + width_of(*fam) {
                let v = cells.0[k as usize].load(Ordering::Relaxed);
                assert_eq!(
                    v, mk,
                    "cells of {fam}/{key:?} overwritten (cell {k}: {v}, want {mk})"
                );
            }
        }
    }
    for ((fam, key), &(i, c, _)) in &live {
        let (c2, created) = t
            .get_or_insert(*fam, key, width_of(*fam), now)
            .expect("live key at the end");
        assert_eq!((c2, created), (c, false));
        assert_eq!(t.find(*fam, key).expect("find"), Some(i));
    }
}

// ------------------------------------------------------------------ render

/// Names the families of the render target draw from: mostly valid,
/// sometimes not (definitions must then fail, with nothing changed).
fn gen_name(inp: &mut Input<'_>) -> String {
    const BASE: [&str; 8] = [
        "a",
        "b_total",
        "req_total",
        "lat_seconds",
        "x:y",
        "_u",
        "h",
        "c_count",
    ];
    match inp.below(8) {
        0 => {
            // arbitrary bytes, lossily made a string (mostly invalid)
            String::from_utf8_lossy(inp.bytes(6)).into_owned()
        }
        1 => format!(
            "{}{}",
            BASE[inp.below(8)],
            ["_bucket", "_sum", "_count", "_total", ""][inp.below(5)]
        ),
        _ => BASE[inp.below(8)].to_string(),
    }
}

fn gen_label_name(inp: &mut Input<'_>) -> String {
    const L: [&str; 8] = ["v", "host", "le", "__x", "a", "status", "1x", "b-c"];
    // invalid ones (le on a histogram, __x, 1x, b-c) less often
    let i = inp.below(16);
    if i < 8 {
        ["v", "host", "a", "status", "op", "node", "v", "host"][i].to_string()
    } else {
        L[i - 8].to_string()
    }
}

fn gen_f64(inp: &mut Input<'_>, finite: bool) -> f64 {
    const V: [f64; 12] = [
        0.0, 1.0, 0.5, 2.5, 1e-9, 1e15, 123456.789, 1e300, 0.1, 3.0, 7.0, 0.25,
    ];
    let b = inp.byte();
    match b % 16 {
        12 if !finite => f64::NAN,
        13 if !finite => f64::INFINITY,
        14 if !finite => f64::NEG_INFINITY,
        15 => {
            let mut x = [0u8; 8];
            for v in &mut x {
                *v = inp.byte();
            }
            let f = f64::from_le_bytes(x);
            if finite && !f.is_finite() {
                1.0
            } else {
                f
            }
        }
        k => V[(k % 12) as usize] * if b & 0x80 != 0 { -1.0 } else { 1.0 },
    }
}

fn gen_label_value(inp: &mut Input<'_>) -> Vec<u8> {
    const V: [&[u8]; 12] = [
        b"",
        b"x",
        b"a\"b",
        b"a\\b",
        b"a\nb",
        b"\\n",
        b"\xff\xfe",
        b"caf\xc3\xa9",
        b"\xe2\x98",
        b"}\",x=\"",
        b"\0",
        b"\r\t",
    ];
    match inp.below(4) {
        0 => inp.bytes(12).to_vec(),
        _ => V[inp.below(12)].to_vec(),
    }
}

#[derive(Clone)]
struct SeriesM {
    cell: u32,
    /// per plane, per cell offset
    planes: Vec<Vec<f64>>,
}

struct FamM {
    id: u32,
    name: String,
    kind: Kind,
    mode: u32,
    labels: Vec<String>,
    buckets: Vec<f64>,
    help: Vec<u8>,
    width: u32,
    /// lossy label values -> series
    series: BTreeMap<Vec<String>, SeriesM>,
}

impl FamM {
    /// Names a family takes in one format: its TYPE name and sample names.
    fn names(&self, om: bool) -> Vec<String> {
        match self.kind {
            Kind::Histogram => vec![
                self.name.clone(),
                format!("{}_bucket", self.name),
                format!("{}_sum", self.name),
                format!("{}_count", self.name),
            ],
            Kind::Counter if om => {
                let fam = self
                    .name
                    .strip_suffix("_total")
                    .unwrap_or(&self.name)
                    .to_string();
                vec![format!("{fam}_total"), fam]
            }
            _ => vec![self.name.clone()],
        }
    }

    fn value(&self, s: &SeriesM, k: usize) -> f64 {
        let livesum = self.kind == Kind::Gauge && self.mode == MODE_LIVESUM;
        if self.kind == Kind::Gauge && !livesum {
            return s.planes[0][k];
        }
        let mut v = 0.0;
        for (p, cells) in s.planes.iter().enumerate() {
            // no plane is claimed in this process: only plane 0 is "live"
            if livesum && p != 0 {
                continue;
            }
            v += cells[k];
        }
        v
    }
}

/// Whether families a and b would give the same name in either format.
fn collide(a: &FamM, b: &FamM) -> bool {
    [false, true].iter().any(|&om| {
        let na: HashSet<String> = a.names(om).into_iter().collect();
        b.names(om).iter().any(|n| na.contains(n))
    })
}

static ZONE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Defines families and series from the input in a fresh zone, updates
/// cells, renders both formats and checks them against the model.
pub fn render(data: &[u8]) {
    let mut inp = Input::new(data);
    let planes = 1 + inp.below(4) as u32;
    let size = if inp.byte() & 1 == 0 {
        MIN_SIZE
    } else {
        2 * MIN_SIZE
    };
    let name = format!(
        "fuzz-{}-{}",
        std::process::id(),
        ZONE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let (z, _) = Zone::open(&name, size, planes, None).expect("zone open");
    // the zone table keeps every zone for the life of the process; this one
    // is never opened again (unique name): give its pages back at the end
    let _unmap = Unmap(z.as_ptr(), size as usize);

    let mut fams: Vec<FamM> = Vec::new();
    let mut steps = 0;
    let mut mid_checks = 0;
    while !inp.done() && steps < 512 {
        steps += 1;
        match inp.below(10) {
            0 | 1 => define(&z, &mut inp, &mut fams),
            2..=6 if !fams.is_empty() => update(&z, &mut inp, &mut fams, planes),
            7 if !fams.is_empty() => {
                let f = inp.below(fams.len());
                let vals: Vec<Vec<u8>> = (0..fams[f].labels.len())
                    .map(|_| gen_label_value(&mut inp))
                    .collect();
                let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
                let key: Vec<String> = vals
                    .iter()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect();
                let r = registry::series_del(&z, fams[f].id, &refs);
                let had = fams[f].series.remove(&key).is_some();
                assert_eq!(r, Ok(had), "del of {:?} in {}", key, fams[f].name);
            }
            8 if !fams.is_empty() => {
                let f = inp.below(fams.len());
                let r = registry::family_reset(&z, fams[f].id);
                fams[f].series.clear();
                match r {
                    Ok(()) => {}
                    Err(SeriesError::Table(TableError::Full)) if fams[f].labels.is_empty() => {}
                    Err(e) => panic!("reset of {}: {e:?}", fams[f].name),
                }
                if fams[f].labels.is_empty() {
                    // an unlabelled family gets a fresh series at 0, if there is room
                    if let Ok(cell) = registry::series_get(&z, fams[f].id, &[]) {
                        let w = fams[f].width as usize;
                        fams[f].series.insert(
                            Vec::new(),
                            SeriesM {
                                cell,
                                planes: vec![vec![0.0; w]; planes as usize],
                            },
                        );
                    }
                }
            }
            // renders along the way (a few: each costs two renders)
            _ if mid_checks < 4 => {
                mid_checks += 1;
                check(&z, &fams);
            }
            _ => {}
        }
    }
    check(&z, &fams);
}

struct Unmap(*mut u8, usize);
impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by Zone::open for a name used only
        // by this call; nothing touches it after this point.
        unsafe { libc_munmap(self.0, self.1) };
    }
}

extern "C" {
    #[link_name = "munmap"]
    fn libc_munmap(addr: *mut u8, len: usize) -> i32;
}

fn define(z: &Zone, inp: &mut Input<'_>, fams: &mut Vec<FamM>) {
    let name = gen_name(inp);
    let kind = [Kind::Counter, Kind::Gauge, Kind::Histogram][inp.below(3)];
    let mode = if kind == Kind::Gauge && inp.byte() & 1 == 1 {
        MODE_LIVESUM
    } else {
        MODE_SET
    };
    let labels: Vec<String> = (0..inp.below(4)).map(|_| gen_label_name(inp)).collect();
    let buckets: Vec<f64> = if kind == Kind::Histogram {
        let n = inp.below(5);
        let mut b: Vec<f64> = (0..n).map(|_| gen_f64(inp, false)).collect();
        if inp.byte() & 3 != 0 {
            b.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
            b.dedup();
        }
        b
    } else {
        Vec::new()
    };
    let help: Vec<u8> = match inp.below(4) {
        0 => b"line\nbreak \\ and \"quotes\"".to_vec(),
        1 => inp.bytes(10).to_vec(),
        _ => b"Help.".to_vec(),
    };
    let def = Def {
        name: &name,
        help: &help,
        kind,
        mode,
        labels: labels.iter().map(|s| s.as_str()).collect(),
        buckets: buckets.clone(),
    };
    let valid = def.validate().is_ok();
    let candidate = FamM {
        id: u32::MAX,
        name: name.clone(),
        kind,
        mode,
        labels: labels.clone(),
        buckets: buckets.clone(),
        help: help.clone(),
        width: def.width(z.nspares()),
        series: BTreeMap::new(),
    };
    // a name the output would write twice is refused by define
    let collides = fams
        .iter()
        .any(|f| f.name != name && collide(f, &candidate));
    match registry::define(z, &def) {
        Ok(id) => {
            assert!(
                valid,
                "definition accepted although invalid: {name:?} {labels:?} {buckets:?}"
            );
            assert!(
                !collides,
                "{name}: a name colliding in the output was accepted"
            );
            if let Some(pos) = fams.iter().position(|f| f.name == name) {
                if fams[pos].id == id {
                    // same shape: same family, help may change
                    assert!(
                        fams[pos].kind == kind
                            && fams[pos].labels == labels
                            && fams[pos].mode == mode,
                        "{name}: another shape gave the same family"
                    );
                    fams[pos].help = help;
                    if labels.is_empty() && fams[pos].series.is_empty() {
                        // define succeeded: the unlabelled series exists now
                        let cell = registry::series_get(z, id, &[])
                            .expect("unlabelled series after a successful define");
                        let planes = z.header().planes as usize;
                        let width = fams[pos].width as usize;
                        fams[pos].series.insert(
                            Vec::new(),
                            SeriesM {
                                cell,
                                planes: vec![vec![0.0; width]; planes],
                            },
                        );
                    }
                    return;
                }
                fams.remove(pos); // retired
            }
            let mut f = candidate;
            f.id = id;
            if labels.is_empty() {
                // exported at 0 from definition (a define that succeeds
                // creates the series if an earlier one found no room)
                match registry::series_get(z, id, &[]) {
                    Ok(cell) => {
                        let planes = z.header().planes as usize;
                        f.series.insert(
                            Vec::new(),
                            SeriesM {
                                cell,
                                planes: vec![vec![0.0; f.width as usize]; planes],
                            },
                        );
                    }
                    Err(SeriesError::Table(TableError::Full)) => {}
                    Err(e) => panic!("{name}: unlabelled series after define: {e:?}"),
                }
            }
            fams.push(f);
        }
        Err(DefineError::Invalid(m)) => {
            assert!(!valid || collides, "valid definition refused: {m}")
        }
        Err(DefineError::Full(_)) => {
            // the zone is full. A same-name family of another shape may have
            // been retired before the refusal; a new unlabelled family may
            // be defined but without its series (no room for it).
            let live = registry::live_families(z)
                .into_iter()
                .find(|f| f.name == name)
                .map(|f| f.id);
            if let Some(pos) = fams.iter().position(|f| f.name == name) {
                if Some(fams[pos].id) == live {
                    return;
                }
                fams.remove(pos);
            }
            if let Some(id) = live {
                let mut f = candidate;
                f.id = id;
                fams.push(f);
            }
        }
    }
}

fn update(z: &Zone, inp: &mut Input<'_>, fams: &mut [FamM], planes: u32) {
    let fi = inp.below(fams.len());
    let f = &mut fams[fi];
    let n = f.labels.len();
    // now and then the wrong number of label values
    let count = if inp.below(16) == 0 { inp.below(4) } else { n };
    let vals: Vec<Vec<u8>> = (0..count).map(|_| gen_label_value(inp)).collect();
    let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
    let r = registry::series_get(z, f.id, &refs);
    if count != n {
        assert_eq!(
            r,
            Err(SeriesError::LabelCount {
                want: n as u32,
                got: count
            }),
            "{}: wrong label count",
            f.name
        );
        return;
    }
    let key: Vec<String> = vals
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let cell = match r {
        Ok(c) => c,
        Err(SeriesError::Table(TableError::Full)) => {
            assert!(
                !f.series.contains_key(&key),
                "{}: a live series refused as Full",
                f.name
            );
            return;
        }
        Err(e) => panic!("{}: series_get: {e:?}", f.name),
    };
    let width = f.width as usize;
    let s = f.series.entry(key.clone()).or_insert_with(|| SeriesM {
        cell,
        planes: vec![vec![0.0; width]; planes as usize],
    });
    assert_eq!(s.cell, cell, "{}: series {:?} moved cells", f.name, key);
    let plane = inp.below(planes as usize);
    match f.kind {
        Kind::Counter => {
            let v = gen_f64(inp, true).abs();
            f64_add(z.cell(plane as u32, cell as u64), v);
            s.planes[plane][0] += v;
        }
        Kind::Gauge => {
            // "set" gauges live in the shared plane; livesum shares of a
            // writer without a plane go to the shared plane as well
            let v = gen_f64(inp, f.mode == MODE_LIVESUM);
            if f.mode == MODE_SET && inp.byte() & 1 == 0 {
                z.cell(0, cell as u64).store(v.to_bits(), Ordering::Relaxed);
                s.planes[0][0] = v;
            } else {
                f64_add(z.cell(0, cell as u64), v);
                s.planes[0][0] += v;
            }
        }
        Kind::Histogram => {
            let v = gen_f64(inp, true);
            let nb = f.buckets.len();
            let k = f.buckets.iter().position(|b| v <= *b).unwrap_or(nb);
            f64_add(z.cell(plane as u32, cell as u64 + k as u64), 1.0);
            f64_add(z.cell(plane as u32, cell as u64 + nb as u64 + 1), v);
            s.planes[plane][k] += 1.0;
            s.planes[plane][nb + 1] += v;
        }
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

fn check(z: &Zone, fams: &[FamM]) {
    if let Err(e) = shmprom::check::check(z) {
        panic!("consistency check: {e}");
    }
    for fmt in [Format::Text, Format::OpenMetrics] {
        let out = render_zone(z, fmt);
        let om = fmt == Format::OpenMetrics;
        let parsed = match parse(&out, om) {
            Ok(p) => p,
            Err(e) => panic!(
                "{fmt:?} output does not parse: {e}\n---\n{}",
                String::from_utf8_lossy(&out)
            ),
        };
        compare(&parsed, fams, om, &out);
    }
}

/// A parsed exposition: (sample name, [(label, value)]) -> value, and the
/// TYPE of each family.
pub struct Parsed {
    pub samples: HashMap<(String, Vec<(String, String)>), f64>,
    pub types: HashMap<String, String>,
    pub help: HashMap<String, String>,
}

fn valid_metric_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_' || b[0] == b':')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
}

fn valid_label_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn unescape(s: &str, allowed: &[char]) -> Result<String, String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') if allowed.contains(&'n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') if allowed.contains(&'"') => out.push('"'),
            other => return Err(format!("bad escape \\{other:?}")),
        }
    }
    Ok(out)
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            let ok = !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'));
            if !ok {
                return Err(format!("bad value '{s}'"));
            }
            s.parse::<f64>()
                .map_err(|e| format!("bad value '{s}': {e}"))
        }
    }
}

/// A strict parser of what shmprom writes: Prometheus text 0.0.4 or
/// OpenMetrics 1.0 (counters, gauges, histograms; no timestamps).
pub fn parse(out: &[u8], om: bool) -> Result<Parsed, String> {
    let text = std::str::from_utf8(out).map_err(|e| format!("not UTF-8: {e}"))?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut p = Parsed {
        samples: HashMap::new(),
        types: HashMap::new(),
        help: HashMap::new(),
    };
    let mut cur: Option<(String, String)> = None; // (family, type)
    let mut eof = false;
    let mut hist_last: HashMap<Vec<(String, String)>, (f64, bool)> = HashMap::new();
    let help_esc: &[char] = if om { &['n', '"'] } else { &['n'] };
    for (ln, line) in text.split('\n').enumerate() {
        let ln = ln + 1;
        if line.is_empty() {
            continue;
        }
        if eof {
            return Err(format!("line {ln}: content after # EOF"));
        }
        if let Some(rest) = line.strip_prefix("# ") {
            if rest == "EOF" {
                if !om {
                    return Err(format!("line {ln}: # EOF in text format"));
                }
                eof = true;
                continue;
            }
            let (kw, rest) = rest
                .split_once(' ')
                .ok_or(format!("line {ln}: bare comment"))?;
            match kw {
                "HELP" => {
                    let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
                    if !valid_metric_name(name) {
                        return Err(format!("line {ln}: HELP for bad name '{name}'"));
                    }
                    let h = unescape(h, help_esc).map_err(|e| format!("line {ln}: HELP: {e}"))?;
                    if p.help.insert(name.to_string(), h).is_some() {
                        return Err(format!("line {ln}: second HELP for {name}"));
                    }
                }
                "TYPE" => {
                    let (name, t) = rest
                        .split_once(' ')
                        .ok_or(format!("line {ln}: TYPE without type"))?;
                    if !valid_metric_name(name) {
                        return Err(format!("line {ln}: TYPE for bad name '{name}'"));
                    }
                    if !matches!(t, "counter" | "gauge" | "histogram") {
                        return Err(format!("line {ln}: unexpected type '{t}'"));
                    }
                    if p.types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(format!("line {ln}: second TYPE for {name}"));
                    }
                    cur = Some((name.to_string(), t.to_string()));
                    hist_last.clear();
                }
                _ => return Err(format!("line {ln}: unknown comment '{kw}'")),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(format!("line {ln}: malformed comment"));
        }
        // sample: name[{labels}] value
        let name_end = line
            .find(['{', ' '])
            .ok_or(format!("line {ln}: no value"))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(format!("line {ln}: bad metric name '{name}'"));
        }
        let mut rest = &line[name_end..];
        let mut labels: Vec<(String, String)> = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest
                    .find('=')
                    .ok_or(format!("line {ln}: label without ="))?;
                let lname = &rest[..eq];
                if !valid_label_name(lname) {
                    return Err(format!("line {ln}: bad label name '{lname}'"));
                }
                rest = rest[eq + 1..]
                    .strip_prefix('"')
                    .ok_or(format!("line {ln}: label value not quoted"))?;
                // find the closing quote, skipping escapes
                let bytes = rest.as_bytes();
                let mut i = 0;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if i >= bytes.len() {
                    return Err(format!("line {ln}: unterminated label value"));
                }
                let v = unescape(&rest[..i], &['n', '"'])
                    .map_err(|e| format!("line {ln}: label {lname}: {e}"))?;
                if labels.iter().any(|(n, _)| n == lname) {
                    return Err(format!("line {ln}: duplicate label {lname}"));
                }
                labels.push((lname.to_string(), v));
                rest = &rest[i + 1..];
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                } else if !rest.starts_with('}') {
                    return Err(format!("line {ln}: expected , or }}"));
                }
            }
        }
        let v = rest
            .strip_prefix(' ')
            .ok_or(format!("line {ln}: no space before the value"))?;
        let value = parse_value(v).map_err(|e| format!("line {ln}: {e}"))?;
        // the sample belongs to the family of the last TYPE line
        let (fam, t) = cur
            .as_ref()
            .ok_or(format!("line {ln}: sample before any TYPE"))?;
        let ok = match t.as_str() {
            "counter" if om => name == format!("{fam}_total"),
            "histogram" => {
                name == format!("{fam}_bucket")
                    || name == format!("{fam}_sum")
                    || name == format!("{fam}_count")
            }
            _ => name == fam,
        };
        if !ok {
            return Err(format!("line {ln}: sample {name} under TYPE {fam} {t}"));
        }
        if t == "histogram" && name.ends_with("_bucket") {
            let (last, rest_l) = labels
                .split_last()
                .ok_or(format!("line {ln}: bucket without le"))?;
            if last.0 != "le" {
                return Err(format!("line {ln}: le is not the last label"));
            }
            let le = parse_value(&last.1).map_err(|e| format!("line {ln}: le: {e}"))?;
            let prev = hist_last.get(rest_l).copied();
            if let Some((pv, closed)) = prev {
                if closed {
                    return Err(format!("line {ln}: bucket after +Inf"));
                }
                if value < pv {
                    return Err(format!(
                        "line {ln}: buckets not cumulative ({pv} then {value})"
                    ));
                }
            }
            hist_last.insert(rest_l.to_vec(), (value, le == f64::INFINITY));
        }
        if p.samples
            .insert((name.to_string(), labels), value)
            .is_some()
        {
            return Err(format!("line {ln}: duplicate sample {name}"));
        }
    }
    if om && !eof {
        return Err("OpenMetrics output without # EOF".into());
    }
    if om && !text.ends_with("# EOF\n") {
        return Err("OpenMetrics output does not end with # EOF".into());
    }
    Ok(p)
}

fn compare(p: &Parsed, fams: &[FamM], om: bool, out: &[u8]) {
    let ctx = || String::from_utf8_lossy(out).into_owned();
    let get = |name: &str, labels: &[(String, String)]| -> f64 {
        match p.samples.get(&(name.to_string(), labels.to_vec())) {
            Some(v) => *v,
            None => panic!("missing sample {name}{labels:?} (om={om})\n---\n{}", ctx()),
        }
    };
    let mut expected_samples = 0usize;
    for f in fams {
        let tname = if om && f.kind == Kind::Counter {
            f.name.strip_suffix("_total").unwrap_or(&f.name).to_string()
        } else {
            f.name.clone()
        };
        assert_eq!(
            p.types.get(&tname).map(|s| s.as_str()),
            Some(f.kind.as_str()),
            "TYPE of {tname} (om={om})"
        );
        let help = String::from_utf8_lossy(&f.help).into_owned();
        assert_eq!(p.help.get(&tname), Some(&help), "HELP of {tname} (om={om})");
        for (key, s) in &f.series {
            let labels: Vec<(String, String)> =
                f.labels.iter().cloned().zip(key.iter().cloned()).collect();
            match f.kind {
                Kind::Counter | Kind::Gauge => {
                    let sname = if om && f.kind == Kind::Counter {
                        format!("{tname}_total")
                    } else {
                        f.name.clone()
                    };
                    let got = get(&sname, &labels);
                    let want = f.value(s, 0);
                    assert!(
                        same(got, want),
                        "{sname}{labels:?}: got {got}, want {want} (om={om})"
                    );
                    expected_samples += 1;
                }
                Kind::Histogram => {
                    let nb = f.buckets.len();
                    // the bucket samples of this series, by their le value
                    let bname = format!("{}_bucket", f.name);
                    let mut got: Vec<(f64, f64)> = p
                        .samples
                        .iter()
                        .filter(|((n, l), _)| {
                            *n == bname
                                && l.len() == labels.len() + 1
                                && l[..labels.len()] == labels[..]
                        })
                        .map(|((_, l), v)| (parse_value(&l[labels.len()].1).expect("le"), *v))
                        .collect();
                    got.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
                    assert_eq!(
                        got.len(),
                        nb + 1,
                        "{bname}{labels:?}: {} buckets, want {} (om={om})",
                        got.len(),
                        nb + 1
                    );
                    let mut cum = 0.0;
                    for (b, &(got_le, got_v)) in got.iter().enumerate() {
                        cum += f.value(s, b);
                        let le = if b == nb { f64::INFINITY } else { f.buckets[b] };
                        assert!(
                            got_le == le,
                            "{bname}{labels:?}: bucket {b} has le={got_le}, want {le}"
                        );
                        assert!(
                            same(got_v, cum),
                            "{bname}{labels:?} le={le}: got {got_v}, want {cum}"
                        );
                    }
                    let got_count = get(&format!("{}_count", f.name), &labels);
                    assert!(
                        same(got_count, cum),
                        "{}_count: got {got_count}, want {cum}",
                        f.name
                    );
                    let sum = f.value(s, nb + 1);
                    let got_sum = get(&format!("{}_sum", f.name), &labels);
                    assert!(
                        same(got_sum, sum),
                        "{}_sum: got {got_sum}, want {sum}",
                        f.name
                    );
                    expected_samples += nb + 3;
                }
            }
        }
    }
    // nothing but the model's families and the self-metrics
    let ours = p
        .samples
        .keys()
        .filter(|(n, _)| !n.starts_with("shmprom_"))
        .count();
    assert_eq!(
        ours,
        expected_samples,
        "samples in the output vs the model (om={om})\n---\n{}",
        ctx()
    );
}
