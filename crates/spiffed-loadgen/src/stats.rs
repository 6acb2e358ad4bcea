//! Latency samples and their summary: a bounded reservoir per worker, merged and sorted at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How many latency samples a whole run keeps (split evenly between workers).
pub const MAX_SAMPLES: usize = 1_000_000;

/// A fixed-size uniform sample of latencies in microseconds (reservoir sampling, algorithm R).
#[derive(Debug, Clone)]
pub struct Reservoir {
    samples: Vec<u32>,
    cap: usize,
    seen: u64,
    rng: u64,
}

impl Reservoir {
    /// A reservoir keeping at most `cap` samples (at least one); `seed` varies the replacement choice.
    pub fn new(cap: usize, seed: u64) -> Self {
        let cap = cap.max(1);
        Self {
            samples: Vec::with_capacity(cap.min(4096)),
            cap,
            seen: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.seen += 1;
        if self.samples.len() < self.cap {
            self.samples.push(us);
            return;
        }
        let j = self.next_rand() % self.seen;
        if let Ok(j) = usize::try_from(j)
            && j < self.cap
            && let Some(slot) = self.samples.get_mut(j)
        {
            *slot = us;
        }
    }

    /// How many latencies were recorded (kept or not).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Moves the samples out.
    pub fn into_samples(self) -> Vec<u32> {
        self.samples
    }

    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The nearest-rank percentile `p` (0..=100) of an ascending `sorted` slice; 0 when empty.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil();
    // Rank 0 (p = 0) means the smallest sample.
    let idx = (rank as usize).saturating_sub(1).min(n - 1);
    sorted.get(idx).copied().unwrap_or(0)
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: u32,
    /// 90th percentile.
    pub p90_us: u32,
    /// 99th percentile.
    pub p99_us: u32,
    /// Largest sample kept.
    pub max_us: u32,
}

impl Percentiles {
    /// Sorts `samples` and summarises them.
    pub fn from_samples(mut samples: Vec<u32>) -> Self {
        samples.sort_unstable();
        Self {
            p50_us: percentile(&samples, 50.0),
            p90_us: percentile(&samples, 90.0),
            p99_us: percentile(&samples, 99.0),
            max_us: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Counts of failures by gRPC code name (`PermissionDenied`, ...) or local cause (`Connect`,
/// `Timeout`, `NoMessage`).
pub type ErrorCounts = BTreeMap<String, u64>;

/// Adds `other` into `into`.
pub fn merge_errors(into: &mut ErrorCounts, other: ErrorCounts) {
    for (k, v) in other {
        *into.entry(k).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
        // Ten samples: p99 is the largest, p50 the fifth.
        let w: Vec<u32> = (10..=100).step_by(10).collect();
        assert_eq!(percentile(&w, 50.0), 50);
        assert_eq!(percentile(&w, 99.0), 100);
    }

    #[test]
    fn summary_sorts_first() {
        let p = Percentiles::from_samples(vec![5, 1, 4, 2, 3]);
        assert_eq!(
            p,
            Percentiles {
                p50_us: 3,
                p90_us: 5,
                p99_us: 5,
                max_us: 5
            }
        );
    }

    #[test]
    fn reservoir_is_bounded() {
        let mut r = Reservoir::new(10, 42);
        for i in 0..1000 {
            r.record(Duration::from_micros(i));
        }
        assert_eq!(r.seen(), 1000);
        assert_eq!(r.into_samples().len(), 10);
    }
}
