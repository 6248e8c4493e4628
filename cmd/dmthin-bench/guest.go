package main

import (
	"context"
	"encoding/json"
	"errors"
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
	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
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
	op                                 string
	thinpool, devmapper, dmsetup, lvm2 sample
}

// guest is what the rows of the dm table share: the kernel, our pool, and
// the thin ids each side made (later rows use the earlier rows' volumes).
type guest struct {
	c          *devmapper.Client
	tag        string         // in the names of this location's devices and VG ("" or "-disk")
	vg         string         // the lvm2 side's volume group
	tp         *thinpool.Pool // pkg/thinpool's pool, on the same kind of files
	tpVols     []string       // its volumes of the create rows, oldest first
	tpSnaps    int
	pool       poolDev
	volSectors uint64
	n          int
	nextID     uint32
	ours       []uint32 // pkg/devmapper's thin ids: the volumes, then the snapshots
	oursDev    []devmapper.Dev
	theirs     []uint32  // the dmsetup side's
	parts      [4]sample // create + activate by step: create_thin, create, load, resume
}

func (g *guest) id() uint32 { g.nextID++; return g.nextID }

// cli is the dmsetup side's device of thin id v.
func (g *guest) cli(v uint32) string { return fmt.Sprintf("bench-cli%s-%d", g.tag, v) }

// side is one method's run i of a row's operation; it returns the time
// taken.
type side func(g *guest, i int) (time.Duration, error)

// dmRow is one row of the dm table: the operation done by each method, n
// times each (after one warm-up run when warmup is set), one method after
// the other. before prepares the row (untimed).
type dmRow struct {
	op                                 string
	warmup                             bool
	before                             func(g *guest) error
	thinpool, devmapper, dmsetup, lvm2 side
}

// dmRows are the rows, in the order they run: each later one uses what
// the earlier ones made (the delete row removes the create rows' volumes).
// A cell is left empty where a method has no like operation.
var dmRows = []dmRow{
	{op: "create a 1 GiB thin volume, not activated", warmup: true, thinpool: createTP(false), devmapper: createThinDM, dmsetup: createThinCLI, lvm2: createLVM("-an")},
	{op: "create + activate a 1 GiB thin volume", warmup: true, thinpool: createTP(true), devmapper: createDM, dmsetup: createCLI, lvm2: createLVM()},
	{op: "snapshot an active volume (64 MiB written)", warmup: true, before: fillOrigins, thinpool: snapTP, devmapper: snapDM, dmsetup: snapCLI, lvm2: snapLVM},
	{op: "pool status, no metadata commit", warmup: true, thinpool: usageTP, devmapper: statusDM(true), dmsetup: statusCLI("--noflush")},
	{op: "pool status, with a metadata commit", warmup: true, devmapper: statusDM(false), dmsetup: statusCLI()},
	{op: "pool usage as a poller reads it (lvm2: lvs data% and meta%)", warmup: true, thinpool: usageTP, lvm2: statusLVM},
	{op: "deactivate + delete a volume", thinpool: deleteTP, devmapper: deleteDM, dmsetup: deleteCLI, lvm2: deleteLVM},
}

// run runs the row: each method's runs, the warm-up untimed.
func (r dmRow) run(g *guest) (row, error) {
	out := row{op: r.op}
	if r.before != nil {
		if err := r.before(g); err != nil {
			return out, err
		}
	}
	runs := g.n
	if r.warmup {
		runs++
	}
	for _, m := range []struct {
		f   side
		dst *sample
	}{{r.thinpool, &out.thinpool}, {r.devmapper, &out.devmapper}, {r.dmsetup, &out.dmsetup}, {r.lvm2, &out.lvm2}} {
		if m.f == nil {
			continue
		}
		for i := range runs {
			d, err := m.f(g, i)
			if err != nil {
				return out, fmt.Errorf("%s: %w", r.op, err)
			}
			if !r.warmup || i > 0 {
				*m.dst = append(*m.dst, d)
			}
		}
	}
	return out, nil
}

// pkg/thinpool: every figure includes the crash-safe bookkeeping (the
// intent and records, fsync'd; the transaction-id commit).

