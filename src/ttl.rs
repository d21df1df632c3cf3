//! Idle-series expiry: a series whose value has not changed for `ttl`
//! seconds is deleted. No cost on the update path: a sweep (one worker, on
//! a timer) fingerprints every live series' cells over all planes and
//! remembers, in this process only, since when each fingerprint held. A
//! sweeper that restarts starts its clocks again (expiry comes later, never
//! early).

use crate::registry::family;
use crate::zone::{now_secs, Zone};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

struct Seen {
    cell: u32,
    fp: u64,
    since: u32,
}

static SEEN: Mutex<Option<HashMap<(usize, u32), Seen>>> = Mutex::new(None);

/// Deletes the series of `z` idle for `ttl` seconds or more. Returns how
/// many were deleted.
pub fn sweep(z: &Zone, ttl: u32) -> u64 {
    let now = now_secs();
    let t = z.table();
    let planes = z.header().planes;
    let zkey = z.as_ptr() as usize;
    let mut g = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = g.get_or_insert_with(HashMap::new);
    let mut removed = 0;
    for i in 0..t.slots.len() {
        let Some(s) = t.get(i) else {
            seen.remove(&(zkey, i as u32));
            continue;
        };
        let Some(f) = family(z, s.family) else {
            continue;
        };
        if !f.live || f.labels.is_empty() {
            continue; // unlabelled series stay: they are exported from definition
        }
        let mut fp = 0u64;
        for p in 0..planes {
            for k in 0..f.width as u64 {
                let v = z.cell(p, s.cell as u64 + k).load(Ordering::Relaxed);
                fp = fp.rotate_left(7) ^ v;
            }
        }
        let e = seen.entry((zkey, i as u32)).or_insert(Seen {
            cell: s.cell,
            fp,
            since: now,
        });
        if e.cell != s.cell || e.fp != fp {
            *e = Seen {
                cell: s.cell,
                fp,
                since: now,
            };
        } else if now.wrapping_sub(e.since) >= ttl && t.kill(i, now) {
            f.rec.series.fetch_sub(1, Ordering::Relaxed);
            z.header().expired.fetch_add(1, Ordering::Relaxed);
            seen.remove(&(zkey, i as u32));
            removed += 1;
        }
    }
    if removed > 0 {
        z.bump_epoch();
    }
    removed
}
