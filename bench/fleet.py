#!/usr/bin/env python3
"""The fleet benchmark (issue 13, point 3), driven by bench/fleet.sh (which reads the knobs,
finds the binaries and renders the section); stdlib only, uses bench/wlapi.py for the
Workload API.

On this one machine: a private PostgreSQL cluster, two spire-server v1.13.3 on 127.0.0.2 and
127.0.0.3 (one port) sharing its database, a name (spire.fleet.test) that resolves to both in a
hosts file each agent sees in its own mount namespace (unshare + bind mount over /etc/hosts),
and N agents, each with its own join token, data dir and socket, and ENTRIES entries parented
to it. In order:

  1. registration: 2N join tokens and 2N x ENTRIES entries (both groups' entries exist for the
     whole run, so the servers hold the same entries while either group is measured);
  2. spiffed group: both servers restarted, idle baseline, N spiffed agents started at once
     (time until each serves its workload's SVID), SETTLE s, then STEADY_WINDOW s of server CPU
     and RSS, PostgreSQL CPU, agent CPU and RSS, and the syncs the servers counted;
  3. failover: a short-lived entry per agent, FetchX509SVID streams held on every agent, a fetch
     sampler and a healthcheck sampler; SIGKILL to the server most agents use; time until
     every agent reconnected to and synced through the other; the server restarted, time until
     the agents return to it; everything the workloads saw;
  4. entry-create latency: entries created on either server (alternating), time until the
     workload's stream on that node has the SVID;
  5. spire-agent group: the spiffed agents stopped, both servers restarted, baseline, N
     spire-agents (same entry shape, the same name through the same hosts trick), steady state.

Every record is one JSON line in RESULTS. Must run as root (mount namespaces, PostgreSQL as its
own user).
"""

import datetime
import json
import os
import pwd
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wlapi  # noqa: E402

ENV = os.environ
TMP = ENV["FLEET_TMP"]
RESULTS = ENV["FLEET_RESULTS"]
SPIFFED = ENV["SPIFFED"]
SPIRE_SERVER = ENV["SPIRE_SERVER"]
SPIRE_AGENT = ENV["SPIRE_AGENT"]
PG_BIN = ENV["PG_BIN"]
N = int(ENV["AGENTS"])
ENTRIES = int(ENV["ENTRIES"])
SYNC = int(ENV["SYNC_INTERVAL"])
SETTLE = float(ENV["SETTLE"])
BASE_WINDOW = float(ENV["BASE_WINDOW"])
STEADY_WINDOW = float(ENV["STEADY_WINDOW"])
STREAMS = int(ENV["STREAMS_PER_AGENT"])
FAILOVER_TTL = int(ENV["FAILOVER_TTL"])
FAILOVER_OBSERVE = float(ENV["FAILOVER_OBSERVE"])
RETURN_TIMEOUT = float(ENV["RETURN_TIMEOUT"])
LATENCY_SAMPLES = int(ENV["LATENCY_SAMPLES"])
LATENCY_BATCH = int(ENV["LATENCY_BATCH"])
START_TIMEOUT = float(ENV["START_TIMEOUT"])
RATELIMIT = ENV["RATELIMIT"] == "1"
LOG_LEVEL = ENV["LOG_LEVEL"]
PARTS = set(ENV["PARTS"].split(","))
TD = "example.org"
DNS_NAME = "spire.fleet.test"
UID = os.getuid()
CLK_TCK = os.sysconf("SC_CLK_TCK")
STATUS_REQUEST = wlapi.empty_request(b"/spiffed.status.v1.AgentStatus/GetStatus")
PROCS = {}  # name -> Popen, stopped at exit
T0 = time.monotonic()


# ------------------------------------------------------------------------------- plumbing
def log(msg):
    print("[%s +%5.0fs] %s" % (time.strftime("%H:%M:%S"), time.monotonic() - T0, msg), file=sys.stderr, flush=True)


def emit(rec):
    with open(RESULTS, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def summary(values):
    if not values:
        return None
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99),
            "max": max(values), "min": min(values), "mean": statistics.fmean(values)}


def alive(p):
    return p is not None and p.poll() is None


def stop(name, sig=signal.SIGTERM, timeout=15):
    p = PROCS.pop(name, None)
    if not alive(p):
        return
    try:
        p.send_signal(signal.SIGCONT)
        p.send_signal(sig)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        log("%s (pid %d) ignored signal %s for %ss; SIGKILL" % (name, p.pid, sig, timeout))
        p.kill()
        p.wait()


def stop_all(prefix):
    names = [n for n in PROCS if n.startswith(prefix)]
    for n in names:
        p = PROCS.get(n)
        if alive(p):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for n in names:
        p = PROCS.pop(n)
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn(name, argv, logfile, **kw):
    f = open(logfile, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, **kw)
    f.close()
    PROCS[name] = p
    return p


