//! Rendering off the request path: a scrape starts (or joins) a render
//! running on a thread of its own, and the nginx worker keeps serving while
//! it polls. Scrapers arriving while a render runs, or within the caller's
//! window before their arrival of one that started, share its buffer.
//!
//! A scraper that accepts gzip gets the render compressed on the same
//! thread; the compressed copy is kept next to the plain one, so scrapers
//! sharing a render share its compression too.
//!
//! The render thread runs at a lower CPU priority than the worker that
//! started it (a higher nice value, see [`set_nice`]), so that on a busy
//! machine request traffic wins the cores and the render takes what is left.
//!
//! State is per process (each nginx worker renders for its own scrapers).

use super::{render, Format};
use crate::zone::Zone;
use std::collections::HashMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

/// How many nice steps a render thread goes below the thread that starts
/// it, unless [`set_nice`] said otherwise for the zone.
pub const DEFAULT_NICE: i32 = 5;

/// Content coding of a render handed to a scraper.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// A finished render, shared by every scraper that takes it.
pub struct Rendered {
    pub buf: Vec<u8>,
    /// The gzip member of `buf`, once some scraper asked for it.
    gz: OnceLock<Vec<u8>>,
    /// CLOCK_MONOTONIC nanoseconds when the render started.
    pub started: u64,
}

impl Rendered {
    /// The body in coding `enc`, if it exists yet.
    pub fn body(&self, enc: Encoding) -> Option<&[u8]> {
        match enc {
            Encoding::Identity => Some(&self.buf),
            Encoding::Gzip => self.gz.get().map(|v| v.as_slice()),
        }
    }
}

#[derive(Default)]
struct Slot {
    done: [Option<Arc<Rendered>>; 2],
    running: [bool; 2],
    failed: [bool; 2],
    /// A scraper waiting on the running job wants the gzip body.
    want_gz: [bool; 2],
    /// Nice increment of render threads; `None`: [`DEFAULT_NICE`].
    nice: Option<i32>,
}

static SLOTS: Mutex<Option<HashMap<usize, Slot>>> = Mutex::new(None);

fn with_slot<R>(key: usize, f: impl FnOnce(&mut Slot) -> R) -> R {
    let mut g = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new).entry(key).or_default())
}

