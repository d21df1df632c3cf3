//! The `prefault` zone option (Zone::prefault): afterwards every page of
//! the zone is resident (mincore) and mapped in the calling process (the
//! mapping's Rss in /proc/self/smaps); a forked child, which inherits the
//! mapping but not its page table entries, maps it with PrefaultHow::Map;
//! the fallback for kernels without MADV_POPULATE_* does the same; the
//! table part (the default of shmprom.new) brings in the records and the
//! slot array and not the arenas; populate_ahead brings in the pages just
//! past the cell frontier of the caller's plane and the key arena's, per
//! process, at most so many pages per call, never past a region; and
//! none of them changes a value of a zone in use, not even a word another
//! process is updating with plain stores at that moment.
//!
//! One #[test] in this file, so the harness runs no other thread while we
//! fork.

use shmprom::expose::{render, Format};
use shmprom::registry::{self, Def, Kind};
use shmprom::zone::{PrefaultHow, PrefaultMethod, PrefaultPart, Zone};
use std::sync::atomic::{AtomicU64, Ordering};

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Pages of the zone resident in memory (mincore), and all its pages.
fn resident(z: &Zone) -> (usize, usize) {
    resident_in(z, z.header().size as usize)
}

/// Pages resident among the first `len` bytes of the zone, and their count.
fn resident_in(z: &Zone, len: usize) -> (usize, usize) {
    let n = len.div_ceil(page());
    let mut v = vec![0u8; n];
    // SAFETY: the zone is a live mapping of `len` bytes at a page-aligned
    // base; v holds one byte per page.
    let rc = unsafe { libc::mincore(z.as_ptr() as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (v.iter().filter(|b| **b & 1 != 0).count(), n)
}

/// Pages resident among bytes `off .. off + len` of the zone (`off` a
/// multiple of the page size), and their count.
fn resident_range(z: &Zone, off: usize, len: usize) -> (usize, usize) {
    let n = len.div_ceil(page());
    let mut v = vec![0u8; n];
    // SAFETY: the range lies inside the zone's live mapping, from a
    // page-aligned address; v holds one byte per page.
    let rc = unsafe {
        libc::mincore(
            z.as_ptr().add(off) as *mut libc::c_void,
            len,
            v.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (v.iter().filter(|b| **b & 1 != 0).count(), n)
}

/// The zone offsets of the two frontiers populate_ahead keeps ahead of:
/// the cells' of `plane` and the key arena's, each with the end of its
/// region.
fn frontiers(z: &Zone, plane: u64) -> [(u64, u64); 2] {
    let h = z.header();
    let cells = h.cells_off + plane * h.cells_cap * 8;
    let used = h.cells_used.load(Ordering::Relaxed);
    let keys = h.keys_off + h.keys_used.load(Ordering::Relaxed);
    [
        (cells + used * 8, cells + h.cells_cap * 8),
        (keys, h.keys_off + h.keys_cap),
    ]
}

/// Bytes of the zone mapped in this process's page tables: the Rss of the
/// mapping that starts at the zone's base, from /proc/self/smaps.
fn rss(z: &Zone) -> u64 {
    let start = format!("{:x}-", z.as_ptr() as usize);
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
    assert!(lines.next().is_some(), "zone mapping not in smaps");
    for l in lines {
        if let Some(kb) = l.strip_prefix("Rss:") {
            return kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    panic!("no Rss line for the zone mapping");
}

/// Runs `f` in a forked child; asserts it exits 0.
fn in_child(f: impl FnOnce()) {
    // SAFETY: the child only runs `f` (this test binary runs one test, so
    // no other thread holds a lock) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: ends the child without running the parent's atexit.
        unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) };
    }
    let mut st = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child failed: {st}"
    );
}

/// The exposition without the render's own figures (which change from one
/// render to the next).
fn text(z: &Zone) -> String {
    String::from_utf8(render(z, Format::Text))
        .unwrap()
        .lines()
        .filter(|l| !l.contains("shmprom_render_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A zone with a few series and values in several planes.
fn populated(name: &str, size: u64, path: Option<&str>) -> Zone {
    let (z, _) = Zone::open(name, size, 3, path).unwrap();
    let def = Def {
        name: "pf_ops_total",
        help: b"test",
        kind: Kind::Counter,
        mode: 0,
        labels: vec!["op"],
        buckets: vec![],
    };
    let c = registry::define(&z, &def).unwrap();
    for (i, op) in [&b"read"[..], b"write", b"stat"].iter().enumerate() {
        let cell = registry::series_get(&z, c, &[op]).unwrap() as u64;
        for p in 0..3 {
            let v = ((i + 1) * 10) as f64 + p as f64;
            z.cell(p, cell).store(v.to_bits(), Ordering::Relaxed);
        }
    }
    z
}

#[test]
fn prefault_makes_the_zone_resident() {
    let size = 64u64 << 20;

    // madvise: the process that creates the zone allocates it all
    let z = populated("pf-anon", size, None);
    let (res0, pages) = resident(&z);
    assert!(
        res0 < pages / 10,
        "a fresh zone is mostly not resident yet ({res0} of {pages} pages)"
    );
    // (rendering reads the whole slot array: after the residency check)
    let before = text(&z);
    assert!(
        before.contains("pf_ops_total{op=\"write\"} 63\n"),
        "{before}"
    );
    let m = z
        .prefault(PrefaultHow::Allocate, PrefaultPart::Zone)
        .unwrap();
    if m != PrefaultMethod::Madvise {
        eprintln!("kernel without MADV_POPULATE_WRITE: the zone was touched page by page");
    }
    assert_eq!(resident(&z), (pages, pages), "every page resident");
    assert_eq!(rss(&z), size, "every page mapped in this process");
    assert_eq!(text(&z), before, "prefault changed no value");
    // again (the master on a reload): harmless
    z.prefault(PrefaultHow::Allocate, PrefaultPart::Zone)
        .unwrap();
    assert_eq!(text(&z), before);

    // a forked worker inherits the pages but not their page table entries
    in_child(|| {
        let r0 = rss(&z);
        z.prefault(PrefaultHow::Map, PrefaultPart::Zone).unwrap();
        eprintln!(
            "child: zone Rss {r0} bytes after fork, {} after Map",
            rss(&z)
        );
        assert_eq!(rss(&z), size, "Map maps every page in the child");
        assert_eq!(resident(&z), (pages, pages));
    });

    // the table part: records and slots resident, the arenas not
    let tz = populated("pf-table", size, None);
    let tlen = tz.part_len(PrefaultPart::Table);
    let h = tz.header();
    assert!(
        tlen as u64 >= h.slots_off + h.slots_cap * 16 && tlen as u64 <= h.keys_off + page() as u64
    );
    assert!(
        tlen < size as usize / 2,
        "the table is a part of the zone: {tlen} of {size}"
    );
    let before = text(&tz);
    tz.prefault(PrefaultHow::Allocate, PrefaultPart::Table)
        .unwrap();
    let (tres, tpages) = resident_in(&tz, tlen);
    assert_eq!(tres, tpages, "every page of the table resident");
    let (all, pages) = resident(&tz);
    assert!(
        all < tpages + pages / 10,
        "the arenas stay out: {all} of {pages} pages resident, {tpages} of them the table's"
    );
    assert_eq!(text(&tz), before, "prefault changed no value");
    in_child(|| {
        tz.prefault(PrefaultHow::Map, PrefaultPart::Table).unwrap();
        let r = rss(&tz) as usize;
        assert!(
            r >= tlen && r < tlen + size as usize / 10,
            "Map of the table maps its {tlen} bytes (Rss {r})"
        );
    });
    tz.touch_pages(PrefaultHow::Map, PrefaultPart::Table);

    // the fallback for kernels before 5.14, called directly
    let t = populated("pf-touch", 16 << 20, None);
    let (res0, pages) = resident(&t);
    assert!(res0 < pages / 10, "{res0} of {pages} pages");
    let before = text(&t);
    t.touch_pages(PrefaultHow::Allocate, PrefaultPart::Zone);
    assert_eq!(
        resident(&t),
        (pages, pages),
        "touching makes every page resident"
    );
    assert_eq!(rss(&t), 16 << 20);
    assert_eq!(text(&t), before, "touching changed no value");
    in_child(|| {
        t.touch_pages(PrefaultHow::Map, PrefaultPart::Zone);
        assert_eq!(rss(&t), 16 << 20, "touching maps every page in the child");
    });

    // a zone in a file (path = ...): the same, and the values stay
    let dir = std::env::temp_dir().join(format!("shmprom-prefault-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("zone");
    let f = populated("pf-file", 4 << 20, Some(file.to_str().unwrap()));
    let before = text(&f);
    f.prefault(PrefaultHow::Allocate, PrefaultPart::Zone)
        .unwrap();
    let (res, pages) = resident(&f);
    assert_eq!(res, pages);
    assert_eq!(text(&f), before);
    let _ = std::fs::remove_dir_all(&dir);

    // populate_ahead: the pages past the cell frontier of the caller's
    // plane and past the key arena's, `ahead` bytes of each, resident and
    // mapped in this process; another plane's not
    let pg = page() as u64;
    let a = populated("pf-ahead", size, None);
    let before = text(&a);
    let ahead = 1u64 << 20;
    let mut marks = [0u64; 2];
    let n = a.populate_ahead(2, ahead, 1 << 20, &mut marks).unwrap();
    let fr = frontiers(&a, 2);
    let mut want = 0;
    for (r, (f, end)) in fr.iter().enumerate() {
        let from = f / pg * pg;
        let to = (f + ahead).min(*end).div_ceil(pg) * pg;
        assert_eq!(marks[r], to, "region {r}: done up to frontier + ahead");
        let (res, all) = resident_range(&a, from as usize, (to - from) as usize);
        assert_eq!(res, all, "region {r}: every page ahead resident");
        want += (to - from) / pg;
    }
    assert_eq!(n, want, "the pages populated are counted");
    assert!(
        rss(&a) >= want * pg,
        "and mapped in this process: Rss {} for {want} pages",
        rss(&a)
    );
    for p in [0, 1] {
        let o = frontiers(&a, p)[0];
        let (res, _) = resident_range(&a, (o.0 / pg * pg + pg) as usize, ahead as usize);
        assert_eq!(res, 0, "plane {p}'s cells are left alone");
    }
    assert_eq!(
        a.populate_ahead(2, ahead, 1 << 20, &mut marks).unwrap(),
        0,
        "nothing more while the frontiers stay"
    );
    assert_eq!(text(&a), before, "populate_ahead changed no value");
    // new series move the frontiers: only the pages past the old window
    let hdef = Def {
        name: "pf_seconds",
        help: b"test",
        kind: Kind::Histogram,
        mode: 0,
        labels: vec!["path"],
        buckets: (1..=19).map(|i| i as f64).collect(),
    };
    let hid = registry::define(&a, &hdef).unwrap();
    for i in 0..2000 {
        registry::series_get(&a, hid, &[format!("/p/{i}").as_bytes()]).unwrap();
    }
    let old = marks;
    let n2 = a.populate_ahead(2, ahead, 1 << 20, &mut marks).unwrap();
    let fr2 = frontiers(&a, 2);
    let mut want2 = 0;
    for r in 0..2 {
        let to = (fr2[r].0 + ahead).min(fr2[r].1).div_ceil(pg) * pg;
        assert_eq!(marks[r], to, "region {r} after 2000 new series");
        want2 += (to - old[r]) / pg;
    }
    assert!(
        n2 > 0 && n2 == want2,
        "{n2} pages populated, {want2} wanted"
    );
    // at most max_pages per call; calls go on where the last stopped
    let b = populated("pf-ahead-steps", 16 << 20, None);
    let mut bm = [0u64; 2];
    let mut calls = 0;
    let mut total = 0;
    loop {
        let k = b.populate_ahead(1, ahead, 7, &mut bm).unwrap();
        assert!(k <= 7, "{k} pages in one call");
        total += k;
        calls += 1;
        if k == 0 {
            break;
        }
    }
    let mut one = [0u64; 2];
    let c = populated("pf-ahead-once", 16 << 20, None);
    assert_eq!(
        total,
        c.populate_ahead(1, ahead, 1 << 20, &mut one).unwrap()
    );
    assert!(calls > total / 7, "{calls} calls for {total} pages");
    // a window longer than a region stops at its end (bounds as large as
    // they come: no overflow)
    let s = populated("pf-ahead-small", 256 << 10, None);
    let mut sm = [0u64; 2];
    s.populate_ahead(2, u64::MAX, u64::MAX, &mut sm).unwrap();
    for (r, (_, end)) in frontiers(&s, 2).iter().enumerate() {
        assert!(
            sm[r] <= end.div_ceil(pg) * pg,
            "region {r} stops at its end"
        );
    }
    assert_eq!(s.populate_ahead(2, 64 << 20, 1 << 20, &mut sm).unwrap(), 0);
    // per process: a forked child starts from marks of its own, maps the
    // same pages (already resident: no allocation) into its page tables
    in_child(|| {
        let r0 = rss(&a);
        let mut cm = [0u64; 2];
        let k = a.populate_ahead(2, ahead, 1 << 20, &mut cm).unwrap();
        assert_eq!(cm, marks, "the child's marks end where the parent's do");
        assert!(
            rss(&a) >= r0 + k * pg / 2,
            "the child maps the pages ahead: Rss {r0} -> {}",
            rss(&a)
        );
    });

    // live: a child bumps a word that starts a page (touched by the
    // fallback) with plain loads and stores, as a worker's Lua does on its
    // plane, while this process prefaults the zone over and over; no
    // increment may be lost
    let (l, _) = Zone::open("pf-live", 1 << 20, 3, None).unwrap();
    let h = l.header();
    let idx = (0..h.cells_cap)
        .find(|&i| l.cell_ptr(1, i) as usize % page() == 0)
        .expect("a cell of plane 1 starts a page");
    let word = l.cell_ptr(1, idx);
    let done = l.cell(2, 0);
    const N: u64 = 20_000_000;
    // SAFETY: the child runs only the loop below and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        for _ in 0..N {
            // SAFETY: word is an aligned cell inside the zone that only
            // this process stores to; volatile keeps every load and store.
            unsafe { word.write_volatile(word.read_volatile() + 1) };
        }
        done.store(1, Ordering::Release);
        // SAFETY: ends the child without running the parent's atexit.
        unsafe { libc::_exit(0) };
    }
    let mut passes = 0u64;
    while done.load(Ordering::Acquire) == 0 {
        if passes % 2 == 0 {
            l.touch_pages(PrefaultHow::Allocate, PrefaultPart::Zone);
        } else {
            l.prefault(PrefaultHow::Allocate, PrefaultPart::Zone)
                .unwrap();
        }
        passes += 1;
    }
    let mut st = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0);
    // SAFETY: the writer has exited; word is inside the zone.
    let got = unsafe { (*(word as *const AtomicU64)).load(Ordering::Relaxed) };
    eprintln!("live zone: {passes} prefault passes during {N} plain increments");
    assert!(passes > 0);
    assert_eq!(got, N, "no increment lost to a prefault pass");
}