func createTP(activate bool) side {
	return func(g *guest, _ int) (time.Duration, error) {
		name := fmt.Sprintf("tp-%d", len(g.tpVols))
		ctx := context.Background()
		t0 := time.Now()
		if _, err := g.tp.CreateVolume(ctx, name, volumeBytes); err != nil {
			return 0, err
		}
		if activate {
			if _, err := g.tp.Activate(ctx, name); err != nil {
				return 0, err
			}
		}
		d := time.Since(t0)
		g.tpVols = append(g.tpVols, name)
		return d, nil
	}
}

// snapTP snapshots the first volume of the create + activate row.
func snapTP(g *guest, _ int) (time.Duration, error) {
	g.tpSnaps++
	t0 := time.Now()
	_, err := g.tp.Snapshot(context.Background(), fmt.Sprintf("tp-snap-%d", g.tpSnaps), g.tpOrigin())
	return time.Since(t0), err
}

// tpOrigin is the first volume the create + activate row made.
func (g *guest) tpOrigin() string { return g.tpVols[g.n+1] }

// usageTP is what a poller (the metrics, GetCapacity) asks of the pool.
func usageTP(g *guest, _ int) (time.Duration, error) {
	t0 := time.Now()
	_, err := g.tp.Usage()
	return time.Since(t0), err
}

// deleteTP deactivates and deletes the create + activate row's volumes,
// newest first (the first, the snapshots' origin, stays).
func deleteTP(g *guest, i int) (time.Duration, error) {
	name := g.tpVols[len(g.tpVols)-1-i]
	ctx := context.Background()
	t0 := time.Now()
	if err := g.tp.Deactivate(ctx, name); err != nil {
		return 0, err
	}
	if err := g.tp.Delete(ctx, name); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// create, not activated: create_thin alone.

func createThinDM(g *guest, _ int) (time.Duration, error) {
	v := g.id()
	t0 := time.Now()
	err := g.c.Message(g.pool.Dev, devmapper.CreateThin{DeviceID: v})
	return time.Since(t0), err
}

func createThinCLI(g *guest, _ int) (time.Duration, error) {
	return timed([]string{"dmsetup", "message", g.pool.Name, "0", fmt.Sprintf("create_thin %d", g.id())})
}

// create + activate: create_thin, then a device with a thin table.

func createDM(g *guest, i int) (time.Duration, error) {
	v := g.id()
	t0 := time.Now()
	if err := g.c.Message(g.pool.Dev, devmapper.CreateThin{DeviceID: v}); err != nil {
		return 0, err
	}
	t1 := time.Now()
	name := fmt.Sprintf("bench-dm%s-%d", g.tag, v)
	info, err := g.c.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		return 0, err
	}
	t2 := time.Now()
	if err := g.c.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, g.volSectors, devmapper.ThinParams{PoolDev: g.pool.Dev, DeviceID: v})}); err != nil {
		return 0, err
	}
	t3 := time.Now()
	if err := g.c.Resume(info.Dev); err != nil {
		return 0, err
	}
	t4 := time.Now()
	g.ours, g.oursDev = append(g.ours, v), append(g.oursDev, info.Dev)
	if i > 0 {
		for j, d := range []time.Duration{t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t4.Sub(t3)} {
			g.parts[j] = append(g.parts[j], d)
		}
	}
	return t4.Sub(t0), nil
}

func createCLI(g *guest, _ int) (time.Duration, error) {
	v := g.id()
	d, err := timed(
		[]string{"dmsetup", "message", g.pool.Name, "0", fmt.Sprintf("create_thin %d", v)},
		[]string{"dmsetup", "create", g.cli(v), "--table", fmt.Sprintf("0 %d thin %s %d", g.volSectors, g.pool.Dev, v)},
	)
	g.theirs = append(g.theirs, v)
	return d, err
}

// createLVM makes lv<k> with lvcreate --thin and extra flags; the create +
// activate row's are lv0 (the snapshots' origin), lv1, ...
func createLVM(extra ...string) side {
	return func(g *guest, i int) (time.Duration, error) {
		name := fmt.Sprintf("lv%d", i)
		if len(extra) > 0 {
			name = fmt.Sprintf("inactive%d", i)
		}
		return timed(lvm(append([]string{"lvcreate", "--thin", "-V", "1G", "-n", name}, append(extra, g.vg+"/pool")...)...))
	}
}

