package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
)

// Copies between nodes (issue 16): with --copy-listen, this node serves
// its snapshots to other nodes' drivers over TLS, to callers whose
// service-account token (for --copy-audience) the API server vouches for
// and names --copy-allowed-user, and makes restores of other nodes'
// snapshots by copying them here. Its address and certificate are
// published in its ThinPools' status, where the other nodes find them.

// copyIdleRelease is how long a source no copy asked for stays open.
const copyIdleRelease = 10 * time.Minute

type copyFlags struct {
	listen, advertise, audience, tokenFile, allowedUser string
	rate                                                int64
}

func addCopyFlags(fs *flag.FlagSet) *copyFlags {
	c := &copyFlags{}
	fs.StringVar(&c.listen, "copy-listen", "", "address to serve this node's snapshots to copies on other nodes (TLS); empty turns copies between nodes off, both ways")
	fs.StringVar(&c.advertise, "copy-advertise", "", "host:port other nodes reach --copy-listen at (the pod's IP and the port); published in the ThinPools' status")
	fs.StringVar(&c.audience, "copy-audience", "", "the audience of the service-account tokens copies present, and that the API server must confirm")
	fs.StringVar(&c.tokenFile, "copy-token-file", "", "the projected service-account token (for --copy-audience) this node presents to other nodes; read at each use")
	fs.StringVar(&c.allowedUser, "copy-allowed-user", "", "the one user (system:serviceaccount:<namespace>:<name>) whose tokens may copy from this node")
	fs.Int64Var(&c.rate, "copy-rate", 0, "bytes per second this node sends and, per copy, receives; 0 is no limit")
	return c
}

// copySide is a node's copy server and what the driver needs to copy.
type copySide struct {
	flags    *copyFlags
	endpoint blockcopy.Endpoint
	metrics  *blockcopy.Metrics
	l        net.Listener
	srv      *blockcopy.Server
	opener   blockcopy.Opener // the driver's, set by serve
}

// newCopySide checks the flags, loads or makes the node's certificate
// (kept in the state directory, so its fingerprint survives restarts) and
// listens. nil without --copy-listen.
func newCopySide(f *copyFlags, stateDir string, ks *kubeSide, reg prometheus.Registerer) (*copySide, *csi.CopyOptions, error) {
	if f.listen == "" {
		return nil, nil, nil
	}
	switch {
	case f.advertise == "":
		return nil, nil, errors.New("--copy-listen needs --copy-advertise")
	case f.audience == "":
		return nil, nil, errors.New("--copy-listen needs --copy-audience")
	case f.tokenFile == "":
		return nil, nil, errors.New("--copy-listen needs --copy-token-file")
	case f.allowedUser == "":
		return nil, nil, errors.New("--copy-listen needs --copy-allowed-user")
	case f.rate < 0:
		return nil, nil, fmt.Errorf("--copy-rate=%d: want 0 or more", f.rate)
	case ks.client == nil || ks.dyn == nil:
		return nil, nil, errors.New("--copy-listen needs --kube-api and the ThinPool resource: tokens are checked by the API server, and endpoints found in ThinPools")
	}
	if _, _, err := net.SplitHostPort(f.advertise); err != nil {
		return nil, nil, fmt.Errorf("--copy-advertise=%q: %w", f.advertise, err)
	}
	cert, sum, err := blockcopy.LoadOrCreateCert(filepath.Join(stateDir, "copy-tls"))
	if err != nil {
		return nil, nil, fmt.Errorf("copy certificate: %w", err)
	}
	m := blockcopy.NewMetrics("csi_dmthin")
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			return nil, nil, err
		}
	}
	l, err := net.Listen("tcp", f.listen)
	if err != nil {
		return nil, nil, fmt.Errorf("--copy-listen: %w", err)
	}
	cs := &copySide{flags: f, endpoint: blockcopy.Endpoint{Address: f.advertise, CertSHA256: sum}, metrics: m, l: l}
	cs.srv, err = blockcopy.NewServer(blockcopy.ServerOptions{
		Auth:            &kube.TokenReviewer{Client: ks.client, Audience: f.audience},
		Allowed:         func(user string) bool { return user == f.allowedUser },
		Cert:            cert,
		RateBytesPerSec: f.rate,
		Metrics:         m,
		IdleRelease:     copyIdleRelease,
		Opener:          lateOpener{cs},
	})
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	ks.copyEndpoint = &cs.endpoint
	opts := &csi.CopyOptions{
		Peers:           &kube.CopyPeers{Client: ks.dyn},
		Token:           kube.TokenFile(f.tokenFile),
		Dir:             filepath.Join(stateDir, "copies"),
		RateBytesPerSec: f.rate,
		Metrics:         m,
		Claims:          ks.sink,
	}
	return cs, opts, nil
}

// lateOpener lets the server be made before the driver whose snapshots it
// serves; serve sets the driver's opener before the server takes calls.
type lateOpener struct{ cs *copySide }

func (o lateOpener) Open(ctx context.Context, copyID, sourceID string) (blockcopy.Source, error) {
	return o.cs.opener.Open(ctx, copyID, sourceID)
}

func (o lateOpener) Release(ctx context.Context, copyID string) error {
	return o.cs.opener.Release(ctx, copyID)
}

// serve serves copies until shutdown.
func (cs *copySide) serve(d *csi.Driver) error {
	cs.opener = d.CopySource()
	klog.InfoS("Serving snapshots to copies on other nodes", "address", cs.l.Addr().String(), "advertised", cs.endpoint.Address, "certSHA256", cs.endpoint.CertSHA256, "allowedUser", cs.flags.allowedUser)
	if err := cs.srv.Serve(cs.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// shutdown stops serving; the copies reading from here resume from their
// checkpoints once the driver is back.
func (cs *copySide) shutdown(ctx context.Context) {
	if cs == nil {
		return
	}
	if err := cs.srv.Shutdown(ctx); err != nil {
		klog.ErrorS(err, "Stopping the copy server")
	}
}
