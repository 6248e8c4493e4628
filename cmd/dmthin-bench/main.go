// Command dmthin-bench measures csi-dmthin's kernel-facing operations on a
// real dm-thin pool and prints a table of medians, beside the same operations
// done with the dmsetup CLI and with lvm2's lvcreate on a pool of the same
// size, with the ratios.
//
// On the host it boots the qemu VM of internal/vmtest with itself as the
// payload (plus dmsetup and lvm, for the comparison only) and prints what
// the guest prints. All figures come from one VM run under TCG: compare the
// ratios, not the absolute times, which are about 10x a native machine's.
//
// Build it static (CGO_ENABLED=0): the VM has no C library. `make bench`
// does.
package main

import (
	"context"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// part is one table of the guest's run after the dm tables.
type part struct {
	name string
	run  func(a partArgs) error
}

// partArgs is what every part may use.
type partArgs struct {
	n         int    // iterations of each operation
	openSizes []int  // pool sizes to time opening
	diskDir   string // ext4 on the virtual disk, mounted ("" without one)
	driver    string // the csi-dmthin binary in the guest ("" without one)
}

// parts run in this order after the dm tables; -only names one.
var parts = []part{
	{name: "csi", run: func(a partArgs) error { return csiBench(a.n) }},
	{name: "pool", run: func(a partArgs) error { return poolBench(a.n, a.openSizes) }},
	{name: "freeze", run: func(a partArgs) error { return freezeBench(a.n) }},
	{name: "io", run: ioBench},
	{name: "streams", run: streamsBench},
	{name: "group", run: func(a partArgs) error { return groupBench(a.n, groupSizes) }},
}

// partNames lists what -only takes.
func partNames() []string {
	names := []string{"dm"}
	for _, p := range parts {
		names = append(names, p.name)
	}
	return names
}

func main() {
	guest := flag.Bool("guest", false, "run the measurements here (inside the VM); set by the host side")
	iterations := flag.Int("n", 20, "iterations of each operation")
	openMax := flag.Int("open", 10000, "largest pool to time opening (1000 and this many volumes)")
	out := flag.String("out", "", "folder to write table.md (the tables, with when, where and at what load they were taken) and samples.json (every timing) into; default bench-results/<UTC time>")
	diskSerial := flag.String("disk-serial", "", "(guest) the serial of the virtual disk to run the dm table on again; set by the host side")
	driver := flag.String("driver", "", "(guest) the csi-dmthin binary; set by the host side")
	only := flag.String("only", "", "run one part only: "+strings.Join(partNames(), ", "))
	flag.Parse()
	if *only != "" && !slices.Contains(partNames(), *only) {
		fmt.Fprintf(os.Stderr, "dmthin-bench: -only takes one of %s\n", strings.Join(partNames(), ", "))
		os.Exit(2)
	}
	if *iterations < 3 {
		fmt.Fprintln(os.Stderr, "dmthin-bench: -n must be at least 3")
		os.Exit(2)
	}
	if *guest {
		sizes := []int{1000}
		if *openMax > 1000 {
			sizes = append(sizes, *openMax)
		}
		if err := runGuest(*only, partArgs{n: *iterations, openSizes: sizes, driver: *driver}, *diskSerial); err != nil {
			fmt.Fprintln(os.Stderr, "dmthin-bench:", err)
			os.Exit(1)
		}
		return
	}
	if *out == "" {
		*out = filepath.Join("bench-results", time.Now().UTC().Format("2006-01-02T150405Z"))
	}
	if err := runHost(*iterations, *openMax, *only, *out); err != nil {
		fmt.Fprintln(os.Stderr, "dmthin-bench:", err)
		os.Exit(1)
	}
}

// The virtual disk of the dm table's second pass: room for every side's
// sparse pool files (three pools and lvm2's PV).
const (
	benchDiskBytes  = 40 << 30
	benchDiskSerial = "dmthin-bench"
)

func runHost(n, openMax int, only, outDir string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if err := checkStatic(exe); err != nil {
		return err
	}
	res, err := newResults(outDir)
	if err != nil {
		return err
	}
	defer res.close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Minute)
	defer cancel()
	fmt.Fprintln(os.Stderr, "dmthin-bench: booting the VM (Debian's kernel under TCG); the table follows")
	// A virtual disk for the dm table's second pass, pool files on ext4
	// rather than tmpfs (sparse: what the guest writes is what it takes).
	args := []string{"-guest", "-n", strconv.Itoa(n), "-only", only}
	files := map[string]string{}
	// The driver, for the parts that run it as its own process: built
	// beside this binary (make bench does).
	if drv := filepath.Join(filepath.Dir(exe), "csi-dmthin"); fileExists(drv) {
		if err := checkStatic(drv); err != nil {
			return err
		}
		files[guestDriver] = drv
		args = append(args, "-driver", guestDriver)
	}
	var disks []vmtest.Disk
	if only != "group" {
		img, err := os.MkdirTemp("", "dmthin-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(img)
		f, err := os.Create(filepath.Join(img, "disk.raw"))
		if err != nil {
			return err
		}
		err = errors.Join(f.Truncate(benchDiskBytes), f.Close())
		if err != nil {
			return err
		}
		disks = []vmtest.Disk{{Path: f.Name(), Serial: benchDiskSerial}}
		args = append(args, "-disk-serial", benchDiskSerial)
	}
	run, err := vmtest.Run(ctx, vmtest.Spec{
		Payload: exe,
		Args:    args,
		Disks:   disks,
		Files:   files,
		Tools:   []string{"dmsetup", "lvm", "mount", "umount", "blkid", "mkfs.ext4", "tune2fs", "resize2fs", "e2fsck", "fsck", "fsck.ext4"},
		// lvm2 checks for the snapshot target even for thin snapshots.
		Modules: append(append([]string(nil), vmtest.DefaultModules...), "dm-snapshot"),
		// The earlier tables' pools stay on the guest's tmpfs (their
		// devices hold the files) while the I/O part writes a gigabyte
		// more there: at 4 GiB its loop devices failed writes (EIO).
		MemoryMiB: 8192,
		Output:    res,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "dmthin-bench: VM prepared in %v, booted in %v, whole run %v\n",
		run.Prepare.Round(time.Millisecond), run.Boot.Round(time.Millisecond), run.Total.Round(time.Millisecond))
	if run.ExitCode != 0 {
		return fmt.Errorf("the guest exited with status %d", run.ExitCode)
	}
	if err := res.finish(); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "dmthin-bench: wrote %s and %s\n", res.tablePath, res.samplesPath)
	return nil
}

// guestDriver is where the guest finds the csi-dmthin binary.
const guestDriver = "/usr/local/bin/csi-dmthin"

func fileExists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

// checkStatic refuses a dynamically linked build, which cannot run in the VM.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0 (make bench does)", path)
		}
	}
	return nil
}
