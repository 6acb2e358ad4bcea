#!/usr/bin/env python3
"""Renders the "Fleet" section of BENCHMARKS.md from bench/fleet.sh's results (stdlib only).

  render_fleet.py --results FILE --splice BENCHMARKS.md     replace (or insert) the marked section
  render_fleet.py --results-dir bench/results --splice ...  the same from the newest fleet-*.jsonl
  render_fleet.py --results FILE [--out FILE|-]             print the section

The section sits between FLEET_BEGIN and FLEET_END, after the Agent mode section
(bench/agent-mode.sh). bench/render.py (compare-spire.sh's renderer) calls section_from_dir()
too, so a compare-spire run keeps it.
"""

import argparse
import glob
import json
import os
import re
import sys

FLEET_BEGIN = "<!-- fleet:begin (bench/fleet.sh + bench/render_fleet.py) -->"
FLEET_END = "<!-- fleet:end -->"
AFTER = ["<!-- agent-mode:end -->", "<!-- scale:end -->"]
LABEL = {"spiffed": "spiffed (agent mode)", "spire-agent": "spire-agent"}


def load(path):
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print("render_fleet.py: %s:%d: bad JSON (%s); skipped" % (path, n, e), file=sys.stderr)
    return recs


def newest(results_dir):
    def stamp(p):
        m = re.search(r"(\d{8}T\d{6}Z)\.jsonl$", p)
        return m.group(1) if m else ""
    paths = [p for p in glob.glob(os.path.join(results_dir, "fleet-*.jsonl"))
             if re.search(r"/fleet-\d{8}T\d{6}Z\.jsonl$", p)]
    return max(paths, key=stamp) if paths else None


def capacity_runs(results_dir):
    """The capacity runs (LABEL=capacity), oldest first."""
    return sorted(glob.glob(os.path.join(results_dir, "fleet-capacity-*.jsonl")))


def fmt(v, d=1):
    if v is None:
        return "–"
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return "%.*f" % (d, v)


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        out.append("| " + " | ".join("–" if c is None else str(c) for c in r) + " |")
    return "\n".join(out)


def dist(s, d=2, unit=" s"):
    """p50 / p99 / max (n) of a summary record."""
    if not s:
        return "–"
    return "p50 %s, p99 %s, max %s%s (n = %d)" % (fmt(s["p50"], d), fmt(s["p99"], d), fmt(s["max"], d), unit, s["n"])


def one(recs, **kw):
    for r in recs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def steady_row(recs, g):
    """The start-and-steady-state cells of group g, or None."""
    st = one(recs, type="start", group=g)
    idle = one(recs, type="window", phase="idle", group=g)
    steady = one(recs, type="window", phase="steady", group=g)
    if not st:
        return None
    if not (idle and steady):
        return {"start": st}

    def tot(w, k):
        vals = [s.get(k) for s in w["servers"]]
        return None if any(x is None for x in vals) else sum(vals)
    n_g = steady["agents"] or 1
    cpu_i, cpu_s = tot(idle, "cpu_ms_per_s"), tot(steady, "cpu_ms_per_s")
    rss_i, rss_s = tot(idle, "rss_kib"), tot(steady, "rss_kib")
    syncs = tot(steady, "syncs")
    per_agent_cpu = None if cpu_i is None or cpu_s is None else (cpu_s - cpu_i) / n_g
    return {"start": st, "idle": idle, "steady": steady, "n": n_g, "cpu_i": cpu_i, "cpu_s": cpu_s,
            "rss_i": rss_i, "rss_s": rss_s, "syncs": syncs, "per_agent_cpu": per_agent_cpu,
            "per_sync": None if not syncs or per_agent_cpu is None else (cpu_s - cpu_i) * steady["seconds"] / syncs,
            "per_agent_rss": None if rss_i is None or rss_s is None else (rss_s - rss_i) / 1024 / n_g}


