package vmtest

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseLdd(t *testing.T) {
	tests := []struct {
		name        string
		out         string
		wantLibs    []string
		wantMissing []string
	}{
		{
			name: "dmsetup on Debian 12",
			out: "\tlinux-vdso.so.1 (0x00007fe1fcc02000)\n" +
				"\tlibdevmapper.so.1.02.1 => /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 (0x00007fe1fcb55000)\n" +
				"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fe1fc973000)\n" +
				"\tlibselinux.so.1 => /lib/x86_64-linux-gnu/libselinux.so.1 (0x00007fe1fc945000)\n" +
				"\t/lib64/ld-linux-x86-64.so.2 (0x00007fe1fcc04000)\n" +
				"\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x00007fe1fc79b000)\n",
			wantLibs: []string{
				"/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1",
				"/lib/x86_64-linux-gnu/libc.so.6",
				"/lib/x86_64-linux-gnu/libselinux.so.1",
				"/lib64/ld-linux-x86-64.so.2",
				"/lib/x86_64-linux-gnu/libpcre2-8.so.0",
			},
		},
		{
			name:     "static program",
			out:      "\tstatically linked\n",
			wantLibs: nil,
		},
		{
			name:        "missing library, old vdso form, duplicate",
			out:         "\tlinux-gate.so.1 =>  (0x00007ffd)\n\tlibgone.so.3 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n",
			wantLibs:    []string{"/lib/libc.so.6"},
			wantMissing: []string{"libgone.so.3"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			libs, missing := parseLdd([]byte(tt.out))
			if !reflect.DeepEqual(libs, tt.wantLibs) || !reflect.DeepEqual(missing, tt.wantMissing) {
				t.Errorf("parseLdd = %q, %q; want %q, %q", libs, missing, tt.wantLibs, tt.wantMissing)
			}
		})
	}
}

// TestExecutableEntriesKeepsSymlinks follows a chain like lvcreate -> lvm
// (relative) and an alternatives-style absolute link, on scripts, which
// need no ldd.
func TestExecutableEntriesKeepsSymlinks(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "sbin", "lvm")
	if err := os.MkdirAll(filepath.Dir(real), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(real, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	alt := filepath.Join(dir, "alternatives", "lvm")
	if err := os.MkdirAll(filepath.Dir(alt), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, alt); err != nil {
		t.Fatal(err)
	}
	lv := filepath.Join(dir, "sbin", "lvcreate")
	if err := os.Symlink("../alternatives/lvm", lv); err != nil {
		t.Fatal(err)
	}
	got, err := executableEntries(context.Background(), lv)
	if err != nil {
		t.Fatal(err)
	}
	want := []entry{
		{kind: kindSymlink, guest: lv, target: "../alternatives/lvm"},
		{kind: kindSymlink, guest: alt, target: real},
		{kind: kindFile, guest: real, host: real, mode: 0o755},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("entries =\n%+v\nwant\n%+v", got, want)
	}

	loop := filepath.Join(dir, "loop")
	if err := os.Symlink("loop", loop); err != nil {
		t.Fatal(err)
	}
	if _, err := executableEntries(context.Background(), loop); err == nil || !strings.Contains(err.Error(), "too many levels") {
		t.Errorf("self-link: err = %v, want too many levels", err)
	}
}

// TestToolEntriesDynamic runs the real ldd on a host tool, when there is one.
func TestToolEntriesDynamic(t *testing.T) {
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("no ldd")
	}
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	if interp, isELF, err := elfInterpreter(sh); err != nil || !isELF || interp == "" {
		t.Skipf("%s is not a dynamic ELF program", sh)
	}
	es, err := toolEntries(context.Background(), []string{"sh"})
	if err != nil {
		t.Fatal(err)
	}
	var libc, loader bool
	for _, e := range es {
		libc = libc || strings.Contains(e.guest, "libc.so")
		loader = loader || strings.Contains(e.guest, "ld-linux")
	}
	if !libc || !loader {
		t.Errorf("entries for sh lack libc (%v) or the loader (%v): %+v", libc, loader, es)
	}
	if _, err := toolEntries(context.Background(), []string{"no-such-tool-vmtest"}); err == nil {
		t.Error("unknown tool accepted")
	}
}

func TestRunScriptQuoting(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	s := &Spec{Dir: "/tmp", Args: []string{"a b", "it's", "$HOME", "", `back\slash`}, Env: []string{"FOO=bar 'baz'"}}
	script, err := runScript(s, "n0nce")
	if err != nil {
		t.Fatal(err)
	}
	// Replace /payload with printf so sh shows what the payload would get.
	script = strings.Replace(script, "/payload", `printf '[%s]'`, 1)
	out, err := exec.Command(sh, "-c", script+"\nvmtest_run; echo; echo \"$FOO|$VMTEST_NONCE|$VMTEST_DIR\"").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := "[a b][it's][$HOME][][back\\slash]\nbar 'baz'|n0nce|/tmp\n"
	if string(out) != want {
		t.Errorf("got %q, want %q", out, want)
	}
	if _, err := runScript(&Spec{Env: []string{"1BAD=x"}}, "n"); err == nil {
		t.Error("invalid env name accepted")
	}
	if _, err := runScript(&Spec{Env: []string{"NOEQUALS"}}, "n"); err == nil {
		t.Error("env entry without = accepted")
	}
}

