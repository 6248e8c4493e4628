package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The I/O part (issue 14, "I/O cost"): what a thin volume costs a
// workload against a plain linear device over a loop device of the same
// kind of file. Every device is 1 GiB; each workload touches one region of
// it only, so that what the guest's RAM-backed /tmp has to hold stays
// bounded (first-write regions are discarded between passes and after
// their run, which punches the holes back into the files).
const (
	ioDevBytes      = 1 << 30
	ioPoolDataBytes = 2 << 30 // room for freed blocks not yet reusable
	ioPoolMetaBytes = 64 << 20
	ioBlockBytes    = blockSectors * devmapper.SectorSize // the pool's block, 64 KiB
	ioSmall         = 4 << 10
	ioLarge         = 1 << 20
	ioRun           = 3 * time.Second // of I/O per row and device
	ioSlices        = 6               // taken in this many turns
	ioMaxSamples    = 1000            // raw latencies kept per row and device (every kth)

	// Regions, by offset into every device.
	ioFirstSmallOff, ioFirstSmallLen = 0, 64 << 20
	ioFirstLargeOff, ioFirstLargeLen = 64 << 20, 256 << 20
	ioOverOff, ioOverLen             = 512 << 20, 128 << 20
)

// ioLoad is one row: a workload on one region.
type ioLoad struct {
	op     string
	write  bool
	size   int
	random bool
	// first: every I/O lands where nothing was written since the last
	// discard (thin: an unprovisioned block; linear: a hole in the file).
	// A random first write takes one 4 KiB slot, chosen at random, in
	// each 64 KiB block of the region, the blocks in random order.
	first    bool
	off, len int64
	seed     uint64 // the same offsets for every device
}

var ioLoads = []ioLoad{
	{op: "random 4 KiB write, first write", write: true, size: ioSmall, random: true, first: true, off: ioFirstSmallOff, len: ioFirstSmallLen, seed: 1},
	{op: "random 4 KiB write, overwrite", write: true, size: ioSmall, random: true, off: ioOverOff, len: ioOverLen, seed: 2},
	{op: "random 4 KiB read, written data", size: ioSmall, random: true, off: ioOverOff, len: ioOverLen, seed: 3},
	{op: "sequential 1 MiB write, first write", write: true, size: ioLarge, first: true, off: ioFirstLargeOff, len: ioFirstLargeLen},
	{op: "sequential 1 MiB write, overwrite", write: true, size: ioLarge, off: ioOverOff, len: ioOverLen},
}

// ioDev is one side of the comparison: a dm device and what it stands on.
type ioDev struct {
	column string
	dev    devmapper.Dev // the device the workloads run on
	pool   devmapper.Dev // its pool (thin only)
	data   string        // the backing file the workloads' data lands in
	files  []string
	f      *os.File // O_DIRECT, read-write
}

func (d *ioDev) node() string { return "/dev/dm-" + strconv.Itoa(int(d.dev.Minor())) }

// ioResult is one workload on one device.
type ioResult struct {
	lat    sample
	ios    int
	active time.Duration // I/O time, the untimed discards left out
	// grownPerIO is how much the backing file's allocation grew per I/O in
	// the first pass of a first-write run (0 elsewhere).
	grownPerIO float64
}

func (r ioResult) perSecond() float64 { return float64(r.ios) / r.active.Seconds() }

// ioBench prints the I/O table for backing files on /tmp and, with a
// virtual disk, again on it.
func ioBench(a partArgs) error {
	c, err := devmapper.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	locs := []location{{what: "sparse files on the guest's tmpfs (/tmp)", dir: "/tmp"}}
	if a.diskDir != "" {
		locs = append(locs, location{what: "sparse files on ext4 on the virtio disk (" + a.diskDir + "; qemu cache=unsafe)", dir: a.diskDir, tag: "-disk"})
	}
	for _, l := range locs {
		if err := ioTable(c, l); err != nil {
			return fmt.Errorf("files on %s: %w", l.dir, err)
		}
	}
	return nil
}