/// What a poll found.
pub enum Poll {
    /// A render that started no earlier than `not_before`, with its body in
    /// the coding asked for.
    Ready(Arc<Rendered>),
    /// A render or its compression is running (perhaps started by this
    /// call): poll again.
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

/// Sets how many nice steps (0-19) the render threads of `z` in this
/// process go below the thread that starts them; 0 keeps its priority.
pub fn set_nice(z: Zone, nice: i32) {
    let nice = nice.clamp(0, 19);
    with_slot(z.as_ptr() as usize, |s| s.nice = Some(nice));
}

/// Raises the calling thread's nice value by `inc` (at most to 19). Only
/// this thread changes: on Linux the nice value is per thread. Best effort:
/// a failure leaves the priority as it was.
fn lower_priority(inc: i32) {
    if inc <= 0 {
        return;
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // getpriority may return -1 as a value: tell it from an error by errno.
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: no memory is passed; `tid` is this thread.
    let cur = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    // SAFETY: as above.
    if cur == -1 && unsafe { *libc::__errno_location() } != 0 {
        return;
    }
    let want = (cur + inc).min(19);
    if want > cur {
        // SAFETY: no memory is passed; raising one's own nice value needs
        // no privilege.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, want) };
    }
}

/// Compresses `buf` as one gzip member at a fast level (exposition text
/// shrinks about tenfold even so).
pub fn gzip(buf: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(buf.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    e.write_all(buf).expect("gzip into memory");
    e.finish().expect("gzip into memory")
}

/// Takes a fresh-enough render of `z` in format `f` and coding `enc`, or
/// starts one (or the compression of one).
pub fn poll(z: Zone, f: Format, not_before: u64, enc: Encoding) -> Poll {
    let i = idx(f);
    let key = z.as_ptr() as usize;
    let mut g = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = g.get_or_insert_with(HashMap::new).entry(key).or_default();
    let mut compress = None;
    if let Some(d) = &slot.done[i] {
        if d.started >= not_before {
            if d.body(enc).is_some() {
                return Poll::Ready(d.clone());
            }
            // fresh enough, not compressed yet: a job compresses this one
            // (or the running render, which is fresher, does it)
            compress = Some(d.clone());
        }
    }
    if slot.failed[i] {
        slot.failed[i] = false;
        return Poll::Failed;
    }
    if enc == Encoding::Gzip {
        slot.want_gz[i] = true;
    }
    if slot.running[i] {
        return Poll::Pending;
    }
    let started = clock_ns();
    let nice = slot.nice.unwrap_or(DEFAULT_NICE);
    slot.running[i] = true;
    let spawned = std::thread::Builder::new()
        .name("shmprom-render".into())
        .spawn(move || job(z, f, started, nice, compress));
    if spawned.is_err() {
        slot.running[i] = false;
        return Poll::Failed;
    }
    Poll::Pending
}

/// The render thread: renders `z` (or takes `prev`, rendered already),
/// compresses it when a scraper asked for gzip, and publishes it.
fn job(z: Zone, f: Format, started: u64, nice: i32, prev: Option<Arc<Rendered>>) {
    let i = idx(f);
    let key = z.as_ptr() as usize;
    let r = catch_unwind(AssertUnwindSafe(|| {
        lower_priority(nice);
        let compress = prev.is_some();
        let d = prev.unwrap_or_else(|| {
            Arc::new(Rendered {
                buf: render(&z, f),
                gz: OnceLock::new(),
                started,
            })
        });
        // a gzip scraper may have joined while the render ran; one joining
        // after this look finds the render uncompressed and starts a job
        // that compresses it
        let wanted = with_slot(key, |s| std::mem::take(&mut s.want_gz[i]));
        if compress || wanted {
            let gz = gzip(&d.buf);
            let _ = d.gz.set(gz);
        }
        d
    }));
    with_slot(key, |slot| {
        slot.running[i] = false;
        match r {
            Ok(d) => slot.done[i] = Some(d),
            Err(_) => slot.failed[i] = true,
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn gzip_round_trips() {
        let mut text = Vec::new();
        for i in 0..20_000 {
            text.extend_from_slice(
                format!("x_bucket{{route=\"/r{}\",le=\"0.5\"}} {}\n", i % 97, i).as_bytes(),
            );
        }
        let gz = gzip(&text);
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        assert!(gz.len() * 4 < text.len(), "{} of {}", gz.len(), text.len());
        assert_eq!(gunzip(&gz), text);
        assert_eq!(gunzip(&gzip(b"")), b"");
    }

    #[test]
    fn body_by_encoding() {
        let d = Rendered {
            buf: b"a 1\n".to_vec(),
            gz: OnceLock::new(),
            started: 0,
        };
        assert_eq!(d.body(Encoding::Identity), Some(&b"a 1\n"[..]));
        assert!(d.body(Encoding::Gzip).is_none());
        d.gz.set(gzip(&d.buf)).unwrap();
        assert_eq!(gunzip(d.body(Encoding::Gzip).unwrap()), b"a 1\n");
    }

    #[test]
    fn lower_priority_changes_this_thread_only() {
        // SAFETY: getpriority passes no memory; who 0 is the calling thread.
        let outer = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let inner = std::thread::spawn(|| {
            // SAFETY: as above.
            let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            lower_priority(3);
            // SAFETY: as above.
            let after = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            (before, after)
        })
        .join()
        .unwrap();
        assert_eq!(inner.1, (inner.0 + 3).min(19));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, outer);
    }

    fn wait(z: Zone, f: Format, nb: u64, enc: Encoding) -> Arc<Rendered> {
        for _ in 0..20_000 {
            match poll(z, f, nb, enc) {
                Poll::Ready(d) => return d,
                Poll::Pending => std::thread::sleep(std::time::Duration::from_millis(1)),
                Poll::Failed => panic!("render failed"),
            }
        }
        panic!("render did not finish");
    }

    #[test]
    fn gzip_scrapers_share_one_compressed_render() {
        let (z, _) = Zone::open("shared-gz-test", 1 << 20, 2, None).unwrap();
        set_nice(z, 1);
        let def = crate::registry::Def {
            name: "t_total",
            help: b"help",
            kind: crate::registry::Kind::Counter,
            mode: 0,
            labels: vec!["a"],
            buckets: vec![],
        };
        let fam = crate::registry::define(&z, &def).unwrap();
        for k in 0..50u32 {
            let v = k.to_string();
            crate::registry::series_get(&z, fam, &[v.as_bytes()]).unwrap();
        }
        let nb = clock_ns();
        let plain = wait(z, Format::Text, nb, Encoding::Identity);
        assert!(plain.started >= nb);
        // the same render, compressed by a job of its own
        let gz = wait(z, Format::Text, nb, Encoding::Gzip);
        assert!(Arc::ptr_eq(&plain, &gz));
        let body = gz.body(Encoding::Gzip).unwrap();
        assert_eq!(gunzip(body), gz.buf);
        assert!(std::str::from_utf8(&gz.buf)
            .unwrap()
            .contains("t_total{a=\"49\"} 0\n"));
        // a later gzip scraper gets a new render, compressed on its thread
        let nb2 = clock_ns();
        let gz2 = wait(z, Format::Text, nb2, Encoding::Gzip);
        assert!(gz2.started >= nb2);
        assert_eq!(gunzip(gz2.body(Encoding::Gzip).unwrap()), gz2.buf);
        // and a plain scraper within the window shares it
        let plain2 = wait(z, Format::Text, nb2, Encoding::Identity);
        assert!(Arc::ptr_eq(&plain2, &gz2));
    }
}
