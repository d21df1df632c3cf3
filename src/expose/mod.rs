//! Rendering the whole zone as Prometheus text 0.0.4 or OpenMetrics 1.0.
//!
//! One pass over the series table groups live series by family; families
//! come out sorted by name, series in table order; histogram buckets are
//! cumulative with `+Inf` equal to `_count`.

mod fmt;
pub mod shared;

use crate::cells::{live_planes, planes_in_use, spares_in_use, sum_cell, Live};
use crate::registry::{live_families, Family, Kind};
use crate::zone::{Zone, ERROR_KINDS};
use fmt::{escape_help, escape_label_value, write_f64};
use std::sync::atomic::Ordering;

/// Exposition format.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// `text/plain; version=0.0.4; charset=utf-8`
    Text,
    /// `application/openmetrics-text; version=1.0.0; charset=utf-8`
    OpenMetrics,
}

impl Format {
    /// The Content-Type header value for this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

struct Out<'a> {
    buf: Vec<u8>,
    fmt: Format,
    _z: &'a Zone,
}

impl Out<'_> {
    fn s(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// `# HELP` and `# TYPE` lines; returns the sample base name for counters.
    fn header(&mut self, name: &str, help: &[u8], kind: Kind) {
        let fam = if self.fmt == Format::OpenMetrics && kind == Kind::Counter {
            name.strip_suffix("_total").unwrap_or(name)
        } else {
            name
        };
        self.s("# HELP ");
        self.s(fam);
        self.buf.push(b' ');
        escape_help(&mut self.buf, help, self.fmt == Format::OpenMetrics);
        self.s("\n# TYPE ");
        self.s(fam);
        self.buf.push(b' ');
        self.s(kind.as_str());
        self.buf.push(b'\n');
    }

    fn sample_name(&mut self, name: &str, kind: Kind) {
        if self.fmt == Format::OpenMetrics && kind == Kind::Counter && !name.ends_with("_total") {
            self.s(name);
            self.s("_total");
        } else {
            self.s(name);
        }
    }
}

/// Renders the zone into a new buffer.
pub fn render(z: &Zone, fmt: Format) -> Vec<u8> {
    let t0 = std::time::Instant::now();
    let mut fams = live_families(z);
    fams.sort_by(|a, b| a.name.cmp(b.name));
    let live = live_planes(z);
    let t = z.table();
    // group live series by family id
    let nfam = z.header().families_used.load(Ordering::Acquire) as usize;
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); nfam];
    let mut total = 0usize;
    for i in 0..t.slots.len() {
        if let Some(s) = t.get(i) {
            if let Some(m) = members.get_mut(s.family as usize) {
                m.push(i as u32);
                total += 1;
            }
        }
    }
    let prev = z.header().render_bytes.load(Ordering::Relaxed) as usize;
    let mut out = Out {
        buf: Vec::with_capacity(prev.max(total * 48) + 4096),
        fmt,
        _z: z,
    };
    let split = fams.partition_point(|f| f.name < "shmprom_");
    for f in &fams[..split] {
        render_family(&mut out, z, f, &members[f.id as usize], &live);
    }
    render_self(&mut out, z, &fams, &live);
    for f in &fams[split..] {
        render_family(&mut out, z, f, &members[f.id as usize], &live);
    }
    if fmt == Format::OpenMetrics {
        out.s("# EOF\n");
    }
    let h = z.header();
    h.render_ns
        .store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    h.render_bytes
        .store(out.buf.len() as u64, Ordering::Relaxed);
    out.buf
}

/// `{a="x",b="y"` (no closing brace) for a series, or empty.
fn label_prefix(buf: &mut Vec<u8>, f: &Family<'_>, key: &[u8]) {
    buf.clear();
    let vals = crate::registry::key_values(key);
    for (i, (n, v)) in f.labels.iter().zip(vals).enumerate() {
        buf.push(if i == 0 { b'{' } else { b',' });
        buf.extend_from_slice(n.as_bytes());
        buf.extend_from_slice(b"=\"");
        escape_label_value(buf, v);
        buf.push(b'"');
    }
}

