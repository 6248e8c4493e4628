package thinpool

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Growth and events on a pool, the same scenarios on the fake kernel (on
// the host) and the real one (in the VM).

func TestGrowFake(t *testing.T) { runGrowScenarios(t, newFakeEnv) }

// fillPool writes whole blocks of vol from off until a write fails (the
// pool is out of data space) and returns the offset of the failed write
// and its error.
func fillPool(t *testing.T, e env, p *Pool, vol string, off, end int64) (int64, error) {
	t.Helper()
	chunk := pattern(7, 64<<10)
	for ; off < end; off += int64(len(chunk)) {
		if err := e.write(t, p, vol, off, chunk); err != nil {
			return off, err
		}
	}
	t.Fatalf("wrote %d bytes of %s without filling the pool", end, vol)
	return 0, nil
}

func runGrowScenarios(t *testing.T, newEnv func(t *testing.T) env) {
	// A pool that ran out of data space while a volume was open is grown,
	// data and metadata at once; the volume's device stays the same and
	// open, the write that failed succeeds, nothing written is lost.
	t.Run("GrowFullPoolOnline", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "growfull", 8<<20)
		cfg.MetadataFileBytes = 4 << 20
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		if _, err := p.CreateVolume(ctx, "v", 64<<20); err != nil {
			t.Fatal(err)
		}
		keep := pattern(3, 64<<10)
		if err := e.write(t, p, "v", 0, keep); err != nil {
			t.Fatal(err)
		}
		release := e.hold(t, p, "v") // mounted
		defer release()
		before, err := e.kernel().InfoByName(p.volDMName("v"))
		if err != nil {
			t.Fatal(err)
		}
		failedAt, werr := fillPool(t, e, p, "v", 64<<10, 64<<20)
		if !errors.Is(werr, unix.ENOSPC) && !errors.Is(werr, unix.EIO) {
			t.Fatalf("write to a full pool: %v", werr)
		}
		if u, _ := p.Usage(); u.Mode != ModeOutOfDataSpace || u.AvailableBytes != 0 {
			t.Fatalf("a full pool: %+v", u)
		}
		start := time.Now()
		g, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: 24 << 20, MetadataFileBytes: 8 << 20})
		grown := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if g.DataBytesBefore != 8<<20 || g.DataBytes != 24<<20 || g.MetadataBytesBefore != 4<<20 || g.MetadataBytes != 8<<20 || !g.Grew() {
			t.Fatalf("growth %+v", g)
		}
		if g.Usage.Mode != ModeReadWrite || g.Usage.AvailableBytes <= 0 || g.Usage.MetadataBytes != 8<<20 {
			t.Fatalf("usage after growing: %+v", g.Usage)
		}
		if err := e.write(t, p, "v", failedAt, pattern(9, 64<<10)); err != nil {
			t.Fatalf("the write that failed, again after growing: %v", err)
		}
		t.Logf("pool grow took %v; the write that had failed succeeded %v after the grow started", grown, time.Since(start))
		after, err := e.kernel().InfoByName(p.volDMName("v"))
		if err != nil || after.Dev != before.Dev || after.OpenCount < 1 || after.Suspended {
			t.Fatalf("the volume's device changed while it was open: before %+v, after %+v, %v", before, after, err)
		}
		if got := e.read(t, p, "v", 0, len(keep)); !bytes.Equal(got, keep) {
			t.Fatal("data written before the pool filled is damaged")
		}
		if _, err := p.CreateVolume(ctx, "more", 1<<20); err != nil {
			t.Fatalf("a new volume after growing: %v", err)
		}
		// Growing again to what it has changes nothing.
		g2, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: 16 << 20})
		if err != nil || g2.Grew() || g2.DataBytes != 24<<20 {
			t.Fatalf("a second grow: %+v, %v", g2, err)
		}
		// The records say the new sizes, and a reopen (a driver restart)
		// keeps them.
		release()
		p.Close()
		p = openPool(t, e, cfg)
		if u, err := p.Usage(); err != nil || u.DataBytes != 24<<20 || u.MetadataBytes != 8<<20 || p.rec.DataBytes != 24<<20 {
			t.Fatalf("after a reopen: %+v, %v (records %d)", u, err, p.rec.DataBytes)
		}
		checkInvariants(t, e, p)
	})

	// A loop-file pool whose files were extended while the driver was
	// away (or whose pools file now says larger sizes) grows with a zero
	// request: the table is reloaded although it was kept over a restart.
	t.Run("GrowOntoLargerFiles", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "growfiles", 16<<20)
		p := openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		p.Close()
		for path, size := range map[string]int64{cfg.DataFile: 40 << 20, cfg.MetadataFile: 20 << 20} {
			if err := os.Truncate(path, size); err != nil {
				t.Fatal(err)
			}
		}
		p = openPool(t, e, cfg)
		if u, _ := p.Usage(); u.DataBytes != 16<<20 {
			t.Fatalf("the kept table was not kept: %+v", u)
		}
		g, err := p.GrowPool(ctx, GrowRequest{})
		if err != nil || g.DataBytes != 40<<20 || g.MetadataBytes != 20<<20 {
			t.Fatalf("grow onto the larger files: %+v, %v", g, err)
		}
		// The configured sizes extend the files themselves; a metadata
		// file sized automatically follows the data.
		cfg.DataFileBytes, cfg.MetadataFileBytes = 64<<20, 0
		p.Close()
		p = openPool(t, e, cfg)
		if req := p.ConfiguredGrowth(); req.DataFileBytes != 64<<20 || req.MetadataFileBytes != 0 {
			t.Fatalf("configured growth %+v", req)
		}
		g, err = p.GrowPool(ctx, p.ConfiguredGrowth())
		if err != nil || g.DataBytes != 64<<20 || g.MetadataBytes != 20<<20 {
			t.Fatalf("grow to the configured size: %+v, %v", g, err)
		}
		if g, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: 32 << 30}); err != nil || g.DataBytes != 32<<30 || g.MetadataBytes != MetadataBytesFor(32<<30, 128) {
			t.Fatalf("a metadata file sized automatically did not follow the data file: %+v, %v", g, err)
		}
		checkInvariants(t, e, p)
	})

	t.Run("GrowRefused", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "growbad", 16<<20)
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		if _, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: -1}); !errors.Is(err, ErrInvalid) {
			t.Errorf("a negative size: %v", err)
		}
		if _, err := (&Pool{cfg: Config{Name: "dev", DataDevice: "/dev/x"}}).GrowPool(ctx, GrowRequest{DataFileBytes: 1 << 30}); !errors.Is(err, ErrInvalid) {
			t.Errorf("a file size for a pool on devices: %v", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := p.GrowPool(cctx, GrowRequest{DataFileBytes: 32 << 20}); !errors.Is(err, context.Canceled) {
			t.Errorf("a cancelled grow: %v", err)
		}
		if u, _ := p.Usage(); u.DataBytes != 16<<20 {
			t.Errorf("a refused grow grew the pool: %+v", u)
		}
	})

	// Offline takes the pool's devices away for thin_check, refusing while
	// a volume is open; the next Open brings back what was active.
	t.Run("OfflineAndBack", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "offline", 32<<20)
		p := openPool(t, e, cfg)
		if _, err := p.CreateVolume(ctx, "v", 8<<20); err != nil {
			t.Fatal(err)
		}
		data := pattern(8, 64<<10)
		if err := e.write(t, p, "v", 0, data); err != nil {
			t.Fatal(err)
		}
		if _, err := p.CreateVolume(ctx, "idle", 8<<20); err != nil {
			t.Fatal(err)
		}
		release := e.hold(t, p, "v")
		if err := p.Offline(ctx); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), p.volDMName("v")) {
			t.Fatalf("offline with an open volume: %v", err)
		}
		if _, err := p.Usage(); err != nil {
			t.Fatalf("a refused offline closed the pool: %v", err)
		}
		release()
		if err := p.Offline(ctx); err != nil {
			t.Fatal(err)
		}
		list, err := e.kernel().List()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range list {
			if strings.HasPrefix(d.UUID, p.uuidPrefix()) {
				t.Errorf("dm device %s left after offline", d.Name)
			}
		}
		if _, err := p.Usage(); !errors.Is(err, ErrClosed) {
			t.Errorf("usage of an offline pool: %v", err)
		}
		if _, err := p.CreateVolume(ctx, "late", 1<<20); !errors.Is(err, ErrClosed) {
			t.Errorf("a change to an offline pool: %v", err)
		}
		if err := p.Offline(ctx); !errors.Is(err, ErrClosed) {
			t.Errorf("a second offline: %v", err)
		}
		p = openPool(t, e, cfg)
		defer teardown(t, e, p)
		if _, err := p.DevicePath("v"); err != nil {
			t.Errorf("the active volume did not come back: %v", err)
		}
		if _, err := p.DevicePath("idle"); err == nil {
			t.Error("an inactive volume was activated")
		}
		if got := e.read(t, p, "v", 0, len(data)); !bytes.Equal(got, data) {
			t.Error("data lost over offline and back")
		}
		checkInvariants(t, e, p)
	})

	// The kernel's low-water event wakes WaitEvent at once.
	t.Run("LowWaterEvent", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "lowwater", 16<<20) // 256 blocks
		cfg.LowWaterPercent = 50
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		if _, err := p.CreateVolume(ctx, "v", 16<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Activate(ctx, "v"); err != nil {
			t.Fatal(err)
		}
		n, err := p.EventNumber()
		if err != nil {
			t.Fatal(err)
		}
		// Nothing happens: the wait honours its context.
		short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		if _, err := p.WaitEvent(short, n); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("an idle wait: %v", err)
		}
		cancel()
		var (
			mu      sync.Mutex
			crossed time.Time // when the write that crossed the mark returned
		)
		woke := make(chan time.Time, 1)
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		defer wcancel()
		go func() {
			if _, err := p.WaitEvent(wctx, n); err != nil {
				t.Error(err)
			}
			woke <- time.Now()
		}()
		chunk := pattern(5, 64<<10)
		var at time.Time
	writes:
		for off := int64(0); off < 16<<20; off += int64(len(chunk)) {
			if err := e.write(t, p, "v", off, chunk); err != nil {
				t.Fatal(err)
			}
			u, err := p.Usage()
			if err != nil {
				t.Fatal(err)
			}
			if u.DataBytes-u.DataUsedBytes <= u.DataBytes/2 && crossed.IsZero() {
				mu.Lock()
				crossed = time.Now()
				mu.Unlock()
			}
			select {
			case at = <-woke:
				break writes
			default:
			}
		}
		if at.IsZero() {
			select {
			case at = <-woke:
			case <-time.After(10 * time.Second):
				t.Fatal("no event after the pool passed its low water mark")
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if crossed.IsZero() {
			t.Fatal("the wait returned before the pool passed its low water mark")
		}
		// The event is raised inside the write that crosses the mark, so
		// the wait may wake before that write returns.
		lag := max(at.Sub(crossed), 0)
		t.Logf("low-water event seen %v after the write that crossed the mark returned", lag)
		if lag > time.Second {
			t.Errorf("the event took %v to wake the waiter", lag)
		}
		if _, err := p.WaitEvent(ctx, 0); err != nil {
			t.Errorf("a wait for an event already past: %v", err)
		}
	})
}
