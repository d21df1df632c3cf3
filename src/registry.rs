//! Metric families: name, help, kind, label names and buckets, kept in the
//! zone so every process (and the renderer) sees the same definitions.
//!
//! Definitions are rare (nginx start, reload, worker start) and go through a
//! robust process-shared mutex; the update path never touches it.

use crate::series::TableError;
use crate::zone::{now_secs, Zone};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Kind of a family (ABI values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl Kind {
    pub fn from_u32(k: u32) -> Option<Kind> {
        match k {
            0 => Some(Kind::Counter),
            1 => Some(Kind::Gauge),
            2 => Some(Kind::Histogram),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Gauge mode "set": one shared cell. "livesum": one cell per plane, the
/// share of a dead worker drops out; its series also carry one cell per
/// spare owner (see `Zone::spares`) on the shared plane.
pub const MODE_SET: u32 = 0;
pub const MODE_LIVESUM: u32 = 1;

const FREE: u32 = 0;
const LIVE: u32 = 1;
const RETIRED: u32 = 2;

/// Most label names per family.
pub const MAX_LABELS: usize = 32;
/// Most finite buckets per histogram.
pub const MAX_BUCKETS: usize = 128;

/// A family record in the zone. Every field but the atomics is written once,
/// under the define lock, before `state` is set LIVE with release ordering.
#[repr(C)]
pub struct FamilyRec {
    pub state: AtomicU32,
    pub kind: u32,
    pub mode: u32,
    pub nlabels: u32,
    pub nbuckets: u32,
    pub width: u32,
    /// Arena offset of the name, label names (u32 length + bytes each).
    pub strings_off: u64,
    /// Arena offset of the finite bucket bounds (f64, 8-aligned).
    pub buckets_off: u64,
    pub def_hash: u64,
    /// Arena offset of the help text (u32 length + bytes); replaced when a
    /// redefinition changes only the help.
    pub help_off: AtomicU64,
    /// Live series of this family.
    pub series: AtomicU64,
    /// New series refused because the zone was full.
    pub dropped: AtomicU64,
}

/// A family definition as given by the caller.
pub struct Def<'a> {
    pub name: &'a str,
    pub help: &'a [u8],
    pub kind: Kind,
    pub mode: u32,
    pub labels: Vec<&'a str>,
    pub buckets: Vec<f64>,
}

/// A family read back from the zone.
pub struct Family<'z> {
    pub id: u32,
    pub live: bool,
    pub kind: Kind,
    pub mode: u32,
    pub width: u32,
    pub name: &'z str,
    pub help: &'z [u8],
    pub labels: Vec<&'z str>,
    pub buckets: &'z [f64],
    pub rec: &'z FamilyRec,
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
        && !n.starts_with("__")
}

impl Def<'_> {
    /// Checks the definition the way Prometheus would; the message names
    /// what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_metric_name(self.name) {
            return Err(format!(
                "invalid metric name '{}': must match [a-zA-Z_:][a-zA-Z0-9_:]*",
                self.name
            ));
        }
        if self.name.starts_with("shmprom_") {
            return Err(format!(
                "metric name '{}': the shmprom_ prefix is reserved for self-metrics",
                self.name
            ));
        }
        if self.name.len() > 200 {
            return Err("metric name longer than 200 bytes".into());
        }
        if self.help.len() > 4096 {
            return Err("help text longer than 4096 bytes".into());
        }
        if std::str::from_utf8(self.help).is_err() {
            return Err("help text is not valid UTF-8".into());
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!("more than {MAX_LABELS} label names"));
        }
        for (i, l) in self.labels.iter().enumerate() {
            if !valid_label_name(l) {
                return Err(format!(
                    "invalid label name '{l}': must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __"
                ));
            }
            if l.len() > 200 {
                return Err("label name longer than 200 bytes".into());
            }
            if self.labels[..i].contains(l) {
                return Err(format!("duplicate label name '{l}'"));
            }
            if self.kind == Kind::Histogram && *l == "le" {
                return Err("label name 'le' is reserved for histogram buckets".into());
            }
        }
        if self.kind == Kind::Histogram {
            if self.buckets.is_empty() {
                return Err("a histogram needs at least one bucket".into());
            }
            if self.buckets.len() > MAX_BUCKETS {
                return Err(format!("more than {MAX_BUCKETS} buckets"));
            }
            for (i, b) in self.buckets.iter().enumerate() {
                if !b.is_finite() {
                    return Err(format!("bucket {} is not a finite number", i + 1));
                }
                if i > 0 && *b <= self.buckets[i - 1] {
                    return Err("buckets must be strictly increasing".into());
                }
            }
        } else if !self.buckets.is_empty() {
            return Err("only histograms take buckets".into());
        }
        if self.kind != Kind::Gauge && self.mode != MODE_SET {
            return Err("only gauges take a mode".into());
        }
        if self.mode > MODE_LIVESUM {
            return Err("unknown gauge mode".into());
        }
        Ok(())
    }

    /// Cells per series per plane, in a zone with `spares` spare owners:
    /// a histogram's buckets, sum and count; a livesum gauge's own cell and
    /// one per spare; one for anything else.
    pub fn width(&self, spares: u32) -> u32 {
        match self.kind {
            Kind::Histogram => self.buckets.len() as u32 + 2,
            Kind::Gauge if self.mode == MODE_LIVESUM => 1 + spares,
            _ => 1,
        }
    }

    /// Hash of the shape (everything but the help): equal hashes on the
    /// same name mean "the same family".
    fn shape_hash(&self) -> u64 {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.kind as u32).to_le_bytes());
        b.extend_from_slice(&self.mode.to_le_bytes());
        for l in &self.labels {
            b.extend_from_slice(&(l.len() as u32).to_le_bytes());
            b.extend_from_slice(l.as_bytes());
        }
        b.push(0xff);
        for x in &self.buckets {
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        crate::series::hash_key(0x5348_4150, &b)
    }
}

