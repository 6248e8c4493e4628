package csi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// DefaultDriverName is the CSI driver name csi-dmthin registers under.
const DefaultDriverName = "dmthin.csi.dmthin.io"

// TopologyKey is the topology segment key carrying the node's name.
const TopologyKey = "topology.dmthin.csi.dmthin.io/node"

// Pool is what the driver needs of a node's pool; *thinpool.Pool is one.
type Pool interface {
	Name() string
	CreateVolume(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error)
	CreateTemplate(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error)
	SealTemplate(ctx context.Context, name string) error
	ZeroesNewBlocks() bool
	Snapshot(ctx context.Context, name, source string) (*thinpool.Volume, error)
	SnapshotGroup(ctx context.Context, group string, members []thinpool.GroupMember) ([]*thinpool.Volume, error)
	// GroupSnapshots returns a group's snapshots; ErrNotFound for none.
	GroupSnapshots(group string) ([]thinpool.Volume, error)
	Clone(ctx context.Context, name, source string, sizeBytes int64) (*thinpool.Volume, error)
	Delete(ctx context.Context, name string) error
	Grow(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error)
	Activate(ctx context.Context, name string) (string, error)
	Deactivate(ctx context.Context, name string) error
	// DevicePath returns an active volume's device node; ErrNotFound when
	// it is not active.
	DevicePath(name string) (string, error)
	Get(name string) (*thinpool.Volume, error)
	List() []thinpool.Volume
	Usage() (thinpool.Usage, error)
	// Admit answers, changing nothing, whether the pool would now take a
	// new device of kind and sizeBytes: the pool's own admission, which
	// this package never repeats. ErrNoSpace, ErrPoolUnhealthy or
	// ErrClosed when not.
	Admit(sizeBytes int64, kind thinpool.Kind) error
	// MappedExtents returns the byte ranges a volume's or snapshot's thin
	// device maps, from the pool's metadata: what a copy to another node
	// sends.
	MappedExtents(ctx context.Context, name string) ([]thinpool.Extent, error)
	// AdmitData answers whether the pool's free data now holds n more
	// bytes: those a copy from another node writes at once.
	AdmitData(n int64) error
}

var _ Pool = (*thinpool.Pool)(nil)

// Options configure a Driver.
type Options struct {
	Name    string // CSI driver name; DefaultDriverName when empty
	Version string
	NodeID  string // this node's name; also its topology segment
	// Pools are this node's pools by name; DefaultPool serves requests that
	// name none (default: the only pool, or the first by name).
	Pools       map[string]Pool
	DefaultPool string
	// RecordedPools names every pool whose records are on this node (each
	// pool ever created here), configured or not. A delete naming one that
	// is not in Pools is refused with FailedPrecondition: its devices still
	// exist, and reporting them deleted would leak them. A pool in neither
	// list was never here, and deleting in it succeeds.
	RecordedPools []string
	// KubeletDir bounds every path the node service mounts or removes
	// (default /var/lib/kubelet).
	KubeletDir string
	// FS does the node's filesystem work; NewHostFS for real.
	FS FS
	// Interceptors run around every call, after the logging one.
	Interceptors []grpc.UnaryServerInterceptor
	// Templates is how many formatted templates each pool keeps
	// (templates.go); 0 means DefaultTemplates, a negative number none.
	Templates int
	// Events, when set, hears of refusals an operator should see as
	// Kubernetes Events (events.go).
	Events EventSink
	// Copy, when set, lets a restore of another node's snapshot be made
	// here by copying it (copy.go).
	Copy *CopyOptions
}

// Driver serves the CSI services: Identity, Controller, Node and
// GroupController.
type Driver struct {
	csipb.UnimplementedIdentityServer
	csipb.UnimplementedControllerServer
	csipb.UnimplementedNodeServer
	csipb.UnimplementedGroupControllerServer

	name, version, nodeID string
	pools                 map[string]Pool
	defaultPool           string
	unconfigured          map[string]bool // recorded on this node, not in pools
	kubeletDir            string
	fs                    FS
	templates             *templates
	locks                 idLocks
	interceptors          []grpc.UnaryServerInterceptor
	events                EventSink
	copies                *copier // nil without CopyOptions
	copySrc               *copySource
	openDev               func(path string, write bool) (deviceFile, error)

	mu      sync.Mutex
	srv     *grpc.Server
	stopped bool // Stop was called; a later ServeListener returns at once
}

