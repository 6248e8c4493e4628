package csi

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// The driver over real thinpool.Pools on a FakeKernel and the fake FS, on
// the host under -race. Handlers are called directly; sanity_test.go goes
// through gRPC.
//
// This file holds what the tests of every service share (driverEnv, the
// capabilities, badCase) and the tests that span services: the per-ID
// lock, and Stop. The controller's tables are in controller_test.go, the
// node's in node_test.go.

const (
	testNode      = "node-a"
	testPool      = "alpha" // the default pool
	otherPool     = "beta"
	testPoolBytes = 256 << 20
	testVolBytes  = 16 << 20
)

// driverEnv is a Driver with its fake kernel, pools and FS.
type driverEnv struct {
	t          *testing.T
	k          *thinpooltest.FakeKernel
	fs         *fakeFS
	d          *Driver
	pools      map[string]*thinpool.Pool
	kubeletDir string
}

// poolOpt adjusts a pool's Config before it is opened.
type poolOpt func(*thinpool.Config)

// newDriverEnv opens the pools testPool and otherPool on a fresh fake kernel
// (opts apply to testPool) and makes a Driver over them. It keeps no
// formatted templates, whose background builds would change the pools
// under tests that compare their state; templates_test.go turns them on.
func newDriverEnv(t *testing.T, opts ...poolOpt) *driverEnv {
	t.Helper()
	return newDriverEnvTemplates(t, -1, opts...)
}

func newDriverEnvTemplates(t *testing.T, templates int, opts ...poolOpt) *driverEnv {
	t.Helper()
	k := thinpooltest.NewFakeKernel()
	e := &driverEnv{t: t, k: k, fs: newFakeFS(k), pools: map[string]*thinpool.Pool{}, kubeletDir: t.TempDir()}
	pools := map[string]Pool{}
	for _, name := range []string{testPool, otherPool} {
		cfg := loopPoolConfig(t.TempDir(), name, testPoolBytes)
		if name == testPool {
			for _, o := range opts {
				o(&cfg)
			}
		}
		p, err := thinpool.Open(t.Context(), cfg, k)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Close() })
		e.pools[name] = p
		pools[name] = p
	}
	d, err := New(Options{NodeID: testNode, Version: "test", Pools: pools, DefaultPool: testPool, KubeletDir: e.kubeletDir, FS: e.fs, Templates: templates})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.templates.stop)
	e.d = d
	return e
}

// leftovers waits for d's template builds and returns what p holds besides
// sealed templates, which stay by design (templates.go).
func leftovers(d *Driver, p Pool) []thinpool.Volume {
	d.templates.stop()
	var left []thinpool.Volume
	for _, v := range p.List() {
		if v.Kind != thinpool.KindTemplate || !v.Sealed {
			left = append(left, v)
		}
	}
	return left
}

// loopPoolConfig is a pool on sparse loop files in dir.
func loopPoolConfig(dir, name string, dataBytes int64) thinpool.Config {
	return thinpool.Config{
		Name: name, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: dataBytes,
	}
}

func mountCap(fsType string, mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

const (
	rwo = csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	rox = csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
)

var fsCap = mountCap("", rwo)

// path returns a path in the kubelet directory.
func (e *driverEnv) path(elem ...string) string {
	return filepath.Join(append([]string{e.kubeletDir}, elem...)...)
}

// createVolume makes a volume of testVolBytes in the default pool.
func (e *driverEnv) createVolume(name string) *csipb.Volume {
	e.t.Helper()
	resp, err := e.d.CreateVolume(e.t.Context(), &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
	})
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.GetVolume()
}

