//! The file-system gateway preset's per-request recording, in Rust: what
//! `resty.shmprom.gateway`'s `log()` does in Lua, for callers that are not
//! Lua (the nginx module in `nginx-module/`, which hands each request's
//! facts to [`Gateway::record`] from its log-phase handler).
//!
//! The families are defined by the Lua preset (`gateway.init` in
//! init_by_lua); [`Gateway::new`] takes their ids and checks their shape.
//! A `Gateway` is process-local state (label caches, this worker's plane):
//! made in the nginx master, copied into every worker by fork, used by one
//! thread per process (the worker's event loop). Label sets are cached per
//! worker as cell indices, dropped when the zone's epoch moves (series
//! deleted or families retired), exactly as the Lua wrapper's caches are.

use crate::cells::{claim_spare, f64_add, spare_held};
use crate::registry::{self, Kind, MODE_LIVESUM};
use crate::writer::{pid, Claim, PlaneWriter};
use crate::zone::Zone;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;

/// The operations, in the order of the preset's `OP_NAMES`.
pub const OPS: [&str; 11] = [
    "read", "stat", "write", "delete", "list", "mkdir", "rename", "copy", "lock", "meta", "other",
];
const OP_READ: usize = 0;
const OP_STAT: usize = 1;
const OP_WRITE: usize = 2;
const OP_LIST: usize = 4;
const OP_OTHER: usize = 10;

/// The operation of an HTTP method and its `Depth` header (PROPFIND only:
/// "0" is a stat, anything else or none a listing).
pub fn classify(method: &[u8], depth: Option<&[u8]>) -> usize {
    match method {
        b"GET" => OP_READ,
        b"HEAD" => OP_STAT,
        b"PUT" => OP_WRITE,
        b"DELETE" => 3,
        b"MKCOL" => 5,
        b"MOVE" => 6,
        b"COPY" => 7,
        b"LOCK" | b"UNLOCK" => 8,
        b"PROPPATCH" | b"OPTIONS" => 9,
        b"PROPFIND" if depth == Some(b"0") => OP_STAT,
        b"PROPFIND" => OP_LIST,
        _ => OP_OTHER,
    }
}

/// The families, in the order [`Gateway::new`] takes their ids.
pub const FAMILIES: [(&str, Kind, usize); 10] = [
    ("requests_total", Kind::Counter, 2),
    ("request_duration_seconds", Kind::Histogram, 1),
    ("received_bytes_total", Kind::Counter, 1),
    ("sent_bytes_total", Kind::Counter, 1),
    ("object_size_bytes", Kind::Histogram, 1),
    ("requests_in_flight", Kind::Gauge, 0),
    ("upstream_attempts_total", Kind::Counter, 2),
    ("upstream_failures_total", Kind::Counter, 1),
    ("upstream_retries_total", Kind::Counter, 1),
    ("upstream_duration_seconds", Kind::Histogram, 1),
];
const F_REQUESTS: usize = 0;
const F_DURATION: usize = 1;
const F_RECEIVED: usize = 2;
const F_SENT: usize = 3;
const F_OBJECT_SIZE: usize = 4;
const F_IN_FLIGHT: usize = 5;
const F_ATTEMPTS: usize = 6;
const F_FAILURES: usize = 7;
const F_RETRIES: usize = 8;
const F_UPDUR: usize = 9;

/// One attempt to a storage node, as nginx keeps it for
/// `$upstream_addr` / `$upstream_status` / `$upstream_response_time`.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// The peer's name (or the upstream group's when no peer was left).
    pub node: &'a [u8],
    /// The node's HTTP status; 0 when there was none ("-").
    pub status: u32,
    /// Seconds; `None` when nginx has no time ("-").
    pub time: Option<f64>,
    /// Another attempt followed in the same upstream group.
    pub retried: bool,
}