func TestCheckGuestPath(t *testing.T) {
	for p, ok := range map[string]bool{
		"/etc/lvm/lvm.conf": true,
		"/vmtest/pkg/x":     true,
		"/tmp/x":            false,
		"/dev":              false,
		"/run/lock/x":       false,
		"/devices":          true,
		"relative":          false,
	} {
		if err := checkGuestPath(p); (err == nil) != ok {
			t.Errorf("checkGuestPath(%q) = %v, want ok=%v", p, err, ok)
		}
	}
}

func TestInnerRunPattern(t *testing.T) {
	for in, want := range map[string]string{
		"":                    "",
		"TestVM":              "",
		"TestVM/Pool":         "Pool",
		"TestVM/Pool/create":  "Pool/create",
		"Test[/]VM/Pool":      "Pool",
		"Test(a/b)/X":         "X",
		`TestVM\/x/Y`:         "Y",
		"^TestVM$/^TestPool$": "^TestPool$",
	} {
		if got := innerRunPattern(in); got != want {
			t.Errorf("innerRunPattern(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"6.1.0-56-amd64", "6.1.0-9-amd64", 1},
		{"6.1.0-9-amd64", "6.1.0-56-amd64", -1},
		{"6.10.0-1-amd64", "6.9.0-1-amd64", 1},
		{"6.1.0-56-amd64", "6.1.0-56-amd64", 0},
		{"6.1.0-56-amd64", "6.1.0-56", 1},
	}
	for _, tt := range tests {
		if got := compareVersions(tt.a, tt.b); got != tt.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestParseAptDepends(t *testing.T) {
	v, err := parseAptDepends([]byte("linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"))
	if err != nil || v != "6.1.0-56-amd64" {
		t.Errorf("got %q, %v", v, err)
	}
	v, err = parseAptDepends([]byte("linux-image-amd64\n |Depends: linux-image-6.12.1-amd64\n  Depends: other\n"))
	if err != nil || v != "6.12.1-amd64" {
		t.Errorf("alternative: got %q, %v", v, err)
	}
	if _, err := parseAptDepends([]byte("W: Unable to locate package linux-image-amd64\n")); err == nil {
		t.Error("no dependency: no error")
	}
}

func TestHasNote(t *testing.T) {
	note := func(name string, typ uint32, desc []byte) []byte {
		b := make([]byte, 12)
		binary.LittleEndian.PutUint32(b, uint32(len(name)+1))
		binary.LittleEndian.PutUint32(b[4:], uint32(len(desc)))
		binary.LittleEndian.PutUint32(b[8:], typ)
		n := append([]byte(name), 0)
		for len(n)%4 != 0 {
			n = append(n, 0)
		}
		d := append([]byte(nil), desc...)
		for len(d)%4 != 0 {
			d = append(d, 0)
		}
		return append(append(b, n...), d...)
	}
	notes := append(note("GNU", 3, []byte{1, 2, 3, 4, 5}), note("Xen", 18, []byte{0, 0, 0, 1})...)
	if !hasNote(notes, "Xen", xenElfnotePhys32Entry) {
		t.Error("PVH note not found")
	}
	if hasNote(notes[:len(notes)-4], "Xen", xenElfnotePhys32Entry) {
		t.Error("truncated note matched")
	}
	if hasNote(note("Xen", 5, nil), "Xen", xenElfnotePhys32Entry) {
		t.Error("other Xen note matched")
	}
}

// The guest's -test.timeout never exceeds maxGuestTestTime, so a hung
// kernel test fails with its stack instead of holding the VM lock for the
// whole run, and it stays inside the outer deadline.
func TestGuestTestTimeout(t *testing.T) {
	timeoutArg := func(args []string) string {
		for _, a := range args {
			if v, ok := strings.CutPrefix(a, "-test.timeout="); ok {
				return v
			}
		}
		return ""
	}
	if got := timeoutArg(guestTestArgs(context.Background())); got != maxGuestTestTime.String() {
		t.Errorf("no deadline: -test.timeout=%q, want %v", got, maxGuestTestTime)
	}
	far, cancel := context.WithTimeout(context.Background(), 3*time.Hour)
	defer cancel()
	if got := timeoutArg(guestTestArgs(far)); got != maxGuestTestTime.String() {
		t.Errorf("far deadline: -test.timeout=%q, want %v", got, maxGuestTestTime)
	}
	near, cancel2 := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel2()
	got, err := time.ParseDuration(timeoutArg(guestTestArgs(near)))
	if err != nil || got > 5*time.Minute-bootAllowance || got < 4*time.Minute {
		t.Errorf("5m deadline: -test.timeout=%v (%v), want about %v", got, err, 5*time.Minute-bootAllowance)
	}
	gone, cancel3 := context.WithTimeout(context.Background(), time.Second)
	defer cancel3()
	if got := timeoutArg(guestTestArgs(gone)); got != "" {
		t.Errorf("deadline inside the boot allowance: -test.timeout=%q, want none", got)
	}
}
