//! loom models of plane claim and adoption (`make test-loom`).
//!
//! Each loom thread stands for one nginx worker process. A plane has its
//! owner record (the real protocol runs on it), one counter cell written
//! with plain stores by the owner only (a loom `UnsafeCell`: loom reports
//! any two accesses not ordered by happens-before, so two processes that
//! both believe they own the plane are caught), and one livesum gauge share
//! (an atomic: readers sum it while the owner writes it).
//!
//! Process death is a flag per pid, set with Release by the dying process
//! and read with Acquire by the liveness check: kill(2) can only report
//! ESRCH after the process has exited, by which point its stores are
//! visible.

use super::*;
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicBool;
use loom::sync::Arc;

const PIDS: usize = 8;

/// Start time of process `pid` (distinct per pid; a reused pid would have
/// another one).
fn start_of(pid: u32) -> u64 {
    1000 + pid as u64
}

struct Plane {
    word: AtomicU32,
    start: AtomicU64,
    claims: AtomicU64,
    /// A counter cell: the owner's plain `+=`.
    counter: UnsafeCell<u64>,
    /// A livesum gauge share.
    live: AtomicU64,
}

impl OwnerRec for Plane {
    fn word(&self) -> &AtomicU32 {
        &self.word
    }
    fn start(&self) -> &AtomicU64 {
        &self.start
    }
    fn claims(&self) -> &AtomicU64 {
        &self.claims
    }
}

struct World {
    planes: Vec<Plane>,
    dead: Vec<AtomicBool>,
}

// SAFETY: `counter` is only touched by the process that claim() made the
// plane's owner (or by the setup before any thread starts); that exclusion
// is what the models check, and loom reports any access that breaks it.
unsafe impl Sync for World {}
// SAFETY: as above; nothing in World is tied to one thread.
unsafe impl Send for World {}

impl Liveness for World {
    fn alive(&self, pid: u32, start: u64) -> bool {
        let Some(d) = self.dead.get(pid as usize) else {
            return false;
        };
        pid != 0 && !d.load(Ordering::Acquire) && start == start_of(pid)
    }
    fn exists(&self, pid: u32) -> bool {
        let Some(d) = self.dead.get(pid as usize) else {
            return false;
        };
        pid != 0 && !d.load(Ordering::Acquire)
    }
}

/// `n` planes (plane 0 included), all free, no process dead.
fn world(n: usize) -> Arc<World> {
    Arc::new(World {
        planes: (0..n)
            .map(|_| Plane {
                word: AtomicU32::new(0),
                start: AtomicU64::new(0),
                claims: AtomicU64::new(0),
                counter: UnsafeCell::new(0),
                live: AtomicU64::new(0),
            })
            .collect(),
        dead: (0..PIDS).map(|_| AtomicBool::new(false)).collect(),
    })
}

impl World {
    /// Process `pid` claims a plane the way cells::claim_plane does:
    /// adoption zeroes the plane's livesum share.
    fn claim(&self, pid: u32) -> u32 {
        claim(&self.planes, pid, start_of(pid), self, |i| {
            self.planes[i].live.store(0, Ordering::Relaxed)
        })
    }

    /// The owner of plane `p` adds `n` to its counter cell (plain stores).
    fn bump(&self, p: u32, n: u64) {
        // SAFETY: called only by the owner of plane p (what the models
        // check: loom fails the model on an unordered second writer).
        self.planes[p as usize]
            .counter
            .with_mut(|c| unsafe { *c += n });
    }

    fn counter(&self, p: u32) -> u64 {
        // SAFETY: read by a process ordered after every writer (joined or
        // dead-and-seen-dead), as the models arrange.
        self.planes[p as usize].counter.with(|c| unsafe { *c })
    }

    /// Process `pid` exits.
    fn die(&self, pid: u32) {
        self.dead[pid as usize].store(true, Ordering::Release);
    }

    /// A plane held by `pid` since before the model, with counter and
    /// livesum share values; `dead` says whether `pid` has exited.
    fn held(&self, p: usize, pid: u32, counter: u64, live: u64, dead: bool) {
        let pl = &self.planes[p];
        pl.word.store(pid, Ordering::Relaxed);
        pl.start.store(start_of(pid), Ordering::Relaxed);
        pl.claims.store(1, Ordering::Relaxed);
        // SAFETY: setup, before any other thread exists.
        pl.counter.with_mut(|c| unsafe { *c = counter });
        pl.live.store(live, Ordering::Relaxed);
        if dead {
            self.die(pid);
        }
    }