// New checks the options and makes a Driver.
func New(o Options) (*Driver, error) {
	if o.Name == "" {
		o.Name = DefaultDriverName
	}
	if o.NodeID == "" {
		return nil, errors.New("csi: node ID is required")
	}
	if len(o.Pools) == 0 {
		return nil, errors.New("csi: no pools")
	}
	if o.FS == nil {
		return nil, errors.New("csi: no FS")
	}
	if o.KubeletDir == "" {
		o.KubeletDir = "/var/lib/kubelet"
	}
	kd, err := filepath.Abs(o.KubeletDir)
	if err != nil {
		return nil, err
	}
	if o.DefaultPool == "" {
		names := make([]string, 0, len(o.Pools))
		for n := range o.Pools {
			names = append(names, n)
		}
		sort.Strings(names)
		o.DefaultPool = names[0]
	}
	if _, ok := o.Pools[o.DefaultPool]; !ok {
		return nil, fmt.Errorf("csi: default pool %q is not configured", o.DefaultPool)
	}
	switch {
	case o.Templates == 0:
		o.Templates = DefaultTemplates
	case o.Templates < 0:
		o.Templates = 0
	}
	unconfigured := map[string]bool{}
	for _, n := range o.RecordedPools {
		if _, ok := o.Pools[n]; !ok {
			unconfigured[n] = true
		}
	}
	d := &Driver{
		name: o.Name, version: o.Version, nodeID: o.NodeID,
		pools: o.Pools, defaultPool: o.DefaultPool, unconfigured: unconfigured, kubeletDir: filepath.Clean(kd),
		fs: o.FS, templates: newTemplates(o.Templates, o.FS), interceptors: o.Interceptors, events: o.Events,
		openDev: openDeviceFile,
	}
	d.copySrc = &copySource{d: d, open: map[string]int{}, lastUse: map[string]time.Time{}, started: time.Now()}
	if o.Copy != nil {
		if d.copies, err = newCopier(d, *o.Copy); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Serve serves the CSI services on endpoint ("unix:///path/csi.sock" or a
// path) until Stop. A stale socket file is removed first.
func (d *Driver) Serve(endpoint string) error {
	path, err := socketPath(endpoint)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	return d.ServeListener(l)
}

// ServeListener serves on l until Stop.
func (d *Driver) ServeListener(l net.Listener) error {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(append([]grpc.UnaryServerInterceptor{logCalls}, d.interceptors...)...))
	csipb.RegisterIdentityServer(srv, d)
	csipb.RegisterControllerServer(srv, d)
	csipb.RegisterNodeServer(srv, d)
	csipb.RegisterGroupControllerServer(srv, d)
	d.mu.Lock()
	if d.stopped {
		// Stop came first (a signal during start-up): serving now would
		// never end.
		d.mu.Unlock()
		_ = l.Close()
		return nil
	}
	d.srv = srv
	d.mu.Unlock()
	klog.InfoS("Serving CSI", "driver", d.name, "node", d.nodeID, "address", l.Addr().String())
	return srv.Serve(l)
}

// Stop stops serving, letting calls in progress finish however long they
// take; see Shutdown.
func (d *Driver) Stop() { d.Shutdown(context.Background()) }

// Shutdown stops serving: no new connection or call is taken, and the
// calls in progress may finish until ctx is done. Then they are cancelled
// and Shutdown waits for their handlers to return, and for the template
// builds, which it cancels too. When it returns, nothing the driver
// started uses a pool any more: the pools' owner may close them. A
// ServeListener that has not started serving yet returns at once. Mounted
// volumes stay mounted and working.
func (d *Driver) Shutdown(ctx context.Context) {
	d.mu.Lock()
	d.stopped = true
	srv := d.srv
	d.mu.Unlock()
	// Copies in progress stop first (they resume from their checkpoint
	// after the restart), so the calls waiting for them return.
	d.copies.stop()
	if srv != nil {
		graceful := make(chan struct{})
		go func() {
			srv.GracefulStop()
			close(graceful)
		}()
		select {
		case <-graceful:
		case <-ctx.Done():
			start := time.Now()
			klog.InfoS("Calls still in progress at the shutdown deadline: cancelling them")
			srv.Stop() // cancels them
			<-graceful // GracefulStop returns once every handler has
			klog.InfoS("Cancelled calls returned", "duration", time.Since(start))
		}
	}
	d.templates.stop()
}

func socketPath(endpoint string) (string, error) {
	if !strings.Contains(endpoint, "://") {
		return endpoint, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	if u.Scheme != "unix" {
		return "", fmt.Errorf("endpoint %q: only unix sockets are served", endpoint)
	}
	return filepath.Join(u.Host, u.Path), nil
}

// pool returns the named pool (the default when name is empty).
func (d *Driver) pool(name string) (Pool, error) {
	if name == "" {
		name = d.defaultPool
	}
	p, ok := d.pools[name]
	if !ok {
		return nil, notFound("pool %q is not configured on node %s", name, d.nodeID)
	}
	return p, nil
}

func (d *Driver) topology() *csipb.Topology {
	return &csipb.Topology{Segments: map[string]string{TopologyKey: d.nodeID}}
}
