package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// How ThinPoolWriter spares the API server. A status is written only when
// it changed, and:
//
//   - a change of state (health, mode, the counts of volumes, snapshots
//     and templates, a kernel event, a growth, the copy endpoint) is
//     written at once;
//   - a change of use alone (bytes used, available) waits until
//     MinInterval has passed since the pool's last write;
//   - all of a node's writes share a token bucket (QPS, Burst).
//
// So an idle pool costs nothing, a busy one at most one write per
// MinInterval, and a cluster of N nodes with P pools each at most
// N*P/MinInterval writes a second however busy it is (with the defaults,
// 5,000 single-pool nodes: 83 a second at worst, none when idle), plus one
// per state change.
const (
	defaultThinPoolMinInterval = time.Minute
	defaultThinPoolQPS         = 1
	defaultThinPoolBurst       = 5
	// thinPoolRetick is how often pending (throttled or failed) writes are
	// retried.
	thinPoolRetick = time.Second
)

// ThinPoolWriterOptions configure a ThinPoolWriter.
type ThinPoolWriterOptions struct {
	Client dynamic.Interface
	// Core reads this node's Node, which owns its ThinPools (they go with
	// it); nil leaves them without an owner.
	Core                  kubernetes.Interface
	Driver, Node, Version string
	Pools                 map[string]UsageSource
	// Unconfigured are pools with records on the node that its pools file
	// no longer names: they are shown NotConfigured.
	Unconfigured []string
	// CopyEndpoint is where this node serves copies of its pools' blocks,
	// published in every pool's status; nil publishes none (and removes
	// one an earlier run published). SetCopyEndpoint changes it.
	CopyEndpoint *blockcopy.Endpoint
	MinInterval  time.Duration // default 1m
	QPS          float32       // default 1
	Burst        int           // default 5
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// ThinPoolWriter keeps the ThinPool objects of this node's pools current.
type ThinPoolWriter struct {
	o       ThinPoolWriterOptions
	limiter flowcontrol.RateLimiter
	wake    *waker

	mu     sync.Mutex
	events map[string]bool // pools woken by a kernel event since last looked at
	state  map[string]*poolWriteState
	owner  *metav1.OwnerReference
	copy   *CopyEndpoint // from o.CopyEndpoint, then SetCopyEndpoint
}

// poolWriteState is what the writer knows of one pool.
type poolWriteState struct {
	ensured  bool            // the object exists
	written  *ThinPoolStatus // the status last written; nil: none yet
	at       time.Time       // when
	seen     *thinpool.Usage // the usage last seen, for events and growth
	event    *PoolEvent
	growth   *PoolGrowth
	pending  bool // a write is due but was throttled or failed
	lastFail string
	// failures in a row, and when to try again after the last: a writer
	// that keeps failing (RBAC, the API server away) backs off to one try
	// every thinPoolMaxBackoff instead of one a second.
	failures int
	retryAt  time.Time
}

// thinPoolMaxBackoff bounds the wait between retries of a failing write.
const thinPoolMaxBackoff = 5 * time.Minute

// NewThinPoolWriter checks o.
func NewThinPoolWriter(o ThinPoolWriterOptions) (*ThinPoolWriter, error) {
	if o.Client == nil || o.Node == "" || o.Driver == "" {
		return nil, errors.New("thinpools: a client, a node and a driver name are required")
	}
	if o.MinInterval <= 0 {
		o.MinInterval = defaultThinPoolMinInterval
	}
	if o.QPS <= 0 {
		o.QPS = defaultThinPoolQPS
	}
	if o.Burst <= 0 {
		o.Burst = defaultThinPoolBurst
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	w := &ThinPoolWriter{o: o, limiter: flowcontrol.NewTokenBucketRateLimiter(o.QPS, o.Burst), wake: newWaker(),
		events: map[string]bool{}, state: map[string]*poolWriteState{}}
	w.copy = copyEndpoint(o.CopyEndpoint)
	for n := range o.Pools {
		w.state[n] = &poolWriteState{}
	}
	for _, n := range o.Unconfigured {
		if _, ok := w.state[n]; !ok {
			w.state[n] = &poolWriteState{}
		}
	}
	return w, nil
}

// Wake makes Run look at the pool now; kernelEvent says its kernel raised
// an event (recorded as the pool's last event). It never blocks.
func (w *ThinPoolWriter) Wake(pool string, kernelEvent bool) {
	if kernelEvent {
		w.mu.Lock()
		w.events[pool] = true
		w.mu.Unlock()
	}
	w.wake.wake(pool)
}

// SetCopyEndpoint publishes e (nil: none) in every pool's status, at once:
// a new address or certificate is a change of state. It never blocks.
func (w *ThinPoolWriter) SetCopyEndpoint(e *blockcopy.Endpoint) {
	w.mu.Lock()
	w.copy = copyEndpoint(e)
	w.mu.Unlock()
	for _, n := range w.names() {
		w.wake.wake(n)
	}
}

func copyEndpoint(e *blockcopy.Endpoint) *CopyEndpoint {
	if e == nil {
		return nil
	}
	return &CopyEndpoint{Address: e.Address, CertSHA256: e.CertSHA256}
}

// Run writes every pool's ThinPool, removes this node's ThinPools of pools
// it no longer has, and then keeps them current: every interval, at once
// for a pool Wake names, until ctx is done.
func (w *ThinPoolWriter) Run(ctx context.Context, interval time.Duration) {
	logger := klog.FromContext(ctx).WithValues("controller", "thinpools")
	ctx = klog.NewContext(ctx, logger)
	if interval <= 0 {
		interval = defaultCheckInterval
	}
	w.setOwner(ctx)
	if err := w.removeStale(ctx); err != nil {
		logger.Error(err, "Removing the ThinPools of pools gone from this node failed")
	}
	w.sync(ctx, w.names())
	poll := time.NewTicker(interval)
	defer poll.Stop()
	retry := time.NewTicker(thinPoolRetick)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-poll.C:
			w.sync(ctx, w.names())
		case <-w.wake.c:
			w.sync(ctx, w.wake.take())
		case <-retry.C:
			w.sync(ctx, w.pendingNames())
		}
	}
}