/// Why a definition failed.
#[derive(Debug)]
pub enum DefineError {
    Invalid(String),
    Full(String),
}

fn put_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

fn arena_write(z: &Zone, bytes: &[u8], align: u64) -> Result<u64, DefineError> {
    let t = z.table();
    let off = t
        .keys
        .alloc(bytes.len() as u64, align)
        .ok_or_else(|| DefineError::Full("zone has no room left for the definition".into()))?;
    // SAFETY: the region was just reserved for us alone by the bump allocator.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.keys.at(off), bytes.len()) };
    Ok(off)
}

fn read_str(z: &Zone, off: u64) -> (&[u8], u64) {
    let t = z.table();
    // SAFETY: `off` points at a u32 length and that many bytes written by
    // arena_write before the family's LIVE release store, never changed.
    unsafe {
        let p = t.keys.at(off);
        let len = (p as *const u32).read_unaligned() as usize;
        (
            std::slice::from_raw_parts(p.add(4), len),
            off + 4 + len as u64,
        )
    }
}

/// Reads family `id` if it is live or retired.
pub fn family(z: &Zone, id: u32) -> Option<Family<'_>> {
    let rec = z.families().get(id as usize)?;
    let st = rec.state.load(Ordering::Acquire);
    if st == FREE {
        return None;
    }
    let (name, mut off) = read_str(z, rec.strings_off);
    let mut labels = Vec::with_capacity(rec.nlabels as usize);
    for _ in 0..rec.nlabels {
        let (l, next) = read_str(z, off);
        // names were validated ASCII at definition
        labels.push(std::str::from_utf8(l).unwrap_or("_"));
        off = next;
    }
    let (help, _) = read_str(z, rec.help_off.load(Ordering::Acquire));
    let buckets = if rec.nbuckets > 0 {
        // SAFETY: buckets_off is 8-aligned in the arena and holds nbuckets
        // f64 written before the LIVE release store.
        unsafe {
            std::slice::from_raw_parts(
                z.table().keys.at(rec.buckets_off) as *const f64,
                rec.nbuckets as usize,
            )
        }
    } else {
        &[]
    };
    Some(Family {
        id,
        live: st == LIVE,
        kind: Kind::from_u32(rec.kind)?,
        mode: rec.mode,
        width: rec.width,
        name: std::str::from_utf8(name).unwrap_or("_"),
        help,
        labels,
        buckets,
        rec,
    })
}

/// All live families.
pub fn live_families(z: &Zone) -> Vec<Family<'_>> {
    let n = z.header().families_used.load(Ordering::Acquire);
    (0..n as u32)
        .filter_map(|i| family(z, i))
        .filter(|f| f.live)
        .collect()
}

