// Command sds-probe asks an Envoy SDS v3 server (spire-agent's or spiffed's, on the Workload API
// socket) for secrets the way Envoy does, and prints a normalised description of the answers:
// the same lines for two servers that behave alike where Envoy could notice, whatever their
// keys, serials, nonces and timings.
//
// Usage:
//
//	sds-probe -socket /path/api.sock [-phase main|rotation] [-trust-domain example.org]
//
// Phase "main" (the default) runs the protocol sequence on one stream (first response, ACK,
// NACK with and without a change of names, a stale nonce, more changes of names), then
// FetchSecrets, names the caller is not entitled to, and the plain trusted_ca form asked for
// through the Envoy node metadata. It expects the caller's identities not to change meanwhile
// (long SVID lifetimes). Phase "rotation" opens a stream for [default, ROOTCA] and waits for
// -rotations SVID rotations (short SVID lifetimes).
//
// Every line is deterministic for a given server behaviour: versions are printed relative to
// the previous response ("same", "+1"), nonces by their shape and whether they are new, PEM
// data by block counts, key types and what the certificates name. A failure to get an answer
// is printed as a line too ("error ..."), so that a diff of two outputs shows where two servers
// part. The exit status is 0 when the sequence ran to its end (whatever the answers were), 1
// when a step could not be run, 2 on bad usage.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tls "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secret "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"
)

// The type URL Envoy sends for SDS.
const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

var (
	socket      = flag.String("socket", "", "the SDS server's Unix socket (a path, or unix:///path)")
	phase       = flag.String("phase", "main", "main: the protocol sequence; rotation: wait for SVID rotations")
	trustDomain = flag.String("trust-domain", "example.org", "the agent's trust domain")
	second      = flag.String("second-id", "spiffe://example.org/sds/b", "a SPIFFE ID the caller holds besides its default identity")
	notMine     = flag.String("not-mine", "spiffe://example.org/sds/not-mine", "a SPIFFE ID the caller is not entitled to")
	quiet       = flag.Duration("quiet", 2*time.Second, "how long to wait to conclude that no response comes")
	answerIn    = flag.Duration("answer-within", 20*time.Second, "how long a response that should come may take")
	rotations   = flag.Int("rotations", 2, "rotation phase: how many SVID rotations to wait for")
	rotateIn    = flag.Duration("rotation-within", 60*time.Second, "rotation phase: how long to wait for each rotation")
)

var hex8 = regexp.MustCompile(`^[0-9a-f]{8}$`)

func main() {
	flag.Parse()
	path := strings.TrimPrefix(strings.TrimPrefix(*socket, "unix://"), "unix:")
	if path == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: sds-probe -socket /path/api.sock [-phase main|rotation]")
		os.Exit(2)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "sds-probe: cannot make a client for %s: %v\n", path, err)
		os.Exit(2)
	}
	defer conn.Close()
	p := &probe{client: secret.NewSecretDiscoveryServiceClient(conn)}
	switch *phase {
	case "main":
		p.runMain()
	case "rotation":
		p.runRotation()
	default:
		fmt.Fprintf(os.Stderr, "sds-probe: unknown -phase %q: use main or rotation\n", *phase)
		os.Exit(2)
	}
	if p.broken {
		os.Exit(1)
	}
}

type probe struct {
	client secret.SecretDiscoveryServiceClient
	// A step could not be run (the server answered in a way that stopped the sequence).
	broken bool
}

func (p *probe) say(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}

// fail reports a step that could not go on; the rest of the sequence still runs where it can.
func (p *probe) fail(format string, args ...any) {
	p.broken = true
	p.say("  error: "+format, args...)
}

func node(metadata map[string]any) *core.Node {
	n := &core.Node{Id: "sds-probe", Cluster: "sds-probe"}
	if metadata != nil {
		s, err := structpb.NewStruct(metadata)
		if err != nil {
			panic(err) // constant input
		}
		n.Metadata = s
	}
	return n
}

// ---------------------------------------------------------------------------------- a stream

// stream is one StreamSecrets call with its receiving side in a goroutine, so that "no response
// within a while" can be observed.
type stream struct {
	s      secret.SecretDiscoveryService_StreamSecretsClient
	cancel context.CancelFunc
	msgs   chan *discovery.DiscoveryResponse
	err    chan error
	// The last response received, and what was said about its version.
	last *discovery.DiscoveryResponse
}

