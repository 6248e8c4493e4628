package thinpooltest

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The FakeKernel's block devices and data path.

// fakePageBytes is the unit of a device image.
const fakePageBytes = 4096

// fakeStore is the content of a disk or of a loop device's file: a sparse
// image of 4 KiB pages (a missing page reads as zeros), and the pool
// metadata kept on the device if it is a pool's metadata device. A page is
// never changed in place, so images share pages when blocks are copied.
type fakeStore struct {
	sizeBytes int64
	pages     map[int64][]byte
	meta      *fakeMeta
}

func newFakeStore(sizeBytes int64) *fakeStore {
	return &fakeStore{sizeBytes: sizeBytes, pages: map[int64][]byte{}}
}

func (s *fakeStore) read(off int64, p []byte) {
	for len(p) > 0 {
		idx, in := off/fakePageBytes, off%fakePageBytes
		n := min(int64(len(p)), fakePageBytes-in)
		if pg := s.pages[idx]; pg != nil {
			copy(p[:n], pg[in:in+n])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
}

// write writes p at off, or n zero bytes when p is nil.
func (s *fakeStore) write(off int64, p []byte, n int64) {
	if p != nil {
		n = int64(len(p))
	}
	for n > 0 {
		idx, in := off/fakePageBytes, off%fakePageBytes
		c := min(n, fakePageBytes-in)
		if p == nil && in == 0 && c == fakePageBytes {
			// Whole zero pages: drop them, a range at a time.
			full := n / fakePageBytes
			s.dropPages(idx, full)
			off, n = off+full*fakePageBytes, n-full*fakePageBytes
			continue
		}
		old := s.pages[idx]
		if p == nil && old == nil {
			off, n = off+c, n-c
			continue
		}
		pg := make([]byte, fakePageBytes)
		copy(pg, old)
		if p != nil {
			copy(pg[in:in+c], p[:c])
			p = p[c:]
		}
		s.pages[idx] = pg
		off, n = off+c, n-c
	}
}

// pagesIn returns the indexes of the pages held in [first, first+count),
// walking whichever is smaller, the range or the image.
func (s *fakeStore) pagesIn(first, count int64) []int64 {
	var out []int64
	if int64(len(s.pages)) < count {
		for idx := range s.pages {
			if idx >= first && idx < first+count {
				out = append(out, idx)
			}
		}
		return out
	}
	for idx := first; idx < first+count; idx++ {
		if s.pages[idx] != nil {
			out = append(out, idx)
		}
	}
	return out
}

func (s *fakeStore) dropPages(first, count int64) {
	for _, idx := range s.pagesIn(first, count) {
		delete(s.pages, idx)
	}
}

// copyPages copies n bytes, whole pages, from src at srcOff to s at dstOff.
func (s *fakeStore) copyPages(dstOff int64, src *fakeStore, srcOff, n int64) {
	first, count := srcOff/fakePageBytes, n/fakePageBytes
	from := src.pagesIn(first, count)
	s.dropPages(dstOff/fakePageBytes, count)
	for _, idx := range from {
		s.pages[dstOff/fakePageBytes+idx-first] = src.pages[idx]
	}
}

// fakeBlock is a disk or an attached loop device.
type fakeBlock struct {
	dev  devmapper.Dev
	path string // a disk's path, or a loop device's backing file
	loop bool
	// holds counts AttachFile holds not yet released: an auto-clearing loop
	// device is detached once it has none and no table holds it.
	holds    int
	detached bool
	st       *fakeStore
	serial   string // a disk's; loop devices have none
}

func fakeNode(dev devmapper.Dev) string {
	if dev.Major() == fakeLoopMajor {
		return "/dev/fake/loop" + strconv.FormatUint(uint64(dev.Minor()), 10)
	}
	return "/dev/fake/dm-" + strconv.FormatUint(uint64(dev.Minor()), 10)
}

// AddBlockDevice adds a disk of sizeBytes at path (major 8) and returns its
// number; a disk already at path takes the new size (as a grown LUN does).
// Its content starts as zeros.
func (f *FakeKernel) AddBlockDevice(path string, sizeBytes int64) devmapper.Dev {
	path = filepath.Clean(path)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, b := range f.blocks {
		if !b.loop && b.path == path {
			b.st.sizeBytes = sizeBytes
			return b.dev
		}
	}
	dev := devmapper.MakeDev(fakeDiskMajor, f.disks*16)
	f.disks++
	f.blocks[dev] = &fakeBlock{dev: dev, path: path, st: newFakeStore(sizeBytes), serial: fmt.Sprintf("FAKE-DISK-%d", f.disks)}
	return dev
}

// SetSerial sets a disk's serial ("" for none, as a virtual disk given
// none has).
func (f *FakeKernel) SetSerial(dev devmapper.Dev, serial string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if b := f.blocks[dev]; b != nil {
		b.serial = serial
	}
}

// SwapPaths swaps the names of two disks, or the content of two loop files
// as renaming them would: what a reboot that enumerates disks in another
// order, or an operator's mistake, does.
func (f *FakeKernel) SwapPaths(a, b string) {
	a, b = filepath.Clean(a), filepath.Clean(b)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, blk := range f.blocks {
		switch {
		case blk.loop:
		case blk.path == a:
			blk.path = b
		case blk.path == b:
			blk.path = a
		}
	}
	f.files[a], f.files[b] = f.files[b], f.files[a]
}

// WriteFile writes b at off into the content of the loop file at path, as
// a program writing to the file before it is attached would.
func (f *FakeKernel) WriteFile(path string, off int64, b []byte) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.files[abs]
	if st == nil {
		st = newFakeStore(0)
		f.files[abs] = st
	}
	if end := off + int64(len(b)); end > st.sizeBytes {
		st.sizeBytes = end
	}
	st.write(off, b, int64(len(b)))
	return nil
}

// Serial implements thinpool.Kernel.
func (f *FakeKernel) Serial(dev devmapper.Dev) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if b := f.blocks[dev]; b != nil {
		return b.serial, nil
	}
	if f.exists(dev) {
		return "", nil
	}
	return "", fmt.Errorf("block device %s: %w", dev, unix.ENXIO)
}

