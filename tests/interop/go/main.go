// Command interop checks spiffed against go-spiffe, the reference Go client.
//
// Usage:
//
//	interop -socket unix:///path/api.sock [-check x509,jwt,...]
//
// Every check prints one line, "PASS name" or "FAIL name: reason" (a PASS may
// carry a detail after a colon); the exit status is 1 when any check failed.
// Without -check the checks for a caller that has an identity run
// (x509, mtls, jwt, validate, bundles, rotation). The noidentity checks expect a caller
// that matches no entry (run them under another uid) and must be asked for.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	socket   = flag.String("socket", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "Workload API address (unix:///path); defaults to SPIFFE_ENDPOINT_SOCKET")
	checks   = flag.String("check", "", "comma-separated checks to run (default: "+strings.Join(defaultChecks, ",")+"); known: "+strings.Join(knownChecks(), ","))
	expectID = flag.String("expect-id", "spiffe://example.org/interop", "SPIFFE ID the caller must receive as its default identity")
	audience = flag.String("audience", "interop", "JWT audience")
	timeout  = flag.Duration("timeout", 10*time.Second, "deadline for each one-shot check")
	rotateIn = flag.Duration("rotation-within", 10*time.Second, "the rotation check fails when fewer than -rotations new SVIDs arrive within this time")
	rotateN  = flag.Int("rotations", 1, "how many SVID changes the rotation check waits for (raise it, with -rotation-within, for a soak run across CA rotations)")
	peerSock = flag.String("peer-socket", "", "federated checks: the Workload API address of an agent of another trust domain that federates with this one")
	peerID   = flag.String("peer-id", "", "federated checks: the SPIFFE ID the caller receives from -peer-socket")
)

var defaultChecks = []string{"x509", "mtls", "jwt", "validate", "bundles", "rotation"}

var registry = map[string]func(context.Context) (string, error){
	"x509":               checkX509,
	"mtls":               checkMTLS,
	"jwt":                checkJWT,
	"validate":           checkValidate,
	"bundles":            checkBundles,
	"rotation":           checkRotation,
	"noidentity":         checkNoIdentity,
	"noidentity-jwt":     checkNoIdentityJWT,
	"noidentity-bundles": checkNoIdentityBundles,
	"federated-mtls":     checkFederatedMTLS,
	"federated-jwt":      checkFederatedJWT,
}

func knownChecks() []string {
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func main() {
	flag.Parse()
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "interop: no socket: pass -socket unix:///path or set SPIFFE_ENDPOINT_SOCKET")
		os.Exit(2)
	}
	names := defaultChecks
	if *checks != "" && *checks != "all" {
		names = strings.Split(*checks, ",")
	}
	failed := false
	for _, name := range names {
		name = strings.TrimSpace(name)
		fn, ok := registry[name]
		if !ok {
			fmt.Printf("FAIL %s: unknown check (known: %s)\n", name, strings.Join(knownChecks(), ","))
			failed = true
			continue
		}
		detail, err := fn(context.Background())
		switch {
		case err != nil:
			failed = true
			fmt.Printf("FAIL %s: %s\n", name, oneLine(err.Error()))
		case detail != "":
			fmt.Printf("PASS %s: %s\n", name, oneLine(detail))
		default:
			fmt.Printf("PASS %s\n", name)
		}
	}
	if failed {
		os.Exit(1)
	}
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func addr() workloadapi.ClientOption { return workloadapi.WithAddr(*socket) }

func wantID() (spiffeid.ID, error) {
	id, err := spiffeid.FromString(*expectID)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("bad -expect-id: %w", err)
	}
	return id, nil
}

// verifyContext checks the default SVID of an X.509 context the way a relying
// party would: x509svid.Verify of the chain against the bundle set that came
// with it, and the expected SPIFFE ID.
func verifyContext(xc *workloadapi.X509Context) (*x509svid.SVID, error) {
	want, err := wantID()
	if err != nil {
		return nil, err
	}
	if len(xc.SVIDs) == 0 {
		return nil, errors.New("response holds no SVID")
	}
	svid := xc.DefaultSVID()
	if svid.ID != want {
		return nil, fmt.Errorf("default SVID is %s, want %s", svid.ID, want)
	}
	if !xc.Bundles.Has(want.TrustDomain()) {
		return nil, fmt.Errorf("bundle set has no bundle for %s", want.TrustDomain())
	}
	id, chains, err := x509svid.Verify(svid.Certificates, xc.Bundles)
	if err != nil {
		return nil, fmt.Errorf("x509svid.Verify: %w", err)
	}
	if id != want {
		return nil, fmt.Errorf("x509svid.Verify returned %s, want %s", id, want)
	}
	if len(chains) == 0 {
		return nil, errors.New("x509svid.Verify returned no chain")
	}
	return svid, nil
}

