package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// nodeBinaries are linked from the tools into the node's share, /e2e/bin.
var nodeBinaries = []string{"kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr"}

// PauseImage is the sandbox image containerd is configured with; the harness
// imports it, so no pull is ever attempted.
const PauseImage = "localhost/pause:3.10"

const containerdConfig = `version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "` + PauseImage + `"

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "/etc/cni/net.d"
`

const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + PodCIDR + `"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /e2e/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: /e2e/pki/kubelet-serving.crt
tlsPrivateKeyFile: /e2e/pki/kubelet-serving.key
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# The node's disk is a sparse overlay: disk-pressure eviction would only
# make tests flaky.
evictionHard: {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`

const kubeProxyConfig = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /e2e/etc/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: ` + PodCIDR + `
hostnameOverride: ` + NodeName + `
conntrack: {maxPerCore: 0}
`

// nodeInitScript is /e2e/node-init.sh, run by /sbin/e2e-init under tini.
const nodeInitScript = `set -u
export PATH=/e2e/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
L=/e2e/logs
mkdir -p $L
exec >>$L/node-init.log 2>&1
say() { echo "node-init: $(cut -d' ' -f1 /proc/uptime)s $*"; echo "node-init: $*" >/dev/console; }
say start
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,rw /
mount --make-rshared /
hostname ` + NodeName + `
for m in virtio_net overlay bridge br_netfilter veth loop xfs dm_thin_pool nf_conntrack; do
	modprobe $m || say "modprobe $m failed"
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
ip link set lo up
ip link set eth0 up
ip addr add ` + NodeIP + `/24 dev eth0
ip route add default via ` + GatewayIP + `
echo "+cpuset +cpu +io +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control || say "cgroup controllers failed"
mkdir -p /etc/containerd /etc/cni/net.d /var/lib/kubelet /var/log/pods
cp /e2e/etc/containerd.toml /etc/containerd/config.toml
cp /e2e/etc/10-e2e.conflist /etc/cni/net.d/10-e2e.conflist
containerd --config /etc/containerd/config.toml >$L/containerd.log 2>&1 &
i=0
until ctr version >/dev/null 2>&1; do
	i=$((i+1)); [ $i -gt 300 ] && { say "containerd did not start"; break; }
	sleep 0.2
