package csi

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// Formatted templates make a new filesystem volume ready to mount without
// running mkfs. Each pool keeps, per filesystem type and size, a sealed
// template device holding a freshly made, never mounted filesystem; a new
// volume of that type and size is a thin snapshot of it (a few milliseconds,
// no data copied), and NodeStageVolume finds a filesystem already there. It
// gives that filesystem its own UUID before the first mount (FS.Format).
//
// The first volume of a size is made empty and formatted at stage as
// before; once the pool has admitted it (CreateVolume succeeded), the
// template's build starts in the background, so the volumes after it are
// fast. A size no volume was admitted for never gets a template: a refused
// CreateVolume of a petabyte must not leave a petabyte filesystem's
// metadata behind, nor push out a template in use. Templates are not
// volumes: ListVolumes does not show them, and only the blocks mkfs wrote
// use the pool, once for all clones (pkg/thinpool decides how they count
// against its limits).
//
// A template is pinned from the lookup that finds it until the Clone of
// it is done, and while it is being built; eviction passes over pinned
// ones, so a template is never deleted from under a Clone.

// DefaultTemplates is how many templates a pool keeps; the least recently
// used one goes to make room for a new size.
const DefaultTemplates = 8

// templatePrefix starts every template's device name. deviceName hashes a
// CSI name that starts with it, so no volume can take a template's name.
const templatePrefix = "t_"

// templateVersion changes whenever the mkfs arguments do, so that volumes
// are never cloned from a template made the old way.
const templateVersion = 1

// buildTimeout bounds one template build (mkfs of a large device included).
const buildTimeout = 10 * time.Minute

func templateName(fsType string, sizeBytes int64) string {
	return fmt.Sprintf("%s%s_%d_v%d", templatePrefix, fsType, sizeBytes, templateVersion)
}

func isTemplateName(name string) bool { return strings.HasPrefix(name, templatePrefix) }

// templates builds and tracks the pools' templates.
type templates struct {
	max int // per pool; 0 turns templates off
	fs  FS

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// All by "<pool>/<name>".
	mu       sync.Mutex
	building map[string]bool
	used     map[string]time.Time // last lookup that found it
	pins     map[string]int       // lookups whose Clone is not done yet
	evicting map[string]bool      // being deleted: no new pins
	// serial, by pool name: one build at a time per pool, so that the
	// room each makes is counted with the others' templates sealed.
	serial map[string]*sync.Mutex
}

func newTemplates(max int, fs FS) *templates {
	ctx, cancel := context.WithCancel(context.Background())
	return &templates{
		max: max, fs: fs, ctx: ctx, cancel: cancel,
		building: map[string]bool{}, used: map[string]time.Time{}, pins: map[string]int{}, evicting: map[string]bool{},
		serial: map[string]*sync.Mutex{},
	}
}

// stop cancels the builds in progress and waits for them; a cancelled
// build leaves an unsealed template that the pool deletes when it opens.
func (t *templates) stop() {
	t.cancel()
	t.wg.Wait()
}

// lookup returns the sealed template for fsType and sizeBytes in pool, ""
// when there is none, and a release func to call once the Clone of it is
// done (always non-nil): until then the template is pinned, and no
// eviction deletes it.
func (t *templates) lookup(pool Pool, fsType string, sizeBytes int64) (string, func()) {
	if t.max <= 0 || !supportedFS[fsType] {
		return "", func() {}
	}
	name := templateName(fsType, sizeBytes)
	key := pool.Name() + "/" + name
	t.mu.Lock()
	if t.evicting[key] {
		t.mu.Unlock()
		return "", func() {}
	}
	t.pins[key]++
	t.mu.Unlock()
	var once sync.Once
	release := func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			if t.pins[key]--; t.pins[key] <= 0 {
				delete(t.pins, key)
			}
		})
	}
	if v, err := pool.Get(name); err != nil || v.Kind != thinpool.KindTemplate || !v.Sealed {
		release()
		return "", func() {}
	}
	t.mu.Lock()
	t.used[key] = time.Now()
	t.mu.Unlock()
	return name, release
}

