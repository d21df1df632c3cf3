//! Rendering off the request path: a scrape starts (or joins) a render
//! running on a thread of its own, and the nginx worker keeps serving while
//! it polls. Scrapers arriving while a render runs, or within the caller's
//! window before their arrival of one that started, share its buffer.
//!
//! State is per process (each nginx worker renders for its own scrapers).

use super::{render, Format};
use crate::zone::Zone;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A finished render, shared by every scraper that takes it.
pub struct Rendered {
    pub buf: Vec<u8>,
    /// CLOCK_MONOTONIC nanoseconds when the render started.
    pub started: u64,
}

#[derive(Default)]
struct Slot {
    done: [Option<Arc<Rendered>>; 2],
    running: [bool; 2],
    failed: [bool; 2],
}

static SLOTS: Mutex<Option<HashMap<usize, Slot>>> = Mutex::new(None);

/// What a poll found.
pub enum Poll {
    /// A render that started no earlier than `not_before`.
    Ready(Arc<Rendered>),
    /// A render is running (perhaps started by this call): poll again.
    Pending,
    /// The render thread failed (panicked or could not start).
    Failed,
}

fn idx(f: Format) -> usize {
    match f {
        Format::Text => 0,
        Format::OpenMetrics => 1,
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process).
pub fn clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Takes a fresh-enough render of `z` in format `f`, or starts one.
pub fn poll(z: Zone, f: Format, not_before: u64) -> Poll {
    let i = idx(f);
    let mut g = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = g
        .get_or_insert_with(HashMap::new)
        .entry(z.as_ptr() as usize)
        .or_default();
    if let Some(d) = &slot.done[i] {
        if d.started >= not_before {
            return Poll::Ready(d.clone());
        }
    }
    if slot.failed[i] {
        slot.failed[i] = false;
        return Poll::Failed;
    }
    if slot.running[i] {
        return Poll::Pending;
    }
    let started = clock_ns();
    slot.running[i] = true;
    let spawned = std::thread::Builder::new()
        .name("shmprom-render".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(|| render(&z, f));
            let mut g = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = g.as_mut().and_then(|m| m.get_mut(&(z.as_ptr() as usize))) {
                slot.running[i] = false;
                match r {
                    Ok(buf) => slot.done[i] = Some(Arc::new(Rendered { buf, started })),
                    Err(_) => slot.failed[i] = true,
                }
            }
        });
    if spawned.is_err() {
        slot.running[i] = false;
        return Poll::Failed;
    }
    Poll::Pending
}
