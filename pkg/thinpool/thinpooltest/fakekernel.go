package thinpooltest

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// FakeKernel is a thinpool.Kernel held in memory, for tests on hosts
// without device-mapper. It enforces the kernel's rules and answers with the
// kernel's errno in a *devmapper.Error, as *devmapper.Client does, so that
// code tested against it behaves the same on a real node. It is safe for
// concurrent use (one mutex).
//
// What it models, after drivers/md/dm-ioctl.c, dm-thin.c and
// dm-thin-metadata.c:
//   - dm devices: unique names and UUIDs (EBUSY), the lowest free minor,
//     inactive and live tables, suspend and resume (a resume swaps the
//     inactive table in), open counts (SetOpen, plus one per table that holds
//     the device: a thin's table holds its pool open), removal (EBUSY while
//     open) and deferred removal (done when the open count reaches 0).
//   - the thin-pool target: the kernel's pool object (made when a pool table
//     is loaded, gone when no table refers to it), its modes (rw,
//     out_of_data_space, read-only, fail) and how they change, every message
//     with its errno, status lines, growth of the data and metadata devices
//     on resume, the low-water and mode-change events (EventNr), which
//     WaitEvent waits for.
//   - pool metadata as it is kept on the metadata device: thin ids, their
//     block mappings with shared blocks reference-counted (a snapshot shares
//     its origin's blocks, a write to a shared block moves it), the
//     transaction id, needs_check and the held metadata root. It belongs to
//     the device, not to the dm pool, so Reboot and a new pool table on the
//     same device bring it back. Block 0 of the metadata device holds a
//     superblock in the kernel's layout (magic, needs_check flag, transaction
//     id, held root, space map sizes, block sizes, checksum), rewritten at
//     every commit, for what reads it before loading the pool. The layout is
//     pkg/devmapper's Superblock, the one the pool manager parses; a test in
//     the VM compares what the fake writes with what the kernel writes.
//     reserve_metadata_snap writes a copy of it and the mapping btrees, in
//     pkg/devmapper's node layout, for readers of the held snapshot
//     (fakekernel_metasnap.go).
//   - data: Write, WriteData and ReadData go through any device (thin,
//     linear, error, pool, loop, disk). Thin data lives in the data device's
//     blocks, so snapshot isolation, copy-on-write, block zeroing (and what
//     skip_block_zeroing exposes) and running out of space follow from the
//     mappings.
//   - block devices: disks (AddBlockDevice) and loop devices (AttachFile),
//     which clear themselves once released and no table holds them, as
//     auto-clearing loop devices do. Their content is an in-memory image;
//     the real files are only stat'ed.
//
// What it does not model:
//   - queue_if_no_space: a write the pool cannot serve fails with ENOSPC at
//     once, as after the kernel's no_space_timeout, and the status keeps
//     saying queue_if_no_space;
//   - waiting: I/O to a suspended device fails with EAGAIN instead of
//     blocking until resume, and what the kernel does from a work queue (a
//     deferred removal after the last close, the periodic metadata commit)
//     happens at once, so nothing written is ever lost to a crash;
//   - metadata use, which is a formula (16 blocks, plus one per thin device,
//     one per 64 data blocks in use and one for a held snapshot), not btrees,
//     and sharing, which is exact reference counting where the kernel's
//     block-time heuristic may copy a block that is no longer shared;
//   - discard (no block is ever unmapped), read-only dm devices, target
//     types other than thin-pool, thin, linear and error, and devices named
//     by path in a table (the parsers of pkg/devmapper refuse them);
//   - dm devices under a pool: its metadata and data devices must be disks
//     or loop devices (ENXIO otherwise; the kernel takes any block device).
type FakeKernel struct {
	mu     sync.Mutex
	dms    map[devmapper.Dev]*fakeDM
	pools  map[devmapper.Dev]*fakePool  // the kernel's pool objects, by pool device
	blocks map[devmapper.Dev]*fakeBlock // disks and attached loop devices
	files  map[string]*fakeStore        // loop files' content, by absolute path
	disks  uint32                       // disks added, for their minors
	// events is closed, and replaced, at every dm event: WaitEvent's wake-up.
	events chan struct{}
}