// Snapshot of an active volume holding data: suspend, create_snap,
// resume. The origins are each side's first volume.

func fillOrigins(g *guest) error {
	tpNode, err := g.tp.Activate(context.Background(), g.tpOrigin()) // active already: its node
	if err != nil {
		return err
	}
	return errors.Join(
		fill(tpNode, 64<<20),
		fill("/dev/dm-"+strconv.Itoa(int(g.oursDev[0].Minor())), 64<<20),
		fill(nodeOf(g.c, g.cli(g.theirs[0])), 64<<20),
		fill(nodeOf(g.c, g.vg+"-lv0"), 64<<20),
	)
}

func snapDM(g *guest, _ int) (time.Duration, error) {
	v := g.id()
	t0 := time.Now()
	if err := g.c.Suspend(g.oursDev[0], 0); err != nil {
		return 0, err
	}
	if err := g.c.Message(g.pool.Dev, devmapper.CreateSnap{DeviceID: v, OriginID: g.ours[0]}); err != nil {
		return 0, err
	}
	if err := g.c.Resume(g.oursDev[0]); err != nil {
		return 0, err
	}
	d := time.Since(t0)
	g.ours = append(g.ours, v)
	return d, nil
}

func snapCLI(g *guest, _ int) (time.Duration, error) {
	v := g.id()
	origin := g.cli(g.theirs[0])
	d, err := timed(
		[]string{"dmsetup", "suspend", origin},
		[]string{"dmsetup", "message", g.pool.Name, "0", fmt.Sprintf("create_snap %d %d", v, g.theirs[0])},
		[]string{"dmsetup", "resume", origin},
	)
	g.theirs = append(g.theirs, v)
	return d, err
}

func snapLVM(g *guest, i int) (time.Duration, error) {
	return timed(lvm("lvcreate", "-s", "-n", fmt.Sprintf("snap%d", i), g.vg+"/lv0"))
}

// Pool status, as a poller reads it: without a metadata commit (noFlush)
// and with one.

func statusDM(noFlush bool) side {
	return func(g *guest, _ int) (time.Duration, error) {
		t0 := time.Now()
		_, err := g.c.Status(g.pool.Dev, noFlush)
		return time.Since(t0), err
	}
}

func statusCLI(flags ...string) side {
	return func(g *guest, _ int) (time.Duration, error) {
		return timed(append(append([]string{"dmsetup", "status"}, flags...), g.pool.Name))
	}
}

func statusLVM(g *guest, _ int) (time.Duration, error) {
	return timed(lvm("lvs", "-o", "data_percent,metadata_percent", g.vg+"/pool"))
}

// Deactivate + delete: the create row's volumes, newest first (the first,
// the snapshots' origin, stays).

