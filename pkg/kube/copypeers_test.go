package kube

import (
	"context"
	"errors"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// copyPool is the ThinPool of pool on node with health and, unless
// address is empty, a copy endpoint.
func copyPool(t *testing.T, node, pool, health, address, cert string) *unstructured.Unstructured {
	t.Helper()
	u := thinPoolObject(node, pool)
	status := map[string]any{}
	if health != "" {
		status["health"] = health
		status["message"] = "why " + health
	}
	if address != "" || cert != "" {
		status["copy"] = map[string]any{"address": address, "certSHA256": cert}
	}
	if err := unstructured.SetNestedMap(u.Object, status, "status"); err != nil {
		t.Fatal(err)
	}
	return u
}

func TestCopyPeersEndpoint(t *testing.T) {
	const addr, cert = "10.0.0.2:9811", "0123abcd"
	cl := newThinPoolCluster(t,
		copyPool(t, nodeB, "fast", HealthHealthy, addr, cert),
		copyPool(t, nodeB, "full", HealthOutOfDataSpace, addr, cert),
		copyPool(t, nodeB, "ro", HealthReadOnly, addr, cert),
		copyPool(t, nodeB, "new", "", addr, cert),
		copyPool(t, nodeB, "failed", HealthFailed, addr, cert),
		copyPool(t, nodeB, "unreadable", HealthUnreadable, addr, cert),
		copyPool(t, nodeB, "unconfigured", HealthNotConfigured, addr, cert),
		copyPool(t, nodeB, "old", HealthHealthy, "", ""),
		copyPool(t, nodeB, "halfpublished", HealthHealthy, addr, ""),
	)
	peers := &CopyPeers{Client: cl.dyn}
	for _, tc := range []struct {
		node, pool string
		wantErr    error
		wantInErr  []string
	}{
		{node: nodeB, pool: "fast"},
		// Full or read-only pools still read: copying off them is allowed.
		{node: nodeB, pool: "full"},
		{node: nodeB, pool: "ro"},
		{node: nodeB, pool: "new"},
		{node: nodeB, pool: "failed", wantErr: thinpool.ErrPoolUnhealthy, wantInErr: []string{"node-b", "failed", "is Failed: why Failed"}},
		{node: nodeB, pool: "unreadable", wantErr: thinpool.ErrPoolUnhealthy, wantInErr: []string{"Unreadable"}},
		{node: nodeB, pool: "unconfigured", wantErr: thinpool.ErrPoolUnhealthy, wantInErr: []string{"NotConfigured"}},
		{node: nodeB, pool: "old", wantErr: ErrNoCopyEndpoint, wantInErr: []string{"node-b.old", "older than copies"}},
		{node: nodeB, pool: "halfpublished", wantErr: ErrNoCopyEndpoint},
		{node: nodeA, pool: "fast", wantErr: ErrNoThinPool, wantInErr: []string{"pool fast of node node-a", "node-a.fast"}},
		{node: nodeB, pool: "none", wantErr: ErrNoThinPool, wantInErr: []string{"pool none of node node-b"}},
	} {
		t.Run(tc.node+"/"+tc.pool, func(t *testing.T) {
			ep, err := peers.Endpoint(context.Background(), tc.node, tc.pool)
			if tc.wantErr == nil {
				if err != nil || ep != (blockcopy.Endpoint{Address: addr, CertSHA256: cert}) {
					t.Fatalf("%+v, %v; want the published endpoint", ep, err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("%+v, %v; want %v", ep, err, tc.wantErr)
			}
			if ep != (blockcopy.Endpoint{}) {
				t.Errorf("endpoint %+v with an error", ep)
			}
			for _, s := range tc.wantInErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

// An API failure is returned as such: not taken for a missing ThinPool.
func TestCopyPeersAPIError(t *testing.T) {
	cl := newThinPoolCluster(t, copyPool(t, nodeB, "fast", HealthHealthy, "10.0.0.2:9811", "ab"))
	cl.dyn.PrependReactor("get", "thinpools", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(ThinPoolGVR.GroupResource(), ThinPoolName(nodeB, "fast"), errors.New("no get"))
	})
	_, err := (&CopyPeers{Client: cl.dyn}).Endpoint(context.Background(), nodeB, "fast")
	if !apierrors.IsForbidden(err) || errors.Is(err, ErrNoThinPool) || !strings.Contains(err.Error(), "node-b.fast") {
		t.Errorf("error %v, want the API server's Forbidden naming the ThinPool", err)
	}
}
