//go:build vmtest

package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The SIGKILL test's reports on a failure (what a failed call's devices
// hold and who holds them, the server's log lines on its objects) and its
// helpers that read the kernel's state.

// diagnose describes what the volumes of a failed call hold: the start of
// their devices, as the driver's probe reads it.
func (r *killRun) diagnose(op *kOp) string {
	r.failedMu.Lock()
	for _, o := range op.objs {
		r.failedNames = append(r.failedNames, o.name)
	}
	r.failedMu.Unlock()
	var b strings.Builder
	b.WriteString(r.m.history(op))
	for _, o := range op.objs {
		if o.snap {
			continue
		}
		buf := make([]byte, 4096)
		info, err := r.k.InfoByName("dmthin-" + o.pool + "-" + o.name)
		if err != nil {
			fmt.Fprintf(&b, "\n\t%s: %v", o.id, err)
			continue
		}
		node, err := r.k.DeviceNode(info.Dev) // no udev in the VM: no /dev/mapper links
		if err != nil {
			fmt.Fprintf(&b, "\n\t%s: %v", o.id, err)
			continue
		}
		fmt.Fprintf(&b, "\n\t%s is %s (%s): open count %d, deferred remove %v, suspended %v; %s", o.id, node, info.Dev, info.OpenCount, info.DeferredRemove, info.Suspended, whoHolds(info.Dev))
		f, err := os.Open(node)
		if err != nil {
			fmt.Fprintf(&b, "\n\t%s: %v", o.id, err)
			continue
		}
		_, err = f.ReadAt(buf, 0)
		f.Close()
		if err != nil {
			fmt.Fprintf(&b, "\n\t%s: %v", o.id, err)
			continue
		}
		switch {
		case string(buf[:4]) == "XFSB":
			// struct xfs_dsb: sb_inprogress at byte 126, set by mkfs.xfs
			// until it has finished.
			fmt.Fprintf(&b, "\n\t%s holds an XFS superblock with sb_inprogress=%d", o.id, buf[126])
		case buf[1024+56] == 0x53 && buf[1024+57] == 0xef:
			fmt.Fprintf(&b, "\n\t%s holds an ext superblock", o.id)
		default:
			fmt.Fprintf(&b, "\n\t%s starts with %x", o.id, buf[:16])
		}
	}
	return b.String()
}

// whoHolds says what has dev open: mounts of it, its holders in sysfs, and
// processes with a descriptor on it.
func whoHolds(dev devmapper.Dev) string {
	var out []string
	for mp, d := range mountinfo() {
		if d == dev.String() {
			out = append(out, "mounted at "+mp)
		}
	}
	if hs, err := os.ReadDir(fmt.Sprintf("/sys/dev/block/%s/holders", dev)); err == nil {
		for _, h := range hs {
			out = append(out, "held by "+h.Name())
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(filepath.Join("/proc", p.Name(), "fd", fd.Name()), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && devmapper.Dev(st.Rdev) == dev {
				comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
				out = append(out, fmt.Sprintf("open in pid %s (%s)", p.Name(), strings.TrimSpace(string(comm))))
			}
		}
	}
	// A filesystem the kernel still has on it, mounted or not (a detached
	// mount keeps its superblock).
	for _, fs := range []string{"ext4", "xfs"} {
		if name, err := sysfsName(dev); err == nil {
			if _, err := os.Stat(filepath.Join("/sys/fs", fs, name)); err == nil {
				out = append(out, "an "+fs+" superblock is alive on it (/sys/fs/"+fs+"/"+name+")")
			}
		}
	}
	self, _ := os.Readlink("/proc/self/ns/mnt")
	for _, p := range procs {
		if cmdline, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline")); len(cmdline) == 0 {
			continue // a kernel thread (kdevtmpfs has its own namespace)
		}
		if ns, err := os.Readlink(filepath.Join("/proc", p.Name(), "ns/mnt")); err == nil && ns != self {
			comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
			out = append(out, fmt.Sprintf("pid %s (%s) is in another mount namespace", p.Name(), strings.TrimSpace(string(comm))))
		}
	}
	if len(out) == 0 {
		return "no mount, holder, filesystem or process has it open"
	}
	return strings.Join(out, ", ")
}

// sysfsName is the kernel's name of a block device (dm-3).
func sysfsName(dev devmapper.Dev) (string, error) {
	l, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%s", dev))
	if err != nil {
		return "", err
	}
	return filepath.Base(l), nil
}

// grepLog returns the last n lines of the log that start a server, report
// a failed call or name one of the objects.
func grepLog(path string, names []string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	var keep []string
	for _, l := range strings.Split(string(b), "\n") {
		match := strings.HasPrefix(l, "=== start") || strings.Contains(l, `"Call failed"`) || strings.HasPrefix(l, "E")
		for _, name := range names {
			match = match || nameRE(name).MatchString(l)
		}
		if match {
			keep = append(keep, l)
		}
	}
	if len(keep) > n {
		keep = keep[len(keep)-n:]
	}
	return strings.Join(keep, "\n")
}

// nameRE matches an object's name and not a longer one (vol-13, not vol-132).
func nameRE(name string) *regexp.Regexp {
	return regexp.MustCompile(`/` + regexp.QuoteMeta(name) + `\b`)
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// mountinfo maps each mount point to its device (major:minor).
func mountinfo() map[string]string {
	out := map[string]string{}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fl := strings.Fields(sc.Text()); len(fl) > 4 {
			out[fl[4]] = fl[2]
		}
	}
	return out
}

func mountsUnder(dir string) []string {
	var out []string
	for p := range mountinfo() {
		if strings.HasPrefix(p, dir+"/") {
			out = append(out, p)
		}
	}
	return out
}

// removePool removes a pool's dm devices, volumes first, so the kernel is
// left clean; its loop devices clear themselves.
func removePool(t *testing.T, k *thinpool.HostKernel, pool string) {
	list, err := k.List()
	if err != nil {
		t.Error(err)
		return
	}
	for _, d := range list {
		if strings.HasPrefix(d.Name, "dmthin-"+pool+"-") {
			if err := k.Remove(d.Dev, false); err != nil {
				t.Errorf("remove %s: %v", d.Name, err)
			}
		}
	}
	if info, err := k.InfoByName("dmthin-" + pool); err == nil {
		if err := k.Remove(info.Dev, false); err != nil {
			t.Errorf("remove dmthin-%s: %v", pool, err)
		}
	} else if !errors.Is(err, unix.ENXIO) {
		t.Error(err)
	}
}