/// Defines a family, or returns the existing one with the same name and
/// shape. A family of the same name with another shape is retired (its
/// series leave the output) and a fresh one is made: that is what a reload
/// with a changed definition does.
pub fn define(z: &Zone, def: &Def<'_>) -> Result<u32, DefineError> {
    def.validate().map_err(DefineError::Invalid)?;
    let hash = def.shape_hash();
    z.with_define_lock(|| {
        let h = z.header();
        let used = h.families_used.load(Ordering::Acquire);
        // Names the exposition would write twice are refused: a histogram
        // `x` owns x_bucket, x_sum and x_count; a counter `x_total` is the
        // family `x` in OpenMetrics.
        let mine = output_names(def.name, def.kind);
        for id in 0..used as u32 {
            let Some(f) = family(z, id) else { continue };
            if !f.live || f.name == def.name {
                continue;
            }
            let theirs = output_names(f.name, f.kind);
            if let Some(n) = mine.iter().find(|n| theirs.contains(n)) {
                return Err(DefineError::Invalid(format!(
                    "metric '{}' collides with {} '{}' in the output (both write '{n}')",
                    def.name,
                    f.kind.as_str(),
                    f.name
                )));
            }
        }
        for id in 0..used as u32 {
            let Some(f) = family(z, id) else { continue };
            if !f.live || f.name != def.name {
                continue;
            }
            if f.rec.def_hash == hash {
                if f.help != def.help {
                    let mut b = Vec::new();
                    put_str(def.help, &mut b);
                    let off = arena_write(z, &b, 4)?;
                    f.rec.help_off.store(off, Ordering::Release);
                }
                if def.labels.is_empty() {
                    // an earlier define may have found no room for it
                    series_get(z, id, &[]).map_err(|e| {
                        DefineError::Full(format!("zone has no room for the series: {e:?}"))
                    })?;
                }
                return Ok(id);
            }
            retire(z, id);
        }
        if used >= h.families_cap {
            return Err(DefineError::Full(format!(
                "zone holds at most {} families",
                h.families_cap
            )));
        }
        let id = used as u32;
        let mut b = Vec::new();
        put_str(def.name.as_bytes(), &mut b);
        for l in &def.labels {
            put_str(l.as_bytes(), &mut b);
        }
        let strings_off = arena_write(z, &b, 4)?;
        let mut hb = Vec::new();
        put_str(def.help, &mut hb);
        let help_off = arena_write(z, &hb, 4)?;
        let mut bb = Vec::new();
        for x in &def.buckets {
            bb.extend_from_slice(&x.to_ne_bytes());
        }
        let buckets_off = if bb.is_empty() {
            0
        } else {
            arena_write(z, &bb, 8)?
        };
        let rec = &z.families()[id as usize];
        let p = rec as *const FamilyRec as *mut FamilyRec;
        // SAFETY: record `id` is FREE (id == families_used) and we hold the
        // define lock: nobody else writes it, and readers skip it until the
        // LIVE release store below.
        unsafe {
            (*p).kind = def.kind as u32;
            (*p).mode = def.mode;
            (*p).nlabels = def.labels.len() as u32;
            (*p).nbuckets = def.buckets.len() as u32;
            (*p).width = def.width(z.nspares());
            (*p).strings_off = strings_off;
            (*p).buckets_off = buckets_off;
            (*p).def_hash = hash;
        }
        rec.help_off.store(help_off, Ordering::Relaxed);
        rec.series.store(0, Ordering::Relaxed);
        rec.dropped.store(0, Ordering::Relaxed);
        rec.state.store(LIVE, Ordering::Release);
        h.families_used.store(used + 1, Ordering::Release);
        if def.labels.is_empty() {
            // Unlabelled metrics are exported at 0 from definition.
            if let Err(e) = series_get(z, id, &[]) {
                return Err(DefineError::Full(format!(
                    "zone has no room for the series: {e:?}"
                )));
            }
        }
        Ok(id)
    })
}

