package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// poolBench measures pkg/thinpool: every figure includes its crash-safe
// bookkeeping (intent, two pool messages, the transaction-id commit and the
// bbolt fsyncs).
func poolBench(n int, openSizes []int) error {
	ctx := context.Background()
	k, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "poolbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// Snapshot cost against the data in the origin: a pool with 1 MiB
	// blocks and zeroing off, so that mapping every block of a 100 GiB
	// volume takes one 4 KiB write per block (about 400 MiB of the guest's
	// memory) instead of 100 GiB of writes.
	cfg := thinpool.Config{
		Name: "snapbench", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "snap.data"), MetadataFile: filepath.Join(dir, "snap.meta"),
		DataFileBytes: 110 << 30, MetadataFileBytes: 256 << 20, BlockSectors: 2048,
		SkipBlockZeroing: true, OverprovisionRatio: -1, MinFreeDataPercent: 1, MinFreeMetadataPercent: 1,
	}
	p, err := thinpool.Open(ctx, cfg, k)
	if err != nil {
		return err
	}
	snaps := map[string]sample{}
	for _, gib := range []int64{1, 100} {
		name := fmt.Sprintf("filled-%dg", gib)
		if _, err := p.CreateVolume(ctx, name, gib<<30); err != nil {
			return err
		}
		node, err := p.Activate(ctx, name)
		if err != nil {
			return err
		}
		if err := touchEveryBlock(node, gib<<30, 1<<20); err != nil {
			return err
		}
		var s sample
		for i := 0; i <= n; i++ {
			t0 := time.Now()
			if _, err := p.Snapshot(ctx, fmt.Sprintf("%s-s%d", name, i), name); err != nil {
				return err
			}
			if i > 0 {
				s = append(s, time.Since(t0))
			}
		}
		snaps[name] = s
	}
	u, _ := p.Usage()
	p.Close()

	// Create, activate, deactivate, delete on a pool of 64 KiB blocks.
	cfg2 := thinpool.Config{
		Name: "opbench", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "op.data"), MetadataFile: filepath.Join(dir, "op.meta"),
		DataFileBytes: 64 << 30, OverprovisionRatio: -1,
	}
	q, err := thinpool.Open(ctx, cfg2, k)
	if err != nil {
		return err
	}
	var create, activate, deactivate, del sample
	for i := 0; i <= n; i++ {
		name := fmt.Sprintf("v%d", i)
		t0 := time.Now()
		if _, err := q.CreateVolume(ctx, name, 1<<30); err != nil {
			return err
		}
		t1 := time.Now()
		if _, err := q.Activate(ctx, name); err != nil {
			return err
		}
		t2 := time.Now()
		if err := q.Deactivate(ctx, name); err != nil {
			return err
		}
		t3 := time.Now()
		if err := q.Delete(ctx, name); err != nil {
			return err
		}
		t4 := time.Now()
		if i > 0 {
			create, activate = append(create, t1.Sub(t0)), append(activate, t2.Sub(t1))
			deactivate, del = append(deactivate, t3.Sub(t2)), append(del, t4.Sub(t3))
		}
	}

	// Open with many devices (records, none active: the common restart).
	opens := map[int]time.Duration{}
	made := 0
	for _, size := range openSizes {
		for ; made < size; made++ {
			if _, err := q.CreateVolume(ctx, fmt.Sprintf("many-%05d", made), 1<<30); err != nil {
				return err
			}
		}
		q.Close()
		t0 := time.Now()
		if q, err = thinpool.Open(ctx, cfg2, k); err != nil {
			return err
		}
		opens[size] = time.Since(t0)
	}
	q.Close()

	fmt.Printf("\n## pkg/thinpool operations (crash-safe bookkeeping included)\n\n")
	fmt.Println("| operation | median (p90), ms |")
	fmt.Println("|---|---:|")
	fmt.Printf("| create a 1 GiB volume | %s |\n", cell(create))
	fmt.Printf("| activate it | %s |\n", cell(activate))
	fmt.Printf("| deactivate it | %s |\n", cell(deactivate))
	fmt.Printf("| delete it | %s |\n", cell(del))
	s1, s100 := snaps["filled-1g"], snaps["filled-100g"]
	fmt.Printf("| snapshot a 1 GiB volume, every block mapped | %s |\n", cell(s1))
	fmt.Printf("| snapshot a 100 GiB volume, every block mapped | %s |\n", cell(s100))
	for _, size := range openSizes {
		fmt.Printf("| open a pool with %d volumes | %.0f |\n", size, float64(opens[size].Microseconds())/1000)
	}
	fmt.Printf("\nSnapshot of 100 GiB ÷ snapshot of 1 GiB: %s (1.0x is O(1)). The filled pool had %d of %d data blocks mapped (1 MiB blocks).\n",
		ratio(s100, s1), u.DataUsedBytes>>20, u.DataBytes>>20)
	return nil
}

// touchEveryBlock writes 4 KiB at the start of every block of the device,
// which maps every block.
func touchEveryBlock(node string, size, block int64) error {
	f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, free, err := directBuffer(4096)
	if err != nil {
		return err
	}
	defer free()
	for i := range buf {
		buf[i] = byte(i) | 1
	}
	for off := int64(0); off < size; off += block {
		if _, err := f.WriteAt(buf, off); err != nil {
			return fmt.Errorf("fill at %d: %w", off, err)
		}
	}
	return f.Sync()
}

// directBuffer is a page-aligned buffer of size bytes for O_DIRECT I/O,
// and the function that frees it.
func directBuffer(size int) ([]byte, func(), error) {
	buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, err
	}
	return buf, func() { _ = unix.Munmap(buf) }, nil
}
