#!/usr/bin/env python3
"""Renders bench/ab.sh's JSON lines as a markdown table: medians per case, old vs new."""
import json
import statistics
import sys


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def per_stream_kib(r):
    before, ready = r.get("agent_before") or {}, r.get("agent_ready") or {}
    if before.get("rss_kib") is None or ready.get("rss_kib") is None or not r.get("streams"):
        return None
    return (ready["rss_kib"] - before["rss_kib"]) / r["streams"]


def cpu_per_call_us(rec):
    """The agent's CPU per successful call over a load run, in µs."""
    ok = (rec.get("result") or {}).get("ok")
    if rec.get("agent_cpu_ms") is None or not ok:
        return None
    return rec["agent_cpu_ms"] * 1000 / ok


def res(get):
    """A getter of the loadgen's result line, from the record that wraps it."""
    return lambda rec: get(rec.get("result") or {})


ROWS = [
    ("cold c=16: iterations/s", "cold", res(lambda r: r.get("rate_per_s"))),
    ("cold c=16: p50 µs", "cold", res(lambda r: r.get("p50_us"))),
    ("cold c=16: p99 µs", "cold", res(lambda r: r.get("p99_us"))),
    ("cold c=16: agent CPU per fetch, µs", "cold", cpu_per_call_us),
    ("cold c=1: iterations/s", "cold_c1", res(lambda r: r.get("rate_per_s"))),
    ("cold c=1: agent CPU per fetch, µs", "cold_c1", cpu_per_call_us),
    ("warm JWT c=16: calls/s", "warm_jwt", res(lambda r: r.get("rate_per_s"))),
    ("warm JWT c=16: agent CPU per call, µs", "warm_jwt", cpu_per_call_us),
    ("warm X.509 c=16: calls/s", "warm_x509", res(lambda r: r.get("rate_per_s"))),
    ("warm X.509 c=16: agent CPU per call, µs", "warm_x509", cpu_per_call_us),
    ("start-up to first SVID, ms", "startup", lambda r: (r.get("result") or {}).get("first_svid_ms")),
    ("idle RSS 2 s after start, MiB", "startup", lambda r: r.get("idle_rss_kib", 0) / 1024),
    ("fan-out: spread first to last update, ms", "fanout", res(lambda r: r.get("first_to_last_update_ms"))),
    ("fan-out: agent CPU per stream, µs", "fanout", res(lambda r: r.get("agent_cpu_per_stream_us"))),
    ("fan-out: RSS per stream, KiB", "fanout", res(per_stream_kib)),
    # Right after the Workload API fan-out on the same agent: its RSS growth is not its own.
    ("SDS fan-out: spread first to last update, ms", "sds_fanout", res(lambda r: r.get("first_to_last_update_ms"))),
    ("SDS fan-out: agent CPU per stream, µs", "sds_fanout", res(lambda r: r.get("agent_cpu_per_stream_us"))),
    # Loadgens from 2026-12-03 on report their own CPU over the same span.
    ("fan-out: loadgen CPU per stream, µs", "fanout", res(lambda r: r.get("loadgen_cpu_per_stream_us"))),
    ("SDS fan-out: loadgen CPU per stream, µs", "sds_fanout", res(lambda r: r.get("loadgen_cpu_per_stream_us"))),
]


def main(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    print("| scenario (median) | old | new | new/old | paired new/old | old: min–max | new: min–max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, case, get in ROWS:
        vals, spans, runs = {}, {}, {}
        for agent in ("old", "new"):
            xs = []
            for rec in recs:
                if rec["agent"] != agent or rec["case"] != case:
                    continue
                xs.append(get(rec))
            runs[agent] = xs
            xs = [x for x in xs if x is not None]
            vals[agent] = med(xs)
            spans[agent] = (min(xs), max(xs)) if len(xs) > 1 else None
        o, n = vals["old"], vals["new"]
        ratio = "—" if not o or n is None else "%.2f×" % (n / o)
        fmt = lambda v: "—" if v is None else ("%.1f" % v if v < 100 else "%.0f" % v)
        # Runs alternate (old 1, new 1, new 2, old 2, ...): run i of each side shares the machine's
        # state of that moment, so the median of the per-run ratios discounts slow drift.
        pairs = [b / a for a, b in zip(runs["old"], runs["new"]) if a and b is not None]
        paired = "%.2f×" % statistics.median(pairs) if len(pairs) > 1 else ""
        span = lambda a: "" if spans[a] is None else "%s–%s" % (fmt(spans[a][0]), fmt(spans[a][1]))
        print("| %s | %s | %s | %s | %s | %s | %s |"
              % (label, fmt(o), fmt(n), ratio, paired, span("old"), span("new")))


if __name__ == "__main__":
    main(sys.argv[1])
