package thinpool

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// A pool must never open on the wrong devices: device names change across
// reboots (/dev/nvme1n1 and /dev/nvme2n1 swap when the disks enumerate in
// another order), and a pool loaded with another pool's data device would
// hand one tenant's blocks to another. Three checks, from the cheapest:
//
//   - the serial (WWID, serial number, LV UUID) of each device, recorded when
//     the pool is made, where the device has one;
//   - the metadata device's superblock: this pool's block size and a
//     transaction id the records explain (checkSuperblock);
//   - the data device's marker: thin device 0, never handed out, holds one
//     block naming the pool, written when the pool is made. After the pool
//     is loaded it is read back through the pool, so it is read from
//     whatever data device the pool now has; any other pool's, or none, is
//     refused and the pool unloaded before anything writes to it.
//
// Making a pool refuses devices that hold anything recognisable: a
// filesystem, LVM, a partition table, another pool, or data in their first
// blocks, unless the configuration says to wipe them.

// markerDeviceID is the marker's thin id; volumes start at 1.
const markerDeviceID = 0

// markerMagic starts the marker block, so that `head -c 4096` of a data
// device tells what it is.
const markerMagic = "csi-dmthin pool marker\n"

// marker is what the marker block holds after the magic, as JSON.
type marker struct {
	Pool     string `json:"pool"`
	Identity string `json:"identity"`
}

func (p *Pool) markerDMName() string { return "dmthin-" + p.cfg.Name + "--marker" }

// encodeMarker is the marker block of the pool.
func (p *Pool) encodeMarker() []byte {
	b := make([]byte, 4096)
	j, _ := json.Marshal(marker{Pool: p.rec.Name, Identity: p.rec.Identity})
	copy(b, markerMagic)
	copy(b[len(markerMagic):], append(j, '\n'))
	return b
}

// decodeMarker reads a marker block; ok is false when b holds none.
func decodeMarker(b []byte) (m marker, ok bool) {
	rest, found := bytes.CutPrefix(b, []byte(markerMagic))
	if !found {
		return m, false
	}
	if i := bytes.IndexByte(rest, '\n'); i >= 0 {
		rest = rest[:i]
	}
	if err := json.Unmarshal(rest, &m); err != nil || m.Identity == "" {
		return m, false
	}
	return m, true
}

// withMarkerDevice activates thin device markerDeviceID read-write for f
// and removes it again, whatever f returns.
func (p *Pool) withMarkerDevice(f func(dev devmapper.Dev) error) (err error) {
	if err := p.removeMarkerDevice(); err != nil {
		return err
	}
	info, err := p.k.Create(p.markerDMName(), p.uuidPrefix()+"marker")
	if err != nil {
		return fmt.Errorf("create the marker device: %w", err)
	}
	defer func() {
		if rerr := p.k.Remove(info.Dev, false); rerr != nil && err == nil {
			err = fmt.Errorf("remove the marker device: %w", rerr)
		}
	}()
	sectors := uint64(p.rec.BlockSectors)
	if err := p.k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, sectors, devmapper.ThinParams{PoolDev: p.dev, DeviceID: markerDeviceID})}); err != nil {
		return fmt.Errorf("load the marker device: %w", err)
	}
	if err := p.k.Resume(info.Dev); err != nil {
		return fmt.Errorf("resume the marker device: %w", err)
	}
	return f(info.Dev)
}

// removeMarkerDevice removes a marker device that a failure or a crash
// left behind.
func (p *Pool) removeMarkerDevice() error {
	info, err := p.k.InfoByName(p.markerDMName())
	switch {
	case isENXIO(err):
		return nil
	case err != nil:
		return fmt.Errorf("look up the marker device: %w", err)
	case info.UUID != p.uuidPrefix()+"marker":
		return fmt.Errorf("%w: a dm device %s exists and is not this pool's (uuid %q)", ErrMismatch, p.markerDMName(), info.UUID)
	}
	if err := p.k.Remove(info.Dev, false); err != nil && !isENXIO(err) {
		return fmt.Errorf("remove the marker device left behind: %w", err)
	}
	return nil
}

// writeMarker makes thin device markerDeviceID and writes the marker to it.
// It is part of the pool's creation, before the first commit: a crash
// before that commit makes the pool again from scratch.
func (p *Pool) writeMarker() error {
	if err := p.k.Message(p.dev, devmapper.CreateThin{DeviceID: markerDeviceID}); err != nil {
		return fmt.Errorf("create the marker: %w", err)
	}
	p.step("create-pool:marker-created")
	return p.withMarkerDevice(func(dev devmapper.Dev) error {
		if err := p.k.WriteBlock(dev, 0, p.encodeMarker()); err != nil {
			return fmt.Errorf("write the marker: %w", err)
		}
		p.step("create-pool:marker-written")
		return nil
	})
}

// checkMarker reads the marker through the loaded pool and refuses a data
// device that is not this pool's.
func (p *Pool) checkMarker() error {
	buf := make([]byte, 4096)
	err := p.withMarkerDevice(func(dev devmapper.Dev) error { return p.k.ReadBlock(dev, 0, buf) })
	if err != nil {
		return fmt.Errorf("read the pool's marker: %w", err)
	}
	m, ok := decodeMarker(buf)
	switch {
	case !ok:
		return fmt.Errorf("%w: the data device %s does not hold this pool's marker (pool %s, identity %s): it is another device than the one the pool was made on", ErrMismatch, p.dataPath(), p.rec.Name, p.rec.Identity)
	case m.Identity != p.rec.Identity:
		return fmt.Errorf("%w: the data device %s holds the marker of pool %s (identity %s), not of pool %s (identity %s): devices were renamed or swapped", ErrMismatch, p.dataPath(), m.Pool, m.Identity, p.rec.Name, p.rec.Identity)
	}
	return nil
}

