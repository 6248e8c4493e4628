package cluster

import (
	"strings"
	"testing"
)

// Each node's identity is its own, and its init script routes to the other
// nodes' pods, never to its own range.
func TestNodeSpecsAndInit(t *testing.T) {
	nodes := NodeSpecs(3)
	seen := map[string]string{}
	for _, n := range nodes {
		for _, v := range []string{n.Name, n.IP, n.PodCIDR, n.MAC, n.Tap} {
			if other, dup := seen[v]; dup {
				t.Errorf("%s shares %q with %s", n.Name, v, other)
			}
			seen[v] = n.Name
		}
		if !strings.HasPrefix(n.IP, "10.0.2.") || n.IP == GatewayIP {
			t.Errorf("%s: address %s is not a node address on %s", n.Name, n.IP, NodeSubnet)
		}
	}
	script := nodeInitFor(nodes[1], nodes)
	for _, want := range []string{
		"hostname " + nodes[1].Name,
		"ip addr add " + nodes[1].IP + "/24 dev eth0",
		"ip route add " + nodes[0].PodCIDR + " via " + nodes[0].IP,
		"ip route add " + nodes[2].PodCIDR + " via " + nodes[2].IP,
	} {
		if !strings.Contains(script, want) {
			t.Errorf("node-init of %s lacks %q", nodes[1].Name, want)
		}
	}
	if kubelet := nodeUnits(nodes[1])["kubelet"]; !strings.Contains(kubelet, "--node-ip="+nodes[1].IP+" --hostname-override="+nodes[1].Name) {
		t.Errorf("the kubelet unit of %s does not name its address and name:\n%s", nodes[1].Name, kubelet)
	}
	if strings.Contains(script, nodes[1].PodCIDR+" via") {
		t.Errorf("node-init of %s routes its own pod range away", nodes[1].Name)
	}
	if strings.Contains(script, "@") {
		t.Errorf("node-init has an unreplaced placeholder:\n%s", script)
	}
}