    /// The renderer's livesum sum: which planes count (live_planes), then
    /// their shares plus plane 0's.
    fn livesum(&self) -> u64 {
        let live: Vec<bool> = self
            .planes
            .iter()
            .enumerate()
            .map(|(i, p)| i == 0 || counts(p, self))
            .collect();
        self.planes
            .iter()
            .zip(live)
            .filter(|(_, l)| *l)
            .map(|(p, _)| p.live.load(Ordering::Relaxed))
            .sum()
    }
}

/// Runs `f` under loom. The protocol has no spin loops, so the schedules
/// are finite and explored without a preemption bound: every schedule
/// loom's memory model can produce (it does not produce every weak
/// behaviour C11 allows, load buffering for one; SeqCst is not used here).
fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(None, f)
}

/// Runs `f` under loom with at most `bound` preemptions per schedule (for
/// models whose full schedule space is too large).
fn model_bounded(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    crate::sync::loom_model(bound, f)
}

/// Two workers start at once and race for the one free plane: exactly one
/// gets it, the other falls back to the shared plane 0, and neither is
/// mistaken for a dead owner while its claim is half done.
#[test]
fn two_claimers_one_free_plane() {
    model(|| {
        let w = world(2);
        let w2 = w.clone();
        let th = loom::thread::spawn(move || {
            let p = w2.claim(2);
            if p > 0 {
                w2.bump(p, 1);
            }
            p
        });
        let a = w.claim(1);
        if a > 0 {
            w.bump(a, 1);
        }
        let b = th.join().unwrap();
        assert_eq!((a.min(b), a.max(b)), (0, 1), "one plane, one owner");
        assert_eq!(w.planes[1].claims.load(Ordering::Relaxed), 1);
        assert_eq!(w.counter(1), 1);
    });
}

/// Two workers race for two free planes: each gets its own.
#[test]
fn two_claimers_two_free_planes() {
    model(|| {
        let w = world(3);
        let w2 = w.clone();
        let th = loom::thread::spawn(move || {
            let p = w2.claim(2);
            w2.bump(p, 1);
            p
        });
        let a = w.claim(1);
        w.bump(a, 1);
        let b = th.join().unwrap();
        assert!(a > 0 && b > 0 && a != b, "planes {a} and {b}");
    });
}

/// A worker died holding plane 1 (counter 5, livesum share 3); two new
/// workers race to adopt it: exactly one does, keeps the counter, starts
/// from a zero livesum share; the other gets plane 0.
#[test]
fn two_adopters_one_dead_plane() {
    model(|| {
        let w = world(2);
        w.held(1, 1, 5, 3, true);
        let w2 = w.clone();
        let th = loom::thread::spawn(move || {
            let p = w2.claim(3);
            if p > 0 {
                assert_eq!(w2.planes[1].live.load(Ordering::Relaxed), 0);
                w2.bump(p, 1);
                assert_eq!(w2.claim(3), p, "its own plane again");
            }
            p
        });
        let a = w.claim(2);
        if a > 0 {
            assert_eq!(w.planes[1].live.load(Ordering::Relaxed), 0);
            w.bump(a, 1);
            assert_eq!(w.claim(2), a, "its own plane again");
        }
        let b = th.join().unwrap();
        assert_eq!((a.min(b), a.max(b)), (0, 1), "one adopter");
        assert_eq!(w.counter(1), 6, "the dead owner's count is kept");
        assert_eq!(w.planes[1].claims.load(Ordering::Relaxed), 2);
        assert_eq!(w.livesum(), 0);
    });
}

/// A worker was killed half-way through adopting plane 1 (owner word
/// `1 | CLAIMING`, start time still the previous owner's, livesum share not
/// zeroed yet). Two new workers race for it: exactly one adopts it, with
/// the counter kept and the share zeroed; the other gets plane 0.
#[test]
fn adopters_vs_half_done_claim() {
    model(|| {
        let w = world(2);
        w.held(1, 4, 7, 3, true);
        w.planes[1].word.store(1 | CLAIMING, Ordering::Relaxed);
        w.die(1);
        let w2 = w.clone();
        let th = loom::thread::spawn(move || {
            let p = w2.claim(3);
            if p > 0 {
                w2.bump(p, 1);
            }
            p
        });
        let a = w.claim(2);
        if a > 0 {
            w.bump(a, 1);
        }
        let b = th.join().unwrap();
        assert_eq!((a.min(b), a.max(b)), (0, 1), "one adopter");
        assert_eq!(w.counter(1), 8);
        assert_eq!(w.planes[1].live.load(Ordering::Relaxed), 0);
        let winner = if a > 0 { 2 } else { 3 };
        assert_eq!(w.planes[1].word.load(Ordering::Relaxed), winner);
    });
}

