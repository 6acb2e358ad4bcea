//! RPC counts, latencies and open streams on the public socket, kept in fixed tables of
//! atomics: a request costs a match on its path, two clock reads and a few relaxed atomic
//! adds, with no lock and no allocation. The tables are read at scrape time.
//!
//! The tables are sharded: one copy per worker thread (up to [`MAX_SHARDS`]), each on its own
//! cache lines, and a call counts into the shard of the thread it started on. Without shards,
//! every call's six adds and the reference count of the shared table bounced one set of cache
//! lines between the cores, which cost 7-13 % of the agent's CPU per warm call
//! (BENCHMARKS.md, "The cost of metrics"). A scrape sums the shards.
//!
//! Every RPC is counted once when it starts (`started`) and once when it ends (`handled`,
//! by gRPC status code: from the trailers, from a trailers-only response, or `Canceled` when
//! the response is dropped before its status, e.g. a client closing a stream). Its latency is
//! the time until its first response message, or until its status when it sends none: for a
//! unary call that is the whole call, for a stream the wait for the first SVID or secret.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// At most this many shards, whatever the number of CPUs (each is about 40 KiB).
pub(crate) const MAX_SHARDS: usize = 32;

/// The APIs served on the public socket, as the `api` label says them. SDS streams are
/// counted under `sds` by their method paths below, whichever service serves them.
pub(crate) const APIS: [&str; 6] = ["workload", "sds", "health", "status", "reflection", "other"];
const WORKLOAD: usize = 0;
const SDS: usize = 1;
const HEALTH: usize = 2;
const STATUS: usize = 3;
const REFLECTION: usize = 4;
const OTHER: usize = 5;

/// The methods counted one by one: (path, api index). The `method` label is the path without
/// its leading slash. A path not listed counts as `other`/`unknown` (a client cannot add
/// label values).
pub(crate) const METHODS: [(&str, usize); 14] = [
    ("/SpiffeWorkloadAPI/FetchX509SVID", WORKLOAD),
    ("/SpiffeWorkloadAPI/FetchX509Bundles", WORKLOAD),
    ("/SpiffeWorkloadAPI/FetchJWTSVID", WORKLOAD),
    ("/SpiffeWorkloadAPI/FetchJWTBundles", WORKLOAD),
    ("/SpiffeWorkloadAPI/ValidateJWTSVID", WORKLOAD),
    (
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        SDS,
    ),
    (
        "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
        SDS,
    ),
    (
        "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets",
        SDS,
    ),
    ("/grpc.health.v1.Health/Check", HEALTH),
    ("/grpc.health.v1.Health/Watch", HEALTH),
    ("/spiffed.status.v1.AgentStatus/GetStatus", STATUS),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        REFLECTION,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        REFLECTION,
    ),
    ("/unknown", OTHER),
];
const UNKNOWN: usize = METHODS.len() - 1;

/// gRPC status codes by number, as the `code` label says them (the names grpc-go and its
/// Prometheus middleware use).
pub(crate) const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN_CODE: usize = 2;

/// Upper bounds of the latency buckets, in nanoseconds (100 µs to 10 s).
pub(crate) const BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram of atomics: one count per bucket (the last one is `+Inf`) and the sum.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, ns: u64) {
        let i = BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS_NS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (bucket counts, not cumulative; their total; the sum in seconds).
    pub(crate) fn read(&self) -> ([u64; BUCKETS_NS.len() + 1], u64, f64) {
        let counts: [u64; BUCKETS_NS.len() + 1] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let total = counts.iter().sum();
        // Nanoseconds as f64 seconds: exact enough for any realistic sum.
        #[allow(clippy::cast_precision_loss, reason = "a sum of latencies")]
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (counts, total, sum)
    }
}

/// The counters of one method.
#[derive(Debug, Default)]
pub(crate) struct MethodStats {
    started: AtomicU64,
    handled: [AtomicU64; CODES.len()],
    latency: [Histogram; CODES.len()],
}

/// One shard: every method's counters and the open streams per API, aligned so that no two
/// shards share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Shard {
    methods: [MethodStats; METHODS.len()],
    /// RPCs in progress (open streams and unary calls not yet answered), per API. A call that
    /// ends on another thread's shard makes one shard's count low and another's high; the sum
    /// is right.
    open: [AtomicI64; APIS.len()],
}

