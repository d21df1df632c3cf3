//! The protocol's states one at a time (the races are in `loom_tests`).

use super::*;
use std::cell::Cell;

#[derive(Default)]
struct Rec {
    word: AtomicU32,
    start: AtomicU64,
    claims: AtomicU64,
}

impl OwnerRec for Rec {
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

/// Processes 1..=9 with start time 100 + pid; `dead` lists the exited ones.
struct Procs {
    dead: Vec<u32>,
}

impl Liveness for Procs {
    fn alive(&self, pid: u32, start: u64) -> bool {
        self.exists(pid) && start == 100 + pid as u64
    }
    fn exists(&self, pid: u32) -> bool {
        (1..=9).contains(&pid) && !self.dead.contains(&pid)
    }
}

fn recs(n: usize) -> Vec<Rec> {
    (0..n).map(|_| Rec::default()).collect()
}

fn set(r: &Rec, word: u32, start: u64) {
    r.word.store(word, Ordering::Relaxed);
    r.start.store(start, Ordering::Relaxed);
}

fn claim_as(planes: &[Rec], pid: u32, life: &Procs, adopted: &Cell<usize>) -> u32 {
    claim(planes, pid, 100 + pid as u64, life, |_| {
        adopted.set(adopted.get() + 1)
    })
}

#[test]
fn free_then_own_then_full() {
    let p = recs(3);
    let life = Procs { dead: vec![] };
    let n = Cell::new(0);
    assert_eq!(claim_as(&p, 1, &life, &n), 1);
    assert_eq!(claim_as(&p, 1, &life, &n), 1, "its own plane again");
    assert_eq!(claim_as(&p, 2, &life, &n), 2);
    assert_eq!(claim_as(&p, 3, &life, &n), 0, "all held: the shared plane");
    assert_eq!(n.get(), 0);
    assert_eq!(p[1].word.load(Ordering::Relaxed), 1, "claim completed");
    assert_eq!(p[1].start.load(Ordering::Relaxed), 101);
    assert_eq!(p[1].claims.load(Ordering::Relaxed), 1);
    assert!(counts(&p[1], &life));
}

#[test]
fn dead_owner_is_adopted() {
    let p = recs(2);
    set(&p[1], 1, 101);
    let life = Procs { dead: vec![1] };
    let n = Cell::new(0);
    assert!(!counts(&p[1], &life));
    assert_eq!(claim_as(&p, 2, &life, &n), 1);
    assert_eq!(n.get(), 1, "livesum shares zeroed");
    assert_eq!(p[1].word.load(Ordering::Relaxed), 2);
    assert_eq!(p[1].start.load(Ordering::Relaxed), 102);
    // pid reuse: same pid, another start time
    set(&p[1], 3, 99);
    assert_eq!(claim_as(&p, 3, &life, &n), 1);
    assert_eq!(n.get(), 2);
}

/// The state the old protocol misjudged: a live claimer's word is written,
/// its start time not yet (still the dead previous owner's).
#[test]
fn half_done_claim_of_live_process_is_held() {
    let p = recs(2);
    set(&p[1], 2 | CLAIMING, 101);
    let life = Procs { dead: vec![1] };
    let n = Cell::new(0);
    assert_eq!(claim_as(&p, 3, &life, &n), 0);
    assert_eq!(p[1].word.load(Ordering::Relaxed), 2 | CLAIMING, "untouched");
    assert!(!counts(&p[1], &life), "not counted until complete");
    // its start time written: still not counted until the word is complete
    set(&p[1], 2 | CLAIMING, 102);
    assert!(!counts(&p[1], &life));
}

#[test]
fn half_done_claim_of_dead_process_is_adopted() {
    let p = recs(2);
    set(&p[1], 2 | CLAIMING, 0);
    let life = Procs { dead: vec![2] };
    let n = Cell::new(0);
    assert_eq!(claim_as(&p, 3, &life, &n), 1);
    assert_eq!(n.get(), 1);
    assert_eq!(p[1].word.load(Ordering::Relaxed), 3);
}

#[test]
fn impossible_pids_get_the_shared_plane() {
    let p = recs(2);
    let life = Procs { dead: vec![] };
    let n = Cell::new(0);
    assert_eq!(claim(&p, 0, 0, &life, |_| {}), 0);
    assert_eq!(claim_as(&p, 5 | CLAIMING, &life, &n), 0);
    assert_eq!(p[1].word.load(Ordering::Relaxed), 0, "still free");
}