func (p *probe) open() (*stream, error) {
	ctx, cancel := context.WithCancel(context.Background())
	s, err := p.client.StreamSecrets(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	st := &stream{s: s, cancel: cancel, msgs: make(chan *discovery.DiscoveryResponse, 16), err: make(chan error, 1)}
	go func() {
		for {
			m, err := s.Recv()
			if err != nil {
				st.err <- err
				return
			}
			st.msgs <- m
		}
	}()
	return st, nil
}

func (st *stream) close() {
	_ = st.s.CloseSend()
	st.cancel()
}

func (st *stream) send(req *discovery.DiscoveryRequest) error {
	if req.TypeUrl == "" {
		req.TypeUrl = secretType
	}
	return st.s.Send(req)
}

// next waits up to d for a response; nil, nil when none came.
func (st *stream) next(d time.Duration) (*discovery.DiscoveryResponse, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case m := <-st.msgs:
		return m, nil
	case err := <-st.err:
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the server ended the stream (OK status)")
		}
		return nil, err
	case <-t.C:
		return nil, nil
	}
}

// ack acknowledges the last response with these names (Envoy repeats the names it wants).
func (st *stream) ack(names []string) error {
	return st.send(&discovery.DiscoveryRequest{
		VersionInfo:   st.last.GetVersionInfo(),
		ResponseNonce: st.last.GetNonce(),
		ResourceNames: names,
	})
}

// expectResponse waits for a response and prints it, its version relative to the previous one.
func (p *probe) expectResponse(st *stream, what string) bool {
	m, err := st.next(*answerIn)
	if err != nil {
		p.say("%s: %s", what, describeErr(err))
		p.broken = true
		return false
	}
	if m == nil {
		p.say("%s: no response within %s", what, *answerIn)
		p.broken = true
		return false
	}
	p.say("%s: %s", what, versionLine(st.last, m))
	p.describe(m)
	st.last = m
	return true
}

// expectSilence waits -quiet and prints whether a response came.
func (p *probe) expectSilence(st *stream, what string) bool {
	m, err := st.next(*quiet)
	if err != nil {
		p.say("%s: %s", what, describeErr(err))
		p.broken = true
		return false
	}
	if m == nil {
		p.say("%s: no response", what)
		return true
	}
	p.say("%s: a response: %s", what, versionLine(st.last, m))
	p.describe(m)
	st.last = m
	return true
}

// versionLine says what a response's version and nonce are: the first one literally (xDS
// servers count from "1"), later ones relative to the previous response.
func versionLine(prev, m *discovery.DiscoveryResponse) string {
	var v string
	switch {
	case prev == nil:
		v = fmt.Sprintf("version %q", m.VersionInfo)
	case m.VersionInfo == prev.VersionInfo:
		v = "version same"
	default:
		a, errA := strconv.ParseInt(prev.VersionInfo, 10, 64)
		b, errB := strconv.ParseInt(m.VersionInfo, 10, 64)
		if errA == nil && errB == nil {
			v = fmt.Sprintf("version %+d", b-a)
		} else {
			v = "version changed (not decimal)"
		}
	}
	n := nonceShape(m.Nonce)
	if prev != nil && m.Nonce != "" && m.Nonce == prev.Nonce {
		n += ", the previous one again"
	} else if prev != nil && m.Nonce != "" {
		n += ", new"
	}
	t := "type_url echoed"
	if m.TypeUrl != secretType {
		t = fmt.Sprintf("type_url %q", m.TypeUrl)
	}
	return fmt.Sprintf("%s, %s, %s, %d resource(s)", v, n, t, len(m.Resources))
}

func nonceShape(n string) string {
	switch {
	case n == "":
		return "no nonce"
	case hex8.MatchString(n):
		return "nonce of 8 hex digits"
	default:
		return fmt.Sprintf("nonce of %d characters, not 8 hex digits", len(n))
	}
}

func describeErr(err error) string {
	if s, ok := grpcstatus.FromError(err); ok {
		return fmt.Sprintf("error %s", s.Code())
	}
	return fmt.Sprintf("error (not a gRPC status): %v", err)
}

