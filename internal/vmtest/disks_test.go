package vmtest

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestDiskArgs(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.img")
	b := filepath.Join(dir, "with,comma.img")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	disks := []Disk{{Path: a, Serial: "pc-data"}, {Path: b, Serial: "meta.0_X"}}
	if err := checkDisks(disks); err != nil {
		t.Fatal(err)
	}
	k := &Kernel{Vmlinuz: "/k/vmlinuz"}
	s := &Spec{MemoryMiB: 512, CPUs: 1, Disks: disks}
	args := qemuArgs(k, "/i/initrd", "/s/sock", s)
	want := []string{
		"-drive", "if=none,id=disk0,format=raw,cache=unsafe,file=" + a,
		"-device", "virtio-blk-pci,drive=disk0,serial=pc-data,addr=0x8",
		"-drive", "if=none,id=disk1,format=raw,cache=unsafe,file=" + strings.ReplaceAll(b, ",", ",,"),
		"-device", "virtio-blk-pci,drive=disk1,serial=meta.0_X,addr=0x9",
	}
	if len(args) < len(want) || !reflect.DeepEqual(args[len(args)-len(want):], want) {
		t.Errorf("qemu args end with\n%q\nwant\n%q", args, want)
	}
	// Without disks, no drive or device at all.
	for _, a := range qemuArgs(k, "/i/initrd", "/s/sock", &Spec{MemoryMiB: 512, CPUs: 1}) {
		if a == "-drive" || a == "-device" {
			t.Errorf("a spec without disks has %s", a)
		}
	}
}

func TestCheckDisks(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	many := make([]Disk, maxDisks+1)
	for i := range many {
		many[i] = Disk{Path: img, Serial: "s" + string(rune('a'+i))}
	}
	for _, tc := range []struct {
		name  string
		disks []Disk
		want  string // in the error; "" for none
	}{
		{"none", nil, ""},
		{"ok", []Disk{{Path: img, Serial: "a"}, {Path: img, Serial: "b"}}, ""},
		{"empty serial", []Disk{{Path: img}}, "serial"},
		{"long serial", []Disk{{Path: img, Serial: strings.Repeat("x", 21)}}, "serial"},
		{"comma in serial", []Disk{{Path: img, Serial: "a,b"}}, "serial"},
		{"space in serial", []Disk{{Path: img, Serial: "a b"}}, "serial"},
		{"twice", []Disk{{Path: img, Serial: "a"}, {Path: img, Serial: "a"}}, "used twice"},
		{"missing", []Disk{{Path: filepath.Join(dir, "nope"), Serial: "a"}}, "no such file"},
		{"directory", []Disk{{Path: dir, Serial: "a"}}, "not a regular file"},
		{"too many", many, "at most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkDisks(tc.disks)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

func TestWithDiskModules(t *testing.T) {
	if got := withDiskModules([]string{"loop"}, nil); !reflect.DeepEqual(got, []string{"loop"}) {
		t.Errorf("no disks: %q", got)
	}
	mods := []string{"loop", "virtio-blk"}
	got := withDiskModules(mods, []Disk{{}})
	want := []string{"loop", "virtio-blk", "virtio", "virtio_ring", "virtio_pci"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("modules %q, want %q", got, want)
	}
	if len(mods) != 2 {
		t.Errorf("the caller's slice changed: %q", mods)
	}
	// An explicitly empty list still gets the disk modules.
	if got := withDiskModules([]string{}, []Disk{{}}); !reflect.DeepEqual(got, diskModules) {
		t.Errorf("empty list: %q", got)
	}
}

func TestRunScriptWaitsForDisks(t *testing.T) {
	s := &Spec{Dir: "/tmp", Disks: []Disk{{}, {}, {}}}
	script, err := runScript(s, "n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(script, `-lt 3 ]`) || !strings.Contains(script, "virtio disks appeared") {
		t.Errorf("the run script does not wait for 3 disks:\n%s", script)
	}
	s.Disks = nil
	if script, _ := runScript(s, "n"); strings.Contains(script, "/sys/block") {
		t.Errorf("the run script waits for disks when there are none:\n%s", script)
	}
}

// TestPortReaderCut: after a power cut, whole lines still arrive and a last
// line the guest did not finish does not.
func TestPortReaderCut(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	var out bytes.Buffer
	pr := &portReader{nonce: "n1", out: &out, exitSeen: make(chan struct{})}
	done := make(chan struct{})
	go func() { defer close(done); pr.serve(ln) }()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("VMTEST-START-n1\r\nACK 1\r\nACK 2\r\nACK 3 half")); err != nil {
		t.Fatal(err)
	}
	pr.cutPower()
	_ = c.Close()
	<-done
	if want := "ACK 1\nACK 2\n"; out.String() != want {
		t.Errorf("output after the cut = %q, want %q", out.String(), want)
	}
	if _, ok := pr.result(); ok {
		t.Error("an exit status after a cut")
	}
}
