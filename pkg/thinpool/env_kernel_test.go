//go:build vmtest

package thinpool

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The scenarios on the real kernel, in the VM (see vm_test.go).

var (
	hostOnce sync.Once
	hostK    *HostKernel
	hostErr  error
)

type kernelEnv struct{ k *HostKernel }

func newKernelEnv(t *testing.T) env {
	hostOnce.Do(func() { hostK, hostErr = NewHostKernel() })
	if hostErr != nil {
		t.Fatal(hostErr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			// What the kernel said is often the whole story.
			out, _ := exec.Command("dmesg").CombinedOutput()
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			t.Logf("kernel log, last lines:\n%s", strings.Join(lines[max(0, len(lines)-25):], "\n"))
		}
	})
	return &kernelEnv{k: hostK}
}

func (e *kernelEnv) kernel() Kernel { return e.k }

// node activates vol and returns its device node.
func (e *kernelEnv) node(t *testing.T, p *Pool, vol string) string {
	t.Helper()
	node, err := p.Activate(ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	return node
}

func (e *kernelEnv) write(t *testing.T, p *Pool, vol string, off int64, b []byte) error {
	t.Helper()
	return writeDirect(t, e.node(t, p, vol), off, b)
}

func (e *kernelEnv) read(t *testing.T, p *Pool, vol string, off int64, n int) []byte {
	t.Helper()
	return e.readNode(t, e.node(t, p, vol), off, n)
}

func (e *kernelEnv) hold(t *testing.T, p *Pool, vol string) func() {
	t.Helper()
	return holdNode(t, e.node(t, p, vol))
}

func (e *kernelEnv) devNode(t *testing.T, dev Dev) string {
	t.Helper()
	node, err := e.k.DeviceNode(dev)
	if err != nil {
		t.Fatal(err)
	}
	return node
}

// disk attaches a sparse file to an auto-clearing loop device, which
// detaches once the test lets go of it and no table holds it.
func (e *kernelEnv) disk(t *testing.T, sizeBytes int64) Dev {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(sizeBytes)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	dev, release, err := e.k.AttachFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	return dev
}

func (e *kernelEnv) writeDev(t *testing.T, dev Dev, off int64, b []byte) error {
	t.Helper()
	return writeDirect(t, e.devNode(t, dev), off, b)
}

func (e *kernelEnv) readDev(t *testing.T, dev Dev, off int64, n int) []byte {
	t.Helper()
	return e.readNode(t, e.devNode(t, dev), off, n)
}

func (e *kernelEnv) holdDev(t *testing.T, dev Dev) func() {
	t.Helper()
	return holdNode(t, e.devNode(t, dev))
}

// writeDirect writes b at off on the block device node with O_DIRECT, so
// that an error the device answers (ENOSPC from a full pool) comes back
// from this write, not from a later writeback. off and len(b) are whole
// sectors.
func writeDirect(t *testing.T, node string, off int64, b []byte) error {
	t.Helper()
	f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, free, err := alignedBuf(len(b))
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	copy(buf, b)
	_, err = f.WriteAt(buf[:len(b)], off)
	return err
}

func (e *kernelEnv) readNode(t *testing.T, node string, off int64, n int) []byte {
	t.Helper()
	out := make([]byte, n)
	if err := e.k.ReadBlockAt(node, off, out); err != nil {
		t.Fatal(err)
	}
	return out
}

func holdNode(t *testing.T, node string) func() {
	t.Helper()
	f, err := os.Open(node)
	if err != nil {
		t.Fatal(err)
	}
	return func() { f.Close() }
}

func (e *kernelEnv) reboot(t *testing.T, p *Pool) {
	t.Helper()
	list, err := e.k.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range list { // volumes first: they hold the pool
		if strings.HasPrefix(d.UUID, p.uuidPrefix()) && d.UUID != p.uuidPrefix()+"pool" {
			if err := e.k.Remove(d.Dev, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.k.Remove(p.dev, false); err != nil && !errors.Is(err, unix.ENXIO) {
		t.Fatal(err)
	}
}

func (e *kernelEnv) swapFiles(t *testing.T, a, b string) {
	t.Helper()
	tmp := a + ".swap"
	for _, r := range [][2]string{{a, tmp}, {b, a}, {tmp, b}} {
		if err := os.Rename(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *kernelEnv) writeFile(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// heldMappings implements metadataDumper with thin_dump -m, which reads
// the held metadata snapshot of a live pool. The VM has thin_dump when
// the host has it (vm_test.go); ok is false without it.
func (e *kernelEnv) heldMappings(t *testing.T, metaDev Dev) (map[uint32][]devmapper.ThinMapping, bool) {
	t.Helper()
	tool, err := exec.LookPath("thin_dump")
	if err != nil {
		t.Logf("no thin_dump in the VM, the comparison with it is skipped: %v", err)
		return nil, false
	}
	cmd := exec.Command(tool, "-m", e.devNode(t, metaDev))
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("thin_dump -m: %v", err)
	}
	devs, err := parseThinDump(out)
	if err != nil {
		t.Fatalf("thin_dump's output: %v\n%s", err, out)
	}
	return devs, true
}

// parseThinDump reads the mappings of thin_dump's XML: each device's
// single_mapping and range_mapping elements, ranges expanded.
func parseThinDump(out []byte) (map[uint32][]devmapper.ThinMapping, error) {
	devs := map[uint32][]devmapper.ThinMapping{}
	dec := xml.NewDecoder(bytes.NewReader(out))
	var dev uint32
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return devs, nil
		}
		if err != nil {
			return nil, err
		}
		el, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		attr := map[string]uint64{}
		for _, a := range el.Attr {
			if v, err := strconv.ParseUint(a.Value, 10, 64); err == nil {
				attr[a.Name.Local] = v
			}
		}
		switch el.Name.Local {
		case "superblock":
		case "device":
			dev = uint32(attr["dev_id"])
			devs[dev] = nil
		case "single_mapping":
			devs[dev] = append(devs[dev], devmapper.ThinMapping{Virtual: attr["origin_block"], Data: attr["data_block"], Time: uint32(attr["time"])})
		case "range_mapping":
			for i := range attr["length"] {
				devs[dev] = append(devs[dev], devmapper.ThinMapping{Virtual: attr["origin_begin"] + i, Data: attr["data_begin"] + i, Time: uint32(attr["time"])})
			}
		default:
			return nil, fmt.Errorf("element %s not understood", el.Name.Local)
		}
	}
}

func TestScenariosKernel(t *testing.T) { runScenarios(t, newKernelEnv) }

func TestKernelContractKernel(t *testing.T) { runKernelContract(t, newKernelEnv) }

// TestCrashRecoveryKernel crashes every operation at each step on the real
// kernel. The second crash at each step of the recovery (212 more, about
// three minutes under TCG) runs on the real kernel in make test-faults
// (CSI_DMTHIN_FAULTS=full); the fake kernel runs it in every make test.
func TestCrashRecoveryKernel(t *testing.T) {
	full := os.Getenv("CSI_DMTHIN_FAULTS") == "full"
	n, r := runCrashTests(t, newKernelEnv, full)
	t.Logf("crash points covered on the real kernel: %d, and %d more in the recoveries from them", n, r)
	if n < 44 || (full && r < 200) {
		t.Errorf("%d crash points and %d in recoveries: an operation or a recovery passes fewer steps than it did", n, r)
	}
}

// TestFaultSweepKernel is the fault sweep on the real kernel. make test
// runs it with EIO alone (every call, before and after); make test-faults
// (CSI_DMTHIN_FAULTS=full) with the four errnos of the host's sweep.
func TestFaultSweepKernel(t *testing.T) {
	errnos, min := []unix.Errno{unix.EIO}, 280
	if os.Getenv("CSI_DMTHIN_FAULTS") == "full" {
		errnos, min = faultErrnos, 800
	}
	matrix := runFaultSweep(t, newKernelEnv, errnos)
	matrix = append(matrix, runPersistentFaults(t, newKernelEnv)...)
	checkFaultMatrix(t, matrix, min)
}

func TestIdentityKernel(t *testing.T) { runIdentityScenarios(t, newKernelEnv) }

func TestExtentsKernel(t *testing.T) { runExtentScenarios(t, newKernelEnv) }