// describePlainAllRefusal: `ALL` in the plain trusted_ca form is refused by both agents, with
// different codes, on purpose: spire-agent v1.13.3 returns a bare Go error (Internal), spiffed
// InvalidArgument (the request asks for what this form cannot express; nothing failed inside
// the agent). Both codes read the same here; any other answer still shows as a difference.
func describePlainAllRefusal(err error) string {
	if s, ok := grpcstatus.FromError(err); ok && (s.Code() == codes.Internal || s.Code() == codes.InvalidArgument) {
		return "refused (Internal at spire-agent, InvalidArgument at spiffed)"
	}
	return describeErr(err)
}

// describeErrNaming also says whether the error message names `name`.
func describeErrNaming(err error, name string) string {
	s, ok := grpcstatus.FromError(err)
	if !ok {
		return describeErr(err)
	}
	named := "does not name it"
	if strings.Contains(s.Message(), name) {
		named = "names it"
	}
	return fmt.Sprintf("error %s, the message %s", s.Code(), named)
}

// ------------------------------------------------------------------------- the main sequence

func (p *probe) runMain() {
	td := "spiffe://" + *trustDomain
	p.say("# sds-probe phase main, trust domain %s", *trustDomain)

	p.say("== StreamSecrets")
	st, err := p.open()
	if err != nil {
		p.fail("StreamSecrets: %s", describeErr(err))
	} else {
		p.streamSequence(st, td)
		st.close()
	}

	p.say("== FetchSecrets")
	for _, names := range [][]string{{"default", "ROOTCA"}, {*second, td}, {"ALL"}, {}} {
		p.fetch(fmt.Sprintf("fetch %s", show(names)), names, nil)
	}

	p.say("== names the caller is not entitled to")
	for _, names := range [][]string{{"default", *notMine}, {"spiffe://not-a-domain-of-mine.test"}} {
		bad := names[len(names)-1]
		st, err := p.open()
		if err != nil {
			p.fail("StreamSecrets: %s", describeErr(err))
			continue
		}
		what := fmt.Sprintf("stream %s", show(names))
		if err := st.send(&discovery.DiscoveryRequest{Node: node(nil), ResourceNames: names}); err != nil {
			p.fail("%s: send: %v", what, err)
		} else if m, err := st.next(*answerIn); err != nil {
			p.say("%s: %s", what, describeErrNaming(err, bad))
		} else if m == nil {
			p.say("%s: nothing within %s", what, *answerIn)
		} else {
			p.say("%s: a response: %s", what, versionLine(nil, m))
			p.describe(m)
		}
		st.close()
		resp, err := p.client.FetchSecrets(context.Background(), &discovery.DiscoveryRequest{
			Node: node(nil), ResourceNames: names, TypeUrl: secretType,
		})
		what = fmt.Sprintf("fetch %s", show(names))
		if err != nil {
			p.say("%s: %s", what, describeErrNaming(err, bad))
		} else {
			p.say("%s: a response: %s", what, versionLine(nil, resp))
			p.describe(resp)
		}
	}

	p.say("== the plain trusted_ca form, asked for in the node metadata")
	st, err = p.open()
	if err != nil {
		p.fail("StreamSecrets: %s", describeErr(err))
	} else {
		p.plainStream(st, td)
		st.close()
	}
	plain := map[string]any{"disable_spiffe_cert_validation": "true"}
	p.fetch("fetch [ROOTCA default] with disable_spiffe_cert_validation \"true\"", []string{"ROOTCA", "default"}, plain)
	p.fetch("fetch [ALL] with disable_spiffe_cert_validation \"true\"", []string{"ALL"}, plain)
	p.fetch("fetch [ROOTCA] with disable_spiffe_cert_validation \"false\"", []string{"ROOTCA"},
		map[string]any{"disable_spiffe_cert_validation": "false"})
	p.fetch("fetch [ROOTCA] with disable_spiffe_cert_validation false", []string{"ROOTCA"},
		map[string]any{"disable_spiffe_cert_validation": false})
	p.say("# end")
}

func show(names []string) string {
	return "[" + strings.Join(names, " ") + "]"
}