// NewFakeKernel returns a kernel with no devices.
func NewFakeKernel() *FakeKernel {
	return &FakeKernel{
		dms:    map[devmapper.Dev]*fakeDM{},
		pools:  map[devmapper.Dev]*fakePool{},
		blocks: map[devmapper.Dev]*fakeBlock{},
		files:  map[string]*fakeStore{},
		events: make(chan struct{}),
	}
}

// Device numbers: dm takes a dynamic major, 254 on most systems; loop is 7
// and SCSI disks 8.
const (
	fakeDMMajor   = 254
	fakeLoopMajor = 7
	fakeDiskMajor = 8
)

// fakeDM is one dm device.
type fakeDM struct {
	name, uuid string
	dev        devmapper.Dev
	opens      int // openers other than dm tables, set by SetOpen
	eventNr    uint32
	suspended  bool
	// live and inactive are the tables; nil when there is none.
	live, inactive []*fakeTarget
	deferredRemove bool
	// immutable is set once a thin-pool table has been live: the kernel
	// then refuses any other table type on the device (DM_TARGET_IMMUTABLE).
	immutable bool
}

// fakeTarget is a constructed target: a table line and what its
// constructor resolved.
type fakeTarget struct {
	devmapper.Target // as the kernel prints it back
	poolParams       *devmapper.ThinPoolParams
	thin             *devmapper.ThinParams
	linear           *devmapper.LinearParams
	// pool is the pool object of a thin-pool or thin target.
	pool *fakePool
	// mode is, for a thin-pool target, the mode its next bind asks for
	// (the kernel's adjusted_pf.mode): the table's own at first, then kept
	// in step with the pool's while the target is bound.
	mode fakePoolMode
}

// holds returns the devices the target opens.
func (t *fakeTarget) holds() []devmapper.Dev {
	switch {
	case t.poolParams != nil:
		return []devmapper.Dev{t.poolParams.MetadataDev, t.poolParams.DataDev}
	case t.thin != nil && t.thin.ExternalOrigin != 0:
		return []devmapper.Dev{t.thin.PoolDev, t.thin.ExternalOrigin}
	case t.thin != nil:
		return []devmapper.Dev{t.thin.PoolDev}
	case t.linear != nil:
		return []devmapper.Dev{t.linear.Dev}
	}
	return nil
}

// fakeTableHolds reports whether a table opens dev. A table opens each device
// once however many of its targets use it, so it counts once.
func fakeTableHolds(tbl []*fakeTarget, dev devmapper.Dev) bool {
	for _, t := range tbl {
		if slices.Contains(t.holds(), dev) {
			return true
		}
	}
	return false
}

func fakeTableBytes(tbl []*fakeTarget) int64 {
	var s uint64
	for _, t := range tbl {
		s += t.LengthSectors
	}
	return int64(s) * devmapper.SectorSize
}

// fakeErrno wraps a kernel errno with the reason the kernel logs for it, which
// a test failure then shows; errors.Is still finds the errno.
func fakeErrno(e unix.Errno, why string) error { return fmt.Errorf("%w (%s)", e, why) }

// holders counts the tables, live or inactive, that hold dev open.
func (f *FakeKernel) holders(dev devmapper.Dev) int {
	n := 0
	for _, d := range f.dms {
		if fakeTableHolds(d.live, dev) {
			n++
		}
		if fakeTableHolds(d.inactive, dev) {
			n++
		}
	}
	return n
}

func (f *FakeKernel) openCount(d *fakeDM) int { return d.opens + f.holders(d.dev) }

// internallySuspended reports whether d is a thin device whose pool is
// suspended: the pool suspends its thins with it (pool_presuspend).
func (f *FakeKernel) internallySuspended(d *fakeDM) bool {
	for _, tbl := range [][]*fakeTarget{d.live, d.inactive} {
		for _, t := range tbl {
			if t.thin != nil && t.pool.suspended {
				return true
			}
		}
	}
	return false
}

func (f *FakeKernel) info(d *fakeDM) devmapper.DeviceInfo {
	return devmapper.DeviceInfo{
		Name: d.name, UUID: d.uuid, Dev: d.dev,
		OpenCount:       int32(f.openCount(d)),
		TargetCount:     uint32(len(d.live)),
		EventNr:         d.eventNr,
		Suspended:       d.suspended,
		LiveTable:       d.live != nil,
		InactiveTable:   d.inactive != nil,
		DeferredRemove:  d.deferredRemove,
		InternalSuspend: f.internallySuspended(d),
	}
}