// WriteBlock implements thinpool.Kernel.
func (f *FakeKernel) WriteBlock(dev devmapper.Dev, off int64, buf []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, off, int64(len(buf)), buf, true); err != nil {
		return fmt.Errorf("write %s at %d: %w", dev, off, err)
	}
	return nil
}

// BlockDevice implements thinpool.Kernel: a disk by its path, a loop or dm device by
// the node DeviceNode returns. A missing path is os.ErrNotExist; a loop
// device's file, ENOTBLK, as for thinpool.HostKernel.
func (f *FakeKernel) BlockDevice(path string) (devmapper.Dev, int64, error) {
	path = filepath.Clean(path)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, b := range f.blocks {
		if (!b.loop && b.path == path) || (b.loop && fakeNode(b.dev) == path) {
			return b.dev, b.st.sizeBytes, nil
		}
	}
	for _, d := range f.dms {
		if fakeNode(d.dev) == path {
			return d.dev, fakeTableBytes(d.live), nil
		}
	}
	if f.files[path] != nil {
		return 0, 0, fmt.Errorf("%s: %w", path, unix.ENOTBLK)
	}
	return 0, 0, &os.PathError{Op: "stat", Path: path, Err: unix.ENOENT}
}

// AttachFile implements thinpool.Kernel: the loop device already attached to the
// file, with a release that does nothing, or a new one (the lowest free
// loop minor) that detaches once release is called and no table holds it.
// The file must exist; it is only stat'ed, for its size. Its content in the
// fake starts as zeros and is kept, by path, over detaching and Reboot.
func (f *FakeKernel) AttachFile(path string) (devmapper.Dev, func(), error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return 0, nil, err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return 0, nil, fmt.Errorf("loop attach: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return 0, nil, fmt.Errorf("loop attach: %w", &os.PathError{Op: "open", Path: abs, Err: unix.EINVAL})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, b := range f.blocks {
		if b.loop && b.path == abs {
			return b.dev, func() {}, nil
		}
	}
	st := f.files[abs]
	if st == nil {
		st = newFakeStore(0)
		f.files[abs] = st
	}
	st.sizeBytes = fi.Size() &^ (devmapper.SectorSize - 1)
	minor := uint32(0)
	for f.blocks[devmapper.MakeDev(fakeLoopMajor, minor)] != nil {
		minor++
	}
	b := &fakeBlock{dev: devmapper.MakeDev(fakeLoopMajor, minor), path: abs, loop: true, holds: 1, st: st}
	f.blocks[b.dev] = b
	released := false
	return b.dev, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if released || b.detached {
			return
		}
		released = true
		b.holds--
		f.settle()
	}, nil
}

// RefreshSize implements thinpool.Kernel: a loop device takes its file's size again.
func (f *FakeKernel) RefreshSize(dev devmapper.Dev) error {
	f.mu.Lock()
	b := f.blocks[dev]
	f.mu.Unlock()
	if b == nil || !b.loop {
		return nil
	}
	fi, err := os.Stat(b.path)
	if err != nil {
		return fmt.Errorf("refresh size of %s: %w", dev, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	b.st.sizeBytes = fi.Size() &^ (devmapper.SectorSize - 1)
	return nil
}

// DeviceNode implements thinpool.Kernel without touching the file system: a disk's
// path, "/dev/fake/loopN" or "/dev/fake/dm-N"; ENXIO for no such device.
func (f *FakeKernel) DeviceNode(dev devmapper.Dev) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if b := f.blocks[dev]; b != nil && !b.loop {
		return b.path, nil
	}
	if f.exists(dev) {
		return fakeNode(dev), nil
	}
	return "", fmt.Errorf("block device %s: %w", dev, unix.ENXIO)
}

// ReadBlock implements thinpool.Kernel.
func (f *FakeKernel) ReadBlock(dev devmapper.Dev, off int64, buf []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, off, int64(len(buf)), buf, false); err != nil {
		return fmt.Errorf("read %s at %d: %w", dev, off, err)
	}
	return nil
}