func ioTable(c *devmapper.Client, l location) (err error) {
	start := time.Now()
	dir, err := os.MkdirTemp(l.dir, "iobench-")
	if err != nil {
		return err
	}
	var devs []*ioDev
	defer func() {
		// Newest first: the thin devices before their pools.
		for i := len(devs) - 1; i >= 0; i-- {
			err = errors.Join(err, devs[i].close(c))
		}
		err = errors.Join(err, os.RemoveAll(dir))
	}()
	lin, err := ioLinear(c, "bench-io-linear"+l.tag, dir)
	if lin != nil {
		devs = append(devs, lin)
	}
	if err != nil {
		return fmt.Errorf("linear: %w", err)
	}
	for _, skip := range []bool{false, true} {
		name, column := "bench-io-zero"+l.tag, "thin, zeroing on"
		if skip {
			name, column = "bench-io-nozero"+l.tag, "thin, zeroing off"
		}
		d, err := ioThin(c, name, dir, skip)
		if d != nil {
			d.column = column
			devs = append(devs, d)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", column, err)
		}
	}
	buf, free, err := directBuffer(ioLarge)
	if err != nil {
		return err
	}
	defer free()
	for i := range buf {
		buf[i] = byte(i%251) + 1
	}
	// The overwrite region, written once (untimed): every block mapped.
	for _, d := range devs {
		for off := int64(ioOverOff); off < ioOverOff+ioOverLen; off += ioLarge {
			if _, err := d.f.WriteAt(buf, off); err != nil {
				return fmt.Errorf("%s: fill: %w", d.column, err)
			}
		}
		if err := d.f.Sync(); err != nil {
			return err
		}
	}
	// Each row runs in slices, on every device in turn and the turn's
	// first device rotating, so that a change in the host's load (other
	// VMs share its two cores) falls on all columns of a row alike.
	res := make([][]ioResult, len(ioLoads))
	for i, w := range ioLoads {
		runners := make([]*ioRunner, len(devs))
		for j, d := range devs {
			runners[j] = w.runner(d, buf)
		}
		for k := range ioSlices {
			for j := range devs {
				x := runners[(j+k)%len(devs)]
				if err := x.step(ioRun / ioSlices); err != nil {
					return fmt.Errorf("%s, %s: %w", w.op, x.d.column, err)
				}
			}
		}
		by := map[string]sample{}
		for _, x := range runners {
			r, err := x.finish()
			if err != nil {
				return fmt.Errorf("%s, %s: %w", w.op, x.d.column, err)
			}
			res[i] = append(res[i], r)
			by[x.d.column] = everyKth(r.lat, ioMaxSamples)
		}
		if err := emitSamples("io"+l.tag, w.op, by); err != nil {
			return err
		}
	}

	fmt.Printf("\n## I/O cost of thin provisioning, backing files on %s\n\n", l.dir)
	fmt.Printf("Three 1 GiB dm devices on %s: a `linear` device over a loop device of a 1 GiB file; "+
		"and two thin volumes (pkg/devmapper directly, no pkg/thinpool), each alone in its own pool of 64 KiB blocks (loop devices of a %d GiB data file and a %d MiB metadata file), "+
		"one with the pool zeroing new blocks (the default) and one with `skip_block_zeroing`. "+
		"One I/O at a time (queue depth 1, one goroutine), O_DIRECT, page-aligned buffers of non-zero bytes; every row runs %v of I/O per device, in %d turns, the devices taking turns (the first rotating). "+
		"Random rows pick 4 KiB-aligned offsets from a fixed seed, the same for every device. "+
		"Regions: random first writes in %d MiB (one 4 KiB write in each 64 KiB block, blocks in random order; when every block has had one, the region is discarded and the pass repeats), "+
		"sequential first writes in %d MiB (discarded and restarted at its end), overwrites and reads in %d MiB written in full beforehand. "+
		"A first write on thin provisions a block; on linear it fills a hole of the sparse file. Discards and fills are not timed. "+
		"Cells: IOPS or MiB/s, then p50 / p99 latency per I/O in ms. Ratio: thin's rate ÷ linear's.\n\n",
		l.what, ioPoolDataBytes>>30, ioPoolMetaBytes>>20, ioRun, ioSlices, ioFirstSmallLen>>20, ioFirstLargeLen>>20, ioOverLen>>20)
	fmt.Print("| workload |")
	for _, d := range devs {
		fmt.Printf(" %s |", d.column)
	}
	for _, d := range devs[1:] {
		fmt.Printf(" %s ÷ linear |", strings.TrimPrefix(d.column, "thin, "))
	}
	fmt.Print("\n|---|")
	fmt.Print(strings.Repeat("---:|", 2*len(devs)-1))
	fmt.Println()
	for i, w := range ioLoads {
		fmt.Printf("| %s |", w.op)
		for _, r := range res[i] {
			fmt.Printf(" %s |", w.cell(r))
		}
		for _, r := range res[i][1:] {
			fmt.Printf(" %.2fx |", r.perSecond()/res[i][0].perSecond())
		}
		fmt.Println()
	}

	// The target, from the rows above.
	const target = 0.90
	verdict := func(r float64) string { return metOrMissed(r >= target) }
	fmt.Printf("\nTarget (issue 14): thin random 4 KiB write after allocation >= %.0f%% of linear.", target*100)
	over := res[1]
	for j, d := range devs[1:] {
		byRate := over[j+1].perSecond() / over[0].perSecond()
		byMedian := float64(over[0].lat.quantile(.5)) / float64(over[j+1].lat.quantile(.5))
		fmt.Printf(" %s: IOPS %.0f%% of linear's, %s; by median latency (linear's p50 ÷ thin's) %.0f%%, %s.",
			d.column, byRate*100, verdict(byRate), byMedian*100, verdict(byMedian))
	}
	fmt.Print(" At queue depth 1 the IOPS are one over the mean latency, which the VM's stalls (the p99 column) swing; the median does not see them.")
	var cost, grown []string
	for j, d := range devs {
		f, o := res[0][j], res[1][j]
		cost = append(cost, fmt.Sprintf("%s %.2fx (%.2fx)", d.column, f.perSecond()/o.perSecond(), float64(f.lat.quantile(.5))/float64(o.lat.quantile(.5))))
		grown = append(grown, fmt.Sprintf("%s %.1f KiB", d.column, f.grownPerIO/1024))
	}
	fmt.Printf("\nFirst-write cost, random 4 KiB: first write's IOPS ÷ overwrite's IOPS (p50 latency, first ÷ overwrite): %s.\n", strings.Join(cost, "; "))
	fmt.Printf("The backing file's allocation grew, per random 4 KiB first write (first pass over the region), by: %s (64 KiB: the whole block was written, zeroes and data; 4 KiB: the data alone).\n", strings.Join(grown, "; "))
	fmt.Printf("Raw latencies in samples.json, table io%s: at most %d per row and device (every kth I/O). The part took %v.\n",
		l.tag, ioMaxSamples, time.Since(start).Round(time.Second))
	return nil
}

