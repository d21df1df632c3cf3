//! Atomics used by the lock-free parts, switched to loom's under `cfg(loom)`
//! so the model checker sees every access.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Busy-wait hint inside bounded spin loops.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Runs a loom model with at most `bound` preemptions per schedule (None:
/// unbounded) and fails it if loom explored a single schedule (a model that
/// ran once proves nothing). SHMPROM_LOOM_STATS=1 prints the count.
#[cfg(all(test, loom))]
pub(crate) fn loom_model(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = bound;
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    b.check(move || {
        n2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    let n = n.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n > 1, "loom explored {n} schedule(s) only");
    if std::env::var_os("SHMPROM_LOOM_STATS").is_some() {
        eprintln!("{n} schedules");
    }
}