/// An old worker (of a reload) still holds plane 1 and writes it, then
/// exits; a new worker claims meanwhile and retries once (the Lua retry
/// timer). While the old one lives the new one gets plane 0; if it gets
/// plane 1 its writes come after all of the old owner's.
#[test]
fn adopter_vs_exiting_owner() {
    model(|| {
        let w = world(2);
        w.held(1, 1, 0, 0, false);
        let w2 = w.clone();
        let old = loom::thread::spawn(move || {
            w2.bump(1, 2);
            w2.die(1);
        });
        let mut p = w.claim(2);
        if p == 0 {
            p = w.claim(2);
        }
        if p > 0 {
            assert!(
                w.dead[1].load(Ordering::Relaxed),
                "adopted from a live owner"
            );
            w.bump(p, 1);
        }
        old.join().unwrap();
        assert_eq!(w.counter(1), if p > 0 { 3 } else { 2 });
    });
}

/// A renderer sums a livesum gauge while a new worker adopts the plane of a
/// dead one (share 3) and then adds its own share (1): the dead share never
/// shows, before, during or after the adoption.
#[test]
fn livesum_reader_during_adoption() {
    model(|| {
        let w = world(2);
        w.held(1, 1, 0, 3, true);
        let w2 = w.clone();
        // the renderer in the spawned thread: loom explores too little with
        // a main thread that only loads
        let reader = loom::thread::spawn(move || w2.livesum());
        let p = w.claim(2);
        assert_eq!(p, 1);
        // the owner's plain store of its new share
        w.planes[1].live.store(1, Ordering::Relaxed);
        let s = reader.join().unwrap();
        assert!(
            s == 0 || s == 1,
            "livesum {s}: the dead worker's share shows"
        );
        assert_eq!(w.livesum(), 1);
    });
}

/// Three workers start at once with two planes: two get one each, the
/// third the shared plane (preemptions bounded to 3, like the series
/// models: unbounded it runs for many minutes).
#[test]
fn three_claimers_two_free_planes() {
    model_bounded(Some(3), || {
        let w = world(3);
        let spawn = |pid| {
            let w = w.clone();
            loom::thread::spawn(move || {
                let p = w.claim(pid);
                if p > 0 {
                    w.bump(p, 1);
                }
                p
            })
        };
        let (t2, t3) = (spawn(2), spawn(3));
        let a = w.claim(1);
        if a > 0 {
            w.bump(a, 1);
        }
        let mut got = [a, t2.join().unwrap(), t3.join().unwrap()];
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
    });
}

/// Two new workers race to adopt a dead worker's plane (livesum share 3)
/// while a renderer sums: one adopter, and the renderer never shows the
/// dead share (only 0, or the winner's own share 1).
#[test]
fn adoption_race_with_reader() {
    model(|| {
        let w = world(2);
        w.held(1, 1, 5, 3, true);
        let adopter = |pid| {
            let w = w.clone();
            loom::thread::spawn(move || {
                let p = w.claim(pid);
                if p > 0 {
                    w.bump(p, 1);
                    w.planes[1].live.store(1, Ordering::Relaxed);
                }
                p
            })
        };
        let (t2, t3) = (adopter(2), adopter(3));
        let s = w.livesum();
        assert!(
            s == 0 || s == 1,
            "livesum {s}: the dead worker's share shows"
        );
        let (a, b) = (t2.join().unwrap(), t3.join().unwrap());
        assert_eq!((a.min(b), a.max(b)), (0, 1), "one adopter");
        assert_eq!(w.counter(1), 6);
        assert_eq!(w.livesum(), 1);
    });
}

/// A spare given back (`release`) while another worker claims: the owner
/// zeroes its livesum share (moved to its new plane) and makes its last
/// plain write, then releases; a claimer that gets the record sees the
/// share zeroed and its writes ordered after the owner's (loom fails the
/// model on an unordered access to the cell), and one that does not gets
/// nothing: never two owners.
#[test]
fn release_races_claim() {
    model(|| {
        let w = world(2);
        w.held(1, 1, 5, 3, false);
        let w2 = w.clone();
        let th = loom::thread::spawn(move || {
            let p = w2.claim(2);
            if p > 0 {
                assert_eq!(
                    w2.planes[1].live.load(Ordering::Relaxed),
                    0,
                    "the released share shows to the next owner"
                );
                w2.bump(p, 1);
            }
            p
        });
        // the owner (pid 1): share moved away, last write, then release
        w.planes[1].live.store(0, Ordering::Relaxed);
        w.bump(1, 10);
        assert!(release(&w.planes[1], 1, start_of(1)));
        assert!(!release(&w.planes[1], 1, start_of(1)), "released once");
        let b = th.join().unwrap();
        let c = w.counter(1);
        assert!(
            (b == 1 && c == 16) || (b == 0 && c == 15),
            "claim {b}, counter {c}"
        );
        assert!(!holds(&w.planes[1], 1, start_of(1)));
    });
}