func checkX509(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	xc, err := workloadapi.FetchX509Context(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchX509Context: %w", err)
	}
	svid, err := verifyContext(xc)
	if err != nil {
		return "", err
	}
	leaf := svid.Certificates[0]
	return fmt.Sprintf("%s serial %x, chain %d cert(s), valid %s", svid.ID, leaf.SerialNumber,
		len(svid.Certificates), leaf.NotAfter.Sub(leaf.NotBefore).Round(time.Second)), nil
}

// checkMTLS runs a TLS 1.3 handshake in memory with go-spiffe's tlsconfig on
// both sides, the SVID as client and server certificate: crypto/tls must accept
// the SVID's key usages, EKUs and chain.
func checkMTLS(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	xc, err := workloadapi.FetchX509Context(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchX509Context: %w", err)
	}
	svid, err := verifyContext(xc)
	if err != nil {
		return "", err
	}
	authorizer := tlsconfig.AuthorizeID(svid.ID)
	serverCfg := tlsconfig.MTLSServerConfig(svid, xc.Bundles, authorizer)
	clientCfg := tlsconfig.MTLSClientConfig(svid, xc.Bundles, authorizer)
	peerID, version, err := handshake(ctx, serverCfg, clientCfg)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s, %s", peerID, version), nil
}

// handshake runs a TLS server with serverCfg and a client with clientCfg over an
// in-memory pipe, sends "ping" from the client, and returns the SPIFFE ID of the
// client certificate the server saw and the TLS version.
func handshake(ctx context.Context, serverCfg, clientCfg *tls.Config) (spiffeid.ID, string, error) {
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	server := tls.Server(c1, serverCfg)
	client := tls.Client(c2, clientCfg)
	deadline, _ := ctx.Deadline()
	_ = server.SetDeadline(deadline)
	_ = client.SetDeadline(deadline)

	var wg sync.WaitGroup
	var serverErr error
	var peer []*x509.Certificate
	wg.Add(1)
	go func() {
		defer wg.Done()
		if serverErr = server.HandshakeContext(ctx); serverErr != nil {
			return
		}
		peer = server.ConnectionState().PeerCertificates
		buf := make([]byte, 4)
		if _, serverErr = io.ReadFull(server, buf); serverErr == nil && string(buf) != "ping" {
			serverErr = fmt.Errorf("server read %q", buf)
		}
	}()
	clientErr := client.HandshakeContext(ctx)
	if clientErr == nil {
		_, clientErr = client.Write([]byte("ping"))
	}
	if clientErr != nil {
		// Unblock the server side before waiting for it.
		c2.Close()
	}
	wg.Wait()
	if clientErr != nil {
		return spiffeid.ID{}, "", fmt.Errorf("client handshake: %w (server: %v)", clientErr, serverErr)
	}
	if serverErr != nil {
		return spiffeid.ID{}, "", fmt.Errorf("server handshake: %w", serverErr)
	}
	if len(peer) == 0 {
		return spiffeid.ID{}, "", errors.New("server saw no client certificate")
	}
	peerID, err := x509svid.IDFromCert(peer[0])
	if err != nil {
		return spiffeid.ID{}, "", fmt.Errorf("client certificate: %w", err)
	}
	return peerID, tls.VersionName(client.ConnectionState().Version), nil
}

func fetchToken(ctx context.Context) (*jwtsvid.SVID, error) {
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience}, addr())
	if err != nil {
		return nil, fmt.Errorf("FetchJWTSVID: %w", err)
	}
	return svid, nil
}

func checkJWT(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	want, err := wantID()
	if err != nil {
		return "", err
	}
	svid, err := fetchToken(ctx)
	if err != nil {
		return "", err
	}
	bundles, err := workloadapi.FetchJWTBundles(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchJWTBundles: %w", err)
	}
	parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{*audience})
	if err != nil {
		return "", fmt.Errorf("jwtsvid.ParseAndValidate: %w", err)
	}
	if parsed.ID != want {
		return "", fmt.Errorf("token subject %s, want %s", parsed.ID, want)
	}
	// A token for another audience must not validate.
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"not-" + *audience}); err == nil {
		return "", errors.New("jwtsvid.ParseAndValidate accepted the token for a foreign audience")
	}
	return fmt.Sprintf("%s aud %v, expires in %s", parsed.ID, parsed.Audience,
		time.Until(parsed.Expiry).Round(time.Second)), nil
}