/// Every method's counters and the open streams per API, in per-thread shards.
#[derive(Debug)]
pub(crate) struct RpcMetrics {
    shards: Box<[Arc<Shard>]>,
}

impl Default for RpcMetrics {
    /// One shard per CPU this process may use, at most [`MAX_SHARDS`].
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_shards(n)
    }
}

/// The shard slot of the calling thread: threads take slots in the order they first count.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s)
}

/// The method index of a request path.
fn method_of(path: &str) -> usize {
    METHODS
        .iter()
        .position(|&(p, _)| p == path)
        .unwrap_or(UNKNOWN)
}

impl RpcMetrics {
    /// Tables in `n` shards (at least 1, at most [`MAX_SHARDS`]).
    pub(crate) fn with_shards(n: usize) -> Self {
        let shards = (0..n.clamp(1, MAX_SHARDS))
            .map(|_| Arc::new(Shard::default()))
            .collect();
        Self { shards }
    }

    /// Counts the start of an RPC on `path` in this thread's shard; the returned call counts
    /// its end.
    pub(crate) fn start(&self, path: &str) -> RpcCall {
        let shard = self.shard_for(thread_slot());
        let method = method_of(path);
        if let Some(m) = shard.methods.get(method) {
            m.started.fetch_add(1, Ordering::Relaxed);
        }
        let api = METHODS.get(method).map_or(OTHER, |&(_, a)| a);
        if let Some(o) = shard.open.get(api) {
            o.fetch_add(1, Ordering::Relaxed);
        }
        RpcCall {
            shard,
            method,
            api,
            start: Instant::now(),
            timed: false,
            done: false,
        }
    }

    /// The shard of thread slot `slot`.
    fn shard_for(&self, slot: usize) -> Arc<Shard> {
        let n = self.shards.len().max(1);
        match self.shards.get(slot % n) {
            Some(shard) => shard.clone(),
            // Unreachable: `with_shards` makes at least one.
            None => Arc::new(Shard::default()),
        }
    }

    /// Open RPCs of `api` (an index into [`APIS`]), over every shard.
    pub(crate) fn open(&self, api: usize) -> i64 {
        self.shards
            .iter()
            .filter_map(|s| s.open.get(api))
            .map(|o| o.load(Ordering::Relaxed))
            .sum()
    }

    /// RPCs of method `method` (an index into [`METHODS`]) started, over every shard.
    pub(crate) fn started(&self, method: usize) -> u64 {
        self.sum(method, |m| m.started.load(Ordering::Relaxed))
    }

    /// RPCs of `method` ended with status `code` (an index into [`CODES`]).
    pub(crate) fn handled(&self, method: usize, code: usize) -> u64 {
        self.sum(method, |m| {
            m.handled.get(code).map_or(0, |c| c.load(Ordering::Relaxed))
        })
    }

    /// The latency histogram of `method` and `code`, over every shard: (bucket counts, not
    /// cumulative; their total; the sum in seconds).
    pub(crate) fn latency(
        &self,
        method: usize,
        code: usize,
    ) -> ([u64; BUCKETS_NS.len() + 1], u64, f64) {
        let mut all = ([0; BUCKETS_NS.len() + 1], 0, 0.0);
        for shard in &*self.shards {
            if let Some(h) = shard.methods.get(method).and_then(|m| m.latency.get(code)) {
                let (counts, total, sum) = h.read();
                for (a, c) in all.0.iter_mut().zip(counts) {
                    *a += c;
                }
                all.1 += total;
                all.2 += sum;
            }
        }
        all
    }

    fn sum(&self, method: usize, f: impl Fn(&MethodStats) -> u64) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.methods.get(method))
            .map(f)
            .sum()
    }
}

/// One RPC in progress; dropping it before its status was seen counts it as `Canceled`.
#[derive(Debug)]
pub(crate) struct RpcCall {
    /// The shard of the thread it started on (its reference count is that thread's too).
    shard: Arc<Shard>,
    method: usize,
    api: usize,
    start: Instant,
    /// Its latency was observed.
    timed: bool,
    /// Its status was counted.
    done: bool,
}

impl RpcCall {
    fn stats(&self) -> Option<&MethodStats> {
        self.shard.methods.get(self.method)
    }

