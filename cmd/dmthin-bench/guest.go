package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

const (
	poolDataBytes = 8 << 30  // sparse, on the guest's tmpfs
	poolMetaBytes = 64 << 20 //
	volumeBytes   = 1 << 30
	blockSectors  = 128 // 64 KiB, as lvm2's --chunksize 64k
)

// sample is one operation's timings.
type sample []time.Duration

func (s sample) quantile(q float64) time.Duration {
	c := append(sample(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[int(q*float64(len(c)-1)+0.5)]
}

func ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 2, 64)
}

// row is one line of the table: the same operation by each method.
type row struct {
	op                       string
	devmapper, dmsetup, lvm2 sample
}

func runGuest(n int, openSizes []int) error {
	c, err := devmapper.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	kernel := strings.TrimRight(string(uts.Release[:]), "\x00")

	pool, err := newPool(c, "bench-pool")
	if err != nil {
		return fmt.Errorf("our pool: %w", err)
	}
	lvmVer, err := setupLVM()
	if err != nil {
		return fmt.Errorf("lvm2 pool: %w", err)
	}
	volSectors := uint64(volumeBytes / devmapper.SectorSize)
	nextID := uint32(1)
	id := func() uint32 { nextID++; return nextID }

	var rows []row
	var parts [4]sample // create_thin, create, load, resume

	// create + activate of a 1 GiB thin volume.
	create := row{op: "create + activate a 1 GiB thin volume"}
	var ours, theirs []uint32
	var oursDev []devmapper.Dev
	for i := 0; i <= n; i++ {
		v := id()
		t0 := time.Now()
		if err := c.Message(pool.Dev, devmapper.CreateThin{DeviceID: v}); err != nil {
			return err
		}
		t1 := time.Now()
		name := fmt.Sprintf("bench-dm-%d", v)
		info, err := c.Create(name, devmapper.UUIDPrefix+name)
		if err != nil {
			return err
		}
		t2 := time.Now()
		if err := c.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, volSectors, devmapper.ThinParams{PoolDev: pool.Dev, DeviceID: v})}); err != nil {
			return err
		}
		t3 := time.Now()
		if err := c.Resume(info.Dev); err != nil {
			return err
		}
		t4 := time.Now()
		ours, oursDev = append(ours, v), append(oursDev, info.Dev)
		if i == 0 {
			continue // warm-up
		}
		create.devmapper = append(create.devmapper, t4.Sub(t0))
		for j, d := range []time.Duration{t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t4.Sub(t3)} {
			parts[j] = append(parts[j], d)
		}
	}
	for i := 0; i <= n; i++ {
		v := id()
		d, err := timed(
			[]string{"dmsetup", "message", pool.Name, "0", fmt.Sprintf("create_thin %d", v)},
			[]string{"dmsetup", "create", fmt.Sprintf("bench-cli-%d", v), "--table", fmt.Sprintf("0 %d thin %s %d", volSectors, pool.Dev, v)},
		)
		if err != nil {
			return err
		}
		theirs = append(theirs, v)
		if i > 0 {
			create.dmsetup = append(create.dmsetup, d)
		}
	}
	for i := 0; i <= n; i++ {
		d, err := timed(lvm("lvcreate", "--thin", "-V", "1G", "-n", fmt.Sprintf("lv%d", i), "vg/pool"))
		if err != nil {
			return err
		}
		if i > 0 {
			create.lvm2 = append(create.lvm2, d)
		}
	}
	rows = append(rows, create)

	// Snapshot of an active volume holding data: suspend, create_snap, resume.
	snap := row{op: "snapshot an active volume (64 MiB written)"}
	originID, originDev := ours[0], oursDev[0]
	if err := fill("/dev/dm-"+strconv.Itoa(int(originDev.Minor())), 64<<20); err != nil {
		return err
	}
	for i := 0; i <= n; i++ {
		v := id()
		t0 := time.Now()
		if err := c.Suspend(originDev, 0); err != nil {
			return err
		}
		if err := c.Message(pool.Dev, devmapper.CreateSnap{DeviceID: v, OriginID: originID}); err != nil {
			return err
		}
		if err := c.Resume(originDev); err != nil {
			return err
		}
		if i > 0 {
			snap.devmapper = append(snap.devmapper, time.Since(t0))
		}
		ours = append(ours, v)
	}
	cliOrigin := fmt.Sprintf("bench-cli-%d", theirs[0])
	if err := fill(nodeOf(c, cliOrigin), 64<<20); err != nil {
		return err
	}
	for i := 0; i <= n; i++ {
		v := id()
		d, err := timed(
			[]string{"dmsetup", "suspend", cliOrigin},
			[]string{"dmsetup", "message", pool.Name, "0", fmt.Sprintf("create_snap %d %d", v, theirs[0])},
			[]string{"dmsetup", "resume", cliOrigin},
		)
		if err != nil {
			return err
		}
		theirs = append(theirs, v)
		if i > 0 {
			snap.dmsetup = append(snap.dmsetup, d)
		}
	}
	if err := fill(nodeOf(c, "vg-lv0"), 64<<20); err != nil {
		return err
	}
	for i := 0; i <= n; i++ {
		d, err := timed(lvm("lvcreate", "-s", "-n", fmt.Sprintf("snap%d", i), "vg/lv0"))
		if err != nil {
			return err
		}
		if i > 0 {
			snap.lvm2 = append(snap.lvm2, d)
		}
	}
	rows = append(rows, snap)

	// Pool status, as a poller reads it.
	status := row{op: "read the pool's status"}
	flushed := row{op: "read the pool's status, with a metadata commit"}
	for i := 0; i <= n; i++ {
		t0 := time.Now()
		if _, err := c.Status(pool.Dev, true); err != nil {
			return err
		}
		t1 := time.Now()
		if _, err := c.Status(pool.Dev, false); err != nil {
			return err
		}
		t2 := time.Now()
		d, err := timed([]string{"dmsetup", "status", pool.Name})
		if err != nil {
			return err
		}
		l, err := timed(lvm("lvs", "-o", "data_percent,metadata_percent", "vg/pool"))
		if err != nil {
			return err
		}
		if i > 0 {
			status.devmapper = append(status.devmapper, t1.Sub(t0))
			flushed.devmapper = append(flushed.devmapper, t2.Sub(t1))
			status.dmsetup = append(status.dmsetup, d)
			status.lvm2 = append(status.lvm2, l)
		}
	}
	rows = append(rows, status, flushed)

	// Deactivate + delete: the volumes made above, newest first.
	del := row{op: "deactivate + delete a volume"}
	for i := 0; i < n; i++ {
		k := len(oursDev) - 1 - i
		t0 := time.Now()
		if err := c.Remove(oursDev[k], false); err != nil {
			return err
		}
		if err := c.Message(pool.Dev, devmapper.Delete{DeviceID: ours[k]}); err != nil {
			return err
		}
		del.devmapper = append(del.devmapper, time.Since(t0))
	}
	for i := 0; i < n; i++ {
		v := theirs[n-i] // the volumes of the create loop, skipping the origin
		d, err := timed(
			[]string{"dmsetup", "remove", fmt.Sprintf("bench-cli-%d", v)},
			[]string{"dmsetup", "message", pool.Name, "0", fmt.Sprintf("delete %d", v)},
		)
		if err != nil {
			return err
		}
		del.dmsetup = append(del.dmsetup, d)
	}
	for i := 0; i < n; i++ {
		d, err := timed(lvm("lvremove", "-f", fmt.Sprintf("vg/lv%d", n-i)))
		if err != nil {
			return err
		}
		del.lvm2 = append(del.lvm2, d)
	}
	rows = append(rows, del)

	fmt.Printf("\n## dm-thin operations: pkg/devmapper against the dmsetup CLI and lvm2\n\n")
	fmt.Printf("One VM run: Debian kernel %s under TCG (2 vCPUs), dm ioctl %v, %s.\n", kernel, c.Version(), lvmVer)
	fmt.Printf("Pools of %d GiB data (sparse files on tmpfs via loop), 64 KiB blocks, zeroing on. Median of %d runs after one warm-up, p90 in brackets, milliseconds.\n\n", poolDataBytes>>30, n)
	fmt.Println("| operation | pkg/devmapper | dmsetup CLI | lvm2 | dmsetup ÷ devmapper | lvm2 ÷ devmapper |")
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", r.op, cell(r.devmapper), cell(r.dmsetup), cell(r.lvm2), ratio(r.dmsetup, r.devmapper), ratio(r.lvm2, r.devmapper))
	}
	fmt.Printf("\npkg/devmapper create + activate, by step (median ms): create_thin %s, create %s, load table %s, resume %s.\n",
		ms(parts[0].quantile(.5)), ms(parts[1].quantile(.5)), ms(parts[2].quantile(.5)), ms(parts[3].quantile(.5)))
	fmt.Println("lvm2 column: lvcreate --thin -V1G; lvcreate -s (thin snapshot, not activated); lvs data and metadata percent; lvremove -f.")
	fmt.Println("dmsetup column: one process per step (message, create --table; suspend, message, resume; status; remove, message).")
	if err := csiBench(n); err != nil {
		return err
	}
	if err := poolBench(n, openSizes); err != nil {
		return err
	}
	return groupBench(n, groupSizes)
}