func (f *FakeKernel) event(dev devmapper.Dev) {
	if d := f.dms[dev]; d != nil {
		d.eventNr++
		f.wakeWaiters()
	}
}

// Create implements thinpool.Kernel. It checks its arguments as *devmapper.Client
// does (devmapper.ErrInvalid), then as the kernel does: EBUSY when the name
// or the UUID is taken (dm_hash_insert).
func (f *FakeKernel) Create(name, uuid string) (devmapper.DeviceInfo, error) {
	if name == "" {
		return devmapper.DeviceInfo{}, &devmapper.Error{Op: "create", Err: fmt.Errorf("%w: empty name", devmapper.ErrInvalid)}
	}
	invalid := func(why string) (devmapper.DeviceInfo, error) {
		return devmapper.DeviceInfo{}, &devmapper.Error{Op: "create", Device: name, Err: fmt.Errorf("%w: %s", devmapper.ErrInvalid, why)}
	}
	switch {
	case !devmapper.Owned(uuid) || len(uuid) == len(devmapper.UUIDPrefix):
		return invalid(fmt.Sprintf("uuid %q must start with %q", uuid, devmapper.UUIDPrefix))
	case strings.ContainsAny(name, "\x00\n") || strings.ContainsAny(uuid, "\x00\n"):
		return invalid("name or uuid contains a NUL or newline")
	case strings.Contains(name, "/") || name == "." || name == "..":
		return invalid(fmt.Sprintf("name %q cannot be a /dev/mapper file name", name))
	case len(name) > unix.DM_NAME_LEN-1 || len(uuid) > unix.DM_UUID_LEN-1:
		return invalid("name or uuid too long")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.dms {
		if d.name == name {
			return devmapper.DeviceInfo{}, &devmapper.Error{Op: "create", Device: name, Err: fakeErrno(unix.EBUSY, "device name already in use")}
		}
		if d.uuid == uuid {
			return devmapper.DeviceInfo{}, &devmapper.Error{Op: "create", Device: name, Err: fakeErrno(unix.EBUSY, "device uuid already in use")}
		}
	}
	// The kernel hands out the lowest free minor, so a removed device's
	// number is soon another device's.
	minor := uint32(0)
	for f.dms[devmapper.MakeDev(fakeDMMajor, minor)] != nil {
		minor++
	}
	d := &fakeDM{name: name, uuid: uuid, dev: devmapper.MakeDev(fakeDMMajor, minor)}
	f.dms[d.dev] = d
	return f.info(d), nil
}

// Info implements thinpool.Kernel: ENXIO when there is no such device.
func (f *FakeKernel) Info(dev devmapper.Dev) (devmapper.DeviceInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return devmapper.DeviceInfo{}, &devmapper.Error{Op: "info", Device: dev.String(), Err: unix.ENXIO}
	}
	return f.info(d), nil
}

