#!/usr/bin/env python3
"""Renders BENCHMARKS.md from the raw results of bench/compare-spire.sh (Python 3 stdlib only).

  render.py --results bench/results/<UTC>.jsonl [--analysis bench/ANALYSIS.md] [--out BENCHMARKS.md]

Every figure in a scenario table is the median, over the runs, of that figure (each column and
row separately); ratios are ratios of those medians. bench/ANALYSIS.md, when present, is copied
in verbatim. The Scale section (bench/scale.sh) comes from bench/render_scale.py, rendered from the
scale-*.jsonl files next to the results file, and the Agent mode section (bench/agent-mode.sh) from
bench/render_agent_mode.py and the newest agent-mode-*.jsonl there, and the Fleet section
(bench/fleet.sh) from bench/render_fleet.py and the newest fleet-*.jsonl, so that this renderer
keeps all three.
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render_scale  # noqa: E402  (the Scale section, from bench/scale.sh's results)
import render_agent_mode  # noqa: E402  (the Agent mode section, from bench/agent-mode.sh's results)
import render_fleet  # noqa: E402  (the Fleet section, from bench/fleet.sh's results)

AGENTS = ["spiffed", "spire-agent", "floor"]

CASES = [
    ("cold", "Cold fetches, concurrency {c}",
     "New connection per iteration: connect, attest, first FetchX509SVID message, close. "
     "Entry set A (`unix:uid`)."),
    ("cold_c1", "Cold fetches, concurrency 1",
     "As above with one worker: the latency of one cold fetch on an otherwise idle agent."),
    ("warm_jwt_uid", "Warm FetchJWTSVID, concurrency {c}, uid entry",
     "One connection per worker, FetchJWTSVID repeated (audience `spiffed-loadgen`). "
     "Entry set A (`unix:uid`)."),
    ("warm_x509_uid", "Warm FetchX509SVID (first message), concurrency {c}, uid entry",
     "One connection per worker, FetchX509SVID opened and read to its first message, repeated. "
     "Entry set A (`unix:uid`)."),
    ("warm_jwt_path", "Warm FetchJWTSVID, concurrency {c}, path + sha256 entry",
     "As the uid JWT case, with entry set B only: `unix:path` + `unix:sha256` of the loadgen "
     "binary (spire-agent runs with `discover_workload_path = true`). spire-agent hashes the "
     "caller's binary on every call; spiffed caches the digest by dev+inode+mtime+size. "
     "The loadgen binary is {size}."),
]


def load(path):
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                print("render.py: %s:%d: bad JSON (%s); skipped" % (path, n, e), file=sys.stderr)
    return recs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_num(v, digits=0):
    if v is None:
        return "–"
    if digits == 0:
        return "{:,}".format(int(round(v)))
    return "{:,.{d}f}".format(v, d=digits)


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    if r >= 10:
        return "%.1f×" % r
    if r >= 0.1:
        return "%.2f×" % r
    return "%.3f×" % r


def mib(kib):
    return None if kib is None else kib / 1024.0


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def template(cmd):
    """The command line with the temp-dir socket and the pid replaced by placeholders."""
    cmd = re.sub(r"--agent-pid \d+", "--agent-pid PID", cmd)
    cmd = re.sub(r"--socket \S+", "--socket SOCKET", cmd)
    return cmd


class Data:
    def __init__(self, recs):
        self.meta = next((r for r in recs if r.get("type") == "meta"), {})
        self.end = next((r for r in recs if r.get("type") == "end"), {})
        self.results = [r for r in recs if r.get("type") == "result"]
        self.failures = [r for r in recs if r.get("type") == "failure"]
        self.idle = [r for r in recs if r.get("type") == "idle"]
        self.startup = [r for r in recs if r.get("type") == "startup"]
        self.startup_first = [r for r in recs if r.get("type") == "startup_first"]

    def runs(self, case, agent, scenario=None):
        out = []
        for r in self.results:
            if r.get("case") != case or r.get("agent") != agent:
                continue
            res = r.get("result", {})
            if scenario and res.get("scenario") != scenario:
                continue
            out.append(res)
        return out

    def failed(self, case, agent):
        return [f for f in self.failures if f.get("case") == case and f.get("agent") == agent]

    def cmd(self, case):
        for r in self.results + self.failures:
            if r.get("case") == case:
                return r.get("cmd", "")
        return ""


def stat_block(data, case):
    """{agent: {metric: median}} for a cold/warm case."""
    out = {}
    for a in AGENTS:
        runs = [r for r in data.runs(case, a) if r.get("ok", 0) > 0]
        errs = sum(sum(r.get("errors", {}).values()) for r in data.runs(case, a))
        out[a] = {
            "n": len(runs),
            "failed": len(data.failed(case, a)),
            "rate": med([r.get("rate_per_s") for r in runs]),
            "p50": med([r.get("p50_us") for r in runs]),
            "p90": med([r.get("p90_us") for r in runs]),
            "p99": med([r.get("p99_us") for r in runs]),
            "max": med([r.get("max_us") for r in runs]),
            "ok": sum(r.get("ok", 0) for r in runs),
            "errors": errs,
            "error_kinds": sorted({k for r in data.runs(case, a) for k in r.get("errors", {})}),
        }
    return out


def render_case(data, case, title, desc):
    s = stat_block(data, case)
    if not any(s[a]["n"] or s[a]["failed"] for a in AGENTS):
        return None
    sp, sa, fl = s["spiffed"], s["spire-agent"], s["floor"]
    rows = []
    for key, label, digits in [("rate", "throughput (successful iterations/s)", 0),
                               ("p50", "p50 latency (µs)", 0), ("p90", "p90 latency (µs)", 0),
                               ("p99", "p99 latency (µs)", 0), ("max", "max latency (µs)", 0)]:
        rows.append([label] + [fmt_num(s[a][key], digits) for a in AGENTS]
                    + [fmt_ratio(sp[key], fl[key]), fmt_ratio(sp[key], sa[key])])

    def errcell(x):
        if x["errors"] == 0:
            return "0"
        return "%s (%s)" % (fmt_num(x["errors"]), ", ".join(x["error_kinds"]))

    rows.append(["failed iterations, all runs"] + [errcell(s[a]) for a in AGENTS] + ["", ""])

    def runcell(x):
        c = str(x["n"])
        if x["failed"]:
            c += " (+%d failed run%s)" % (x["failed"], "s" if x["failed"] > 1 else "")
        return c

    rows.append(["runs (medians over)"] + [runcell(s[a]) for a in AGENTS] + ["", ""])
    head = ["%s" % title, "spiffed", "spire-agent", "floor", "spiffed/floor", "spiffed/spire-agent"]
    return "### %s\n\n%s\n\n%s\n" % (title, desc, table(head, rows))


def fanout_stats(data, agent, case="fanout", scenario="fanout"):
    runs = data.runs(case, agent, scenario)
    out = {"n": len(runs), "failed": len(data.failed(case, agent)), "runs": runs}
    if not runs:
        return out

    def rss(r, k):
        return (r.get(k) or {}).get("rss_kib")

    def fds(r, k):
        return (r.get(k) or {}).get("fds")

    per_stream = []
    for r in runs:
        b = rss(r, "agent_before")
        grown = [v for v in (rss(r, "agent_ready"), rss(r, "agent_after")) if v is not None]
        if b is not None and grown and r.get("streams"):
            per_stream.append((max(grown) - b) / r["streams"])
    out.update({
        "streams": med([r.get("streams") for r in runs]),
        "connections": med([r.get("connections") for r in runs]),
        "ready": med([r.get("ready") for r in runs]),
        "updated": med([r.get("updated") for r in runs]),
        "min_updated": min(r.get("updated", 0) for r in runs),
        "all_ready_ms": med([r.get("all_ready_ms") for r in runs]),
        "spread_ms": med([r.get("first_to_last_update_ms") for r in runs]),
        "max_spread_ms": max([r.get("first_to_last_update_ms") or 0 for r in runs]),
        "ready_to_last_ms": med([r.get("all_ready_to_last_update_ms") for r in runs]),
        "timed_out": sum(1 for r in runs if r.get("timed_out")),
        # Some stream saw the rotation before every stream was open: the spread then mixes two
        # rotations or streams opened after the rotation (run invalid for the target).
        "early_rotation": sum(1 for r in runs
                              if r.get("first_to_last_update_ms") is not None
                              and r.get("all_ready_to_last_update_ms") is not None
                              and r["first_to_last_update_ms"] > r["all_ready_to_last_update_ms"] + 1e-6),
        "errors": sum(sum(r.get("errors", {}).values()) for r in runs),
        "error_kinds": sorted({k for r in runs for k in r.get("errors", {})}),
        "rss_before": med([rss(r, "agent_before") for r in runs]),
        "rss_ready": med([rss(r, "agent_ready") for r in runs]),
        "rss_after": med([rss(r, "agent_after") for r in runs]),
        "fds_before": med([fds(r, "agent_before") for r in runs]),
        "fds_ready": med([fds(r, "agent_ready") for r in runs]),
        # The largest over the runs: the first starts on a freshly restarted agent, later ones on
        # memory the allocator kept from the previous run's streams, which hides the growth.
        "per_stream_kib": max(per_stream) if per_stream else None,
    })
    return out


def render_fanout(data, case="fanout", scenario="fanout"):
    st = {a: fanout_stats(data, a, case, scenario) for a in ("spiffed", "spire-agent")}
    if not any(st[a]["n"] or st[a]["failed"] for a in st):
        return None, st
    k = data.meta.get("knobs", {})

    def g(a, key, digits=0, conv=None):
        v = st[a].get(key)
        if conv and v is not None:
            v = conv(v)
        return fmt_num(v, digits)

    rows = [
        ["streams / connections"] + ["%s / %s" % (g(a, "streams"), g(a, "connections")) for a in st],
        ["streams that got their first message (ready)"] + [g(a, "ready") for a in st],
        ["streams that got the rotation (updated)"] + [g(a, "updated") for a in st],
        ["time until every stream had its first message (ms)"] + [g(a, "all_ready_ms", 1) for a in st],
        ["**rotation spread: first to last stream updated (ms)**"] + [g(a, "spread_ms", 1) for a in st],
        ["all streams ready to last stream updated (ms; waits for the rotation to fall due)"]
        + [g(a, "ready_to_last_ms", 1) for a in st],
        ["runs where the rotation came before every stream was open (spread not meaningful)"]
        + [str(st[a].get("early_rotation", 0)) if st[a]["n"] else "–" for a in st],
        ["runs timed out / failed streams"]
        + ["%d / %s%s" % (st[a].get("timed_out", 0), fmt_num(st[a].get("errors", 0)),
                          (" (%s)" % ", ".join(st[a]["error_kinds"])) if st[a].get("error_kinds") else "")
           for a in st],
        ["agent RSS before (MiB)"] + [g(a, "rss_before", 1, mib) for a in st],
        ["agent RSS with all streams open (MiB)"] + [g(a, "rss_ready", 1, mib) for a in st],
        ["agent RSS after the rotation (MiB)"] + [g(a, "rss_after", 1, mib) for a in st],
        ["**RSS growth per stream, largest run (KiB)**"] + [g(a, "per_stream_kib", 2) for a in st],
        ["agent fds before / all open"] + ["%s / %s" % (g(a, "fds_before"), g(a, "fds_ready")) for a in st],
        ["runs (medians over)"]
        + ["%d%s" % (st[a]["n"], (" (+%d failed)" % st[a]["failed"]) if st[a]["failed"] else "") for a in st],
    ]
    if case == "sds_fanout":
        names = next((r.get("sds_names") for a in st for r in st[a].get("runs", []) if r.get("sds_names")), None)
        txt = ("### SDS fan-out: %s streams over %s connections, one rotation\n\n"
               "The same as the fan-out above, with Envoy SDS v3 `StreamSecrets` streams "
               "(`spiffed-loadgen sds-fanout`) asking for `%s`, each response acknowledged with its "
               "version and nonce as Envoy does; the second response of each stream is the rotation. The "
               "target: the rotation spread within the Workload API fan-out's budget (200 ms). Same entry, "
               "same TTL (%ss), runs alternating with the Workload API fan-out.\n\n%s\n"
               % (fmt_num(k.get("FANOUT_STREAMS")), fmt_num(k.get("FANOUT_CONNS")),
                  ",".join(names) if names else "default,ROOTCA", k.get("FANOUT_TTL"),
                  table(["SDS fan-out", "spiffed", "spire-agent"], rows)))
        return txt, st
    txt = ("### Fan-out: %s streams over %s connections, one rotation\n\n"
           "FetchX509SVID streams opened on both agents; X.509-SVID TTL %ss on the entry (spiffed: the "
           "entry's `x509_svid_ttl`; SPIRE: `entry create -x509SVIDTTL %s`), so the agent rotates at about "
           "half of it. Each run starts right after a rotation was seen (so all streams are open well "
           "before the next one) and waits for every stream's next message. The rotation spread is the "
           "figure the target is about; RSS growth per stream is (max(RSS all open, RSS after) − RSS before) "
           "/ streams, the largest over the runs (the first run starts on a freshly restarted agent; later "
           "runs reuse memory the allocator kept from the previous run, so their growth looks smaller). "
           "No floor for this scenario.\n\n%s\n"
           % (fmt_num(k.get("FANOUT_STREAMS")), fmt_num(k.get("FANOUT_CONNS")), k.get("FANOUT_TTL"),
              k.get("FANOUT_TTL"), table(["fan-out", "spiffed", "spire-agent"], rows)))
    return txt, st


def slope_per_min(points):
    """Least-squares slope of (t_s, v) points, in v per minute."""
    pts = [(t, v) for t, v in points if t is not None and v is not None]
    if len(pts) < 2:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in pts) / den


def churn_stats(data, agent):
    rep = data.runs("churn", agent, "churn")
    samples = sorted(data.runs("churn", agent, "churn_sample"), key=lambda s: s.get("t_s", 0))
    out = {"report": rep[-1] if rep else None, "failed": len(data.failed("churn", agent)),
           "samples": len(samples)}
    if len(samples) >= 4:
        n = len(samples)
        q1, q2, q3 = n // 4, n // 2, (3 * n) // 4
        warm = samples[q1:q2]   # 25%..50%: after warm-up
        last = samples[q3:]     # 75%..100%: the end
        post = samples[q1:]     # everything after warm-up
        out.update({
            "rss_warm": med([s.get("rss_kib") for s in warm]),
            "rss_end": med([s.get("rss_kib") for s in last]),
            "fds_warm": med([s.get("fds") for s in warm]),
            "fds_end": med([s.get("fds") for s in last]),
            "rss_slope": slope_per_min([(s.get("t_s"), s.get("rss_kib")) for s in post]),
            "fds_slope": slope_per_min([(s.get("t_s"), s.get("fds")) for s in post]),
            "t_warm": samples[q1].get("t_s"),
        })
        rg = out["rss_end"] - out["rss_warm"] if None not in (out["rss_end"], out["rss_warm"]) else None
        fg = out["fds_end"] - out["fds_warm"] if None not in (out["fds_end"], out["fds_warm"]) else None
        out["rss_growth"], out["fds_growth"] = rg, fg
        out["rss_flat"] = rg is not None and rg <= max(512, 0.02 * out["rss_warm"])
        out["fds_flat"] = fg is not None and fg <= max(10, 0.10 * out["fds_warm"])
    return out


def render_churn(data):
    st = {a: churn_stats(data, a) for a in ("spiffed", "spire-agent")}
    if not any(st[a]["report"] or st[a]["failed"] for a in st):
        return None, st
    k = data.meta.get("knobs", {})

    def rep(a, key, digits=0):
        r = st[a]["report"]
        return fmt_num(r.get(key), digits) if r else "failed"

    def agentv(a, which, key, conv=None, digits=0):
        r = st[a]["report"]
        if not r:
            return "–"
        v = (r.get(which) or {}).get(key)
        return fmt_num(conv(v) if (conv and v is not None) else v, digits)

    def v(a, key, conv=None, digits=1):
        x = st[a].get(key)
        return fmt_num(conv(x) if (conv and x is not None) else x, digits)

    def errs(a):
        r = st[a]["report"]
        if not r:
            return "–"
        e = r.get("errors", {})
        tot = sum(e.values())
        return "0" if not tot else "%s (%s)" % (fmt_num(tot), ", ".join("%s %s" % (kk, fmt_num(vv)) for kk, vv in sorted(e.items())))

    def yes(b):
        return "–" if b is None else ("flat" if b else "**grows**")

    rows = [
        ["achieved rate (/s)"] + [rep(a, "rate_per_s", 1) for a in st],
        ["successful iterations"] + [rep(a, "ok") for a in st],
        ["failed iterations"] + [errs(a) for a in st],
        ["p50 / p99 latency (µs)"] + ["%s / %s" % (rep(a, "p50_us"), rep(a, "p99_us")) for a in st],
        ["RSS at the start (MiB)"] + [agentv(a, "agent_start", "rss_kib", mib, 1) for a in st],
        ["RSS after warm-up, median of 25–50 %% of the run (MiB)"] + [v(a, "rss_warm", mib, 2) for a in st],
        ["RSS at the end, median of 75–100 %% (MiB)"] + [v(a, "rss_end", mib, 2) for a in st],
        ["RSS growth end − warm-up (KiB)"] + [v(a, "rss_growth", None, 0) for a in st],
        ["RSS slope after warm-up (KiB/min, least squares)"] + [v(a, "rss_slope", None, 1) for a in st],
        ["RSS max (MiB)"] + ["%s" % fmt_num(mib(st[a]["report"].get("agent_max_rss_kib")) if st[a]["report"] and st[a]["report"].get("agent_max_rss_kib") is not None else None, 1) for a in st],
        ["fds after warm-up / at the end / max"]
        + ["%s / %s / %s" % (v(a, "fds_warm", None, 0), v(a, "fds_end", None, 0),
                             rep(a, "agent_max_fds") if st[a]["report"] else "–") for a in st],
        ["fd slope after warm-up (per min)"] + [v(a, "fds_slope", None, 2) for a in st],
        ["verdict (RSS, fds)"] + ["%s, %s" % (yes(st[a].get("rss_flat")), yes(st[a].get("fds_flat"))) for a in st],
        ["samples (1/s)"] + [str(st[a]["samples"]) for a in st],
    ]
    rows = [[r[0].replace("%%", "%")] + r[1:] for r in rows]
    spire_secs = k.get("SPIRE_CHURN_SECONDS", k.get("CHURN_SECONDS"))
    spire_note = ("" if spire_secs == k.get("CHURN_SECONDS") else
                  "spire-agent's run was %s s long (the churn target is spiffed's). "
                  % fmt_num(spire_secs))
    txt = ("### Churn: %s cold fetches/s for %s s\n\n"
           "%sOne run per agent (entry set A). The loadgen samples the agent's RSS and open descriptors every "
           "second. The first quarter of the run is warm-up. *Flat* means the median over the last quarter "
           "exceeds the median over the second quarter by at most max(512 KiB, 2 %%) for RSS and max(10, "
           "10 %%) for descriptors (descriptors include the connections in flight).\n\n%s\n"
           % (fmt_num(k.get("CHURN_RATE")), fmt_num(k.get("CHURN_SECONDS")), spire_note,
              table(["churn", "spiffed", "spire-agent"], rows)))
    return txt, st


def idle_stats(data):
    out = {}
    for a in ("spiffed", "spire-agent", "spire-server", "floor"):
        recs = [r for r in data.idle if r.get("agent") == a]
        out[a] = {"rss": med([r.get("rss_kib") for r in recs]), "fds": med([r.get("fds") for r in recs]),
                  "n": len(recs)}
    return out


def startup_stats(data):
    out = {}
    for a in ("spiffed", "spire-agent"):
        vals = [r["result"].get("first_svid_ms") for r in data.startup
                if r.get("agent") == a and r.get("result", {}).get("ok")]
        out[a] = {"median": med(vals), "vals": vals}
    first = [r["result"].get("first_svid_ms") for r in data.startup_first if r.get("result", {}).get("ok")]
    out["spiffed_first"] = first[0] if first else None
    return out


def render_idle_startup(data):
    idle = idle_stats(data)
    su = startup_stats(data)
    spire_total = None
    if idle["spire-agent"]["rss"] is not None and idle["spire-server"]["rss"] is not None:
        spire_total = idle["spire-agent"]["rss"] + idle["spire-server"]["rss"]
    rows = [
        ["idle RSS (MiB)", fmt_num(mib(idle["spiffed"]["rss"]), 1), fmt_num(mib(idle["spire-agent"]["rss"]), 1),
         fmt_num(mib(idle["spire-server"]["rss"]), 1), fmt_num(mib(spire_total), 1),
         fmt_num(mib(idle["floor"]["rss"]), 1)],
        ["idle open fds", fmt_num(idle["spiffed"]["fds"]), fmt_num(idle["spire-agent"]["fds"]),
         fmt_num(idle["spire-server"]["fds"]), "", fmt_num(idle["floor"]["fds"])],
        ["samples (medians over)", str(idle["spiffed"]["n"]), str(idle["spire-agent"]["n"]),
         str(idle["spire-server"]["n"]), "", str(idle["floor"]["n"])],
    ]
    t1 = table(["idle", "spiffed", "spire-agent", "spire-server", "spire-agent + spire-server", "floor"], rows)
    rows2 = [
        ["first SVID after spawn, median (ms)", fmt_num(su["spiffed"]["median"], 1),
         fmt_num(su["spire-agent"]["median"], 1), fmt_ratio(su["spiffed"]["median"], su["spire-agent"]["median"])],
        ["each run (ms)", ", ".join(fmt_num(v, 1) for v in su["spiffed"]["vals"]) or "–",
         ", ".join(fmt_num(v, 1) for v in su["spire-agent"]["vals"]) or "–", ""],
        ["spiffed's very first start (creates the CA), for reference (ms)", fmt_num(su["spiffed_first"], 1), "", ""],
    ]
    t2 = table(["start-up with existing state", "spiffed", "spire-agent", "spiffed/spire-agent"], rows2)
    txt = ("### Idle RSS\n\n`VmRSS` from `/proc/PID/status`, sampled 2 s after each restart of the start-up "
           "scenario below (the start-up probe had fetched one SVID and disconnected; no client connected). "
           "spire-agent needs spire-server, whose RSS is shown separately.\n\n%s\n\n"
           "### Start-up with existing state to the first served SVID\n\n"
           "The agent is restarted on its data dir from a previous start (spiffed: existing CA and store; "
           "spire-agent: its SVID and key (`KeyManager \"disk\"`) with spire-server still up). The clock starts "
           "right before the agent's `exec` (`bench/wlapi.py startup`), and a raw Workload API probe connects "
           "every 1 ms until a FetchX509SVID response message arrives.\n\n%s\n" % (t1, t2))
    return txt, idle, su


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


def render_targets(data, fan, churn, idle, su, sds_fan=None):
    cold = stat_block(data, "cold")
    c1 = stat_block(data, "cold_c1")
    jwt = stat_block(data, "warm_jwt_uid")
    jwtp = stat_block(data, "warm_jwt_path")
    rows = []

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    r = ratio(cold["spiffed"]["rate"], cold["floor"]["rate"])
    rows.append(["cold fetches/s at concurrency 16 ≥ 80 % of the floor",
                 "—" if r is None else "%.0f %% (%s vs %s /s)" % (100 * r, fmt_num(cold["spiffed"]["rate"]), fmt_num(cold["floor"]["rate"])),
                 verdict(None if r is None else r >= 0.8)])
    r = ratio(cold["spiffed"]["rate"], cold["spire-agent"]["rate"])
    rows.append(["cold fetches/s at concurrency 16 ≥ 5× spire-agent",
                 "—" if r is None else "%.2f× (%s vs %s /s)" % (r, fmt_num(cold["spiffed"]["rate"]), fmt_num(cold["spire-agent"]["rate"])),
                 verdict(None if r is None else r >= 5)])
    p = c1["spiffed"]["p50"]
    rows.append(["cold p50 at concurrency 1 ≤ 250 µs", "—" if p is None else "%s µs" % fmt_num(p),
                 verdict(None if p is None else p <= 250)])
    r = ratio(jwt["spiffed"]["rate"], jwt["floor"]["rate"])
    rows.append(["warm FetchJWTSVID/s at concurrency 16 ≥ 80 % of the floor (uid entry)",
                 "—" if r is None else "%.0f %% (%s vs %s /s)" % (100 * r, fmt_num(jwt["spiffed"]["rate"]), fmt_num(jwt["floor"]["rate"])),
                 verdict(None if r is None else r >= 0.8)])
    r = ratio(jwtp["spiffed"]["rate"], jwtp["floor"]["rate"])
    rows.append(["warm FetchJWTSVID/s at concurrency 16, path + sha256 entry: report",
                 "—" if r is None else "%s /s = %.0f %% of the floor; spire-agent %s /s" % (
                     fmt_num(jwtp["spiffed"]["rate"]), 100 * r, fmt_num(jwtp["spire-agent"]["rate"])),
                 "reported"])
    f = fan.get("spiffed", {})
    k = data.meta.get("knobs", {})
    if f.get("n"):
        all_upd = f.get("min_updated") == f.get("streams") and not f.get("timed_out")
        spread = f.get("max_spread_ms")
        ok = all_upd and spread is not None and spread <= 200 and not f.get("early_rotation")
        rows.append(["fan-out: %s streams on %s connections all receive a rotation within 200 ms"
                     % (fmt_num(f.get("streams")), fmt_num(f.get("connections"))),
                     "%s of %s updated (worst run); spread first→last %s ms (median), %s ms (worst run)"
                     % (fmt_num(f.get("min_updated")), fmt_num(f.get("streams")), fmt_num(f.get("spread_ms"), 1),
                        fmt_num(spread, 1)),
                     verdict(ok) + ("" if k.get("FANOUT_STREAMS") == 10000 else " (at %s streams, not 10,000)" % fmt_num(k.get("FANOUT_STREAMS")))])
        ps = f.get("per_stream_kib")
        rows.append(["fan-out: agent RSS grows ≤ 10 KiB per stream", "—" if ps is None else "%.2f KiB" % ps,
                     verdict(None if ps is None else ps <= 10)])
    else:
        rows.append(["fan-out: all streams receive a rotation within 200 ms", "—", verdict(None)])
        rows.append(["fan-out: agent RSS grows ≤ 10 KiB per stream", "—", verdict(None)])
    sf = (sds_fan or {}).get("spiffed", {})
    if sf.get("n"):
        all_upd = sf.get("min_updated") == sf.get("streams") and not sf.get("timed_out")
        spread = sf.get("max_spread_ms")
        ok = all_upd and spread is not None and spread <= 200 and not sf.get("early_rotation")
        theirs = (sds_fan or {}).get("spire-agent", {})
        rows.append(["SDS fan-out: %s StreamSecrets streams on %s connections all receive a rotation "
                     "within the Workload API fan-out's 200 ms"
                     % (fmt_num(sf.get("streams")), fmt_num(sf.get("connections"))),
                     "%s of %s updated (worst run); spread first→last %s ms (median), %s ms (worst run); "
                     "spire-agent %s ms (median)"
                     % (fmt_num(sf.get("min_updated")), fmt_num(sf.get("streams")), fmt_num(sf.get("spread_ms"), 1),
                        fmt_num(spread, 1), fmt_num(theirs.get("spread_ms"), 1)),
                     verdict(ok) + ("" if k.get("FANOUT_STREAMS") == 10000 else " (at %s streams, not 10,000)" % fmt_num(k.get("FANOUT_STREAMS")))])
    elif sds_fan is not None:
        rows.append(["SDS fan-out: all StreamSecrets streams receive a rotation within 200 ms", "—"
                     + (" (%d failed run(s))" % sf.get("failed") if sf.get("failed") else ""), verdict(None)])
    ir = idle["spiffed"]["rss"]
    rows.append(["idle RSS ≤ 10 MiB", "—" if ir is None else "%.1f MiB" % mib(ir), verdict(None if ir is None else ir <= 10240)])
    sm = su["spiffed"]["median"]
    rows.append(["start-up with an existing CA to the first served SVID ≤ 100 ms",
                 "—" if sm is None else "%.1f ms (median)" % sm, verdict(None if sm is None else sm <= 100)])
    c = churn.get("spiffed", {})
    if c.get("report") and c.get("rss_flat") is not None:
        rows.append(["churn: %s connections/s for %s s, RSS and fd count flat after warm-up"
                     % (fmt_num(k.get("CHURN_RATE")), fmt_num(k.get("CHURN_SECONDS"))),
                     "RSS %+d KiB (slope %.1f KiB/min), fds %+d (slope %.2f/min); achieved %s /s"
                     % (c["rss_growth"], c["rss_slope"] or 0, c["fds_growth"], c["fds_slope"] or 0,
                        fmt_num(c["report"].get("rate_per_s"), 1)),
                     verdict(c["rss_flat"] and c["fds_flat"]) + ("" if k.get("CHURN_SECONDS") >= 600 else " (short run, not 10 min)")])
    else:
        rows.append(["churn: RSS and fd count flat", "—", verdict(None)])
    return "## Targets (spiffed)\n\n%s\n" % table(["target", "measured", "verdict"], rows)


def render(data, analysis_text, results_path, root):
    m = data.meta
    mach = m.get("machine", {})
    ver = m.get("versions", {})
    k = m.get("knobs", {})
    out = ["# Benchmarks: spiffed side by side with SPIRE's agent", ""]
    out.append("Generated by `bench/compare-spire.sh` on %s UTC (raw data: `%s`). Do not edit by hand: "
               "the analysis section comes from `bench/ANALYSIS.md`."
               % (m.get("utc", "?"), os.path.relpath(results_path, root) if root else results_path))
    if k.get("QUICK") == "1":
        out += ["", "> **QUICK mode**: 1 short run per case, small fan-out, 10 s churn. The figures show the "
                "script works; they are not the benchmark."]
    out += ["", "## Machine and versions", ""]
    out.append(table(["", ""], [
        ["CPUs (`nproc`)", mach.get("nproc")],
        ["CPU model", mach.get("cpu")],
        ["kernel (`uname -r`)", mach.get("kernel")],
        ["memory", "%.1f GiB" % (mach.get("mem_kib", 0) / 1048576.0) if mach.get("mem_kib") else "?"],
        ["spiffed", "`%s`%s" % (ver.get("spiffed_commit"), " (working tree dirty)" if ver.get("spiffed_dirty") else "")],
        ["rustc", ver.get("rustc")],
        ["SPIRE", "%s (spire-server and spire-agent built from the Go module; `--version`: `%s`)"
         % (ver.get("spire"), ver.get("spire_agent_version"))],
        ["go", ver.get("go")],
        ["python (probe, renderer)", ver.get("python")],
    ]))
    out += ["", "All processes (agents, spire-server, the floor and the load generator) share the machine; "
            "the loadgen runs as uid %s, the uid in the entries." % m.get("uid", "?")]
    out += ["", "## How it was run", "", "```", "%s" % m.get("invocation", "bench/compare-spire.sh"), "```", ""]
    out.append("Knobs: " + ", ".join("`%s=%s`" % (kk, vv) for kk, vv in k.items()) + ".")
    out += ["", "Load generator command lines (`SOCKET` is the agent's or the floor's socket in the temp "
            "dir, `PID` the agent's pid):", "", "```"]
    for case, _, _ in CASES + [("fanout", "", ""), ("sds_fanout", "", ""), ("churn", "", "")]:
        c = data.cmd(case)
        if c:
            out.append("%-14s %s" % (case, template(c)))
    out += ["```", ""]
    out += ["Set-up, all in one temp dir on Unix sockets and loopback:", "",
            "- **spire-server** %s: `DataStore \"sql\"` (sqlite3), `KeyManager \"memory\"`, `NodeAttestor "
            "\"join_token\"`, trust domain `example.org`, `default_x509_svid_ttl = \"1h\"`." % ver.get("spire", ""),
            "- **spire-agent**: `join_token` (one token, `insecure_bootstrap = true`), `KeyManager \"disk\"` (so "
            "that it can restart on its data dir), `WorkloadAttestor \"unix\"` with `discover_workload_path = "
            "false` for the uid entry and `true` for the path + sha256 entry; default sync interval. Entries "
            "are made with `spire-server entry create -parentID <agent> -spiffeID ... -selector ...`.",
            "- **spiffed**: `spiffed run --config spiffed.toml` with the same entries in `[[entries]]`, "
            "`log_level = \"%s\"` (spire: `%s`)." % (k.get("LOG_LEVEL", "info"), str(k.get("LOG_LEVEL", "info")).upper()),
            "- **floor**: `spiffed-loadgen floor`, a Workload API server that answers from constants without "
            "attestation: the cost of the client, the transport and gRPC, the ceiling for any agent.",
            "- Entry set A: `unix:uid:%s` → `spiffe://example.org/bench/uid`. Set B: `unix:path:<loadgen>` + "
            "`unix:sha256:<its digest>` → `spiffe://example.org/bench/path`, alone on both agents." % m.get("uid", "?"),
            "- Runs alternate: spiffed run 1, spire-agent run 1, floor run 1, spiffed run 2, …",
            ""]
    out += ["## Results", ""]
    for case, title, desc in CASES:
        size = m.get("loadgen_size_bytes")
        desc = desc.format(size="%.1f MB" % (size / 1e6) if size else "of unknown size")
        t = render_case(data, case, title.format(c=k.get("CONCURRENCY", 16)), desc)
        if t:
            out += [t]
    fan_txt, fan = render_fanout(data)
    if fan_txt:
        out += [fan_txt]
    sds_txt, sds_fan = render_fanout(data, "sds_fanout", "sds_fanout")
    if sds_txt:
        out += [sds_txt]
    else:
        sds_fan = None
    churn_txt, churn = render_churn(data)
    if churn_txt:
        out += [churn_txt]
    is_txt, idle, su = render_idle_startup(data)
    out += [is_txt]
    if data.failures:
        out += ["### Failed runs", ""]
        out.append(table(["agent", "case", "run", "exit", "last stderr lines"], [
            [f.get("agent"), f.get("case"), f.get("run"), f.get("rc"),
             (f.get("stderr") or "").replace("\n", " ⏎ ").replace("|", "\\|")[:300]] for f in data.failures]))
        out.append("")
    out += [render_targets(data, fan, churn, idle, su, sds_fan)]
    # bench/scale.sh's section, from its newest results next to ours (kept across compare runs).
    scale = render_scale.section(os.path.dirname(os.path.abspath(results_path)), root)
    if scale:
        out += [scale]
    # bench/agent-mode.sh's section, likewise.
    agent_mode = render_agent_mode.section_from_dir(os.path.dirname(os.path.abspath(results_path)), root)
    if agent_mode:
        out += [agent_mode]
    # bench/fleet.sh's section, likewise.
    fleet = render_fleet.section_from_dir(os.path.dirname(os.path.abspath(results_path)), root)
    if fleet:
        out += [fleet]
    if analysis_text is not None:
        out += ["", analysis_text.rstrip("\n"), ""]
    if data.end.get("elapsed_s") is not None:
        out += ["", "<sub>Whole script, builds included: %s s.</sub>" % data.end["elapsed_s"], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True)
    p.add_argument("--analysis")
    p.add_argument("--out", default="-")
    p.add_argument("--root", help="repo root, to print the results path relative to it")
    a = p.parse_args()
    data = Data(load(a.results))
    analysis = None
    if a.analysis and os.path.exists(a.analysis):
        with open(a.analysis) as f:
            analysis = f.read()
    text = render(data, analysis, a.results, a.root)
    if a.out == "-":
        sys.stdout.write(text)
    else:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