/// Every name a family of this kind writes in either format: family names
/// and sample names.
fn output_names(name: &str, kind: Kind) -> Vec<String> {
    let mut v = vec![name.to_string()];
    match kind {
        Kind::Counter => {
            let base = name.strip_suffix("_total").unwrap_or(name);
            v.push(base.to_string());
            v.push(format!("{base}_total"));
        }
        Kind::Gauge => {}
        Kind::Histogram => {
            for s in ["_bucket", "_sum", "_count"] {
                v.push(format!("{name}{s}"));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Retires family `id`: it leaves the output and its series are deleted.
fn retire(z: &Zone, id: u32) {
    let rec = &z.families()[id as usize];
    rec.state.store(RETIRED, Ordering::Release);
    let t = z.table();
    let now = now_secs();
    for i in 0..t.slots.len() {
        if let Some(s) = t.get(i) {
            if s.family == id {
                t.kill(i, now);
            }
        }
    }
    rec.series.store(0, Ordering::Relaxed);
    z.bump_epoch();
}

/// Encodes label values into a key: per value a LEB128 length and the bytes,
/// invalid UTF-8 replaced by U+FFFD (the exposition formats are UTF-8).
pub fn encode_key(values: &[&[u8]], out: &mut Vec<u8>) {
    out.clear();
    for v in values {
        let cow;
        let v: &[u8] = if is_utf8(v) {
            v
        } else {
            cow = String::from_utf8_lossy(v).into_owned();
            cow.as_bytes()
        };
        let mut n = v.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(v);
    }
}

/// Whether `v` is UTF-8: the ASCII check first (word at a time, the usual
/// label value), the full validation only when a byte is >= 0x80.
#[inline]
fn is_utf8(v: &[u8]) -> bool {
    v.is_ascii() || std::str::from_utf8(v).is_ok()
}

/// Bytes of the key buffer [`series_get`] and [`series_del`] keep on the
/// stack; longer keys (and values that are not UTF-8) take the heap path.
const STACK_KEY: usize = 256;

/// [`encode_key`] into `buf` when every value is UTF-8 and the key fits:
/// the key's length, else None (the caller then uses [`encode_key`]). Both
/// give the same bytes.
fn encode_key_into(values: &[&[u8]], buf: &mut [u8]) -> Option<usize> {
    let mut at = 0;
    for v in values {
        if !is_utf8(v) {
            return None;
        }
        let mut n = v.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            *buf.get_mut(at)? = if n == 0 { b } else { b | 0x80 };
            at += 1;
            if n == 0 {
                break;
            }
        }
        buf.get_mut(at..at + v.len())?.copy_from_slice(v);
        at += v.len();
    }
    Some(at)
}

/// The key of `values`: encoded in `stack` when it fits, else in `heap`.
fn key_of<'b>(values: &[&[u8]], stack: &'b mut [u8], heap: &'b mut Vec<u8>) -> &'b [u8] {
    match encode_key_into(values, stack) {
        Some(n) => &stack[..n],
        None => {
            encode_key(values, heap);
            heap
        }
    }
}

/// Decodes a key made by [`encode_key`] into its values.
pub fn decode_key(key: &[u8]) -> Vec<&[u8]> {
    key_values(key).collect()
}

/// The values of a key made by [`encode_key`], one by one (no allocation).
pub fn key_values(key: &[u8]) -> KeyValues<'_> {
    KeyValues { rest: key }
}

/// Iterator of [`key_values`].
pub struct KeyValues<'k> {
    rest: &'k [u8],
}

impl<'k> Iterator for KeyValues<'k> {
    type Item = &'k [u8];

    fn next(&mut self) -> Option<&'k [u8]> {
        let key = self.rest;
        if key.is_empty() {
            return None;
        }
        let mut n = 0usize;
        let mut shift = 0;
        let mut i = 0;
        while i < key.len() {
            let b = key[i];
            n |= ((b & 0x7f) as usize) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let end = (i + n).min(key.len());
        self.rest = &key[end..];
        Some(&key[i..end])
    }
}

/// Error from a series lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum SeriesError {
    NoFamily,
    LabelCount { want: u32, got: usize },
    Table(TableError),
}

/// Finds or creates the series of family `id` with these label values;
/// returns its first cell index. A refused insert is counted per family.
pub fn series_get(z: &Zone, id: u32, values: &[&[u8]]) -> Result<u32, SeriesError> {
    let rec = z.families().get(id as usize).ok_or(SeriesError::NoFamily)?;
    let st = rec.state.load(Ordering::Acquire);
    if st == FREE {
        return Err(SeriesError::NoFamily);
    }
    if values.len() != rec.nlabels as usize {
        return Err(SeriesError::LabelCount {
            want: rec.nlabels,
            got: values.len(),
        });
    }
    // no allocation for the usual key: this runs once per new label set
    let mut stack = [0u8; STACK_KEY];
    let mut heap = Vec::new();
    let key = key_of(values, &mut stack, &mut heap);
    match z.table().get_or_insert(id, key, rec.width, now_secs()) {
        Ok((cell, created)) => {
            if created {
                rec.series.fetch_add(1, Ordering::Relaxed);
            }
            Ok(cell)
        }
        Err(e) => {
            match e {
                TableError::Full => {
                    rec.dropped.fetch_add(1, Ordering::Relaxed);
                    z.count_error(2);
                }
                TableError::Stuck => z.count_error(3),
                TableError::KeyTooLong => z.count_error(5),
            }
            Err(SeriesError::Table(e))
        }
    }
}

