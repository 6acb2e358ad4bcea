#!/usr/bin/env bash
# Interop check: SPIRE's own CLI (`spire-agent api ...`, a go-spiffe client) against a running
# Workload API server.
#
#   tests/interop/spire/check.sh SOCKET_PATH
#
# Builds spire-agent from the pinned module in tool/ (go.mod/go.sum) into a cache outside the
# checkout, or reuses the cached binary, then prints one line per check:
#   PASS name | FAIL name: reason
# and exits 1 if any check failed (2 on usage or build errors).
#
# Environment:
#   SPIFFED_INTEROP_CACHE  cache dir (default ~/.cache/spiffed-interop)
#   EXPECTED_SPIFFE_ID     if set, the SPIFFE ID the caller must get
#   WATCH_SECONDS          how long `api watch` runs (default 8; needs SVID TTL short enough
#                          for a rotation in that window, e.g. x509_svid_ttl = "6s")
#   NOIDENTITY_UID         uid with no registration entry (default 65534); needs root + setpriv
set -euo pipefail

SPIRE_VERSION=v1.13.3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOL_DIR="$HERE/tool"
CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
BIN_DIR="$CACHE/spire/$SPIRE_VERSION/bin"
BIN="$BIN_DIR/spire-agent"
WATCH_SECONDS="${WATCH_SECONDS:-8}"
NOIDENTITY_UID="${NOIDENTITY_UID:-65534}"
AUDIENCE=interop