func cell(s sample) string {
	if len(s) == 0 {
		return "–"
	}
	return fmt.Sprintf("%s (%s)", ms(s.quantile(.5)), ms(s.quantile(.9)))
}

func ratio(a, b sample) string {
	if len(a) == 0 || len(b) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1fx", float64(a.quantile(.5))/float64(b.quantile(.5)))
}

// timed runs the commands one after the other and returns the total time.
func timed(cmds ...[]string) (time.Duration, error) {
	start := time.Now()
	for _, argv := range cmds {
		cmd := exec.Command(argv[0], argv[1:]...)
		// No udev in the VM: dmsetup must not wait for it.
		cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1", "LC_ALL=C")
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%s: %v\n%s", strings.Join(argv, " "), err, out)
		}
	}
	return time.Since(start), nil
}

func lvm(args ...string) []string { return append([]string{"lvm", args[0], "-q"}, args[1:]...) }

type poolDev struct {
	Name string
	Dev  devmapper.Dev
}

func sparseLoop(path string, size int64, zeroHead bool) (loop.Device, error) {
	f, err := os.Create(path)
	if err != nil {
		return loop.Device{}, err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return loop.Device{}, err
	}
	if zeroHead {
		if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil {
			return loop.Device{}, err
		}
	}
	return loop.Attach(path, loop.Options{AutoClear: true})
}