// build makes the template for fsType and sizeBytes in the background,
// unless it is being made already. The caller has just had a volume of
// that size admitted by the pool.
func (t *templates) build(pool Pool, fsType string, sizeBytes int64) {
	if t.max <= 0 || !supportedFS[fsType] {
		return
	}
	name := templateName(fsType, sizeBytes)
	key := pool.Name() + "/" + name
	t.mu.Lock()
	if t.building[key] || t.ctx.Err() != nil {
		t.mu.Unlock()
		return
	}
	t.building[key] = true
	serial := t.serial[pool.Name()]
	if serial == nil {
		serial = &sync.Mutex{}
		t.serial[pool.Name()] = serial
	}
	t.wg.Add(1)
	t.mu.Unlock()
	go func() {
		defer t.wg.Done()
		defer func() {
			t.mu.Lock()
			delete(t.building, key)
			t.mu.Unlock()
		}()
		serial.Lock()
		defer serial.Unlock()
		ctx, cancel := context.WithTimeout(t.ctx, buildTimeout)
		defer cancel()
		log := klog.Background().WithValues("pool", pool.Name(), "template", name)
		start := time.Now()
		if err := t.make(ctx, pool, name, fsType, sizeBytes); err != nil {
			log.Error(err, "Building a formatted template failed; volumes of this size are formatted at stage")
			// Whatever is left is unsealed, never cloned, and deleted here
			// or when the pool next opens.
			if _, gerr := pool.Get(name); gerr == nil {
				if derr := pool.Delete(context.Background(), name); derr != nil {
					log.Error(derr, "Deleting the failed template failed")
				}
			}
			return
		}
		log.V(2).Info("Built formatted template", "duration", time.Since(start))
	}()
}

func (t *templates) make(ctx context.Context, pool Pool, name, fsType string, sizeBytes int64) error {
	if v, err := pool.Get(name); err == nil {
		if v.Sealed {
			return nil // made meanwhile
		}
		// Left by a build that failed half way: start again.
		if err := pool.Delete(ctx, name); err != nil {
			return err
		}
	}
	// Made before making room: a template the pool refuses costs no
	// other template its place.
	if _, err := pool.CreateTemplate(ctx, name, sizeBytes); err != nil {
		return err
	}
	if err := t.evict(ctx, pool); err != nil {
		return err
	}
	device, err := pool.Activate(ctx, name)
	if err != nil {
		return err
	}
	// A new thin device reads zeros everywhere; in a pool that zeroes new
	// blocks it also does inside blocks mkfs writes only in part, so mkfs
	// may skip zeroing the inode tables (which each clone's first mount
	// would otherwise do, block by block, in its own copy).
	if _, err := t.fs.Format(ctx, device, fsType, FormatOptions{Fresh: true, Zeroed: pool.ZeroesNewBlocks()}); err != nil {
		return err
	}
	// Deactivating flushes everything mkfs wrote to the pool before the
	// template is sealed and cloned.
	if err := pool.Deactivate(ctx, name); err != nil {
		return err
	}
	return pool.SealTemplate(ctx, name)
}

// evict deletes the least recently used sealed templates of pool until
// there is room for one more, passing over pinned ones; when the pinned
// ones alone fill the pool's share, there is no room (an error).
func (t *templates) evict(ctx context.Context, pool Pool) error {
	var have []thinpool.Volume
	for _, v := range pool.List() {
		if v.Kind == thinpool.KindTemplate && v.Sealed {
			have = append(have, v)
		}
	}
	excess := len(have) - t.max + 1
	if excess <= 0 {
		return nil
	}
	key := func(v thinpool.Volume) string { return pool.Name() + "/" + v.Name }
	t.mu.Lock()
	last := func(v thinpool.Volume) time.Time {
		if at, ok := t.used[key(v)]; ok {
			return at
		}
		return v.CreatedAt
	}
	sort.Slice(have, func(i, j int) bool { return last(have[i]).Before(last(have[j])) })
	var victims []thinpool.Volume
	for _, v := range have {
		if len(victims) == excess {
			break
		}
		if t.pins[key(v)] > 0 || t.building[key(v)] || t.evicting[key(v)] {
			continue
		}
		t.evicting[key(v)] = true
		victims = append(victims, v)
	}
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		for _, v := range victims {
			delete(t.evicting, key(v))
		}
		t.mu.Unlock()
	}()
	if len(victims) < excess {
		return fmt.Errorf("no room for another template: %d of the %d are in use", len(have)-len(victims), len(have))
	}
	for _, v := range victims {
		if err := pool.Delete(ctx, v.Name); err != nil {
			return fmt.Errorf("make room: delete template %s: %w", v.Name, err)
		}
		t.mu.Lock()
		delete(t.used, key(v))
		t.mu.Unlock()
	}
	return nil
}

// templateFS returns the filesystem type a new volume will be staged with,
// "" when it may be used as a raw block device (no template then).
func templateFS(caps []*csipb.VolumeCapability, paramFS string) string {
	fsType := ""
	for _, c := range caps {
		if c.GetMount() == nil {
			return ""
		}
		if f := c.GetMount().GetFsType(); f != "" {
			if fsType != "" && f != fsType {
				return ""
			}
			fsType = f
		}
	}
	if fsType == "" {
		fsType = paramFS
	}
	if fsType == "" {
		fsType = defaultFS
	}
	return fsType
}
