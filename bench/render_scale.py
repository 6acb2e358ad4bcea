#!/usr/bin/env python3
"""Renders the "Scale" section of BENCHMARKS.md from bench/scale.sh's results (stdlib only).

  render_scale.py --results-dir bench/results --splice BENCHMARKS.md   replace the marked section
  render_scale.py --results-dir bench/results [--out FILE|-]            print the section
  render_scale.py --results-dir bench/results --summary                 a few lines for the log

Inputs: the newest bench/results/scale-before-*.jsonl (the "before" figures, kept on purpose) and
the newest other bench/results/scale-*.jsonl ("now"). With only one of them, one column.
The section sits between SCALE_BEGIN and SCALE_END; bench/render.py (compare-spire.sh's renderer)
calls section() too, so a compare-spire run keeps the section and a scale run keeps the rest.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

SCALE_BEGIN = "<!-- scale:begin (bench/scale.sh + bench/render_scale.py) -->"
SCALE_END = "<!-- scale:end -->"

# What the issue reports for today's code where the script measures no "before" of its own.
REPORTED_RSS_PER_STREAM_KIB = 5.4


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
                print("render_scale.py: %s:%d: bad JSON (%s); skipped" % (path, n, e), file=sys.stderr)
    return recs


def newest(paths):
    # File names end in <UTC>.jsonl: the stamp orders them.
    def stamp(p):
        m = re.search(r"(\d{8}T\d{6}Z)\.jsonl$", p)
        return m.group(1) if m else ""
    return max(paths, key=stamp) if paths else None


def find_files(results_dir):
    allf = glob.glob(os.path.join(results_dir, "scale-*.jsonl"))
    before = [p for p in allf if os.path.basename(p).startswith("scale-before-")]
    now = [p for p in allf if p not in before]
    return newest(before), newest(now)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pct(values, p):
    """Nearest-rank percentile."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    k = max(0, min(len(values) - 1, int(-(-p * len(values) // 100)) - 1))
    return values[k]


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if digits == 0:
        s = "{:,}".format(int(round(v)))
    else:
        s = "{:,.{d}f}".format(v, d=digits)
    return s + unit


def template(cmd):
    cmd = re.sub(r"--agent-pid \d+", "--agent-pid PID", cmd)
    cmd = re.sub(r"--socket \S+", "--socket SOCKET", cmd)
    cmd = re.sub(r"--admin-socket \S+", "--admin-socket ADMIN_SOCKET", cmd)
    return cmd


