//! A consistency check of a zone, for tests and operators: every live slot
//! points at a key record and cells inside what was handed out, belongs to
//! a defined family and carries the right number of label values; no key
//! is live twice; per-family series counts match the table; no key block
//! or cell is held by two series, or free and held at once.

use crate::registry::{decode_key, family};
use crate::zone::Zone;
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// Returns a one-line summary, or what is wrong.
pub fn check(z: &Zone) -> Result<String, String> {
    let h = z.header();
    let t = z.table();
    let cells_used = h.cells_used.load(Ordering::Acquire);
    let nfam = h.families_used.load(Ordering::Acquire);
    if nfam > h.families_cap {
        return Err(format!(
            "families_used {nfam} > capacity {}",
            h.families_cap
        ));
    }
    let mut per_family = vec![0u64; nfam as usize];
    let mut seen = HashSet::new();
    let mut blocks = HashSet::new();
    let mut cells = HashSet::new();
    let (ready, claimed, dead) = t.census();
    for i in 0..t.slots.len() {
        let Some(s) = t.get(i) else { continue };
        let Some(f) = family(z, s.family) else {
            return Err(format!("slot {i}: family {} is not defined", s.family));
        };
        if s.cell as u64 + f.width as u64 > cells_used {
            return Err(format!("slot {i}: cells beyond what was allocated"));
        }
        let mut key = Vec::new();
        if !t.read_key(&s, &mut key) {
            return Err(format!("slot {i}: key record broken"));
        }
        for b in t.record_blocks(&s) {
            if !blocks.insert(b) {
                return Err(format!(
                    "slot {i}: key block {b} shared with another record"
                ));
            }
        }
        if s.cell != u32::MAX {
            for c in s.cell..s.cell + f.width {
                if !cells.insert(c) {
                    return Err(format!("slot {i}: cell {c} shared with another series"));
                }
            }
        }
        let vals = decode_key(&key);
        if vals.len() != f.labels.len() {
            return Err(format!(
                "slot {i}: {} label values for {} label names in {}",
                vals.len(),
                f.labels.len(),
                f.name
            ));
        }
        if !seen.insert((s.family, key)) {
            return Err(format!("slot {i}: series of {} stored twice", f.name));
        }
        if f.live {
            per_family[s.family as usize] += 1;
        }
    }
    for (id, n) in per_family.iter().enumerate() {
        if let Some(f) = family(z, id as u32) {
            let rec = f.rec.series.load(Ordering::Relaxed);
            if f.live && rec != *n {
                return Err(format!(
                    "family {}: series count {rec} but {n} live in the table",
                    f.name
                ));
            }
        }
    }
    // what the pools hold is in no live series (run on a quiet zone: a
    // concurrent insert or clean moves blocks between the two)
    for b in t.free_blocks()? {
        if !blocks.insert(b) {
            return Err(format!("key block {b} is free and in use (or free twice)"));
        }
    }
    for (c, w) in t.free_cells()? {
        for k in c..c + w {
            if !cells.insert(k) {
                return Err(format!("cell {k} is free and in use (or free twice)"));
            }
        }
    }
    if ready + claimed + dead != h.slots_used.load(Ordering::Relaxed) {
        return Err(format!(
            "slots used {} but table has {ready} ready, {claimed} claimed, {dead} dead",
            h.slots_used.load(Ordering::Relaxed)
        ));
    }
    Ok(format!(
        "ok: {ready} series, {claimed} unfinished, {dead} dead slots, {nfam} families, {} of {} bytes used",
        z.bytes_used(),
        h.size
    ))
}
