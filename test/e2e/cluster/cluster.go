package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Config says where a cluster runs from.
type Config struct {
	RunDir string // everything of this run: logs, pki, the nodes' shares and disks, etcd
	Tools  *Tools
	Image  *NodeImage
	// ImagesDisk is containerd's root with every image imported
	// (BuildImagesDisk); each node mounts an overlay of it.
	ImagesDisk string
	// SSHD is the host path of the nodes' SSH server (BuildSSHD).
	SSHD string
	// Nodes is the number of worker nodes (default 2), each a qemu VM with
	// NodeCPUs (default 2) and NodeMemoryMiB (default 4096).
	Nodes         int
	NodeCPUs      int
	NodeMemoryMiB int
	// ReadyTimeout bounds one boot from qemu's start to node Ready.
	ReadyTimeout time.Duration
	Log          io.Writer // progress lines
}

// Cluster is a running cluster.
type Cluster struct {
	cfg        Config
	Procs      *Procs
	Kubeconfig string // admin kubeconfig on the host
	LogDir     string
	pki        pkiFiles
	Nodes      []*NodeVM
	// Timings of the start-up phases.
	ControlPlaneUp time.Duration
	NodesReady     time.Duration // from the first qemu start until every node is Ready
}

// NodeVM is one node of a running cluster: its identity, its share and its
// disks (kept for the whole run, so a node powered off boots again on the
// same ones) and its current qemu.
type NodeVM struct {
	Node
	share string // its 9p share
	dir   string // its disks
	mu    sync.Mutex
	qemu  *Proc
	// bootID is the node's boot id as its kubelet last reported it Ready.
	bootID string
	// Boots counts this node's boots, failed ones included; BootFailures
	// says why each failed one was retried.
	Boots        int
	BootFailures []string
	// Ready is the last boot's time from qemu's start to node Ready.
	Ready time.Duration
}

