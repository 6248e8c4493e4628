// Command dmthin-demo walks a person through csi-dmthin end to end, through
// the CSI API of the real driver on a real dm-thin pool: create a volume,
// stage and publish it (mkfs, mount), write, snapshot, restore the snapshot
// into a new volume, clone a volume, expand one online, read everything
// back, and delete it all; each step is printed with how long it took.
//
// Where the running kernel has device-mapper it runs here (as root, on loop
// files in a temporary directory); elsewhere it boots the qemu VM of
// internal/vmtest on Debian's kernel with itself as the payload. Build it
// static (CGO_ENABLED=0); `make demo` does.
package main

import (
	"bytes"
	"context"
	"debug/elf"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// tools the driver runs, copied into the VM.
var tools = []string{"mount", "umount", "blkid", "mkfs.ext4", "resize2fs", "e2fsck", "fsck", "fsck.ext4"}

func main() {
	here := flag.Bool("here", false, "run on this machine's kernel instead of deciding by itself")
	flag.Parse()
	var err error
	if *here || vmtest.InGuest() || kernelHasDM() {
		err = walk()
	} else {
		err = inVM()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dmthin-demo:", err)
		os.Exit(1)
	}
}

func kernelHasDM() bool {
	b, err := os.ReadFile("/proc/misc")
	return err == nil && bytes.Contains(b, []byte("device-mapper")) && os.Geteuid() == 0
}

func inVM() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if f, err := elf.Open(exe); err == nil {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				return fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0 (make demo does)", exe)
			}
		}
		f.Close()
	}
	fmt.Println("This kernel has no device-mapper: booting Debian's kernel in qemu (TCG) to run the demo there.")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := vmtest.Run(ctx, vmtest.Spec{Payload: exe, Args: []string{"-here"}, Tools: tools, Output: os.Stdout})
	if err != nil {
		return err
	}
	fmt.Printf("(VM: prepared in %v, booted in %v, whole run %v)\n", res.Prepare.Round(time.Millisecond), res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond))
	if res.ExitCode != 0 {
		return fmt.Errorf("the demo failed in the VM (exit status %d)", res.ExitCode)
	}
	return nil
}
