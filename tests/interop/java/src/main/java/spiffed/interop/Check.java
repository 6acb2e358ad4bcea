package spiffed.interop;

import io.spiffe.bundle.jwtbundle.JwtBundle;
import io.spiffe.bundle.x509bundle.X509Bundle;
import io.spiffe.svid.jwtsvid.JwtSvid;
import io.spiffe.svid.x509svid.X509Svid;
import io.spiffe.svid.x509svid.X509SvidValidator;
import io.spiffe.workloadapi.DefaultJwtSource;
import io.spiffe.workloadapi.DefaultWorkloadApiClient;
import io.spiffe.workloadapi.DefaultX509Source;
import io.spiffe.workloadapi.JwtSource;
import io.spiffe.workloadapi.JwtSourceOptions;
import io.spiffe.workloadapi.WorkloadApiClient;

import java.nio.charset.StandardCharsets;
import java.security.Signature;
import java.security.cert.X509Certificate;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Set;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.logging.ConsoleHandler;
import java.util.logging.Formatter;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogManager;
import java.util.logging.LogRecord;
import java.util.logging.Logger;

/**
 * java-spiffe interop checks against a running Workload API server.
 *
 * <pre>
 *   java -cp ... spiffed.interop.Check MODE SOCKET
 *     MODE all         x509 + jwt (caller must have an identity)
 *     MODE noidentity  the caller must have no identity: PermissionDenied expected
 * </pre>
 *
 * Prints one line per check, "PASS name" or "FAIL name: reason", and exits 1 if any check failed.
 * Diagnostics (java-spiffe's own log records, one line each) go to stderr.
 */
public final class Check {

    static final String AUDIENCE = "interop";
    static final Duration INIT_TIMEOUT = Duration.ofSeconds(10);
    static final long CHECK_TIMEOUT_SECONDS = 30;

    private static int failures = 0;