// InfoByName implements thinpool.Kernel: ENXIO when there is no such device.
func (f *FakeKernel) InfoByName(name string) (devmapper.DeviceInfo, error) {
	if name == "" {
		return devmapper.DeviceInfo{}, &devmapper.Error{Op: "info", Err: fmt.Errorf("%w: empty name", devmapper.ErrInvalid)}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.dms {
		if d.name == name {
			return f.info(d), nil
		}
	}
	return devmapper.DeviceInfo{}, &devmapper.Error{Op: "info", Device: name, Err: unix.ENXIO}
}

// List implements thinpool.Kernel, in name order.
func (f *FakeKernel) List() ([]devmapper.ListEntry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]devmapper.ListEntry, 0, len(f.dms))
	for _, d := range f.dms {
		out = append(out, devmapper.ListEntry{Name: d.name, Dev: d.dev, UUID: d.uuid, EventNr: d.eventNr})
	}
	slices.SortFunc(out, func(a, b devmapper.ListEntry) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Devices returns the state of every dm device, in name order.
func (f *FakeKernel) Devices() []devmapper.DeviceInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]devmapper.DeviceInfo, 0, len(f.dms))
	for _, d := range f.dms {
		out = append(out, f.info(d))
	}
	slices.SortFunc(out, func(a, b devmapper.DeviceInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// fakeCheckTable refuses what *devmapper.Client refuses before the ioctl.
func fakeCheckTable(table []devmapper.Target) error {
	if len(table) == 0 {
		return fmt.Errorf("%w: a table needs at least one target", devmapper.ErrInvalid)
	}
	var next uint64
	for i, t := range table {
		switch {
		case t.StartSector != next:
			return fmt.Errorf("%w: target %d starts at sector %d, want %d", devmapper.ErrInvalid, i, t.StartSector, next)
		case t.LengthSectors == 0:
			return fmt.Errorf("%w: target %d has length 0", devmapper.ErrInvalid, i)
		case t.Type == "" || len(t.Type) > unix.DM_MAX_TYPE_NAME-1:
			return fmt.Errorf("%w: target %d type %q", devmapper.ErrInvalid, i, t.Type)
		case strings.ContainsAny(t.Params, "\x00\n"):
			return fmt.Errorf("%w: target params %q contain a NUL or newline", devmapper.ErrInvalid, t.Params)
		}
		next = t.StartSector + t.LengthSectors
	}
	return nil
}

// Load implements thinpool.Kernel: the table replaces the inactive one. Each target
// is constructed at once, as the kernel does: a thin-pool table makes (and,
// on a zeroed device, formats) the pool's metadata, a thin table opens its
// thin id. Types other than thin-pool, thin, linear and error are EINVAL.
func (f *FakeKernel) Load(dev devmapper.Dev, table []devmapper.Target) error {
	fail := func(err error) error { return &devmapper.Error{Op: "load", Device: dev.String(), Err: err} }
	if err := fakeCheckTable(table); err != nil {
		return fail(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return fail(unix.ENXIO)
	}
	isPool := false
	for _, t := range table {
		if t.Type == "thin-pool" {
			isPool = true
			if len(table) > 1 {
				return fail(fakeErrno(unix.EINVAL, "thin-pool must appear alone in table"))
			}
		}
	}
	if d.immutable && !isPool {
		return fail(fakeErrno(unix.EINVAL, "can't replace immutable target type thin-pool"))
	}
	tbl := make([]*fakeTarget, 0, len(table))
	for _, t := range table {
		ft, err := f.construct(d, t)
		if err != nil {
			f.settle() // a pool object made for this table goes with it
			return fail(err)
		}
		tbl = append(tbl, ft)
	}
	f.dropTable(d.inactive)
	d.inactive = tbl
	f.settle()
	return nil
}

func (f *FakeKernel) exists(dev devmapper.Dev) bool {
	return f.dms[dev] != nil || f.blocks[dev] != nil
}

// construct runs a target's constructor.
func (f *FakeKernel) construct(d *fakeDM, t devmapper.Target) (*fakeTarget, error) {
	switch t.Type {
	case "error":
		// The error target takes and prints no parameters.
		return &fakeTarget{Target: devmapper.Target{StartSector: t.StartSector, LengthSectors: t.LengthSectors, Type: "error"}}, nil
	case "linear":
		p, err := devmapper.ParseLinearParams(t.Params)
		if err != nil {
			return nil, fakeErrno(unix.EINVAL, err.Error())
		}
		if !f.exists(p.Dev) {
			return nil, fakeErrno(unix.ENXIO, "device lookup failed")
		}
		return &fakeTarget{Target: devmapper.NewTarget(t.StartSector, t.LengthSectors, p), linear: &p}, nil
	case "thin-pool":
		return f.constructPool(d, t)
	case "thin":
		return f.constructThin(t)
	}
	return nil, fakeErrno(unix.EINVAL, "unknown target type "+t.Type)
}

// dropTable destroys a table that is no longer loaded: a pool target bound
// to its pool lets go of it (unbind_control_target).
func (f *FakeKernel) dropTable(tbl []*fakeTarget) {
	for _, t := range tbl {
		if t.pool != nil && t.pool.bound == t {
			t.pool.bound = nil
		}
	}
}

// settle does what the kernel does when the last opener of something lets
// go: removes dm devices marked for deferred removal, detaches released
// loop devices, and destroys pool objects that no table refers to.
func (f *FakeKernel) settle() {
	for changed := true; changed; {
		changed = false
		for _, d := range f.dms {
			if d.deferredRemove && f.openCount(d) == 0 {
				f.removeDM(d)
				changed = true
			}
		}
		for dev, b := range f.blocks {
			if b.loop && b.holds == 0 && f.holders(dev) == 0 {
				delete(f.blocks, dev)
				b.detached = true
				changed = true
			}
		}
	}
	used := map[*fakePool]bool{}
	for _, d := range f.dms {
		for _, t := range slices.Concat(d.live, d.inactive) {
			if t.pool != nil {
				used[t.pool] = true
			}
		}
	}
	for md, po := range f.pools {
		if !used[po] {
			delete(f.pools, md)
		}
	}
}

func (f *FakeKernel) removeDM(d *fakeDM) {
	delete(f.dms, d.dev)
	f.dropTable(d.live)
	f.dropTable(d.inactive)
	f.wakeWaiters() // a waiter on it finds it gone
}

// suspend suspends d; a pool suspends its thins with it.
func (f *FakeKernel) suspend(d *fakeDM) {
	if d.suspended {
		return
	}
	d.suspended = true
	for _, t := range d.live {
		if t.poolParams != nil {
			t.pool.suspended = true
		}
	}
}

// Suspend implements thinpool.Kernel. Suspending a suspended device does nothing.
// The flags change nothing here: the fake has no I/O in flight and no
// filesystem to freeze.
func (f *FakeKernel) Suspend(dev devmapper.Dev, _ devmapper.SuspendFlags) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return &devmapper.Error{Op: "suspend", Device: dev.String(), Err: unix.ENXIO}
	}
	f.suspend(d)
	return nil
}

// Resume implements thinpool.Kernel, as do_resume does: an inactive table is swapped
// in (the device suspended first), then a suspended device is resumed. A
// table whose devices are too small for it is dropped with EINVAL and the
// device stays suspended; a pool table shorter than the pool's data (the
// pool cannot shrink) stays live with EINVAL and the device suspended.
func (f *FakeKernel) Resume(dev devmapper.Dev) error {
	fail := func(err error) error { return &devmapper.Error{Op: "resume", Device: dev.String(), Err: err} }
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return fail(unix.ENXIO)
	}
	if d.inactive != nil {
		f.suspend(d)
		if err := f.checkAreas(d.inactive); err != nil {
			f.dropTable(d.inactive)
			d.inactive = nil
			f.settle()
			return fail(err)
		}
		f.dropTable(d.live)
		d.live, d.inactive = d.inactive, nil
		if d.live[0].poolParams != nil {
			d.immutable = true
		}
		f.settle()
	}
	if !d.suspended {
		return nil
	}
	if d.live == nil {
		return fail(fakeErrno(unix.EINVAL, "no table to resume"))
	}
	for _, t := range d.live {
		if t.poolParams != nil {
			if err := f.poolPreresume(t); err != nil {
				return fail(err)
			}
		}
	}
	d.suspended = false
	for _, t := range d.live {
		if t.poolParams != nil {
			t.pool.suspended = false
			t.pool.lowWaterTriggered = false
		}
	}
	return nil
}