def serving_cell(st):
    ss = st.get("serving_s") or {}
    if st.get("all_serving_s"):
        return "%s s (p50 %s s)" % (fmt(st.get("all_serving_s"), 2), fmt(ss.get("p50"), 2))
    return "%d of %d did not serve" % (len(st.get("not_serving", [])), st.get("agents"))


def render_capacity(paths, root):
    rows = []
    for p in paths:
        recs = load(p)
        meta = one(recs, type="meta") or {}
        for g in ("spiffed", "spire-agent"):
            r = steady_row(recs, g)
            if not r:
                continue
            if "steady" not in r:
                rows.append([meta.get("utc"), LABEL[g], r["start"]["agents"], serving_cell(r["start"])] + [None] * 6)
                continue
            ar = r["steady"].get("agent_rss_kib") or {}
            rows.append([
                meta.get("utc"), LABEL[g], r["n"], serving_cell(r["start"]),
                "%s → %s" % (fmt(r["cpu_i"]), fmt(r["cpu_s"])), "%s ms/s" % fmt(r["per_agent_cpu"], 2),
                "%s MiB" % fmt(r["per_agent_rss"], 2),
                "%s ms/s" % fmt((r["steady"].get("agents_cpu_ms_per_s") or 0) / r["n"], 2),
                "%s MiB" % fmt((ar.get("mean") or 0) / 1024, 1),
                "%s; %s GiB free" % (r["steady"].get("loadavg_end"),
                                     fmt((r["steady"].get("mem_available_kib_end") or 0) / 1048576.0, 1))])
    if not rows:
        return []
    cmds = sorted({(one(load(p), type="meta") or {}).get("invocation") for p in paths} - {None})
    out = ["### Capacity: larger N (start and steady state only)", ""]
    out.append("Runs with `LABEL=capacity` (%s), each a whole fleet of its own, measured as above; the figures of "
               "the main run above are not from these." % ", ".join("`%s`" % c for c in cmds))
    out.append("")
    out.append(table(["run (UTC)", "agents", "N", "start → all serving (p50)", "servers' CPU ms/s, idle → steady",
                      "server CPU per agent", "server RSS per agent", "CPU per agent (its own)", "RSS per agent",
                      "load avg at the end; memory available"], rows))
    out.append("")
    return out