func (w *ThinPoolWriter) names() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]string, 0, len(w.state))
	for n := range w.state {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func (w *ThinPoolWriter) pendingNames() []string {
	now := w.o.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for n, s := range w.state {
		if s.pending && !now.Before(s.retryAt) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// setOwner makes this node's Node the owner of its ThinPools, so the
// garbage collector removes them with it.
func (w *ThinPoolWriter) setOwner(ctx context.Context) {
	if w.o.Core == nil {
		return
	}
	n, err := w.o.Core.CoreV1().Nodes().Get(ctx, w.o.Node, metav1.GetOptions{})
	if err != nil {
		klog.FromContext(ctx).Error(err, "Reading this node's Node failed; its ThinPools get no owner and outlive it")
		return
	}
	w.mu.Lock()
	w.owner = &metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}
	w.mu.Unlock()
}

// removeStale deletes this node's ThinPools whose pool is neither
// configured nor recorded any more.
func (w *ThinPoolWriter) removeStale(ctx context.Context) error {
	label := nodeLabelValue(w.o.Node)
	if label == "" {
		return nil // not listable by label; they stay
	}
	list, err := w.o.Client.Resource(ThinPoolGVR).List(ctx, metav1.ListOptions{LabelSelector: LabelThinPoolNode + "=" + label})
	if err != nil {
		return err
	}
	for _, item := range list.Items {
		pool, _, _ := unstructured.NestedString(item.Object, "spec", "pool")
		node, _, _ := unstructured.NestedString(item.Object, "spec", "nodeName")
		w.mu.Lock()
		_, ours := w.state[pool]
		w.mu.Unlock()
		if ours || node != w.o.Node {
			continue
		}
		err := w.o.Client.Resource(ThinPoolGVR).Delete(ctx, item.GetName(), metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: ptrTo(item.GetUID())}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return err
		}
		klog.FromContext(ctx).Info("Removed the ThinPool of a pool no longer on this node", "thinpool", item.GetName())
	}
	return nil
}

// sync looks at the named pools and writes the statuses that are due.
func (w *ThinPoolWriter) sync(ctx context.Context, names []string) {
	for _, n := range names {
		if ctx.Err() != nil {
			return
		}
		w.syncPool(ctx, n)
	}
}

func (w *ThinPoolWriter) syncPool(ctx context.Context, name string) {
	logger := klog.FromContext(ctx).WithValues("pool", name)
	now := w.o.Now()
	w.mu.Lock()
	st := w.state[name]
	if st == nil {
		w.mu.Unlock()
		return
	}
	kernelEvent := w.events[name]
	delete(w.events, name)
	copyEP := w.copy
	w.mu.Unlock()

	status := ThinPoolStatus{DriverVersion: w.o.Version, Copy: copyEP}
	src, configured := w.o.Pools[name]
	var u thinpool.Usage
	var uerr error
	if configured {
		u, uerr = src.Usage()
		fillStatus(&status, u, uerr)
		if uerr == nil {
			if kernelEvent {
				st.event = eventFrom(st.seen, u, now)
			}
			if g := growthFrom(st.seen, u, now); g != nil {
				st.growth = g
			}
			st.seen = &u
		}
	} else {
		status.Health = HealthNotConfigured
		status.Message = "the pool has records on this node but is not in its pools file: deletes of its volumes are refused until it is configured again"
	}
	status.LastEvent, status.LastGrowth = st.event, st.growth

	if !w.due(st, &status, now) {
		return
	}
	if !w.limiter.TryAccept() {
		st.pending = true
		return
	}
	status.UpdateTime = metav1.NewTime(now)
	if err := w.write(ctx, name, st, &status); err != nil {
		st.pending = true
		st.failures++
		backoff := min(thinPoolRetick<<min(st.failures-1, 16), thinPoolMaxBackoff)
		st.retryAt = now.Add(backoff)
		if msg := err.Error(); msg != st.lastFail {
			logger.Error(err, "Writing the pool's ThinPool status failed; will retry", "retryIn", backoff)
			st.lastFail = msg
		}
		return
	}
	st.pending, st.lastFail, st.failures, st.retryAt = false, "", 0, time.Time{}
	st.written, st.at = &status, now
}

// due tells whether status should be written now (see the top of the
// file).
func (w *ThinPoolWriter) due(st *poolWriteState, status *ThinPoolStatus, now time.Time) bool {
	prev := st.written
	switch {
	case prev == nil || stateChanged(prev, status):
		return true
	case useChanged(prev, status):
		return now.Sub(st.at) >= w.o.MinInterval
	}
	return false
}

// stateChanged: what is written at once.
func stateChanged(a, b *ThinPoolStatus) bool {
	return a.Health != b.Health || a.Message != b.Message || a.Mode != b.Mode ||
		a.Volumes != b.Volumes || a.Snapshots != b.Snapshots || a.Templates != b.Templates ||
		a.Data.Size.Cmp(b.Data.Size) != 0 || a.Metadata.Size.Cmp(b.Metadata.Size) != 0 ||
		a.OverprovisionLimit != b.OverprovisionLimit || a.DriverVersion != b.DriverVersion ||
		!sameEvent(a.LastEvent, b.LastEvent) || !sameGrowth(a.LastGrowth, b.LastGrowth) ||
		!sameCopy(a.Copy, b.Copy)
}

// useChanged: what waits for MinInterval.
func useChanged(a, b *ThinPoolStatus) bool {
	return a.Data.Used.Cmp(b.Data.Used) != 0 || a.Metadata.Used.Cmp(b.Metadata.Used) != 0 ||
		a.Provisioned.Cmp(b.Provisioned) != 0 || a.Available.Cmp(b.Available) != 0 || a.Overprovisioning != b.Overprovisioning
}

func sameEvent(a, b *PoolEvent) bool {
	return (a == nil) == (b == nil) && (a == nil || (a.Time.Equal(&b.Time) && a.Reason == b.Reason))
}

func sameCopy(a, b *CopyEndpoint) bool {
	return (a == nil) == (b == nil) && (a == nil || *a == *b)
}

func sameGrowth(a, b *PoolGrowth) bool {
	return (a == nil) == (b == nil) && (a == nil || a.Time.Equal(&b.Time))
}

// fillStatus turns a pool's usage into its status.
func fillStatus(s *ThinPoolStatus, u thinpool.Usage, err error) {
	q := func(b int64) resource.Quantity { return *resource.NewQuantity(b, resource.BinarySI) }
	pct := func(a, b int64) int32 {
		if b <= 0 {
			return 0
		}
		return int32(100 * a / b)
	}
	if err != nil {
		s.Health, s.Message = HealthUnreadable, err.Error()
		return
	}
	s.Mode = string(u.Mode)
	switch {
	case u.Failed:
		s.Health, s.Message, s.Mode = HealthFailed, "the pool has failed: its volumes can be neither read nor written; see the needs_check runbook", ""
	case u.NeedsCheck:
		s.Health, s.Message = HealthNeedsCheck, "the kernel flagged the metadata for thin_check; the pool is read-only"
	case u.Mode == thinpool.ModeReadOnly:
		s.Health, s.Message = HealthReadOnly, "the pool is read-only (out of metadata space, or a metadata error): no volume can be created, grown or deleted"
	case u.Mode == thinpool.ModeOutOfDataSpace:
		s.Health, s.Message = HealthOutOfDataSpace, "the pool is out of data space: writes to new blocks fail; grow it (csi-dmthin pool grow)"
	case u.Fenced != "":
		s.Health, s.Message = HealthFenced, "a step of a change failed; every change retries the recovery first: "+u.Fenced
	default:
		s.Health = HealthHealthy
	}
	s.Data = SpaceStatus{Size: q(u.DataBytes), Used: q(u.DataUsedBytes), UsedPercent: pct(u.DataUsedBytes, u.DataBytes)}
	s.Metadata = SpaceStatus{Size: q(u.MetadataBytes), Used: q(u.MetadataUsedBytes), UsedPercent: pct(u.MetadataUsedBytes, u.MetadataBytes)}
	s.Provisioned, s.Available = q(u.ProvisionedBytes), q(u.AvailableBytes)
	if u.DataBytes > 0 {
		s.Overprovisioning = strconv.FormatFloat(float64(u.ProvisionedBytes)/float64(u.DataBytes), 'f', 2, 64)
	}
	s.OverprovisionLimit = "none"
	if u.OverprovisionRatio >= 0 {
		s.OverprovisionLimit = strconv.FormatFloat(u.OverprovisionRatio, 'f', 2, 64)
	}
	s.Volumes, s.Snapshots, s.Templates = int32(u.Volumes), int32(u.Snapshots), int32(u.Templates)
}

// eventFrom says what a kernel event meant, from the usage before and
// after it.
func eventFrom(prev *thinpool.Usage, u thinpool.Usage, now time.Time) *PoolEvent {
	e := &PoolEvent{Time: metav1.NewTime(now)}
	switch {
	case prev != nil && prev.Mode != u.Mode:
		e.Reason, e.Message = "ModeChanged", fmt.Sprintf("mode %s -> %s", prev.Mode, u.Mode)
	case u.Failed:
		e.Reason, e.Message = "Failed", "the pool failed"
	case prev != nil && u.DataBytes > prev.DataBytes:
		e.Reason, e.Message = "Grown", fmt.Sprintf("data %s -> %s", sizeString(prev.DataBytes), sizeString(u.DataBytes))
	default:
		e.Reason = "LowWater"
		e.Message = fmt.Sprintf("free data or metadata fell under its mark: data %d%% used, metadata %d%% used",
			percentOf(u.DataUsedBytes, u.DataBytes), percentOf(u.MetadataUsedBytes, u.MetadataBytes))
	}
	return e
}

// growthFrom is the growth between two looks at a pool; nil for none.
func growthFrom(prev *thinpool.Usage, u thinpool.Usage, now time.Time) *PoolGrowth {
	if prev == nil || prev.Failed || u.Failed || (u.DataBytes <= prev.DataBytes && u.MetadataBytes <= prev.MetadataBytes) {
		return nil
	}
	q := func(b int64) resource.Quantity { return *resource.NewQuantity(b, resource.BinarySI) }
	return &PoolGrowth{Time: metav1.NewTime(now), DataFrom: q(prev.DataBytes), DataTo: q(u.DataBytes), MetadataFrom: q(prev.MetadataBytes), MetadataTo: q(u.MetadataBytes)}
}

func percentOf(a, b int64) int64 {
	if b <= 0 {
		return 0
	}
	return 100 * a / b
}

// write makes the object if needed and patches its status.
func (w *ThinPoolWriter) write(ctx context.Context, pool string, st *poolWriteState, status *ThinPoolStatus) error {
	if !st.ensured {
		if err := w.ensure(ctx, pool); err != nil {
			return err
		}
		st.ensured = true
	}
	patch, err := statusPatch(status)
	if err != nil {
		return err
	}
	name := ThinPoolName(w.o.Node, pool)
	_, err = w.o.Client.Resource(ThinPoolGVR).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: Component}, "status")
	if apierrors.IsNotFound(err) {
		// Deleted under us (or the CRD reinstalled): make it again.
		st.ensured = false
		if err := w.ensure(ctx, pool); err != nil {
			return err
		}
		st.ensured = true
		_, err = w.o.Client.Resource(ThinPoolGVR).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: Component}, "status")
	}
	return err
}

