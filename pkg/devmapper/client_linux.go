package devmapper

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ControlPath is where devtmpfs (or udev) puts the dm control node.
const ControlPath = "/dev/mapper/control"

// Client is an open dm control device. Its methods are safe for concurrent
// use: every call is one ioctl, and the kernel serialises what must be.
type Client struct {
	f       *os.File
	version [3]uint32
}

// Open opens the dm control node and checks the kernel's interface version.
// Where the node is missing (no devtmpfs, a container with a bare /dev) it is
// made from the misc minor in /proc/misc.
func Open() (*Client, error) {
	f, err := os.OpenFile(ControlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		f, err = openControlFromMisc()
	}
	if err != nil {
		return nil, fmt.Errorf("open dm control: %w", err)
	}
	c := &Client{f: f}
	resp, err := c.do(&request{cmd: unix.DM_VERSION, op: "version"})
	if err != nil {
		f.Close()
		return nil, err
	}
	c.version = resp.hdr.Version
	if c.version[0] != 4 {
		f.Close()
		return nil, fmt.Errorf("dm ioctl interface %d.%d.%d: only 4.x is supported", c.version[0], c.version[1], c.version[2])
	}
	return c, nil
}

func openControlFromMisc() (*os.File, error) {
	misc, err := os.ReadFile("/proc/misc")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(misc), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[1] == "device-mapper" {
			minor, err := strconv.ParseUint(f[0], 10, 32)
			if err != nil {
				break
			}
			if err := os.MkdirAll(filepath.Dir(ControlPath), 0o755); err != nil {
				return nil, err
			}
			if err := unix.Mknod(ControlPath, unix.S_IFCHR|0o600, int(unix.Mkdev(10, uint32(minor)))); err != nil && !errors.Is(err, unix.EEXIST) {
				return nil, fmt.Errorf("mknod %s: %w", ControlPath, err)
			}
			return os.OpenFile(ControlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
		}
	}
	return nil, fmt.Errorf("%s is missing and /proc/misc has no device-mapper: is dm-mod loaded?", ControlPath)
}

// Close closes the control device.
func (c *Client) Close() error { return c.f.Close() }

func (c *Client) do(r *request) (*response, error) {
	return do(int(c.f.Fd()), r)
}

// Version is the kernel's dm ioctl interface version (major, minor, patch).
func (c *Client) Version() [3]uint32 { return c.version }

// SupportsDeferredRemove reports whether the kernel knows deferred removal
// (interface 4.27 and later).
func (c *Client) SupportsDeferredRemove() bool { return c.version[1] >= 27 }

// DeviceInfo is what the kernel reports about one dm device.
type DeviceInfo struct {
	Name string
	UUID string
	Dev  Dev
	// OpenCount is how many openers hold the device.
	OpenCount int32
	// TargetCount is the number of targets in the live table.
	TargetCount uint32
	// EventNr counts the events the device's targets raised.
	EventNr         uint32
	Suspended       bool
	ReadOnly        bool
	LiveTable       bool // DM_ACTIVE_PRESENT
	InactiveTable   bool // a table is loaded but not yet live
	DeferredRemove  bool // a deferred removal is pending
	InternalSuspend bool
}

func infoFrom(h *unix.DmIoctl) DeviceInfo {
	return DeviceInfo{
		Name:            cString(h.Name[:]),
		UUID:            cString(h.Uuid[:]),
		Dev:             Dev(h.Dev),
		OpenCount:       h.Open_count,
		TargetCount:     h.Target_count,
		EventNr:         h.Event_nr,
		Suspended:       h.Flags&unix.DM_SUSPEND_FLAG != 0,
		ReadOnly:        h.Flags&unix.DM_READONLY_FLAG != 0,
		LiveTable:       h.Flags&unix.DM_ACTIVE_PRESENT_FLAG != 0,
		InactiveTable:   h.Flags&unix.DM_INACTIVE_PRESENT_FLAG != 0,
		DeferredRemove:  h.Flags&unix.DM_DEFERRED_REMOVE != 0,
		InternalSuspend: h.Flags&unix.DM_INTERNAL_SUSPEND_FLAG != 0,
	}
}