// ZeroBlock implements thinpool.Kernel.
func (f *FakeKernel) ZeroBlock(dev devmapper.Dev, n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, 0, int64(n), nil, true); err != nil {
		return fmt.Errorf("zero %s: %w", dev, err)
	}
	return nil
}

// Write writes n zero bytes at offsetBytes through dev, as a program writing
// to the device node would: through a thin device it provisions pool blocks.
// It fails with ENOSPC when the pool has no free block (and puts the pool in
// out_of_data_space mode; a queue_if_no_space pool would make the writer
// wait, which a fake cannot), EIO on a failed or read-only pool (for blocks
// it would have to provision), EAGAIN on a suspended device (which would
// block), ENOSPC past the device's end. Blocks written before a failure stay
// written.
func (f *FakeKernel) Write(dev devmapper.Dev, offsetBytes, n int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, offsetBytes, n, nil, true); err != nil {
		return fmt.Errorf("write %s at %d: %w", dev, offsetBytes, err)
	}
	return nil
}

// WriteData writes p at off through dev, as Write does.
func (f *FakeKernel) WriteData(dev devmapper.Dev, off int64, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, off, int64(len(p)), p, true); err != nil {
		return fmt.Errorf("write %s at %d: %w", dev, off, err)
	}
	return nil
}

// ReadData reads len(p) bytes at off through dev. Unwritten blocks of a
// thin device read as zeros (or as its external origin). It fails with
// io.EOF past the device's end, EIO on a failed pool, EAGAIN on a
// suspended device.
func (f *FakeKernel) ReadData(dev devmapper.Dev, off int64, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.doIO(dev, off, int64(len(p)), p, false); err != nil {
		return fmt.Errorf("read %s at %d: %w", dev, off, err)
	}
	return nil
}

func (f *FakeKernel) devSize(dev devmapper.Dev) (int64, bool) {
	if b := f.blocks[dev]; b != nil {
		return b.st.sizeBytes, true
	}
	if d := f.dms[dev]; d != nil {
		return fakeTableBytes(d.live), true
	}
	return 0, false
}

// doIO reads n bytes into p, or writes p (n zero bytes if p is nil), at off
// on dev, mapping dm devices through their live tables.
func (f *FakeKernel) doIO(dev devmapper.Dev, off, n int64, p []byte, write bool) error {
	size, ok := f.devSize(dev)
	switch {
	case !ok:
		return unix.ENXIO
	case off < 0 || n < 0:
		return unix.EINVAL
	case off+n > size && write:
		return fakeErrno(unix.ENOSPC, fmt.Sprintf("past the end of a %d-byte device", size))
	case off+n > size:
		return io.EOF
	}
	if b := f.blocks[dev]; b != nil {
		if write {
			b.st.write(off, p, n)
		} else {
			b.st.read(off, p)
		}
		return nil
	}
	d := f.dms[dev]
	if d.suspended || f.internallySuspended(d) {
		return fakeErrno(unix.EAGAIN, "device is suspended: the kernel would hold the I/O until resume")
	}
	for n > 0 {
		var t *fakeTarget
		for _, c := range d.live {
			if uint64(off)/devmapper.SectorSize < c.StartSector+c.LengthSectors {
				t = c
				break
			}
		}
		tOff := off - int64(t.StartSector)*devmapper.SectorSize
		c := min(n, int64(t.LengthSectors)*devmapper.SectorSize-tOff)
		var chunk []byte
		if p != nil {
			chunk = p[:c]
		}
		var err error
		switch {
		case t.Type == "error":
			err = unix.EIO
		case t.linear != nil:
			err = f.doIO(t.linear.Dev, int64(t.linear.OffsetSectors)*devmapper.SectorSize+tOff, c, chunk, write)
		case t.poolParams != nil:
			// A pool device maps straight onto its data device (pool_map).
			err = f.doIO(t.poolParams.DataDev, tOff, c, chunk, write)
		case t.thin != nil:
			err = f.thinIO(t, tOff, c, chunk, write)
		}
		if err != nil {
			return err
		}
		off, n = off+c, n-c
		if p != nil {
			p = p[c:]
		}
	}
	return nil
}

