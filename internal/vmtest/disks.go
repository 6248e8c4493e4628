package vmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Disk is a host file that the guest sees as a virtio-blk disk.
type Disk struct {
	// Path is a raw image on the host (no qcow2: what the guest writes is
	// what the file holds). It must exist; its size is the disk's size.
	Path string
	// Serial is what the guest reads from /sys/block/vdX/serial: 1 to 20
	// (virtio-blk carries 20 bytes) of [A-Za-z0-9._-], unique in a Spec.
	// Guests should find their disks by it (DiskBySerial), not by name.
	Serial string
}

// diskModules are what a guest needs to see virtio-blk disks on qemu's PCI
// bus; Debian builds all four as modules.
var diskModules = []string{"virtio", "virtio_ring", "virtio_pci", "virtio_blk"}

// firstDiskSlot is the PCI slot of the first disk; the others follow. With
// -nodefaults the machine's own devices take slots 0 to 2, and fixed slots
// keep the guest's probe order, hence vda, vdb..., the order of Spec.Disks.
const firstDiskSlot = 8

// maxDisks keeps the disks within the PCI bus's 32 slots.
const maxDisks = 16

var serialRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,20}$`)

// checkDisks validates Spec.Disks: existing regular files, valid and unique
// serials.
func checkDisks(disks []Disk) error {
	if len(disks) > maxDisks {
		return fmt.Errorf("vmtest: %d disks; at most %d", len(disks), maxDisks)
	}
	seen := map[string]bool{}
	for i, d := range disks {
		if !serialRE.MatchString(d.Serial) {
			return fmt.Errorf("vmtest: disk %d (%s): serial %q: want 1 to 20 of [A-Za-z0-9._-]", i, d.Path, d.Serial)
		}
		if seen[d.Serial] {
			return fmt.Errorf("vmtest: disk %d (%s): serial %q used twice", i, d.Path, d.Serial)
		}
		seen[d.Serial] = true
		fi, err := os.Stat(d.Path)
		if err != nil {
			return fmt.Errorf("vmtest: disk %d: %w", i, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("vmtest: disk %d: %s is not a regular file", i, d.Path)
		}
	}
	return nil
}

// diskCacheMode is qemu's cache= for every disk. The guest sees a volatile
// write cache (so its kernel sends flushes and FUA writes, as it would to a
// real disk with one) and qemu writes into the host's page cache and does
// not pass the flushes on to the host.
//
// What a power cut (Spec.Cut: SIGKILL of qemu) then models: the guest loses
// everything it held in memory, its own page cache included, at an instant
// it did not choose; requests qemu had not yet written are lost, and a
// multi-block write may be torn. What the disk had completed survives:
// the host's page cache outlives qemu, so every write the guest saw
// complete is in the image, flushed or not. That is a disk whose write cache
// survives the cut (battery-backed, or none). It does not model a disk that
// loses completed but unflushed writes, so a missing flush in the guest goes
// unnoticed unless the data was still in the guest's own page cache. Flushes
// to the host would change nothing here (the host does not crash), which is
// why they are skipped: cache=writeback would only add an fdatasync of the
// image on every guest flush.
const diskCacheMode = "unsafe"

// diskArgs is the qemu command line for the disks: a drive and a virtio-blk
// PCI device at a fixed slot each, in order.
func diskArgs(disks []Disk) []string {
	var args []string
	for i, d := range disks {
		id := "disk" + strconv.Itoa(i)
		args = append(args,
			"-drive", "if=none,id="+id+",format=raw,cache="+diskCacheMode+",file="+qemuOptValue(d.Path),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,serial=%s,addr=0x%x", id, d.Serial, firstDiskSlot+i),
		)
	}
	return args
}

// qemuOptValue escapes a value for qemu's key=value,... option syntax, in
// which a comma is written twice.
func qemuOptValue(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// withDiskModules returns the modules to load: mods, plus the virtio ones
// when there are disks.
func withDiskModules(mods []string, disks []Disk) []string {
	if len(disks) == 0 {
		return mods
	}
	out := append([]string(nil), mods...)
	for _, m := range diskModules {
		found := false
		for _, have := range mods {
			if normalizeModName(have) == m {
				found = true
			}
		}
		if !found {
			out = append(out, m)
		}
	}
	return out
}

// diskWaitScript is shell for the per-run script: wait until the guest has
// as many virtio disks as the Spec attached (the driver probes them as it
// loads, so this rarely waits), and say so if they do not come.
func diskWaitScript(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf(`vmtest_disks() { ls -d /sys/block/vd* 2>/dev/null | wc -l; }
vmtest_i=0
while [ "$(vmtest_disks)" -lt %d ] && [ $vmtest_i -lt 50 ]; do
	usleep 100000
	vmtest_i=$((vmtest_i+1))
done
[ "$(vmtest_disks)" -ge %d ] || say "only $(vmtest_disks) of %d virtio disks appeared"
`, n, n, n)
}

// DiskBySerial returns the device node (/dev/vdX) of the guest's disk with
// that serial (see Disk.Serial). It is for code running in the guest.
func DiskBySerial(serial string) (string, error) {
	paths, err := filepath.Glob("/sys/block/*/serial")
	if err != nil {
		return "", err
	}
	sort.Strings(paths)
	var seen []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		name := filepath.Base(filepath.Dir(p))
		if s == serial {
			return "/dev/" + name, nil
		}
		seen = append(seen, name+"="+s)
	}
	return "", fmt.Errorf("vmtest: no disk with serial %q (disks: %s)", serial, strings.Join(seen, ", "))
}