// Create makes a new dm device with no table. The name must be unique and at
// most 127 bytes; the UUID unique, at most 128 bytes and start with
// UUIDPrefix, so that a listing tells our devices from everyone else's.
// EEXIST when either is taken.
func (c *Client) Create(name, uuid string) (DeviceInfo, error) {
	if name == "" {
		return DeviceInfo{}, &Error{Op: "create", Err: fmt.Errorf("%w: empty name", ErrInvalid)}
	}
	if !Owned(uuid) || len(uuid) == len(UUIDPrefix) {
		return DeviceInfo{}, &Error{Op: "create", Device: name, Err: fmt.Errorf("%w: uuid %q must start with %q", ErrInvalid, uuid, UUIDPrefix)}
	}
	if err := checkText("name", name); err != nil {
		return DeviceInfo{}, &Error{Op: "create", Device: name, Err: err}
	}
	if err := checkText("uuid", uuid); err != nil {
		return DeviceInfo{}, &Error{Op: "create", Device: name, Err: err}
	}
	if strings.Contains(name, "/") || name == "." || name == ".." {
		return DeviceInfo{}, &Error{Op: "create", Device: name, Err: fmt.Errorf("%w: name %q cannot be a /dev/mapper file name", ErrInvalid, name)}
	}
	resp, err := c.do(&request{cmd: unix.DM_DEV_CREATE, op: "create", name: name, uuid: uuid})
	if err != nil {
		return DeviceInfo{}, err
	}
	return infoFrom(&resp.hdr), nil
}

// Info returns the state of the device with number dev. ENXIO if there is
// no such device.
func (c *Client) Info(dev Dev) (DeviceInfo, error) {
	resp, err := c.do(&request{cmd: unix.DM_DEV_STATUS, op: "info", dev: dev})
	if err != nil {
		return DeviceInfo{}, err
	}
	return infoFrom(&resp.hdr), nil
}

// InfoByName returns the state of the device called name. ENXIO if there is
// none.
func (c *Client) InfoByName(name string) (DeviceInfo, error) {
	if name == "" {
		return DeviceInfo{}, &Error{Op: "info", Err: fmt.Errorf("%w: empty name", ErrInvalid)}
	}
	resp, err := c.do(&request{cmd: unix.DM_DEV_STATUS, op: "info", name: name})
	if err != nil {
		return DeviceInfo{}, err
	}
	return infoFrom(&resp.hdr), nil
}

// ListEntry is one device in a listing.
type ListEntry struct {
	Name    string
	Dev     Dev
	UUID    string // empty where the kernel does not report UUIDs in lists (before 4.46)
	EventNr uint32
}

// List returns every dm device on the system.
func (c *Client) List() ([]ListEntry, error) {
	// DM_UUID_FLAG asks for each device's UUID (kernels from 4.46 on).
	resp, err := c.do(&request{cmd: unix.DM_LIST_DEVICES, op: "list", flags: unix.DM_UUID_FLAG, outSize: 16 << 10})
	if err != nil {
		return nil, err
	}
	return parseNameList(resp.data)
}

