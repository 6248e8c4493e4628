// Command dmthin-demo walks through what csi-dmthin does underneath, on a
// real dm-thin pool: make a pool, a thin volume, a filesystem on it, write,
// snapshot while mounted, read the snapshot back, and clean up; each step is
// printed with how long it took.
//
// Where the running kernel has device-mapper it runs here (as root);
// elsewhere it boots the qemu VM of internal/vmtest on Debian's kernel with
// itself as the payload. Build it static (CGO_ENABLED=0); `make demo` does.
package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

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
	res, err := vmtest.Run(ctx, vmtest.Spec{Payload: exe, Args: []string{"-here"}, Tools: []string{"mkfs.ext4"}, Output: os.Stdout})
	if err != nil {
		return err
	}
	fmt.Printf("(VM: prepared in %v, booted in %v, whole run %v)\n", res.Prepare.Round(time.Millisecond), res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond))
	if res.ExitCode != 0 {
		return fmt.Errorf("the demo failed in the VM (exit status %d)", res.ExitCode)
	}
	return nil
}

// step runs one step and prints it with its duration.
func step(what string, fn func() (string, error)) error {
	start := time.Now()
	detail, err := fn()
	d := time.Since(start)
	if err != nil {
		fmt.Printf("  FAIL %-60s %9s  %v\n", what, d.Round(10*time.Microsecond), err)
		return fmt.Errorf("%s: %w", what, err)
	}
	fmt.Printf("  ok   %-60s %9s  %s\n", what, d.Round(10*time.Microsecond), detail)
	return nil
}