func (p *probe) fetch(what string, names []string, metadata map[string]any) {
	ctx, cancel := context.WithTimeout(context.Background(), *answerIn)
	defer cancel()
	resp, err := p.client.FetchSecrets(ctx, &discovery.DiscoveryRequest{
		Node: node(metadata), ResourceNames: names, TypeUrl: secretType,
	})
	if err != nil {
		if len(names) == 1 && names[0] == "ALL" && metadata["disable_spiffe_cert_validation"] == "true" {
			p.say("%s: %s", what, describePlainAllRefusal(err))
		} else {
			p.say("%s: %s", what, describeErr(err))
		}
		return
	}
	v := fmt.Sprintf("version %q", resp.VersionInfo)
	if resp.VersionInfo == "" {
		v = "empty version"
	}
	p.say("%s: %s, %s, %d resource(s)", what, v, nonceShape(resp.Nonce), len(resp.Resources))
	p.describe(resp)
}

// streamSequence: the xDS state-of-the-world protocol on one stream, as Envoy drives it.
func (p *probe) streamSequence(st *stream, td string) {
	names := []string{"default", "ROOTCA"}
	if err := st.send(&discovery.DiscoveryRequest{Node: node(nil), ResourceNames: names}); err != nil {
		p.fail("first request: %v", err)
		return
	}
	if !p.expectResponse(st, "first request "+show(names)) {
		return
	}
	first := st.last

	// ACK: same names, the response's version and nonce; nothing to send back.
	if err := st.ack(names); err != nil {
		p.fail("ack: %v", err)
		return
	}
	if !p.expectSilence(st, "ack (same names)") {
		return
	}

	// NACK with the same names: logged by the server, nothing to send.
	nack := func(names []string) error {
		return st.send(&discovery.DiscoveryRequest{
			VersionInfo:   "",
			ResponseNonce: st.last.Nonce,
			ResourceNames: names,
			ErrorDetail:   &status.Status{Code: int32(codes.InvalidArgument), Message: "sds-probe rejects this on purpose"},
		})
	}
	if err := nack(names); err != nil {
		p.fail("nack: %v", err)
		return
	}
	if !p.expectSilence(st, "nack (same names)") {
		return
	}

	// NACK that changes the names: still processed (a NACK may carry new names).
	names = []string{"default", "ROOTCA", *second}
	if err := nack(names); err != nil {
		p.fail("nack: %v", err)
		return
	}
	if !p.expectResponse(st, "nack with names "+show(names)) {
		return
	}
	if err := st.ack(names); err != nil {
		p.fail("ack: %v", err)
		return
	}
	if !p.expectSilence(st, "ack (same names)") {
		return
	}

	// A stale nonce (the first response's): ignored, even though it changes the names.
	stale := []string{"ROOTCA"}
	if err := st.send(&discovery.DiscoveryRequest{
		VersionInfo: first.VersionInfo, ResponseNonce: first.Nonce, ResourceNames: stale,
	}); err != nil {
		p.fail("stale nonce: %v", err)
		return
	}
	if !p.expectSilence(st, "stale nonce with names "+show(stale)) {
		return
	}

	// Changes of names with the current nonce: each answered with the same version, a new
	// nonce and exactly the names asked for.
	for _, n := range [][]string{
		{"ROOTCA"},
		{td, *second},
		{"ALL", "default"},
		{},
		{"default", "ROOTCA"},
	} {
		if err := st.ack(n); err != nil {
			p.fail("names %s: %v", show(n), err)
			return
		}
		if !p.expectResponse(st, "names "+show(n)) {
			return
		}
	}
	// The same names in another order are not a change.
	if err := st.ack([]string{"ROOTCA", "default"}); err != nil {
		p.fail("ack: %v", err)
		return
	}
	if !p.expectSilence(st, "ack (same names, another order)") {
		return
	}

	// A name the caller is not entitled to ends the stream.
	bad := []string{"default", *notMine}
	if err := st.ack(bad); err != nil {
		p.fail("names %s: %v", show(bad), err)
		return
	}
	m, err := st.next(*answerIn)
	switch {
	case err != nil:
		p.say("names %s: %s", show(bad), describeErrNaming(err, *notMine))
	case m == nil:
		p.say("names %s: nothing within %s", show(bad), *answerIn)
	default:
		p.say("names %s: a response: %s", show(bad), versionLine(st.last, m))
		p.describe(m)
	}
}

