//! RPC counts, latencies and open streams on the public socket, kept in fixed tables of
//! atomics: a request costs a match on its path, two clock reads and a few relaxed atomic
//! adds, with no lock and no allocation. The tables are read at scrape time.
//!
//! Every RPC is counted once when it starts (`started`) and once when it ends (`handled`,
//! by gRPC status code: from the trailers, from a trailers-only response, or `Canceled` when
//! the response is dropped before its status, e.g. a client closing a stream). Its latency is
//! the time until its first response message, or until its status when it sends none: for a
//! unary call that is the whole call, for a stream the wait for the first SVID or secret.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

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
    pub(crate) started: AtomicU64,
    pub(crate) handled: [AtomicU64; CODES.len()],
    pub(crate) latency: [Histogram; CODES.len()],
}

/// Every method's counters and the open streams per API.
#[derive(Debug, Default)]
pub(crate) struct RpcMetrics {
    pub(crate) methods: [MethodStats; METHODS.len()],
    /// RPCs in progress (open streams and unary calls not yet answered), per API.
    pub(crate) open: [AtomicI64; APIS.len()],
}

/// The method index of a request path.
fn method_of(path: &str) -> usize {
    METHODS
        .iter()
        .position(|&(p, _)| p == path)
        .unwrap_or(UNKNOWN)
}

impl RpcMetrics {
    /// Counts the start of an RPC on `path`; the returned call counts its end.
    pub(crate) fn start(self: &Arc<Self>, path: &str) -> RpcCall {
        let method = method_of(path);
        if let Some(m) = self.methods.get(method) {
            m.started.fetch_add(1, Ordering::Relaxed);
        }
        let api = METHODS.get(method).map_or(OTHER, |&(_, a)| a);
        if let Some(o) = self.open.get(api) {
            o.fetch_add(1, Ordering::Relaxed);
        }
        RpcCall {
            metrics: self.clone(),
            method,
            api,
            start: Instant::now(),
            timed: false,
            done: false,
        }
    }

    /// Open RPCs of `api` (an index into [`APIS`]).
    pub(crate) fn open(&self, api: usize) -> i64 {
        self.open.get(api).map_or(0, |o| o.load(Ordering::Relaxed))
    }
}

/// One RPC in progress; dropping it before its status was seen counts it as `Canceled`.
#[derive(Debug)]
pub(crate) struct RpcCall {
    metrics: Arc<RpcMetrics>,
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
        self.metrics.methods.get(self.method)
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
        if let Some(o) = self.metrics.open.get(self.api) {
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
        let jwt = &m.methods[2];
        assert_eq!(jwt.started.load(Ordering::Relaxed), 1);
        assert_eq!(jwt.handled[7].load(Ordering::Relaxed), 1);
        // Timed at the first message, as OK.
        assert_eq!(jwt.latency[0].read().1, 1);
        assert_eq!(jwt.latency[7].read().1, 0);
        // A stream dropped without a status was canceled, and never timed.
        let x509 = &m.methods[0];
        assert_eq!(x509.handled[CANCELED].load(Ordering::Relaxed), 1);
        assert_eq!(x509.latency[CANCELED].read().1, 0);
        assert_eq!(m.methods[UNKNOWN].started.load(Ordering::Relaxed), 1);
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
