package kube

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// Errors of CopyPeers.Endpoint, besides the API server's own and
// thinpool.ErrPoolUnhealthy.
var (
	// ErrNoThinPool: the source node has no ThinPool for the pool (no such
	// node or pool, or its driver has not written it yet).
	ErrNoThinPool = errors.New("no ThinPool")
	// ErrNoCopyEndpoint: the ThinPool publishes no copy endpoint (the
	// source node's driver predates copies or has them disabled).
	ErrNoCopyEndpoint = errors.New("no copy endpoint published")
)

// CopyPeers finds where another node serves copies of a pool's blocks: in
// that pool's ThinPool, which the node's driver keeps (ThinPoolWriter). It
// needs `get` on thinpools.
type CopyPeers struct {
	Client dynamic.Interface
}

// Endpoint returns the copy endpoint the ThinPool of pool on node
// publishes. It reads the object at every call (no cache: a copy is rare,
// and a pod restarted since the last look has a new address). It refuses
// a pool whose blocks cannot be read (copyReadable) with an error wrapping
// thinpool.ErrPoolUnhealthy; the source node stays the authority and may
// still refuse the copy.
func (p *CopyPeers) Endpoint(ctx context.Context, node, pool string) (blockcopy.Endpoint, error) {
	name := ThinPoolName(node, pool)
	u, err := p.Client.Resource(ThinPoolGVR).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return blockcopy.Endpoint{}, fmt.Errorf("pool %s of node %s: %w %s (no such node or pool, or its driver has not published it)", pool, node, ErrNoThinPool, name)
	}
	if err != nil {
		return blockcopy.Endpoint{}, fmt.Errorf("pool %s of node %s: reading ThinPool %s: %w", pool, node, name, err)
	}
	var tp ThinPool
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &tp); err != nil {
		return blockcopy.Endpoint{}, fmt.Errorf("pool %s of node %s: ThinPool %s: %w", pool, node, name, err)
	}
	st := tp.Status
	if !copyReadable(st.Health) {
		msg := ""
		if st.Message != "" {
			msg = ": " + st.Message
		}
		return blockcopy.Endpoint{}, fmt.Errorf("pool %s of node %s is %s%s: %w", pool, node, st.Health, msg, thinpool.ErrPoolUnhealthy)
	}
	if st.Copy == nil || st.Copy.Address == "" || st.Copy.CertSHA256 == "" {
		return blockcopy.Endpoint{}, fmt.Errorf("pool %s of node %s: ThinPool %s: %w (the node's driver is older than copies, or has them disabled)", pool, node, name, ErrNoCopyEndpoint)
	}
	return blockcopy.Endpoint{Address: st.Copy.Address, CertSHA256: st.Copy.CertSHA256}, nil
}

// copyReadable tells whether a pool in this health can be copied from: its
// blocks can be read. A full pool (OutOfDataSpace) or one that takes no
// metadata change (ReadOnly, NeedsCheck, Fenced) still reads, and moving a
// volume off a full node is one reason to copy; a Failed pool does no I/O,
// an Unreadable one is in a state its own driver cannot tell, and a
// NotConfigured one is not open. No health yet (a ThinPool just made) is
// left to the source node to judge.
func copyReadable(health string) bool {
	switch health {
	case HealthFailed, HealthUnreadable, HealthNotConfigured:
		return false
	}
	return true
}