func parseNameList(b []byte) ([]ListEntry, error) {
	var out []ListEntry
	ne := binary.NativeEndian
	for off := 0; ; {
		if len(b)-off < nameListHeaderSize {
			// No devices: the kernel writes a single zeroed record, or, on
			// a system that has never had a dm device, nothing at all.
			if len(out) == 0 && (len(b) == off || len(b)-off >= 8 && ne.Uint64(b[off:]) == 0) {
				return nil, nil
			}
			return nil, fmt.Errorf("%w device list: record at %d is truncated", ErrParse, off)
		}
		dev := ne.Uint64(b[off:])
		next := int(ne.Uint32(b[off+8:]))
		if dev == 0 && len(out) == 0 {
			return nil, nil
		}
		end := len(b)
		if next != 0 {
			end = off + next
		}
		if end > len(b) || end < off+nameListHeaderSize {
			return nil, fmt.Errorf("%w device list: record at %d has next %d", ErrParse, off, next)
		}
		rec := b[off:end]
		nameEnd := nameListHeaderSize
		for nameEnd < len(rec) && rec[nameEnd] != 0 {
			nameEnd++
		}
		e := ListEntry{Name: string(rec[nameListHeaderSize:nameEnd]), Dev: Dev(dev)}
		// After the name's NUL, aligned to 8: u32 event_nr, u32 flags, uuid.
		extra := (nameEnd + 1 + 7) &^ 7
		if extra+8 <= len(rec) {
			e.EventNr = ne.Uint32(rec[extra:])
			if ne.Uint32(rec[extra+4:])&unix.DM_NAME_LIST_FLAG_HAS_UUID != 0 {
				e.UUID = cString(rec[extra+8:])
			}
		}
		out = append(out, e)
		if next == 0 {
			return out, nil
		}
		off = end
	}
}

// Load loads table as the device's inactive table; Resume makes it live.
// The targets must be contiguous from sector 0.
func (c *Client) Load(dev Dev, table []Target) error {
	payload, err := marshalTable(table)
	if err != nil {
		return &Error{Op: "load", Device: dev.String(), Err: err}
	}
	_, err = c.do(&request{cmd: unix.DM_TABLE_LOAD, op: "load", dev: dev, payload: payload, targets: len(table)})
	return err
}

func marshalTable(table []Target) ([]byte, error) {
	if len(table) == 0 {
		return nil, fmt.Errorf("%w: a table needs at least one target", ErrInvalid)
	}
	var buf []byte
	var next uint64
	ne := binary.NativeEndian
	for i, t := range table {
		if t.StartSector != next {
			return nil, fmt.Errorf("%w: target %d starts at sector %d, want %d", ErrInvalid, i, t.StartSector, next)
		}
		if t.LengthSectors == 0 {
			return nil, fmt.Errorf("%w: target %d has length 0", ErrInvalid, i)
		}
		if t.Type == "" || len(t.Type) > maxTypeLen {
			return nil, fmt.Errorf("%w: target %d type %q", ErrInvalid, i, t.Type)
		}
		if err := checkText("target params", t.Params); err != nil {
			return nil, err
		}
		next = t.StartSector + t.LengthSectors
		size := (targetSpecSize + len(t.Params) + 1 + 7) &^ 7
		spec := make([]byte, size)
		ne.PutUint64(spec[0:], t.StartSector)
		ne.PutUint64(spec[8:], t.LengthSectors)
		// status (s32) at 16 is output only.
		ne.PutUint32(spec[20:], uint32(size)) // next: relative to this spec when loading
		copy(spec[24:24+maxTypeLen], t.Type)
		copy(spec[targetSpecSize:], t.Params)
		buf = append(buf, spec...)
	}
	return buf, nil
}

// ClearTable drops the device's inactive table.
func (c *Client) ClearTable(dev Dev) error {
	_, err := c.do(&request{cmd: unix.DM_TABLE_CLEAR, op: "clear", dev: dev})
	return err
}

// SuspendFlags modify Suspend.
type SuspendFlags uint32

const (
	// NoFlush leaves I/O in flight queued rather than completing it first.
	NoFlush SuspendFlags = unix.DM_NOFLUSH_FLAG
	// NoLockFS skips freezing the filesystem on the device.
	NoLockFS SuspendFlags = unix.DM_SKIP_LOCKFS_FLAG
)

// udevCookie's flags go, shifted into a flags-only udev cookie, with resume and
// remove: they tell the dm udev rules to skip the disk rules (blkid, by-uuid
// links and the inotify watch whose opens make removals fail with EBUSY)
// and the other rules, while /dev/mapper links are still made. No semaphore
// is involved, so nothing waits on udev.
const udevCookie = (0x0004 | 0x0008) << 16

// Suspend suspends the device: new I/O is queued until Resume. Without
// NoLockFS a filesystem on it is frozen first; without NoFlush I/O in flight
// completes first.
func (c *Client) Suspend(dev Dev, flags SuspendFlags) error {
	_, err := c.do(&request{cmd: unix.DM_DEV_SUSPEND, op: "suspend", dev: dev, flags: unix.DM_SUSPEND_FLAG | uint32(flags)})
	return err
}