func (e *driverEnv) createSnapshot(name, source string) *csipb.Snapshot {
	e.t.Helper()
	resp, err := e.d.CreateSnapshot(e.t.Context(), &csipb.CreateSnapshotRequest{Name: name, SourceVolumeId: source})
	if err != nil {
		e.t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return resp.GetSnapshot()
}

// dev returns the dm device of an active volume, by ID.
func (e *driverEnv) dev(volumeID string) thinpool.Dev {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	info, err := e.k.InfoByName("dmthin-" + pool + "-" + name)
	if err != nil {
		e.t.Fatalf("volume %s is not active: %v", volumeID, err)
	}
	return info.Dev
}

// write writes through the volume's device, activating it.
func (e *driverEnv) write(volumeID string, off int64, b []byte) {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	if _, err := e.pools[pool].Activate(e.t.Context(), name); err != nil {
		e.t.Fatal(err)
	}
	if err := e.k.WriteData(e.dev(volumeID), off, b); err != nil {
		e.t.Fatal(err)
	}
}

func (e *driverEnv) read(volumeID string, off int64, n int) []byte {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	if _, err := e.pools[pool].Activate(e.t.Context(), name); err != nil {
		e.t.Fatal(err)
	}
	b := make([]byte, n)
	if err := e.k.ReadData(e.dev(volumeID), off, b); err != nil {
		e.t.Fatal(err)
	}
	return b
}

// state is everything a request can change: the pools' records, the dm
// devices, the mount table and the files under the kubelet directory.
func (e *driverEnv) state() string {
	e.t.Helper()
	var b strings.Builder
	names := make([]string, 0, len(e.pools))
	for n := range e.pools {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "pool %s: %+v\n", n, e.pools[n].List())
	}
	for _, d := range e.k.Devices() {
		fmt.Fprintf(&b, "dm %s %s live=%v suspended=%v open=%d\n", d.Name, d.Dev, d.LiveTable, d.Suspended, d.OpenCount)
	}
	for _, p := range e.fs.mountPoints() {
		fmt.Fprintf(&b, "mount %s %+v\n", p, e.fs.mountTable()[p])
	}
	_ = filepath.WalkDir(e.kubeletDir, func(p string, d os.DirEntry, err error) error {
		if err == nil {
			fmt.Fprintf(&b, "file %s %v\n", p, d.Type())
		}
		return err
	})
	return b.String()
}

// wantCode checks a call's gRPC code and, for an error, that its message
// contains every one of words.
func wantCode(t *testing.T, err error, want codes.Code, words ...string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("code %v (%v), want %v", got, err, want)
	}
	for _, w := range words {
		if !strings.Contains(status.Convert(err).Message(), w) {
			t.Errorf("message %q does not name %q", status.Convert(err).Message(), w)
		}
	}
}

// badCase is a request that must fail with code, naming words, and change
// nothing.
type badCase struct {
	name  string
	call  func(ctx context.Context, d *Driver) error
	code  codes.Code
	words []string
}

func runBadCases(t *testing.T, e *driverEnv, cases []badCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.state()
			err := tc.call(t.Context(), e.d)
			wantCode(t, err, tc.code, tc.words...)
			if after := e.state(); after != before {
				t.Errorf("the request changed the state:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// ignore drops a response, keeping the error.
func ignore[T any](_ T, err error) error { return err }

// Concurrent calls on one volume: the second finds the ID locked and gets
// Aborted at once. The fake FS holds the first call inside Mount until the
// test lets it go, so the overlap is certain, not a matter of timing.
func TestConcurrentCallsAborted(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol := e.createVolume("vol").GetVolumeId()
	free := e.createVolume("free").GetVolumeId()
	staging := e.path("staging", "vol")

	entered, release := make(chan struct{}), make(chan struct{})
	e.fs.setMountHook(func(target string) error {
		if target == staging {
			close(entered)
			<-release
		}
		return nil
	})
	var wg sync.WaitGroup
	var firstErr error
	wg.Go(func() { firstErr = e.stage(vol, staging, fsCap, nil) })
	<-entered

	others := map[string]func() error{
		"NodeStageVolume": func() error { return e.stage(vol, e.path("staging", "again"), fsCap, nil) },
		"NodePublishVolume": func() error {
			return e.publish(vol, staging, e.path("pods", "p", "vol"), fsCap, false)
		},
		"NodeUnstageVolume":   func() error { return e.unstage(vol, staging) },
		"NodeUnpublishVolume": func() error { return e.unpublish(vol, e.path("pods", "p", "vol")) },
		"NodeExpandVolume": func() error {
			return ignore(e.d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: staging}))
		},
		"DeleteVolume": func() error { return ignore(e.d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: vol})) },
		"CreateSnapshot": func() error {
			return ignore(e.d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol}))
		},
		"CreateVolume clone": func() error {
			return ignore(e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "c", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: vol}}}}))
		},
	}
	for name, call := range others {
		if err := call(); status.Code(err) != codes.Aborted {
			t.Errorf("%s while NodeStageVolume holds %s: %v, want Aborted", name, vol, err)
		}
	}
	// Other volumes are not held up.
	mustOK(t, "stage another volume", e.stage(free, e.path("staging", "free"), fsCap, nil))
	close(release)
	wg.Wait()
	mustOK(t, "the first NodeStageVolume", firstErr)
	e.fs.setMountHook(nil)
	if m := e.fs.mountTable()[staging]; m.FSType != defaultFS {
		t.Errorf("staging mount %+v", m)
	}
	// Released: the same calls go through.
	mustOK(t, "stage again", e.stage(vol, staging, fsCap, nil))
}

// Stop before ServeListener (a signal during start-up) must not leave a
// server that never stops.
func TestStopBeforeServe(t *testing.T) {
	e := newDriverEnv(t)
	e.d.Stop()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.d.ServeListener(l) }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeListener after Stop: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeListener after Stop still serving")
	}
}