fn render_family(out: &mut Out<'_>, z: &Zone, f: &Family<'_>, slots: &[u32], live: &Live) {
    out.header(f.name, f.help, f.kind);
    let t = z.table();
    let mut lp = Vec::with_capacity(128);
    let mut key = Vec::with_capacity(64);
    match f.kind {
        Kind::Counter | Kind::Gauge => {
            for &i in slots {
                let Some(s) = t.get(i as usize) else { continue };
                if !t.read_key(&s, &mut key) {
                    continue; // deleted and reused while we read it
                }
                label_prefix(&mut lp, f, &key);
                out.sample_name(f.name, f.kind);
                if !lp.is_empty() {
                    out.buf.extend_from_slice(&lp);
                    out.buf.push(b'}');
                }
                out.buf.push(b' ');
                write_f64(&mut out.buf, sum_cell(z, f, live, s.cell as u64));
                out.buf.push(b'\n');
            }
        }
        Kind::Histogram => {
            let nb = f.buckets.len();
            // the end of each bucket's line but its value, written once:
            // `le="0.005"} `
            let tails: Vec<Vec<u8>> = f
                .buckets
                .iter()
                .map(|b| {
                    let mut v = b"le=\"".to_vec();
                    write_f64(&mut v, *b);
                    v.extend_from_slice(b"\"} ");
                    v
                })
                .chain(std::iter::once(b"le=\"+Inf\"} ".to_vec()))
                .collect();
            let sum = format!("{}_sum", f.name);
            let count = format!("{}_count", f.name);
            // the start of the series' bucket lines: `name_bucket{labels,`
            // (`name_bucket{` without labels)
            let mut head = Vec::with_capacity(128);
            for &i in slots {
                let Some(s) = t.get(i as usize) else { continue };
                if !t.read_key(&s, &mut key) {
                    continue; // deleted and reused while we read it
                }
                label_prefix(&mut lp, f, &key);
                head.clear();
                head.extend_from_slice(f.name.as_bytes());
                head.extend_from_slice(b"_bucket");
                if lp.is_empty() {
                    head.push(b'{');
                } else {
                    head.extend_from_slice(&lp);
                    head.push(b',');
                }
                let mut cum = 0.0;
                for (b, tail) in tails.iter().enumerate() {
                    cum += sum_cell(z, f, live, s.cell as u64 + b as u64);
                    out.buf.extend_from_slice(&head);
                    out.buf.extend_from_slice(tail);
                    write_f64(&mut out.buf, cum);
                    out.buf.push(b'\n');
                }
                let total = sum_cell(z, f, live, s.cell as u64 + nb as u64 + 1);
                for (name, v) in [(&sum, total), (&count, cum)] {
                    out.s(name);
                    if !lp.is_empty() {
                        out.buf.extend_from_slice(&lp);
                        out.buf.push(b'}');
                    }
                    out.buf.push(b' ');
                    write_f64(&mut out.buf, v);
                    out.buf.push(b'\n');
                }
            }
        }
    }
}

fn self_line(out: &mut Out<'_>, name: &str, kind: Kind, label: Option<(&str, &[u8])>, v: f64) {
    out.sample_name(name, kind);
    if let Some((l, val)) = label {
        out.buf.push(b'{');
        out.s(l);
        out.buf.extend_from_slice(b"=\"");
        escape_label_value(&mut out.buf, val);
        out.buf.extend_from_slice(b"\"}");
    }
    out.buf.push(b' ');
    write_f64(&mut out.buf, v);
    out.buf.push(b'\n');
}