// checkAreas refuses a table that maps past the end of a device it uses
// (device_area_is_invalid, when the table is swapped in).
func (f *FakeKernel) checkAreas(tbl []*fakeTarget) error {
	for _, t := range tbl {
		var dev devmapper.Dev
		var end int64
		switch {
		case t.linear != nil:
			dev, end = t.linear.Dev, int64(t.linear.OffsetSectors+t.LengthSectors)*devmapper.SectorSize
		case t.poolParams != nil:
			dev, end = t.poolParams.DataDev, int64(t.LengthSectors)*devmapper.SectorSize
		default:
			continue
		}
		if size, ok := f.devSize(dev); !ok || end > size {
			return fakeErrno(unix.EINVAL, fmt.Sprintf("%s too small for target: %d bytes, %d needed", dev, size, end))
		}
	}
	return nil
}

// Remove implements thinpool.Kernel: ENXIO when there is no such device; EBUSY while
// it is open, unless deferred, when it is marked and removed as soon as its
// open count drops to 0 (at once if it is 0 already).
func (f *FakeKernel) Remove(dev devmapper.Dev, deferred bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return &devmapper.Error{Op: "remove", Device: dev.String(), Err: unix.ENXIO}
	}
	if n := f.openCount(d); n > 0 {
		if deferred {
			d.deferredRemove = true
			return nil
		}
		return &devmapper.Error{Op: "remove", Device: dev.String(), Err: fakeErrno(unix.EBUSY, fmt.Sprintf("open count %d", n))}
	}
	f.removeDM(d)
	f.settle()
	return nil
}

