//go:build vmtest

package thinpool

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestGrowKernel(t *testing.T) {
	runGrowScenarios(t, newKernelEnv)

	// With queue_if_no_space a write to a full pool waits in the kernel
	// (the fake kernel fails it at once instead): growing the pool lets
	// the waiting write finish, successfully, on the device it was issued
	// to, which stayed open all along.
	t.Run("QueuedWriteFinishesAfterGrow", func(t *testing.T) {
		e := newKernelEnv(t).(*kernelEnv)
		cfg := testConfig(t, "growqueue", 8<<20)
		cfg.QueueIfNoSpace = true
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		if _, err := p.CreateVolume(ctx, "v", 64<<20); err != nil {
			t.Fatal(err)
		}
		node, err := p.Activate(ctx, "v")
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf, free, err := alignedBuf(64 << 10)
		if err != nil {
			t.Fatal(err)
		}
		defer free()
		copy(buf, pattern(4, len(buf)))
		// Write block by block until a write waits (the pool is full);
		// the writer stops after that write returns.
		done := make(chan error, 1)
		go func() {
			for off := int64(0); off < 64<<20; off += int64(len(buf)) {
				start := time.Now()
				if _, err := f.WriteAt(buf, off); err != nil {
					done <- err
					return
				}
				if time.Since(start) > 500*time.Millisecond {
					done <- nil // the write that waited
					return
				}
			}
			done <- nil
		}()
		// Wait for the pool to be out of space with a write pending.
		deadline := time.Now().Add(30 * time.Second)
		for {
			u, err := p.Usage()
			if err != nil {
				t.Fatal(err)
			}
			if u.Mode == ModeOutOfDataSpace {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the pool did not fill: %+v", u)
			}
			select {
			case err := <-done:
				t.Fatalf("the writer stopped before the pool filled: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
		}
		select {
		case err := <-done:
			t.Fatalf("a write to a full queue_if_no_space pool returned (%v); it should wait", err)
		case <-time.After(time.Second):
		}
		start := time.Now()
		g, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: 32 << 20})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("the queued write failed after the grow: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the queued write did not finish after the pool grew")
		}
		t.Logf("queued write finished %v after pool grow started (the grow itself: %+v)", time.Since(start), g.Usage.Mode)
		if u, _ := p.Usage(); u.Mode != ModeReadWrite {
			t.Fatalf("after the grow: %+v", u)
		}
		f.Close()
	})
}