// Resume makes a loaded inactive table live (if there is one) and resumes
// I/O.
func (c *Client) Resume(dev Dev) error {
	_, err := c.do(&request{cmd: unix.DM_DEV_SUSPEND, op: "resume", dev: dev, eventNr: udevCookie})
	return err
}

// Remove removes the device. EBUSY while it is open; with deferred, an open
// device is instead marked and removed by the kernel when its last opener
// closes it (and Remove returns nil). ENXIO if there is no such device.
func (c *Client) Remove(dev Dev, deferred bool) error {
	var flags uint32
	if deferred {
		flags = unix.DM_DEFERRED_REMOVE
	}
	_, err := c.do(&request{cmd: unix.DM_DEV_REMOVE, op: "remove", dev: dev, flags: flags, eventNr: udevCookie})
	return err
}

// CancelDeferredRemove withdraws a pending deferred removal, so a device that
// is about to be used again is not removed under its new user. It is not an
// error when none is pending; EBUSY when the removal has already begun,
// ENXIO when the device is gone.
func (c *Client) CancelDeferredRemove(dev Dev) error {
	_, err := c.message(dev, 0, "@cancel_deferred_remove")
	return err
}

// Table returns the device's live table as the kernel prints it back
// (devices as major:minor).
func (c *Client) Table(dev Dev) ([]Target, error) {
	return c.tableStatus(dev, "table", unix.DM_STATUS_TABLE_FLAG)
}

// Status returns the status line of each target of the live table. With
// noFlush the thin-pool does not commit its metadata first: use it for
// polling, which would otherwise force a commit on every read.
func (c *Client) Status(dev Dev, noFlush bool) ([]Target, error) {
	var flags uint32
	if noFlush {
		flags = unix.DM_NOFLUSH_FLAG
	}
	return c.tableStatus(dev, "status", flags)
}

func (c *Client) tableStatus(dev Dev, op string, flags uint32) ([]Target, error) {
	resp, err := c.do(&request{cmd: unix.DM_TABLE_STATUS, op: op, dev: dev, flags: flags, outSize: 4 << 10})
	if err != nil {
		return nil, err
	}
	t, err := parseTargetSpecs(resp.data, int(resp.hdr.Target_count))
	if err != nil {
		return nil, &Error{Op: op, Device: dev.String(), Err: err}
	}
	return t, nil
}

// parseTargetSpecs reads specs written by the kernel, whose next fields are
// offsets from the first spec.
func parseTargetSpecs(b []byte, count int) ([]Target, error) {
	ne := binary.NativeEndian
	out := make([]Target, 0, count)
	off := 0
	for i := 0; i < count; i++ {
		if off+targetSpecSize > len(b) {
			return nil, fmt.Errorf("%w target spec %d at %d: truncated", ErrParse, i, off)
		}
		s := b[off:]
		out = append(out, Target{
			StartSector:   ne.Uint64(s[0:]),
			LengthSectors: ne.Uint64(s[8:]),
			Type:          cString(s[24:targetSpecSize]),
			Params:        cString(s[targetSpecSize:]),
		})
		next := int(ne.Uint32(s[20:]))
		if i+1 < count && next <= off {
			return nil, fmt.Errorf("%w target spec %d: next %d does not move forward", ErrParse, i, next)
		}
		off = next
	}
	return out, nil
}

// Message sends a typed message to the target at sector 0 of the device
// (for a thin-pool, the pool itself).
func (c *Client) Message(dev Dev, m Message) error {
	_, err := c.message(dev, 0, m.String())
	return err
}

// SendMessage sends a raw message to the target at sector and returns its
// answer, for the few messages that answer (DM_DATA_OUT).
func (c *Client) SendMessage(dev Dev, sector uint64, text string) (string, error) {
	return c.message(dev, sector, text)
}