def run(argv, what, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit("%s failed (exit %d): %s %s" % (what, r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
    return r.stdout


def poll_until(what, timeout, fn, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port(ips=("127.0.0.1",)):
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ok = True
        for ip in ips:
            t = socket.socket()
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                t.bind((ip, port))
            except OSError:
                ok = False
            t.close()
        if ok:
            return port
    raise SystemExit("no free port on %s" % (ips,))


# --------------------------------------------------------------------------------- /proc
def stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_ms(pid, children=False):
    """utime+stime (and cutime+cstime with children) of pid, in ms; None if gone."""
    try:
        f = stat_fields(pid)
    except OSError:
        return None
    t = int(f[11]) + int(f[12])
    if children:
        t += int(f[13]) + int(f[14])
    return t * 1000.0 / CLK_TCK


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(stat_fields(int(d))[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def tcp_peers(pid):
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        return []
    peers = []
    try:
        with open("/proc/%d/net/tcp" % pid) as f:
            next(f)
            for line in f:
                x = line.split()
                if len(x) >= 10 and x[3] == "01" and x[9] in inodes:
                    ip, port = x[2].split(":")
                    addr = socket.inet_ntoa(int(ip, 16).to_bytes(4, "little"))
                    peers.append((addr, int(port, 16)))
    except OSError:
        pass
    return peers


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------------------- PostgreSQL
class Postgres:
    def __init__(self):
        self.dir = os.path.join(TMP, "pg")
        os.makedirs(self.dir)
        try:
            u = pwd.getpwnam("postgres")
        except KeyError:
            u = pwd.getpwnam("nobody")
        self.uid, self.gid = u.pw_uid, u.pw_gid
        os.chown(self.dir, self.uid, self.gid)
        os.chmod(self.dir, 0o700)
        self.log = os.path.join(TMP, "logs", "postgres.log")
        self.port = None

    def as_user(self, prog):
        return ["setpriv", "--reuid=%d" % self.uid, "--regid=%d" % self.gid, "--clear-groups",
                os.path.join(PG_BIN, prog)]

    def start(self):
        run(self.as_user("initdb") + ["-D", self.dir + "/data", "-U", "spire", "--auth=trust", "-E", "UTF8",
                                      "--locale=C", "--no-sync"], "initdb", cwd=self.dir)
        self.port = free_port()
        # Durability off, as the test harness: the disk is shared with builds, and fsync
        # latency would be noise in entry-create figures (said in the section).
        spawn("postgres", self.as_user("postgres") + [
            "-D", self.dir + "/data", "-p", str(self.port), "-k", self.dir,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            self.log, cwd=self.dir)
        poll_until("PostgreSQL to accept connections", 60, lambda: subprocess.run(
            [os.path.join(PG_BIN, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode == 0)
        run([os.path.join(PG_BIN, "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "spire", "spire"],
            "createdb")

    def pid(self):
        return PROCS["postgres"].pid

    def cpu_ms(self):
        """The postmaster, its live backends, and its reaped children (cutime)."""
        pm = PROCS["postgres"].pid
        # setpriv execs postgres: same pid.
        t = cpu_ms(pm, children=True) or 0.0
        for c in children_of(pm):
            t += cpu_ms(c) or 0.0
        return t

    def rss_kib(self):
        pm = PROCS["postgres"].pid
        return sum(rss_kib(p) or 0 for p in [pm] + children_of(pm))

    def conninfo(self):
        return "dbname=spire user=spire host=127.0.0.1 port=%d sslmode=disable" % self.port


# ------------------------------------------------------------------------------- servers
class Server:
    def __init__(self, i, port, pg):
        self.i = i
        self.ip = "127.0.0.%d" % (i + 2)
        self.port = port
        self.dir = os.path.join(TMP, "server%d" % i)
        os.makedirs(self.dir + "/data")
        self.sock = self.dir + "/api.sock"
        self.prom = free_port()
        self.name = "server%d" % i
        self.log = os.path.join(TMP, "logs", "spire-server%d.log" % i)
        self.conf = self.dir + "/server.conf"
        rl = "" if RATELIMIT else "\n    ratelimit {\n        attestation = false\n        signing = false\n    }"
        with open(self.conf, "w") as f:
            f.write("""server {
    bind_address = "%s"
    bind_port = "%d"
    socket_path = "%s"
    trust_domain = "%s"
    data_dir = "%s/data"
    log_level = "%s"
    default_x509_svid_ttl = "1h"
    ca_ttl = "24h"%s
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "postgres"
            connection_string = "%s"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = "%s/data/keys.json"
        }
    }
}

telemetry {
    Prometheus {
        host = "127.0.0.1"
        port = %d
    }
}
""" % (self.ip, port, self.sock, TD, self.dir, LOG_LEVEL.upper(), rl, pg.conninfo(), self.dir, self.prom))

    def start(self):
        p = spawn(self.name, [SPIRE_SERVER, "run", "-config", self.conf], self.log)

        def healthy():
            if not alive(p):
                raise SystemExit("spire-server %d exited (log %s)" % (self.i, self.log))
            return subprocess.run([SPIRE_SERVER, "healthcheck", "-socketPath", self.sock],
                                  capture_output=True).returncode == 0
        poll_until("spire-server %d healthy" % self.i, 60, healthy, 0.2)

    def pid(self):
        p = PROCS.get(self.name)
        return p.pid if alive(p) else None

    def running(self):
        return alive(PROCS.get(self.name))

    def cli(self, *args, what=None):
        return run([SPIRE_SERVER] + list(args) + ["-socketPath", self.sock], what or "spire-server " + args[0])

    def counts(self):
        """Sync RPCs (SyncAuthorizedEntries + GetAuthorizedEntries) and signing RPCs counted."""
        try:
            body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.prom, timeout=3).read().decode()
        except OSError:
            return None
        c = {"sync": 0.0, "batch_new_x509": 0.0, "attest": 0.0}
        for line in body.splitlines():
            m = re.match(r"^spire_server_rpc_(\w+?)(\{[^}]*\})? ([0-9.e+]+)$", line)
            if not m:
                continue
            name, v = m.group(1), float(m.group(3))
            if name in ("entry_v1_entry_sync_authorized_entries", "entry_v1_entry_get_authorized_entries"):
                c["sync"] += v
            elif name == "svid_v1_svid_batch_new_x509_svid":
                c["batch_new_x509"] += v
            elif name == "agent_v1_agent_attest_agent":
                c["attest"] += v
        return c


# -------------------------------------------------------------------------------- agents
class Agent:
    """One node: a spiffed or a spire-agent, its join token, its entries."""

    def __init__(self, kind, i, token):
        self.kind, self.i, self.token = kind, i, token
        self.name = "%s-%d" % (kind, i)
        self.dir = os.path.join(TMP, "agents", self.name)
        os.makedirs(self.dir + "/data")
        os.makedirs(self.dir + "/admin", mode=0o700)
        self.sock = self.dir + "/api.sock"
        self.log = os.path.join(TMP, "logs", self.name + ".log")
        self.agent_id = "spiffe://%s/spire/agent/join_token/%s" % (TD, token)
        self.probe_id = self.workload_id(0)
        self.serving_s = None

    def workload_id(self, k):
        return "spiffe://%s/fleet/%s/%d/w%d" % (TD, self.kind, self.i, k)

    def entries(self):
        out = []
        for k in range(ENTRIES):
            # Entry 0 is the probed workload (this uid); the others stand for the node's other
            # workloads (uids no process has): synced, and pre-minted by agents that do.
            uid = UID if k == 0 else 100000 + k
            out.append({"parent_id": self.agent_id, "spiffe_id": self.workload_id(k),
                        "selectors": [{"type": "unix", "value": "uid:%d" % uid}]})
        return out

    def start(self, port):
        bootstrap = os.path.join(TMP, "bootstrap.pem")
        if self.kind == "spiffed":
            conf = self.dir + "/spiffed.toml"
            with open(conf, "w") as f:
                f.write('trust_domain = "%s"\nsocket_path = "%s"\nadmin_socket_path = "%s/admin/admin.sock"\n'
                        'data_dir = "%s/data"\nlog_level = "%s"\n\n[spire_server]\naddress = "%s:%d"\n'
                        'trust_bundle_path = "%s"\nsync_interval = "%ds"\njoin_token = "%s"\n'
                        % (TD, self.sock, self.dir, self.dir, LOG_LEVEL, DNS_NAME, port, bootstrap, SYNC,
                           self.token))
            cmd = [SPIFFED, "run", "--config", conf]
        else:
            conf = self.dir + "/agent.conf"
            with open(conf, "w") as f:
                f.write("""agent {
    data_dir = "%s/data"
    log_level = "%s"
    server_address = "%s"
    server_port = "%d"
    socket_path = "%s"
    trust_bundle_path = "%s"
    trust_domain = "%s"
    join_token = "%s"
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "%s/data"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
""" % (self.dir, LOG_LEVEL.upper(), DNS_NAME, port, self.sock, bootstrap, TD, self.token, self.dir))
            cmd = [SPIRE_AGENT, "run", "-config", conf]
        # Its own mount namespace with the fleet's hosts file over /etc/hosts: the name resolves
        # to both servers for this agent only. unshare and sh exec, so the pid is the agent's.
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', os.path.join(TMP, "hosts")] + cmd
        spawn(self.name, argv, self.log)

    def pid(self):
        p = PROCS.get(self.name)
        return p.pid if alive(p) else None


def servers_of(agent, servers):
    pid = agent.pid()
    if pid is None:
        return set()
    addrs = {(s.ip, s.port): s.i for s in servers}
    return {addrs[p] for p in tcp_peers(pid) if p in addrs}


# ------------------------------------------------------------------------ measurements
def snapshot(servers, pg, agents):
    s = {"t": time.monotonic(), "loadavg": loadavg(), "mem_available_kib": mem_available_kib(),
         "servers": [], "pg_cpu_ms": pg.cpu_ms(), "pg_rss_kib": pg.rss_kib()}
    for sv in servers:
        pid = sv.pid()
        s["servers"].append({"cpu_ms": cpu_ms(pid) if pid else None, "rss_kib": rss_kib(pid) if pid else None,
                             "counts": sv.counts()})
    s["agents_cpu_ms"] = sum(cpu_ms(a.pid()) or 0 for a in agents if a.pid())
    rss = [rss_kib(a.pid()) for a in agents if a.pid()]
    s["agents_rss_kib"] = [r for r in rss if r is not None]
    return s


def window(servers, pg, agents, seconds, phase, group):
    """Server, PostgreSQL and agent CPU over `seconds`, RSS at the end (and the max seen)."""
    a = snapshot(servers, pg, agents)
    rss_max = [0] * len(servers)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(5, max(0.0, deadline - time.monotonic())))
        for i, sv in enumerate(servers):
            r = rss_kib(sv.pid()) if sv.pid() else None
            rss_max[i] = max(rss_max[i], r or 0)
    b = snapshot(servers, pg, agents)
    dt = b["t"] - a["t"]
    rec = {"type": "window", "phase": phase, "group": group, "agents": len(agents), "seconds": round(dt, 2),
           "loadavg_end": b["loadavg"], "mem_available_kib_end": b["mem_available_kib"], "servers": []}
    for i in range(len(servers)):
        sa, sb = a["servers"][i], b["servers"][i]
        syncs = None
        signs = None
        if sa["counts"] and sb["counts"]:
            syncs = sb["counts"]["sync"] - sa["counts"]["sync"]
            signs = sb["counts"]["batch_new_x509"] - sa["counts"]["batch_new_x509"]
        cpu = None if sa["cpu_ms"] is None or sb["cpu_ms"] is None else sb["cpu_ms"] - sa["cpu_ms"]
        rec["servers"].append({"cpu_ms": cpu, "cpu_ms_per_s": None if cpu is None else cpu / dt,
                               "rss_kib": sb["rss_kib"], "rss_max_kib": rss_max[i], "syncs": syncs,
                               "batch_new_x509": signs})
    rec["pg_cpu_ms_per_s"] = (b["pg_cpu_ms"] - a["pg_cpu_ms"]) / dt
    rec["pg_rss_kib"] = b["pg_rss_kib"]
    if agents:
        rec["agents_cpu_ms_per_s"] = (b["agents_cpu_ms"] - a["agents_cpu_ms"]) / dt
        rec["agent_rss_kib"] = summary(b["agents_rss_kib"])
    emit(rec)
    log("%s %s: servers cpu %s ms/s, rss %s MiB, syncs %s; pg %.1f ms/s; load %s" % (
        group, phase, [None if s["cpu_ms_per_s"] is None else round(s["cpu_ms_per_s"], 1) for s in rec["servers"]],
        [round((s["rss_kib"] or 0) / 1024) for s in rec["servers"]], [s["syncs"] for s in rec["servers"]],
        rec["pg_cpu_ms_per_s"], b["loadavg"]))
    return rec


def serves(sock, want):
    try:
        ids = {s.get("spiffe_id") for s in wlapi.fetch(sock, timeout=2.0)}
    except wlapi.ProbeError:
        return False
    return want in ids


def start_group(agents, servers, port):
    """Starts every agent at once; returns when each serves its probe workload's SVID."""
    done = threading.Event()
    # Every 50 ms per agent up to 50 agents, then as often in all: the probes must not take the
    # CPU the agents need to start.
    interval = 0.05 * max(1.0, len(agents) / 50.0)
    t0 = time.monotonic()
    for a in agents:
        a.start(port)
    spawned = time.monotonic() - t0

    def watch(a):
        while not done.is_set():
            if serves(a.sock, a.probe_id):
                a.serving_s = time.monotonic() - t0
                return
            if not alive(PROCS.get(a.name)):
                return
            time.sleep(interval)
    threads = [threading.Thread(target=watch, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    deadline = t0 + START_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    done.set()
    times = [a.serving_s for a in agents if a.serving_s is not None]
    failed = [a.name for a in agents if a.serving_s is None]
    rec = {"type": "start", "group": agents[0].kind, "agents": len(agents), "spawn_s": round(spawned, 3),
           "poll_interval_s": interval,
           "serving_s": summary(times), "all_serving_s": max(times) if not failed else None,
           "not_serving": failed, "loadavg": loadavg(), "mem_available_kib": mem_available_kib()}
    placement = [0] * len(servers)
    for a in agents:
        for s in servers_of(a, servers):
            placement[s] += 1
    rec["placement"] = placement
    emit(rec)
    log("%s: %d/%d serving; all after %s s (p50 %s s); spawned in %.2f s; connections per server %s" % (
        agents[0].kind, len(times), len(agents), rec["all_serving_s"],
        rec["serving_s"] and round(rec["serving_s"]["p50"], 2), spawned, placement))
    for name in failed[:3]:
        with open(os.path.join(TMP, "logs", name + ".log"), errors="replace") as f:
            log("%s did not serve; its log ends:\n%s" % (name, "".join(f.readlines()[-15:])))
    if failed:
        raise SystemExit("%d agents did not serve within %ss" % (len(failed), START_TIMEOUT))


def restart_servers(servers):
    for s in servers:
        stop(s.name)
    for s in servers:
        s.start()


# ------------------------------------------------------------------ workloads' view
class Streams:
    """FetchX509SVID streams held on agents, checking every message; plus a fetch sampler and a
    healthcheck sampler. Records the first arrival (wall clock) of every SPIFFE ID per agent."""

    def __init__(self, agents, health):
        self.agents = agents
        self.with_health = health
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.first_seen = {a.i: {} for a in agents}  # agent -> id -> unix time
        self.leaves = {a.i: {} for a in agents}  # agent -> id -> set of leaf hashes
        self.messages = 0
        self.problems = []
        self.ready = 0
        self.fetch_ok = 0
        self.fetch_err = []
        self.health = {a.i: set() for a in agents}
        self.health_fail = []
        self.health_runs = 0
        self.not_serving = []
        self.status_last = {}  # agent -> (last_sync, unix time of the poll)
        self.synced_after = {}  # agent -> first last_sync after the mark, s after it (upper bound)
        self.mark_unix = None
        self.mark_mono = None
        self.threads = []

    def problem(self, msg):
        with self.lock:
            self.problems.append({"t_unix": time.time(), "what": msg})

    def hold(self, a, k):
        first = True
        try:
            for t, msg in wlapi.stream_messages(a.sock, 10 ** 7):
                svids = wlapi.parse_response(msg)
                with self.lock:
                    self.messages += 1
                    if first:
                        self.ready += 1
                        first = False
                    for s in svids:
                        sid = s.get("spiffe_id")
                        self.first_seen[a.i].setdefault(sid, t)
                        self.leaves[a.i].setdefault(sid, set()).add(s.get("leaf_sha256"))
                        nb, na = s.get("not_before"), s.get("not_after")
                        if nb is None or na is None:
                            self.problems.append({"t_unix": t, "what": "%s stream %d: %s unreadable leaf"
                                                  % (a.name, k, sid)})
                        elif not nb <= t + 1 or not t < na:
                            self.problems.append({"t_unix": t, "what": "%s stream %d: %s outside its validity "
                                                  "(%s..%s) on arrival" % (a.name, k, sid, nb, na)})
                if self.stop.is_set():
                    return
        except wlapi.ProbeError as e:
            if not self.stop.is_set():
                self.problem("%s stream %d broke: %s" % (a.name, k, e))

    def fetcher(self):
        i = 0
        while not self.stop.is_set():
            a = self.agents[i % len(self.agents)]
            i += 1
            try:
                svids = wlapi.fetch(a.sock, timeout=5.0)
                now = time.time()
                ids = {s.get("spiffe_id") for s in svids}
                bad = [s.get("spiffe_id") for s in svids if not s.get("not_after", 0) > now]
                with self.lock:
                    if a.probe_id not in ids:
                        self.fetch_err.append({"t_unix": now, "agent": a.name, "error": "probe ID missing"})
                    elif bad:
                        self.fetch_err.append({"t_unix": now, "agent": a.name, "error": "expired %s" % bad})
                    else:
                        self.fetch_ok += 1
            except wlapi.ProbeError as e:
                with self.lock:
                    self.fetch_err.append({"t_unix": time.time(), "agent": a.name, "error": str(e)})
            time.sleep(0.01)

    def status(self, a):
        """spiffed's status service (what `spiffed healthcheck` asks): readiness and last_sync."""
        try:
            msg = wlapi.fetch_raw(a.sock, timeout=5.0, request=STATUS_REQUEST)
        except wlapi.ProbeError as e:
            with self.lock:
                self.health_fail.append({"t_unix": time.time(), "agent": a.name, "out": "status: %s" % e})
            return
        t = time.time()
        f = dict(wlapi._fields(msg))
        readiness = f.get(2, b"").decode()
        ls = f.get(7, 0)
        with self.lock:
            self.health[a.i].add(readiness)
            if readiness != "serving":
                self.not_serving.append({"t_unix": t, "agent": a.name, "readiness": readiness,
                                         "reason": f.get(3, b"").decode()[:300]})
            prev_ls, prev_t = self.status_last.get(a.i, (None, 0.0))
            self.status_last[a.i] = (ls, t)
            if self.mark_unix is None or a.i in self.synced_after or not ls or ls == prev_ls:
                return
            # last_sync is whole seconds. A new value is surely after the mark when the poll
            # before it was, or when its second is later than the mark's; the sync happened
            # before this poll and before its second ended (an upper bound).
            if prev_t >= self.mark_unix or ls >= int(self.mark_unix) + 1:
                self.synced_after[a.i] = min(t, ls + 1) - self.mark_unix

    def statuser(self):
        while not self.stop.is_set():
            for a in self.agents:
                self.status(a)
            time.sleep(0.3)

    def health_check(self, a):
        r = subprocess.run([SPIFFED, "healthcheck", "--output", "json", "--timeout", "5s", "--socket", a.sock],
                           capture_output=True, text=True)
        try:
            j = json.loads(r.stdout)
        except ValueError:
            j = {}
        with self.lock:
            self.health[a.i].add(j.get("readiness", "?"))
            if r.returncode != 0:
                self.health_fail.append({"t_unix": time.time(), "agent": a.name, "out": r.stdout[-300:]})
            self.health_runs += 1

    def healther(self):
        # The CLI itself, one agent a second in turn (a process each: cheap enough at that rate).
        i = 0
        while not self.stop.is_set():
            self.health_check(self.agents[i % len(self.agents)])
            i += 1
            time.sleep(1.0)

    def start(self):
        for a in self.agents:
            for k in range(STREAMS):
                t = threading.Thread(target=self.hold, args=(a, k), daemon=True)
                t.start()
                self.threads.append(t)
        poll_until("every stream's first message", 60, lambda: self.ready >= len(self.agents) * STREAMS)
        for fn in (self.fetcher, self.statuser, self.healther) if self.with_health else (self.fetcher,):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def mark(self):
        with self.lock:
            self.mark_unix = time.time()
            self.mark_mono = time.monotonic()
            self.synced_after = {}

    def arrived(self, a, sid):
        with self.lock:
            return self.first_seen[a.i].get(sid)

    def report(self):
        with self.lock:
            return {"streams": len(self.agents) * STREAMS, "messages": self.messages,
                    "problems": list(self.problems), "fetch_ok": self.fetch_ok, "fetch_errors": list(self.fetch_err),
                    "health_readiness": sorted({r for s in self.health.values() for r in s}),
                    "health_failures": list(self.health_fail), "healthcheck_runs": self.health_runs,
                    "not_serving": list(self.not_serving)}


def create_entries(server, entries, tag):
    path = os.path.join(TMP, "entries-%s.json" % tag)
    with open(path, "w") as f:
        json.dump({"entries": entries}, f)
    t0 = time.time()
    out = server.cli("entry", "create", "-data", path, what="entry create -data (%s)" % tag)
    if out.count("Entry ID") < len(entries):
        raise SystemExit("entry create (%s) created %d of %d entries: %s" % (
            tag, out.count("Entry ID"), len(entries), out[-1500:]))
    return t0, time.time()


# ---------------------------------------------------------------------------- the run
def failover(agents, servers, streams):
    kind = agents[0].kind
    # Short-lived SVIDs for the failover: each is renewed (through whichever server answers)
    # every ~FAILOVER_TTL/2 s, so the workloads would see an expired one if renewal stalled.
    ft = [{"parent_id": a.agent_id, "spiffe_id": "spiffe://%s/fleet/%s/%d/failover" % (TD, kind, a.i),
           "selectors": [{"type": "unix", "value": "uid:%d" % UID}], "x509_svid_ttl": FAILOVER_TTL} for a in agents]
    create_entries(servers[0], ft, "failover-ttl")
    poll_until("every agent's stream to carry its short-lived SVID", 120, lambda: all(
        streams.arrived(a, "spiffe://%s/fleet/%s/%d/failover" % (TD, kind, a.i)) for a in agents), 0.2)
    # spiffed: one server per agent; spire-agent: round robin over both.
    want = 1 if kind == "spiffed" else len(servers)
    before = poll_until("every agent connected to %d server(s)" % want, 60, lambda: (lambda p: p if all(
        len(v) == want for v in p.values()) else None)({a.i: servers_of(a, servers) for a in agents}), 0.5)
    counts = [sum(1 for v in before.values() if s.i in v) for s in servers]
    victim = max(range(len(servers)), key=lambda i: counts[i])
    survivor = 1 - victim
    moved = [a for a in agents if victim in before[a.i]]
    log("placement before the kill: %s agents per server; killing server %d (SIGKILL)" % (counts, victim))
    time.sleep(2)
    streams.mark()
    kill_unix = time.time()
    kill_mono = time.monotonic()
    PROCS[servers[victim].name].kill()
    PROCS[servers[victim].name].wait()
    PROCS.pop(servers[victim].name)
    # An entry created after the kill reaches its agent only through the survivor.
    ak = [{"parent_id": a.agent_id, "spiffe_id": "spiffe://%s/fleet/%s/%d/after-kill" % (TD, kind, a.i),
           "selectors": [{"type": "unix", "value": "uid:%d" % UID}]} for a in agents]
    c0, c1 = create_entries(servers[survivor], ak, "after-kill")
    on_survivor = {}
    entry_at = {}
    deadline = kill_mono + max(FAILOVER_OBSERVE, 120)
    while time.monotonic() < deadline:
        now = time.monotonic()
        for a in agents:
            if a.i not in on_survivor and servers_of(a, servers) == {survivor}:
                on_survivor[a.i] = now - kill_mono
            if a.i not in entry_at:
                t = streams.arrived(a, "spiffe://%s/fleet/%s/%d/after-kill" % (TD, kind, a.i))
                if t:
                    entry_at[a.i] = t - kill_unix
        synced = dict(streams.synced_after)
        if (len(on_survivor) == len(agents) and len(entry_at) == len(agents)
                and (len(synced) == len(agents) or not streams.with_health) and now - kill_mono >= FAILOVER_OBSERVE):
            break
        time.sleep(0.1)
    synced = dict(streams.synced_after)
    # Reconnection times from the agents' own logs: "connected to the SPIRE Server at another
    # of its addresses" (info) is written when the first choice refused the connection.
    reconnect = {}
    for a in moved:
        with open(a.log, errors="replace") as f:
            for line in f:
                if "connected to the SPIRE Server at another of its addresses" in line:
                    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
                    if m:
                        t = datetime.datetime.fromisoformat(m.group(1)).replace(
                            tzinfo=datetime.timezone.utc).timestamp()
                        if t >= kill_unix:
                            reconnect[a.i] = t - kill_unix
                            break
    renewed = []
    for a in agents:
        fid = "spiffe://%s/fleet/%s/%d/failover" % (TD, kind, a.i)
        renewed.append(len(streams.leaves[a.i].get(fid, ())) - 1)
    rec = {"type": "failover", "group": kind, "victim": victim, "placement_before": counts, "agents_moved": len(moved),
           "observed_s": round(time.monotonic() - kill_mono, 1),
           "on_survivor_s": {"moved": summary([on_survivor[a.i] for a in moved if a.i in on_survivor]),
                             "missing": len(agents) - len(on_survivor)},
           "reconnect_log_s": {"moved": summary(list(reconnect.values())), "missing": len(moved) - len(reconnect)},
           "first_sync_after_kill_s": {"moved": summary([synced[a.i] for a in moved if a.i in synced]),
                                       "all": summary(list(synced.values())), "missing": len(agents) - len(synced)},
           "after_kill_entry_s": {"all": summary(list(entry_at.values())), "missing": len(agents) - len(entry_at),
                                  "create_cli_s": round(c1 - c0, 3)},
           "failover_ttl_s": FAILOVER_TTL, "renewals_per_agent": summary(renewed)}
    emit(rec)
    log("%s failover: %d agents moved; on the survivor after %s s (max); first sync through it %s s (max, all agents); "
        "after-kill entry %s s (max)" % (
            kind, len(moved), rec["on_survivor_s"]["moved"] and round(rec["on_survivor_s"]["moved"]["max"], 2),
            rec["first_sync_after_kill_s"]["all"] and round(rec["first_sync_after_kill_s"]["all"]["max"], 2),
            rec["after_kill_entry_s"]["all"] and round(rec["after_kill_entry_s"]["all"]["max"], 2)))
    # The server comes back: the agents that preferred it return after the fallback age.
    t0 = time.monotonic()
    servers[victim].start()
    up = time.monotonic() - t0
    back = time.monotonic()
    returned = {}
    restored = None
    while time.monotonic() - back < RETURN_TIMEOUT:
        now = time.monotonic()
        cur = {a.i: servers_of(a, servers) for a in agents}
        for a in moved:
            if a.i not in returned and victim in cur[a.i]:
                returned[a.i] = now - back
        if cur == before:
            restored = now - back
            break
        time.sleep(0.2)
    cur = {a.i: servers_of(a, servers) for a in agents}
    rec = {"type": "return", "group": kind, "victim": victim, "restart_s": round(up, 2), "restored_s": restored,
           "returned_s": summary(list(returned.values())), "not_returned": len(moved) - len(returned),
           "placement_after": [sum(1 for v in cur.values() if s.i in v) for s in servers]}
    emit(rec)
    log("%s return: server %d up in %.1f s; placement restored after %s s; per server now %s" % (
        kind, victim, up, restored and round(restored, 1), rec["placement_after"]))


def latency(agents, servers, streams):
    samples = []
    rnd = random.Random(13)
    rounds = -(-LATENCY_SAMPLES // LATENCY_BATCH)
    for r in range(rounds):
        k = min(LATENCY_BATCH, len(agents), LATENCY_SAMPLES - len(samples))
        picked = rnd.sample(agents, k)
        via = r % len(servers)
        where = {a.i: servers_of(a, servers) for a in picked}
        ids = {a.i: "spiffe://%s/fleet/%s/%d/latency/%d" % (TD, a.kind, a.i, r) for a in picked}
        # Uniform over the sync interval and the server's cache reload (5 s).
        time.sleep(rnd.uniform(0, max(SYNC, 5)))
        t0, t1 = create_entries(servers[via], [
            {"parent_id": a.agent_id, "spiffe_id": ids[a.i], "selectors": [{"type": "unix", "value": "uid:%d" % UID}]}
            for a in picked], "latency-%s-%d" % (agents[0].kind, r))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(streams.arrived(a, ids[a.i]) for a in picked):
            time.sleep(0.02)
        for a in picked:
            t = streams.arrived(a, ids[a.i])
            same = where[a.i] == {via}
            samples.append({"agent": a.i, "via": via, "agent_server": sorted(where[a.i]), "same_server": same,
                            "latency_s": None if t is None else t - t0, "cli_s": t1 - t0})
    for s in samples:
        emit(dict(type="latency", group=agents[0].kind, **s))
    ok = [s["latency_s"] for s in samples if s["latency_s"] is not None]
    rec = {"type": "latency_summary", "group": agents[0].kind, "all": summary(ok), "missing": len(samples) - len(ok),
           "same_server": summary([s["latency_s"] for s in samples if s["same_server"] and s["latency_s"] is not None]),
           "other_server": summary([s["latency_s"] for s in samples
                                    if not s["same_server"] and s["latency_s"] is not None]),
           "cli": summary([s["cli_s"] for s in samples])}
    emit(rec)
    log("%s: entry create -> SVID: %s" % (agents[0].kind, {k: round(v, 2) for k, v in rec["all"].items()} if rec["all"] else None))


def main():
    for d in ("logs", "agents"):
        os.makedirs(os.path.join(TMP, d), exist_ok=True)
    emit({"type": "load", "phase": "start", "loadavg": loadavg(), "mem_available_kib": mem_available_kib()})
    log("PostgreSQL")
    pg = Postgres()
    pg.start()
    ips = ("127.0.0.2", "127.0.0.3")
    port = free_port(ips)
    servers = [Server(i, port, pg) for i in range(2)]
    log("spire-server on %s, port %d" % (", ".join(ips), port))
    for s in servers:
        s.start()
    bundle = poll_until("the shared bundle to hold both servers' CAs", 60, lambda: (
        lambda pem: pem if pem.count("BEGIN CERTIFICATE") >= len(servers) else None)(
        servers[0].cli("bundle", "show")), 0.5)
    with open(os.path.join(TMP, "bootstrap.pem"), "w") as f:
        f.write(bundle)
    with open(os.path.join(TMP, "hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
        for ip in ips:
            f.write("%s %s\n" % (ip, DNS_NAME))
    os.chmod(os.path.join(TMP, "hosts"), 0o644)

    log("registration: %d join tokens, %d entries" % (2 * N, 2 * N * ENTRIES))
    t0 = time.monotonic()
    groups = {}
    for kind in ("spiffed", "spire-agent"):
        agents = []
        for i in range(N):
            out = servers[i % 2].cli("token", "generate", "-ttl", "86400")
            m = re.search(r"Token: (\S+)", out)
            if not m:
                raise SystemExit("token generate printed no token: %s" % out)
            agents.append(Agent(kind, i, m.group(1)))
        groups[kind] = agents
    entries = [e for kind in groups for a in groups[kind] for e in a.entries()]
    for k in range(0, len(entries), 1000):
        create_entries(servers[(k // 1000) % 2], entries[k:k + 1000], "fleet-%d" % k)
    emit({"type": "registration", "tokens": 2 * N, "entries": len(entries), "seconds": round(time.monotonic() - t0, 1)})
    log("registered in %.1f s" % (time.monotonic() - t0))

    for kind in ("spiffed", "spire-agent"):
        if kind == "spiffed" and "spiffed" not in PARTS:
            continue
        if kind == "spire-agent" and "spire-agent" not in PARTS:
            continue
        agents = groups[kind]
        log("== %s: %d agents" % (kind, N))
        restart_servers(servers)
        time.sleep(5)
        window(servers, pg, [], BASE_WINDOW, "idle", kind)
        start_group(agents, servers, port)
        time.sleep(SETTLE)
        window(servers, pg, agents, STEADY_WINDOW, "steady", kind)
        if "failover" in PARTS or "latency" in PARTS:
            streams = Streams(agents, health=kind == "spiffed")
            streams.start()
            if "failover" in PARTS:
                failover(agents, servers, streams)
            if "latency" in PARTS:
                latency(agents, servers, streams)
            streams.stop.set()
            rep = streams.report()
            emit(dict(type="workloads", group=kind, **rep))
            log("%s workloads: %d streams, %d messages, %d problems; fetches %d ok, %d failed; health %s, %d failed" % (
                kind, rep["streams"], rep["messages"], len(rep["problems"]), rep["fetch_ok"], len(rep["fetch_errors"]),
                rep["health_readiness"], len(rep["health_failures"])))
            for p in rep["problems"][:5] + rep["fetch_errors"][:5]:
                log("  %s" % p)
        stop_all(kind + "-")
    emit({"type": "load", "phase": "end", "loadavg": loadavg(), "mem_available_kib": mem_available_kib()})


def cleanup():
    for name in list(PROCS):
        if not name.startswith("server") and name != "postgres":
            p = PROCS.get(name)
            if alive(p):
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
    for name in [n for n in PROCS if not n.startswith("server") and n != "postgres"]:
        stop(name, timeout=10)
    for name in [n for n in PROCS if n.startswith("server")]:
        stop(name, timeout=10)
    stop("postgres", sig=signal.SIGINT, timeout=15)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    try:
        main()
    finally:
        cleanup()