    private Check() {
    }

    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: Check all|noidentity SOCKET_PATH_OR_URI");
            System.exit(2);
        }
        configureLogging();
        String address = toAddress(args[1]);
        System.err.println("# java-spiffe workload API address: " + address);

        switch (args[0]) {
            case "all":
                run("x509", () -> checkX509(address));
                run("jwt", () -> checkJwt(address));
                break;
            case "noidentity":
                run("noidentity", () -> checkNoIdentity(address));
                break;
            default:
                System.err.println("unknown mode: " + args[0]);
                System.exit(2);
        }
        System.out.flush();
        // java-spiffe leaves non-daemon executor threads behind on failure paths.
        System.exit(failures == 0 ? 0 : 1);
    }

    /** A check returns null on success or a failure reason. */
    private static void run(String name, Callable<String> check) {
        ExecutorService ex = Executors.newSingleThreadExecutor(r -> {
            Thread t = new Thread(r, "check-" + name);
            t.setDaemon(true);
            return t;
        });
        String reason;
        try {
            Future<String> f = ex.submit(check);
            reason = f.get(CHECK_TIMEOUT_SECONDS, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            reason = "check did not finish within " + CHECK_TIMEOUT_SECONDS + "s";
        } catch (java.util.concurrent.ExecutionException e) {
            reason = describe(e.getCause());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            reason = "interrupted";
        } finally {
            ex.shutdownNow();
        }
        if (reason == null) {
            System.out.println("PASS " + name);
        } else {
            failures++;
            System.out.println("FAIL " + name + ": " + oneLine(reason));
        }
        System.out.flush();
    }

    // ---------------------------------------------------------------- x509

    private static String checkX509(String address) throws Exception {
        DefaultX509Source.X509SourceOptions opts = DefaultX509Source.X509SourceOptions.builder()
                .spiffeSocketPath(address)
                .initTimeout(INIT_TIMEOUT)
                .build();
        DefaultX509Source source;
        try {
            source = DefaultX509Source.newSource(opts);
        } catch (Exception e) {
            return "DefaultX509Source.newSource: " + describe(e) + diagnoseX509(address);
        }
        try {
            X509Svid svid = source.getX509Svid();
            if (svid == null) {
                return "source returned no X.509 SVID";
            }
            String id = svid.getSpiffeId().toString();
            List<X509Certificate> chain = svid.getChain();
            if (chain.isEmpty()) {
                return "empty SVID chain for " + id;
            }
            X509Certificate leaf = svid.getLeaf();
            if (leaf.getBasicConstraints() != -1) {
                return "leaf certificate is a CA";
            }
            X509Bundle bundle = source.getBundleForTrustDomain(svid.getSpiffeId().getTrustDomain());
            if (bundle.getX509Authorities().isEmpty()) {
                return "bundle for " + bundle.getTrustDomain() + " has no X.509 authorities";
            }
            // Path validation (PKIX) of the chain against the bundle of the SVID's trust domain.
            X509SvidValidator.verifyChain(chain, source);
            // The SPIFFE ID in the leaf's URI SAN is the one the source reports.
            X509SvidValidator.verifySpiffeId(leaf, () -> Set.of(svid.getSpiffeId()));
            // The private key belongs to the leaf.
            String alg = "EC".equals(svid.getPrivateKey().getAlgorithm()) ? "SHA256withECDSA" : "SHA256withRSA";
            byte[] msg = "spiffed interop".getBytes(StandardCharsets.UTF_8);
            Signature signer = Signature.getInstance(alg);
            signer.initSign(svid.getPrivateKey());
            signer.update(msg);
            byte[] sig = signer.sign();
            Signature verifier = Signature.getInstance(alg);
            verifier.initVerify(leaf.getPublicKey());
            verifier.update(msg);
            if (!verifier.verify(sig)) {
                return "private key does not match the leaf certificate";
            }
            String expected = System.getenv("EXPECTED_SPIFFE_ID");
            if (expected != null && !expected.isEmpty() && !expected.equals(id)) {
                return "SPIFFE ID " + id + ", expected " + expected;
            }
            System.err.printf("# x509: %s, chain %d cert(s), bundle %s with %d authority(ies), notAfter %s%n",
                    id, chain.size(), bundle.getTrustDomain(), bundle.getX509Authorities().size(),
                    leaf.getNotAfter().toInstant());
            return null;
        } finally {
            source.close();
        }
    }

    /** One blocking FetchX509SVID through a plain client, to surface the gRPC status behind a source timeout. */
    private static String diagnoseX509(String address) {
        WorkloadApiClient client = null;
        try {
            client = DefaultWorkloadApiClient.newClient(
                    DefaultWorkloadApiClient.ClientOptions.builder().spiffeSocketPath(address).build());
            client.fetchX509Context();
            return " (a direct fetchX509Context succeeded)";
        } catch (Exception e) {
            return " (direct fetchX509Context: " + describe(e) + ")";
        } finally {
            closeQuietly(client);
        }
    }

    // ----------------------------------------------------------------- jwt

    /** One FetchJWTSVID and one FetchJWTBundles through a plain client, to surface the gRPC status. */
    private static String diagnoseJwt(String address) {
        WorkloadApiClient client = null;
        StringBuilder sb = new StringBuilder();
        try {
            client = DefaultWorkloadApiClient.newClient(
                    DefaultWorkloadApiClient.ClientOptions.builder().spiffeSocketPath(address).build());
            try {
                client.fetchJwtSvid(AUDIENCE);
                sb.append(" (a direct fetchJwtSvid succeeded");
            } catch (Exception e) {
                sb.append(" (direct fetchJwtSvid: ").append(describe(e));
            }
            try {
                client.fetchJwtBundles();
                sb.append("; a direct fetchJwtBundles succeeded)");
            } catch (Exception e) {
                sb.append("; direct fetchJwtBundles: ").append(describe(e)).append(")");
            }
            return sb.toString();
        } catch (Exception e) {
            return " (client: " + describe(e) + ")";
        } finally {
            closeQuietly(client);
        }
    }

    private static String checkJwt(String address) throws Exception {
        JwtSourceOptions opts = JwtSourceOptions.builder()
                .spiffeSocketPath(address)
                .initTimeout(INIT_TIMEOUT)
                .build();
        JwtSource source;
        try {
            source = DefaultJwtSource.newSource(opts);
        } catch (Exception e) {
            return "DefaultJwtSource.newSource: " + describe(e) + diagnoseJwt(address);
        }
        try {
            JwtSvid svid;
            try {
                svid = source.fetchJwtSvid(AUDIENCE);
            } catch (Exception e) {
                return "fetchJwtSvid(" + AUDIENCE + "): " + describe(e);
            }
            String token = svid.getToken();
            if (token == null || token.split("\\.", -1).length != 3) {
                return "JWT-SVID is not a JWS compact token";
            }
            // Signature, exp, aud and sub checked against the JWT bundle the source keeps.
            JwtSvid validated;
            try {
                validated = JwtSvid.parseAndValidate(token, source, Collections.singleton(AUDIENCE));
            } catch (Exception e) {
                return "JwtSvid.parseAndValidate: " + describe(e);
            }
            if (!validated.getSpiffeId().equals(svid.getSpiffeId())) {
                return "validated sub " + validated.getSpiffeId() + " differs from " + svid.getSpiffeId();
            }
            if (!validated.getAudience().contains(AUDIENCE)) {
                return "aud " + validated.getAudience() + " lacks " + AUDIENCE;
            }
            JwtBundle bundle = source.getBundleForTrustDomain(validated.getSpiffeId().getTrustDomain());
            String expected = System.getenv("EXPECTED_SPIFFE_ID");
            if (expected != null && !expected.isEmpty() && !expected.equals(validated.getSpiffeId().toString())) {
                return "SPIFFE ID " + validated.getSpiffeId() + ", expected " + expected;
            }
            System.err.printf("# jwt: %s aud=%s exp=%s, bundle %s with %d key(s)%n",
                    validated.getSpiffeId(), validated.getAudience(), validated.getExpiry().toInstant(),
                    bundle.getTrustDomain(), bundle.getJwtAuthorities().size());
            return null;
        } finally {
            source.close();
        }
    }

    // ---------------------------------------------------------- noidentity

    private static String checkNoIdentity(String address) throws Exception {
        WorkloadApiClient client = DefaultWorkloadApiClient.newClient(
                DefaultWorkloadApiClient.ClientOptions.builder().spiffeSocketPath(address).build());
        List<String> problems = new ArrayList<>();
        try {
            try {
                X509Svid svid = client.fetchX509Context().getDefaultSvid();
                problems.add("fetchX509Context succeeded with " + svid.getSpiffeId());
            } catch (Exception e) {
                String d = describe(e);
                System.err.println("# noidentity x509: " + d);
                if (!d.contains("PERMISSION_DENIED")) {
                    problems.add("fetchX509Context: expected PERMISSION_DENIED, got " + d);
                }
            }
            try {
                JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
                problems.add("fetchJwtSvid succeeded with " + svid.getSpiffeId());
            } catch (Exception e) {
                String d = describe(e);
                System.err.println("# noidentity jwt: " + d);
                if (!d.contains("PERMISSION_DENIED")) {
                    problems.add("fetchJwtSvid: expected PERMISSION_DENIED, got " + d);
                }
            }
        } finally {
            client.close();
        }
        return problems.isEmpty() ? null : String.join("; ", problems);
    }

    // ------------------------------------------------------------- helpers

    static void closeQuietly(java.io.Closeable c) {
        if (c == null) {
            return;
        }
        try {
            c.close();
        } catch (Exception e) {
            System.err.println("# close: " + describe(e));
        }
    }

    static String toAddress(String arg) {
        if (arg.startsWith("unix:") || arg.startsWith("tcp:")) {
            return arg;
        }
        return "unix://" + java.nio.file.Paths.get(arg).toAbsolutePath().normalize();
    }

    /** Exception chain as "Class: message <- Class: message ...", deduplicating repeated messages. */
    static String describe(Throwable t) {
        StringBuilder sb = new StringBuilder();
        String last = null;
        for (Throwable c = t; c != null; c = c.getCause()) {
            String part = c.getClass().getSimpleName() + (c.getMessage() == null ? "" : ": " + c.getMessage());
            if (last != null && c.getMessage() != null && last.contains(c.getMessage())) {
                continue;
            }
            if (sb.length() > 0) {
                sb.append(" <- ");
            }
            sb.append(part);
            last = part;
            if (c.getCause() == c) {
                break;
            }
        }
        return sb.toString();
    }

    static String oneLine(String s) {
        return s.replaceAll("\\s*\\R\\s*", " | ");
    }

    /** java-spiffe logs through java.util.logging; keep WARNING and above, one line per record, on stderr. */
    private static void configureLogging() {
        LogManager.getLogManager().reset();
        Logger root = Logger.getLogger("");
        Handler h = new ConsoleHandler();
        h.setLevel(Level.ALL);
        h.setFormatter(new Formatter() {
            @Override
            public String format(LogRecord r) {
                String msg = formatMessage(r);
                if (r.getThrown() != null) {
                    msg += ": " + describe(r.getThrown());
                }
                return "# log " + r.getLevel() + " " + r.getLoggerName() + ": " + oneLine(msg) + "\n";
            }
        });
        root.addHandler(h);
        String lvl = System.getenv("JAVA_SPIFFE_LOG_LEVEL");
        root.setLevel(lvl == null || lvl.isEmpty() ? Level.WARNING : Level.parse(lvl));
    }
}