func checkValidate(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	want, err := wantID()
	if err != nil {
		return "", err
	}
	svid, err := fetchToken(ctx)
	if err != nil {
		return "", err
	}
	got, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), *audience, addr())
	if err != nil {
		return "", fmt.Errorf("ValidateJWTSVID: %w", err)
	}
	if got.ID != want {
		return "", fmt.Errorf("ValidateJWTSVID returned %s, want %s", got.ID, want)
	}
	// The wrong audience must be refused by the server with InvalidArgument.
	_, err = workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), "not-"+*audience, addr())
	if err == nil {
		return "", errors.New("ValidateJWTSVID accepted the token for a foreign audience")
	}
	if status.Code(err) != codes.InvalidArgument {
		return "", fmt.Errorf("ValidateJWTSVID with a foreign audience: want InvalidArgument, got %w", err)
	}
	return fmt.Sprintf("%s; foreign audience refused: %v", got.ID, err), nil
}

// checkBundles uses the two bundle streams: FetchX509Bundles must carry the
// same authorities as the X.509 context, and FetchJWTBundles the key that signed
// a fresh JWT-SVID.
func checkBundles(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	want, err := wantID()
	if err != nil {
		return "", err
	}
	td := want.TrustDomain()
	xb, err := workloadapi.FetchX509Bundles(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchX509Bundles: %w", err)
	}
	bundle, ok := xb.Get(td)
	if !ok || len(bundle.X509Authorities()) == 0 {
		return "", fmt.Errorf("FetchX509Bundles: no X.509 authority for %s", td)
	}
	xc, err := workloadapi.FetchX509Context(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchX509Context: %w", err)
	}
	svid, err := verifyContext(xc)
	if err != nil {
		return "", err
	}
	// The same chain must verify against the bundle from the bundle stream. (The
	// two may differ for a moment while the CA rotates; the default SVID must
	// verify against both all the same.)
	if _, _, err := x509svid.Verify(svid.Certificates, xb); err != nil {
		return "", fmt.Errorf("SVID does not verify against the FetchX509Bundles bundle: %w", err)
	}
	jb, err := workloadapi.FetchJWTBundles(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchJWTBundles: %w", err)
	}
	jbundle, ok := jb.Get(td)
	if !ok || len(jbundle.JWTAuthorities()) == 0 {
		return "", fmt.Errorf("FetchJWTBundles: no JWT authority for %s", td)
	}
	token, err := fetchToken(ctx)
	if err != nil {
		return "", err
	}
	if _, err := jwtsvid.ParseAndValidate(token.Marshal(), jb, []string{*audience}); err != nil {
		return "", fmt.Errorf("JWT-SVID against the FetchJWTBundles bundle: %w", err)
	}
	return fmt.Sprintf("%s: %d X.509 authorities, %d JWT key(s)", td,
		len(bundle.X509Authorities()), len(jbundle.JWTAuthorities())), nil
}

// rotationWatcher records the serial of every default SVID it is sent and
// verifies each update against the bundles that came with it.
type rotationWatcher struct {
	mu      sync.Mutex
	serials []string
	errs    []error
	done    func()
}

func (w *rotationWatcher) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	svid, err := verifyContext(xc)
	if err != nil {
		w.errs = append(w.errs, fmt.Errorf("update %d: %w", len(w.serials)+len(w.errs)+1, err))
		return
	}
	serial := svid.Certificates[0].SerialNumber.Text(16)
	if len(w.serials) == 0 || w.serials[len(w.serials)-1] != serial {
		w.serials = append(w.serials, serial)
	}
	if len(w.serials) > *rotateN {
		w.done()
	}
}

func (w *rotationWatcher) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if status.Code(err) != codes.Canceled {
		w.errs = append(w.errs, err)
	}
}

func checkRotation(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *rotateIn)
	defer cancel()
	w := &rotationWatcher{done: cancel}
	start := time.Now()
	err := workloadapi.WatchX509Context(ctx, w, addr())
	elapsed := time.Since(start).Round(100 * time.Millisecond)
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.errs) > 0 {
		return "", fmt.Errorf("watcher: %w", errors.Join(w.errs...))
	}
	if len(w.serials) <= *rotateN {
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			return "", fmt.Errorf("WatchX509Context: %w", err)
		}
		return "", fmt.Errorf("%d new SVID(s) within %s, want %d (serials seen: %v)",
			max(len(w.serials)-1, 0), *rotateIn, *rotateN, w.serials)
	}
	if *rotateN == 1 {
		return fmt.Sprintf("serial %s -> %s after %s", w.serials[0], w.serials[1], elapsed), nil
	}
	return fmt.Sprintf("%d SVID changes, each verified against its bundle, in %s", *rotateN, elapsed), nil
}