/// What the log phase knows of one request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The request method as the client sent it (`GET`, `PROPFIND`, ...).
    pub method: &'a [u8],
    /// The `Depth` request header, when present.
    pub depth: Option<&'a [u8]>,
    /// The status the client got (`$status`).
    pub status: u32,
    /// The response was sent completely (`$request_completion` "OK").
    pub complete: bool,
    /// Seconds from the first byte of the request (`$request_time`).
    pub duration: f64,
    /// `$request_length`.
    pub received: u64,
    /// `$bytes_sent`.
    pub sent: u64,
    /// `$body_bytes_sent`.
    pub body_sent: u64,
    /// The request body's size when known (`$content_length`).
    pub content_length: Option<u64>,
    /// The attempts to storage nodes, in the order nginx made them.
    pub attempts: &'a [Attempt<'a>],
}

/// FxHash-style hasher: the caches' keys are small integers and node names
/// of a few dozen bytes, hashed once per request each.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(FX_K);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(FX_K);
    }
    fn write_usize(&mut self, i: usize) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(FX_K);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Fx = BuildHasherDefault<FxHasher>;

/// No cell index cached yet (or none to be had: the zone is full).
const NONE: u32 = u32::MAX;

/// Storage nodes cached per worker before the cache starts afresh (node
/// names come from the upstream's peers: a proxy_pass to a variable can
/// bring new ones without end).
const MAX_NODES: usize = 4096;

/// The series of one storage node.
#[derive(Default)]
struct Node {
    /// (node status, attempts series)
    attempts: Vec<(u32, u32)>,
    failures: Option<u32>,
    retries: Option<u32>,
    duration: Option<u32>,
}

/// One histogram family's bounds.
struct Hist {
    bounds: Vec<f64>,
}

/// Error from [`Gateway::new`].
#[derive(Debug)]
pub struct ShapeError(pub String);

/// Per-process recording state of the gateway preset.
pub struct Gateway {
    zone: Zone,
    w: PlaneWriter,
    fam: [u32; 10],
    duration: Hist,
    size: Hist,
    updur: Hist,
    epoch: u32,
    /// The spare owner record this process holds while it has no plane
    /// (0: none): its in-flight share goes to the spare's cell.
    spare: u32,
    /// This process's net in-flight count kept on the shared plane while it
    /// had neither a plane nor a spare (moved to its plane once it has one).
    live_shared: f64,
    in_flight: u32,
    requests: HashMap<u32, u32, Fx>,
    by_op: [[u32; 11]; 4],
    nodes: HashMap<Box<[u8]>, Node, Fx>,
}

impl Gateway {
    /// Checks that `fam` are the preset's families (ids in the order of
    /// [`FAMILIES`], the names ending as there) with their kinds, label
    /// counts and buckets.
    pub fn new(zone: Zone, fam: [u32; 10]) -> Result<Gateway, ShapeError> {
        let mut bounds: [Vec<f64>; 3] = Default::default();
        for (i, &(suffix, kind, nlabels)) in FAMILIES.iter().enumerate() {
            let f = registry::family(&zone, fam[i])
                .filter(|f| f.live)
                .ok_or_else(|| {
                    ShapeError(format!("family {} ({suffix}) is not defined", fam[i]))
                })?;
            if !f.name.ends_with(suffix) || f.kind != kind || f.labels.len() != nlabels {
                return Err(ShapeError(format!(
                    "family {} is not the preset's {suffix}: {} {} with {} labels",
                    fam[i],
                    f.kind.as_str(),
                    f.name,
                    f.labels.len()
                )));
            }
            if i == F_IN_FLIGHT && f.mode != MODE_LIVESUM {
                return Err(ShapeError(format!("{} must be a livesum gauge", f.name)));
            }
            let slot = match i {
                F_DURATION => 0,
                F_OBJECT_SIZE => 1,
                F_UPDUR => 2,
                _ => continue,
            };
            bounds[slot] = f.buckets.to_vec();
        }
        let [d, s, u] = bounds;
        let epoch = zone.header().epoch.load(Ordering::Acquire);
        Ok(Gateway {
            w: PlaneWriter::new(&zone),
            zone,
            fam,
            duration: Hist { bounds: d },
            size: Hist { bounds: s },
            updur: Hist { bounds: u },
            epoch,
            spare: 0,
            live_shared: 0.0,
            in_flight: NONE,
            requests: HashMap::default(),
            by_op: [[NONE; 11]; 4],
            nodes: HashMap::default(),
        })
    }