// Node returns the named node, or nil.
func (c *Cluster) Node(name string) *NodeVM {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// NodeNames returns the nodes' names in order.
func (c *Cluster) NodeNames() []string {
	var names []string
	for _, n := range c.Nodes {
		names = append(names, n.Name)
	}
	return names
}

func (c *Cluster) nodeSpecs() []Node {
	var specs []Node
	for _, n := range c.Nodes {
		specs = append(specs, n.Node)
	}
	return specs
}

// Start starts the control plane and boots the nodes, all at once, and
// returns once every node is Ready. The caller must call Stop, also when
// Start fails (then with the returned non-nil Cluster).
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 4 * time.Minute
	}
	if cfg.Nodes == 0 {
		cfg.Nodes = 2
	}
	if cfg.NodeCPUs == 0 {
		cfg.NodeCPUs = 2
	}
	if cfg.NodeMemoryMiB == 0 {
		cfg.NodeMemoryMiB = 4096
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.Nodes < 1 || cfg.Nodes > MaxNodes {
		return nil, fmt.Errorf("cluster: %d nodes: want 1 to %d", cfg.Nodes, MaxNodes)
	}
	logDir := filepath.Join(cfg.RunDir, "logs")
	procs, err := NewProcs(logDir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, Procs: procs, LogDir: logDir}
	for _, spec := range NodeSpecs(cfg.Nodes) {
		dir := filepath.Join(cfg.RunDir, "nodes", spec.Name)
		c.Nodes = append(c.Nodes, &NodeVM{Node: spec, share: filepath.Join(dir, "share"), dir: dir})
	}
	if err := PrepareIsolatedNetns(ctx); err != nil {
		return c, err
	}
	if err := SetupNodeLinks(ctx, c.nodeSpecs()); err != nil {
		return c, err
	}
	if c.pki, err = writePKI(filepath.Join(cfg.RunDir, "pki"), c.nodeSpecs()); err != nil {
		return c, err
	}
	start := time.Now()
	if err := c.startControlPlane(ctx); err != nil {
		return c, err
	}
	c.ControlPlaneUp = time.Since(start)
	fmt.Fprintf(cfg.Log, "e2e: control plane up in %s\n", c.ControlPlaneUp.Round(time.Millisecond))
	for _, n := range c.Nodes {
		if err := c.writeNodeShare(n); err != nil {
			return c, err
		}
	}
	// The nodes boot side by side; each failed boot is retried once from
	// fresh disks.
	start = time.Now()
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, n := range c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for attempt := 1; ; attempt++ {
				err := c.bootNode(ctx, n, true)
				if err == nil {
					fmt.Fprintf(cfg.Log, "e2e: %s Ready in %s (boot %d)\n", n.Name, n.Ready.Round(time.Millisecond), attempt)
					return
				}
				n.mu.Lock()
				n.BootFailures = append(n.BootFailures, err.Error())
				n.mu.Unlock()
				fmt.Fprintf(cfg.Log, "e2e: %s: boot %d failed: %v\n", n.Name, attempt, err)
				if attempt == 2 || ctx.Err() != nil {
					errs[i] = fmt.Errorf("cluster: %s not Ready after %d boots: %w", n.Name, attempt, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return c, err
	}
	c.NodesReady = time.Since(start)
	fmt.Fprintf(cfg.Log, "e2e: %d nodes Ready in %s\n", len(c.Nodes), c.NodesReady.Round(time.Millisecond))
	return c, nil
}

// PowerOff cuts a node's power: its qemu is killed (SIGKILL, by its pid),
// with no shutdown of the guest. What the guest had not written to its
// disks is lost; the disks stay for PowerOn.
func (c *Cluster) PowerOff(name string) error {
	n := c.Node(name)
	if n == nil {
		return fmt.Errorf("cluster: no node %q", name)
	}
	n.mu.Lock()
	q := n.qemu
	n.mu.Unlock()
	if q == nil {
		return fmt.Errorf("cluster: %s has no qemu", name)
	}
	if done, _ := q.Exited(); done {
		return fmt.Errorf("cluster: %s is already off", name)
	}
	if err := q.Cmd.Process.Kill(); err != nil {
		return err
	}
	<-q.done
	return nil
}

// PowerOn boots a node that PowerOff stopped, on the same disks, and waits
// until it is Ready from this new boot.
func (c *Cluster) PowerOn(ctx context.Context, name string) error {
	n := c.Node(name)
	if n == nil {
		return fmt.Errorf("cluster: no node %q", name)
	}
	return c.bootNode(ctx, n, false)
}

// RemoveDisks deletes every node's disks (gigabytes of overlays and data
// files); only after Stop.
func (c *Cluster) RemoveDisks() {
	for _, n := range c.Nodes {
		for _, d := range []string{n.rootDisk(), n.imagesDisk(), n.dataDisk()} {
			_ = os.Remove(d)
		}
	}
}

// Stop stops every process by its pid and reports how each ended.
func (c *Cluster) Stop() []string {
	return c.Procs.StopAll(15 * time.Second)
}

// Bin returns the host path of a built tool.
func (c *Cluster) Bin(name string) string { return c.cfg.Tools.Path(name) }

func (c *Cluster) startControlPlane(ctx context.Context) error {
	p := c.pki
	etcdDir := filepath.Join(c.cfg.RunDir, "etcd")
	if _, err := c.Procs.Start("etcd", c.Bin("etcd"),
		"--name=e2e", "--data-dir="+etcdDir,
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380",
		"--listen-metrics-urls=http://127.0.0.1:2381",
		// A throwaway cluster: durability buys nothing, fsync costs seconds.
		"--unsafe-no-fsync", "--log-level=warn",
	); err != nil {
		return err
	}
	if _, err := c.Procs.Start("kube-apiserver", c.Bin("kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		// On every address of the namespace: lo for the host side,
		// the bridge for the nodes. The namespace has no other.
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+GatewayIP,
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--client-ca-file="+p.path("ca.crt"),
		"--service-account-key-file="+p.path("sa.pub"), "--service-account-signing-key-file="+p.path("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-cluster-ip-range="+ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP",
		"--allow-privileged=true",
		"--v=1",
	); err != nil {
		return err
	}
	c.Kubeconfig = filepath.Join(c.cfg.RunDir, "admin.kubeconfig")
	for _, kc := range []struct{ file, cert string }{
		{c.Kubeconfig, "admin"},
		{filepath.Join(c.cfg.RunDir, "controller-manager.kubeconfig"), "controller-manager"},
		{filepath.Join(c.cfg.RunDir, "scheduler.kubeconfig"), "scheduler"},
		{filepath.Join(c.cfg.RunDir, "snapshot-controller.kubeconfig"), "snapshot-controller"},
	} {
		if err := os.WriteFile(kc.file, []byte(kubeconfig("https://"+APIServerHostPort, p.dir, kc.cert)), 0o600); err != nil {
			return err
		}
	}
	if err := c.waitAPIServer(ctx, 2*time.Minute); err != nil {
		return err
	}
	if _, err := c.Procs.Start("kube-controller-manager", c.Bin("kube-controller-manager"),
		"--kubeconfig="+filepath.Join(c.cfg.RunDir, "controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+filepath.Join(c.cfg.RunDir, "controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+filepath.Join(c.cfg.RunDir, "controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file="+p.path("sa.key"),
		"--root-ca-file="+p.path("ca.crt"),
		"--use-service-account-credentials=true",
		"--leader-elect=false", "--v=1",
	); err != nil {
		return err
	}
	_, err := c.Procs.Start("kube-scheduler", c.Bin("kube-scheduler"),
		"--kubeconfig="+filepath.Join(c.cfg.RunDir, "scheduler.kubeconfig"),
		"--authentication-kubeconfig="+filepath.Join(c.cfg.RunDir, "scheduler.kubeconfig"),
		"--authorization-kubeconfig="+filepath.Join(c.cfg.RunDir, "scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false", "--v=1",
	)
	return err
}

// waitAPIServer polls /readyz with the admin certificate.
func (c *Cluster) waitAPIServer(ctx context.Context, timeout time.Duration) error {
	p := c.pki
	caPEM, err := os.ReadFile(p.path("ca.crt"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(p.path("admin.crt"), p.path("admin.key"))
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		resp, err := client.Get("https://" + APIServerHostPort + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, tail(string(body), 3))
		} else {
			last = err.Error()
		}
		for _, pr := range c.Procs.procs {
			if done, err := pr.Exited(); done {
				return fmt.Errorf("cluster: %s exited: %v", pr.Name, err)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	return fmt.Errorf("cluster: apiserver not ready in %s: %s", timeout, last)
}

// Kubectl runs the built kubectl with the admin kubeconfig and returns its
// stdout.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return output(ctx, "", c.Bin("kubectl"), append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
}

// KubectlStdin is Kubectl with stdin (for apply -f -).
func (c *Cluster) KubectlStdin(ctx context.Context, stdin string, args ...string) ([]byte, error) {
	cmd := commandContext(ctx, c.Bin("kubectl"), append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, tail(stderr.String(), 20))
	}
	return out, nil
}

// nodeReady asks the apiserver whether the named node is Ready, and the
// boot id its kubelet reported.
func (c *Cluster) nodeReady(ctx context.Context, name string) (bootID string, ready bool, err error) {
	out, err := c.Kubectl(ctx, "get", "node", name, "-o", "json")
	if err != nil {
		return "", false, err
	}
	var n struct {
		Status struct {
			Conditions []struct{ Type, Status string }
			NodeInfo   struct {
				BootID string `json:"bootID"`
			} `json:"nodeInfo"`
		}
	}
	if err := json.Unmarshal(out, &n); err != nil {
		return "", false, err
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == "Ready" {
			return n.Status.NodeInfo.BootID, cond.Status == "True", nil
		}
	}
	return n.Status.NodeInfo.BootID, false, nil
}

// errSoftLockup marks a boot whose console shows the guest kernel stalling.
var errSoftLockup = errors.New("guest kernel reported a soft lockup or RCU stall")
