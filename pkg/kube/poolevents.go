package kube

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// UsageSource is what the pool watcher reads (*thinpool.Pool is one).
type UsageSource interface {
	Usage() (thinpool.Usage, error)
}

var _ UsageSource = (*thinpool.Pool)(nil)

// Reasons of the Events on the Node.
const (
	ReasonPoolNearlyFull = "PoolNearlyFull"     // Warning
	ReasonPoolSpaceOK    = "PoolSpaceRecovered" // Normal
	ReasonPoolFailed     = "PoolFailed"         // Warning
	ReasonPoolNeedsCheck = "PoolNeedsCheck"     // Warning
	ReasonPoolReadOnly   = "PoolReadOnly"       // Warning
	ReasonPoolOutOfSpace = "PoolOutOfDataSpace" // Warning
	ReasonPoolUnreadable = "PoolStatusUnreadable"
	ReasonPoolFenced     = "PoolFenced"  // Warning
	ReasonPoolHealthy    = "PoolHealthy" // Normal
	ReasonPoolGrown      = "PoolGrown"   // Normal
)

const (
	// fullHysteresisPercent: a full pool is said to have recovered only
	// this far under the threshold.
	fullHysteresisPercent = 2.0
	defaultFullPercent    = 90.0
	defaultCheckInterval  = 30 * time.Second
)

// PoolWatcher puts Events on this node's Node object when a pool's use of
// data or metadata passes a threshold, and when a pool fails, turns
// read-only or needs a check; and a Normal Event when it recovers. It says
// each thing once, on the transition, not at every check.
type PoolWatcher struct {
	node        string
	pools       map[string]UsageSource
	fullPercent float64
	recorder    record.EventRecorder
	state       map[string]poolState
	wake        *waker
}

type poolState struct {
	full   bool
	health string // "" when healthy, else the Warning's reason
	// dataBytes and metadataBytes are the sizes last seen, so that a
	// pool that grew is told once (0: not seen yet).
	dataBytes, metadataBytes int64
}

// NewPoolWatcher watches pools (by name) of node. fullPercent <= 0 means
// 90.
func NewPoolWatcher(node string, pools map[string]UsageSource, fullPercent float64, recorder record.EventRecorder) *PoolWatcher {
	if fullPercent <= 0 {
		fullPercent = defaultFullPercent
	}
	return &PoolWatcher{node: node, pools: pools, fullPercent: fullPercent, recorder: recorder, state: map[string]poolState{}, wake: newWaker()}
}

// Wake makes Run check the pool now: its kernel raised an event, or it
// grew. It never blocks.
func (w *PoolWatcher) Wake(pool string) { w.wake.wake(pool) }

// Run checks every pool every interval (30s when <= 0), and a pool at
// once when Wake names it, until ctx is done.
func (w *PoolWatcher) Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = defaultCheckInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	w.Check(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.Check(ctx)
		case <-w.wake.c:
			for _, n := range w.wake.take() {
				if _, ok := w.pools[n]; ok {
					w.checkPool(ctx, n)
				}
			}
		}
	}
}

// nodeRef names the Node the way the kubelet's own Events do (UID = name),
// which is what `kubectl describe node` looks for; no read of the Node is
// needed.
func (w *PoolWatcher) nodeRef() *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: w.node, UID: types.UID(w.node)}
}

// Check reads each pool once and emits what changed. Not safe for
// concurrent use: Run calls it from one goroutine.
func (w *PoolWatcher) Check(ctx context.Context) {
	names := make([]string, 0, len(w.pools))
	for n := range w.pools {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		w.checkPool(ctx, n)
	}
}

