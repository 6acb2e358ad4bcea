#!/usr/bin/env bash
# Interop check: java-spiffe (io.spiffe:java-spiffe-core, grpc-java over netty epoll) against a
# running Workload API server.
#
#   tests/interop/java/check.sh SOCKET_PATH
#
# Builds the Maven project here (mvn -q package) with its local repository and build output in a
# cache outside the checkout, then prints one line per check:
#   PASS name | FAIL name: reason
# and exits 1 if any check failed (2 on usage or build errors).
#   x509        DefaultX509Source: fetch, PKIX-validate the SVID chain against the bundle,
#               URI SAN, private key matches the leaf
#   jwt         DefaultJwtSource: fetch a JWT-SVID for audience "interop", validate it against
#               the JWT bundle (signature, aud, exp)
#   noidentity  as a uid with no entry (setpriv): FetchX509SVID and FetchJWTSVID must fail
#               with PERMISSION_DENIED
#
# Environment:
#   SPIFFED_INTEROP_CACHE  cache dir (default ~/.cache/spiffed-interop)
#   EXPECTED_SPIFFE_ID     if set, the SPIFFE ID the caller must get
#   NOIDENTITY_UID         uid with no registration entry (default 65534); needs root + setpriv
#   JAVA_SPIFFE_LOG_LEVEL  java.util.logging level for java-spiffe's records (default WARNING)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SPIFFED_INTEROP_CACHE:-$HOME/.cache/spiffed-interop}"
BUILD_DIR="$CACHE/java-build"
NOIDENTITY_UID="${NOIDENTITY_UID:-65534}"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 SOCKET_PATH" >&2
    exit 2
fi
SOCKET="$1"

log() { echo "# $*" >&2; }

for tool in mvn java; do
    if ! command -v "$tool" >/dev/null; then
        echo "$tool not found" >&2
        exit 2
    fi
done

# ------------------------------------------------------------------------------------- build
mkdir -p "$CACHE/m2"
exec 9>"$CACHE/.java-build.lock"
flock 9
start=$(date +%s)
# (Debian's Maven 3.8 prints stray ANSI resets even in batch mode: strip them)
if ! (cd "$HERE" && mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$CACHE/m2" -Dinterop.build.dir="$BUILD_DIR" package 2>&1 |
      sed -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d') >&2; then
    echo "maven build failed" >&2
    exit 2
fi
flock -u 9
log "mvn package took $(( $(date +%s) - start ))s"

JAR="$BUILD_DIR/java-spiffe-check-0.0.0.jar"
CP="$JAR:$BUILD_DIR/lib/*"
ver="$(ls "$BUILD_DIR/lib" | sed -n 's/^java-spiffe-core-\(.*\)\.jar$/\1/p')"
grpc="$(ls "$BUILD_DIR/lib" | sed -n 's/^grpc-netty-shaded-\(.*\)\.jar$/\1/p')"
log "java-spiffe-core $ver, grpc-netty-shaded $grpc, $(java -version 2>&1 | head -1)"

JAVA_OPTS=(-XX:-UsePerfData -Xshare:auto)
FAILED=0

# x509, jwt ---------------------------------------------------------------------------------
rc=0
java "${JAVA_OPTS[@]}" -cp "$CP" spiffed.interop.Check all "$SOCKET" || rc=$?
[[ $rc -eq 0 ]] || FAILED=1

# noidentity --------------------------------------------------------------------------------
if [[ $(id -u) -ne 0 ]] || ! command -v setpriv >/dev/null; then
    echo "FAIL noidentity: needs root and setpriv to run as uid $NOIDENTITY_UID"
    FAILED=1
else
    # The cache may sit under a home dir the other uid cannot enter: run from a private copy.
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    mkdir -p "$WORK/lib" "$WORK/tmp"
    cp "$JAR" "$WORK/check.jar"
    cp "$BUILD_DIR"/lib/*.jar "$WORK/lib/"
    chmod -R a+rX "$WORK"
    chmod 1777 "$WORK/tmp"
    rc=0
    (cd / && setpriv --reuid="$NOIDENTITY_UID" --regid="$NOIDENTITY_UID" --clear-groups \
        env HOME="$WORK/tmp" java "${JAVA_OPTS[@]}" -Djava.io.tmpdir="$WORK/tmp" \
        -cp "$WORK/check.jar:$WORK/lib/*" spiffed.interop.Check noidentity "$SOCKET") || rc=$?
    if [[ $rc -ne 0 && $rc -ne 1 ]]; then
        echo "FAIL noidentity: java exited $rc"
    fi
    [[ $rc -eq 0 ]] || FAILED=1
fi
exit "$FAILED"