done
say containerd up
for img in /e2e/images/*.tar; do
	[ -e "$img" ] || continue
	ctr -n k8s.io images import --local "$img" >>$L/images.log 2>&1 || say "import $img failed"
done
say images imported
kubelet --config=/e2e/etc/kubelet.yaml --kubeconfig=/e2e/etc/kubelet.kubeconfig \
	--node-ip=` + NodeIP + ` --hostname-override=` + NodeName + ` --v=2 >$L/kubelet.log 2>&1 &
kube-proxy --config=/e2e/etc/kube-proxy.yaml --v=1 >$L/kube-proxy.log 2>&1 &
say kubelet started
wait
`

// writeNodeShare fills the node's 9p share: binaries, configuration,
// certificates (already there), images and the init script.
func (c *Cluster) writeNodeShare() error {
	for _, d := range []string{"bin", "etc", "images", "logs"} {
		if err := os.MkdirAll(filepath.Join(c.share, d), 0o755); err != nil {
			return err
		}
	}
	for _, b := range nodeBinaries {
		dst := filepath.Join(c.share, "bin", b)
		_ = os.Remove(dst)
		if err := os.Link(c.Bin(b), dst); err != nil {
			return err
		}
	}
	for _, img := range c.cfg.Images {
		dst := filepath.Join(c.share, "images", filepath.Base(img))
		_ = os.Remove(dst)
		if err := os.Link(img, dst); err != nil {
			return err
		}
	}
	server := "https://" + GatewayIP + ":6443"
	files := map[string]string{
		"node-init.sh":              nodeInitScript,
		"etc/containerd.toml":       containerdConfig,
		"etc/10-e2e.conflist":       cniConfig,
		"etc/kubelet.yaml":          kubeletConfig,
		"etc/kube-proxy.yaml":       kubeProxyConfig,
		"etc/kubelet.kubeconfig":    kubeconfig(server, "/e2e/pki", "kubelet"),
		"etc/kube-proxy.kubeconfig": kubeconfig(server, "/e2e/pki", "kube-proxy"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(c.share, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	// The node reads its certificates over 9p as root; the host keeps them 0600.
	return nil
}

// kernelCmdline: the console on ttyS0 (logged to a file and watched for
// soft lockups), warnings only. cryptomgr.notests skips the kernel's crypto
// self-tests: under TCG on a loaded host the first boot tried here spun in
// cryptomgr_test with "soft lockup - CPU#1 stuck for 261s" and never got
// to userspace; the next boot without the tests reached it in 8 s.
const kernelCmdline = "console=ttyS0 panic=-1 loglevel=4 mitigations=off cryptomgr.notests"

// importTimeout bounds the node's `ctr images import` of every image.
const importTimeout = 15 * time.Minute

// bootNode boots the VM from a fresh overlay of the cached image and waits
// for node Ready. A boot that does not get there within ReadyTimeout, whose
// console shows a soft lockup, or whose qemu exits is stopped (qemu killed
// by its pid) and reported as an error, for the caller to retry once.
func (c *Cluster) bootNode(ctx context.Context, attempt int) error {
	c.Boots++
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return fmt.Errorf("cluster: qemu-system-x86_64 not found (package qemu-system-x86)")
	}
	overlay := filepath.Join(c.cfg.RunDir, fmt.Sprintf("overlay-%d.qcow2", attempt))
	if err := run(ctx, "", "qemu-img", "create", "-q", "-f", "qcow2", "-b", c.cfg.Image.Root, "-F", "raw", overlay); err != nil {
		return err
	}
	// The guest's logs of an earlier attempt move aside, so the ones shown
	// on failure belong to this boot.
	if attempt > 1 {
		_ = os.Rename(filepath.Join(c.share, "logs"), filepath.Join(c.share, fmt.Sprintf("logs-boot%d", attempt-1)))
		_ = os.MkdirAll(filepath.Join(c.share, "logs"), 0o755)
	}
	console := filepath.Join(c.LogDir, fmt.Sprintf("console-boot%d.log", attempt))
	k := c.cfg.Image.Kernel
	q, err := c.Procs.Start(fmt.Sprintf("qemu-boot%d", attempt), "qemu-system-x86_64",
		"-machine", "pc", "-cpu", "max", "-m", "4096", "-smp", "2",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:"+console,
		"-kernel", k.KernelImage(), "-initrd", c.cfg.Image.Initramfs,
		"-append", kernelCmdline,
		"-drive", "file="+overlay+",if=virtio,format=qcow2,cache=unsafe",
		"-netdev", "user,id=n0,net=10.0.2.0/24,hostfwd=tcp:"+NodeIP+":10250-"+NodeIP+":10250",
		"-device", "virtio-net-pci,netdev=n0",
		"-virtfs", "local,path="+c.share+",mount_tag=e2e,security_model=none,id=e2e",
	)
	if err != nil {
		return err
	}
	c.qemu = q
	deadline := time.Now().Add(c.cfg.ReadyTimeout)
	var importStart time.Time
	fail := func(err error) error {
		q.stop(10 * time.Second)
		return err
	}
	for {
		if done, err := q.Exited(); done {
			return fail(fmt.Errorf("qemu exited: %v (console: %s)", err, tail(readFile(console), 5)))
		}
		if con := readFile(console); strings.Contains(con, "soft lockup") || strings.Contains(con, "rcu_sched self-detected stall") || strings.Contains(con, "rcu: INFO: rcu_preempt") {
			return fail(errSoftLockup)
		}
		if ok, _ := c.nodeReady(ctx); ok {
			return nil
		}
		// The image import is bounded on its own (importTimeout): it takes
		// minutes under TCG for the driver's and sidecars' images, and a
		// node that is importing is not hung.
		initLog := readFile(filepath.Join(c.share, "logs", "node-init.log"))
		if strings.Contains(initLog, "containerd up") && !strings.Contains(initLog, "images imported") {
			if importStart.IsZero() {
				importStart = time.Now()
			}
			if time.Since(importStart) > importTimeout {
				return fail(fmt.Errorf("image import not done within %s", importTimeout))
			}
			deadline = time.Now().Add(c.cfg.ReadyTimeout)
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("node not Ready within %s", c.cfg.ReadyTimeout))
		}
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// stop ends one process by its pid: SIGTERM, then SIGKILL after grace.
func (p *Proc) stop(grace time.Duration) {
	if done, _ := p.Exited(); done {
		return
	}
	_ = p.Cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
}

func readFile(path string) string {
	data, _ := os.ReadFile(path)
	return string(data)
}

func commandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd
}
