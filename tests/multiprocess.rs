//! Real processes (fork) updating the same series at once: the sums are
//! exact, through per-writer planes (plain stores) and through the shared
//! plane (atomic adds), and a dead writer's plane is adopted with its
//! counts while its live-gauge share drops out; a writer that finds every
//! plane held keeps its live-gauge share on a spare, which drops out when
//! it is killed and moves to its plane when it gets one.
//!
//! One #[test] in this file, so the harness runs no other thread while we
//! fork.

use shmprom::cells::{claim_plane, claim_spare, f64_add, live_planes, spare_held, sum_cell};
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

    spares();
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

/// A child process driven through pipes: it runs `f` with a command reader
/// and an answer writer.
struct Child {
    pid: i32,
    cmd: i32,
    ans: i32,
}

impl Child {
    fn spawn(f: impl FnOnce(&mut dyn FnMut() -> u8, &mut dyn FnMut(u8))) -> Child {
        let (crd, cwr) = pipe();
        let (ard, awr) = pipe();
        // SAFETY: the child only runs `f` (this test binary runs one test,
        // no other thread holds a lock) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        // SAFETY: each side closes the pipe ends it does not use, so a read
        // sees the end of the pipe when the other side is gone.
        unsafe {
            if pid == 0 {
                libc::close(cwr);
                libc::close(ard);
            } else {
                libc::close(crd);
                libc::close(awr);
            }
        }
        if pid == 0 {
            let mut read = || {
                let mut b = [0u8; 1];
                // SAFETY: reads one byte into a valid buffer.
                let n = unsafe { libc::read(crd, b.as_mut_ptr() as *mut _, 1) };
                if n == 1 {
                    b[0]
                } else {
                    0
                }
            };
            let mut write = |b: u8| {
                // SAFETY: writes one byte from a valid buffer.
                unsafe { libc::write(awr, [b].as_ptr() as *const _, 1) };
            };
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut read, &mut write)));
            // SAFETY: ends the child without running the parent's atexit.
            unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) };
        }
        Child {
            pid,
            cmd: cwr,
            ans: ard,
        }
    }
    /// Sends a command byte and waits for the answer byte.
    fn ask(&self, c: u8) -> u8 {
        // SAFETY: one byte each way on our own pipes.
        unsafe {
            assert_eq!(libc::write(self.cmd, [c].as_ptr() as *const _, 1), 1);
            let mut b = [0u8; 1];
            assert_eq!(
                libc::read(self.ans, b.as_mut_ptr() as *mut _, 1),
                1,
                "child gone"
            );
            b[0]
        }
    }
    /// Waits for the child to end; returns its wait status.
    fn wait(&self) -> i32 {
        let mut st = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(self.pid, &mut st, 0) }, self.pid);
        st
    }
}

