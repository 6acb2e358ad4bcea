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


ROWS = [
    ("cold c=16: iterations/s", "cold", lambda r: r.get("rate_per_s")),
    ("cold c=16: p50 µs", "cold", lambda r: r.get("p50_us")),
    ("cold c=16: p99 µs", "cold", lambda r: r.get("p99_us")),
    ("cold c=1: iterations/s", "cold_c1", lambda r: r.get("rate_per_s")),
    ("warm JWT c=16: calls/s", "warm_jwt", lambda r: r.get("rate_per_s")),
    ("warm X.509 c=16: calls/s", "warm_x509", lambda r: r.get("rate_per_s")),
    ("start-up to first SVID, ms", "startup", lambda r: (r.get("result") or {}).get("first_svid_ms")),
    ("idle RSS 2 s after start, MiB", "startup", lambda r: r.get("idle_rss_kib", 0) / 1024),
    ("fan-out: spread first to last update, ms", "fanout", lambda r: r.get("first_to_last_update_ms")),
    ("fan-out: agent CPU per stream, µs", "fanout", lambda r: r.get("agent_cpu_per_stream_us")),
    ("fan-out: RSS per stream, KiB", "fanout", per_stream_kib),
]


def main(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    print("| scenario (median) | old | new | new/old |")
    print("| --- | --- | --- | --- |")
    for label, case, get in ROWS:
        vals = {}
        for agent in ("old", "new"):
            xs = []
            for rec in recs:
                if rec["agent"] != agent or rec["case"] != case:
                    continue
                body = rec if case == "startup" else rec.get("result") or {}
                xs.append(get(body))
            vals[agent] = med(xs)
        o, n = vals["old"], vals["new"]
        ratio = "—" if not o or n is None else "%.2f×" % (n / o)
        fmt = lambda v: "—" if v is None else ("%.1f" % v if v < 100 else "%.0f" % v)
        print("| %s | %s | %s | %s |" % (label, fmt(o), fmt(n), ratio))


if __name__ == "__main__":
    main(sys.argv[1])