/// Deletes one series. Returns whether it existed.
pub fn series_del(z: &Zone, id: u32, values: &[&[u8]]) -> Result<bool, SeriesError> {
    let rec = z.families().get(id as usize).ok_or(SeriesError::NoFamily)?;
    if values.len() != rec.nlabels as usize {
        return Err(SeriesError::LabelCount {
            want: rec.nlabels,
            got: values.len(),
        });
    }
    let mut stack = [0u8; STACK_KEY];
    let mut heap = Vec::new();
    let key = key_of(values, &mut stack, &mut heap);
    let t = z.table();
    let found = t.find(id, key).map_err(SeriesError::Table)?;
    let Some(i) = found else { return Ok(false) };
    let killed = t.kill(i, now_secs());
    if killed {
        rec.series.fetch_sub(1, Ordering::Relaxed);
        z.bump_epoch();
    }
    Ok(killed)
}

/// Deletes every series of family `id`; an unlabelled family gets a fresh
/// series at 0.
pub fn family_reset(z: &Zone, id: u32) -> Result<(), SeriesError> {
    let rec = z.families().get(id as usize).ok_or(SeriesError::NoFamily)?;
    let t = z.table();
    let now = now_secs();
    let mut n = 0;
    for i in 0..t.slots.len() {
        if let Some(s) = t.get(i) {
            if s.family == id && t.kill(i, now) {
                n += 1;
            }
        }
    }
    rec.series
        .fetch_sub(n.min(rec.series.load(Ordering::Relaxed)), Ordering::Relaxed);
    z.bump_epoch();
    if rec.nlabels == 0 {
        series_get(z, id, &[])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(values: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut heap = Vec::new();
        encode_key(values, &mut heap);
        let mut buf = [0u8; STACK_KEY];
        let stack = encode_key_into(values, &mut buf).map(|n| buf[..n].to_vec());
        (heap, stack)
    }

    #[test]
    fn stack_key_is_the_heap_key() {
        let long = vec![b'x'; 300];
        let edge = vec![b'y'; STACK_KEY - 2]; // LEB128 2 bytes + value = STACK_KEY
        let past = vec![b'y'; STACK_KEY - 1];
        let v127 = vec![b'z'; 127];
        let v128 = vec![b'z'; 128];
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![],
            vec![b""],
            vec![b"", b""],
            vec![b"/b/12345"],
            vec![b"example.org", b"200"],
            vec!["h\u{e9}llo \u{1f600}".as_bytes(), b"x"],
            vec![&v127],
            vec![&v128, b"a"],
            vec![&edge],
            vec![&past],
            vec![&long],
            vec![b"a", &long],
        ];
        for c in &cases {
            let (heap, stack) = both(c);
            let fits = heap.len() <= STACK_KEY;
            assert_eq!(stack.is_some(), fits, "{c:?}");
            if let Some(s) = stack {
                assert_eq!(s, heap, "{c:?}");
            }
            assert_eq!(decode_key(&heap), *c);
            let mut st = [0u8; STACK_KEY];
            let mut hp = Vec::new();
            assert_eq!(key_of(c, &mut st, &mut hp), &heap[..]);
        }
    }

    #[test]
    fn invalid_utf8_takes_the_heap_path() {
        let bad: &[u8] = b"a\xffb";
        let mut buf = [0u8; STACK_KEY];
        assert_eq!(encode_key_into(&[b"ok", bad], &mut buf), None);
        let mut st = [0u8; STACK_KEY];
        let mut hp = Vec::new();
        let key = key_of(&[b"ok", bad], &mut st, &mut hp).to_vec();
        assert_eq!(decode_key(&key), vec![&b"ok"[..], "a\u{fffd}b".as_bytes()]);
        assert!(is_utf8("\u{e9}".as_bytes()) && !is_utf8(b"\xc3"));
    }
}
