//! Real processes (fork) updating the same series at once: the sums are
//! exact, through per-writer planes (plain stores) and through the shared
//! plane (atomic adds), and a dead writer's plane is adopted with its
//! counts while its live-gauge share drops out.
//!
//! One #[test] in this file, so the harness runs no other thread while we
//! fork.

use shmprom::cells::{claim_plane, f64_add, live_planes, sum_cell};
use shmprom::expose::{render, Format};
use shmprom::registry::{self, Def, Kind, MODE_LIVESUM};
use shmprom::zone::Zone;

fn def<'a>(
    name: &'a str,
    kind: Kind,
    mode: u32,
    labels: Vec<&'a str>,
    buckets: Vec<f64>,
) -> Def<'a> {
    Def {
        name,
        help: b"test",
        kind,
        mode,
        labels,
        buckets,
    }
}

/// Forks `n` children running `f(i)`; waits for all; asserts they exit 0.
fn fork_all(n: usize, f: impl Fn(usize)) {
    let mut pids = vec![];
    for i in 0..n {
        // SAFETY: the child only runs `f` (no locks held by other threads:
        // this test binary runs a single test) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)));
            // SAFETY: ends the child without running the parent's atexit.
            unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) };
        }
        pids.push(pid);
    }
    for pid in pids {
        let mut st = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "child failed: {st}"
        );
    }
}

fn mypid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

