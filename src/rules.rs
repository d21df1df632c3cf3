//! Recording for the nginx module's `shmprom_inc` and `shmprom_observe`
//! directives: a counter increment or a histogram observation per request,
//! with label values nginx evaluated (variables), no Lua in the log phase.
//!
//! The families are defined in Lua (`init_by_lua*`); the module resolves
//! each directive's metric by name through [`Rules::find`] while nginx
//! reads its configuration, and from then on hands [`Rules::record`] the
//! family id, the value and the label values in the family's order. A
//! `Rules` is process-local state (a label cache, this worker's plane):
//! made in the nginx master, copied into every worker by fork, used by the
//! worker's event loop only. Label sets are cached per worker as cell
//! indices, dropped when the zone's epoch moves (series deleted or families
//! retired), as the Lua wrapper's caches are.

use crate::gateway::FxHasher;
use crate::registry::{self, Kind};
use crate::writer::PlaneWriter;
use crate::zone::Zone;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::Ordering;

/// Label sets cached per worker before the cache starts afresh (label
/// values come from requests: `$host` or `$uri` can bring new ones without
/// end).
const MAX_CACHE: usize = 65536;

/// Kinds of [`crate::zone::ERROR_KINDS`] counted here.
const ERR_BAD_VALUE: usize = 0;
const ERR_BAD_LABELS: usize = 1;
const ERR_INTERNAL: usize = 4;

/// A family as [`Rules::find`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyInfo {
    /// Its id in the zone.
    pub id: u32,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its label names, in order.
    pub labels: Vec<String>,
}

/// Why [`Rules::record`] recorded nothing. Each is counted in the zone's
/// `shmprom_errors_total` (the zone counts refused series itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// No counter or histogram of that id.
    NoFamily,
    /// The family was retired (redefined with another shape by a reload;
    /// the old workers' directives still name its id): it is out of the
    /// output, so nothing is recorded, and nothing counted as an error.
    Retired,
    /// A counter increment below 0, or a value that is not a finite number.
    BadValue,
    /// Not one label value per label name.
    LabelCount,
    /// The series could not be had (zone full, key too long, stuck insert).
    Series,
}

/// What a record needs of its family, read once per epoch, and the label
/// values of its last record with their series: a location's directives
/// see the same `$host` request after request, and one comparison spares
/// the key, its hash and the cache lookup.
struct Fam {
    live: bool,
    histogram: bool,
    nlabels: usize,
    bounds: Vec<f64>,
    /// The last label values, encoded as in [`Rules::series`] without the
    /// family id; valid when `last_idx` is Some.
    last: Vec<u8>,
    last_idx: Option<u32>,
}

impl Fam {
    /// The series of the last record when `values` are its label values.
    fn same_as_last(&self, values: &[&[u8]]) -> Option<u32> {
        let idx = self.last_idx?;
        let mut rest = &self.last[..];
        for v in values {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            let tail = &rest[4..];
            if len as usize != v.len() || !tail.starts_with(v) {
                return None;
            }
            rest = &tail[v.len()..];
        }
        rest.is_empty().then_some(idx)
    }
}

/// Per-process recording state of one zone's directives.
pub struct Rules {
    zone: Zone,
    w: PlaneWriter,
    epoch: u32,
    /// By family id; None: not read yet this epoch.
    fams: Vec<Option<Fam>>,
    /// (family id, label values) encoded as in [`Rules::key`] -> first cell.
    cache: HashMap<Box<[u8]>, u32, BuildHasherDefault<FxHasher>>,
    /// The key being looked up (kept: no allocation per record).
    key: Vec<u8>,
}

impl Rules {
    /// No plane, nothing cached yet.
    pub fn new(zone: Zone) -> Rules {
        let epoch = zone.header().epoch.load(Ordering::Acquire);
        Rules {
            w: PlaneWriter::new(&zone),
            zone,
            epoch,
            fams: Vec::new(),
            cache: HashMap::default(),
            key: Vec::with_capacity(64),
        }
    }

