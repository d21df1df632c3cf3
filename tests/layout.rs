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

/// Fills zone `z` with 19-bucket histogram label sets of one short label
/// value (21 cells each) until one is refused; returns how many went in
/// and the fill ratio of each region then.
fn fill_histograms(z: &Zone) -> (u64, [(&'static str, f64); 3]) {
    let id = registry::define(
        z,
        &Def {
            name: "fill_seconds",
            help: b"Filler label sets.",
            kind: Kind::Histogram,
            mode: 0,
            labels: vec!["a"],
            buckets: (1..=19).map(|i| i as f64 / 100.0).collect(),
        },
    )
    .unwrap();
    let mut filled = 0u64;
    loop {
        let a = format!("r{filled:06}");
        match registry::series_get(z, id, &[a.as_bytes()]) {
            Ok(_) => filled += 1,
            Err(SeriesError::Table(TableError::Full)) => break,
            Err(e) => panic!("label set {filled}: {e:?}"),
        }
    }
    (filled, z.fill_ratios())
}

#[test]
fn a_zone_shared_for_histograms_holds_more_of_them() {
    let size = 8u64 << 20;
    let (d, _) = Zone::open("hist-default", size, 3, None).unwrap();
    let (n_default, r_default) = fill_histograms(&d);
    let (h, _) = Zone::open_for("hist-21", size, 3, 21.0, None).unwrap();
    let (n_21, r_21) = fill_histograms(&h);
    println!("default: {n_default} label sets, {r_default:?}");
    println!("cells_per_series 21: {n_21} label sets, {r_21:?}");
    // the default shares run out of cells with the table mostly empty
    assert!(r_default[0].1 < 0.2, "default slots {:?}", r_default[0]);
    assert!(r_default[2].1 > 0.99, "default cells {:?}", r_default[2]);
    // sized for 21 cells a series: the table and the cells run out
    // together, and the zone holds more than twice as many
    assert!(r_21[0].1 > 0.9 && r_21[2].1 > 0.9, "{r_21:?}");
    assert!(n_21 > 2 * n_default, "{n_21} against {n_default}");
    assert!(shmprom::check::check(&h).is_ok());
    // the same name again with another share: kept as it was, and said so
    let (_, differs) = Zone::open_for("hist-21", size, 3, 1.25, None).unwrap();
    assert!(differs);
    let (_, differs) = Zone::open_for("hist-21", size, 3, 21.0, None).unwrap();
    assert!(!differs);
    // out of range
    for bad in [0.5, 0.0, -1.0, 2000.0, f64::NAN] {
        match Zone::open_for("hist-bad", size, 3, bad, None) {
            Err(OpenError::Invalid(e)) => assert!(e.contains("cells per series"), "{e}"),
            Err(e) => panic!("{bad}: {e:?}"),
            Ok(_) => panic!("{bad}: opened"),
        }
    }
}

#[test]
fn a_zone_file_made_for_another_share_is_refused() {
    let dir = std::env::temp_dir().join(format!("shmprom-layout-cells-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zone");
    let p = path.to_str().unwrap();
    Zone::open_for("layout-cells-a", 1 << 20, 3, 21.0, Some(p)).unwrap();
    assert!(Zone::open_for("layout-cells-b", 1 << 20, 3, 21.0, Some(p)).is_ok());
    let r = Zone::open("layout-cells-c", 1 << 20, 3, Some(p));
    std::fs::remove_dir_all(&dir).unwrap();
    match r {
        Err(OpenError::Invalid(e)) => assert!(e.contains("another layout"), "{e}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a zone file made for 21 cells a series opened with the default"),
    }
}