func (c *Client) message(dev Dev, sector uint64, text string) (string, error) {
	op := "message " + strconv.Quote(text)
	if err := checkText("message", text); err != nil || text == "" {
		if err == nil {
			err = fmt.Errorf("%w: empty message", ErrInvalid)
		}
		return "", &Error{Op: op, Device: dev.String(), Err: err}
	}
	payload := make([]byte, targetMsgHeaderSize+len(text)+1)
	binary.NativeEndian.PutUint64(payload, sector)
	copy(payload[targetMsgHeaderSize:], text)
	resp, err := c.do(&request{cmd: unix.DM_TARGET_MSG, op: op, dev: dev, payload: payload, outSize: 1 << 10})
	if err != nil {
		return "", err
	}
	if resp.hdr.Flags&unix.DM_DATA_OUT_FLAG != 0 {
		return cString(resp.data), nil
	}
	return "", nil
}

// TargetVersion is a loaded target type and its version.
type TargetVersion struct {
	Name    string
	Version [3]uint32
}

// TargetVersions lists the target types the kernel has loaded.
func (c *Client) TargetVersions() ([]TargetVersion, error) {
	resp, err := c.do(&request{cmd: unix.DM_LIST_VERSIONS, op: "versions", outSize: 4 << 10})
	if err != nil {
		return nil, err
	}
	ne := binary.NativeEndian
	var out []TargetVersion
	b := resp.data
	for off := 0; off+targetVersionsHeaderSize <= len(b); {
		r := b[off:]
		out = append(out, TargetVersion{
			Name:    cString(r[targetVersionsHeaderSize:]),
			Version: [3]uint32{ne.Uint32(r[4:]), ne.Uint32(r[8:]), ne.Uint32(r[12:])},
		})
		next := int(ne.Uint32(r))
		if next == 0 {
			break
		}
		if next < targetVersionsHeaderSize {
			return nil, &Error{Op: "versions", Err: fmt.Errorf("%w: record at %d has next %d", ErrParse, off, next)}
		}
		off += next
	}
	return out, nil
}

// maxPollWait bounds one poll so a missed wake-up costs at most this long.
const maxPollWait = 200 * time.Millisecond

// pollTimeout is poll(2)'s timeout in milliseconds for one wait: never
// negative, because a negative timeout makes poll wait forever, and a
// deadline that passed between the context check and the poll must not.
func pollTimeout(ctx context.Context, now time.Time) int {
	wait := maxPollWait
	if d, ok := ctx.Deadline(); ok {
		wait = min(d.Sub(now), wait)
	}
	if wait <= 0 {
		return 0
	}
	// Round up so a sub-millisecond remainder still sleeps instead of spinning.
	return int((wait + time.Millisecond - 1) / time.Millisecond)
}

// WaitEvent blocks until the device's event counter differs from eventNr
// (a thin-pool raises an event when it passes its low water mark, runs out
// of space or changes mode) and returns its new state. Unlike the kernel's
// DEV_WAIT, it honours ctx: it sleeps in poll(2) on a control descriptor of
// its own, armed with DEV_ARM_POLL, which wakes on any dm event.
func (c *Client) WaitEvent(ctx context.Context, dev Dev, eventNr uint32) (DeviceInfo, error) {
	f, err := os.OpenFile(c.f.Name(), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return DeviceInfo{}, fmt.Errorf("open dm control for waiting: %w", err)
	}
	defer f.Close()
	fd := int(f.Fd())
	for {
		// Arm first, then look: an event between the two still wakes poll.
		if _, err := do(fd, &request{cmd: unix.DM_DEV_ARM_POLL, op: "arm poll"}); err != nil {
			return DeviceInfo{}, err
		}
		info, err := c.Info(dev)
		if err != nil {
			return DeviceInfo{}, err
		}
		if info.EventNr != eventNr {
			return info, nil
		}
		if err := ctx.Err(); err != nil {
			return DeviceInfo{}, err
		}
		_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, pollTimeout(ctx, time.Now()))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return DeviceInfo{}, &Error{Op: "poll", Device: dev.String(), Err: err}
		}
	}
}