def section(path, root=None):
    recs = load(path)
    meta = one(recs, type="meta") or {}
    knobs = meta.get("knobs", {})
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    end = one(recs, type="end") or {}
    shown = os.path.relpath(path, root) if root else os.path.join("bench/results", os.path.basename(path))
    n = int(knobs.get("AGENTS") or 0)
    ent = int(knobs.get("ENTRIES") or 0)
    out = [FLEET_BEGIN, "", "## Fleet: N agents on two spire-servers sharing PostgreSQL (issue 13)", ""]
    out.append("Generated by `bench/fleet.sh` and `bench/render_fleet.py` from `%s` (commit `%s`%s, %s UTC). "
               "Do not edit by hand: a fleet run replaces this section; the other benchmarks keep it." % (
                   shown, v.get("spiffed_commit"), ", dirty" if v.get("spiffed_dirty") else "", meta.get("utc")))
    out += ["", "Command: `%s`%s." % (meta.get("invocation"), "" if not end.get("seconds") else
                                      " (%s s in all, build included)" % end["seconds"]), ""]
    out.append(
        "%s CPUs (%s), kernel %s, %.1f GiB; spiffed profile `%s` (%s); SPIRE %s (%s); %s; %s. "
        "Nice value of the run: %s. Load average at the start: %s." % (
            m.get("nproc"), m.get("cpu"), m.get("kernel"), (m.get("mem_kib") or 0) / 1048576.0, meta.get("profile"),
            v.get("spiffed"), v.get("spire"), v.get("spire_source"), v.get("postgres"), v.get("python"),
            meta.get("nice"), m.get("loadavg_start")))
    out += ["", "**Setup.** One machine: a private PostgreSQL cluster (durability off: `fsync`, "
            "`synchronous_commit` and `full_page_writes` off, as the test harness runs it), two spire-server "
            "v1.13.3 on 127.0.0.2 and 127.0.0.3 (same port, `DataStore \"sql\"` on that database, each its own "
            "`KeyManager \"disk\"` and CA, the bootstrap bundle written once both CAs were in the shared bundle), "
            "the name `spire.fleet.test` resolving to both in a hosts file that each agent sees over `/etc/hosts` "
            "in its own mount namespace. **N = %d agents** per group, each with its own join token, data dir and "
            "socket, and **%d entries** parented to it (entry 0 `unix:uid:0`, the probed workload; the others "
            "`unix:uid:100001...`, workloads that never call). Both groups' %d entries exist during the whole run. "
            "spiffed: `[spire_server] address = \"spire.fleet.test:PORT\"`, `sync_interval = \"%ss\"`; spire-agent: "
            "`server_address = \"spire.fleet.test\"` (grpc-go's `dns:///` resolver with round robin over both "
            "servers), its default 5 s sync. Server per-IP rate limits: %s. `log_level = \"%s\"` everywhere." % (
                n, ent, 2 * n * ent, knobs.get("SYNC_INTERVAL"),
                "**off** (`ratelimit { attestation = false, signing = false }`: every agent here connects from "
                "127.0.0.1, as behind a load balancer, so the 1 attestation/s per IP limit would serialize "
                "start-up)" if knobs.get("RATELIMIT") != "1" else "on (SPIRE's defaults)",
                knobs.get("LOG_LEVEL")), ""]

    # ---------------------------------------------------------------- start + steady
    out += ["### Start and steady state", ""]
    out.append(
        "Per group: both servers restarted, %s s idle (the baseline), the N agents started at once, each polled "
        "every 50 ms (every N ms above 50 agents) with a FetchX509SVID until it serves its workload's SVID (*time to serving*); then %s s of "
        "settling and a %s s window: CPU time (`/proc/PID/stat` utime + stime) and RSS (`VmRSS`) of both "
        "servers, of PostgreSQL (postmaster, its backends and reaped children) and of the agents; the syncs "
        "are the servers' own counters (`SyncAuthorizedEntries` + `GetAuthorizedEntries`, Prometheus). *Per "
        "agent* = (steady − idle) / N." % (knobs.get("BASE_WINDOW"), knobs.get("SETTLE"), knobs.get("STEADY_WINDOW")))
    out.append("")
    rows = []
    for g in ("spiffed", "spire-agent"):
        r = steady_row(recs, g)
        if not r or "steady" not in r:
            continue
        idle, steady = r["idle"], r["steady"]
        ar = steady.get("agent_rss_kib") or {}
        rows.append([
            LABEL[g], r["n"], serving_cell(r["start"]),
            "%s → %s" % (fmt(r["cpu_i"]), fmt(r["cpu_s"])),
            "%s ms/s (%s %% of a core)" % (fmt(r["per_agent_cpu"], 2),
                                           fmt(None if r["per_agent_cpu"] is None else r["per_agent_cpu"] / 10, 3)),
            "%s (%s/s)" % (fmt(r["syncs"], 0), fmt(None if r["syncs"] is None else r["syncs"] / steady["seconds"], 1)),
            "%s ms" % fmt(r["per_sync"], 2),
            "%s → %s" % (fmt(None if r["rss_i"] is None else r["rss_i"] / 1024, 0),
                         fmt(None if r["rss_s"] is None else r["rss_s"] / 1024, 0)),
            "%s MiB" % fmt(r["per_agent_rss"], 2),
            "%s → %s (%s)" % (fmt(idle.get("pg_cpu_ms_per_s")), fmt(steady.get("pg_cpu_ms_per_s")),
                              fmt((steady.get("pg_cpu_ms_per_s", 0) - idle.get("pg_cpu_ms_per_s", 0)) / r["n"], 2)),
            "%s ms/s" % fmt((steady.get("agents_cpu_ms_per_s") or 0) / r["n"], 2),
            "%s MiB" % fmt((ar.get("mean") or 0) / 1024, 1),
            steady.get("loadavg_end"),
        ])
    out.append(table([
        "agents", "N", "start → all serving (p50)", "servers' CPU, idle → steady (ms/s, both)",
        "server CPU per agent", "syncs in the window", "server CPU per sync", "servers' RSS, idle → steady (MiB, both)",
        "server RSS per agent", "PostgreSQL CPU ms/s, idle → steady (per agent)", "CPU per agent (its own)",
        "RSS per agent (mean)", "load avg at the end"], rows))
    out.append("")
    pl = []
    for g in ("spiffed", "spire-agent"):
        st = one(recs, type="start", group=g)
        if st:
            pl.append("%s: %s" % (LABEL[g], " / ".join(str(x) for x in st.get("placement", []))))
    if pl:
        out += ["Agents with a connection to server 0 / server 1 once all served: %s (spiffed ranks the addresses "
                "per agent and uses one; spire-agent's round robin connects to both)." % "; ".join(pl), ""]

    for g in ("spiffed", "spire-agent"):
        out += render_failover(recs, g, knobs)
    for g in ("spiffed", "spire-agent"):
        out += render_latency(recs, g, knobs)
    lat = [one(recs, type="latency_summary", group=g) for g in ("spiffed", "spire-agent")]
    if all(lat):
        out += ["spiffed at %s s sync: p50 %s s, p99 %s s; spire-agent (5 s sync): p50 %s s, p99 %s s." % (
            knobs.get("SYNC_INTERVAL"), fmt(lat[0]["all"]["p50"], 2), fmt(lat[0]["all"]["p99"], 2),
            fmt(lat[1]["all"]["p50"], 2), fmt(lat[1]["all"]["p99"], 2)), ""]
    out += render_capacity(capacity_runs(os.path.dirname(os.path.abspath(path))), root)
    out.append(FLEET_END)
    return "\n".join(out) + "\n"