func deleteDM(g *guest, i int) (time.Duration, error) {
	k := len(g.oursDev) - 1 - i
	t0 := time.Now()
	if err := g.c.Remove(g.oursDev[k], false); err != nil {
		return 0, err
	}
	if err := g.c.Message(g.pool.Dev, devmapper.Delete{DeviceID: g.ours[k]}); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func deleteCLI(g *guest, i int) (time.Duration, error) {
	v := g.theirs[g.n-i]
	return timed(
		[]string{"dmsetup", "remove", g.cli(v)},
		[]string{"dmsetup", "message", g.pool.Name, "0", fmt.Sprintf("delete %d", v)},
	)
}

func deleteLVM(g *guest, i int) (time.Duration, error) {
	return timed(lvm("lvremove", "-f", fmt.Sprintf("%s/lv%d", g.vg, g.n-i)))
}

// location is where a dm table's pools keep their files.
type location struct {
	what string // for the table's caption
	dir  string
	tag  string
}

// runGuest prints the dm table, for the pools' files on tmpfs and, with
// diskSerial, again on ext4 on that virtual disk; then the parts, in
// order. only, if set, names the one table to run ("dm": both dm tables).
func runGuest(only string, a partArgs, diskSerial string) error {
	c, err := devmapper.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	locs := []location{{what: "sparse files on the guest's tmpfs: an fsync costs nothing", dir: "/tmp"}}
	if diskSerial != "" {
		dir, err := mountDisk(diskSerial)
		if err != nil {
			return err
		}
		a.diskDir = dir
		locs = append(locs, location{what: "sparse files on ext4 on a virtio disk: the guest's flushes reach qemu (cache=unsafe), not the host's disk", dir: dir, tag: "-disk"})
	}
	if only == "" || only == "dm" {
		for _, l := range locs {
			if err := dmTable(c, a.n, l); err != nil {
				return fmt.Errorf("pools on %s: %w", l.dir, err)
			}
		}
	}
	for _, p := range parts {
		if only != "" && only != p.name {
			continue
		}
		if err := p.run(a); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
	}
	return nil
}

// dmTable measures and prints the dm table with every side's pool files
// in l.dir.
func dmTable(c *devmapper.Client, n int, l location) error {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	kernel := strings.TrimRight(string(uts.Release[:]), "\x00")

	pool, err := newPool(c, "bench-pool"+l.tag, l.dir)
	if err != nil {
		return fmt.Errorf("our pool: %w", err)
	}
	lvmVer, err := setupLVM(l.dir, "vg"+strings.ReplaceAll(l.tag, "-", ""))
	if err != nil {
		return fmt.Errorf("lvm2 pool: %w", err)
	}
	k, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	tp, err := thinpool.Open(context.Background(), thinpool.Config{
		Name: "bench-tp" + l.tag, StateDir: filepath.Join(l.dir, "bench-tp-state"),
		DataFile: filepath.Join(l.dir, "bench-tp.data"), MetadataFile: filepath.Join(l.dir, "bench-tp.meta"),
		DataFileBytes: poolDataBytes, MetadataFileBytes: poolMetaBytes, BlockSectors: blockSectors,
		OverprovisionRatio: -1,
	}, k)
	if err != nil {
		return fmt.Errorf("pkg/thinpool's pool: %w", err)
	}
	defer tp.Close()
	g := &guest{c: c, tag: l.tag, vg: "vg" + strings.ReplaceAll(l.tag, "-", ""), tp: tp, pool: pool, volSectors: uint64(volumeBytes / devmapper.SectorSize), n: n, nextID: 1}
	var rows []row
	for _, r := range dmRows {
		out, err := r.run(g)
		if err != nil {
			return err
		}
		rows = append(rows, out)
		if err := emitSamples("dm"+l.tag, out.op, map[string]sample{"thinpool": out.thinpool, "devmapper": out.devmapper, "dmsetup": out.dmsetup, "lvm2": out.lvm2}); err != nil {
			return err
		}
	}

	fmt.Printf("\n## dm-thin operations, pools on %s: pkg/thinpool and pkg/devmapper against the dmsetup CLI and lvm2\n\n", l.dir)
	fmt.Printf("One VM run: Debian kernel %s under TCG (2 vCPUs), dm ioctl %v, %s.\n", kernel, c.Version(), lvmVer)
	fmt.Printf("Pools of %d GiB data through loop devices on %s; 64 KiB blocks, zeroing on. Median of %d runs (after one warm-up where the row has one), p90 in brackets, milliseconds.\n\n", poolDataBytes>>30, l.what, n)
	fmt.Println("| operation | pkg/thinpool | pkg/devmapper | dmsetup CLI | lvm2 | lvm2 ÷ thinpool | lvm2 ÷ devmapper | dmsetup ÷ devmapper |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %s | %s | %s | %s | %s |\n", r.op, cell(r.thinpool), cell(r.devmapper), cell(r.dmsetup), cell(r.lvm2),
			ratio(r.lvm2, r.thinpool), ratio(r.lvm2, r.devmapper), ratio(r.dmsetup, r.devmapper))
	}
	fmt.Printf("\npkg/devmapper create + activate, by step (median ms): create_thin %s, create %s, load table %s, resume %s.\n",
		ms(g.parts[0].quantile(.5)), ms(g.parts[1].quantile(.5)), ms(g.parts[2].quantile(.5)), ms(g.parts[3].quantile(.5)))
	fmt.Println("pkg/thinpool column: the pool's own operations, its crash-safe bookkeeping included (intent and records fsync'd, beside the pools' files; the transaction-id commit); usage is Pool.Usage (a status without a commit, and the records' sums).")
	fmt.Println("pkg/devmapper column: the bare ioctls, no records and no commit.")
	fmt.Println("lvm2 column: lvcreate --thin -V1G (-an for the row not activated); lvcreate -s (thin snapshot, not activated); lvs data and metadata percent (lvm2's own choice of commit); lvremove -f. Every lvm2 command commits and backs up the VG metadata.")
	fmt.Println("dmsetup column: one process per step (message; message, create --table; suspend, message, resume; status [--noflush]; remove, message).")
	return nil
}

