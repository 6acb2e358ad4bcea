#!/usr/bin/env python3
"""Interop checks of spiffed against py-spiffe (PyPI `spiffe`), the reference Python client.

Usage: check.py --socket unix:///path/api.sock [--check x509,jwt,...]

Every check prints one line, "PASS name" or "FAIL name: reason" (a PASS may carry a detail
after a colon); the exit status is 1 when any check failed. Without --check the checks for a
caller that has an identity run (x509, mtls, jwt, validate, bundles, rotation). The noidentity checks
expect a caller that matches no entry (run them under another uid) and must be asked for.

py-spiffe talks gRPC through grpc core (grpcio), which sends the percent-encoded socket path as
the HTTP/2 :authority; this is what CONFORMANCE item 11 is about.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from spiffe import JwtSource, JwtSvid, SpiffeId, WorkloadApiClient
from spiffe.workloadapi.x509_context import X509Context

DEFAULT_CHECKS = ["x509", "mtls", "jwt", "validate", "bundles", "rotation"]


class CheckError(Exception):
    pass


def one_line(s: str) -> str:
    return " ".join(str(s).split())


def describe(err: BaseException) -> str:
    """The error text py-spiffe gives, plus the gRPC status underneath when there is one."""
    text = f"{type(err).__name__}: {err}"
    code = grpc_code(err)
    if code is not None and str(code) not in text:
        text += f" [{code}]"
    return text


def grpc_code(err: BaseException) -> Optional[grpc.StatusCode]:
    """The gRPC status code of a py-spiffe error (py-spiffe chains the grpc.RpcError)."""
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, grpc.Call):
            return e.code()
        e = e.__cause__ or e.__context__
    return None


def force_authority(authority: str) -> None:
    """Diagnostic only (never used by run.sh): make grpc core send this :authority instead of
    the percent-encoded socket path, to tell the CONFORMANCE item 11 failure apart from any
    other one. py-spiffe builds its channel with grpc.insecure_channel(target) and no options."""
    original = grpc.insecure_channel

    def insecure_channel(target, options=None, compression=None):  # type: ignore[no-untyped-def]
        opts = list(options or []) + [("grpc.default_authority", authority)]
        return original(target, options=opts, compression=compression)

    grpc.insecure_channel = insecure_channel


class Checks:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.want = SpiffeId(args.expect_id)
        self._client: Optional[WorkloadApiClient] = None

    @property
    def client(self) -> WorkloadApiClient:
        if self._client is None:
            if self.args.force_authority:
                force_authority(self.args.force_authority)
            self._client = WorkloadApiClient(self.args.socket, default_timeout=self.args.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- helpers ---------------------------------------------------------------------------

    def verify_context(self, ctx: X509Context) -> Tuple[object, List[x509.Certificate]]:
        """Checks the default SVID like a relying party: ID, bundle present, the chain passes
        RFC 5280 path validation (cryptography's verifier, client-auth policy) to the bundle's
        roots now, and the private key belongs to the leaf. py-spiffe's own parse already checked
        the SPIFFE leaf and signing-certificate rules."""
        if not ctx.x509_svids:
            raise CheckError("response holds no SVID")
        svid = ctx.default_svid
        if svid.spiffe_id != self.want:
            raise CheckError(f"default SVID is {svid.spiffe_id}, want {self.want}")
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(self.want.trust_domain)
        if bundle is None:
            raise CheckError(f"bundle set has no bundle for {self.want.trust_domain}")
        roots = list(bundle.x509_authorities)
        if not roots:
            raise CheckError("the bundle holds no X.509 authority")
        chain = svid.cert_chain
        leaf, intermediates = chain[0], chain[1:]
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(roots))
            .time(datetime.datetime.now(datetime.timezone.utc))
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except verification.VerificationError as e:
            raise CheckError(f"chain does not verify against the bundle: {e}") from e
        uris = [
            n.value for n in verified.subjects or [] if isinstance(n, x509.UniformResourceIdentifier)
        ]
        if uris != [str(self.want)]:
            raise CheckError(f"verified leaf names {uris}, want [{self.want}]")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if svid.private_key.public_key().public_bytes(enc, pub) != leaf.public_key().public_bytes(
            enc, pub
        ):
            raise CheckError("the private key does not belong to the leaf certificate")
        return svid, roots

    def fetch_token(self) -> JwtSvid:
        try:
            return self.client.fetch_jwt_svid({self.args.audience})
        except Exception as e:
            raise CheckError(f"fetch_jwt_svid: {describe(e)}") from e

    # -- checks ----------------------------------------------------------------------------

    def check_x509(self) -> str:
        try:
            ctx = self.client.fetch_x509_context()
        except Exception as e:
            raise CheckError(f"fetch_x509_context: {describe(e)}") from e
        svid, roots = self.verify_context(ctx)
        leaf = svid.leaf
        return (
            f"{svid.spiffe_id} serial {leaf.serial_number:x}, chain {len(svid.cert_chain)} "
            f"cert(s), {len(roots)} root(s) in bundle"
        )

    def check_mtls(self) -> str:
        """A TLS handshake through Python's ssl module (OpenSSL) over a socketpair, the SVID on
        both sides and the bundle as trust anchors: OpenSSL's purpose checks (EKU serverAuth on
        the server side, clientAuth on the client side) must accept it."""
        try:
            ctx = self.client.fetch_x509_context()
        except Exception as e:
            raise CheckError(f"fetch_x509_context: {describe(e)}") from e
        svid, roots = self.verify_context(ctx)
        with tempfile.TemporaryDirectory(prefix="spiffed-interop-") as d:
            cert_path, key_path, bundle_path = (
                os.path.join(d, n) for n in ("svid.pem", "svid.key", "bundle.pem")
            )
            with open(cert_path, "wb") as f:
                for c in svid.cert_chain:
                    f.write(c.public_bytes(serialization.Encoding.PEM))
            with open(key_path, "wb") as f:
                f.write(
                    svid.private_key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            with open(bundle_path, "wb") as f:
                for c in roots:
                    f.write(c.public_bytes(serialization.Encoding.PEM))

            server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_ctx.verify_mode = ssl.CERT_REQUIRED
            client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client_ctx.check_hostname = False  # SVIDs carry URI SANs; the ID is checked below
            for c in (server_ctx, client_ctx):
                c.minimum_version = ssl.TLSVersion.TLSv1_2
                c.load_cert_chain(cert_path, key_path)
                c.load_verify_locations(cafile=bundle_path)

            a, b = socket.socketpair()
            a.settimeout(self.args.timeout)
            b.settimeout(self.args.timeout)
            result: Dict[str, object] = {}

            def serve() -> None:
                try:
                    with server_ctx.wrap_socket(a, server_side=True) as s:
                        result["peer"] = s.getpeercert()
                        result["data"] = s.recv(4)
                except Exception as e:  # reported below
                    result["error"] = e

            t = threading.Thread(target=serve, daemon=True)
            t.start()
            try:
                with client_ctx.wrap_socket(b, server_side=False) as s:
                    server_peer = s.getpeercert()
                    version = s.version()
                    s.sendall(b"ping")
            except Exception as e:
                a.close()
                t.join(self.args.timeout)
                raise CheckError(
                    f"client handshake: {e} (server: {result.get('error')})"
                ) from e
            t.join(self.args.timeout)
            if "error" in result:
                raise CheckError(f"server handshake: {result['error']}")
            if result.get("data") != b"ping":
                raise CheckError(f"server read {result.get('data')!r}")

        def uri_sans(cert: object) -> List[str]:
            if not isinstance(cert, dict):
                return []
            return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]

        for side, cert in (("client", server_peer), ("server", result.get("peer"))):
            if uri_sans(cert) != [str(self.want)]:
                raise CheckError(f"the {side} saw peer URI SANs {uri_sans(cert)}")
        return f"{self.want}, {version} ({ssl.OPENSSL_VERSION})"

    def check_jwt(self) -> str:
        token = self.fetch_token()
        try:
            source = JwtSource(workload_api_client=self.client, timeout_in_seconds=self.args.timeout)
        except Exception as e:
            raise CheckError(f"JwtSource: {describe(e)}") from e
        try:
            bundle = source.get_bundle_for_trust_domain(self.want.trust_domain)
        finally:
            source.close()
        if bundle is None:
            raise CheckError(f"JwtSource has no JWT bundle for {self.want.trust_domain}")
        try:
            parsed = JwtSvid.parse_and_validate(token.token, bundle, {self.args.audience})
        except Exception as e:
            raise CheckError(f"JwtSvid.parse_and_validate: {describe(e)}") from e
        if parsed.spiffe_id != self.want:
            raise CheckError(f"token subject {parsed.spiffe_id}, want {self.want}")
        try:
            JwtSvid.parse_and_validate(token.token, bundle, {"not-" + self.args.audience})
        except Exception:
            pass
        else:
            raise CheckError("parse_and_validate accepted the token for a foreign audience")
        return (
            f"{parsed.spiffe_id} aud {sorted(parsed.audience)}, expires in "
            f"{parsed.expiry - int(time.time())}s, {len(bundle.jwt_authorities)} key(s) in bundle"
        )

    def check_validate(self) -> str:
        token = self.fetch_token()
        try:
            got = self.client.validate_jwt_svid(token.token, self.args.audience)
        except Exception as e:
            raise CheckError(f"validate_jwt_svid: {describe(e)}") from e
        if got.spiffe_id != self.want:
            raise CheckError(f"validate_jwt_svid returned {got.spiffe_id}, want {self.want}")
        try:
            self.client.validate_jwt_svid(token.token, "not-" + self.args.audience)
        except Exception as e:
            if grpc_code(e) != grpc.StatusCode.INVALID_ARGUMENT:
                raise CheckError(
                    f"validate_jwt_svid with a foreign audience: want INVALID_ARGUMENT, got "
                    f"{describe(e)}"
                ) from e
            refused = describe(e)
        else:
            raise CheckError("validate_jwt_svid accepted the token for a foreign audience")
        return f"{got.spiffe_id}; foreign audience refused: {refused}"

    def check_bundles(self) -> str:
        """The two bundle streams: FetchX509Bundles must carry authorities the default SVID
        verifies against, FetchJWTBundles the key that signed a fresh JWT-SVID."""
        td = self.want.trust_domain
        try:
            x509_bundles = self.client.fetch_x509_bundles()
        except Exception as e:
            raise CheckError(f"fetch_x509_bundles: {describe(e)}") from e
        bundle = x509_bundles.get_bundle_for_trust_domain(td)
        if bundle is None or not bundle.x509_authorities:
            raise CheckError(f"fetch_x509_bundles: no X.509 authority for {td}")
        try:
            ctx = self.client.fetch_x509_context()
        except Exception as e:
            raise CheckError(f"fetch_x509_context: {describe(e)}") from e
        svid, _ = self.verify_context(ctx)
        ctx_from_bundles = X509Context([svid], x509_bundles)
        try:
            self.verify_context(ctx_from_bundles)
        except CheckError as e:
            raise CheckError(f"against the fetch_x509_bundles bundle: {e}") from e
        try:
            jwt_bundles = self.client.fetch_jwt_bundles()
        except Exception as e:
            raise CheckError(f"fetch_jwt_bundles: {describe(e)}") from e
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(td)
        if jwt_bundle is None or not jwt_bundle.jwt_authorities:
            raise CheckError(f"fetch_jwt_bundles: no JWT authority for {td}")
        token = self.fetch_token()
        try:
            JwtSvid.parse_and_validate(token.token, jwt_bundle, {self.args.audience})
        except Exception as e:
            raise CheckError(
                f"JWT-SVID against the fetch_jwt_bundles bundle: {describe(e)}"
            ) from e
        return (
            f"{td}: {len(bundle.x509_authorities)} X.509 authorities, "
            f"{len(jwt_bundle.jwt_authorities)} JWT key(s)"
        )

    def check_rotation(self) -> str:
        serials: List[int] = []
        errors: List[str] = []
        done = threading.Event()
        lock = threading.Lock()

        def on_success(ctx: X509Context) -> None:
            with lock:
                try:
                    svid, _ = self.verify_context(ctx)
                except Exception as e:
                    errors.append(f"update: {e}")
                    done.set()
                    return
                serial = svid.leaf.serial_number
                if not serials or serials[-1] != serial:
                    serials.append(serial)
                if len(serials) > self.args.rotations:
                    done.set()

        def on_error(err: Exception) -> None:
            with lock:
                errors.append(describe(err))
            done.set()

        start = time.monotonic()
        handler = self.client.stream_x509_contexts(on_success, on_error, retry_connect=False)
        try:
            done.wait(self.args.rotation_within)
        finally:
            handler.cancel()
        elapsed = time.monotonic() - start
        with lock:
            if errors:
                raise CheckError(f"stream_x509_contexts: {'; '.join(errors)}")
            if len(serials) <= self.args.rotations:
                raise CheckError(
                    f"{max(len(serials) - 1, 0)} new SVID(s) within {self.args.rotation_within}s, "
                    f"want {self.args.rotations} (serials seen: {[f'{s:x}' for s in serials]})"
                )
            if self.args.rotations == 1:
                return f"serial {serials[0]:x} -> {serials[1]:x} after {elapsed:.1f}s"
            return (
                f"{self.args.rotations} SVID changes, each verified against its bundle, "
                f"in {elapsed:.1f}s"
            )

    def _expect_permission_denied(self, rpc: str, call: Callable[[], object]) -> str:
        try:
            call()
        except Exception as e:
            if grpc_code(e) != grpc.StatusCode.PERMISSION_DENIED:
                raise CheckError(f"{rpc}: want PERMISSION_DENIED, got {describe(e)}") from e
            return f"{rpc} as uid {os.getuid()}: {describe(e)}"
        raise CheckError(f"{rpc} succeeded for a caller with no identity (uid {os.getuid()})")

    def check_noidentity(self) -> str:
        return self._expect_permission_denied("fetch_x509_svid", self.client.fetch_x509_svid)

    def check_noidentity_bundles(self) -> str:
        x509 = self._expect_permission_denied("fetch_x509_bundles", self.client.fetch_x509_bundles)
        jwt = self._expect_permission_denied("fetch_jwt_bundles", self.client.fetch_jwt_bundles)
        return f"{x509}; {jwt}"

    def check_noidentity_jwt(self) -> str:
        return self._expect_permission_denied(
            "fetch_jwt_svid", lambda: self.client.fetch_jwt_svid({self.args.audience})
        )


REGISTRY: Dict[str, Callable[[Checks], str]] = {
    "x509": Checks.check_x509,
    "mtls": Checks.check_mtls,
    "jwt": Checks.check_jwt,
    "validate": Checks.check_validate,
    "bundles": Checks.check_bundles,
    "rotation": Checks.check_rotation,
    "noidentity": Checks.check_noidentity,
    "noidentity-jwt": Checks.check_noidentity_jwt,
    "noidentity-bundles": Checks.check_noidentity_bundles,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--socket",
        default=os.environ.get("SPIFFE_ENDPOINT_SOCKET"),
        help="Workload API address (unix:///path); defaults to SPIFFE_ENDPOINT_SOCKET",
    )
    p.add_argument(
        "--check",
        default="",
        help=f"comma-separated checks (default {','.join(DEFAULT_CHECKS)}); "
        f"known: {','.join(sorted(REGISTRY))}",
    )
    p.add_argument("--expect-id", default="spiffe://example.org/interop")
    p.add_argument("--audience", default="interop")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    p.add_argument("--rotation-within", type=float, default=10.0)
    p.add_argument(
        "--rotations",
        type=int,
        default=1,
        help="SVID changes the rotation check waits for (raise it for a soak run)",
    )
    p.add_argument(
        "--force-authority",
        metavar="AUTHORITY",
        help="diagnostic only: have grpc core send this HTTP/2 :authority (e.g. localhost) "
        "instead of the percent-encoded socket path; not a conformance run",
    )
    args = p.parse_args()
    if not args.socket:
        print("check.py: no socket: pass --socket unix:///path or set SPIFFE_ENDPOINT_SOCKET",
              file=sys.stderr)
        return 2
    names = DEFAULT_CHECKS if args.check in ("", "all") else args.check.split(",")

    checks = Checks(args)
    failed = False
    try:
        for name in (n.strip() for n in names):
            fn = REGISTRY.get(name)
            if fn is None:
                print(f"FAIL {name}: unknown check (known: {','.join(sorted(REGISTRY))})")
                failed = True
                continue
            try:
                detail = fn(checks)
            except CheckError as e:
                failed = True
                print(f"FAIL {name}: {one_line(str(e))}", flush=True)
            except Exception as e:  # a bug in the check or an unexpected library error
                failed = True
                print(f"FAIL {name}: unexpected {one_line(describe(e))}", flush=True)
            else:
                print(f"PASS {name}: {one_line(detail)}" if detail else f"PASS {name}", flush=True)
    finally:
        checks.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