func (w *PoolWatcher) checkPool(ctx context.Context, name string) {
	logger := klog.FromContext(ctx).WithValues("pool", name, "node", w.node)
	prev := w.state[name] // zero: healthy, not full; so a bad start is said
	cur := prev
	u, err := w.pools[name].Usage()
	health, why := "", ""
	switch {
	case err != nil:
		health, why = ReasonPoolUnreadable, fmt.Sprintf("the pool's status cannot be read: %v", err)
	case u.Failed:
		health, why = ReasonPoolFailed, "the thin pool has failed; its volumes cannot be read or written (repair with thin_check/thin_repair)"
	case u.NeedsCheck:
		health, why = ReasonPoolNeedsCheck, "the thin pool's metadata needs a check (thin_check); the pool is read-only"
	case u.Mode == thinpool.ModeReadOnly:
		health, why = ReasonPoolReadOnly, "the thin pool is read-only; no volume can be created or grown"
	case u.Mode == thinpool.ModeOutOfDataSpace:
		health, why = ReasonPoolOutOfSpace, "the thin pool is out of data space: writes to unallocated blocks fail"
	case u.Fenced != "":
		health, why = ReasonPoolFenced, "a step of a change failed and the pool refuses changes until it has recovered (each later call retries the recovery): "+u.Fenced
	}
	cur.health = health
	if health != prev.health {
		if health != "" {
			logger.Error(nil, "Pool unhealthy", "reason", health)
			w.recorder.Eventf(w.nodeRef(), corev1.EventTypeWarning, health, "pool %s: %s", name, why)
		} else {
			logger.Info("Pool healthy again", "was", prev.health)
			w.recorder.Eventf(w.nodeRef(), corev1.EventTypeNormal, ReasonPoolHealthy, "pool %s is healthy again (was %s)", name, prev.health)
		}
	}
	// Space is judged only from a readable, unfailed status (a failed pool
	// reports no sizes). Above the threshold is full; it is full until use
	// drops a little under it, so a pool hovering at the line does not
	// repeat itself at every check.
	if err == nil && !u.Failed && u.DataBytes > 0 && u.MetadataBytes > 0 {
		if prev.dataBytes > 0 && (u.DataBytes > prev.dataBytes || u.MetadataBytes > prev.metadataBytes) {
			logger.Info("Pool grew", "dataBytes", u.DataBytes, "metadataBytes", u.MetadataBytes)
			w.recorder.Eventf(w.nodeRef(), corev1.EventTypeNormal, ReasonPoolGrown,
				"pool %s grew: data %s -> %s, metadata %s -> %s", name, sizeString(prev.dataBytes), sizeString(u.DataBytes), sizeString(prev.metadataBytes), sizeString(u.MetadataBytes))
		}
		cur.dataBytes, cur.metadataBytes = u.DataBytes, u.MetadataBytes
		data := 100 * float64(u.DataUsedBytes) / float64(u.DataBytes)
		meta := 100 * float64(u.MetadataUsedBytes) / float64(u.MetadataBytes)
		use := max(data, meta)
		switch {
		case !prev.full && use >= w.fullPercent:
			cur.full = true
			logger.Info("Pool nearly full", "dataPercent", data, "metadataPercent", meta)
			w.recorder.Eventf(w.nodeRef(), corev1.EventTypeWarning, ReasonPoolNearlyFull,
				"pool %s is %.1f%% full in data and %.1f%% in metadata, over the %.0f%% threshold; new volumes will soon be refused and thin volumes may stop taking writes", name, data, meta, w.fullPercent)
		case prev.full && use < w.fullPercent-fullHysteresisPercent:
			cur.full = false
			logger.Info("Pool space recovered", "dataPercent", data, "metadataPercent", meta)
			w.recorder.Eventf(w.nodeRef(), corev1.EventTypeNormal, ReasonPoolSpaceOK,
				"pool %s is back to %.1f%% data and %.1f%% metadata use, under the %.0f%% threshold", name, data, meta, w.fullPercent)
		}
	}
	w.state[name] = cur
}

// sizeString prints bytes as a binary quantity (20Gi, 1536Mi).
func sizeString(b int64) string { return resource.NewQuantity(b, resource.BinarySI).String() }

// waker collects the names of pools to look at now, and signals c once
// for any number of them; wake never blocks.
type waker struct {
	mu    sync.Mutex
	names map[string]bool
	c     chan struct{}
}

func newWaker() *waker { return &waker{names: map[string]bool{}, c: make(chan struct{}, 1)} }

func (w *waker) wake(name string) {
	w.mu.Lock()
	w.names[name] = true
	w.mu.Unlock()
	select {
	case w.c <- struct{}{}:
	default:
	}
}

// take returns the names woken since the last take, sorted.
func (w *waker) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]string, 0, len(w.names))
	for n := range w.names {
		out = append(out, n)
	}
	clear(w.names)
	sort.Strings(out)
	return out
}