#[test]
fn processes_sum_exactly() {
    const PROCS: usize = 8;
    const N: u64 = 1_000_000;

    // 8 writers, 8 planes: every writer has its own plane.
    let (z, _) = Zone::open("mp-planes", 16 << 20, 1 + PROCS as u32, None).unwrap();
    let c = registry::define(&z, &def("ops_total", Kind::Counter, 0, vec!["op"], vec![])).unwrap();
    let h = registry::define(&z, &def("lat", Kind::Histogram, 0, vec![], vec![1.0, 2.0])).unwrap();
    let shared =
        registry::define(&z, &def("shared_total", Kind::Counter, 0, vec![], vec![])).unwrap();
    fork_all(PROCS, |i| {
        let plane = claim_plane(&z, mypid());
        assert!(plane > 0, "writer {i} got no plane");
        let cell = registry::series_get(&z, c, &[b"read"]).unwrap() as u64;
        let hc = registry::series_get(&z, h, &[]).unwrap() as u64;
        let sc = registry::series_get(&z, shared, &[]).unwrap() as u64;
        let p = z.cell_ptr(plane, cell) as *mut f64;
        let hb = z.cell_ptr(plane, hc) as *mut f64;
        for k in 0..N {
            // SAFETY: plane is ours alone; p and hb point at our plane's
            // cells of these series (in bounds, aligned). This is what the
            // Lua wrapper does through a double* cdata.
            unsafe {
                *p += 1.0;
                let b = (k % 3) as usize; // le=1, le=2, +Inf
                *hb.add(b) += 1.0;
                *hb.add(3) += 0.5;
            }
            if k % 10 == 0 {
                f64_add(z.cell(0, sc), 1.0);
            }
        }
    });
    let live = live_planes(&z);
    let fc = registry::family(&z, c).unwrap();
    let cell = registry::series_get(&z, c, &[b"read"]).unwrap() as u64;
    assert_eq!(sum_cell(&z, &fc, &live, cell), (PROCS as u64 * N) as f64);
    let fs = registry::family(&z, shared).unwrap();
    let sc = registry::series_get(&z, shared, &[]).unwrap() as u64;
    assert_eq!(sum_cell(&z, &fs, &live, sc), (PROCS as u64 * N / 10) as f64);
    let text = String::from_utf8(render(&z, Format::Text)).unwrap();
    assert!(text.contains("ops_total{op=\"read\"} 8000000\n"), "{text}");
    assert!(text.contains("lat_bucket{le=\"+Inf\"} 8000000\n"));
    assert!(text.contains("lat_count 8000000\n"));
    assert!(text.contains("lat_sum 4000000\n"));
    // buckets cumulative: k%3==0 -> le=1 (333334 per writer)
    assert!(text.contains("lat_bucket{le=\"1\"} 2666672\n"), "{text}");
    assert!(shmprom::check::check(&z).is_ok());

    // 4 writers, 2 planes: two of them write the shared plane atomically.
    let (z2, _) = Zone::open("mp-fallback", 1 << 20, 3, None).unwrap();
    let c2 = registry::define(&z2, &def("x_total", Kind::Counter, 0, vec![], vec![])).unwrap();
    let (rd, wr) = pipe();
    fork_all(4, |_| {
        let plane = claim_plane(&z2, mypid());
        let cell = registry::series_get(&z2, c2, &[]).unwrap() as u64;
        // hold the plane until all four have claimed
        write_byte(wr);
        wait_bytes(rd, 4);
        for _ in 0..200_000 {
            if plane > 0 {
                let p = z2.cell_ptr(plane, cell) as *mut f64;
                // SAFETY: our own plane's cell, in bounds and aligned.
                unsafe { *p += 1.0 };
            } else {
                f64_add(z2.cell(0, cell), 1.0);
            }
        }
        write_byte(wr);
    });
    let f2 = registry::family(&z2, c2).unwrap();
    let cell2 = registry::series_get(&z2, c2, &[]).unwrap() as u64;
    assert_eq!(sum_cell(&z2, &f2, &live_planes(&z2), cell2), 800_000.0);

    // Adoption: a dead writer's plane goes to the next claimer with its
    // counts; its livesum share drops out.
    let (z3, _) = Zone::open("mp-adopt", 1 << 20, 2, None).unwrap();
    let c3 = registry::define(&z3, &def("done_total", Kind::Counter, 0, vec![], vec![])).unwrap();
    let g3 = registry::define(
        &z3,
        &def("inflight", Kind::Gauge, MODE_LIVESUM, vec![], vec![]),
    )
    .unwrap();
    for round in 0..3 {
        fork_all(1, |_| {
            let plane = claim_plane(&z3, mypid());
            assert_eq!(
                plane, 1,
                "round {round}: the dead writer's plane is adopted"
            );
            let cc = registry::series_get(&z3, c3, &[]).unwrap() as u64;
            let gc = registry::series_get(&z3, g3, &[]).unwrap() as u64;
            // SAFETY: plane 1 is ours; cells in bounds and aligned.
            unsafe {
                assert_eq!(
                    *(z3.cell_ptr(1, gc) as *mut f64),
                    0.0,
                    "livesum share zeroed on adoption"
                );
                *(z3.cell_ptr(1, cc) as *mut f64) += 5.0;
                *(z3.cell_ptr(1, gc) as *mut f64) += 3.0;
            }
        });
        let live = live_planes(&z3);
        let f = registry::family(&z3, c3).unwrap();
        let cc = registry::series_get(&z3, c3, &[]).unwrap() as u64;
        assert_eq!(sum_cell(&z3, &f, &live, cc), 5.0 * (round + 1) as f64);
        let g = registry::family(&z3, g3).unwrap();
        let gc = registry::series_get(&z3, g3, &[]).unwrap() as u64;
        assert_eq!(
            sum_cell(&z3, &g, &live, gc),
            0.0,
            "dead writer's live share is not shown"
        );
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn write_byte(fd: i32) {
    // SAFETY: writes one byte from a valid buffer to our pipe.
    assert_eq!(unsafe { libc::write(fd, b"x".as_ptr() as *const _, 1) }, 1);
}

/// Waits until `n` bytes were written to the pipe in all (by anyone), then
/// puts them back so the other children see them too.
fn wait_bytes(fd: i32, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int into avail.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) };
        if avail as usize >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "peers never claimed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