def render_failover(recs, g, knobs):
    fo = one(recs, type="failover", group=g)
    ret = one(recs, type="return", group=g)
    wl = one(recs, type="workloads", group=g)
    out = []
    if fo:
        out += ["### One server killed (SIGKILL): %s" % LABEL[g], ""]
        out.append(
            "Before the kill every agent gets a short-lived entry (X.509-SVID TTL %s s, renewed through whichever "
            "server answers every ~%s s) and its workload holds %s FetchX509SVID streams; a sampler fetches "
            "round robin over the agents throughout%s. The server the most agents use is killed%s; right after, "
            "one entry per agent is created on the survivor. *Only on the survivor*: the agent's server "
            "connections (from `/proc`, polled every 0.1 s) are all to the survivor.%s Observed for at least %s s, "
            "then the server is restarted." % (
                fo.get("failover_ttl_s"), fmt((fo.get("failover_ttl_s") or 0) / 2, 0),
                knobs.get("STREAMS_PER_AGENT"),
                ", another asks every agent's status service (`spiffed.status.v1.AgentStatus/GetStatus`, what "
                "`spiffed healthcheck` reads) in turn, a round every ~0.3 s, and `spiffed healthcheck --output json` "
                "runs on one agent a second in turn" if g == "spiffed" else "",
                "" if g == "spiffed" else " (spire-agent connects to both, so every agent loses one connection)",
                " *Reconnected*: the time stamp of spiffed's log line `connected to the SPIRE Server at another of its "
                "addresses`. *First sync*: the first new `last_sync` (whole seconds) the status service reports "
                "that is surely after the kill (its poll before was after the kill, or its second is later than the "
                "kill's), as the earlier of that poll and the end of that second (an upper bound)." if g == "spiffed" else "",
                knobs.get("FAILOVER_OBSERVE")))
        out.append("")
        rows = [["agents connected to server 0 / server 1 before the kill; killed", "%s; server %s (%s agents affected)" % (
            " / ".join(str(x) for x in fo["placement_before"]), fo["victim"], fo["agents_moved"])]]
        if g == "spiffed":
            rows.append(["kill → reconnected to the survivor (log), affected agents", dist(fo["reconnect_log_s"]["moved"]) +
                         ("" if not fo["reconnect_log_s"]["missing"] else "; %d without the line" % fo["reconnect_log_s"]["missing"])])
        rows.append(["kill → connected only to the survivor, affected agents", dist(fo["on_survivor_s"]["moved"]) +
                     ("" if not fo["on_survivor_s"]["missing"] else "; %d never" % fo["on_survivor_s"]["missing"])])
        if g == "spiffed":
            rows.append(["kill → first successful sync (affected agents)", dist(fo["first_sync_after_kill_s"]["moved"], 1)])
            rows.append(["kill → first successful sync (every agent)", dist(fo["first_sync_after_kill_s"]["all"], 1) +
                         ("" if not fo["first_sync_after_kill_s"]["missing"] else "; %d never" % fo["first_sync_after_kill_s"]["missing"])])
        rows.append(["kill → the entry created on the survivor reaches the workload", dist(fo["after_kill_entry_s"]["all"]) +
                     " (the CLI call took %s s)" % fmt(fo["after_kill_entry_s"]["create_cli_s"], 2) +
                     ("" if not fo["after_kill_entry_s"]["missing"] else "; %d never" % fo["after_kill_entry_s"]["missing"])])
        rows.append(["renewals of the short-lived SVID each workload received after the kill (to the end)",
                     dist(fo["renewals_per_agent"], 0, "")])
        if ret:
            rows.append(["server back: restart → healthy; then every agent's connections as before the kill",
                         "%s s; %s" % (fmt(ret["restart_s"]), "after %s s" % fmt(ret["restored_s"])
                                       if ret["restored_s"] is not None else "NOT within %s s (now %s)" % (
                                           knobs.get("RETURN_TIMEOUT"), " / ".join(str(x) for x in ret["placement_after"])))])
            rows.append(["server back → each affected agent connected to it again", dist(ret["returned_s"], 1) +
                         ("" if not ret["not_returned"] else "; %d did not" % ret["not_returned"])])
        out.append(table(["", "measured"], rows))
        out.append("")
    if wl:
        probs = wl["problems"]
        broken = [p for p in probs if "broke" in p["what"]]
        invalid = [p for p in probs if "outside its validity" in p["what"]]
        out += ["**What the workloads saw** (%s; from the streams' start, before the kill, to the end of the "
                "latency part below):" % LABEL[g], ""]
        rows = [
            ["streams held (%s per agent)" % knobs.get("STREAMS_PER_AGENT"), wl["streams"]],
            ["streams broken", "**%d**" % len(broken)],
            ["SVIDs outside their validity on arrival (expired or not yet valid)", "**%d** of %s messages" % (
                len(invalid), "{:,}".format(wl["messages"]))],
            ["one-shot fetches failed (error, missing SVID or expired)", "**%d** of %s" % (
                len(wl["fetch_errors"]), "{:,}".format(wl["fetch_ok"] + len(wl["fetch_errors"])))]]
        if g == "spiffed":
            rows += [["status calls or `spiffed healthcheck` runs failed (%s CLI runs)" % wl.get("healthcheck_runs", "?"),
                      "**%d**" % len(wl["health_failures"])],
                     ["readiness values seen", ", ".join("`%s`" % r for r in wl["health_readiness"])]]
        out.append(table(["", "count"], rows))
        out.append("")
        for p in (broken + invalid)[:5]:
            out.append("- %s" % p["what"].replace("|", "\\|"))
        for p in wl["fetch_errors"][:5]:
            out.append("- fetch on %s: %s" % (p["agent"], p["error"].replace("|", "\\|")))
        for p in wl.get("not_serving", [])[:3]:
            out.append("- %s reported `%s`: %s" % (p["agent"], p["readiness"], p["reason"].replace("|", "\\|")))
        for p in wl["health_failures"][:3]:
            out.append("- healthcheck on %s: `%s`" % (p["agent"], p["out"].strip().replace("|", "\\|")[:200]))
        if probs or wl["fetch_errors"] or wl["health_failures"] or wl.get("not_serving"):
            out.append("")
    return out


