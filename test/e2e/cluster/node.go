package cluster

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// nodeBinaries are linked from the tools into each node's share, /e2e/bin.
var nodeBinaries = []string{"kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "crictl"}

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

// cniConfig is a node's pod network: a bridge with its own range. Traffic
// to the other nodes' pods is routed over the node network (node-init adds
// the routes); ipMasq makes what leaves the node come from its address, so
// the namespace, which routes nothing, can answer it.
func cniConfig(n Node) string {
	return `{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + n.PodCIDR + `"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`
}

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
# The node's disks are sparse overlays: disk-pressure eviction would only
# make tests flaky.
evictionHard: {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`

func kubeProxyConfig(n Node) string {
	return `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /e2e/etc/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: ` + ClusterCIDR + `
hostnameOverride: ` + n.Name + `
conntrack: {maxPerCore: 0}
`
}

// nodeInitScript is /e2e/node-init.sh, run by /sbin/e2e-init under tini on
// every boot of the node. It starts the daemons as units of the node's
// systemctl (nodeunits.go). Its disks: /dev/vda the root, /dev/vdb the images
// disk (containerd's root, the images already in it: BuildImagesDisk),
// /dev/vdc the data disk (the driver's state and pools), each checked by
// its label before it is mounted.
const nodeInitScript = `set -u
export PATH=/e2e/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
L=/e2e/logs
mkdir -p $L
exec >>$L/node-init.log 2>&1
say() { echo "node-init: $(cut -d' ' -f1 /proc/uptime)s $*"; echo "node-init: $*" >/dev/console; }
say "start (boot $(cat /proc/sys/kernel/random/boot_id))"
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,rw /
mount --make-rshared /
hostname @NAME@
mountdisk() { # device label mountpoint
	mkdir -p "$3"
	if [ "$(blkid -o value -s LABEL "$1")" != "$2" ]; then
		say "$1 is not the disk labelled $2"; return 1
	fi
	mount -t ext4 "$1" "$3" || say "cannot mount $1 on $3"
}
mountdisk /dev/vdb ` + ImagesDiskLabel + ` /var/lib/containerd
mountdisk /dev/vdc ` + DataDiskLabel + ` /var/lib/csi-dmthin
for m in virtio_net overlay bridge br_netfilter veth loop xfs dm_thin_pool nf_conntrack; do
	modprobe $m || say "modprobe $m failed"
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
ip link set lo up
ip link set eth0 up
ip addr add @IP@/24 dev eth0
ip route add default via ` + GatewayIP + `
@ROUTES@
echo "+cpuset +cpu +io +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control || say "cgroup controllers failed"
mkdir -p /etc/containerd /etc/cni/net.d /var/lib/kubelet /var/log/pods
cp /e2e/etc/containerd.toml /etc/containerd/config.toml
cp /e2e/etc/10-e2e.conflist /etc/cni/net.d/10-e2e.conflist
cp /e2e/etc/crictl.yaml /etc/crictl.yaml
for c in @COMMANDS@; do
	ln -sf /e2e/bin/$c /usr/local/bin/$c
done
# Every daemon is a unit of the node's systemctl (/e2e/bin/systemctl, a
# shim), the way the storage suite stops and starts kubelet too. The SSH
# server first: it lets a test look at a node whose containerd or kubelet
# did not come up.
systemctl start e2e-sshd || say "e2e-sshd did not start"
systemctl start containerd
i=0
until ctr version >/dev/null 2>&1; do
	i=$((i+1)); [ $i -gt 300 ] && { say "containerd did not start"; break; }
	sleep 0.2
done
say "containerd up, $(ctr -n k8s.io images list --quiet | wc -l) images"
systemctl start kubelet
systemctl start kube-proxy
say kubelet started
# The daemons are not children of this script (each has a session of its
# own) and tini, PID 1, reaps them; but this script must not end, or tini
# ends and the kernel panics.
exec sleep infinity
`

// nodeInitFor returns node n's init script: its name and address, and a route
// to each other node's pods.
func nodeInitFor(n Node, all []Node) string {
	var routes []string
	for _, o := range all {
		if o.Name != n.Name {
			routes = append(routes, "ip route add "+o.PodCIDR+" via "+o.IP)
		}
	}
	return strings.NewReplacer("@NAME@", n.Name, "@IP@", n.IP, "@ROUTES@", strings.Join(routes, "\n"),
		"@COMMANDS@", strings.Join(nodeCommands, " ")).Replace(nodeInitScript)
}

// writeNodeShare fills a node's 9p share: binaries, configuration, its
// certificates and the init script.
func (c *Cluster) writeNodeShare(n *NodeVM) error {
	for _, d := range []string{"bin", "etc/units", "pki", "logs"} {
		if err := os.MkdirAll(filepath.Join(n.share, d), 0o755); err != nil {
			return err
		}
	}
	link := func(src, dst string) error {
		_ = os.Remove(dst)
		return os.Link(src, dst)
	}
	for _, b := range nodeBinaries {
		if err := link(c.Bin(b), filepath.Join(n.share, "bin", b)); err != nil {
			return err
		}
	}
	if c.cfg.SSHD == "" {
		return fmt.Errorf("cluster: no SSH server for the nodes (Config.SSHD)")
	}
	if err := link(c.cfg.SSHD, filepath.Join(n.share, "bin", "e2e-sshd")); err != nil {
		return err
	}
	// Only what this node needs: the CA, its own kubelet certificates
	// under fixed names, kube-proxy's.
	for dst, src := range map[string]string{
		"ca.crt":              "ca.crt",
		"kubelet.crt":         "kubelet-" + n.Name + ".crt",
		"kubelet.key":         "kubelet-" + n.Name + ".key",
		"kubelet-serving.crt": "kubelet-serving-" + n.Name + ".crt",
		"kubelet-serving.key": "kubelet-serving-" + n.Name + ".key",
		"kube-proxy.crt":      "kube-proxy.crt",
		"kube-proxy.key":      "kube-proxy.key",
		"ssh-host.key":        sshHostKey,
		"ssh-authorized.pub":  sshAuthorizedKey,
	} {
		if err := link(c.pki.path(src), filepath.Join(n.share, "pki", dst)); err != nil {
			return err
		}
	}
	server := "https://" + GatewayIP + ":6443"
	files := map[string]string{
		"node-init.sh":              nodeInitFor(n.Node, c.nodeSpecs()),
		"etc/containerd.toml":       containerdConfig,
		"etc/10-e2e.conflist":       cniConfig(n.Node),
		"etc/kubelet.yaml":          kubeletConfig,
		"etc/kube-proxy.yaml":       kubeProxyConfig(n.Node),
		"etc/kubelet.kubeconfig":    kubeconfig(server, "/e2e/pki", "kubelet"),
		"etc/kube-proxy.kubeconfig": kubeconfig(server, "/e2e/pki", "kube-proxy"),
		"etc/crictl.yaml":           crictlConfig,
	}
	maps.Copy(files, unitFiles(n.Node))
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(n.share, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	for name, script := range nodeShims {
		path := filepath.Join(n.share, "bin", name)
		_ = os.Remove(path)
		if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
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
// no_timer_check: as in internal/vmtest's VMs, the boot's check of the
// timer interrupt counts ticks in a fixed number of CPU cycles and panics
// ("IO-APIC + timer doesn't work!") when a loaded host delivers too few.
const kernelCmdline = "console=ttyS0 panic=-1 loglevel=4 mitigations=off cryptomgr.notests no_timer_check"

// DataDiskLabel is the label of each node's data disk: the driver's state
// directory and, with the chart's default pool, the pool's loop file.
const DataDiskLabel = "e2e-data"

// dataDiskBytes is the data disk's apparent size (sparse): room for the
// chart's default 20Gi loop-file pool and the e2e values' second pool.
const dataDiskBytes = 40 << 30

// createDisks makes a node's disks for a first boot: overlays of the cached
// root and images disks, and an empty data disk, formatted here on the host
// (natively in a second, where the guest would take many).
func (c *Cluster) createDisks(ctx context.Context, n *NodeVM) error {
	for _, d := range []struct{ overlay, base string }{{n.rootDisk(), c.cfg.Image.Root}, {n.imagesDisk(), c.cfg.ImagesDisk}} {
		_ = os.Remove(d.overlay)
		if err := run(ctx, "", "qemu-img", "create", "-q", "-f", "qcow2", "-b", d.base, "-F", "raw", d.overlay); err != nil {
			return err
		}
	}
	_ = os.Remove(n.dataDisk())
	if err := os.WriteFile(n.dataDisk(), nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(n.dataDisk(), dataDiskBytes); err != nil {
		return err
	}
	return run(ctx, "", "mkfs.ext4", "-q", "-L", DataDiskLabel, "-E", "lazy_itable_init=1", n.dataDisk())
}

func (n *NodeVM) rootDisk() string   { return filepath.Join(n.dir, "root.qcow2") }
func (n *NodeVM) imagesDisk() string { return filepath.Join(n.dir, "images.qcow2") }
func (n *NodeVM) dataDisk() string   { return filepath.Join(n.dir, "data.img") }

// bootNode boots node n and waits for it to be Ready. fresh makes new disks
// (a first boot, or a retry of a failed one); otherwise the node boots on
// the disks it had, as a machine does after a power cut, and Ready must
// come from a new boot (another boot id than the node reported before).
// A boot that does not get there within ReadyTimeout, whose console shows
// a soft lockup, or whose qemu exits is stopped (qemu killed by its pid)
// and reported as an error, for the caller to retry.
//
// The disks: the root and images overlays are qcow2 with cache=writeback,
// so a guest flush reaches qcow2's own metadata too and a killed qemu
// leaves them as a power cut leaves a disk with a volatile write cache. The
// data disk is raw: every write qemu completed is in the file, whatever
// happens to qemu, so what the guest synced before a kill is there.
func (c *Cluster) bootNode(ctx context.Context, n *NodeVM, fresh bool) error {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return fmt.Errorf("cluster: qemu-system-x86_64 not found (package qemu-system-x86)")
	}
	n.mu.Lock()
	n.Boots++
	boot := n.Boots
	oldBootID := n.bootID
	n.mu.Unlock()
	if fresh {
		if err := c.createDisks(ctx, n); err != nil {
			return err
		}
		oldBootID = ""
	}
	// The guest's logs of an earlier boot move aside, so the ones shown on
	// failure belong to this boot.
	if boot > 1 {
		_ = os.Rename(filepath.Join(n.share, "logs"), filepath.Join(n.share, fmt.Sprintf("logs-boot%d", boot-1)))
		_ = os.MkdirAll(filepath.Join(n.share, "logs"), 0o755)
	}
	console := filepath.Join(c.LogDir, fmt.Sprintf("console-%s-boot%d.log", n.Name, boot))
	k := c.cfg.Image.Kernel
	start := time.Now()
	q, err := c.Procs.Start(fmt.Sprintf("qemu-%s-boot%d", n.Name, boot), "qemu-system-x86_64",
		"-machine", "pc", "-cpu", "max", "-m", itoa(c.cfg.NodeMemoryMiB), "-smp", itoa(c.cfg.NodeCPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:"+console,
		"-kernel", k.KernelImage(), "-initrd", c.cfg.Image.Initramfs,
		"-append", kernelCmdline,
		"-drive", "file="+n.rootDisk()+",if=virtio,format=qcow2,cache=writeback",
		"-drive", "file="+n.imagesDisk()+",if=virtio,format=qcow2,cache=writeback",
		"-drive", "file="+n.dataDisk()+",if=virtio,format=raw,cache=unsafe",
		"-netdev", "tap,id=n0,ifname="+n.Tap+",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac="+n.MAC,
		"-virtfs", "local,path="+n.share+",mount_tag=e2e,security_model=none,id=e2e",
	)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.qemu = q
	n.mu.Unlock()
	deadline := time.Now().Add(c.cfg.ReadyTimeout)
	fail := func(err error) error {
		q.stop(10 * time.Second)
		return err
	}
	for {
		if done, err := q.Exited(); done {
			return fail(fmt.Errorf("%s: qemu exited: %v (console: %s)", n.Name, err, tail(readFile(console), 5)))
		}
		if con := readFile(console); strings.Contains(con, "soft lockup") || strings.Contains(con, "rcu_sched self-detected stall") || strings.Contains(con, "rcu: INFO: rcu_preempt") {
			return fail(fmt.Errorf("%s: %w", n.Name, errSoftLockup))
		}
		if id, ok, _ := c.nodeReady(ctx, n.Name); ok && id != oldBootID {
			n.mu.Lock()
			n.bootID = id
			n.Ready = time.Since(start)
			n.mu.Unlock()
			return nil
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("%s: not Ready within %s", n.Name, c.cfg.ReadyTimeout))
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
