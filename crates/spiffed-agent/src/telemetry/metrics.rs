//! `[metrics]`: the Prometheus endpoint (`GET /metrics`, text format 0.0.4), encoded with
//! `prometheus-client` from one collector that reads [`Facts`] at scrape time. The names are
//! documented in the README ("Metrics"); a test scrapes the real binary with a Prometheus text
//! parser.

use std::fmt::Error as FmtError;
use std::sync::Arc;
use std::time::SystemTime;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Facts;
use super::http::{Answer, Handler};
use super::rpc::{APIS, BUCKETS_NS, CODES, METHODS};

/// The handler of the metrics endpoint.
pub(crate) fn handler(facts: Arc<Facts>) -> Handler {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector { facts }));
    let registry = Arc::new(registry);
    Arc::new(move |path| match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            Some(
                match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
                    Ok(()) => Answer {
                        status: StatusCode::OK,
                        content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        body,
                    },
                    Err(_) => Answer::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "could not encode the metrics\n",
                    ),
                },
            )
        }
        _ => None,
    })
}

/// Reads every metric from [`Facts`] on each scrape.
struct AgentCollector {
    facts: Arc<Facts>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

/// Seconds since the epoch (negative before it, which no clock here shows).
fn epoch_secs(t: SystemTime) -> f64 {
    secs_until(t, SystemTime::UNIX_EPOCH)
}

/// Seconds from `now` until `t` (negative once `t` passed).
fn secs_until(t: SystemTime, now: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), FmtError> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), FmtError> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// A gauge family: one sample per label set.
fn gauges<'a, L: EncodeLabelSet + 'a>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), FmtError> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss, reason = "counts shown as gauges")]
fn f(n: usize) -> f64 {
    n as f64
}

/// `/proc/self/status`'s VmRSS, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Open descriptors of the process.
fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

