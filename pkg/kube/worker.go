package kube

import (
	"context"
	"fmt"
	"sync"
	"time"

	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// worker is the loop both controllers share: wait for the informers, then
// take keys off a rate-limited queue and sync each, retrying with backoff
// when sync fails or asks to, until ctx is done.
type worker struct {
	name   string // the controller's name, for logs
	what   string // the key's kind, for logs ("pvc", "content")
	queue  workqueue.TypedRateLimitingInterface[string]
	synced []cache.InformerSynced
	sync   func(ctx context.Context, key string) (retry bool, err error)
}

// run runs n workers until ctx is done; started is called, with the
// controller's logger, once the caches have synced.
func (w *worker) run(ctx context.Context, n int, started func(klog.Logger)) error {
	defer utilruntime.HandleCrash()
	logger := klog.FromContext(ctx).WithValues("controller", w.name)
	ctx = klog.NewContext(ctx, logger)
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	if !cache.WaitForCacheSync(ctx.Done(), w.synced...) {
		return fmt.Errorf("%s: caches did not sync: %w", w.name, ctx.Err())
	}
	started(logger)
	var wg sync.WaitGroup
	for range max(n, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wait.UntilWithContext(ctx, func(ctx context.Context) {
				for w.next(ctx) {
				}
			}, time.Second)
		}()
	}
	wg.Wait()
	return nil
}

func (w *worker) next(ctx context.Context) bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	retry, err := w.sync(ctx, key)
	switch {
	case err != nil:
		klog.FromContext(ctx).Error(err, "Sync failed; will retry", w.what, key)
		w.queue.AddRateLimited(key)
	case retry:
		w.queue.AddRateLimited(key)
	default:
		w.queue.Forget(key)
	}
	return true
}

// newQueue is a controller's work queue: rl paces retries, by default
// exponentially from 1s to 5m.
func newQueue(name string, rl workqueue.TypedRateLimiter[string]) workqueue.TypedRateLimitingInterface[string] {
	if rl == nil {
		rl = workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, 5*time.Minute)
	}
	return workqueue.NewTypedRateLimitingQueueWithConfig(rl, workqueue.TypedRateLimitingQueueConfig[string]{Name: name})
}