func newPool(c *devmapper.Client, name string) (poolDev, error) {
	meta, err := sparseLoop(filepath.Join("/tmp", name+".meta"), poolMetaBytes, true)
	if err != nil {
		return poolDev{}, err
	}
	data, err := sparseLoop(filepath.Join("/tmp", name+".data"), poolDataBytes, false)
	if err != nil {
		return poolDev{}, err
	}
	info, err := c.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		return poolDev{}, err
	}
	params := devmapper.ThinPoolParams{MetadataDev: devmapper.Dev(meta.Rdev), DataDev: devmapper.Dev(data.Rdev), BlockSectors: blockSectors, LowWaterBlocks: 1024}
	if err := c.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, poolDataBytes/devmapper.SectorSize, params)}); err != nil {
		return poolDev{}, err
	}
	if err := c.Resume(info.Dev); err != nil {
		return poolDev{}, err
	}
	// The pool holds both loop devices now; they detach when it goes.
	meta.Close()
	data.Close()
	return poolDev{Name: name, Dev: info.Dev}, nil
}

// lvmConf keeps lvm2 away from udev, which the VM does not run, and from
// dmeventd, and lets it scan only its own PV, so the dozens of devices the
// other columns create do not slow it down; everything else is lvm2's
// default (metadata backups included, as a node running it would have).
const lvmConf = `devices {
	obtain_device_list_from_udev = 0
	use_devicesfile = 0
	filter = [ "a|^%s$|", "r|.*|" ]
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
`

func setupLVM() (string, error) {
	for _, d := range []string{"/etc/lvm", "/run/lock/lvm", "/run/lvm"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	// Kept open (and so attached) for the whole run.
	pv, err := sparseLoop("/tmp/lvm.pv", poolDataBytes+1<<30, true)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile("/etc/lvm/lvm.conf", []byte(fmt.Sprintf(lvmConf, pv.Path)), 0o644); err != nil {
		return "", err
	}
	for _, argv := range [][]string{
		lvm("pvcreate", pv.Path),
		lvm("vgcreate", "vg", pv.Path),
		lvm("lvcreate", "--type", "thin-pool", "-L", strconv.Itoa(poolDataBytes>>30)+"G", "--chunksize", "64k",
			"--poolmetadatasize", strconv.Itoa(poolMetaBytes>>20)+"M", "-n", "pool", "vg"),
	} {
		if _, err := timed(argv); err != nil {
			return "", err
		}
	}
	out, err := exec.Command("lvm", "version").Output()
	if err != nil {
		return "", err
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return "lvm2 " + strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(first), "LVM version:")), nil
}

// nodeOf returns /dev/dm-N for the dm device called name.
func nodeOf(c *devmapper.Client, name string) string {
	info, err := c.InfoByName(name)
	if err != nil {
		return "/nonexistent/" + name
	}
	return "/dev/dm-" + strconv.Itoa(int(info.Dev.Minor()))
}

// fill writes size bytes of non-zero data at the start of the device.
func fill(path string, size int) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i%251) + 1
	}
	for off := 0; off < size; off += len(buf) {
		if _, err := f.WriteAt(buf, int64(off)); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return nil
}