func (p *Pool) dataPath() string {
	if p.cfg.DataDevice != "" {
		return p.cfg.DataDevice
	}
	return p.cfg.DataFile
}

func (p *Pool) metadataPath() string {
	if p.cfg.MetadataDevice != "" {
		return p.cfg.MetadataDevice
	}
	return p.cfg.MetadataFile
}

// checkSerials compares the devices' serials with the recorded ones. A
// device recorded without one (it had none) is left to the marker.
func (p *Pool) checkSerials(data, meta devmapper.Dev) error {
	for _, d := range []struct {
		field, path, want string
		dev               devmapper.Dev
	}{
		{"dataDevice", p.dataPath(), p.rec.DataSerial, data},
		{"metadataDevice", p.metadataPath(), p.rec.MetadataSerial, meta},
	} {
		if d.want == "" {
			continue
		}
		got, err := p.k.Serial(d.dev)
		if err != nil {
			return fmt.Errorf("%s %s: %w", d.field, d.path, err)
		}
		if got != d.want {
			return fmt.Errorf("%w: %s %s is the disk with serial %q, but the pool was made on the disk with serial %q: devices were renamed or swapped (find it under /dev/disk/by-id)", ErrMismatch, d.field, d.path, got, d.want)
		}
	}
	return nil
}

// signatureBytes is how much of a device's start is read for signatures.
const signatureBytes = 128 << 10

// signatures names what a device's first blocks hold: filesystems, volume
// managers, partition tables, encryption, swap, a thin pool's metadata,
// another pool's marker, or, for anything else that is not zeros,
// "unrecognised data". Empty for a device that reads zeros.
func signatures(b []byte) []string {
	at := func(off int, magic string) bool {
		return off+len(magic) <= len(b) && string(b[off:off+len(magic)]) == magic
	}
	le16 := func(off int) uint16 {
		if off+2 > len(b) {
			return 0
		}
		return binary.LittleEndian.Uint16(b[off:])
	}
	var found []string
	add := func(s string) { found = append(found, s) }
	if _, ok := decodeMarker(b); ok {
		add("a csi-dmthin pool's marker")
	}
	if _, ok, _ := devmapper.ParseSuperblock(b); ok {
		add("a thin pool's metadata")
	}
	if le16(1024+0x38) == 0xEF53 {
		add("an ext2/3/4 filesystem")
	}
	if at(0, "XFSB") {
		add("an XFS filesystem")
	}
	if at(0x10040, "_BHRfS_M") {
		add("a btrfs filesystem")
	}
	for s := 0; s < 4; s++ {
		if at(s*512, "LABELONE") && at(s*512+24, "LVM2") {
			add("an LVM physical volume")
		}
	}
	if at(512, "EFI PART") {
		add("a GPT partition table")
	} else if le16(510) == 0xAA55 {
		add("an MBR partition table or boot sector")
	}
	if at(0, "LUKS\xba\xbe") {
		add("a LUKS header")
	}
	if at(4096-10, "SWAPSPACE2") || at(4096-10, "SWAP-SPACE") {
		add("swap")
	}
	if at(0x8001, "CD001") {
		add("an ISO 9660 filesystem")
	}
	if at(0, "hsqs") {
		add("a squashfs filesystem")
	}
	if at(4096+24, "\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81") {
		add("a bcache device")
	}
	if len(found) == 0 && bytes.ContainsFunc(b, func(r rune) bool { return r != 0 }) {
		add("unrecognised data (not zeros)")
	}
	return found
}

// checkEmpty refuses, unless the configuration says to wipe, devices that
// hold anything; with wipe it clears their first and last MiB (partition
// tables and RAID and ZFS labels keep copies at the end). ours tells a
// signature the pool itself left in a creation that a crash interrupted.
func (p *Pool) checkEmpty(devs []struct {
	field string
	dev   devmapper.Dev
	size  int64
}, ours func(sig string) bool) error {
	var problems []string
	var wipe []int
	for i, d := range devs {
		buf := make([]byte, min(int64(signatureBytes), d.size))
		if err := p.k.ReadBlock(d.dev, 0, buf); err != nil {
			return fmt.Errorf("read %s: %w", d.field, err)
		}
		var foreign []string
		for _, s := range signatures(buf) {
			if !ours(s) {
				foreign = append(foreign, s)
			}
		}
		if len(foreign) > 0 {
			problems = append(problems, fmt.Sprintf("%s holds %s", d.field, strings.Join(foreign, ", ")))
			wipe = append(wipe, i)
		}
	}
	if len(problems) == 0 {
		return nil
	}
	if !p.cfg.Wipe {
		return fmt.Errorf("%w: %s; a new pool is only made on empty devices: check they are the right ones, and set wipe: true to erase them", ErrMismatch, strings.Join(problems, "; "))
	}
	zero := make([]byte, 1<<20)
	for _, i := range wipe {
		d := devs[i]
		n := min(int64(len(zero)), d.size)
		if err := p.k.WriteBlock(d.dev, 0, zero[:n]); err != nil {
			return fmt.Errorf("wipe %s: %w", d.field, err)
		}
		if d.size > 2*n {
			end := (d.size - n) &^ 4095
			if err := p.k.WriteBlock(d.dev, end, zero[:n]); err != nil {
				return fmt.Errorf("wipe the end of %s: %w", d.field, err)
			}
		}
	}
	return nil
}

// isENXIO reports a device that does not exist.
func isENXIO(err error) bool { return errors.Is(err, unix.ENXIO) }