    fn time(&mut self, code: usize) {
        if self.timed {
            return;
        }
        self.timed = true;
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(h) = self.stats().and_then(|m| m.latency.get(code)) {
            h.observe(ns);
        }
    }

    /// The first response message went out.
    pub(crate) fn first_message(&mut self) {
        self.time(0);
    }

    /// The RPC ended with status `code` (a gRPC code number; unknown numbers count as
    /// `Unknown`).
    pub(crate) fn finish(&mut self, code: i32) {
        if self.done {
            return;
        }
        let code = usize::try_from(code)
            .ok()
            .filter(|&c| c < CODES.len())
            .unwrap_or(UNKNOWN_CODE);
        self.time(code);
        self.done = true;
        if let Some(c) = self.stats().and_then(|m| m.handled.get(code)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads the status of a response's headers or trailers, if they carry one.
    pub(crate) fn status_from(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = headers.get("grpc-status") {
            let code = std::str::from_utf8(code.as_bytes())
                .ok()
                .and_then(|s| s.parse::<i32>().ok())
                .unwrap_or(-1);
            self.finish(code);
        }
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Some(c) = self.stats().and_then(|m| m.handled.get(CANCELED)) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(o) = self.shard.open.get(self.api) {
            o.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_method_and_code_and_close_their_stream() {
        let m = Arc::new(RpcMetrics::default());
        let mut unary = m.start("/SpiffeWorkloadAPI/FetchJWTSVID");
        let stream = m.start("/SpiffeWorkloadAPI/FetchX509SVID");
        let strange = m.start("/made.up/Path");
        assert_eq!(m.open(WORKLOAD), 2);
        assert_eq!(m.open(OTHER), 1);
        unary.first_message();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
        unary.status_from(&trailers);
        drop(unary);
        drop(stream);
        drop(strange);
        assert_eq!(m.open(WORKLOAD), 0);
        assert_eq!(m.started(2), 1);
        assert_eq!(m.handled(2, 7), 1);
        // Timed at the first message, as OK.
        assert_eq!(m.latency(2, 0).1, 1);
        assert_eq!(m.latency(2, 7).1, 0);
        // A stream dropped without a status was canceled, and never timed.
        assert_eq!(m.handled(0, CANCELED), 1);
        assert_eq!(m.latency(0, CANCELED).1, 0);
        assert_eq!(m.started(UNKNOWN), 1);
    }

    /// Calls counted on several threads (several shards), some ending on another thread than
    /// the one they started on, add up to the same totals as on one.
    #[test]
    fn shards_add_up_whichever_thread_starts_or_ends_a_call() {
        let m = Arc::new(RpcMetrics::with_shards(4));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..1000 {
                        let mut call = m.start("/SpiffeWorkloadAPI/FetchX509SVID");
                        call.first_message();
                        if (i + t) % 2 == 0 {
                            call.finish(0);
                        } else {
                            kept.push(call);
                        }
                    }
                    kept
                })
            })
            .collect();
        let kept: Vec<RpcCall> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        // Half the calls are still open, held by this thread now.
        assert_eq!(m.open(WORKLOAD), 4000);
        assert_eq!(m.started(0), 8000);
        assert_eq!(m.handled(0, 0), 4000);
        drop(kept);
        assert_eq!(m.open(WORKLOAD), 0);
        assert_eq!(m.handled(0, CANCELED), 4000);
        let (counts, total, _sum) = m.latency(0, 0);
        assert_eq!(total, 8000);
        assert_eq!(counts.iter().sum::<u64>(), 8000);
        assert!(
            m.shards
                .iter()
                .filter(|s| s.methods[0].started.load(Ordering::Relaxed) > 0)
                .count()
                > 1
        );
    }

    #[test]
    fn latencies_fall_in_their_buckets() {
        let h = Histogram::default();
        h.observe(50_000);
        h.observe(100_000);
        h.observe(3_000_000);
        h.observe(60_000_000_000);
        let (counts, total, sum) = h.read();
        assert_eq!(total, 4);
        assert_eq!(counts[0], 2);
        assert_eq!(counts[5], 1);
        assert_eq!(counts[BUCKETS_NS.len()], 1, "+Inf");
        assert!((sum - 60.00315).abs() < 1e-9, "{sum}");
    }
}
