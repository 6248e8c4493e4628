// Command payload is what the package's VM tests run in the guest. Its first
// argument picks a behaviour:
//
//	exit N     print a few lines (one without a trailing newline) and exit N
//	dmcheck    exit 0 if device-mapper is there (/dev/mapper/control exists
//	           and /proc/misc lists device-mapper), 1 otherwise; then run
//	           each further argument as a command, failing if one fails
//	hang       print "hanging" and sleep forever
//	panic      crash the kernel through /proc/sysrq-trigger
//	orphan     leave orphanChildren children running that hold stdout
//	           open, and exit 0
//	env        print the environment, the working directory and the args
//	disk-write SERIAL
//	           list the virtio disks (vdX=serial), write a pattern at the
//	           start of the disk with that serial and fsync it, write
//	           another at 1 MiB without fsync (the flusher is never woken
//	           and the disk stays open, so it stays in the page cache),
//	           print "synced" with Emit and wait for the power cut
//	disk-read SERIAL
//	           after the cut: exit 0 if the fsync'd pattern is there and
//	           the unsynced one was lost with the page cache, 1 otherwise
package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: payload exit N | dmcheck | hang | panic | orphan | env")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "exit":
		code, err := strconv.Atoi(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("line one")
		fmt.Fprintln(os.Stderr, "line two on stderr")
		fmt.Println("--- FAIL: NotReallyATest (0.00s)")
		fmt.Print("last line without newline")
		os.Exit(code)
	case "dmcheck":
		ok := true
		if _, err := os.Stat("/dev/mapper/control"); err != nil {
			fmt.Println("no /dev/mapper/control:", err)
			ok = false
		}
		misc, err := os.ReadFile("/proc/misc")
		if err != nil || !bytes.Contains(misc, []byte(" device-mapper\n")) {
			fmt.Printf("/proc/misc does not list device-mapper (err %v):\n%s", err, misc)
			ok = false
		}
		mods, _ := os.ReadFile("/proc/modules")
		if !bytes.Contains(mods, []byte("dm_thin_pool ")) {
			fmt.Printf("dm_thin_pool is not loaded; /proc/modules:\n%s", mods)
			ok = false
		}
		if !ok {
			os.Exit(1)
		}
		fmt.Println("device-mapper ok")
		for _, c := range os.Args[2:] {
			f := strings.Fields(c)
			cmd := exec.Command(f[0], f[1:]...)
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			if err := cmd.Run(); err != nil {
				fmt.Printf("%s: %v\n", c, err)
				os.Exit(1)
			}
		}
	case "hang":
		fmt.Println("hanging")
		for {
			time.Sleep(time.Hour)
		}
	case "panic":
		fmt.Println("crashing the kernel")
		if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		time.Sleep(time.Minute)
	case "orphan":
		for range orphanChildren {
			cmd := exec.Command("sleep", "1000")
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			if err := cmd.Start(); err != nil {
				fmt.Println(err)
				os.Exit(1)
			}
		}
		fmt.Println("orphaned", orphanChildren)
	case "env":
		wd, _ := os.Getwd()
		fmt.Println("wd=" + wd)
		for _, a := range os.Args[2:] {
			fmt.Printf("arg=%q\n", a)
		}
		for _, kv := range os.Environ() {
			fmt.Println("env=" + kv)
		}
	case "disk-write":
		if err := diskWrite(os.Args[2]); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		for {
			time.Sleep(time.Hour)
		}
	case "disk-read":
		if err := diskRead(os.Args[2]); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("read back ok")
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}

// orphanChildren is how many children orphan leaves. Many: each one's death
// sends the guest's /init a SIGCHLD while it writes the exit marker, and
// with one child a mishandled signal there lost the marker too rarely for
// the test to notice (with 20, in 3 of 9 loaded runs).
const orphanChildren = 20

const (
	syncedOff   = 0
	unsyncedOff = 1 << 20
	patternLen  = 64 << 10
)

func diskPattern(seed byte) []byte {
	b := make([]byte, patternLen)
	for i := range b {
		b[i] = seed + byte(i%253)
	}
	return b
}

func diskWrite(serial string) error {
	serials, _ := filepath.Glob("/sys/block/vd*/serial")
	for _, p := range serials {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := vmtest.Emit("disk " + filepath.Base(filepath.Dir(p)) + "=" + strings.TrimSpace(string(b))); err != nil {
			return err
		}
	}
	// What is not fsync'd must stay in the page cache until the cut, so
	// the flusher must never run. Writing 0 here would stop the periodic
	// writeback but wake the flusher at once each time the disk goes from
	// clean to dirty, and the flusher writes a disk back in the background
	// when it is over its share of the background threshold: a share in
	// proportion to the writeback it has completed lately, which on a disk
	// just booted is nothing, so any dirty page is over it. Under load the
	// flusher ran while the unsynced pattern was dirty and wrote it out.
	// A day instead: the first dirtying arms a wakeup that never comes
	// while this VM lives, and nothing dirty counts as old. (It is set
	// before the disk holds anything dirty; a change of the interval wakes
	// the flusher for the disks that do.)
	for _, kv := range [][2]string{{"dirty_writeback_centisecs", "8640000"}, {"dirty_expire_centisecs", "8640000"}} {
		if err := os.WriteFile("/proc/sys/vm/"+kv[0], []byte(kv[1]), 0); err != nil {
			return err
		}
	}
	dev, err := vmtest.DiskBySerial(serial)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	// The last close of a block device writes its dirty pages back, and
	// the garbage collector closes an unreachable *os.File: keep it.
	heldDisk = f
	if _, err := f.WriteAt(diskPattern(1), syncedOff); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if _, err := f.WriteAt(diskPattern(2), unsyncedOff); err != nil {
		return err
	}
	return vmtest.Emit("synced " + dev)
}

// heldDisk is the disk disk-write writes to, open until the power cut.
var heldDisk *os.File

func diskRead(serial string) error {
	dev, err := vmtest.DiskBySerial(serial)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(dev)
	if err != nil {
		return err
	}
	if len(b) < unsyncedOff+patternLen {
		return fmt.Errorf("%s holds %d bytes", dev, len(b))
	}
	if !bytes.Equal(b[syncedOff:syncedOff+patternLen], diskPattern(1)) {
		return fmt.Errorf("%s: the fsync'd pattern is not there", dev)
	}
	if !bytes.Equal(b[unsyncedOff:unsyncedOff+patternLen], make([]byte, patternLen)) {
		return fmt.Errorf("%s: the pattern that was never fsync'd survived the power cut", dev)
	}
	return nil
}