    /// The zone recorded into.
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// This process's plane (0: none yet, or every plane is held).
    pub fn plane(&self) -> u32 {
        self.w.plane()
    }

    /// The live family named `name`.
    pub fn find(&self, name: &[u8]) -> Option<FamilyInfo> {
        registry::live_families(&self.zone)
            .into_iter()
            .find(|f| f.name.as_bytes() == name)
            .map(|f| FamilyInfo {
                id: f.id,
                kind: f.kind,
                labels: f.labels.iter().map(|l| l.to_string()).collect(),
            })
    }

    /// Records `value` for the series of family `id` with these label
    /// values (in the order of the family's label names): a counter adds
    /// it (finite, >= 0), a histogram observes it (finite). Creates the
    /// series on first use. Never panics on bad input: it counts it.
    pub fn record(&mut self, id: u32, value: f64, values: &[&[u8]]) -> Result<(), RecordError> {
        self.refresh();
        let Some((i, fam)) = self
            .family(id)
            .and_then(|i| Some((i, self.fams[i].as_ref()?)))
        else {
            self.zone.count_error(ERR_INTERNAL);
            return Err(RecordError::NoFamily);
        };
        if !fam.live {
            return Err(RecordError::Retired);
        }
        let ok = value.is_finite() && (fam.histogram || value >= 0.0);
        if !ok {
            self.zone.count_error(ERR_BAD_VALUE);
            return Err(RecordError::BadValue);
        }
        if values.len() != fam.nlabels {
            self.zone.count_error(ERR_BAD_LABELS);
            return Err(RecordError::LabelCount);
        }
        let idx = match fam.same_as_last(values) {
            Some(idx) => idx,
            None => {
                let idx = self.series(id, values)?;
                if let Some(fam) = self.fams[i].as_mut() {
                    fam.last.clear();
                    // the key after the family id: the label values' encoding
                    fam.last.extend_from_slice(&self.key[4..]);
                    fam.last_idx = Some(idx);
                }
                idx
            }
        } as u64;
        match &self.fams[i] {
            Some(fam) if fam.histogram => self.w.observe(&self.zone, idx, &fam.bounds, value),
            _ => self.w.add(&self.zone, idx, value),
        }
        Ok(())
    }

    /// Drops the caches when the epoch moved; claims a plane when this
    /// process has none (at most once a second).
    fn refresh(&mut self) {
        let e = self.zone.header().epoch.load(Ordering::Acquire);
        if e != self.epoch {
            self.epoch = e;
            self.cache.clear();
            self.fams.clear();
        }
        if !self.w.has_plane() {
            self.w.claim(&self.zone);
        }
    }

    /// Family `id` as a record needs it (its index in `fams`): a counter
    /// or histogram, live or retired (a retirement moves the epoch, which
    /// reads it again).
    fn family(&mut self, id: u32) -> Option<usize> {
        let i = id as usize;
        if let Some(Some(_)) = self.fams.get(i) {
            return Some(i);
        }
        if i >= self.zone.families().len() {
            return None;
        }
        let f = registry::family(&self.zone, id)?;
        if f.kind == Kind::Gauge {
            return None;
        }
        if i >= self.fams.len() {
            self.fams.resize_with(i + 1, || None);
        }
        self.fams[i] = Some(Fam {
            live: f.live,
            histogram: f.kind == Kind::Histogram,
            nlabels: f.labels.len(),
            bounds: f.buckets.to_vec(),
            last: Vec::new(),
            last_idx: None,
        });
        Some(i)
    }