func (w ioLoad) cell(r ioResult) string {
	rate := fmt.Sprintf("%.0f IOPS", r.perSecond())
	if w.size >= ioLarge {
		rate = fmt.Sprintf("%.1f MiB/s", r.perSecond()*float64(w.size)/(1<<20))
	}
	return fmt.Sprintf("%s, %s / %s", rate, ms(r.lat.quantile(.5)), ms(r.lat.quantile(.99)))
}

// ioRunner is one workload on one device, run in slices.
type ioRunner struct {
	w         ioLoad
	d         *ioDev
	buf       []byte
	rng       *rand.Rand
	order     []int // a random first write's blocks, in order
	next      int64 // the next slot of a sequential or first-write run
	started   bool
	firstPass bool
	baseAlloc int64
	r         ioResult
}

func (w ioLoad) runner(d *ioDev, buf []byte) *ioRunner {
	return &ioRunner{w: w, d: d, buf: buf[:w.size], rng: rand.New(rand.NewPCG(w.seed, 14)), firstPass: true}
}

// slots is how many I/Os make one pass over the region.
func (x *ioRunner) slots() int64 {
	if x.w.first && x.w.random {
		return int64(len(x.order))
	}
	return x.w.len / int64(x.w.size)
}

// step runs the workload for dur of I/O time.
func (x *ioRunner) step(dur time.Duration) error {
	w, d, r := x.w, x.d, &x.r
	if !x.started {
		x.started = true
		if w.first {
			if err := d.discard(w.off, w.len); err != nil {
				return err
			}
		}
		if w.first && w.random {
			x.order = x.rng.Perm(int(w.len / ioBlockBytes))
		}
		a, err := allocated(d.data)
		if err != nil {
			return err
		}
		x.baseAlloc = a
	}
	var active time.Duration
	seg := time.Now()
	for active+time.Since(seg) < dur {
		var off int64
		switch {
		case w.first && w.random:
			off = w.off + int64(x.order[x.next])*ioBlockBytes + x.rng.Int64N(ioBlockBytes/ioSmall)*ioSmall
		case w.random:
			off = w.off + x.rng.Int64N(w.len/int64(w.size))*int64(w.size)
		default:
			off = w.off + x.next*int64(w.size)
		}
		t0 := time.Now()
		var err error
		if w.write {
			_, err = d.f.WriteAt(x.buf, off)
		} else {
			_, err = d.f.ReadAt(x.buf, off)
		}
		if err != nil {
			return fmt.Errorf("at %d: %w", off, err)
		}
		r.lat = append(r.lat, time.Since(t0))
		r.ios++
		if x.next++; x.next < x.slots() {
			continue
		}
		// The region is used up: a first-write run discards it (untimed)
		// and starts over; an overwrite run wraps.
		x.next = 0
		if !w.first {
			continue
		}
		active += time.Since(seg)
		if err := x.endPass(); err != nil {
			return err
		}
		if err := d.discard(w.off, w.len); err != nil {
			return err
		}
		seg = time.Now()
	}
	active += time.Since(seg)
	r.active += active
	return nil
}