class Run:
    """The figures of one scale results file."""

    def __init__(self, path):
        self.path = path
        recs = load(path)
        self.meta = next((r for r in recs if r.get("type") == "meta"), {})
        self.knobs = self.meta.get("knobs", {})
        self.end = next((r for r in recs if r.get("type") == "end"), {})
        self.populate = next((r for r in recs if r.get("type") == "populate"), {})
        self.batches = [r for r in recs if r.get("type") == "populate_batch"]
        self.startups = [r for r in recs if r.get("type") == "startup"]
        self.series = [r for r in recs if r.get("type") == "rss_series"]
        self.singles = [r for r in recs if r.get("type") == "single_create"]
        self.results = [r for r in recs if r.get("type") == "result"]
        self.failures = [r for r in recs if r.get("type") == "failure"]
        self.m = self.compute()

    def case(self, name):
        return [r.get("result", {}) for r in self.results if r.get("case") == name]

    def cmd(self, name):
        for r in self.results + self.failures:
            if r.get("case") == name:
                return template(r.get("cmd", ""))
        return ""

    def compute(self):
        m = {}
        m["entries"] = self.populate.get("registered")
        m["requested"] = self.populate.get("requested")
        m["stopped"] = self.populate.get("stopped_by_budget")
        m["populate_s"] = self.populate.get("seconds")
        bs = [b.get("seconds") for b in self.batches]
        m["batch_first_s"] = bs[0] if bs else None
        m["batch_last_s"] = bs[-1] if bs else None
        m["batch_mid_s"] = bs[len(bs) // 2] if bs else None
        m["batches"] = len(bs)
        # 1. one more create
        us = [s.get("us") for s in self.singles]
        m["cli_p50_ms"] = None if not us else pct(us, 50) / 1000.0
        m["cli_p90_ms"] = None if not us else pct(us, 90) / 1000.0
        m["cli_n"] = len(us)
        ac = self.case("admin_create")
        if ac:
            a = ac[-1]
            m["rpc_p50_ms"] = a.get("rpc", {}).get("p50_us", 0) / 1000.0 if a.get("ok") else None
            m["rpc_p90_ms"] = a.get("rpc", {}).get("p90_us", 0) / 1000.0 if a.get("ok") else None
            m["rpc_conn_p50_ms"] = a.get("with_connect", {}).get("p50_us", 0) / 1000.0 if a.get("ok") else None
            m["rpc_n"] = a.get("ok")
        # 2. RSS
        settle = self.knobs.get("RSS_SETTLE", 5)
        at_settle, at_end, peak = [], [], []
        for s in self.series:
            samples = s.get("samples", [])
            if not samples:
                continue
            v = next((x.get("rss_kib") for x in samples if x.get("t_s") == settle), None)
            at_settle.append(v)
            at_end.append(samples[-1].get("rss_kib"))
            peak.append(max((x.get("rss_kib") or 0) for x in samples))
        m["rss_settle_mib"] = None if med(at_settle) is None else med(at_settle) / 1024.0
        m["rss_end_mib"] = None if med(at_end) is None else med(at_end) / 1024.0
        m["rss_peak_mib"] = None if not peak else max(peak) / 1024.0
        m["rss_settle_s"] = settle
        m["rss_end_s"] = self.knobs.get("RSS_WATCH")
        # CPU the agent spent after each restart, over the watch window (pre-minting shows here).
        cpu = []
        for s in self.series:
            samples = s.get("samples", [])
            if len(samples) >= 2 and samples[0].get("cpu_ms") is not None:
                cpu.append(samples[-1].get("cpu_ms"))
        m["restart_cpu_s"] = None if med(cpu) is None else med(cpu) / 1000.0
        # 3. start-up
        vals = [r.get("result", {}).get("first_svid_ms") for r in self.startups if r.get("result", {}).get("ok")]
        m["startup_ms"] = med(vals)
        m["startup_each"] = vals
        # 4. first fetch
        ff = self.case("first_fetch")
        if ff:
            f = ff[-1]
            m["ff"] = f
            m["ff_ok"] = f.get("ok")
            m["ff_samples"] = f.get("samples")
            for k in ("p50_us", "p90_us", "p99_us", "max_us"):
                m["ff_" + k] = f.get(k) if f.get("ok") else None
            m["ff_preminted"] = f.get("preminted")
            m["ff_fresh"] = f.get("minted_for_call")
            m["ff_errors"] = sum(f.get("errors", {}).values())
        # 5. partial rotation
        base = [r for r in self.case("partial_rotation_base") if r.get("scenario") == "partial_rotation"]
        loaded = [r for r in self.case("partial_rotation_loaded") if r.get("scenario") == "partial_rotation"]
        m["pr_base_ms"] = med([r.get("cpu_per_rotation_ms") for r in base])
        m["pr_loaded_ms"] = med([r.get("cpu_per_rotation_ms") for r in loaded])
        m["pr_base_each"] = [r.get("cpu_per_rotation_ms") for r in base]
        m["pr_loaded_each"] = [r.get("cpu_per_rotation_ms") for r in loaded]
        m["pr_rotations"] = med([r.get("rotations") for r in base + loaded])
        m["pr_idle_updates"] = max([r.get("idle_updates", 0) for r in loaded], default=None)
        m["pr_idle_ready"] = med([r.get("idle_ready") for r in loaded])
        m["pr_rot_ready"] = med([r.get("rotating_ready") for r in base + loaded])
        m["pr_failed"] = sum(r.get("failed", 0) for r in base + loaded)
        if m["pr_base_ms"] and m["pr_loaded_ms"] is not None:
            m["pr_ratio"] = m["pr_loaded_ms"] / m["pr_base_ms"]
        else:
            m["pr_ratio"] = None
        # 6. fan-out
        fo = [r for r in self.case("fanout") if r.get("scenario") == "fanout"]
        m["fo_n"] = len(fo)
        if fo:
            m["fo_streams"] = med([r.get("streams") for r in fo])
            m["fo_conns"] = med([r.get("connections") for r in fo])
            m["fo_min_updated"] = min(r.get("updated", 0) for r in fo)
            m["fo_timed_out"] = sum(1 for r in fo if r.get("timed_out"))
            spreads = [r.get("first_to_last_update_ms") for r in fo]
            m["fo_spread_ms"] = med(spreads)
            m["fo_spread_worst_ms"] = max([s for s in spreads if s is not None], default=None)
            m["fo_early"] = sum(1 for r in fo
                                if r.get("first_to_last_update_ms") is not None
                                and r.get("all_ready_to_last_update_ms") is not None
                                and r["first_to_last_update_ms"] > r["all_ready_to_last_update_ms"] + 1e-6)
            m["fo_cpu_us"] = med([r.get("agent_cpu_per_stream_us") for r in fo])
            per = []
            for r in fo:
                b = (r.get("agent_before") or {}).get("rss_kib")
                grown = [v for v in ((r.get("agent_ready") or {}).get("rss_kib"),
                                     (r.get("agent_after") or {}).get("rss_kib")) if v is not None]
                if b is not None and grown and r.get("streams"):
                    per.append((max(grown) - b) / r["streams"])
            # The largest over the runs: later runs reuse memory kept from earlier ones.
            m["fo_rss_kib"] = max(per) if per else None
            m["fo_ready_ms"] = med([r.get("all_ready_ms") for r in fo])
            m["fo_errors"] = sum(sum(r.get("errors", {}).values()) for r in fo)
        return m


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


def le(v, limit):
    return None if v is None else v <= limit


def targets(run, before):
    """[(target text, cell(run), verdict on run)]: the rows of the targets table."""
    rows = []

    def cell(r, f):
        return "–" if r is None else f(r.m)

    def entries_note(mm):
        e, q = mm.get("entries"), mm.get("requested")
        return "" if e == q else " (at %s entries, not %s)" % (fmt(e), fmt(q))

    rows.append((
        "1. one more `spiffed entry create` with the entries registered: ≤ 10 ms p50",
        lambda mm: "CLI call p50 %s, p90 %s (%s calls); CreateEntries RPC alone p50 %s, p90 %s; with connect p50 %s%s"
        % (fmt(mm.get("cli_p50_ms"), 1, " ms"), fmt(mm.get("cli_p90_ms"), 1, " ms"), mm.get("cli_n", 0),
           fmt(mm.get("rpc_p50_ms"), 2, " ms"), fmt(mm.get("rpc_p90_ms"), 2, " ms"),
           fmt(mm.get("rpc_conn_p50_ms"), 2, " ms"), entries_note(mm)),
        lambda mm: le(mm.get("cli_p50_ms"), 10),
    ))
    rows.append((
        "2. agent RSS after a restart, no workload connected: ≤ 64 MiB",
        lambda mm: "%s after %ss, %s after %ss (medians over restarts); peak %s; agent CPU in those %ss: %s%s"
        % (fmt(mm.get("rss_settle_mib"), 1, " MiB"), mm.get("rss_settle_s"), fmt(mm.get("rss_end_mib"), 1, " MiB"),
           mm.get("rss_end_s"), fmt(mm.get("rss_peak_mib"), 1, " MiB"), mm.get("rss_end_s"),
           fmt(mm.get("restart_cpu_s"), 2, " s"), entries_note(mm)),
        lambda mm: None if mm.get("rss_settle_mib") is None else (mm["rss_settle_mib"] <= 64 and (mm.get("rss_end_mib") or 0) <= 64),
    ))
    rows.append((
        "3. restart to the first served SVID: ≤ 1 s",
        lambda mm: "%s median (%s)%s" % (fmt(mm.get("startup_ms"), 1, " ms"),
                                         ", ".join(fmt(v, 1) for v in mm.get("startup_each", [])) or "–",
                                         entries_note(mm)),
        lambda mm: le(mm.get("startup_ms"), 1000),
    ))
    rows.append((
        "4. first SVID of a never-fetched entry: ≤ 2 ms p99",
        lambda mm: "p50 %s, p90 %s, **p99 %s**, max %s µs; %s of %s children served; SVIDs pre-minted by the agent: %s, minted for the call: %s"
        % (fmt(mm.get("ff_p50_us")), fmt(mm.get("ff_p90_us")), fmt(mm.get("ff_p99_us")), fmt(mm.get("ff_max_us")),
           fmt(mm.get("ff_ok")), fmt(mm.get("ff_samples")), fmt(mm.get("ff_preminted")), fmt(mm.get("ff_fresh"))),
        lambda mm: None if mm.get("ff_p99_us") is None else (mm["ff_p99_us"] <= 2000 and not mm.get("ff_errors")),
    ))
    rows.append((
        "5. agent CPU per rotation of %s streams with %s idle streams open: within 3× of the run without them"
        % (fmt(run.knobs.get("PR_ROTATING")), fmt(run.knobs.get("PR_IDLE"))),
        lambda mm: "%s ms/rotation loaded vs %s ms/rotation alone = **%s×** (medians; about %s rotations per run; idle streams got %s messages)"
        % (fmt(mm.get("pr_loaded_ms"), 3), fmt(mm.get("pr_base_ms"), 3),
           fmt(mm.get("pr_ratio"), 2), fmt(mm.get("pr_rotations"), 1), fmt(mm.get("pr_idle_updates"))),
        lambda mm: le(mm.get("pr_ratio"), 3),
    ))
    rows.append((
        "6a. fan-out %s streams on %s connections, one rotation: spread ≤ 1 s"
        % (fmt(run.knobs.get("FANOUT_STREAMS")), fmt(run.knobs.get("FANOUT_CONNS"))),
        lambda mm: "%s ms median, %s ms worst run; %s of %s streams updated (worst run)%s"
        % (fmt(mm.get("fo_spread_ms"), 1), fmt(mm.get("fo_spread_worst_ms"), 1), fmt(mm.get("fo_min_updated")),
           fmt(mm.get("fo_streams")), " (rotation came before all streams were open in %d run(s))" % mm["fo_early"] if mm.get("fo_early") else ""),
        lambda mm: None if not mm.get("fo_n") else (
            (mm.get("fo_spread_worst_ms") or 1e18) <= 1000 and mm.get("fo_min_updated") == mm.get("fo_streams")
            and not mm.get("fo_timed_out") and not mm.get("fo_early")),
    ))
    rows.append((
        "6b. fan-out: agent CPU per stream for the rotation ≤ 5 µs",
        lambda mm: "%s µs (median)" % fmt(mm.get("fo_cpu_us"), 2),
        lambda mm: le(mm.get("fo_cpu_us"), 5),
    ))
    rss_limit = REPORTED_RSS_PER_STREAM_KIB
    rss_src = "the issue's reported %.1f KB" % rss_limit
    if before is not None and before is not run and before.m.get("fo_rss_kib") is not None:
        rss_limit = before.m["fo_rss_kib"]
        rss_src = "the before run's %.2f KiB" % rss_limit
    rows.append((
        "6c. fan-out: agent RSS per open stream no worse than before (%s)" % rss_src,
        lambda mm: "%s KiB (largest run)" % fmt(mm.get("fo_rss_kib"), 2),
        lambda mm: le(mm.get("fo_rss_kib"), rss_limit + 1e-9),
    ))
    return rows


def section(results_dir, root=None):
    """The whole section, markers included, or None when there are no scale results."""
    bpath, npath = find_files(results_dir)
    if not bpath and not npath:
        return None
    before = Run(bpath) if bpath else None
    now = Run(npath) if npath else None
    main = now or before
    def rel(p):
        p = os.path.abspath(p)
        if root and p.startswith(os.path.abspath(root) + os.sep):
            return os.path.relpath(p, root)
        return p
    mach = main.meta.get("machine", {})
    ver = main.meta.get("versions", {})
    out = [SCALE_BEGIN, "", "## Scale: %s registration entries (issue 11)" % fmt(main.knobs.get("ENTRIES")), ""]
    srcs = []
    if before:
        srcs.append("before: `%s` (commit `%s`, %s UTC)" % (rel(before.path), before.meta.get("versions", {}).get("spiffed_commit"),
                                                         before.meta.get("utc")))
    if now:
        srcs.append("now: `%s` (commit `%s`%s, %s UTC)" % (rel(now.path), ver.get("spiffed_commit"),
                                                         ", dirty" if ver.get("spiffed_dirty") else "", now.meta.get("utc")))
    out.append("Generated by `bench/scale.sh` and `bench/render_scale.py` from %s. Do not edit by hand: "
               "a scale run replaces this section, a compare-spire run keeps it." % "; ".join(srcs))
    out += ["", "%s CPUs (%s), kernel %s, profile `%s`, agent `log_level = \"%s\"`. The agent, the load generator "
            "and its children share the machine, which other jobs may share too: CPU times and latencies are "
            "noisy (the partial-rotation figures are medians over %s runs each)."
            % (mach.get("nproc"), mach.get("cpu"), mach.get("kernel"), main.knobs.get("PROFILE"),
               main.knobs.get("LOG_LEVEL"), main.knobs.get("PR_REPS"))]
    if main.knobs.get("QUICK") == "1":
        out += ["", "> **QUICK mode**: %s entries and small stream counts; the figures show the script works."
                % fmt(main.knobs.get("ENTRIES"))]
    out += ["", "### Targets", ""]
    rows = targets(main, before)
    if before and now:
        head = "| target | before | now | verdict (now) |\n| --- | --- | --- | --- |"
        lines = [head] + ["| %s | %s | %s | %s |" % (t, f(before.m), f(now.m), verdict(v(now.m))) for t, f, v in rows]
    else:
        lab = "before" if main is before else "measured"
        head = "| target | %s | verdict |\n| --- | --- | --- |" % lab
        lines = [head] + ["| %s | %s | %s |" % (t, f(main.m), verdict(v(main.m))) for t, f, v in rows]
    out += lines
    # Registration.
    out += ["", "### Registering the entries", "",
            "`%s`, one batch of %s entries per call, each `unix:uid:N` → `spiffe://example.org/scale/uid/N` "
            "for N from %s." % (main.populate.get("cmd", "spiffed entry create --from-file"),
                                fmt(main.knobs.get("BATCH")), fmt(main.meta.get("uids", {}).get("entries_first"))), ""]
    cols = [("before", before), ("now", now)] if before and now else [("", main)]
    hdr = "| | " + " | ".join(c[0] or "measured" for c in cols) + " |"
    out += [hdr, "|" + " --- |" * (len(cols) + 1)]

    def reg_row(label, f):
        return "| %s | %s |" % (label, " | ".join(f(r.m) for _, r in cols))

    out.append(reg_row("entries registered (of requested)", lambda mm: "%s of %s%s" % (
        fmt(mm.get("entries")), fmt(mm.get("requested")), " (stopped by the time budget)" if mm.get("stopped") else "")))
    out.append(reg_row("total time", lambda mm: fmt(mm.get("populate_s"), 1, " s")))
    out.append(reg_row("first / middle / last batch", lambda mm: "%s / %s / %s" % (
        fmt(mm.get("batch_first_s"), 2, " s"), fmt(mm.get("batch_mid_s"), 2, " s"), fmt(mm.get("batch_last_s"), 2, " s"))))
    # Commands.
    out += ["", "### How it was run", "", "```", main.meta.get("invocation", "bench/scale.sh"), "```", "",
            "Agent config (`spiffed run --config spiffed.toml`; TMP is the temp dir):", "", "```toml",
            main.meta.get("config", "").rstrip("\n"), "```", "",
            "Commands (SOCKET, ADMIN_SOCKET: the agent's sockets in the temp dir; PID: the agent's pid):", "", "```"]
    out.append("populate       " + main.populate.get("cmd", ""))
    if main.singles:
        out.append("1 (CLI)        " + main.singles[0].get("cmd", "") + "   # x%s, wall time of each call" % main.m.get("cli_n"))
    for label, case in [("1 (RPC)", "admin_create"), ("4", "first_fetch"), ("5 alone", "partial_rotation_base"),
                        ("5 loaded", "partial_rotation_loaded"), ("6", "fanout")]:
        c = main.cmd(case)
        if c:
            out.append("%-14s %s" % (label, c))
    out.append("2, 3           restart: bench/wlapi.py startup --pid PID --socket SOCKET (polls every 1 ms), "
               "then VmRSS every second for %ss" % main.knobs.get("RSS_WATCH"))
    out += ["```", "",
            "- 1: the CLI call's wall time (process start, connect, one CreateEntries, exit) is the verdict; "
            "the RPC alone is `spiffed-loadgen admin-create` (a new connection per call, timed with and without it).",
            "- 2, 3: the probe (`bench/wlapi.py`, uid %s) fetches one SVID and disconnects; no workload is connected "
            "while RSS is sampled." % main.meta.get("uids", {}).get("probe", 0),
            "- 4: each child is `spiffed-loadgen fetch-once`, started as the entry's uid (gid the same number); "
            "latency from the start of connect to the first message. *Pre-minted* means the leaf's notBefore "
            "(backdated 10 s) is more than 2 s older than the call: the agent had minted it before the workload asked.",
            "- 5: `partial-rotation` starts a `hold` child as uid %s (entry TTL %ss, `min_svid_ttl = \"1s\"`) and, "
            "in the loaded runs, one as uid %s (default TTL) first; agent CPU over a %ss window (the threads' "
            "`/proc/PID/task/*/schedstat`, checked against utime+stime of `/proc/PID/stat`), divided by the "
            "rotations the small group saw."
            % (main.meta.get("uids", {}).get("rotating"), main.knobs.get("PR_TTL"),
               main.meta.get("uids", {}).get("idle"), main.knobs.get("PR_WINDOW")),
            "- 6: the probe entry's TTL is set to %ss (`spiffed entry update`), each run starts right after a "
            "rotation; CPU per stream is the agent's CPU from all streams ready to the last one updated, per "
            "stream; RSS per stream is (max(RSS all open, RSS after) − RSS before) / streams."
            % main.knobs.get("FANOUT_TTL")]
    fails = (before.failures if before else []) + (now.failures if now else [])
    if fails:
        out += ["", "Failed runs:", ""]
        for f in fails:
            out.append("- `%s` (exit %s): %s" % (f.get("case"), f.get("rc"),
                                                (f.get("stderr") or "").replace("\n", " ⏎ ")[:300]))
    if main.end.get("elapsed_s") is not None:
        out += ["", "<sub>Whole scale script, build included: %s s.</sub>" % main.end["elapsed_s"]]
    out += ["", SCALE_END]
    return "\n".join(out) + "\n"


def splice(doc, sec):
    """`doc` with its marked section replaced by `sec` (appended when there is none)."""
    b, e = doc.find(SCALE_BEGIN), doc.find(SCALE_END)
    if b >= 0 and e > b:
        return doc[:b] + sec.rstrip("\n") + doc[e + len(SCALE_END):]
    if not doc.strip():
        return sec
    return doc.rstrip("\n") + "\n\n" + sec


def summary(results_dir):
    bpath, npath = find_files(results_dir)
    before = Run(bpath) if bpath else None
    run = Run(npath) if npath else before
    for t, f, v in targets(run, before):
        print("%-12s %s: %s" % (verdict(v(run.m)).strip("*"), t, f(run.m)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", required=True)
    p.add_argument("--splice", help="a markdown file whose scale section to replace (or append)")
    p.add_argument("--out", default=None)
    p.add_argument("--root", help="repo root, to print paths relative to it")
    p.add_argument("--summary", action="store_true")
    a = p.parse_args()
    if a.summary:
        summary(a.results_dir)
        return 0
    sec = section(a.results_dir, a.root)
    if sec is None:
        print("render_scale.py: no scale-*.jsonl in %s" % a.results_dir, file=sys.stderr)
        return 1
    if a.splice:
        doc = open(a.splice).read() if os.path.exists(a.splice) else ""
        tmp = a.splice + ".tmp"
        with open(tmp, "w") as f:
            f.write(splice(doc, sec))
        os.replace(tmp, a.splice)
    elif a.out and a.out != "-":
        with open(a.out, "w") as f:
            f.write(sec)
    else:
        sys.stdout.write(sec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