// plainStream: node metadata asks for trusted_ca; later requests omit the node (Envoy sends it
// once), and the server keeps using the first one's.
func (p *probe) plainStream(st *stream, td string) {
	n := node(map[string]any{"disable_spiffe_cert_validation": true})
	names := []string{"ROOTCA", "default"}
	if err := st.send(&discovery.DiscoveryRequest{Node: n, ResourceNames: names}); err != nil {
		p.fail("first request: %v", err)
		return
	}
	if !p.expectResponse(st, "stream "+show(names)+" with disable_spiffe_cert_validation true") {
		return
	}
	names = []string{td}
	if err := st.ack(names); err != nil {
		p.fail("ack: %v", err)
		return
	}
	if !p.expectResponse(st, "names "+show(names)+" (no node in this request)") {
		return
	}
	names = []string{"ALL"}
	if err := st.ack(names); err != nil {
		p.fail("ack: %v", err)
		return
	}
	m, err := st.next(*answerIn)
	switch {
	case err != nil:
		p.say("names %s: %s", show(names), describePlainAllRefusal(err))
	case m == nil:
		p.say("names %s: nothing within %s", show(names), *answerIn)
	default:
		p.say("names %s: a response: %s", show(names), versionLine(st.last, m))
		p.describe(m)
	}
}

// ------------------------------------------------------------------------------ rotation phase

func (p *probe) runRotation() {
	p.say("# sds-probe phase rotation, trust domain %s", *trustDomain)
	st, err := p.open()
	if err != nil {
		p.fail("StreamSecrets: %s", describeErr(err))
		return
	}
	defer st.close()
	names := []string{"default", "ROOTCA"}
	if err := st.send(&discovery.DiscoveryRequest{Node: node(nil), ResourceNames: names}); err != nil {
		p.fail("first request: %v", err)
		return
	}
	if !p.expectResponse(st, "first request "+show(names)) {
		return
	}
	serial := leafSerial(st.last)
	for i := 1; i <= *rotations; i++ {
		if err := st.ack(names); err != nil {
			p.fail("ack: %v", err)
			return
		}
		// Wait for a response with another default SVID: the rotation.
		deadline := time.Now().Add(*rotateIn)
		for {
			left := time.Until(deadline)
			if left <= 0 {
				p.fail("rotation %d: no new SVID within %s", i, *rotateIn)
				return
			}
			m, err := st.next(left)
			if err != nil {
				p.say("rotation %d: %s", i, describeErr(err))
				p.broken = true
				return
			}
			if m == nil {
				continue
			}
			s := leafSerial(m)
			if s == serial {
				// An update that did not change the SVID (say, a bundle or entry change):
				// acknowledged, and not part of the comparison.
				fmt.Fprintf(os.Stderr, "sds-probe: an update with the same SVID (version %s)\n", m.VersionInfo)
				st.last = m
				if err := st.ack(names); err != nil {
					p.fail("ack: %v", err)
					return
				}
				continue
			}
			p.say("rotation %d: %s, another SVID", i, versionLine(st.last, m))
			p.describe(m)
			st.last = m
			serial = s
			break
		}
	}
	p.say("# end")
}

func leafSerial(m *discovery.DiscoveryResponse) string {
	for _, r := range m.Resources {
		var s tls.Secret
		if r.UnmarshalTo(&s) != nil {
			continue
		}
		if c := s.GetTlsCertificate(); c != nil {
			certs, _ := pemCerts(c.GetCertificateChain().GetInlineBytes())
			if len(certs) > 0 {
				return certs[0].SerialNumber.String()
			}
		}
	}
	return ""
}

// ----------------------------------------------------------------------------- descriptions

// describe prints the resources of a response, sorted by name (the order carries no meaning
// in xDS, and spire-agent's follows Go map order for federated bundles).
func (p *probe) describe(m *discovery.DiscoveryResponse) {
	type res struct {
		name  string
		lines []string
	}
	var all []res
	roots := map[string][]*x509.Certificate{}
	var secrets []*tls.Secret
	for i, r := range m.Resources {
		var s tls.Secret
		if r.TypeUrl != secretType {
			all = append(all, res{fmt.Sprintf("#%d", i), []string{fmt.Sprintf("resource of type %q", r.TypeUrl)}})
			continue
		}
		if err := r.UnmarshalTo(&s); err != nil {
			all = append(all, res{fmt.Sprintf("#%d", i), []string{fmt.Sprintf("not a Secret: %v", err)}})
			continue
		}
		secrets = append(secrets, &s)
		for td, cas := range validationRoots(&s) {
			roots[td] = append(roots[td], cas...)
		}
	}
	for _, s := range secrets {
		all = append(all, res{s.Name, describeSecret(s, roots)})
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].name < all[j].name })
	for _, r := range all {
		p.say("  secret %q: %s", r.name, r.lines[0])
		for _, l := range r.lines[1:] {
			p.say("    %s", l)
		}
	}
}