    /// The zone this gateway records into.
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// This process's plane (0: the shared plane, atomically).
    pub fn plane(&self) -> u32 {
        self.w.plane()
    }

    /// Drops the caches when series were deleted or families retired, and
    /// claims a plane for this process when it has none (at most once a
    /// second: the claim reads /proc). A process claiming again gets the
    /// plane it already holds (the Lua wrapper claims it too).
    fn refresh(&mut self) {
        let e = self.zone.header().epoch.load(Ordering::Acquire);
        if e != self.epoch {
            self.epoch = e;
            self.requests.clear();
            self.by_op = [[NONE; 11]; 4];
            self.nodes.clear();
            self.in_flight = NONE;
        }
        if !self.w.has_plane() {
            match self.w.claim(&self.zone) {
                Claim::Held => {
                    // the claim moved the spare's shares to the plane and
                    // gave the spare back
                    self.spare = 0;
                    if self.live_shared != 0.0 {
                        if let Some(idx) = self.in_flight_idx() {
                            let net = self.live_shared;
                            self.live_shared = 0.0;
                            f64_add(self.zone.cell(0, idx), -net);
                            self.w.add_own(idx, net);
                        }
                    }
                }
                Claim::Refused if self.spare == 0 => {
                    self.spare = claim_spare(&self.zone, pid());
                }
                _ => {}
            }
        }
    }

    #[inline]
    fn add(&self, idx: u64, v: f64) {
        self.w.add(&self.zone, idx, v);
    }

    fn observe(&self, h: &Hist, idx: u32, v: f64) {
        self.w.observe(&self.zone, idx as u64, &h.bounds, v);
    }

    fn series(&self, f: usize, values: &[&[u8]]) -> u32 {
        registry::series_get(&self.zone, self.fam[f], values).unwrap_or(NONE)
    }

    fn in_flight_idx(&mut self) -> Option<u64> {
        if self.in_flight == NONE {
            self.in_flight = self.series(F_IN_FLIGHT, &[]);
        }
        (self.in_flight != NONE).then_some(self.in_flight as u64)
    }

    /// One more request in flight (`v` = 1) or one fewer (-1).
    pub fn in_flight(&mut self, v: f64) {
        self.refresh();
        let Some(idx) = self.in_flight_idx() else {
            return;
        };
        if !self.w.has_plane() && self.spare > 0 && !spare_held(&self.zone, self.spare, pid()) {
            // the Lua wrapper in this process claimed the plane since,
            // which gave the spare back: claim now (the same plane)
            self.spare = 0;
            self.w.retry_now();
            self.refresh();
        }
        if self.w.has_plane() {
            self.w.add_own(idx, v);
            return;
        }
        if self.spare > 0 {
            f64_add(self.zone.cell(0, idx + self.spare as u64), v);
            return;
        }
        self.live_shared += v;
        f64_add(self.zone.cell(0, idx), v);
    }

    /// The cached series of (family slot `k` of `by_op`, op).
    fn op_series(&mut self, k: usize, f: usize, op: usize) -> u32 {
        let mut s = self.by_op[k][op];
        if s == NONE {
            s = self.series(f, &[OPS[op].as_bytes()]);
            self.by_op[k][op] = s;
        }
        s
    }

