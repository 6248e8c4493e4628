package csi

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// A pool whose records are on the node but which the configuration no
// longer has (a node moved to another nodePools entry) still holds its
// devices: a delete there must not report them gone. A pool never on the
// node holds nothing, and deleting in it succeeds.
func TestDeleteInUnconfiguredPool(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	snap := e.createSnapshot("snap", vol).GetSnapshotId()
	pools := map[string]Pool{}
	for n, p := range e.pools {
		pools[n] = p
	}
	d, err := New(Options{NodeID: testNode, Pools: pools, DefaultPool: testPool, KubeletDir: e.kubeletDir, FS: e.fs, Templates: -1,
		RecordedPools: []string{testPool, otherPool, "gone"}})
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
	words := []string{"gone", "recorded on node " + testNode, "not configured"}
	runBadCases(t, e, []badCase{
		{"DeleteVolume/recorded pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "gone/pvc-1"}))
		}, codes.FailedPrecondition, append([]string{"volume_id gone/pvc-1"}, words...)},
		{"DeleteSnapshot/recorded pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: "gone/snap-1"}))
		}, codes.FailedPrecondition, append([]string{"snapshot_id gone/snap-1"}, words...)},
		{"DeleteVolume/never here", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "never/pvc-1"}))
		}, codes.OK, nil},
		{"DeleteSnapshot/never here", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: "never/snap-1"}))
		}, codes.OK, nil},
		{"DeleteVolume/configured pool, no such volume", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: testPool + "/missing"}))
		}, codes.OK, nil},
	})
	// Recorded pools that are configured delete as ever.
	if _, err := d.DeleteSnapshot(t.Context(), &csipb.DeleteSnapshotRequest{SnapshotId: snap}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: vol}); err != nil {
		t.Fatal(err)
	}
	if left := e.pools[testPool].List(); len(left) != 0 {
		t.Errorf("left after the deletes: %+v", left)
	}
}

// blockingCall makes one method wait in the driver until its call's context
// is done or release is closed, and counts the handlers that returned.
type blockingCall struct {
	method   string
	entered  chan struct{}
	release  chan struct{}
	returned atomic.Int32
}

func newBlockingCall(method string) *blockingCall {
	return &blockingCall{method: method, entered: make(chan struct{}), release: make(chan struct{})}
}

func (b *blockingCall) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if info.FullMethod != b.method {
		return h(ctx, req)
	}
	defer b.returned.Add(1)
	close(b.entered)
	select {
	case <-ctx.Done():
		// Like a handler that takes a moment to notice, or to undo what
		// it started.
		time.Sleep(200 * time.Millisecond)
		return nil, status.FromContextError(ctx.Err()).Err()
	case <-b.release:
		return h(ctx, req)
	}
}

// shutdownEnv serves a driver with b's interceptor and starts one call of
// b's method (GetCapacity); it returns the driver, the call's result and
// ServeListener's.
func shutdownEnv(t *testing.T, b *blockingCall) (*Driver, <-chan error, <-chan error) {
	t.Helper()
	e := newDriverEnv(t)
	pools := map[string]Pool{}
	for n, p := range e.pools {
		pools[n] = p
	}
	d, err := New(Options{NodeID: testNode, Pools: pools, DefaultPool: testPool, KubeletDir: e.kubeletDir, FS: e.fs, Templates: -1,
		Interceptors: []grpc.UnaryServerInterceptor{b.intercept}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "csi.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- d.ServeListener(l) }()
	t.Cleanup(d.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	called := make(chan error, 1)
	go func() {
		_, err := csipb.NewControllerClient(conn).GetCapacity(context.Background(), &csipb.GetCapacityRequest{})
		called <- err
	}()
	select {
	case <-b.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the call never reached the driver")
	}
	return d, called, served
}

// A call that outlasts the shutdown deadline is cancelled, and Shutdown
// returns only after its handler has: the pools' owner closes them next.
func TestShutdownCancelsCallsAtDeadline(t *testing.T) {
	b := newBlockingCall(csipb.Controller_GetCapacity_FullMethodName)
	d, called, served := shutdownEnv(t, b)
	const deadline = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	d.Shutdown(ctx)
	took := time.Since(start)
	if n := b.returned.Load(); n != 1 {
		t.Errorf("Shutdown returned with the call's handler still running (%d returned)", n)
	}
	if took < deadline {
		t.Errorf("Shutdown took %v: it did not give the call its %v", took, deadline)
	}
	if took > deadline+5*time.Second {
		t.Errorf("Shutdown took %v, far past its %v deadline", took, deadline)
	}
	if err := <-called; status.Code(err) == codes.OK {
		t.Errorf("the cancelled call succeeded")
	}
	if err := <-served; err != nil {
		t.Errorf("ServeListener: %v", err)
	}
}

// A call that finishes within the deadline gets its answer, and Shutdown
// does not wait for the deadline.
func TestShutdownLetsCallsFinish(t *testing.T) {
	b := newBlockingCall(csipb.Controller_GetCapacity_FullMethodName)
	d, called, served := shutdownEnv(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	time.AfterFunc(100*time.Millisecond, func() { close(b.release) })
	start := time.Now()
	d.Shutdown(ctx)
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("Shutdown took %v after the call finished", took)
	}
	if err := <-called; err != nil {
		t.Errorf("the call in progress at Shutdown: %v", err)
	}
	if n := b.returned.Load(); n != 1 {
		t.Errorf("%d handlers returned, want 1", n)
	}
	if err := <-served; err != nil {
		t.Errorf("ServeListener: %v", err)
	}
}