func describeSecret(s *tls.Secret, roots map[string][]*x509.Certificate) []string {
	switch t := s.Type.(type) {
	case *tls.Secret_TlsCertificate:
		return describeTLSCertificate(t.TlsCertificate, roots)
	case *tls.Secret_ValidationContext:
		return describeValidation(t.ValidationContext)
	case nil:
		return []string{"no type"}
	default:
		return []string{fmt.Sprintf("type %T", t)}
	}
}

// setFields names the fields of m that are set ("a, b"), for the shape of a message.
func setFields(m proto.Message) string {
	var names []string
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		names = append(names, string(fd.Name()))
		return true
	})
	sort.Strings(names)
	return strings.Join(names, ", ")
}

func dataSource(d *core.DataSource) ([]byte, string) {
	switch v := d.GetSpecifier().(type) {
	case *core.DataSource_InlineBytes:
		return v.InlineBytes, "inline_bytes"
	case *core.DataSource_InlineString:
		return []byte(v.InlineString), "inline_string"
	case *core.DataSource_Filename:
		return nil, "filename"
	case *core.DataSource_EnvironmentVariable:
		return nil, "environment_variable"
	case nil:
		return nil, "empty"
	default:
		return nil, fmt.Sprintf("%T", v)
	}
}

type pemSummary struct {
	types []string // block types, in order
}

func (s pemSummary) String() string {
	if len(s.types) == 0 {
		return "no PEM block"
	}
	counts := map[string]int{}
	var order []string
	for _, t := range s.types {
		if counts[t] == 0 {
			order = append(order, t)
		}
		counts[t]++
	}
	var parts []string
	for _, t := range order {
		parts = append(parts, fmt.Sprintf("%d %s", counts[t], t))
	}
	return strings.Join(parts, " + ") + " PEM block(s)"
}

// pemBlocks splits PEM data; trailing bytes that are not PEM are reported.
func pemBlocks(data []byte) ([]*pem.Block, pemSummary, string) {
	var blocks []*pem.Block
	var sum pemSummary
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		blocks = append(blocks, b)
		sum.types = append(sum.types, b.Type)
	}
	junk := ""
	if len(strings.TrimSpace(string(rest))) > 0 {
		junk = fmt.Sprintf(" and %d bytes that are not PEM", len(rest))
	}
	return blocks, sum, junk
}