impl AgentCollector {
    fn rpc(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), FmtError> {
        let (connections, _) = self.facts.open_counts();
        gauge(
            enc,
            "spiffed_connections_open",
            "Open connections on the Workload API socket (Workload API and SDS).",
            f(connections),
        )?;
        let Some(rpc) = &self.facts.rpc else {
            return Ok(());
        };
        gauges(
            enc,
            "spiffed_streams_open",
            "RPCs in progress on the Workload API socket (open streams and unanswered calls), by API.",
            APIS.iter().enumerate().map(|(i, api)| {
                #[allow(clippy::cast_precision_loss, reason = "a count")]
                let v = rpc.open(i) as f64;
                ([("api", *api)], v)
            }),
        )?;
        let label = |i: usize| {
            let (path, api) = METHODS.get(i).copied().unwrap_or(("/unknown", 5));
            (
                APIS.get(api).copied().unwrap_or("other"),
                path.trim_start_matches('/'),
            )
        };
        {
            let mut m = enc.encode_descriptor(
                "spiffed_rpc_started",
                "RPCs started on the Workload API socket, by API and method.",
                None,
                MetricType::Counter,
            )?;
            for i in 0..METHODS.len() {
                let (api, method) = label(i);
                let n = rpc.started(i);
                m.encode_family(&[("api", api), ("method", method)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "spiffed_rpc_handled",
                "RPCs ended on the Workload API socket, by API, method and gRPC status code \
                 (Canceled: the client went away before the status).",
                None,
                MetricType::Counter,
            )?;
            for i in 0..METHODS.len() {
                let (api, method) = label(i);
                for c in 0..CODES.len() {
                    let n = rpc.handled(i, c);
                    if n == 0 {
                        continue;
                    }
                    let code = CODES.get(c).copied().unwrap_or("Unknown");
                    m.encode_family(&[("api", api), ("method", method), ("code", code)])?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "spiffed_rpc_latency_seconds",
            "Time from an RPC's request to its first response message (or to its status when it \
             sends none), by API, method and gRPC status code.",
            None,
            MetricType::Histogram,
        )?;
        #[allow(clippy::cast_precision_loss, reason = "bucket bounds")]
        let bounds: Vec<f64> = BUCKETS_NS.iter().map(|&b| b as f64 / 1e9).collect();
        for i in 0..METHODS.len() {
            let (api, method) = label(i);
            for c in 0..CODES.len() {
                let (counts, total, sum) = rpc.latency(i, c);
                if total == 0 {
                    continue;
                }
                let buckets: Vec<(f64, u64)> = bounds
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(counts)
                    .collect();
                let code = CODES.get(c).copied().unwrap_or("Unknown");
                m.encode_family(&[("api", api), ("method", method), ("code", code)])?
                    .encode_histogram::<NoLabelSet>(sum, total, &buckets, None)?;
            }
        }
        Ok(())
    }

    fn identities(&self, enc: &mut DescriptorEncoder<'_>, now: SystemTime) -> Result<(), FmtError> {
        let facts = &self.facts;
        let d = facts.denials();
        {
            let mut m = enc.encode_descriptor(
                "spiffed_attestation_failures",
                "Callers refused an identity, by reason: process_gone, proc_unreadable and \
                 plugin_failed (attestation failed), no_identity (no entry matches), \
                 not_entitled (asked for a SPIFFE ID it does not hold).",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [
                ("process_gone", d.process_gone),
                ("proc_unreadable", d.proc_unreadable),
                ("plugin_failed", d.plugin_failed),
                ("no_identity", d.no_identity),
                ("not_entitled", d.not_entitled),
            ] {
                m.encode_family(&[("reason", reason)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        gauge(
            enc,
            "spiffed_entries",
            "Registration entries loaded (config file and store, or synced from the SPIRE Server).",
            f(facts.entries()),
        )?;
        let (cached, earliest, mints, rotations, last_rotation) = facts.svids();
        counter(
            enc,
            "spiffed_x509_svids_minted",
            "X.509-SVIDs minted (or, in agent mode, signed by the SPIRE Server) since start.",
            mints,
        )?;
        counter(
            enc,
            "spiffed_x509_svid_rotations",
            "X.509-SVIDs that replaced one held before (rotations, re-mints after a change).",
            rotations,
        )?;
        gauge(
            enc,
            "spiffed_x509_svids_cached",
            "X.509-SVIDs held in memory.",
            f(cached),
        )?;
        if let Some(t) = earliest {
            gauge(
                enc,
                "spiffed_x509_svid_earliest_expiry_timestamp_seconds",
                "notAfter of the X.509-SVID in memory that expires first, in seconds since the epoch.",
                epoch_secs(t),
            )?;
            gauge(
                enc,
                "spiffed_x509_svid_earliest_expiry_remaining_seconds",
                "Seconds until the X.509-SVID in memory that expires first expires.",
                secs_until(t, now),
            )?;
        }
        if let Some(t) = last_rotation {
            gauge(
                enc,
                "spiffed_x509_svid_last_rotation_timestamp_seconds",
                "When an X.509-SVID was last rotated, in seconds since the epoch.",
                epoch_secs(t),
            )?;
        }
        let authority = facts.authority();
        if let Some(t) = authority.not_after {
            let (name, what) = if authority.kind == "ca" {
                ("spiffed_ca_expiry", "the active CA certificate")
            } else {
                ("spiffed_agent_svid_expiry", "the agent SVID")
            };
            gauge(
                enc,
                &format!("{name}_timestamp_seconds"),
                &format!("notAfter of {what}, in seconds since the epoch."),
                epoch_secs(t),
            )?;
            gauge(
                enc,
                &format!("{name}_remaining_seconds"),
                &format!("Seconds until {what} expires."),
                secs_until(t, now),
            )?;
        }
        if let Some(agent) = facts.agent() {
            if let Some(t) = agent.last_sync {
                gauge(
                    enc,
                    "spiffed_spire_last_sync_timestamp_seconds",
                    "When the last sync with the SPIRE Server succeeded, in seconds since the epoch.",
                    epoch_secs(t),
                )?;
            }
            gauge(
                enc,
                "spiffed_spire_server_reachable",
                "1 when the last sync with the SPIRE Server succeeded, else 0.",
                if agent.readiness == "serving" {
                    1.0
                } else {
                    0.0
                },
            )?;
            gauge(
                enc,
                "spiffed_spire_serving_from_cache",
                "1 while identities are served from the cache because the SPIRE Server is unreachable.",
                if agent.readiness == "serving_from_cache" {
                    1.0
                } else {
                    0.0
                },
            )?;
        }
        gauge(
            enc,
            "spiffed_ready",
            "1 when the agent is ready (as GET /ready of [health] says), else 0.",
            if facts.ready(now).ready { 1.0 } else { 0.0 },
        )
    }

    fn process(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), FmtError> {
        let facts = &self.facts;
        gauges(
            enc,
            "spiffed_build",
            "The agent's version and mode (always 1).",
            [([("version", super::VERSION), ("mode", facts.mode())], 1.0)],
        )?;
        gauge(
            enc,
            "process_start_time_seconds",
            "When the agent started, in seconds since the epoch.",
            epoch_secs(facts.started),
        )?;
        if let Some(rss) = resident_bytes() {
            #[allow(clippy::cast_precision_loss, reason = "a byte count")]
            gauge(
                enc,
                "process_resident_memory_bytes",
                "Resident memory of the agent (VmRSS), in bytes.",
                rss as f64,
            )?;
        }
        if let Some(n) = open_fds() {
            gauge(
                enc,
                "process_open_fds",
                "Open file descriptors of the agent.",
                f(n),
            )?;
        }
        if let Some(Some(max)) = facts.max_fds.get() {
            #[allow(clippy::cast_precision_loss, reason = "a descriptor count")]
            gauge(
                enc,
                "process_max_fds",
                "The agent's soft descriptor limit (RLIMIT_NOFILE).",
                *max as f64,
            )?;
        }
        Ok(())
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), FmtError> {
        let now = SystemTime::now();
        self.process(&mut enc)?;
        self.rpc(&mut enc)?;
        self.identities(&mut enc, now)
    }
}
