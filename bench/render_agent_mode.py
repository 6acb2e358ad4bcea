#!/usr/bin/env python3
"""Renders the "Agent mode" section of BENCHMARKS.md from bench/agent-mode.sh's results (stdlib only).

  render_agent_mode.py --results FILE --splice BENCHMARKS.md     replace (or insert) the marked section
  render_agent_mode.py --results-dir bench/results --splice ...  the same from the newest agent-mode-*.jsonl
  render_agent_mode.py --results FILE [--out FILE|-]             print the section
  render_agent_mode.py --results FILE --summary                  a few lines for the log

The section sits between AM_BEGIN and AM_END, after the Scale section (bench/scale.sh) and before
"## Analysis". bench/render.py (compare-spire.sh's renderer) calls section_from_dir() too, so a
compare-spire run keeps this section and an agent-mode run keeps the rest.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

AM_BEGIN = "<!-- agent-mode:begin (bench/agent-mode.sh + bench/render_agent_mode.py) -->"
AM_END = "<!-- agent-mode:end -->"
SCALE_END = "<!-- scale:end -->"

AGENTS = ["agent-mode", "standalone", "spire-agent"]
LABEL = {"agent-mode": "spiffed agent mode", "standalone": "spiffed standalone", "spire-agent": "spire-agent"}


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
                print("render_agent_mode.py: %s:%d: bad JSON (%s); skipped" % (path, n, e), file=sys.stderr)
    return recs


def newest(results_dir):
    def stamp(p):
        m = re.search(r"(\d{8}T\d{6}Z)\.jsonl$", p)
        return m.group(1) if m else ""
    paths = glob.glob(os.path.join(results_dir, "agent-mode-*.jsonl"))
    return max(paths, key=stamp) if paths else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_diffs(run, label):
    """Agent mode − spire-agent (ms) for every `entry create` both agents served."""
    pairs = {}
    for r in run.of("latency", label=label):
        if r.get("ok"):
            pairs.setdefault(r.get("i"), {})[r.get("agent")] = r.get("ms")
    return [v["agent-mode"] - v["spire-agent"] for v in pairs.values() if "agent-mode" in v and "spire-agent" in v]


def median_ci(values, level=0.95, rounds=4000):
    """A percentile-bootstrap confidence interval of the median (fixed seed: the same input
    renders the same text)."""
    import random
    if len(values) < 5:
        return None
    rnd = random.Random(12)
    meds = sorted(statistics.median(rnd.choices(values, k=len(values))) for _ in range(rounds))
    lo = meds[int((1 - level) / 2 * rounds)]
    hi = meds[int((1 + level) / 2 * rounds) - 1]
    return lo, hi


def pct(values, p):
    """Nearest-rank percentile (p99 of 30 samples is the largest)."""
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


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt_ratio(r):
    if r is None:
        return "–"
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
    cmd = re.sub(r"--agent-pid \d+", "--agent-pid PID", cmd)
    cmd = re.sub(r"--socket \S+", "--socket SOCKET", cmd)
    return cmd


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


class Run:
    def __init__(self, path):
        self.path = path
        recs = load(path)
        self.recs = recs
        self.meta = next((r for r in recs if r.get("type") == "meta"), {})
        self.knobs = self.meta.get("knobs", {})
        self.unavailable = next((r for r in recs if r.get("type") == "agent_mode_unavailable"), None)
        self.agent_mode = bool(self.meta.get("agent_mode")) and self.unavailable is None
        self.end = next((r for r in recs if r.get("type") == "end"), {})

    def of(self, typ, **kw):
        return [r for r in self.recs if r.get("type") == typ and all(r.get(k) == v for k, v in kw.items())]

    def runs(self, case, agent, scenario=None):
        out = []
        for r in self.of("result", case=case, agent=agent):
            res = r.get("result", {})
            if scenario and res.get("scenario") != scenario:
                continue
            out.append(res)
        return out

    def cmd(self, case):
        for r in self.of("result") + self.of("failure"):
            if r.get("case") == case:
                return template(r.get("cmd", ""))
        return ""

    # ---------------------------------------------------------------- 1. the shared scenarios
    def load_stats(self, case, agent):
        runs = [r for r in self.runs(case, agent) if r.get("ok", 0) > 0]
        return {
            "n": len(runs),
            "failed": len(self.of("failure", case=case, agent=agent)),
            "rate": med([r.get("rate_per_s") for r in runs]),
            "p50": med([r.get("p50_us") for r in runs]),
            "p99": med([r.get("p99_us") for r in runs]),
            "errors": sum(sum(r.get("errors", {}).values()) for r in self.runs(case, agent)),
        }

    def fanout_stats(self, agent):
        runs = self.runs("fanout", agent, "fanout")
        out = {"n": len(runs), "failed": len(self.of("failure", case="fanout", agent=agent))}
        if not runs:
            return out
        per = []
        for r in runs:
            b = (r.get("agent_before") or {}).get("rss_kib")
            grown = [v for v in ((r.get("agent_ready") or {}).get("rss_kib"),
                                 (r.get("agent_after") or {}).get("rss_kib")) if v is not None]
            if b is not None and grown and r.get("streams"):
                per.append((max(grown) - b) / r["streams"])
        out.update({
            "streams": med([r.get("streams") for r in runs]),
            "min_updated": min(r.get("updated", 0) for r in runs),
            "all_ready_ms": med([r.get("all_ready_ms") for r in runs]),
            "spread_ms": med([r.get("first_to_last_update_ms") for r in runs]),
            "max_spread_ms": max([r.get("first_to_last_update_ms") or 0 for r in runs]),
            "early": sum(1 for r in runs if r.get("first_to_last_update_ms") is not None
                         and r.get("all_ready_to_last_update_ms") is not None
                         and r["first_to_last_update_ms"] > r["all_ready_to_last_update_ms"] + 1e-6),
            "timed_out": sum(1 for r in runs if r.get("timed_out")),
            "errors": sum(sum(r.get("errors", {}).values()) for r in runs),
            "rss_before": med([(r.get("agent_before") or {}).get("rss_kib") for r in runs]),
            "per_stream_kib": max(per) if per else None,
        })
        return out

    def idle(self, agent):
        recs = self.of("idle", agent=agent)
        return {"rss": med([r.get("rss_kib") for r in recs]), "fds": med([r.get("fds") for r in recs]), "n": len(recs)}

    def startup(self, agent):
        vals = [r["result"].get("first_svid_ms") for r in self.of("startup", agent=agent) if r.get("result", {}).get("ok")]
        first = [r["result"].get("first_svid_ms") for r in self.of("startup_first", agent=agent) if r.get("result", {}).get("ok")]
        return {"median": med(vals), "vals": vals, "first": first[0] if first else None}

    # ---------------------------------------------------------------- 2. latency, server CPU
    def latency(self, agent, label):
        recs = self.of("latency", agent=agent, label=label)
        ms = [r.get("ms") for r in recs if r.get("ok")]
        return {
            "n": len(recs), "ok": len(ms), "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
            "min": min(ms) if ms else None, "max": max(ms) if ms else None,
            "cli_ms": med([r.get("cli_ms") for r in recs]),
            "interval": recs[0].get("sync_interval_s") if recs else None,
        }

    def latency_labels(self):
        seen = []
        for r in self.of("latency"):
            key = (r.get("agent"), r.get("label"))
            if key not in seen:
                seen.append(key)
        return seen

    @staticmethod
    def window_cpu_ms(w):
        """The server's CPU in a window: schedstat (ns) when it agrees with the clock ticks (no
        thread exited in the window), else the ticks."""
        ticks = w.get("server_cpu_ms")
        ns = w.get("server_cpu_ns")
        if ns is not None and ticks is not None:
            sched = ns / 1e6
            if abs(sched - ticks) <= 20 + 0.1 * ticks:
                return sched, "schedstat"
        return ticks, "ticks"

    def cpu_windows(self):
        ws = self.of("cpu_window")
        base = [w for w in ws if w.get("running") == "none"]
        rates = []
        for w in base:
            c, _ = self.window_cpu_ms(w)
            if c is not None and w.get("seconds"):
                rates.append(c / w["seconds"])
        base_rate = med(rates)
        rows = []
        for w in ws:
            c, src = self.window_cpu_ms(w)
            b, a = w.get("counts_before", {}), w.get("counts_after", {})

            def d(k):
                return None if k not in a or k not in b else a[k] - b[k]
            syncs = (d("sync") or 0) + (d("get_entries") or 0)
            net = None if c is None or base_rate is None else c - base_rate * w.get("seconds", 0)
            per = None
            if w.get("running") != "none" and syncs and net is not None:
                per = net / syncs
            rows.append({"w": w, "cpu_ms": c, "src": src, "syncs": syncs, "get_bundle": d("get_bundle"),
                         "batch_new_x509": d("batch_new_x509"), "reloads": d("cache_reload"), "net_ms": net,
                         "per_sync_ms": per,
                         "net_pct": None if net is None or not w.get("seconds") else 100.0 * net / 1000.0 / w["seconds"]})
        return rows, base_rate

    # ---------------------------------------------------------------- 3, 4
    def sync_many(self, agent):
        r = self.of("sync_many", agent=agent)
        return r[-1] if r else None

    def down(self, agent):
        return self.of("down_startup", agent=agent)


def section(path, root=None):
    run = Run(path)
    k = run.knobs
    m = run.meta
    mach = m.get("machine", {})
    ver = m.get("versions", {})
    am = run.agent_mode

    def rel(p):
        p = os.path.abspath(p)
        if root and p.startswith(os.path.abspath(root) + os.sep):
            return os.path.relpath(p, root)
        return p

    out = [AM_BEGIN, "", "## Agent mode: spiffed as the node agent of a SPIRE Server (issue 12)", ""]
    out.append("Generated by `bench/agent-mode.sh` and `bench/render_agent_mode.py` from `%s` (commit `%s`%s, "
               "branch `%s`, %s UTC). Do not edit by hand: an agent-mode run replaces this section; compare-spire "
               "and scale runs keep it."
               % (rel(path), ver.get("spiffed_commit"), ", dirty" if ver.get("spiffed_dirty") else "",
                  ver.get("branch"), m.get("utc")))
    if k.get("PROFILE") == "prebuilt":
        out += ["", "> Binaries not built from this checkout: `%s` (`%s`); the commit above is the checkout's, not "
                "theirs." % (ver.get("spiffed_bin"), ver.get("spiffed_version"))]
    loads = run.of("load")
    out += ["", "%s CPUs (%s), kernel %s, %.1f GiB; spiffed built with profile `%s` (the load generator with `%s`), `log_level = \"%s\"` for every agent and "
            "spire-server; SPIRE %s (`%s`, from %s). Everything shares the machine: spire-server, the agents, "
            "the load generator and the probes. Load average (1/5/15 min) when each part started: %s."
            % (mach.get("nproc"), mach.get("cpu"), mach.get("kernel"), (mach.get("mem_kib") or 0) / 1048576.0,
               k.get("PROFILE"), k.get("LOADGEN_PROFILE", k.get("PROFILE")), k.get("LOG_LEVEL"), ver.get("spire"), ver.get("spire_agent_version"),
               ver.get("spire_source"), "; ".join("%s %s" % (l.get("phase"), l.get("loadavg")) for l in loads) or "–")]
    if k.get("QUICK") == "1":
        out += ["", "> **QUICK mode**: one short run per case, %s fan-out streams, %s latency samples, %s s CPU "
                "windows, %s entries in part 3. The figures show the script works; they are not the benchmark."
                % (fmt(k.get("FANOUT_STREAMS")), k.get("LATENCY_SAMPLES"), k.get("CPU_WINDOW"), fmt(k.get("SYNC_ENTRIES")))]
    if not am and run.unavailable:
        out += ["", "> **Agent mode was not measured in this run**: spiffed in agent mode did not serve its "
                "entry's SVID at start-up (%s). The spire-agent and standalone columns are measured; the "
                "agent-mode ones are empty." % (run.unavailable.get("result", {}).get("error") or "no SVID")]
    elif not am:
        out += ["", "> **Agent mode was not measured in this run**: the spiffed built had no agent mode "
                "(`spiffed run --help` listed no `--join-token`). The spire-agent and standalone columns are "
                "measured; the agent-mode ones are empty."]

    agents = AGENTS if am else ["standalone", "spire-agent"]

    # ------------------------------------------------------------------ figures
    cold = {a: run.load_stats("cold", a) for a in AGENTS}
    c1 = {a: run.load_stats("cold_c1", a) for a in AGENTS}
    jwt = {a: run.load_stats("warm_jwt", a) for a in AGENTS}
    fan = {a: run.fanout_stats(a) for a in AGENTS}
    idle = {a: run.idle(a) for a in AGENTS + ["spire-server"]}
    su = {a: run.startup(a) for a in AGENTS}
    sync_lbl = "sync%s" % k.get("AGENT_SYNC")
    short_lbl = "sync%s" % k.get("SHORT_SYNC")
    lat_sa = run.latency("spire-agent", sync_lbl)
    lat_am = run.latency("agent-mode", sync_lbl)
    lat_am_short = run.latency("agent-mode", short_lbl)
    windows, base_rate = run.cpu_windows()

    def per_sync(running, interval):
        """Medians over the windows with that agent running at that interval."""
        ws = [w for w in windows if w["w"].get("running") == running and w["w"].get("sync_interval_s") == interval]
        if not ws:
            return None
        return {"per_sync_ms": med([w["per_sync_ms"] for w in ws]), "net_pct": med([w["net_pct"] for w in ws]),
                "n": len(ws)}

    w_sa = per_sync("spire-agent", 5)
    w_am = per_sync("agent-mode", k.get("AGENT_SYNC"))
    w_am_short = per_sync("agent-mode", k.get("SHORT_SYNC"))
    sm = {a: run.sync_many(a) for a in ("agent-mode", "spire-agent")}
    down_am = run.down("agent-mode")
    down_sa = run.down("spire-agent")
    down_am_ms = [d.get("result", {}).get("first_svid_ms") for d in down_am if d.get("result", {}).get("ok")]

    # ------------------------------------------------------------------ targets
    rows = []

    def within(a, b, tol=0.10, higher_is_better=True):
        r = ratio(a, b)
        if r is None:
            return None, None
        return r, (r >= 1 - tol) if higher_is_better else (r <= 1 + tol)

    r, ok = within(cold["agent-mode"]["rate"], cold["standalone"]["rate"])
    rows.append(["cold fetches/s (c=%s): agent mode within 10 %% of standalone" % k.get("CONCURRENCY"),
                 "%s vs %s /s = %s" % (fmt(cold["agent-mode"]["rate"]), fmt(cold["standalone"]["rate"]), fmt_ratio(r)),
                 verdict(ok)])
    r, ok = within(c1["agent-mode"]["p50"], c1["standalone"]["p50"], higher_is_better=False)
    rows.append(["cold fetch p50 latency (c=1): agent mode within 10 % of standalone",
                 "%s vs %s µs = %s" % (fmt(c1["agent-mode"]["p50"]), fmt(c1["standalone"]["p50"]), fmt_ratio(r)),
                 verdict(ok)])
    r, ok = within(jwt["agent-mode"]["rate"], jwt["standalone"]["rate"])
    rows.append(["warm FetchJWTSVID/s (c=%s): agent mode within 10 %% of standalone" % k.get("CONCURRENCY"),
                 "%s vs %s /s = %s" % (fmt(jwt["agent-mode"]["rate"]), fmt(jwt["standalone"]["rate"]), fmt_ratio(r)),
                 verdict(ok)])
    fa, fs = fan["agent-mode"], fan["standalone"]
    if fa.get("n") and fs.get("n"):
        # A spread of a few ms is noise-bound: within 10 % or 10 ms.
        sa_, ss_ = fa.get("spread_ms"), fs.get("spread_ms")
        ok = None if sa_ is None or ss_ is None else (sa_ <= ss_ * 1.1 or sa_ <= ss_ + 10)
        ok = ok and fa.get("min_updated") == fa.get("streams") and not fa.get("timed_out")
        rows.append(["fan-out (%s streams, one rotation): agent mode's spread within 10 %% (or 10 ms) of standalone"
                     % fmt(k.get("FANOUT_STREAMS")),
                     "%s vs %s ms (medians); %s of %s streams updated (worst run)"
                     % (fmt(sa_, 1), fmt(ss_, 1), fmt(fa.get("min_updated")), fmt(fa.get("streams"))), verdict(ok)])
        pa, ps = fa.get("per_stream_kib"), fs.get("per_stream_kib")
        ok = None if pa is None or ps is None else pa <= ps * 1.1 + 0.1
        rows.append(["fan-out: agent mode's RSS per stream within 10 % of standalone",
                     "%s vs %s KiB" % (fmt(pa, 2), fmt(ps, 2)), verdict(ok)])
    else:
        rows.append(["fan-out: agent mode within 10 % of standalone", "–", verdict(None)])
    ia, is_, isa = idle["agent-mode"]["rss"], idle["standalone"]["rss"], idle["spire-agent"]["rss"]
    r, ok = within(ia, is_, higher_is_better=False)
    rows.append(["idle RSS: agent mode within 10 % of standalone",
                 "%s vs %s MiB = %s" % (fmt(mib(ia), 1), fmt(mib(is_), 1), fmt_ratio(r)), verdict(ok)])
    r = ratio(cold["agent-mode"]["rate"], cold["spire-agent"]["rate"])
    rows.append(["cold fetches/s (c=%s): agent mode ≥ 5× spire-agent" % k.get("CONCURRENCY"),
                 "%s vs %s /s = %s" % (fmt(cold["agent-mode"]["rate"]), fmt(cold["spire-agent"]["rate"]), fmt_ratio(r)),
                 verdict(None if r is None else r >= 5)])
    r = ratio(isa, ia)
    rows.append(["idle RSS: agent mode ≥ 5× less than spire-agent",
                 "%s vs %s MiB: spire-agent uses %s as much" % (fmt(mib(ia), 1), fmt(mib(isa), 1), fmt_ratio(r)),
                 verdict(None if r is None else r >= 5)])
    pf = fan["spire-agent"].get("per_stream_kib")
    pa = fan["agent-mode"].get("per_stream_kib")
    r = ratio(pf, pa)
    rows.append(["fan-out RSS per stream: agent mode vs spire-agent (reported)",
                 "%s vs %s KiB: spire-agent uses %s as much" % (fmt(pa, 2), fmt(pf, 2), fmt_ratio(r)), "reported"])
    # "Not worse" is judged on the same creates seen by both agents: agent mode is worse when the
    # paired differences show it later beyond the run's noise (the 95 % bootstrap interval of
    # their median lies above 0). p50 and p99 are shown; p99 of a few dozen samples is the
    # single slowest one, which the phase of one block decides.
    ok = None
    diffs = paired_diffs(run, sync_lbl)
    ci = median_ci(diffs) if diffs else None
    if lat_am["ok"] and lat_sa["ok"] and ci:
        ok = ci[0] <= 0 and lat_am["ok"] == lat_am["n"]
    rows.append(["`entry create` → first SVID, both at %s s sync: agent mode not worse than spire-agent "
                 "(paired: the 95 %% interval of the median difference reaches 0 or below; p50 and p99 shown)"
                 % k.get("AGENT_SYNC"),
                 "agent mode p50 %s / p99 %s ms; spire-agent p50 %s / p99 %s ms (%s samples each); paired "
                 "difference median %s ms (95 %%: %s)"
                 % (fmt(lat_am["p50"]), fmt(lat_am["p99"]), fmt(lat_sa["p50"]), fmt(lat_sa["p99"]),
                    lat_am["ok"] or lat_sa["ok"], fmt(med(diffs)) if diffs else "–",
                    "%s to %s ms" % (fmt(ci[0]), fmt(ci[1])) if ci else "–"),
                 verdict(ok)])
    rows.append(["a shorter interval (%s s): latency and what it costs the server (reported)" % k.get("SHORT_SYNC"),
                 "p50 %s / p99 %s ms; server CPU %s ms per sync vs %s ms at %s s (spire-agent: %s ms); %s %% vs %s %% "
                 "of one core for this agent's syncs"
                 % (fmt(lat_am_short["p50"]), fmt(lat_am_short["p99"]),
                    fmt(w_am_short and w_am_short["per_sync_ms"], 2), fmt(w_am and w_am["per_sync_ms"], 2),
                    k.get("AGENT_SYNC"), fmt(w_sa and w_sa["per_sync_ms"], 2),
                    fmt(w_am_short and w_am_short["net_pct"], 2), fmt(w_am and w_am["net_pct"], 2)),
                 "reported"])
    for a in ("agent-mode", "spire-agent"):
        s = sm.get(a)
        if not s:
            rows.append(["%s entries under one node, %s: start to all synced, RSS, server CPU (reported)"
                         % (fmt(k.get("SYNC_ENTRIES")), LABEL[a]), "–", verdict(None)])
            continue
        rows.append(["%s entries under one node, %s: start to all synced, RSS, server CPU (reported)"
                     % (fmt(k.get("SYNC_ENTRIES")), LABEL[a]),
                     "%s s; RSS %s MiB then, %s MiB %s s later; server CPU %s s (net of its idle rate %s s)"
                     % (fmt(None if s.get("synced_ms") is None else s["synced_ms"] / 1000.0, 2),
                        fmt(mib(s.get("rss_synced_kib")), 1), fmt(mib(s.get("rss_settled_kib")), 1),
                        k.get("SYNC_SETTLE"),
                        fmt(None if s.get("server_cpu_synced_ms") is None else s["server_cpu_synced_ms"] / 1000.0, 2),
                        fmt(net_sync_cpu_s(s), 2)),
                     "reported" if s.get("synced_ms") is not None else "**not synced**"])
    dm = med(down_am_ms)
    rows.append(["agent restarted with spire-server down: spiffed serves (from its cache) within 100 ms",
                 "%s ms median (%s)" % (fmt(dm, 1), ", ".join(fmt(v, 1) for v in down_am_ms) or "–")
                 + ("; %d of %d restarts served" % (len(down_am_ms), len(down_am)) if len(down_am_ms) != len(down_am) else ""),
                 verdict(None if not down_am else (dm is not None and dm <= 100 and len(down_am_ms) == len(down_am)))])
    if down_sa:
        d = down_sa[-1]
        res = d.get("result", {})
        served = bool(res.get("ok"))
        rows.append(["spire-agent restarted with spire-server down: never serves (reported)",
                     spire_down_text(d), "reported: %s" % ("**it served**" if served else "never served")])
    out += ["", "### Targets", "", table(["target", "measured", "verdict"], rows)]

    # ------------------------------------------------------------------ 1
    def col(f):
        return [f(a) for a in agents]

    head = ["", *[LABEL[a] for a in agents]] + (["agent mode / standalone", "agent mode / spire-agent"] if am else [])

    def rowr(label, vals, am_v=None, st_v=None, sa_v=None):
        extra = []
        if am:
            extra = [fmt_ratio(ratio(am_v, st_v)), fmt_ratio(ratio(am_v, sa_v))]
        return [label] + vals + extra

    t1 = []
    for case, title, st in (("cold", "cold, c=%s" % k.get("CONCURRENCY"), cold), ("cold_c1", "cold, c=1", c1),
                            ("warm_jwt", "warm FetchJWTSVID, c=%s" % k.get("CONCURRENCY"), jwt)):
        t1.append(rowr("%s: successful iterations/s" % title, col(lambda a: fmt(st[a]["rate"])),
                       st["agent-mode"]["rate"], st["standalone"]["rate"], st["spire-agent"]["rate"]))
        t1.append(rowr("%s: p50 / p99 latency (µs)" % title,
                       col(lambda a: "%s / %s" % (fmt(st[a]["p50"]), fmt(st[a]["p99"]))),
                       st["agent-mode"]["p50"], st["standalone"]["p50"], st["spire-agent"]["p50"]))
        errs = col(lambda a: fmt(st[a]["errors"]) + ("" if not st[a]["failed"] else " (%d failed runs)" % st[a]["failed"]))
        t1.append(["%s: failed iterations, all runs" % title] + errs + (["", ""] if am else []))
    t1.append(rowr("fan-out: time until every stream had its first message (ms)",
                   col(lambda a: fmt(fan[a].get("all_ready_ms"), 1)),
                   fan["agent-mode"].get("all_ready_ms"), fan["standalone"].get("all_ready_ms"), fan["spire-agent"].get("all_ready_ms")))
    t1.append(rowr("fan-out: rotation spread, first to last stream updated (ms)",
                   col(lambda a: fmt(fan[a].get("spread_ms"), 1)),
                   fan["agent-mode"].get("spread_ms"), fan["standalone"].get("spread_ms"), fan["spire-agent"].get("spread_ms")))
    upd = col(lambda a: "%s of %s%s%s" % (fmt(fan[a].get("min_updated")), fmt(fan[a].get("streams")),
                                         " (rotation before all were open in %d run(s))" % fan[a]["early"] if fan[a].get("early") else "",
                                         " (%d timed out)" % fan[a]["timed_out"] if fan[a].get("timed_out") else ""))
    t1.append(["fan-out: streams updated, worst run"] + upd + (["", ""] if am else []))
    t1.append(rowr("fan-out: agent RSS before (MiB)", col(lambda a: fmt(mib(fan[a].get("rss_before")), 1)),
                   fan["agent-mode"].get("rss_before"), fan["standalone"].get("rss_before"), fan["spire-agent"].get("rss_before")))
    t1.append(rowr("fan-out: RSS growth per stream, largest run (KiB)", col(lambda a: fmt(fan[a].get("per_stream_kib"), 2)),
                   fan["agent-mode"].get("per_stream_kib"), fan["standalone"].get("per_stream_kib"), fan["spire-agent"].get("per_stream_kib")))
    t1.append(rowr("idle RSS (MiB)", col(lambda a: fmt(mib(idle[a]["rss"]), 1)),
                   idle["agent-mode"]["rss"], idle["standalone"]["rss"], idle["spire-agent"]["rss"]))
    t1.append(["idle open fds"] + col(lambda a: fmt(idle[a]["fds"])) + (["", ""] if am else []))
    t1.append(rowr("start-up with existing state, server up: first SVID after spawn, median (ms)",
                   col(lambda a: fmt(su[a]["median"], 1)),
                   su["agent-mode"]["median"], su["standalone"]["median"], su["spire-agent"]["median"]))
    t1.append(["start-up: each run (ms)"] + col(lambda a: ", ".join(fmt(v, 1) for v in su[a]["vals"]) or "–") + (["", ""] if am else []))
    t1.append(["very first start (ms): agent mode and spire-agent attest the node and sync; standalone creates its CA"]
              + col(lambda a: fmt(su[a]["first"], 1)) + (["", ""] if am else []))
    out += ["", "### 1. The same load against the three agents", "",
            "The `spiffed-loadgen` scenarios of compare-spire.sh (above), against spiffed in agent mode, spiffed "
            "standalone (its own CA, the entry in its config) and spire-agent, all running at once and measured in "
            "alternation (agent mode run 1, standalone run 1, spire-agent run 1, agent mode run 2, …); medians over "
            "%s run(s) of %s s (fan-out: %s run(s)). Entry: `unix:uid:%s` → `spiffe://example.org/bench/uid` "
            "(standalone: `[[entries]]`; the others: `spire-server entry create -parentID <node>`). Fan-out: "
            "%s streams on %s connections, entry X.509-SVID TTL %s s (`-x509SVIDTTL` / `x509_svid_ttl`), "
            "each run started right after a rotation. Idle RSS: `VmRSS` 2 s after each restart of the start-up "
            "runs (no client connected); spire-server's own idle RSS was %s MiB (median)."
            % (k.get("RUNS"), k.get("SECONDS"), k.get("FANOUT_RUNS"), m.get("uid"), fmt(k.get("FANOUT_STREAMS")),
               fmt(k.get("FANOUT_CONNS")), k.get("FANOUT_TTL"), fmt(mib(idle["spire-server"]["rss"]), 1)),
            "", table(head, t1)]

    # ------------------------------------------------------------------ 2
    t2 = []
    for a, lbl in run.latency_labels():
        s = run.latency(a, lbl)
        t2.append([LABEL.get(a, a), "%s s" % s["interval"], "%d of %d" % (s["ok"], s["n"]), fmt(s["min"]),
                   fmt(s["p50"]), fmt(s["p90"]), fmt(s["p99"]), fmt(s["max"]), fmt(s["cli_ms"])])
    reload = ("%s s" % k.get("SERVER_CACHE_RELOAD")) if k.get("SERVER_CACHE_RELOAD") else "5 s (the default)"
    out += ["", "### 2. From `spire-server entry create` to the workload's first SVID", "",
            "A node already running; for each sample, one FetchX509SVID stream per agent is held open as the "
            "workload (uid %s; `bench/wlapi.py await-id`, the same probe for every agent), a random pause of up to "
            "the longer of the sync interval and the server's 5 s entry-cache reload puts the create anywhere in the sync cycle, the clock starts, one "
            "`spire-server entry create -data FILE` registers a new entry (`unix:uid:%s`, a new SPIFFE ID) under "
            "each node measured, and the time is when the agent's stream delivered a message carrying the new "
            "SPIFFE ID. Then the entries are deleted. spire-server's entry cache reloads every %s "
            "(`cache_reload_interval`): a new entry reaches an agent's sync only after the next reload, so the "
            "latency is the wait for the reload plus the wait for the agent's next sync plus minting; the CLI's "
            "own run time (a 230 MB Go binary starting, one RPC) is inside every figure and shown apart. "
            "Percentiles are nearest-rank over the samples (p99 of %s samples is the largest). Each agent syncs "
            "on its own clock (±10 %% jitter): at the same interval the two differ sample by sample by where "
            "their syncs fall relative to each other and to the server's reload. That phase drifts only slowly, "
            "so left alone one draw decides a whole run (two runs without restarts had spire-agent ahead in 27 "
            "and 24 of 30 samples): the agents measured are restarted back to back before every "
            "%s samples (a restart syncs at once), so each block draws a new phase, and the samples span %s "
            "phases. What the interval sets is the bound (reload + interval + minting)."
            % (m.get("uid"), m.get("uid"), reload, k.get("LATENCY_SAMPLES"), k.get("LATENCY_BLOCK", "–"),
               -(-int(k.get("LATENCY_SAMPLES") or 0) // int(k.get("LATENCY_BLOCK") or 1)) if k.get("LATENCY_BLOCK") else "–"),
            "", table(["agent", "sync interval", "samples served", "min (ms)", "p50 (ms)", "p90 (ms)", "p99 (ms)",
                       "max (ms)", "`entry create` CLI run time, median (ms)"], t2)]
    # The same creates, seen by both agents: the paired differences.
    diffs = paired_diffs(run, sync_lbl)
    if diffs:
        ci = median_ci(diffs)
        out += ["", "Paired (the same `entry create` seen by both agents at %s s): agent mode − spire-agent median "
                "%s ms (95 %% bootstrap interval %s), mean %s ms, from %s to %s ms; agent mode was later in %d and "
                "earlier in %d of %d samples."
                % (k.get("AGENT_SYNC"), fmt(med(diffs)),
                   "%s to %s ms" % (fmt(ci[0]), fmt(ci[1])) if ci else "–",
                   fmt(statistics.mean(diffs)), fmt(min(diffs)), fmt(max(diffs)),
                   sum(1 for d in diffs if d > 0), sum(1 for d in diffs if d < 0), len(diffs))]
    t3 = []
    for w in windows:
        ww = w["w"]
        t3.append([ww.get("label"), LABEL.get(ww.get("running"), "none (all agents stopped)"),
                   fmt(ww.get("seconds"), 1), fmt(w["syncs"]), fmt(w["get_bundle"]), fmt(w["batch_new_x509"]),
                   "%s (%s)" % (fmt(w["cpu_ms"], 1), w["src"]),
                   "–" if ww.get("running") == "none" else fmt(w["net_ms"], 1),
                   fmt(w["per_sync_ms"], 2), "–" if ww.get("running") == "none" else fmt(w["net_pct"], 3),
                   fmt(ww.get("agent_cpu_ms"))])
    out += ["", "spire-server's CPU per agent sync: windows of %s s with one agent attached and running (the others "
            "SIGSTOPped) and with none (the baseline: the server's own work, e.g. its entry-cache reloads). "
            "CPU is spire-server's from `/proc/PID/task/*/schedstat` (ns), or from the clock ticks of "
            "`/proc/PID/stat` (10 ms) where the two disagree; the RPCs are spire-server's own counters (its "
            "Prometheus endpoint: `rpc_entry_v1_entry_sync_authorized_entries`, `…get_authorized_entries`, "
            "`rpc_bundle_v1_bundle_get_bundle`, `rpc_svid_v1_svid_batch_new_x509_svid`). Net CPU = window CPU − "
            "baseline rate (%s ms/s, median of the baseline windows) × window; per sync = net / syncs; the targets "
            "table takes the median per kind of window (%s round(s), in alternation). Each node holds one entry "
            "(its uid entry) here: the figure is the cost of a sync that finds nothing new."
            % (k.get("CPU_WINDOW"), fmt(base_rate, 2), k.get("CPU_ROUNDS", 1)),
            "", table(["window", "agent running", "s", "syncs", "GetBundle", "BatchNewX509SVID", "server CPU (ms)",
                       "net of baseline (ms)", "**per sync (ms)**", "net, % of one core", "agent CPU (ms)"], t3)]

    # ------------------------------------------------------------------ 3
    t4 = []
    have = [a for a in ("agent-mode", "spire-agent") if sm.get(a)]
    if have:
        def g(a, f):
            s = sm.get(a)
            return "–" if not s else f(s)

        def s_(v):
            return None if v is None else v / 1000.0
        rows4 = [
            ("entries created with one `entry create -data` (s)", lambda s: fmt(s_(s.get("create_ms")), 1)),
            ("**agent start to every entry held (s)**", lambda s: fmt(s_(s.get("synced_ms")), 2)),
            ("entries held then (of %s)" % fmt((k.get("SYNC_ENTRIES") or 0) + 1),
             lambda s: fmt(synced_count(s))),
            ("agent RSS when synced (MiB)", lambda s: fmt(mib(s.get("rss_synced_kib")), 1)),
            ("agent RSS %s s later (MiB)" % k.get("SYNC_SETTLE"), lambda s: fmt(mib(s.get("rss_settled_kib")), 1)),
            ("X.509-SVIDs the agent holds %s s later" % k.get("SYNC_SETTLE"), lambda s: fmt(s.get("svids_last"))),
            ("agent CPU, start to synced / to %s s later (s)" % k.get("SYNC_SETTLE"),
             lambda s: "%s / %s" % (fmt(s_(s.get("agent_cpu_synced_ms")), 2), fmt(s_(s.get("agent_cpu_settled_ms")), 2))),
            ("spire-server CPU, start to synced (s)", lambda s: fmt(s_(s.get("server_cpu_synced_ms")), 2)),
            ("… net of its idle rate (s)", lambda s: fmt(net_sync_cpu_s(s), 2)),
            ("spire-server CPU, start to %s s after synced (s)" % k.get("SYNC_SETTLE"),
             lambda s: fmt(s_(s.get("server_cpu_settled_ms")), 2)),
            ("spire-server idle CPU rate with these entries (ms/s)", lambda s: fmt(s.get("server_baseline_ms_per_s"), 1)),
        ]
        for label, f in rows4:
            t4.append([label] + [g(a, f) for a in ("agent-mode", "spire-agent")])
        out += ["", "### 3. %s entries parented to one node" % fmt(k.get("SYNC_ENTRIES")), "",
                "For each agent in turn (the other SIGSTOPped): the agent is stopped, %s entries `unix:uid:N` "
                "(uids no process has) → `spiffe://example.org/bench/sync/<agent>/N` are registered under its node "
                "with one `spire-server entry create -data FILE`, the script waits for spire-server's entry cache to "
                "reload and measures the server's idle CPU rate for 10 s, then starts the agent on its existing state "
                "and polls every 0.05 s until it holds every entry of its node (%s: the %s plus its uid entry). "
                "The signal: spire-agent's `lru_cache_record_map_size` gauge (its Prometheus endpoint, enabled for "
                "this part: the entries in its cache); spiffed's `entries` counter in the `stats` line it logs on "
                "SIGUSR1. Then the entries are deleted. spire-agent prefetches X.509-SVIDs for at most "
                "`x509_svid_cache_max_size` (1,000) entries."
                % (fmt(k.get("SYNC_ENTRIES")), fmt((k.get("SYNC_ENTRIES") or 0) + 1), fmt(k.get("SYNC_ENTRIES"))),
                "", table(["", LABEL["agent-mode"], LABEL["spire-agent"]], t4)]

    # ------------------------------------------------------------------ 4
    t5 = []
    for d in down_am:
        res = d.get("result", {})
        t5.append([LABEL["agent-mode"], "restart %s" % d.get("run"),
                   "first SVID after %s ms" % fmt(res.get("first_svid_ms"), 1) if res.get("ok") else "no SVID: %s" % res.get("error"),
                   readiness_of(run, "server down, restart %s" % d.get("run"))])
    for d in down_sa:
        t5.append([LABEL["spire-agent"], "restart", spire_down_text(d), "–"])
    if t5:
        out += ["", "### 4. Agent restarted while spire-server is down", "",
                "spire-server is stopped (SIGTERM) after part 3; then each agent is restarted on its data dir and "
                "`bench/wlapi.py startup` polls its socket every 1 ms from the `exec` until a FetchX509SVID message "
                "arrives, the process exits, or the time-out (%s s for spire-agent) passes. Readiness: "
                "`spiffed healthcheck --output json` right after."
                % k.get("DOWN_TIMEOUT"),
                "", table(["agent", "run", "outcome", "readiness reported"], t5)]

    # ------------------------------------------------------------------ how it was run
    out += ["", "### How it was run", "", "```", m.get("invocation", "bench/agent-mode.sh"), "```", "",
            "Knobs: " + ", ".join("`%s=%s`" % (kk, vv) for kk, vv in k.items()) + ".", "",
            "Load generator command lines (`SOCKET` is the agent's socket, `PID` its pid):", "", "```"]
    for case in ("cold", "cold_c1", "warm_jwt", "fanout"):
        c = run.cmd(case)
        if c:
            out.append("%-9s %s" % (case, c))
    out += ["```", "",
            "Set-up (one temp dir, Unix sockets, loopback):", "",
            "- spire-server: `DataStore \"sql\"` (sqlite3), `KeyManager \"memory\"`, `NodeAttestor \"join_token\"`, "
            "`default_x509_svid_ttl = \"1h\"`, a Prometheus endpoint on loopback (read for the RPC counts)%s."
            % (", `experimental { cache_reload_interval = \"%ss\" }`" % k.get("SERVER_CACHE_RELOAD") if k.get("SERVER_CACHE_RELOAD") else ""),
            "- spire-agent: `join_token`, `trust_bundle_path` (from `spire-server bundle show`), `KeyManager \"disk\"`, "
            "`WorkloadAttestor \"unix\"`, default sync interval (5 s); a Prometheus endpoint only in parts 3 and 4.",
            "- spiffed agent mode (`spiffed run --config agent-mode.toml`), nothing but the keys of issue 12's "
            "contract:", "", "```toml",
            'trust_domain = "example.org"', 'socket_path = "TMP/agentmode/api.sock"',
            'admin_socket_path = "TMP/agentmode/admin/admin.sock"', 'data_dir = "TMP/agentmode/data"',
            'log_level = "%s"' % k.get("LOG_LEVEL"), "", "[spire_server]", 'address = "127.0.0.1:PORT"',
            'trust_bundle_path = "TMP/conf/bootstrap.pem"', 'join_token = "TOKEN"',
            'sync_interval = "%ss"   # "%ss" in part 2\'s short-interval runs' % (k.get("AGENT_SYNC"), k.get("SHORT_SYNC")),
            "```", "",
            "- spiffed standalone: `spiffed run --config standalone.toml` with the entry in `[[entries]]`.",
            "- Part 2's entries: `spire-server entry create -data FILE` with one entry per node "
            "(`{\"entries\": [{\"entry_id\", \"parent_id\", \"spiffe_id\", \"selectors\": [{\"type\": \"unix\", \"value\": \"uid:N\"}]}]}`); "
            "part 3's: the same file format with %s entries, removed with `spire-server entry delete -file`."
            % fmt(k.get("SYNC_ENTRIES"))]
    fails = run.of("failure")
    if fails:
        out += ["", "Failed runs:", ""]
        for f in fails:
            out.append("- %s `%s` run %s (exit %s): %s" % (f.get("agent"), f.get("case"), f.get("run"), f.get("rc"),
                                                         (f.get("stderr") or "").replace("\n", " ⏎ ")[:300]))
    if run.end.get("elapsed_s") is not None:
        out += ["", "<sub>Whole agent-mode script, builds included: %s s.</sub>" % run.end["elapsed_s"]]
    out += ["", AM_END]
    return "\n".join(out) + "\n"


def synced_count(s):
    for p in reversed(s.get("series", [])):
        if s.get("synced_ms") is not None and p.get("t_ms") is not None and p["t_ms"] <= s["synced_ms"] + 1e-6:
            return p.get("entries")
    return s.get("entries_last")


def net_sync_cpu_s(s):
    c, rate, t = s.get("server_cpu_synced_ms"), s.get("server_baseline_ms_per_s"), s.get("synced_ms")
    if c is None or rate is None or t is None:
        return None
    return (c - rate * t / 1000.0) / 1000.0


def readiness_of(run, label):
    for h in run.of("healthcheck", label=label):
        res = h.get("result")
        if isinstance(res, dict):
            extra = "; ".join("%s: %s" % (k, str(res[k])[:160].replace("|", "\\|"))
                              for k in ("reason", "unreachable_since") if res.get(k))
            return "`%s`%s" % (res.get("readiness"), " (%s)" % extra if extra else "")
        return "(%s)" % (h.get("text") or "")[:120].replace("|", "\\|")
    return "–"


def spire_down_text(d):
    res = d.get("result", {})
    if res.get("ok"):
        return "served an SVID after %s ms" % fmt(res.get("first_svid_ms"), 1)
    if d.get("still_running"):
        what = "still running and not serving after %s s (stopped by the script)" % d.get("timeout_s")
    else:
        what = "exited (code %s) after %s s without serving" % (d.get("exit_code"),
                                                                fmt((res.get("elapsed_ms") or 0) / 1000.0, 1))
    sock = "its socket never opened" if not d.get("socket_exists") and "No such file" in (res.get("last_probe") or "No such file") \
        else "last probe: %s" % res.get("last_probe")
    err = (d.get("last_error") or "").replace("|", "\\|")
    m = re.search(r'msg="([^"]*)"', err)
    e = re.search(r'error="((?:[^"\\]|\\.)*)"', err)
    msg = "%s%s" % (m.group(1) if m else err[:200], (": " + e.group(1)[:200]) if e else "")
    return "%s; %s; last error logged: `%s`" % (what, sock, msg) if msg else "%s; %s" % (what, sock)


def splice(doc, sec):
    """`doc` with its agent-mode section replaced by `sec`; inserted after the Scale section or
    before "## Analysis" when there is none, appended as a last resort."""
    b, e = doc.find(AM_BEGIN), doc.find(AM_END)
    if b >= 0 and e > b:
        return doc[:b] + sec.rstrip("\n") + doc[e + len(AM_END):]
    s = doc.find(SCALE_END)
    if s >= 0:
        at = s + len(SCALE_END)
        return doc[:at] + "\n\n" + sec.rstrip("\n") + doc[at:]
    a = doc.find("\n## Analysis")
    if a >= 0:
        return doc[:a] + "\n\n" + sec.rstrip("\n") + "\n" + doc[a:]
    if not doc.strip():
        return sec
    return doc.rstrip("\n") + "\n\n" + sec


def section_from_dir(results_dir, root=None):
    """The section from the newest agent-mode-*.jsonl in results_dir, or None."""
    p = newest(results_dir)
    return section(p, root) if p else None


def summary(path):
    text = section(path)
    inside = False
    for line in text.splitlines():
        if line.startswith("### Targets"):
            inside = True
            continue
        if inside and line.startswith("### "):
            break
        if inside and line.startswith("| ") and not line.startswith("| target") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if len(cells) >= 3:
                print("%-14s %s: %s" % (cells[2].replace("*", ""), cells[0], cells[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="an agent-mode-<UTC>.jsonl file")
    p.add_argument("--results-dir", help="use the newest agent-mode-*.jsonl here")
    p.add_argument("--splice", help="a markdown file whose agent-mode section to replace (or insert)")
    p.add_argument("--out", default=None)
    p.add_argument("--root", help="repo root, to print paths relative to it")
    p.add_argument("--summary", action="store_true")
    a = p.parse_args()
    path = a.results or (newest(a.results_dir) if a.results_dir else None)
    if not path:
        print("render_agent_mode.py: give --results FILE or --results-dir DIR (with agent-mode-*.jsonl)", file=sys.stderr)
        return 2
    if a.summary:
        summary(path)
        return 0
    sec = section(path, a.root)
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