func pemCerts(data []byte) ([]*x509.Certificate, error) {
	blocks, _, _ := pemBlocks(data)
	var out []*x509.Certificate
	for _, b := range blocks {
		if b.Type != "CERTIFICATE" {
			return out, fmt.Errorf("a %s block", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return out, err
		}
		out = append(out, c)
	}
	return out, nil
}

func describeTLSCertificate(c *tls.TlsCertificate, roots map[string][]*x509.Certificate) []string {
	lines := []string{"tls_certificate {" + setFields(c) + "}"}
	chainPEM, how := dataSource(c.GetCertificateChain())
	_, sum, junk := pemBlocks(chainPEM)
	certs, err := pemCerts(chainPEM)
	line := fmt.Sprintf("certificate_chain: %s, %s%s", how, sum, junk)
	if err != nil {
		line += fmt.Sprintf(", unparsable: %v", err)
	}
	lines = append(lines, line)
	var leaf *x509.Certificate
	if len(certs) > 0 {
		leaf = certs[0]
		var uris []string
		for _, u := range leaf.URIs {
			uris = append(uris, u.String())
		}
		lines = append(lines, fmt.Sprintf("leaf: URI SAN %s, CA %t", strings.Join(uris, " "), leaf.IsCA))
		if len(leaf.URIs) == 1 {
			td := "spiffe://" + leaf.URIs[0].Host
			if cas, ok := roots[td]; ok {
				lines = append(lines, fmt.Sprintf("chain verifies against the %s bundle of this response: %t", td, verifies(certs, cas)))
			}
		}
	}
	keyPEM, how := dataSource(c.GetPrivateKey())
	blocks, sum, junk := pemBlocks(keyPEM)
	line = fmt.Sprintf("private_key: %s, %s%s", how, sum, junk)
	if len(blocks) == 1 {
		line += ", " + describeKey(blocks[0], leaf)
	}
	lines = append(lines, line)
	return lines
}

func describeKey(b *pem.Block, leaf *x509.Certificate) string {
	if b.Type != "PRIVATE KEY" {
		return fmt.Sprintf("not PKCS#8 (%s)", b.Type)
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return fmt.Sprintf("PKCS#8 that does not parse: %v", err)
	}
	var kind string
	var pub crypto.PublicKey
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		kind = "PKCS#8 ECDSA " + k.Curve.Params().Name
		pub = &k.PublicKey
	case *rsa.PrivateKey:
		kind = fmt.Sprintf("PKCS#8 RSA %d", k.N.BitLen())
		pub = &k.PublicKey
	case ed25519.PrivateKey:
		kind = "PKCS#8 Ed25519"
		pub = k.Public()
	default:
		kind = fmt.Sprintf("PKCS#8 %T", k)
	}
	if leaf == nil {
		return kind
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if e, ok := pub.(equaler); ok && e.Equal(leaf.PublicKey) {
		return kind + ", matches the leaf"
	}
	return kind + ", DOES NOT match the leaf"
}

func verifies(chain, roots []*x509.Certificate) bool {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	return err == nil
}

// validationRoots: the CAs a validation context holds, by trust domain ID.
func validationRoots(s *tls.Secret) map[string][]*x509.Certificate {
	out := map[string][]*x509.Certificate{}
	v := s.GetValidationContext()
	if v == nil {
		return out
	}
	if cfg := spiffeConfig(v); cfg != nil {
		for _, td := range cfg.TrustDomains {
			b, _ := dataSource(td.TrustBundle)
			certs, _ := pemCerts(b)
			out["spiffe://"+td.Name] = certs
		}
	} else if v.TrustedCa != nil {
		b, _ := dataSource(v.TrustedCa)
		certs, _ := pemCerts(b)
		// The plain form does not say its trust domain: a resource named by one, or ROOTCA.
		td := s.Name
		if !strings.HasPrefix(td, "spiffe://") {
			td = "spiffe://" + *trustDomain
		}
		out[td] = certs
	}
	return out
}

func spiffeConfig(v *tls.CertificateValidationContext) *tls.SPIFFECertValidatorConfig {
	c := v.GetCustomValidatorConfig()
	if c == nil {
		return nil
	}
	var cfg tls.SPIFFECertValidatorConfig
	if c.GetTypedConfig().UnmarshalTo(&cfg) != nil {
		return nil
	}
	return &cfg
}

func describeValidation(v *tls.CertificateValidationContext) []string {
	lines := []string{"validation_context {" + setFields(v) + "}"}
	if c := v.GetCustomValidatorConfig(); c != nil {
		lines = append(lines, fmt.Sprintf("custom_validator_config: name %q, typed_config %s", c.Name, c.GetTypedConfig().GetTypeUrl()))
		cfg := spiffeConfig(v)
		if cfg == nil {
			lines = append(lines, "typed_config is not a SPIFFECertValidatorConfig")
		} else {
			lines = append(lines, fmt.Sprintf("SPIFFECertValidatorConfig {%s}", setFields(cfg)))
			for _, td := range cfg.TrustDomains {
				b, how := dataSource(td.TrustBundle)
				lines = append(lines, fmt.Sprintf("trust domain %q: trust_bundle %s, %s", td.Name, how, caSummary(b)))
			}
		}
	}
	if v.TrustedCa != nil {
		b, how := dataSource(v.TrustedCa)
		lines = append(lines, fmt.Sprintf("trusted_ca: %s, %s", how, caSummary(b)))
	}
	return lines
}

func caSummary(b []byte) string {
	_, sum, junk := pemBlocks(b)
	certs, err := pemCerts(b)
	s := sum.String() + junk
	if err != nil {
		return s + fmt.Sprintf(", unparsable: %v", err)
	}
	cas := 0
	for _, c := range certs {
		if c.IsCA {
			cas++
		}
	}
	return s + fmt.Sprintf(", %d of them CA certificates", cas)
}