    /// The first cell of the series: cached, else found or created.
    fn series(&mut self, id: u32, values: &[&[u8]]) -> Result<u32, RecordError> {
        self.key.clear();
        self.key.extend_from_slice(&id.to_le_bytes());
        for v in values {
            self.key.extend_from_slice(&(v.len() as u32).to_le_bytes());
            self.key.extend_from_slice(v);
        }
        if let Some(&idx) = self.cache.get(&self.key[..]) {
            return Ok(idx);
        }
        // the zone counts what it refuses (series_dropped, key_too_long,
        // stuck_insert); a refused series is asked for again next time
        let idx = registry::series_get(&self.zone, id, values).map_err(|_| RecordError::Series)?;
        if self.cache.len() >= MAX_CACHE {
            self.cache.clear();
        }
        self.cache.insert(self.key[..].into(), idx);
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Def;

    fn zone(name: &str) -> Zone {
        Zone::open(name, 1 << 20, 3, None).expect("zone").0
    }

    fn define(z: &Zone, name: &str, kind: Kind, labels: &[&str], buckets: &[f64]) -> u32 {
        registry::define(
            z,
            &Def {
                name,
                help: b"help",
                kind,
                mode: 0,
                labels: labels.to_vec(),
                buckets: buckets.to_vec(),
            },
        )
        .expect("define")
    }

    fn value(z: &Zone, id: u32, values: &[&[u8]], k: u64) -> f64 {
        let idx = registry::series_get(z, id, values).expect("series") as u64;
        (0..z.header().planes)
            .map(|p| f64::from_bits(z.cell(p, idx + k).load(Ordering::Relaxed)))
            .sum()
    }

    /// Live series of family `id`.
    fn series(z: &Zone, id: u32) -> u64 {
        registry::family(z, id)
            .expect("family")
            .rec
            .series
            .load(Ordering::Relaxed)
    }

    fn errors(z: &Zone, k: usize) -> u64 {
        z.header().errors[k].load(Ordering::Relaxed)
    }

    #[test]
    fn counts_and_observes() {
        let z = zone("rules-counts");
        let c = define(&z, "req_total", Kind::Counter, &["host", "status"], &[]);
        let h = define(&z, "dur_seconds", Kind::Histogram, &["host"], &[0.1, 1.0]);
        let mut r = Rules::new(z);
        let info = r.find(b"req_total").expect("found");
        assert_eq!(info.id, c);
        assert_eq!(info.kind, Kind::Counter);
        assert_eq!(info.labels, ["host", "status"]);
        assert!(r.find(b"nope_total").is_none());
        for i in 0..1000 {
            let st: &[u8] = if i % 4 == 0 { b"404" } else { b"200" };
            r.record(c, 1.0, &[b"a.example", st]).expect("inc");
            r.record(h, (i % 3) as f64 * 0.5, &[b"a.example"])
                .expect("observe");
        }
        assert!(r.plane() > 0, "claimed a plane");
        assert_eq!(value(&z, c, &[b"a.example", b"200"], 0), 750.0);
        assert_eq!(value(&z, c, &[b"a.example", b"404"], 0), 250.0);
        // 0 -> le 0.1; 0.5 -> le 1; 1.0 -> le 1 (a bound takes its equal)
        assert_eq!(value(&z, h, &[b"a.example"], 0), 334.0);
        assert_eq!(value(&z, h, &[b"a.example"], 1), 666.0);
        assert_eq!(value(&z, h, &[b"a.example"], 2), 0.0);
        assert_eq!(value(&z, h, &[b"a.example"], 3), 333.0 * 0.5 + 333.0);
    }

    #[test]
    fn refuses_and_counts_bad_input() {
        let z = zone("rules-bad");
        let c = define(&z, "req_total", Kind::Counter, &["host"], &[]);
        let h = define(&z, "dur_seconds", Kind::Histogram, &[], &[1.0]);
        let g = define(&z, "temp", Kind::Gauge, &[], &[]);
        let mut r = Rules::new(z);
        assert_eq!(r.record(c, -1.0, &[b"x"]), Err(RecordError::BadValue));
        assert_eq!(r.record(c, f64::NAN, &[b"x"]), Err(RecordError::BadValue));
        assert_eq!(r.record(h, f64::INFINITY, &[]), Err(RecordError::BadValue));
        assert_eq!(errors(&z, ERR_BAD_VALUE), 3);
        assert_eq!(r.record(c, 1.0, &[]), Err(RecordError::LabelCount));
        assert_eq!(errors(&z, ERR_BAD_LABELS), 1);
        assert_eq!(r.record(g, 1.0, &[]), Err(RecordError::NoFamily));
        assert_eq!(r.record(99, 1.0, &[]), Err(RecordError::NoFamily));
        assert_eq!(errors(&z, ERR_INTERNAL), 2);
        let long = vec![b'k'; 20_000];
        assert_eq!(r.record(c, 1.0, &[&long]), Err(RecordError::Series));
        // a negative observation is fine for a histogram
        r.record(h, -3.0, &[]).expect("observe");
        assert_eq!(value(&z, h, &[], 0), 1.0);
        // nothing else was made
        assert_eq!(series(&z, c), 0);
    }

    #[test]
    fn a_retired_family_records_nothing_and_counts_nothing() {
        let z = zone("rules-retired");
        let old = define(&z, "req_total", Kind::Counter, &["host"], &[]);
        let mut r = Rules::new(z);
        r.record(old, 1.0, &[b"x"]).expect("inc");
        // a reload redefines it with another label set: the old id retires
        let new = define(&z, "req_total", Kind::Counter, &["host", "code"], &[]);
        assert_ne!(old, new);
        assert_eq!(r.record(old, 1.0, &[b"x"]), Err(RecordError::Retired));
        assert_eq!(
            series(&z, old),
            0,
            "no series made again in the retired family"
        );
        let errs: u64 = (0..6).map(|k| errors(&z, k)).sum();
        assert_eq!(errs, 0, "not an error");
        r.record(new, 1.0, &[b"x", b"200"])
            .expect("the new family records");
        assert_eq!(value(&z, new, &[b"x", b"200"], 0), 1.0);
    }

    #[test]
    fn the_last_label_set_is_compared_whole() {
        let z = zone("rules-last");
        let c = define(&z, "req_total", Kind::Counter, &["a", "b"], &[]);
        let n = define(&z, "plain_total", Kind::Counter, &[], &[]);
        let mut r = Rules::new(z);
        // the same bytes split otherwise (once with the length of the
        // last set's second value in the way), a prefix, empty values: each
        // its own series whatever the record before it
        let sets: [[&[u8]; 2]; 6] = [
            [b"ab", b"c"],
            [b"a", b"\x00c"],
            [b"a", b"bc"],
            [b"a", b"b"],
            [b"", b"abc"],
            [b"abc", b""],
        ];
        for round in 0..3 {
            for (k, set) in sets.iter().enumerate() {
                for _ in 0..=k {
                    r.record(c, 1.0, set).expect("inc");
                }
                r.record(n, 1.0, &[]).expect("inc");
            }
            for (k, set) in sets.iter().enumerate() {
                assert_eq!(
                    value(&z, c, set, 0),
                    ((k + 1) * (round + 1)) as f64,
                    "{set:?}"
                );
            }
        }
        assert_eq!(value(&z, n, &[], 0), 18.0);
        // a label count mismatch is refused, not taken for the last set
        assert_eq!(r.record(c, 1.0, &[b"abc"]), Err(RecordError::LabelCount));
        assert_eq!(
            r.record(c, 1.0, &[b"abc", b"", b""]),
            Err(RecordError::LabelCount)
        );
    }

    #[test]
    fn cache_follows_deletes() {
        let z = zone("rules-del");
        let c = define(&z, "req_total", Kind::Counter, &["host"], &[]);
        let mut r = Rules::new(z);
        r.record(c, 2.0, &[b"x"]).expect("inc");
        registry::series_del(&z, c, &[b"x"]).expect("del");
        z.bump_epoch();
        r.record(c, 5.0, &[b"x"]).expect("inc after the delete");
        assert_eq!(
            value(&z, c, &[b"x"], 0),
            5.0,
            "a new series, not the deleted one's cell"
        );
    }
}
