package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
)

// `csi-dmthin controller`: the cluster-level decisions (pkg/kube
// Controller), made by one of the Deployment's replicas at a time, elected
// through a Lease.

// controllerResync re-delivers every object now and then, so a PVC whose
// StorageClass appeared after it is looked at again.
const controllerResync = 10 * time.Minute

type controllerFlags struct {
	driverName     string
	kubeconfig     string
	workers        int
	thinPools      bool
	copyAcross     bool
	httpEndpoint   string
	leaderElection bool
	leaseNamespace string
	leaseName      string
	identity       string
	leaseDuration  time.Duration
	renewDeadline  time.Duration
	retryPeriod    time.Duration
}

func parseControllerFlags(args []string) (*controllerFlags, error) {
	fs := newFlagSet("controller")
	klog.InitFlags(fs)
	f := &controllerFlags{}
	fs.StringVar(&f.driverName, "driver-name", csi.DefaultDriverName, "CSI driver name")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: the in-cluster service account)")
	fs.IntVar(&f.workers, "workers", 4, "PVCs placed at once")
	fs.BoolVar(&f.thinPools, "thinpools", true, "read the ThinPool objects (when their CRD is installed) to leave a restore unplaced while its source's pool has no room or is unhealthy")
	fs.BoolVar(&f.copyAcross, "copy-across-nodes", false, "a restore whose snapshot's node is cordoned or full is left to the scheduler, and the chosen node's driver copies the snapshot there (the node drivers need --copy-listen)")
	fs.StringVar(&f.httpEndpoint, "http-endpoint", ":9811", "address of /healthz (empty: none)")
	fs.BoolVar(&f.leaderElection, "leader-election", true, "run only while holding the Lease, so that one replica decides at a time")
	fs.StringVar(&f.leaseNamespace, "leader-election-namespace", os.Getenv("NAMESPACE"), "namespace of the Lease (default $NAMESPACE)")
	fs.StringVar(&f.leaseName, "leader-election-name", "", "name of the Lease (default: the driver name with dots as dashes, then -controller)")
	fs.StringVar(&f.identity, "leader-election-identity", os.Getenv("POD_NAME"), "this replica's name in the Lease (default $POD_NAME, else the host name and a random suffix)")
	fs.DurationVar(&f.leaseDuration, "leader-election-lease-duration", 15*time.Second, "how long a Lease not renewed stays its holder's")
	fs.DurationVar(&f.renewDeadline, "leader-election-renew-deadline", 10*time.Second, "how long the leader tries to renew before it gives up (and exits)")
	fs.DurationVar(&f.retryPeriod, "leader-election-retry-period", 2*time.Second, "how often the replicas try to take or renew the Lease")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, usageError{fmt.Errorf("controller: unexpected argument %q", fs.Arg(0))}
	}
	if f.workers < 1 {
		return nil, usageError{fmt.Errorf("--workers=%d: want at least 1", f.workers)}
	}
	if f.leaderElection {
		if f.leaseNamespace == "" {
			return nil, usageError{errors.New("--leader-election needs --leader-election-namespace (or $NAMESPACE)")}
		}
		if !(f.retryPeriod > 0 && f.retryPeriod < f.renewDeadline && f.renewDeadline < f.leaseDuration) {
			return nil, usageError{fmt.Errorf("want 0 < --leader-election-retry-period (%v) < --leader-election-renew-deadline (%v) < --leader-election-lease-duration (%v)", f.retryPeriod, f.renewDeadline, f.leaseDuration)}
		}
	}
	if f.leaseName == "" {
		f.leaseName = leaseName(f.driverName)
	}
	if f.identity == "" {
		host, _ := os.Hostname()
		f.identity = host + "_" + string(uuid.NewUUID())
	}
	return f, nil
}

// leaseName is the default Lease name for a driver: a DNS label.
func leaseName(driver string) string {
	b := []byte(driver)
	for i, c := range b {
		if c == '.' || c == '_' {
			b[i] = '-'
		}
	}
	return string(b) + "-controller"
}

