//! The zone layout (`Layout::compute`) seen from outside.
//!
//! How many series a zone holds: zones of a few sizes and plane counts are
//! filled with counters of two short labels (a one-block key, one cell)
//! until an insert is refused. The table must be what runs out (the key
//! and cell arenas outlast it), at its slot limit, and the arenas must not
//! be left mostly unused either. `cargo test --release --test layout --
//! --nocapture` prints a line per zone: slots, series capacity, series
//! made, zone bytes per series, and the share of each arena used when the
//! table was full.
//!
//! And a zone file made with another layout version is refused.

use shmprom::registry::{self, Def, Kind, SeriesError};
use shmprom::series::{TableError, BLOCK};
use shmprom::zone::{Header, OpenError, Zone, LAYOUT_VERSION};
use std::sync::atomic::Ordering;

#[test]
fn a_zone_file_of_another_layout_version_is_refused() {
    let dir = std::env::temp_dir().join(format!("shmprom-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zone");
    let p = path.to_str().unwrap();
    let (z, _) = Zone::open("layout-file-a", 1 << 20, 3, Some(p)).unwrap();
    // the file again, under another name (another mapping): accepted
    assert!(Zone::open("layout-file-b", 1 << 20, 3, Some(p)).is_ok());
    // the file as an older library would have left it
    // SAFETY: the header is at the base of the live mapping; nothing else
    // reads or writes the zone meanwhile (a plain field, written once at
    // creation).
    unsafe { (*(z.as_ptr() as *mut Header)).layout_version = LAYOUT_VERSION - 1 };
    let r = Zone::open("layout-file-c", 1 << 20, 3, Some(p));
    std::fs::remove_dir_all(&dir).unwrap();
    match r {
        Err(OpenError::Invalid(e)) => assert!(e.contains("another layout"), "{e}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!(
            "a zone file of layout version {} opened",
            LAYOUT_VERSION - 1
        ),
    }
}

#[test]
fn short_counters_fill_the_table() {
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>6} {:>6}",
        "size", "planes", "slots_cap", "slot_limit", "filled", "B/series", "keys", "cells"
    );
    for (size, name) in [
        (256u64 << 10, "256k"),
        (8 << 20, "8m"),
        (32 << 20, "32m"),
        (128 << 20, "128m"),
    ] {
        for planes in [3u32, 5] {
            let (z, _) =
                Zone::open(&format!("capacity-{name}-{planes}"), size, planes, None).unwrap();
            let id = registry::define(
                &z,
                &Def {
                    name: "fill_total",
                    help: b"Filler series.",
                    kind: Kind::Counter,
                    mode: 0,
                    labels: vec!["a", "b"],
                    buckets: vec![],
                },
            )
            .unwrap();
            let mut filled = 0u64;
            loop {
                let a = (filled / 1000).to_string();
                let b = (filled % 1000).to_string();
                match registry::series_get(&z, id, &[a.as_bytes(), b.as_bytes()]) {
                    Ok(_) => filled += 1,
                    Err(SeriesError::Table(TableError::Full)) => break,
                    Err(e) => panic!("{name}, {planes} planes, series {filled}: {e:?}"),
                }
            }
            let h = z.header();
            let limit = z.table().slot_limit();
            let keys = h.keys_used.load(Ordering::Relaxed) as f64 / h.keys_cap as f64;
            let cells = h.cells_used.load(Ordering::Relaxed) as f64 / h.cells_cap as f64;
            println!(
                "{name:>6} {planes:>6} {:>10} {limit:>10} {filled:>10} {:>9.1} {:>5.0}% {:>5.0}%",
                h.slots_cap,
                size as f64 / filled as f64,
                keys * 100.0,
                cells * 100.0
            );
            assert_eq!(
                filled, limit,
                "{name}, {planes} planes: the table, not an arena, runs out first"
            );
            // one block and one cell per series: neither arena is more
            // than 1/4 larger than the table needs
            let blocks = h.keys_cap / BLOCK;
            assert!(
                filled * 5 >= blocks * 4 * 99 / 100 && filled * 5 >= h.cells_cap * 4 * 99 / 100,
                "{name}, {planes} planes: {filled} series left {blocks} key blocks and {} cells \
                 mostly unused",
                h.cells_cap
            );
            assert!(shmprom::check::check(&z).is_ok());
        }
    }
}