    /// Records one request: what `gateway.log()` records in Lua.
    pub fn record(&mut self, r: &Request<'_>) {
        self.refresh();
        let op = classify(r.method, r.depth);

        let key = (op as u32) << 16 | (r.status & 0xffff);
        let sr = match self.requests.get(&key) {
            Some(&s) => s,
            None => {
                let mut buf = itoa::Buffer::new();
                let st = buf.format(r.status);
                let s = self.series(F_REQUESTS, &[OPS[op].as_bytes(), st.as_bytes()]);
                if s != NONE && r.status <= 0xffff {
                    self.requests.insert(key, s);
                }
                s
            }
        };
        if sr != NONE {
            self.add(sr as u64, 1.0);
        }
        let s = self.op_series(0, F_RECEIVED, op);
        if s != NONE {
            self.add(s as u64, r.received as f64);
        }
        let s = self.op_series(1, F_SENT, op);
        if s != NONE {
            self.add(s as u64, r.sent as f64);
        }

        let size = match op {
            OP_WRITE if (200..300).contains(&r.status) => r.content_length,
            OP_READ if (r.status == 200 || r.status == 206) && r.complete => Some(r.body_sent),
            _ => None,
        };
        if let Some(size) = size {
            let s = self.op_series(2, F_OBJECT_SIZE, op);
            if s != NONE {
                self.observe(&self.size, s, size as f64);
            }
        }

        for a in r.attempts {
            self.attempt(a);
        }

        let s = self.op_series(3, F_DURATION, op);
        if s != NONE {
            self.observe(&self.duration, s, r.duration.max(0.0));
        }
    }