func controllerCmd(args []string) error {
	f, err := parseControllerFlags(args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cfg, err := restConfig(f.kubeconfig)
	if err != nil {
		return err
	}
	cfg.UserAgent = "csi-dmthin-controller/" + version
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	o := kube.ControllerOptions{DriverName: f.driverName, Client: client, Resync: controllerResync, CopyAcrossNodes: f.copyAcross}
	has, err := hasSnapshotAPI(client)
	if err != nil {
		return err
	}
	if has {
		if o.Snapshots, err = snapclient.NewForConfig(cfg); err != nil {
			return fmt.Errorf("snapshot client: %w", err)
		}
		if o.GroupSnapshots, err = hasAPI(client, "groupsnapshot.storage.k8s.io/v1", "volumegroupsnapshotcontents", "volumegroupsnapshotclasses"); err != nil {
			return err
		}
		if !o.GroupSnapshots {
			klog.InfoS("The group snapshot API (groupsnapshot.storage.k8s.io/v1) is not installed: group snapshot contents are not labelled for their node until the controller restarts after it is")
		}
	} else {
		klog.InfoS("The snapshot API (snapshot.storage.k8s.io/v1) is not installed: restores from VolumeSnapshots are not steered to their node until the controller restarts after it is")
	}
	if f.thinPools {
		if o.ThinPools, err = thinPoolClient(cfg, client, "room in a source's pool is left to its node's admission"); err != nil {
			return err
		}
	}
	// Not ctx: the recorder must outlive the controllers' last syncs
	// after SIGTERM, and is stopped (flushing what it holds) after them.
	recorder, stopRecorder := kube.NewRecorder(context.Background(), client, kube.ControllerComponent, "")
	defer stopRecorder()
	o.Recorder = recorder

	run := func(ctx context.Context) error {
		c, err := kube.NewController(o)
		if err != nil {
			return err
		}
		return c.Run(ctx, f.workers)
	}
	var health *leaderelection.HealthzAdaptor
	if f.leaderElection {
		health = leaderelection.NewLeaderHealthzAdaptor(20 * time.Second)
	}
	if f.httpEndpoint != "" {
		l, err := net.Listen("tcp", f.httpEndpoint)
		if err != nil {
			return fmt.Errorf("--http-endpoint: %w", err)
		}
		srv := &http.Server{Handler: healthzHandler(health), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "Health endpoint stopped")
			}
		}()
		defer srv.Close()
	}
	if !f.leaderElection {
		klog.InfoS("Running without leader election: run one replica only", "driver", f.driverName)
		return run(ctx)
	}
	return lead(ctx, client, f, health, run)
}

// healthzHandler answers /healthz: ok, unless this replica leads and has
// not renewed its Lease in time.
func healthzHandler(health *leaderelection.HealthzAdaptor) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if health != nil {
			if err := health.Check(r); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// lead runs run while this replica holds the Lease, until ctx is done.
// The Lease is released only after run has returned, so the next leader
// never acts beside this one's last syncs. Losing the Lease ends the
// process with an error (the Deployment restarts it as a follower): a
// controller whose informers and queues lived through a lost term could
// act on what another leader has since changed.
func lead(ctx context.Context, client kubernetes.Interface, f *controllerFlags, health *leaderelection.HealthzAdaptor, run func(context.Context) error) error {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: f.leaseName, Namespace: f.leaseNamespace},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: f.identity},
	}
	// The election runs on its own context, ended when run has returned
	// (or at once on ctx's end when this replica does not lead): with
	// ReleaseOnCancel, ending it gives the Lease up.
	electCtx, stopElecting := context.WithCancel(context.Background())
	defer stopElecting()
	var (
		leading atomic.Bool
		runErr  error
		ran     = make(chan struct{})
	)
	stopWatch := context.AfterFunc(ctx, func() {
		if !leading.Load() {
			stopElecting()
		}
	})
	defer stopWatch()
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   f.leaseDuration,
		RenewDeadline:   f.renewDeadline,
		RetryPeriod:     f.retryPeriod,
		ReleaseOnCancel: true,
		Name:            f.leaseName,
		WatchDog:        health,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(leadCtx context.Context) {
				leading.Store(true)
				defer close(ran)
				defer stopElecting()
				// Run until the Lease is lost or ctx ends.
				runCtx, cancel := context.WithCancel(leadCtx)
				defer cancel()
				stop := context.AfterFunc(ctx, cancel)
				defer stop()
				klog.InfoS("Leading: making the cluster's decisions", "lease", klog.KRef(f.leaseNamespace, f.leaseName), "identity", f.identity)
				runErr = run(runCtx)
			},
			OnStoppedLeading: func() {},
			OnNewLeader: func(id string) {
				if id != f.identity {
					klog.InfoS("Following", "leader", id, "lease", klog.KRef(f.leaseNamespace, f.leaseName))
				}
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	le.Run(electCtx) // returns once the election stopped or the Lease was lost
	if !leading.Load() {
		return nil
	}
	<-ran // run has returned: its error is read after it wrote it
	switch {
	case runErr != nil:
		return runErr
	case ctx.Err() != nil:
		return nil
	}
	return errors.New("lost the leader election Lease")
}
