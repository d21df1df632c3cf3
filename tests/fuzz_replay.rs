//! The cargo-fuzz targets (fuzz/), run on stable as a plain test: the seed
//! corpus under fuzz/corpus/<target>/, past failures kept under
//! fuzz/regressions/<target>/, any fresh crash files cargo fuzz left under
//! fuzz/artifacts/<target>/ (not in git), then inputs from a seeded PRNG.
//!
//!   SHMPROM_FUZZ_ITERS=N   generated inputs per target (default 2000)
//!   SHMPROM_FUZZ_SEED=S    PRNG seed (default fixed, so runs repeat)
//!
//! The real fuzzing (coverage-guided, nightly) is `cargo fuzz run <target>`
//! in fuzz/; see fuzz/README.md.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An input: mostly small bytes (the targets read most decisions modulo a
/// small number), some runs of one byte, some random stretches.
fn gen_input(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(4) {
        0 => rng.below(32),
        1 | 2 => rng.below(512),
        _ => rng.below(4096),
    } as usize;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        match rng.below(8) {
            0 => {
                let b = rng.next() as u8;
                let n = 1 + rng.below(16) as usize;
                v.extend(std::iter::repeat(b).take(n));
            }
            1 | 2 => v.push(rng.next() as u8),
            _ => v.push(rng.below(16) as u8),
        }
    }
    v.truncate(len);
    v
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn replay(target: &str, f: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("regressions").join(target),
        root.join("artifacts").join(target),
    ] {
        for p in files(&dir) {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{target}: {} fails", p.display());
            n += 1;
        }
    }
    let iters = env_u64("SHMPROM_FUZZ_ITERS", 2000);
    let seed = env_u64("SHMPROM_FUZZ_SEED", 0x5348_4d50_524f_4d31);
    let mut rng = Rng(seed | 1);
    for i in 0..iters {
        let data = gen_input(&mut rng);
        let r = std::panic::catch_unwind(|| f(&data));
        if r.is_err() {
            let out = std::env::temp_dir().join(format!("shmprom-fuzz-{target}-{i}.bin"));
            std::fs::write(&out, &data).unwrap();
            panic!(
                "{target}: generated input #{i} (seed {seed:#x}) fails; saved to {} \
                 (keep it under fuzz/regressions/{target}/ once understood)",
                out.display()
            );
        }
    }
    eprintln!("{target}: {n} corpus files and {iters} generated inputs passed");
}

#[test]
fn fuzz_replay_series_table() {
    replay("series_table", targets::series_table);
}

#[test]
fn fuzz_replay_render() {
    replay("render", targets::render);
}