fn render_self(out: &mut Out<'_>, z: &Zone, fams: &[Family<'_>], live: &Live) {
    let h = z.header();
    let c = Kind::Counter;
    let g = Kind::Gauge;
    out.header(
        "shmprom_errors_total",
        b"Updates refused or failed in shmprom, by kind",
        c,
    );
    for (k, name) in ERROR_KINDS.iter().enumerate() {
        let v = h.errors[k].load(Ordering::Relaxed) as f64;
        self_line(
            out,
            "shmprom_errors_total",
            c,
            Some(("kind", name.as_bytes())),
            v,
        );
    }
    out.header(
        "shmprom_plane_spares",
        b"Spare owner records: the livesum gauge shares of workers that hold no plane",
        g,
    );
    let spares = spares_in_use(live) as f64;
    self_line(
        out,
        "shmprom_plane_spares",
        g,
        Some(("state", b"in_use")),
        spares,
    );
    let total = z.nspares() as f64;
    self_line(
        out,
        "shmprom_plane_spares",
        g,
        Some(("state", b"total")),
        total,
    );
    out.header("shmprom_planes", b"Per-writer planes of the zone", g);
    let in_use = planes_in_use(live) as f64;
    self_line(out, "shmprom_planes", g, Some(("state", b"in_use")), in_use);
    let total = (h.planes - 1) as f64;
    self_line(out, "shmprom_planes", g, Some(("state", b"total")), total);
    out.header(
        "shmprom_render_bytes",
        b"Size of the previous render in bytes",
        g,
    );
    let rb = h.render_bytes.load(Ordering::Relaxed) as f64;
    self_line(out, "shmprom_render_bytes", g, None, rb);
    out.header(
        "shmprom_render_duration_seconds",
        b"Duration of the previous render in seconds",
        g,
    );
    let rd = h.render_ns.load(Ordering::Relaxed) as f64 / 1e9;
    self_line(out, "shmprom_render_duration_seconds", g, None, rd);
    out.header("shmprom_series", b"Live series per family", g);
    for f in fams {
        let n = f.rec.series.load(Ordering::Relaxed) as f64;
        self_line(
            out,
            "shmprom_series",
            g,
            Some(("family", f.name.as_bytes())),
            n,
        );
    }
    out.header(
        "shmprom_series_capacity",
        b"Most series the zone's table can hold",
        g,
    );
    let cap = z.table().slot_limit() as f64;
    self_line(out, "shmprom_series_capacity", g, None, cap);
    out.header(
        "shmprom_series_dropped_total",
        b"New series refused because the zone was full, per family",
        c,
    );
    for f in fams {
        let n = f.rec.dropped.load(Ordering::Relaxed) as f64;
        let name = "shmprom_series_dropped_total";
        self_line(out, name, c, Some(("family", f.name.as_bytes())), n);
    }
    out.header(
        "shmprom_series_expired_total",
        b"Series removed after being idle for the zone's ttl",
        c,
    );
    let n = h.expired.load(Ordering::Relaxed) as f64;
    self_line(out, "shmprom_series_expired_total", c, None, n);
    out.header(
        "shmprom_series_reused_total",
        b"New series stored in the room of deleted ones",
        c,
    );
    let n = h.reused.load(Ordering::Relaxed) as f64;
    self_line(out, "shmprom_series_reused_total", c, None, n);
    out.header("shmprom_zone_bytes", b"Shared memory zone bytes", g);
    let used = z.bytes_used() as f64;
    self_line(out, "shmprom_zone_bytes", g, Some(("type", b"used")), used);
    let cap = h.size as f64;
    self_line(
        out,
        "shmprom_zone_bytes",
        g,
        Some(("type", b"capacity")),
        cap,
    );
    out.header(
        "shmprom_zone_fill_ratio",
        b"Share of each region new series take room from that is handed out (slots, keys, cells); a new series is refused when one is full",
        g,
    );
    for (region, r) in z.fill_ratios() {
        self_line(
            out,
            "shmprom_zone_fill_ratio",
            g,
            Some(("region", region.as_bytes())),
            r,
        );
    }
}