func walk() error {
	dir, err := os.MkdirTemp("", "dmthin-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	c, err := devmapper.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Printf("\ncsi-dmthin demo: a thin pool on loop files in %s (not for production), dm ioctl %v\n\n", dir, c.Version())

	var meta, data loop.Device
	var pool, vol, snap devmapper.DeviceInfo
	const poolBytes, volBytes = 2 << 30, 1 << 30
	volMnt, snapMnt := filepath.Join(dir, "volume"), filepath.Join(dir, "snapshot")
	cleanup := []func(){}
	defer func() {
		for i := len(cleanup) - 1; i >= 0; i-- {
			cleanup[i]()
		}
	}()
	steps := []struct {
		what string
		fn   func() (string, error)
	}{
		{"attach sparse loop files (16 MiB metadata, 2 GiB data)", func() (string, error) {
			if meta, err = sparse(filepath.Join(dir, "meta"), 16<<20); err != nil {
				return "", err
			}
			data, err = sparse(filepath.Join(dir, "data"), poolBytes)
			return meta.Path + ", " + data.Path, err
		}},
		{"create the thin pool (64 KiB blocks, error_if_no_space)", func() (string, error) {
			if pool, err = c.Create("demo-pool", devmapper.UUIDPrefix+"demo-pool"); err != nil {
				return "", err
			}
			cleanup = append(cleanup, func() { _ = c.Remove(pool.Dev, false) })
			p := devmapper.ThinPoolParams{MetadataDev: devmapper.Dev(meta.Rdev), DataDev: devmapper.Dev(data.Rdev), BlockSectors: 128, LowWaterBlocks: 1024, Features: devmapper.ThinPoolFeatures{ErrorIfNoSpace: true}}
			if err := c.Load(pool.Dev, []devmapper.Target{devmapper.NewTarget(0, poolBytes/devmapper.SectorSize, p)}); err != nil {
				return "", err
			}
			meta.Close()
			data.Close()
			return "dm " + pool.Dev.String(), c.Resume(pool.Dev)
		}},
		{"create a 1 GiB thin volume and activate it", func() (string, error) {
			vol, err = thin(c, pool.Dev, "demo-volume", 1, volBytes, true)
			cleanup = append(cleanup, func() { remove(c, vol.Dev) })
			return node(vol.Dev), err
		}},
		{"make an ext4 filesystem on it", func() (string, error) {
			out, err := exec.Command("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", node(vol.Dev)).CombinedOutput()
			if err != nil {
				return "", fmt.Errorf("%v: %s", err, out)
			}
			return "mkfs.ext4", nil
		}},
		{"mount it and write a file", func() (string, error) {
			if err := mount(node(vol.Dev), volMnt); err != nil {
				return "", err
			}
			cleanup = append(cleanup, func() { _ = unix.Unmount(volMnt, 0) })
			return "hello.txt = \"first\"", writeFile(filepath.Join(volMnt, "hello.txt"), "first")
		}},
		{"snapshot the mounted volume (suspend, create_snap, resume)", func() (string, error) {
			if err := c.Suspend(vol.Dev, 0); err != nil { // freezes ext4 first
				return "", err
			}
			err := c.Message(pool.Dev, devmapper.CreateSnap{DeviceID: 2, OriginID: 1})
			if rerr := c.Resume(vol.Dev); err == nil {
				err = rerr
			}
			return "thin id 2 from thin id 1", err
		}},
		{"change the file on the volume", func() (string, error) {
			return "hello.txt = \"second\"", writeFile(filepath.Join(volMnt, "hello.txt"), "second")
		}},
		{"activate and mount the snapshot", func() (string, error) {
			if snap, err = thin(c, pool.Dev, "demo-snapshot", 2, volBytes, false); err != nil {
				return "", err
			}
			cleanup = append(cleanup, func() { remove(c, snap.Dev) })
			if err := mount(node(snap.Dev), snapMnt); err != nil {
				return "", err
			}
			cleanup = append(cleanup, func() { _ = unix.Unmount(snapMnt, 0) })
			return node(snap.Dev), nil
		}},
		{"read the file from the snapshot", func() (string, error) {
			b, err := os.ReadFile(filepath.Join(snapMnt, "hello.txt"))
			if err != nil {
				return "", err
			}
			if string(b) != "first" {
				return "", fmt.Errorf("snapshot holds %q, want \"first\"", b)
			}
			return "still \"first\": the snapshot kept the old data", nil
		}},
		{"pool usage", func() (string, error) {
			st, err := c.Status(pool.Dev, true)
			if err != nil {
				return "", err
			}
			ps, err := devmapper.ParseThinPoolStatus(st[0].Params)
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("data %d/%d blocks, metadata %d/%d blocks, mode %s", ps.UsedDataBlocks, ps.TotalDataBlocks, ps.UsedMetadataBlocks, ps.TotalMetadataBlocks, ps.Mode), nil
		}},
		{"unmount, deactivate and delete both, remove the pool", func() (string, error) {
			for _, m := range []string{snapMnt, volMnt} {
				if err := unix.Unmount(m, 0); err != nil {
					return "", err
				}
			}
			for _, d := range []devmapper.DeviceInfo{snap, vol} {
				if err := c.Remove(d.Dev, false); err != nil {
					return "", err
				}
			}
			for _, id := range []uint32{2, 1} {
				if err := c.Message(pool.Dev, devmapper.Delete{DeviceID: id}); err != nil {
					return "", err
				}
			}
			cleanup = nil
			return "loop devices detach by themselves", c.Remove(pool.Dev, false)
		}},
	}
	for _, s := range steps {
		if err := step(s.what, s.fn); err != nil {
			return err
		}
	}
	fmt.Println("\nDone. Everything the demo made is gone again.")
	return nil
}

func sparse(path string, size int64) (loop.Device, error) {
	f, err := os.Create(path)
	if err != nil {
		return loop.Device{}, err
	}
	err = f.Truncate(size)
	if err == nil {
		_, err = f.WriteAt(make([]byte, 4096), 0)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return loop.Device{}, err
	}
	return loop.Attach(path, loop.Options{AutoClear: true})
}

func thin(c *devmapper.Client, pool devmapper.Dev, name string, id uint32, size int64, create bool) (devmapper.DeviceInfo, error) {
	if create {
		if err := c.Message(pool, devmapper.CreateThin{DeviceID: id}); err != nil {
			return devmapper.DeviceInfo{}, err
		}
	}
	info, err := c.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		return info, err
	}
	if err := c.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, uint64(size)/devmapper.SectorSize, devmapper.ThinParams{PoolDev: pool, DeviceID: id})}); err != nil {
		return info, err
	}
	return info, c.Resume(info.Dev)
}

func remove(c *devmapper.Client, dev devmapper.Dev) {
	if err := c.Remove(dev, false); err != nil && !errors.Is(err, unix.ENXIO) {
		fmt.Fprintln(os.Stderr, "cleanup:", err)
	}
}

func node(dev devmapper.Dev) string { return "/dev/dm-" + strconv.FormatUint(uint64(dev.Minor()), 10) }

func mount(dev, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return unix.Mount(dev, dir, "ext4", 0, "")
}

func writeFile(path, s string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(s); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
