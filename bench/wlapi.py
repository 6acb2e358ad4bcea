#!/usr/bin/env python3
"""A tiny SPIFFE Workload API probe for bench/compare-spire.sh (Python 3 stdlib only).

It speaks just enough HTTP/2 + gRPC over a Unix socket to call FetchX509SVID and read the first
response message (SPIFFE IDs, leaf fingerprint, leaf validity). No gRPC library is needed, so the
probe costs no process start-up per attempt and can poll a socket every millisecond.

  wlapi.py fetch SOCKET                     one fetch; prints a JSON line, exit 1 on failure
  wlapi.py wait SOCKET [--timeout S] [--expect-id ID] [--max-ttl S] [--interval S]
        poll until the socket serves exactly the SPIFFE ID(s) wanted (and, with --max-ttl, a
        leaf that lives at most S seconds); prints the last fetch as JSON
        --denied: wait until this probe gets an error status (no identity) instead
  wlapi.py rotation SOCKET [--timeout S]    wait until the served leaf changes (a rotation)
  wlapi.py startup --pid PID --socket SOCKET [--timeout S] [--interval S]
        PID is a process that stopped itself right before exec'ing the agent (the script runs
        `( kill -STOP $BASHPID; exec AGENT ... ) &`). Waits until it is stopped, starts the clock,
        sends SIGCONT and polls SOCKET every --interval (1 ms) until it serves an X509-SVID; prints
        {"ok", "pid", "first_svid_ms", "attempts", "svids"}. The agent stays the script's child.
  wlapi.py await-id SOCKET --id ID [--timeout S]
        one FetchX509SVID stream: prints {"ready", "t_unix"} after its first message, then
        {"ok", "t_unix", "messages"} at the first message carrying SPIFFE ID (the wall-clock time
        it arrived), or {"ok": false, "error"} at the timeout; bench/agent-mode.sh starts the
        clock before `spire-server entry create` once "ready" is printed
  wlapi.py freeport                         print a free TCP port on 127.0.0.1
"""

import argparse
import datetime
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


class ProbeError(Exception):
    """The fetch did not produce a response message."""


def _frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman coding (RFC 7541 6.2.2).
    def s(b):
        assert len(b) < 127
        return bytes([len(b)]) + b
    return b"\x00" + s(name) + s(value)


REQUEST_HEADERS = b"".join(
    _hpack_literal(k, v)
    for k, v in [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"workload.spiffe.io", b"true"),
    ]
)
REQUEST = (
    PREFACE
    + _frame(SETTINGS, 0, 0)
    + _frame(HEADERS, END_HEADERS, 1, REQUEST_HEADERS)
    # An empty X509SVIDRequest: not compressed, length 0.
    + _frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00")
)


