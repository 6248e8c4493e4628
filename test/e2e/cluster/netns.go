package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// netnsEnv names the environment variable that tells a re-executed process
// which namespace file it was started in.
const netnsEnv = "CSI_DMTHIN_E2E_NETNS"

// InIsolatedNetns reports whether this process was started by RunInNetns.
func InIsolatedNetns() bool { return os.Getenv(netnsEnv) != "" }

// RunInNetns runs this same program again (os.Args, same environment) in a
// new network namespace that holds only loopback, and returns its exit
// status. The namespace is held by a bind-mounted file under runDir and
// removed when the child exits. Needs root, unshare and nsenter (util-linux).
//
// Why a re-exec: a Go process cannot move all its threads into another
// network namespace, and everything the tests start (etcd, the apiserver,
// kubectl, qemu) must run in one from the start.
func RunInNetns(ctx context.Context, runDir string) (int, error) {
	if os.Geteuid() != 0 {
		return 0, errors.New("cluster: the e2e cluster needs root (network namespace, qemu, debootstrap)")
	}
	for _, tool := range []string{"unshare", "nsenter", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			return 0, fmt.Errorf("cluster: %s not found (util-linux, iproute2)", tool)
		}
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return 0, err
	}
	nsFile := filepath.Join(runDir, "netns")
	if err := os.WriteFile(nsFile, nil, 0o644); err != nil {
		return 0, err
	}
	defer func() {
		_ = syscall.Unmount(nsFile, syscall.MNT_DETACH)
		_ = os.Remove(nsFile)
	}()
	if err := run(ctx, "", "unshare", "--net="+nsFile, "true"); err != nil {
		return 0, fmt.Errorf("cluster: create network namespace: %w", err)
	}
	args := append([]string{"--net=" + nsFile, "--"}, os.Args...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"="+nsFile)
	// Let the child stop its processes itself when interrupted.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 2 * time.Minute
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), nil
	}
	if err != nil {
		return 0, err
	}
	return 0, nil
}

// PrepareIsolatedNetns verifies that the current network namespace has no
// interface but lo and no route out, proves it by failing to reach an
// outside address, and only then sets lo up. It refuses (returns an error)
// on any sign of a way out. The links to the nodes come after it, from
// SetupNodeLinks.
func PrepareIsolatedNetns(ctx context.Context) error {
	if !InIsolatedNetns() {
		return errors.New("cluster: not in the harness's network namespace")
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, i := range ifs {
		if i.Name != "lo" {
			return fmt.Errorf("cluster: network namespace has interface %q besides lo: refusing to start", i.Name)
		}
	}
	if err := run(ctx, "", "ip", "link", "set", "lo", "up"); err != nil {
		return err
	}
	if err := checkNoRoutes(); err != nil {
		return err
	}
	return checkOutsideUnreachable(ctx)
}

// checkOutsideUnreachable dials an address outside (TEST-NET-1, RFC 5737):
// it must be unreachable, not merely slow.
func checkOutsideUnreachable(ctx context.Context) error {
	d := net.Dialer{Timeout: 2 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", "192.0.2.1:443")
	if err == nil {
		_ = conn.Close()
		return errors.New("cluster: an outside address is reachable from the namespace: refusing to start")
	}
	if !errors.Is(err, syscall.ENETUNREACH) {
		return fmt.Errorf("cluster: dialing an outside address failed with %v, want 'network is unreachable': refusing to start", err)
	}
	return nil
}

// BridgeName is the namespace's bridge that every node's tap joins.
const BridgeName = "e2e-br0"

// SetupNodeLinks makes the nodes' network inside the namespace, after
// PrepareIsolatedNetns: a bridge holding GatewayIP on NodeSubnet and one tap
// per node on it, which that node's qemu opens. Nothing routes anywhere
// else: forwarding is off, IPv6 stays off on the new links, and the checks
// run again afterwards, now allowing exactly these links and the one
// subnet route they bring, and still requiring that an outside address is
// unreachable.
func SetupNodeLinks(ctx context.Context, nodes []Node) error {
	if !InIsolatedNetns() {
		return errors.New("cluster: not in the harness's network namespace")
	}
	for _, f := range []struct{ path, value string }{
		{"/proc/sys/net/ipv4/ip_forward", "0"},
		{"/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"},
	} {
		if err := os.WriteFile(f.path, []byte(f.value), 0o644); err != nil {
			return fmt.Errorf("cluster: %s: %w", f.path, err)
		}
	}
	cmds := [][]string{
		{"link", "add", BridgeName, "type", "bridge"},
		{"addr", "add", GatewayIP + "/24", "dev", BridgeName},
	}
	for _, n := range nodes {
		cmds = append(cmds,
			[]string{"tuntap", "add", "dev", n.Tap, "mode", "tap"},
			[]string{"link", "set", n.Tap, "master", BridgeName},
			[]string{"link", "set", n.Tap, "up"},
		)
	}
	cmds = append(cmds, []string{"link", "set", BridgeName, "up"})
	for _, args := range cmds {
		if err := run(ctx, "", "ip", args...); err != nil {
			return err
		}
	}
	return checkOnlyNodeLinks(ctx, nodes)
}

// checkOnlyNodeLinks is the isolation check once the node links exist:
// interfaces lo, the bridge and the nodes' taps only; IPv4 routes only the
// node subnet on the bridge, without a gateway; no IPv6 route off lo; an
// outside address unreachable.
func checkOnlyNodeLinks(ctx context.Context, nodes []Node) error {
	allowed := map[string]bool{"lo": true, BridgeName: true}
	for _, n := range nodes {
		allowed[n.Tap] = true
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, i := range ifs {
		if !allowed[i.Name] {
			return fmt.Errorf("cluster: network namespace has interface %q besides lo and the node links: refusing to start", i.Name)
		}
	}
	data, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return err
	}
	// Iface Destination Gateway Flags ... Mask, addresses in host byte
	// order as hex: 10.0.2.0/24 reads 0002000A / 00FFFFFF.
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 8 || f[0] != BridgeName || f[1] != "0002000A" || f[2] != "00000000" || f[7] != "00FFFFFF" {
			return fmt.Errorf("cluster: network namespace has an IPv4 route other than %s on %s (%s): refusing to start", NodeSubnet, BridgeName, line)
		}
	}
	if err := checkNoIPv6Routes(); err != nil {
		return err
	}
	return checkOutsideUnreachable(ctx)
}

// checkNoRoutes reads the main IPv4 and all IPv6 routes and fails on any
// route through an interface other than lo.
func checkNoRoutes() error {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 0 {
			return fmt.Errorf("cluster: network namespace has an IPv4 route (%s): refusing to start", sc.Text())
		}
	}
	return checkNoIPv6Routes()
}

// checkNoIPv6Routes fails on any IPv6 route through an interface but lo.
func checkNoIPv6Routes() error {
	if data, err := os.ReadFile("/proc/net/ipv6_route"); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			fields := strings.Fields(line)
			if len(fields) == 10 && fields[9] != "lo" {
				return fmt.Errorf("cluster: network namespace has an IPv6 route via %s: refusing to start", fields[9])
			}
		}
	}
	return nil
}

// itoa is strconv.Itoa, shorter at call sites that build argument lists.
func itoa(n int) string { return strconv.Itoa(n) }