if [[ $# -ne 1 ]]; then
    echo "usage: $0 SOCKET_PATH" >&2
    exit 2
fi
SOCKET="$1"
if [[ "$SOCKET" == unix:* ]]; then
    SOCKET="${SOCKET#unix:}"
    SOCKET="/${SOCKET#"${SOCKET%%[!/]*}"}"   # unix:///p or unix:/p -> /p
fi

log() { echo "# $*" >&2; }

# ------------------------------------------------------------------ build or reuse spire-agent
build_spire_agent() {
    if ! grep -q "github.com/spiffe/spire $SPIRE_VERSION" "$TOOL_DIR/go.mod"; then
        echo "tool/go.mod does not pin github.com/spiffe/spire $SPIRE_VERSION" >&2
        return 1
    fi
    mkdir -p "$CACHE/spire" "$CACHE/go/pkg/mod" "$CACHE/go-build"
    # Serialize concurrent builds of the same version.
    exec 9>"$CACHE/spire/.build-$SPIRE_VERSION.lock"
    flock 9
    if [[ -x "$BIN" ]]; then
        flock -u 9
        return 0
    fi
    local tmp start
    tmp="$(mktemp -d "$CACHE/spire/.gobin.XXXXXX")"
    start=$(date +%s)
    log "building spire-agent $SPIRE_VERSION (first build downloads many modules; minutes on 2 cores)"
    if ! (cd "$TOOL_DIR" &&
          GOBIN="$tmp" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$CACHE/go-build" GOFLAGS="-mod=readonly -buildvcs=false" \
          go install github.com/spiffe/spire/cmd/spire-agent) >&2; then
        rm -rf "$tmp"
        flock -u 9
        return 1
    fi
    mkdir -p "$BIN_DIR"
    mv "$tmp/spire-agent" "$BIN"
    rm -rf "$tmp"
    log "built spire-agent $SPIRE_VERSION in $(( $(date +%s) - start ))s -> $BIN"
    flock -u 9
}

if [[ ! -x "$BIN" ]]; then
    if ! command -v go >/dev/null; then
        echo "go not found; needed to build spire-agent" >&2
        exit 2
    fi
    build_spire_agent || { echo "building spire-agent failed" >&2; exit 2; }
else
    log "reusing cached $BIN"
fi

# ------------------------------------------------------------------------------------- checks
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
pass() { echo "PASS $1"; }
fail() {
    local name="$1"; shift
    # keep each result on one line
    echo "FAIL $name: $(printf '%s' "$*" | tr '\n\t' '  ' | sed 's/  */ /g')"
    FAILED=1
}

sa() { timeout 30 "$BIN" "$@"; }

# x509 --------------------------------------------------------------------------------------
check_x509() {
    local out rc=0
    out="$(sa api fetch x509 -socketPath "$SOCKET" 2>&1)" || rc=$?
    if [[ $rc -ne 0 ]]; then
        fail x509 "exit $rc: $out"; return
    fi
    local id
    id="$(printf '%s\n' "$out" | sed -n 's/^SPIFFE ID:[[:space:]]*//p' | head -1)"
    if [[ "$id" != spiffe://* ]]; then
        fail x509 "no SPIFFE ID in output: $out"; return
    fi
    if [[ -n "${EXPECTED_SPIFFE_ID:-}" && "$id" != "$EXPECTED_SPIFFE_ID" ]]; then
        fail x509 "got $id, expected $EXPECTED_SPIFFE_ID"; return
    fi
    if ! grep -q '^CA #1 Valid' <<<"$out"; then
        fail x509 "no CA in output: $out"; return
    fi
    log "x509: $id"
    pass x509
}

# x509-write --------------------------------------------------------------------------------
check_x509_write() {
    local dir="$WORK/x509" out rc=0
    mkdir -p "$dir"
    out="$(sa api fetch x509 -socketPath "$SOCKET" -write "$dir" 2>&1)" || rc=$?
    if [[ $rc -ne 0 ]]; then
        fail x509-write "exit $rc: $out"; return
    fi
    local f
    for f in svid.0.pem svid.0.key bundle.0.pem; do
        if [[ ! -s "$dir/$f" ]]; then
            fail x509-write "$f missing or empty (files: $(ls "$dir" | tr '\n' ' '))"; return
        fi
    done
    if command -v openssl >/dev/null; then
        local san e
        if ! san="$(openssl x509 -in "$dir/svid.0.pem" -noout -ext subjectAltName 2>&1)"; then
            fail x509-write "openssl cannot parse svid.0.pem: $san"; return
        fi
        if ! grep -q 'URI:spiffe://' <<<"$san"; then
            fail x509-write "leaf has no spiffe:// URI SAN: $san"; return
        fi
        if ! e="$(openssl pkey -in "$dir/svid.0.key" -noout 2>&1)"; then
            fail x509-write "openssl cannot parse svid.0.key: $e"; return
        fi
        if ! e="$(openssl x509 -in "$dir/bundle.0.pem" -noout 2>&1)"; then
            fail x509-write "openssl cannot parse bundle.0.pem: $e"; return
        fi
        # key matches leaf
        if [[ "$(openssl pkey -in "$dir/svid.0.key" -pubout 2>/dev/null)" != \
              "$(openssl x509 -in "$dir/svid.0.pem" -noout -pubkey 2>/dev/null)" ]]; then
            fail x509-write "svid.0.key does not match the leaf in svid.0.pem"; return
        fi
        # chain verifies against the bundle (leaf first, any intermediates after it)
        local leaf="$WORK/leaf.pem" inter="$WORK/inter.pem"
        awk -v leaf="$leaf" -v inter="$inter" '
            /-----BEGIN CERTIFICATE-----/ { n++ }
            { if (n == 1) print > leaf; else if (n > 1) print > inter }' "$dir/svid.0.pem"
        local vargs=(-CAfile "$dir/bundle.0.pem")
        [[ -s "$inter" ]] && vargs+=(-untrusted "$inter")
        if ! e="$(openssl verify "${vargs[@]}" "$leaf" 2>&1)"; then
            fail x509-write "openssl verify against bundle.0.pem failed: $e"; return
        fi
        log "x509-write: files parse with openssl; chain verifies against bundle.0.pem"
    else
        log "x509-write: openssl not found; checked the files exist only"
    fi
    pass x509-write
}

# jwt ---------------------------------------------------------------------------------------
TOKEN=""
check_jwt() {
    local out rc=0
    out="$(sa api fetch jwt -audience "$AUDIENCE" -socketPath "$SOCKET" -output json 2>&1)" || rc=$?
    if [[ $rc -ne 0 ]]; then
        fail jwt "exit $rc: $out"; return
    fi
    TOKEN="$(grep -oE 'eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+' <<<"$out" | head -1 || true)"
    if [[ -z "$TOKEN" ]]; then
        fail jwt "no JWS compact token in output: $out"; return
    fi
    if command -v python3 >/dev/null; then
        local verdict
        verdict="$(python3 - "$TOKEN" "$AUDIENCE" "${EXPECTED_SPIFFE_ID:-}" <<'EOF'
import base64, json, sys
tok, aud, want = sys.argv[1], sys.argv[2], sys.argv[3]
def dec(s):
    return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
h, p = dec(tok.split(".")[0]), dec(tok.split(".")[1])
a = p.get("aud"); a = [a] if isinstance(a, str) else (a or [])
errs = []
if aud not in a: errs.append("aud %r lacks %r" % (a, aud))
if not str(p.get("sub", "")).startswith("spiffe://"): errs.append("sub %r" % p.get("sub"))
if want and p.get("sub") != want: errs.append("sub %r, expected %r" % (p.get("sub"), want))
if "exp" not in p: errs.append("no exp")
if not h.get("kid"): errs.append("no kid in header")
print("; ".join(errs) if errs else "ok sub=%s alg=%s kid=%s" % (p.get("sub"), h.get("alg"), h.get("kid")))
EOF
)" || verdict="cannot decode token"
        if [[ "$verdict" != ok* ]]; then
            fail jwt "$verdict"; return
        fi
        log "jwt: $verdict"
    fi
    pass jwt
}

# validate ----------------------------------------------------------------------------------
check_validate() {
    if [[ -z "$TOKEN" ]]; then
        fail validate "no token (jwt check failed)"; return
    fi
    local out rc=0
    out="$(sa api validate jwt -audience "$AUDIENCE" -svid "$TOKEN" -socketPath "$SOCKET" 2>&1)" || rc=$?
    if [[ $rc -ne 0 ]]; then
        fail validate "exit $rc: $out"; return
    fi
    if ! grep -q 'SVID is valid' <<<"$out" || ! grep -q 'SPIFFE ID *: *spiffe://' <<<"$out"; then
        fail validate "unexpected output: $out"; return
    fi
    # The server must also refuse the same token for another audience.
    rc=0
    out="$(sa api validate jwt -audience not-"$AUDIENCE" -svid "$TOKEN" -socketPath "$SOCKET" 2>&1)" || rc=$?
    if [[ $rc -eq 0 ]]; then
        fail validate "token accepted for audience not-$AUDIENCE: $out"; return
    fi
    log "validate: wrong audience refused: $(tr '\n' ' ' <<<"$out")"
    pass validate
}

# watch -------------------------------------------------------------------------------------
check_watch() {
    local out rc=0
    out="$(timeout "$WATCH_SECONDS" "$BIN" api watch -socketPath "$SOCKET" 2>&1)" || rc=$?
    if [[ $rc -ne 124 ]]; then
        fail watch "api watch ended early with exit $rc: $out"; return
    fi
    local updates distinct
    updates="$(grep -cE '^Received [0-9]+ svid' <<<"$out" || true)"
    distinct="$(sed -n 's/^SVID Valid Until:[[:space:]]*//p' <<<"$out" | sort -u | wc -l)"
    if [[ "$updates" -lt 2 ]]; then
        fail watch "$updates SVID update(s) in ${WATCH_SECONDS}s, expected >= 2: $out"; return
    fi
    if [[ "$distinct" -lt 2 ]]; then
        fail watch "$updates updates but all carry the same SVID (no rotation seen)"; return
    fi
    log "watch: $updates updates, $distinct distinct SVIDs in ${WATCH_SECONDS}s"
    pass watch
}

# noidentity --------------------------------------------------------------------------------
check_noidentity() {
    if [[ $(id -u) -ne 0 ]] || ! command -v setpriv >/dev/null; then
        fail noidentity "needs root and setpriv to run as uid $NOIDENTITY_UID"; return
    fi
    # The cache may sit under a home dir the other uid cannot enter: run a private copy.
    local pdir="$WORK/nobody"
    mkdir -p "$pdir"
    cp "$BIN" "$pdir/spire-agent"
    chmod 755 "$WORK" "$pdir" "$pdir/spire-agent"
    local out rc=0
    out="$(cd / && timeout 30 setpriv --reuid="$NOIDENTITY_UID" --regid="$NOIDENTITY_UID" --clear-groups \
        "$pdir/spire-agent" api fetch x509 -socketPath "$SOCKET" 2>&1)" || rc=$?
    if [[ $rc -eq 0 ]]; then
        fail noidentity "uid $NOIDENTITY_UID got an SVID: $out"; return
    fi
    if ! grep -qiE 'PermissionDenied|no identity' <<<"$out"; then
        fail noidentity "exit $rc without PermissionDenied/no identity: $out"; return
    fi
    log "noidentity: $(tr '\n' ' ' <<<"$out")"
    pass noidentity
}

log "spire-agent $SPIRE_VERSION ($("$BIN" --version 2>&1 | head -1)) against $SOCKET"
check_x509
check_x509_write
check_jwt
check_validate
check_watch
check_noidentity
exit "$FAILED"