// mountDisk makes ext4 on the virtual disk with that serial and mounts it.
func mountDisk(serial string) (string, error) {
	dev, err := vmtest.DiskBySerial(serial)
	if err != nil {
		return "", err
	}
	dir := "/bench-disk"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	for _, argv := range [][]string{
		{"mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev},
		{"mount", "-t", "ext4", dev, dir},
	} {
		if _, err := timed(argv); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// samplePrefix starts a line of raw samples in the guest's output: the
// host writes those lines to samples.json, not to the table.
const samplePrefix = "@samples "

// samples is one row's raw timings, in nanoseconds, by method.
type samples struct {
	Table   string             `json:"table"`
	Op      string             `json:"op"`
	Methods map[string][]int64 `json:"methods"`
}

// emitSamples prints one row's raw samples for the host (empty methods
// left out).
func emitSamples(table, op string, by map[string]sample) error {
	rec := samples{Table: table, Op: op, Methods: map[string][]int64{}}
	for m, s := range by {
		for _, d := range s {
			rec.Methods[m] = append(rec.Methods[m], d.Nanoseconds())
		}
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	fmt.Println(samplePrefix + string(b))
	return nil
}

func cell(s sample) string {
	if len(s) == 0 {
		return "–"
	}
	return fmt.Sprintf("%s (%s)", ms(s.quantile(.5)), ms(s.quantile(.9)))
}

// metOrMissed is a target's verdict.
func metOrMissed(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
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

func newPool(c *devmapper.Client, name, dir string) (poolDev, error) {
	meta, err := sparseLoop(filepath.Join(dir, name+".meta"), poolMetaBytes, true)
	if err != nil {
		return poolDev{}, err
	}
	data, err := sparseLoop(filepath.Join(dir, name+".data"), poolDataBytes, false)
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
	filter = [ %s"r|.*|" ]
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
`

// lvmPVs are the PVs made so far: lvm2 scans only those.
var lvmPVs []string

// setupLVM makes VG vg with its thin pool on a PV file in dir.
func setupLVM(dir, vg string) (string, error) {
	for _, d := range []string{"/etc/lvm", "/run/lock/lvm", "/run/lvm"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	// Kept open (and so attached) for the whole run.
	pv, err := sparseLoop(filepath.Join(dir, "lvm.pv"), poolDataBytes+1<<30, true)
	if err != nil {
		return "", err
	}
	lvmPVs = append(lvmPVs, pv.Path)
	var accept string
	for _, p := range lvmPVs {
		accept += fmt.Sprintf(`"a|^%s$|", `, p)
	}
	if err := os.WriteFile("/etc/lvm/lvm.conf", []byte(fmt.Sprintf(lvmConf, accept)), 0o644); err != nil {
		return "", err
	}
	for _, argv := range [][]string{
		lvm("pvcreate", pv.Path),
		lvm("vgcreate", vg, pv.Path),
		lvm("lvcreate", "--type", "thin-pool", "-L", strconv.Itoa(poolDataBytes>>30)+"G", "--chunksize", "64k",
			"--poolmetadatasize", strconv.Itoa(poolMetaBytes>>20)+"M", "-n", "pool", vg),
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
