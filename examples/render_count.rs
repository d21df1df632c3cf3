//! Renders a zone of bench (c)'s 230k series, for counting the render's
//! instructions (bench/render-callgrind.sh runs it under callgrind with 0
//! and with N renders; the difference over N is one render).
//!
//!     cargo run --release --example render_count -- RENDERS [OUT_FILE]
//!
//! 10k counters `bench_c_requests_total{route,status}` and 10k histograms
//! `bench_c_duration_seconds{route}` of the peer's 19 buckets (22 lines
//! each): 230k lines, in a 64 MiB zone with 3 planes (2 workers and the
//! shared one), values on one plane. OUT_FILE: the last render (text
//! format) and, in OUT_FILE.om, an OpenMetrics one, to compare two builds'
//! output.

use shmprom::expose::{render, Format};
use shmprom::registry::{self, Def, Kind};
use shmprom::zone::Zone;
use std::sync::atomic::Ordering;

fn main() {
    let renders: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let out_file = std::env::args().nth(2);
    let (z, _) = Zone::open("render-count", 64 << 20, 3, None).expect("zone");
    let buckets = vec![
        0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
        4.0, 5.0, 10.0,
    ];
    let def = |name, kind, labels, buckets| Def {
        name,
        help: b"render_count",
        kind,
        mode: 0,
        labels,
        buckets,
    };
    let c = registry::define(
        &z,
        &def(
            "bench_c_requests_total",
            Kind::Counter,
            vec!["route", "status"],
            vec![],
        ),
    )
    .expect("counter");
    let h = registry::define(
        &z,
        &def(
            "bench_c_duration_seconds",
            Kind::Histogram,
            vec!["route"],
            buckets.clone(),
        ),
    )
    .expect("histogram");
    for i in 1..=10_000u32 {
        let route = format!("r{i:06}");
        let ci = registry::series_get(&z, c, &[route.as_bytes(), b"200"]).expect("series") as u64;
        z.cell(1, ci).store(3f64.to_bits(), Ordering::Relaxed);
        let hi = registry::series_get(&z, h, &[route.as_bytes()]).expect("series") as u64;
        for k in 0..=buckets.len() as u64 + 1 {
            // one observation of 0.004 in the first bucket: count 1, sum 0.004
            let v = if k == 0 {
                1.0
            } else if k == buckets.len() as u64 + 1 {
                0.004
            } else {
                0.0
            };
            z.cell(1, hi + k).store(f64::to_bits(v), Ordering::Relaxed);
        }
    }
    let mut last = Vec::new();
    for _ in 0..renders {
        last = render(&z, Format::Text);
    }
    if let Some(p) = out_file {
        std::fs::write(&p, &last).expect("write");
        std::fs::write(format!("{p}.om"), render(&z, Format::OpenMetrics)).expect("write");
    }
    println!("{} renders, {} bytes each", renders, last.len());
}