def render_latency(recs, g, knobs):
    ls = one(recs, type="latency_summary", group=g)
    if not ls:
        return []
    out = ["### `spire-server entry create` → the workload has the SVID: %s" % LABEL[g], ""]
    out.append(
        "%s rounds: a random pause of up to %s s (the longer of the agents' sync interval and the servers' "
        "entry-cache reload), then one `spire-server entry create -data` with a new entry (the probed "
        "workload's uid) for each of %s random agents, on server 0 and server 1 in turn; the latency runs from "
        "just before the CLI call to the arrival of the new SPIFFE ID on the workload's held stream. *On the server "
        "the agent is connected to*: its only server connection was to the server the entry was created on%s." % (
            -(-int(knobs.get("LATENCY_SAMPLES") or 0) // max(1, int(knobs.get("LATENCY_BATCH") or 1))),
            max(5, int(knobs.get("SYNC_INTERVAL") or 5)), knobs.get("LATENCY_BATCH"),
            "" if g == "spiffed" else " (spire-agent is connected to both, so only the whole is shown)"))
    out.append("")
    kinds = (("on the server the agent is connected to", ls["same_server"]), ("on the other server", ls["other_server"]),
             ("all", ls["all"])) if g == "spiffed" else (("all (the agent is connected to both)", ls["all"]),)
    out.append(table(["entries created", "samples", "p50", "p90", "p99", "max"], [
        [name, s["n"], fmt(s["p50"], 2) + " s", fmt(s["p90"], 2) + " s", fmt(s["p99"], 2) + " s",
         fmt(s["max"], 2) + " s"] if s else [name, 0, None, None, None, None]
        for name, s in kinds]))
    out.append("")
    if ls.get("missing"):
        out += ["**%d samples never arrived** (90 s timeout)." % ls["missing"], ""]
    if ls.get("cli"):
        out += ["The CLI call itself (a 230 MB Go binary; inside every sample): %s." % dist(ls["cli"]), ""]
    return out


def splice(doc, sec):
    """`doc` with its fleet section replaced by `sec`; inserted after the Agent mode (or Scale)
    section, or before "## Analysis", appended as a last resort."""
    b, e = doc.find(FLEET_BEGIN), doc.find(FLEET_END)
    if b >= 0 and e > b:
        return doc[:b] + sec.rstrip("\n") + doc[e + len(FLEET_END):]
    for marker in AFTER:
        s = doc.find(marker)
        if s >= 0:
            at = s + len(marker)
            return doc[:at] + "\n\n" + sec.rstrip("\n") + doc[at:]
    a = doc.find("\n## Analysis")
    if a >= 0:
        return doc[:a] + "\n\n" + sec.rstrip("\n") + "\n" + doc[a:]
    if not doc.strip():
        return sec
    return doc.rstrip("\n") + "\n\n" + sec


def section_from_dir(results_dir, root=None):
    """The section from the newest fleet-*.jsonl in results_dir, or None."""
    p = newest(results_dir)
    return section(p, root) if p else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="a fleet-<UTC>.jsonl file")
    p.add_argument("--results-dir", help="use the newest fleet-*.jsonl here")
    p.add_argument("--splice", help="a markdown file whose fleet section to replace (or insert)")
    p.add_argument("--out", default=None)
    p.add_argument("--root", help="repo root, to print paths relative to it")
    a = p.parse_args()
    path = a.results or (newest(a.results_dir) if a.results_dir else None)
    if not path:
        print("render_fleet.py: give --results FILE or --results-dir DIR (with fleet-*.jsonl)", file=sys.stderr)
        return 2
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