def empty_request(path):
    """The bytes of a unary call to `path` (e.g. b"/spiffed.status.v1.AgentStatus/GetStatus") with
    an empty request message and the security header, for fetch_raw(request=...)."""
    headers = REQUEST_HEADERS.replace(_hpack_literal(b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                                      _hpack_literal(b":path", path))
    return (PREFACE + _frame(SETTINGS, 0, 0) + _frame(HEADERS, END_HEADERS, 1, headers)
            + _frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"))


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by the server")
        buf += chunk
    return bytes(buf)


def fetch_raw(path, timeout=5.0, request=REQUEST):
    """Returns the first FetchX509SVID response message (protobuf bytes), or the first response
    message of another call (`request`, see empty_request)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise ProbeError("connect: %s" % e.strerror) from None
        sock.sendall(request)
        msg = bytearray()
        while True:
            head = _recv_exact(sock, 9)
            length = int.from_bytes(head[:3], "big")
            ftype, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exact(sock, length)
            if ftype == SETTINGS and not flags & ACK:
                sock.sendall(_frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                sock.sendall(_frame(PING, ACK, 0, payload))
            elif ftype == DATA and stream == 1:
                msg += payload
                if len(msg) >= 5:
                    need = 5 + int.from_bytes(msg[1:5], "big")
                    if len(msg) >= need:
                        return bytes(msg[5:need])
                if flags & END_STREAM:
                    raise ProbeError("stream ended inside a message")
            elif ftype == HEADERS and stream == 1 and flags & END_STREAM:
                raise ProbeError("the RPC ended without a message (error status, e.g. PermissionDenied)")
            elif ftype == RST_STREAM and stream == 1:
                raise ProbeError("stream reset by the server")
            elif ftype == GOAWAY:
                raise ProbeError("GOAWAY from the server")
    except socket.timeout:
        raise ProbeError("timed out") from None
    except OSError as e:
        raise ProbeError("socket error: %s" % e) from None
    finally:
        sock.close()


WINDOW_UPDATE = 0x8


def stream_messages(path, timeout):
    """Yields (unix time, message bytes) for every FetchX509SVID response message on one stream,
    until `timeout` seconds pass (ProbeError("timed out")) or the stream ends (ProbeError)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(max(0.001, timeout))
        try:
            sock.connect(path)
        except OSError as e:
            raise ProbeError("connect: %s" % e.strerror) from None
        sock.sendall(REQUEST)
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeError("timed out")
            sock.settimeout(left)
            head = _recv_exact(sock, 9)
            length = int.from_bytes(head[:3], "big")
            ftype, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exact(sock, length)
            if ftype == SETTINGS and not flags & ACK:
                sock.sendall(_frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                sock.sendall(_frame(PING, ACK, 0, payload))
            elif ftype == DATA and stream == 1:
                t = time.time()
                if length:
                    # Give the flow-control credit back at once (connection and stream), so that a
                    # long-lived stream never stalls on the 64 KiB default window.
                    inc = struct.pack(">I", length)
                    sock.sendall(_frame(WINDOW_UPDATE, 0, 0, inc) + _frame(WINDOW_UPDATE, 0, 1, inc))
                buf += payload
                while len(buf) >= 5:
                    need = 5 + int.from_bytes(buf[1:5], "big")
                    if len(buf) < need:
                        break
                    yield t, bytes(buf[5:need])
                    del buf[:need]
                if flags & END_STREAM:
                    raise ProbeError("stream ended by the server")
            elif ftype == HEADERS and stream == 1 and flags & END_STREAM:
                raise ProbeError("the RPC ended (status in trailers, e.g. PermissionDenied)")
            elif ftype == RST_STREAM and stream == 1:
                raise ProbeError("stream reset by the server")
            elif ftype == GOAWAY:
                raise ProbeError("GOAWAY from the server")
    except socket.timeout:
        raise ProbeError("timed out") from None
    except OSError as e:
        raise ProbeError("socket error: %s" % e) from None
    finally:
        sock.close()


def _varint(b, i):
    shift = result = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def _fields(b):
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            v = b[i : i + n]
            i += n
        elif wt == 1:
            v = b[i : i + 8]
            i += 8
        elif wt == 5:
            v = b[i : i + 4]
            i += 4
        else:
            raise ProbeError("unexpected protobuf wire type %d" % wt)
        yield num, v


def _der(b, i):
    """(tag, content start, content end) of the DER element at i."""
    tag = b[i]
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    return tag, i, i + n


def _der_time(tag, raw):
    s = raw.decode()
    fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
    return datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()


def leaf_validity(chain):
    """(not_before, not_after) of the first certificate of a DER chain, as Unix times."""
    _, cs, _ = _der(chain, 0)  # Certificate
    _, ts, _ = _der(chain, cs)  # TBSCertificate
    i = ts
    tag, s, e = _der(chain, i)
    if tag == 0xA0:  # [0] version
        i = e
        tag, s, e = _der(chain, i)
    i = e  # serial
    for _ in range(2):  # signature algorithm, issuer
        _, _, e = _der(chain, i)
        i = e
    _, vs, _ = _der(chain, i)  # validity
    t1, s1, e1 = _der(chain, vs)
    t2, s2, e2 = _der(chain, e1)
    return _der_time(t1, chain[s1:e1]), _der_time(t2, chain[s2:e2])


def parse_response(msg):
    svids = []
    for num, v in _fields(msg):
        if num != 1:
            continue
        sv = {}
        for n2, v2 in _fields(v):
            if n2 == 1:
                sv["spiffe_id"] = v2.decode()
            elif n2 == 2:
                _, _, end = _der(v2, 0)
                leaf = v2[:end]
                sv["leaf_sha256"] = hashlib.sha256(leaf).hexdigest()
                try:
                    nb, na = leaf_validity(leaf)
                    sv["not_before"], sv["not_after"], sv["ttl_s"] = nb, na, round(na - nb)
                except Exception as e:  # noqa: BLE001 - report, do not fail the probe
                    sv["validity_error"] = str(e)
        svids.append(sv)
    return svids


def fetch(path, timeout=5.0):
    return parse_response(fetch_raw(path, timeout))


def _ids(svids):
    return sorted(s.get("spiffe_id", "") for s in svids)


def cmd_fetch(a):
    try:
        svids = fetch(a.socket)
    except ProbeError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(json.dumps({"ok": True, "svids": svids}))
    return 0


def cmd_wait(a):
    start = time.monotonic()
    deadline = start + a.timeout
    want = sorted(a.expect_id) if a.expect_id else None
    last = "no attempt"
    while True:
        try:
            if a.denied:
                try:
                    svids = fetch(a.socket)
                    last = "still serves %s" % _ids(svids)
                except ProbeError as e:
                    if "without a message" not in str(e):
                        raise
                    print(json.dumps({"ok": True, "denied": True,
                                      "waited_ms": round((time.monotonic() - start) * 1000, 1)}))
                    return 0
                raise ProbeError(last)
            svids = fetch(a.socket)
            ids = _ids(svids)
            if want is not None and ids != want:
                last = "served %s, want %s" % (ids, want)
            elif a.max_ttl is not None and any(s.get("ttl_s", 1e18) > a.max_ttl for s in svids):
                last = "leaf TTL %s s > %s s" % ([s.get("ttl_s") for s in svids], a.max_ttl)
            else:
                out = {"ok": True, "waited_ms": round((time.monotonic() - start) * 1000, 1), "svids": svids}
                print(json.dumps(out))
                return 0
        except ProbeError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            print(json.dumps({"ok": False, "error": last, "waited_s": a.timeout}))
            print("wlapi wait: %s did not serve the wanted SVID within %ss: %s" % (a.socket, a.timeout, last),
                  file=sys.stderr)
            return 1
        time.sleep(a.interval)


def cmd_rotation(a):
    start = time.monotonic()
    deadline = start + a.timeout
    first = None
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            svids = fetch(a.socket)
            fp = [s.get("leaf_sha256") for s in svids]
            if first is None:
                first = fp
            elif fp != first:
                print(json.dumps({"ok": True, "waited_ms": round((time.monotonic() - start) * 1000, 1),
                                  "svids": svids}))
                return 0
        except ProbeError as e:
            last = str(e)
        time.sleep(a.interval)
    print(json.dumps({"ok": False, "error": "no rotation within %ss (last error: %s)" % (a.timeout, last)}))
    return 1


def cmd_await_id(a):
    # One FetchX509SVID stream: a "ready" line once its first message is in (the caller then
    # creates the entry), and a final line with the wall-clock time of the first message that
    # carries the wanted SPIFFE ID.
    start = time.monotonic()
    n = 0
    try:
        for t, msg in stream_messages(a.socket, a.timeout):
            n += 1
            ids = _ids(parse_response(msg))
            if n == 1:
                print(json.dumps({"ready": True, "t_unix": t, "ids": ids}), flush=True)
            if a.id in ids:
                print(json.dumps({"ok": True, "t_unix": t, "messages": n, "ids": ids}), flush=True)
                return 0
    except ProbeError as e:
        print(json.dumps({"ok": False, "error": str(e), "messages": n,
                          "waited_s": round(time.monotonic() - start, 3)}), flush=True)
        return 1
    return 1


def _proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def cmd_startup(a):
    # The caller started the agent as `( kill -STOP $BASHPID; exec AGENT ... ) &`: wait until it
    # is stopped, then start the clock, let it run (it execs the agent) and poll for an SVID.
    pid = a.pid
    deadline = time.monotonic() + 10
    while _proc_state(pid) != "T":
        if _proc_state(pid) in (None, "Z", "X"):
            print(json.dumps({"ok": False, "pid": pid, "error": "process gone before it was started"}))
            return 1
        if time.monotonic() >= deadline:
            print(json.dumps({"ok": False, "pid": pid, "error": "process never stopped itself"}))
            return 1
        time.sleep(0.001)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGCONT)
    deadline = t0 + a.timeout
    attempts = 0
    last = "no attempt"
    while True:
        attempts += 1
        try:
            svids = fetch(a.socket)
            ms = (time.monotonic() - t0) * 1000
            print(json.dumps({"ok": True, "pid": pid, "first_svid_ms": round(ms, 2),
                              "attempts": attempts, "svids": svids}))
            return 0
        except ProbeError as e:
            last = str(e)
        if _proc_state(pid) in (None, "Z", "X"):
            print(json.dumps({"ok": False, "pid": pid, "error": "exited before serving (last probe: %s)" % last,
                              "elapsed_ms": round((time.monotonic() - t0) * 1000, 1), "last_probe": last}))
            return 1
        if time.monotonic() >= deadline:
            print(json.dumps({"ok": False, "pid": pid, "error": "no SVID within %ss: %s" % (a.timeout, last),
                              "elapsed_ms": round((time.monotonic() - t0) * 1000, 1), "last_probe": last}))
            return 1
        time.sleep(a.interval)


def cmd_freeport(_a):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd_name", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("socket")
    f.set_defaults(func=cmd_fetch)
    w = sub.add_parser("wait")
    w.add_argument("socket")
    w.add_argument("--timeout", type=float, default=60.0)
    w.add_argument("--interval", type=float, default=0.2)
    w.add_argument("--expect-id", action="append")
    w.add_argument("--max-ttl", type=float)
    w.add_argument("--denied", action="store_true",
                   help="wait until the caller (this probe) gets no SVID (an error status)")
    w.set_defaults(func=cmd_wait)
    r = sub.add_parser("rotation")
    r.add_argument("socket")
    r.add_argument("--timeout", type=float, default=60.0)
    r.add_argument("--interval", type=float, default=0.1)
    r.set_defaults(func=cmd_rotation)
    s = sub.add_parser("startup")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--socket", required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--interval", type=float, default=0.001)
    s.set_defaults(func=cmd_startup)
    aw = sub.add_parser("await-id")
    aw.add_argument("socket")
    aw.add_argument("--id", required=True)
    aw.add_argument("--timeout", type=float, default=60.0)
    aw.set_defaults(func=cmd_await_id)
    fp = sub.add_parser("freeport")
    fp.set_defaults(func=cmd_freeport)
    a = p.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