// statusPatch is the merge patch that sets status. A merge patch keeps
// what it does not name, so a copy endpoint no longer served is removed
// by name (null): left in place, it would send other nodes to an address
// nothing serves, or to another pod that now has its IP.
func statusPatch(status *ThinPoolStatus) ([]byte, error) {
	b, err := json.Marshal(status)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	if status.Copy == nil {
		m["copy"] = nil
	}
	return json.Marshal(map[string]any{"status": m})
}

// ensure creates the pool's ThinPool unless it exists.
func (w *ThinPoolWriter) ensure(ctx context.Context, pool string) error {
	tp := &ThinPool{
		TypeMeta:   metav1.TypeMeta{APIVersion: ThinPoolGroup + "/" + ThinPoolVersion, Kind: ThinPoolKind},
		ObjectMeta: metav1.ObjectMeta{Name: ThinPoolName(w.o.Node, pool), Labels: map[string]string{LabelThinPoolPool: pool}},
		Spec:       ThinPoolSpec{NodeName: w.o.Node, Pool: pool, Driver: w.o.Driver},
	}
	if v := nodeLabelValue(w.o.Node); v != "" {
		tp.Labels[LabelThinPoolNode] = v
	}
	w.mu.Lock()
	if w.owner != nil {
		tp.OwnerReferences = []metav1.OwnerReference{*w.owner}
	}
	w.mu.Unlock()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
	if err != nil {
		return err
	}
	delete(m, "status")
	_, err = w.o.Client.Resource(ThinPoolGVR).Create(ctx, &unstructured.Unstructured{Object: m}, metav1.CreateOptions{FieldManager: Component})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("create ThinPool %s: %w", tp.Name, err)
	}
	return nil
}

func ptrTo[T any](v T) *T { return &v }
