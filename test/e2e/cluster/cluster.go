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
	"time"
)

// Config says where a cluster runs from.
type Config struct {
	RunDir string // everything of this run: logs, pki, the node's share, etcd
	Tools  *Tools
	Image  *NodeImage
	// Images are docker-archive tarballs the node imports into containerd
	// before it starts the kubelet.
	Images []string
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
	share      string // the node's 9p share
	qemu       *Proc
	// Boots counts node boots, failed ones included; BootFailures says why
	// each failed one was retried.
	Boots        int
	BootFailures []string
	// Timings of the start-up phases.
	ControlPlaneUp time.Duration
	NodeReady      time.Duration
}

// Start starts the control plane and boots the node, and returns once the
// node is Ready. The caller must call Stop, also when Start fails (then with
// the returned non-nil Cluster).
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 4 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	logDir := filepath.Join(cfg.RunDir, "logs")
	procs, err := NewProcs(logDir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, Procs: procs, LogDir: logDir, share: filepath.Join(cfg.RunDir, "node")}
	if err := PrepareIsolatedNetns(ctx); err != nil {
		return c, err
	}
	if c.pki, err = writePKI(filepath.Join(c.share, "pki")); err != nil {
		return c, err
	}
	start := time.Now()
	if err := c.startControlPlane(ctx); err != nil {
		return c, err
	}
	c.ControlPlaneUp = time.Since(start)
	fmt.Fprintf(cfg.Log, "e2e: control plane up in %s\n", c.ControlPlaneUp.Round(time.Millisecond))
	if err := c.writeNodeShare(); err != nil {
		return c, err
	}
	start = time.Now()
	for attempt := 1; ; attempt++ {
		err := c.bootNode(ctx, attempt)
		if err == nil {
			break
		}
		c.BootFailures = append(c.BootFailures, err.Error())
		fmt.Fprintf(cfg.Log, "e2e: boot %d failed: %v\n", attempt, err)
		if attempt == 2 || ctx.Err() != nil {
			return c, fmt.Errorf("cluster: node not Ready after %d boots: %w", attempt, err)
		}
	}
	c.NodeReady = time.Since(start)
	fmt.Fprintf(cfg.Log, "e2e: node Ready in %s (%d boot(s))\n", c.NodeReady.Round(time.Millisecond), c.Boots)
	return c, nil
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
		"--bind-address=127.0.0.1", "--secure-port=6443", "--advertise-address="+GatewayIP,
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

// nodeReady asks the apiserver whether the node is Ready.
func (c *Cluster) nodeReady(ctx context.Context) (bool, error) {
	out, err := c.Kubectl(ctx, "get", "node", NodeName, "-o", "json")
	if err != nil {
		return false, err
	}
	var n struct {
		Status struct {
			Conditions []struct{ Type, Status string }
		}
	}
	if err := json.Unmarshal(out, &n); err != nil {
		return false, err
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == "Ready" {
			return cond.Status == "True", nil
		}
	}
	return false, nil
}

// errSoftLockup marks a boot whose console shows the guest kernel stalling.
var errSoftLockup = errors.New("guest kernel reported a soft lockup or RCU stall")