// endPass notes the file's growth per I/O at the end of the first pass.
func (x *ioRunner) endPass() error {
	if x.firstPass && x.w.first {
		now, err := allocated(x.d.data)
		if err != nil {
			return err
		}
		x.r.grownPerIO = float64(now-x.baseAlloc) / float64(x.r.ios)
	}
	x.firstPass = false
	return nil
}

// finish ends the run: a first-write run's region is discarded, to give
// the memory back.
func (x *ioRunner) finish() (ioResult, error) {
	if err := x.endPass(); err != nil {
		return x.r, err
	}
	if x.w.first {
		return x.r, x.d.discard(x.w.off, x.w.len)
	}
	return x.r, nil
}

// discard discards the range and flushes, which on thin unmaps its blocks
// and commits, so that the pool can hand them out again.
func (d *ioDev) discard(off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r))); e != 0 {
		return fmt.Errorf("discard %s: %w", d.node(), e)
	}
	return d.f.Sync()
}

// ioLinear makes a linear device over a loop device of a sparse file.
func ioLinear(c *devmapper.Client, name, dir string) (*ioDev, error) {
	path := filepath.Join(dir, name+".img")
	lo, err := sparseLoop(path, ioDevBytes, false)
	d := &ioDev{column: "linear", data: path, files: []string{path}}
	if err != nil {
		return d, err
	}
	defer lo.Close() // the table holds it from here; it detaches when the device goes
	if err := d.create(c, name, devmapper.NewTarget(0, ioDevBytes/devmapper.SectorSize, devmapper.LinearParams{Dev: devmapper.Dev(lo.Rdev)})); err != nil {
		return d, err
	}
	return d, d.open()
}

// ioThin makes a pool of its own and thin volume 0 in it.
func ioThin(c *devmapper.Client, name, dir string, skipZeroing bool) (*ioDev, error) {
	metaPath, dataPath := filepath.Join(dir, name+".meta"), filepath.Join(dir, name+".data")
	d := &ioDev{data: dataPath, files: []string{metaPath, dataPath}}
	meta, err := sparseLoop(metaPath, ioPoolMetaBytes, true)
	if err != nil {
		return d, err
	}
	defer meta.Close()
	data, err := sparseLoop(dataPath, ioPoolDataBytes, false)
	if err != nil {
		return d, err
	}
	defer data.Close()
	pool, err := c.Create(name+"-pool", devmapper.UUIDPrefix+name+"-pool")
	if err != nil {
		return d, err
	}
	d.pool = pool.Dev
	params := devmapper.ThinPoolParams{
		MetadataDev: devmapper.Dev(meta.Rdev), DataDev: devmapper.Dev(data.Rdev), BlockSectors: blockSectors, LowWaterBlocks: 1024,
		Features: devmapper.ThinPoolFeatures{SkipBlockZeroing: skipZeroing},
	}
	if err := c.Load(pool.Dev, []devmapper.Target{devmapper.NewTarget(0, ioPoolDataBytes/devmapper.SectorSize, params)}); err != nil {
		return d, err
	}
	if err := c.Resume(pool.Dev); err != nil {
		return d, err
	}
	if err := c.Message(pool.Dev, devmapper.CreateThin{DeviceID: 0}); err != nil {
		return d, err
	}
	if err := d.create(c, name, devmapper.NewTarget(0, ioDevBytes/devmapper.SectorSize, devmapper.ThinParams{PoolDev: pool.Dev, DeviceID: 0})); err != nil {
		return d, err
	}
	return d, d.open()
}

func (d *ioDev) create(c *devmapper.Client, name string, t devmapper.Target) error {
	info, err := c.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		return err
	}
	d.dev = info.Dev
	if err := c.Load(info.Dev, []devmapper.Target{t}); err != nil {
		return err
	}
	return c.Resume(info.Dev)
}

func (d *ioDev) open() error {
	f, err := os.OpenFile(d.node(), os.O_RDWR|unix.O_DIRECT, 0)
	d.f = f
	return err
}

// close removes the device, then its pool (which lets go of the loop
// devices: they detach themselves), then the files.
func (d *ioDev) close(c *devmapper.Client) error {
	var err error
	if d.f != nil {
		err = d.f.Close()
	}
	for _, dev := range []devmapper.Dev{d.dev, d.pool} {
		if dev != 0 {
			err = errors.Join(err, c.Remove(dev, false))
		}
	}
	for _, p := range d.files {
		err = errors.Join(err, os.Remove(p))
	}
	return err
}

// allocated is the file's allocated bytes (st_blocks).
func allocated(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// everyKth keeps at most max of s, evenly spread.
func everyKth(s sample, max int) sample {
	k := (len(s) + max - 1) / max
	if k <= 1 {
		return s
	}
	var out sample
	for i := 0; i < len(s); i += k {
		out = append(out, s[i])
	}
	return out
}