    fn attempt(&mut self, a: &Attempt<'_>) {
        let zone = &self.zone;
        let fam = &self.fam;
        let get = |f: usize, values: &[&[u8]]| -> u32 {
            registry::series_get(zone, fam[f], values).unwrap_or(NONE)
        };
        // one lookup for a known node; a new one is inserted once
        if self.nodes.len() >= MAX_NODES && !self.nodes.contains_key(a.node) {
            self.nodes.clear();
        }
        let node = match self.nodes.get_mut(a.node) {
            Some(n) => n,
            None => self.nodes.entry(a.node.into()).or_default(),
        };
        let attempts = match node.attempts.iter().find(|e| e.0 == a.status) {
            Some(e) => e.1,
            None => {
                let mut buf = itoa::Buffer::new();
                let st: &[u8] = if a.status == 0 {
                    b"-"
                } else {
                    buf.format(a.status).as_bytes()
                };
                let s = get(F_ATTEMPTS, &[a.node, st]);
                if s != NONE {
                    node.attempts.push((a.status, s));
                }
                s
            }
        };
        let failed = a.status == 0 || (500..600).contains(&a.status);
        let failures = if failed {
            *node
                .failures
                .get_or_insert_with(|| get(F_FAILURES, &[a.node]))
        } else {
            NONE
        };
        let retries = if a.retried {
            *node
                .retries
                .get_or_insert_with(|| get(F_RETRIES, &[a.node]))
        } else {
            NONE
        };
        let duration = if a.time.is_some() {
            *node.duration.get_or_insert_with(|| get(F_UPDUR, &[a.node]))
        } else {
            NONE
        };
        // a refused series is not cached: asked again next time
        if failures == NONE {
            node.failures = node.failures.filter(|&s| s != NONE);
        }
        if retries == NONE {
            node.retries = node.retries.filter(|&s| s != NONE);
        }
        if duration == NONE {
            node.duration = node.duration.filter(|&s| s != NONE);
        }
        for s in [attempts, failures, retries] {
            if s != NONE {
                self.add(s as u64, 1.0);
            }
        }
        if let (Some(t), true) = (a.time, duration != NONE) {
            self.observe(&self.updur, duration, t.max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_matches_the_preset() {
        assert_eq!(OPS[classify(b"GET", None)], "read");
        assert_eq!(OPS[classify(b"PROPFIND", Some(b"0"))], "stat");
        assert_eq!(OPS[classify(b"PROPFIND", Some(b"1"))], "list");
        assert_eq!(OPS[classify(b"PROPFIND", None)], "list");
        assert_eq!(OPS[classify(b"UNLOCK", None)], "lock");
        assert_eq!(OPS[classify(b"OPTIONS", None)], "meta");
        assert_eq!(OPS[classify(b"get", None)], "other");
        assert_eq!(OPS[classify(b"BREW", None)], "other");
    }

    use crate::expose::{render, Format};
    use crate::registry::{define, Def};

    /// A zone with the preset's families (as gateway.lua defines them, with
    /// short bucket lists), and their ids in FAMILIES order.
    fn preset_zone(name: &str) -> (Zone, [u32; 10]) {
        let (z, _) = Zone::open(name, 4 << 20, 3, None).unwrap();
        let mut ids = [0u32; 10];
        for (i, &(suffix, kind, n)) in FAMILIES.iter().enumerate() {
            let labels = match (i, n) {
                (F_REQUESTS, _) => vec!["op", "status"],
                (F_ATTEMPTS, _) => vec!["node", "status"],
                (F_FAILURES | F_RETRIES | F_UPDUR, _) => vec!["node"],
                (_, 1) => vec!["op"],
                _ => vec![],
            };
            let buckets = match i {
                F_OBJECT_SIZE => vec![1024.0, 4096.0],
                F_DURATION | F_UPDUR => vec![0.01, 0.1, 1.0],
                _ => vec![],
            };
            let name = format!("dfs_gateway_{suffix}");
            ids[i] = define(
                &z,
                &Def {
                    name: &name,
                    help: b"h",
                    kind,
                    mode: if i == F_IN_FLIGHT { MODE_LIVESUM } else { 0 },
                    labels,
                    buckets,
                },
            )
            .unwrap();
        }
        (z, ids)
    }

    fn text(z: &Zone) -> String {
        String::from_utf8(render(z, Format::Text)).unwrap()
    }

    fn has(t: &str, line: &str) {
        assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
    }

    fn has_all(t: &str, lines: &[&str]) {
        for l in lines {
            has(t, l);
        }
    }

    #[test]
    fn records_what_the_lua_preset_records() {
        let (z, ids) = preset_zone("gw-record-test");
        let mut g = Gateway::new(z, ids).unwrap();
        let get = Request {
            method: b"GET",
            depth: None,
            status: 200,
            complete: true,
            duration: 0.05,
            received: 80,
            sent: 2200,
            body_sent: 2000,
            content_length: None,
            attempts: &[
                Attempt {
                    node: b"10.0.0.1:80",
                    status: 502,
                    time: Some(0.002),
                    retried: true,
                },
                Attempt {
                    node: b"10.0.0.2:80",
                    status: 200,
                    time: Some(0.04),
                    retried: false,
                },
            ],
        };
        g.in_flight(1.0);
        g.record(&get);
        g.in_flight(-1.0);
        g.record(&get);
        // a 2xx PUT: its body size; a PROPFIND Depth 0: a stat; no node
        g.record(&Request {
            method: b"PUT",
            status: 201,
            content_length: Some(5000),
            attempts: &[Attempt {
                node: b"dfs_nodes",
                status: 0,
                time: None,
                retried: false,
            }],
            ..get
        });
        g.record(&Request {
            method: b"PROPFIND",
            depth: Some(b"0"),
            status: 207,
            attempts: &[],
            ..get
        });
        // an aborted download: no object size
        g.record(&Request {
            complete: false,
            attempts: &[],
            ..get
        });
        let t = text(g.zone());
        has_all(
            &t,
            &[
                r#"dfs_gateway_requests_total{op="read",status="200"} 3"#,
                r#"dfs_gateway_requests_total{op="write",status="201"} 1"#,
                r#"dfs_gateway_requests_total{op="stat",status="207"} 1"#,
                r#"dfs_gateway_received_bytes_total{op="read"} 240"#,
                r#"dfs_gateway_sent_bytes_total{op="read"} 6600"#,
                r#"dfs_gateway_object_size_bytes_count{op="read"} 2"#,
                r#"dfs_gateway_object_size_bytes_sum{op="read"} 4000"#,
                r#"dfs_gateway_object_size_bytes_bucket{op="write",le="4096"} 0"#,
                r#"dfs_gateway_object_size_bytes_sum{op="write"} 5000"#,
                r#"dfs_gateway_upstream_attempts_total{node="10.0.0.1:80",status="502"} 2"#,
                r#"dfs_gateway_upstream_attempts_total{node="10.0.0.2:80",status="200"} 2"#,
                r#"dfs_gateway_upstream_attempts_total{node="dfs_nodes",status="-"} 1"#,
                r#"dfs_gateway_upstream_failures_total{node="10.0.0.1:80"} 2"#,
                r#"dfs_gateway_upstream_failures_total{node="dfs_nodes"} 1"#,
                r#"dfs_gateway_upstream_retries_total{node="10.0.0.1:80"} 2"#,
                r#"dfs_gateway_upstream_duration_seconds_bucket{node="10.0.0.1:80",le="0.01"} 2"#,
                r#"dfs_gateway_upstream_duration_seconds_bucket{node="10.0.0.2:80",le="0.01"} 0"#,
                r#"dfs_gateway_upstream_duration_seconds_count{node="10.0.0.2:80"} 2"#,
                r#"dfs_gateway_request_duration_seconds_bucket{op="read",le="0.1"} 3"#,
                r#"dfs_gateway_request_duration_seconds_bucket{op="read",le="0.01"} 0"#,
            ],
        );
        has(&t, "dfs_gateway_requests_in_flight 0");
        // no node had no time: nothing observed for it
        assert!(!t.contains(r#"upstream_duration_seconds_count{node="dfs_nodes"}"#));
        // the test process claimed a plane for its plain stores
        assert!(g.plane() > 0);
        // a family reset elsewhere moves the epoch: the caches go, the
        // series is made again
        crate::registry::family_reset(g.zone(), ids[F_REQUESTS]).unwrap();
        g.record(&Request {
            attempts: &[],
            ..get
        });
        has(
            &text(g.zone()),
            r#"dfs_gateway_requests_total{op="read",status="200"} 1"#,
        );
    }

    #[test]
    fn node_cache_stays_bounded() {
        let (z, ids) = preset_zone("gw-nodes-test");
        let mut g = Gateway::new(z, ids).unwrap();
        let names: Vec<String> = (0..MAX_NODES + 10).map(|i| format!("n{i}")).collect();
        for n in &names {
            let a = [Attempt {
                node: n.as_bytes(),
                status: 200,
                time: None,
                retried: false,
            }];
            g.record(&Request {
                method: b"GET",
                depth: None,
                status: 200,
                complete: true,
                duration: 0.0,
                received: 0,
                sent: 0,
                body_sent: 0,
                content_length: None,
                attempts: &a,
            });
            assert!(g.nodes.len() <= MAX_NODES);
        }
        // every node was counted (the zone holds them all)
        let t = text(g.zone());
        has(
            &t,
            r#"dfs_gateway_upstream_attempts_total{node="n0",status="200"} 1"#,
        );
        let last = format!(
            r#"dfs_gateway_upstream_attempts_total{{node="n{}",status="200"}} 1"#,
            MAX_NODES + 9
        );
        has(&t, &last);
    }

    #[test]
    fn refuses_other_families() {
        let (z, mut ids) = preset_zone("gw-shape-test");
        ids.swap(F_REQUESTS, F_RECEIVED);
        let e = Gateway::new(z, ids).err().unwrap();
        assert!(e.0.contains("requests_total"), "{}", e.0);
        let (z, mut ids) = preset_zone("gw-shape-test2");
        ids[F_IN_FLIGHT] = 999;
        assert!(Gateway::new(z, ids)
            .err()
            .unwrap()
            .0
            .contains("not defined"));
    }

    #[test]
    fn c_entry_points_record_and_refuse() {
        use crate::ffi::*;
        let (z, ids) = preset_zone("gw-ffi-test");
        let mut err = [0 as std::ffi::c_char; 256];
        // SAFETY: the zone pointer comes from Zone::open, ids holds 10 ids,
        // err holds 256 bytes.
        let gw = unsafe {
            shmprom_gw_open(
                z.as_ptr() as *mut shmprom_zone,
                ids.as_ptr(),
                10,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        assert!(!gw.is_null());
        let mut hooks = std::mem::MaybeUninit::<shmprom_gw_hooks>::uninit();
        // SAFETY: gw is live; hooks is writable.
        assert_eq!(unsafe { shmprom_gw_get_hooks(gw, hooks.as_mut_ptr()) }, 0);
        // SAFETY: written just above.
        let hooks = unsafe { hooks.assume_init() };
        assert_eq!(hooks.abi, SHMPROM_ABI_VERSION);
        // six attempts (more than the stack holds), the last one answered
        let names: Vec<String> = (1..=6).map(|i| format!("10.0.0.{i}:80")).collect();
        let attempts: Vec<shmprom_gw_attempt> = names
            .iter()
            .enumerate()
            .map(|(i, n)| shmprom_gw_attempt {
                node: n.as_ptr() as *const std::ffi::c_char,
                node_len: n.len(),
                status: if i == 5 { 200 } else { 503 },
                retried: (i < 5) as u32,
                time: if i == 0 { -1.0 } else { 0.001 },
            })
            .collect();
        let mut req = shmprom_gw_request {
            method: b"GET".as_ptr() as *const std::ffi::c_char,
            method_len: 3,
            depth: std::ptr::null(),
            depth_len: 0,
            status: 200,
            complete: 1,
            duration: 0.01,
            received: 10,
            sent: 20,
            body_sent: 5,
            content_length: -1,
            nattempts: 6,
            attempts: attempts.as_ptr(),
        };
        let record = hooks.record.unwrap();
        // SAFETY: req and its strings and attempts are live.
        unsafe { record(hooks.gw, &req) };
        // a NULL method with a length: not recorded; NULL pointers: ignored
        req.method = std::ptr::null();
        // SAFETY: as above; the NULL method is refused, not read.
        unsafe {
            record(hooks.gw, &req);
            record(hooks.gw, std::ptr::null());
            shmprom_gw_record(std::ptr::null_mut(), &req);
            (hooks.begin.unwrap())(hooks.gw);
        }
        let t = text(&z);
        has_all(
            &t,
            &[
                r#"dfs_gateway_requests_total{op="read",status="200"} 1"#,
                r#"dfs_gateway_upstream_retries_total{node="10.0.0.5:80"} 1"#,
                r#"dfs_gateway_upstream_failures_total{node="10.0.0.1:80"} 1"#,
                r#"dfs_gateway_upstream_attempts_total{node="10.0.0.6:80",status="200"} 1"#,
            ],
        );
        assert!(!t.contains(r#"upstream_retries_total{node="10.0.0.6:80"}"#));
        assert!(!t.contains(r#"upstream_duration_seconds_count{node="10.0.0.1:80"}"#));
        has(&t, "dfs_gateway_requests_in_flight 1");
        // the wrong family list: NULL and a message
        let mut bad = ids;
        bad.swap(0, 1);
        // SAFETY: as for the first open.
        let gw2 = unsafe {
            shmprom_gw_open(
                z.as_ptr() as *mut shmprom_zone,
                bad.as_ptr(),
                10,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        assert!(gw2.is_null());
        // SAFETY: set_err wrote a NUL-terminated message.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        assert!(
            msg.to_string_lossy().contains("not the preset's"),
            "{msg:?}"
        );
    }
}
