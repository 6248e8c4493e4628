package main

import (
	"context"
	"errors"
	"flag"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube/registration"
)

// The Helm chart passes these flags by name.
func TestKubeFlagNamesAndDefaults(t *testing.T) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	kf := addKubeFlags(fs)
	for name, def := range map[string]string{
		"registration-dir": "", "kubelet-endpoint": "", "kube-api": "false", "kubeconfig": "",
		"pool-full-percent": "90", "pool-check-interval": "30s",
	} {
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("no --%s", name)
			continue
		}
		if f.DefValue != def {
			t.Errorf("--%s defaults to %q, want %q", name, f.DefValue, def)
		}
	}
	ks, err := newKubeSide(t.Context(), kf, "dmthin.csi.dmthin.io", "/var/lib/k0s/kubelet", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	if want := "/var/lib/k0s/kubelet/plugins/dmthin.csi.dmthin.io/csi.sock"; kf.kubeletEndpoint != want {
		t.Errorf("kubelet endpoint %q, want %q", kf.kubeletEndpoint, want)
	}
	if ks.reg != nil || ks.client != nil || ks.eventSink() != nil {
		t.Error("with the defaults nothing Kubernetes-side should be on")
	}
	ks.stop() // before start: nothing to do, no hang
}

func TestKubeFlagsRejected(t *testing.T) {
	for _, args := range [][]string{
		{"--pool-full-percent=0"},
		{"--pool-full-percent=101"},
		{"--pool-check-interval=0s"},
		{"--kubeconfig=/k"}, // without --kube-api
		{"--kube-api", "--kubeconfig=/does/not/exist"},
	} {
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		kf := addKubeFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		if _, err := newKubeSide(t.Context(), kf, csi.DefaultDriverName, "/var/lib/kubelet", "node-a"); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}

// With --registration-dir alone the kubelet finds the driver's socket,
// learns the CSI endpoint from it, and the socket goes at stop.
func TestKubeSideRegistersWithTheKubelet(t *testing.T) {
	dir := t.TempDir()
	kf := &kubeFlags{registrationDir: dir, poolFullPercent: 90, poolCheckInterval: time.Second}
	ks, err := newKubeSide(t.Context(), kf, csi.DefaultDriverName, "/var/lib/kubelet", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	if err := ks.start(t.Context(), nil, nil, nil, newPoolMonitor(nil, nil, time.Second), func(err error) { errc <- err }); err != nil {
		t.Fatal(err)
	}
	sock := registration.SocketPath(dir, csi.DefaultDriverName)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no registration socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	info, err := c.GetInfo(t.Context(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetEndpoint() != "/var/lib/kubelet/plugins/"+csi.DefaultDriverName+"/csi.sock" || info.GetName() != csi.DefaultDriverName {
		t.Errorf("GetInfo = %v", info)
	}
	if _, err := c.NotifyRegistrationStatus(t.Context(), &registerapi.RegistrationStatus{Error: "no"}); err != nil {
		t.Fatal(err)
	}
	if err := ks.healthy(); err == nil {
		t.Error("healthy after the kubelet refused the registration")
	}
	ks.stop()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket after stop: %v", err)
	}
	select {
	case err := <-errc:
		t.Errorf("errc: %v", err)
	default:
	}
}

// With --kube-api the node side starts, hands the driver an event sink,
// and stops promptly; it asks the API server about nothing cluster-wide:
// no watch at all, no list but of its own node's objects (the cluster's
// decisions are the controller's).
func TestKubeSideWatchesNothing(t *testing.T) {
	var (
		mu   sync.Mutex
		reqs []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		reqs = append(reqs, r.Method+" "+r.URL.RequestURI())
		mu.Unlock()
		http.NotFound(w, r)
	}))
	defer srv.Close()
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+srv.URL+`"}}]
users: [{name: u, user: {}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	kf := &kubeFlags{kubeAPI: true, kubeconfig: kc, poolFullPercent: 90, poolCheckInterval: time.Hour, capacityNamespace: "csi-dmthin", thinPools: true}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	ks, err := newKubeSide(ctx, kf, csi.DefaultDriverName, "/var/lib/kubelet", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	if ks.eventSink() == nil {
		t.Error("no event sink with --kube-api")
	}
	if err := ks.start(ctx, &csi.Driver{}, map[string]kube.UsageSource{}, nil, newPoolMonitor(nil, nil, time.Second), func(err error) { t.Errorf("kube side failed: %v", err) }); err != nil {
		t.Fatal(err)
	}
	ks.eventSink().ProvisioningNoSpace("db", "data", "no space")
	time.Sleep(200 * time.Millisecond) // what starts at once has asked by now
	done := make(chan struct{})
	go func() { ks.stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("stop hung")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reqs) == 0 {
		t.Fatal("the node side asked the API server nothing")
	}
	sawPVC := false
	for _, r := range reqs {
		u, err := url.Parse(strings.TrimPrefix(strings.TrimPrefix(r, "GET "), "POST "))
		if err != nil {
			t.Fatal(err)
		}
		q := u.Query()
		switch {
		case q.Get("watch") == "true" || q.Has("watch") || strings.Contains(u.Path, "/watch/"):
			t.Errorf("the node side watches: %s", r)
		case strings.HasPrefix(r, "GET /api/v1/namespaces/db/persistentvolumeclaims/data"):
			sawPVC = true // the no-space Event's PVC, read once
		case strings.HasPrefix(r, "GET /api/v1/") && !strings.Contains(u.Path, "/namespaces/"),
			strings.Contains(u.Path, "persistentvolume"), strings.Contains(u.Path, "snapshot"), strings.Contains(u.Path, "storageclasses"):
			t.Errorf("the node side reads cluster-wide objects: %s", r)
		}
	}
	if !sawPVC {
		t.Errorf("the no-space Event's PVC was not read; requests: %q", reqs)
	}
}