// thinIO is I/O to a thin target at off within it.
func (f *FakeKernel) thinIO(t *fakeTarget, off, n int64, p []byte, write bool) error {
	po := t.pool
	if po.mode == fakeModeFail || po.bound == nil {
		return fakeErrno(unix.EIO, "pool has failed")
	}
	m := po.meta
	th := m.thins[t.thin.DeviceID]
	if th == nil {
		return fakeErrno(unix.EIO, "thin device is gone from the pool's metadata")
	}
	bs := int64(m.blockSectors) * devmapper.SectorSize
	provisioned := false
	defer func() {
		if provisioned {
			f.commit(po)
		}
	}()
	for n > 0 {
		vb, in := uint64(off/bs), off%bs
		c := min(n, bs-in)
		var chunk []byte
		if p != nil {
			chunk = p[:c]
		}
		db, mapped := th.blocks[vb]
		switch {
		case !write && mapped:
			po.dataSt.read(int64(db)*bs+in, chunk)
		case !write:
			if err := f.readOrigin(t, off, chunk); err != nil {
				return err
			}
		case mapped && m.refs[db] == 1:
			po.dataSt.write(int64(db)*bs+in, chunk, c)
		default:
			nb, err := f.provision(t, th, vb, in == 0 && c == bs)
			if err != nil {
				return err
			}
			provisioned = true
			po.dataSt.write(int64(nb)*bs+in, chunk, c)
		}
		off, n = off+c, n-c
		if p != nil {
			p = p[c:]
		}
	}
	return nil
}

// provision maps a new data block at virtual block vb of th, for a write:
// to an unmapped block, or to a block shared with a snapshot (whose content
// is copied first, unless the write covers the whole block).
func (f *FakeKernel) provision(t *fakeTarget, th *fakeThin, vb uint64, whole bool) (uint64, error) {
	po, m := t.pool, t.pool.meta
	switch po.mode {
	case fakeModeOutOfDataSpace:
		return 0, fakeErrno(unix.ENOSPC, "pool is out of data space")
	case fakeModeOutOfMetadataSpace, fakeModeReadOnly:
		return 0, fakeErrno(unix.EIO, "pool is read-only")
	}
	if m.usedMetaBlocks(0, 1) > m.metaBlocks {
		f.setPoolMode(po, fakeModeOutOfMetadataSpace)
		return 0, fakeErrno(unix.EIO, "pool is out of metadata space")
	}
	nb, err := f.allocBlock(po)
	if err != nil {
		return 0, err
	}
	bs := int64(m.blockSectors) * devmapper.SectorSize
	old, shared := th.blocks[vb]
	switch {
	case whole:
	case shared:
		po.dataSt.copyPages(int64(nb)*bs, po.dataSt, int64(old)*bs, bs)
	case t.thin.ExternalOrigin != 0:
		page := make([]byte, fakePageBytes)
		for o := int64(0); o < bs; o += fakePageBytes {
			if err := f.readOrigin(t, int64(vb)*bs+o, page); err != nil {
				m.unref(nb)
				return 0, err
			}
			po.dataSt.write(int64(nb)*bs+o, append([]byte(nil), page...), 0)
		}
	case !po.bound.poolParams.Features.SkipBlockZeroing:
		po.dataSt.write(int64(nb)*bs, nil, bs)
	}
	// Without zeroing the block keeps what a deleted device left in it.
	if shared {
		m.unref(old)
	}
	th.blocks[vb] = nb
	return nb, nil
}

// allocBlock takes a free data block, the first at or after the cursor. The
// low-water event is raised once per resume when free blocks fall to the
// mark; with none free the pool goes out_of_data_space (alloc_data_block).
func (f *FakeKernel) allocBlock(po *fakePool) (uint64, error) {
	m := po.meta
	free := m.freeDataBlocks()
	if free <= po.bound.poolParams.LowWaterBlocks && !po.lowWaterTriggered {
		po.lowWaterTriggered = true
		f.event(po.md)
	}
	if free == 0 {
		f.setPoolMode(po, fakeModeOutOfDataSpace)
		return 0, fakeErrno(unix.ENOSPC, "no free data block")
	}
	for {
		b := m.cursor % m.dataBlocks
		m.cursor = b + 1
		if m.refs[b] == 0 {
			m.refs[b] = 1
			return b, nil
		}
	}
}

// readOrigin reads what an unmapped part of a thin target shows: its
// external origin within the origin's size, zeros elsewhere.
func (f *FakeKernel) readOrigin(t *fakeTarget, off int64, p []byte) error {
	clear(p)
	origin := t.thin.ExternalOrigin
	if origin == 0 {
		return nil
	}
	size, _ := f.devSize(origin)
	if off >= size {
		return nil
	}
	return f.doIO(origin, off, min(int64(len(p)), size-off), p[:min(int64(len(p)), size-off)], false)
}