// CancelDeferredRemove implements thinpool.Kernel. It is not an error when no
// removal is pending.
func (f *FakeKernel) CancelDeferredRemove(dev devmapper.Dev) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return &devmapper.Error{Op: `message "@cancel_deferred_remove"`, Device: dev.String(), Err: unix.ENXIO}
	}
	d.deferredRemove = false
	return nil
}

// Table implements thinpool.Kernel: the live table as the kernel prints it back,
// empty when there is none.
func (f *FakeKernel) Table(dev devmapper.Dev) ([]devmapper.Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return nil, &devmapper.Error{Op: "table", Device: dev.String(), Err: unix.ENXIO}
	}
	out := make([]devmapper.Target, 0, len(d.live))
	for _, t := range d.live {
		out = append(out, t.Target)
	}
	return out, nil
}

// Status implements thinpool.Kernel: a status line per live target (thin-pool and
// thin lines as the kernel prints them, empty ones for linear and error).
// Without noFlush a running pool commits first, which, as in the kernel,
// also takes a pool out of out_of_data_space mode once blocks are free.
func (f *FakeKernel) Status(dev devmapper.Dev, noFlush bool) ([]devmapper.Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return nil, &devmapper.Error{Op: "status", Device: dev.String(), Err: unix.ENXIO}
	}
	out := make([]devmapper.Target, 0, len(d.live))
	for _, t := range d.live {
		s := devmapper.Target{StartSector: t.StartSector, LengthSectors: t.LengthSectors, Type: t.Type}
		switch {
		case t.poolParams != nil:
			if !noFlush && !d.suspended {
				f.commit(t.pool)
			}
			s.Params = f.poolStatus(t).String()
		case t.thin != nil:
			s.Params = f.thinStatus(t).String()
		}
		out = append(out, s)
	}
	return out, nil
}

// Message implements thinpool.Kernel. Only a thin-pool takes messages (EINVAL
// elsewhere, and on a device with no live table); the errno of each is the
// kernel's: see poolMessage.
func (f *FakeKernel) Message(dev devmapper.Dev, m devmapper.Message) error {
	fail := func(err error) error {
		return &devmapper.Error{Op: "message " + strconv.Quote(m.String()), Device: dev.String(), Err: err}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return fail(unix.ENXIO)
	}
	if len(d.live) == 0 {
		return fail(fakeErrno(unix.EINVAL, "no live table"))
	}
	if t := d.live[0]; t.poolParams == nil {
		return fail(fakeErrno(unix.EINVAL, "target type does not support messages"))
	} else if err := f.poolMessage(t.pool, m); err != nil {
		return fail(err)
	}
	return nil
}

// SetOpen sets how many openers (mounts, open files) hold a dm device,
// besides the tables that hold it. Setting it to 0 completes a deferred
// removal, as the last close does.
func (f *FakeKernel) SetOpen(dev devmapper.Dev, n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dms[dev]
	if d == nil {
		return fmt.Errorf("set open count of %s: %w", dev, unix.ENXIO)
	}
	if n < 0 {
		return fmt.Errorf("set open count of %s to %d: %w", dev, n, unix.EINVAL)
	}
	d.opens = n
	f.settle()
	return nil
}

// Reboot forgets what a reboot forgets: every dm device, the pools' in-core
// state (a failed pool comes back as its metadata says) and the loop
// devices. Disks, the content of disks and loop files, and pool metadata
// stay.
func (f *FakeKernel) Reboot() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dms = map[devmapper.Dev]*fakeDM{}
	f.pools = map[devmapper.Dev]*fakePool{}
	f.wakeWaiters()
	for dev, b := range f.blocks {
		if b.loop {
			delete(f.blocks, dev)
			b.detached = true
		}
	}
}