// expectPermissionDenied turns the result of an RPC made by a caller without
// identity into a check result: PermissionDenied passes (the detail is the
// error text go-spiffe gives), anything else fails.
func expectPermissionDenied(rpc string, err error) (string, error) {
	if err == nil {
		return "", fmt.Errorf("%s succeeded for a caller with no identity (uid %d)", rpc, os.Getuid())
	}
	if status.Code(err) != codes.PermissionDenied {
		return "", fmt.Errorf("%s: want PermissionDenied, got %s: %v", rpc, status.Code(err), err)
	}
	return fmt.Sprintf("%s as uid %d: %v", rpc, os.Getuid(), err), nil
}

func checkNoIdentity(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	_, err := workloadapi.FetchX509SVID(ctx, addr())
	return expectPermissionDenied("FetchX509SVID", err)
}

func checkNoIdentityBundles(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	_, err := workloadapi.FetchX509Bundles(ctx, addr())
	x509Detail, err := expectPermissionDenied("FetchX509Bundles", err)
	if err != nil {
		return "", err
	}
	_, err = workloadapi.FetchJWTBundles(ctx, addr())
	jwtDetail, err := expectPermissionDenied("FetchJWTBundles", err)
	if err != nil {
		return "", err
	}
	return x509Detail + "; " + jwtDetail, nil
}

func checkNoIdentityJWT(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	_, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience}, addr())
	return expectPermissionDenied("FetchJWTSVID", err)
}

// peer returns the -peer-socket option and the -peer-id, for the federated checks.
func peer() (workloadapi.ClientOption, spiffeid.ID, error) {
	if *peerSock == "" || *peerID == "" {
		return nil, spiffeid.ID{}, errors.New("the federated checks need -peer-socket and -peer-id")
	}
	id, err := spiffeid.FromString(*peerID)
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("bad -peer-id: %w", err)
	}
	return workloadapi.WithAddr(*peerSock), id, nil
}

// checkFederatedMTLS does mTLS between two workloads of two trust domains, each
// holding the SVID and the bundle set its own agent gave it: the server (this
// agent's identity) authorizes the peer ID, the client (the peer agent's
// identity) authorizes this one. It passes only if each agent's bundle set
// carries the other trust domain's bundle (federation), and go-spiffe picks it.
func checkFederatedMTLS(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	peerAddr, peerWant, err := peer()
	if err != nil {
		return "", err
	}
	want, err := wantID()
	if err != nil {
		return "", err
	}
	own, err := workloadapi.FetchX509Context(ctx, addr())
	if err != nil {
		return "", fmt.Errorf("FetchX509Context: %w", err)
	}
	other, err := workloadapi.FetchX509Context(ctx, peerAddr)
	if err != nil {
		return "", fmt.Errorf("FetchX509Context on -peer-socket: %w", err)
	}
	ownSVID, otherSVID := own.DefaultSVID(), other.DefaultSVID()
	if ownSVID.ID != want || otherSVID.ID != peerWant {
		return "", fmt.Errorf("SVIDs are %s and %s, want %s and %s", ownSVID.ID, otherSVID.ID, want, peerWant)
	}
	if !own.Bundles.Has(peerWant.TrustDomain()) {
		return "", fmt.Errorf("this agent's bundle set has no bundle for %s (not federated)", peerWant.TrustDomain())
	}
	if !other.Bundles.Has(want.TrustDomain()) {
		return "", fmt.Errorf("the peer agent's bundle set has no bundle for %s (not federated)", want.TrustDomain())
	}
	serverCfg := tlsconfig.MTLSServerConfig(ownSVID, own.Bundles, tlsconfig.AuthorizeID(peerWant))
	clientCfg := tlsconfig.MTLSClientConfig(otherSVID, other.Bundles, tlsconfig.AuthorizeID(want))
	seenID, _, err := handshake(ctx, serverCfg, clientCfg)
	if err != nil {
		return "", fmt.Errorf("server %s, client %s: %w", want, peerWant, err)
	}
	return fmt.Sprintf("%s <-> %s", want, seenID), nil
}

// checkFederatedJWT fetches a JWT-SVID from the peer agent and validates it
// through this agent's ValidateJWTSVID (which needs the peer trust domain's
// JWT authorities), then checks that a token of this trust domain still
// validates here.
func checkFederatedJWT(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	peerAddr, peerWant, err := peer()
	if err != nil {
		return "", err
	}
	token, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience}, peerAddr)
	if err != nil {
		return "", fmt.Errorf("FetchJWTSVID on -peer-socket: %w", err)
	}
	got, err := workloadapi.ValidateJWTSVID(ctx, token.Marshal(), *audience, addr())
	if err != nil {
		return "", fmt.Errorf("ValidateJWTSVID of the peer's token here: %w", err)
	}
	if got.ID != peerWant {
		return "", fmt.Errorf("ValidateJWTSVID returned %s, want %s", got.ID, peerWant)
	}
	return fmt.Sprintf("%s token validated by this agent", got.ID), nil
}