/// A zone with one worker plane and one spare. A holds the plane; B finds
/// none, takes the spare and puts its in-flight share there; C finds
/// neither and is killed; A exits; B takes the plane (its share moves with
/// it, the spare is free again); D takes the spare and is killed -9.
fn spares() {
    let (z, _) = Zone::open("mp-spares", 1 << 20, 2, None).unwrap();
    assert_eq!(z.nspares(), 1);
    let c = registry::define(&z, &def("reqs_total", Kind::Counter, 0, vec![], vec![])).unwrap();
    let g = registry::define(&z, &def("busy", Kind::Gauge, MODE_LIVESUM, vec![], vec![])).unwrap();
    let cc = registry::series_get(&z, c, &[]).unwrap() as u64;
    let gc = registry::series_get(&z, g, &[]).unwrap() as u64;
    let fc = registry::family(&z, c).unwrap();
    let fg = registry::family(&z, g).unwrap();
    let total = || sum_cell(&z, &fc, &live_planes(&z), cc);
    let busy = || sum_cell(&z, &fg, &live_planes(&z), gc);
    let text = || String::from_utf8(render(&z, Format::Text)).unwrap();
    // adds `n` requests and `b` in flight the way a worker without a plane
    // does: counters atomically on the shared plane, its in-flight share on
    // its spare's cell
    let add_planeless = |spare: u32, n: f64, b: f64| {
        f64_add(z.cell(0, cc), n);
        assert!(spare_held(&z, spare, mypid()));
        f64_add(z.cell(0, gc + spare as u64), b);
    };

    let a = Child::spawn(|read, write| {
        read();
        let p = claim_plane(&z, mypid());
        // SAFETY: plane p is ours alone; cells in bounds and aligned.
        unsafe {
            *(z.cell_ptr(p, cc) as *mut f64) += 1.0;
            *(z.cell_ptr(p, gc) as *mut f64) += 1.0;
        }
        write(p as u8);
        read(); // exit
        write(0);
    });
    assert_eq!(a.ask(b'?'), 1, "A holds plane 1");
    let b = Child::spawn(|read, write| {
        read();
        assert_eq!(claim_plane(&z, mypid()), 0, "A holds the only plane");
        let s = claim_spare(&z, mypid());
        add_planeless(s, 10.0, 2.0);
        write(s as u8);
        read(); // take the plane
        let p = claim_plane(&z, mypid());
        assert!(
            !spare_held(&z, s, mypid()),
            "the plane's claim gave the spare back"
        );
        write(p as u8);
        read(); // exit
        write(0);
    });
    assert_eq!(b.ask(b'?'), 1, "B holds spare 1");
    assert_eq!((total(), busy()), (11.0, 3.0), "A's and B's shares");
    assert!(text().contains("shmprom_plane_spares{state=\"in_use\"} 1\n"));
    let cpid = Child::spawn(|read, write| {
        read();
        assert_eq!(claim_plane(&z, mypid()), 0);
        assert_eq!(claim_spare(&z, mypid()), 0, "B holds the only spare");
        write(0);
        // SAFETY: pause only waits for a signal.
        unsafe { libc::pause() };
    });
    assert_eq!(cpid.ask(b'?'), 0);
    // SAFETY: kills our own child.
    unsafe { libc::kill(cpid.pid, libc::SIGKILL) };
    cpid.wait();
    // A exits: its in-flight share drops out, its count stays
    let _ = a.ask(b'x');
    assert!(libc::WIFEXITED(a.wait()));
    assert_eq!(
        (total(), busy()),
        (11.0, 2.0),
        "A gone: its share out, its count in"
    );
    assert_eq!(b.ask(b'p'), 1, "B adopts A's plane");
    assert_eq!(
        (total(), busy()),
        (11.0, 2.0),
        "B's share moved to its plane"
    );
    assert_eq!(
        z.cell(0, gc + 1).load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(text().contains("shmprom_plane_spares{state=\"in_use\"} 0\n"));
    // D takes the free spare, puts 4 in flight, and is killed
    let d = Child::spawn(|read, write| {
        read();
        assert_eq!(claim_plane(&z, mypid()), 0, "B holds the plane");
        let s = claim_spare(&z, mypid());
        add_planeless(s, 1.0, 4.0);
        write(s as u8);
        // SAFETY: pause only waits for a signal.
        unsafe { libc::pause() };
    });
    assert_eq!(d.ask(b'?'), 1, "D holds the spare B gave back");
    assert_eq!((total(), busy()), (12.0, 6.0));
    // SAFETY: kills our own child.
    unsafe { libc::kill(d.pid, libc::SIGKILL) };
    d.wait();
    assert_eq!(
        (total(), busy()),
        (12.0, 2.0),
        "D killed: its share drops out"
    );
    // E adopts D's dead spare, which starts from zero
    let e = Child::spawn(|read, write| {
        read();
        let s = claim_spare(&z, mypid());
        assert_eq!(
            z.cell(0, gc + s as u64)
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        write(s as u8);
    });
    assert_eq!(e.ask(b'?'), 1);
    assert!(libc::WIFEXITED(e.wait()));
    let _ = b.ask(b'x');
    assert!(libc::WIFEXITED(b.wait()));
    assert_eq!((total(), busy()), (12.0, 0.0));
    assert!(shmprom::check::check(&z).is_ok());
}
