package vmtest

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCleanConsole(t *testing.T) {
	in := "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\nBooting from ROM..\x1bc\x1b[?7l\x1b[2J[    4.97] reboot: Power down\r\n"
	want := "SeaBIOS (version 1.16.2)\nBooting from ROM..[    4.97] reboot: Power down\n"
	if got := cleanConsole(in); got != want {
		t.Errorf("cleanConsole = %q, want %q", got, want)
	}
	if got := kernelMessages(want); got != "" {
		t.Errorf("kernelMessages of a clean boot = %q, want nothing", got)
	}
	oops := want + "[    5.00] BUG: kernel NULL pointer dereference\n"
	if got := kernelMessages(oops); got != "[    5.00] BUG: kernel NULL pointer dereference" {
		t.Errorf("kernelMessages = %q", got)
	}
}

// TestPortReader feeds a port stream through a real socket, as qemu would.
func TestPortReader(t *testing.T) {
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
	stream := "vmtest: insmod x failed\r\n" +
		"VMTEST-START-n1\r\n" +
		"hello\r\n" +
		"VMTEST-EXIT-other 0\r\n" + // another run's nonce: just output
		"no newline" + "VMTEST-EXIT-n1 42\r\n" +
		"after\r\n"
	if _, err := c.Write([]byte(stream)); err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	<-done
	if pr.startTime().IsZero() {
		t.Error("start marker not seen")
	}
	code, ok := pr.result()
	if !ok || code != 42 {
		t.Errorf("result = %d, %v; want 42, true", code, ok)
	}
	want := "vmtest: insmod x failed\nhello\nVMTEST-EXIT-other 0\nno newline\nafter\n"
	if out.String() != want {
		t.Errorf("output = %q, want %q", out.String(), want)
	}
}

func TestCapBuffer(t *testing.T) {
	c := &capBuffer{max: 100}
	for i := 0; i < 50; i++ {
		_, _ = c.Write([]byte("0123456789"))
	}
	if n := len(c.String()); n > 100 || n < 50 {
		t.Errorf("kept %d bytes, want 50..100", n)
	}
	if !strings.HasSuffix(c.String(), "0123456789") {
		t.Errorf("lost the newest bytes: %q", c.String())
	}
}

// fakeQEMUEnv makes the test binary a fake qemu (TestMain): it connects
// to the payload port as qemu does, sends a line of /init, the start
// marker of nonce "n1" and a line of the payload, and runs until killed.
const fakeQEMUEnv = "VMTEST_FAKE_QEMU"

func fakeQEMU() {
	var sock string
	for _, a := range os.Args[1:] {
		if _, p, ok := strings.Cut(a, "socket,id=payload,path="); ok {
			sock = p
		}
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		os.Exit(1)
	}
	_, _ = io.WriteString(c, "vmtest: insmod x failed\n"+startMarker+"n1\npayload: a line\n")
	time.Sleep(time.Minute)
	os.Exit(0)
}

// slowOutput is an Output whose first Write takes d: the host has not
// read past the first line when the boot timer fires.
type slowOutput struct {
	d    time.Duration
	once bool
}

func (o *slowOutput) Write(p []byte) (int, error) {
	if !o.once {
		o.once = true
		time.Sleep(o.d)
	}
	return len(p), nil
}

// TestBootTimeoutAfterStart: the guest sent the start marker (and so ran
// the payload) but the host had not read it when the boot timer fired.
// The error is a boot timeout that says the marker came after the kill,
// not one that run boots again after, which would run the payload twice.
func TestBootTimeoutAfterStart(t *testing.T) {
	t.Setenv(fakeQEMUEnv, "1")
	dir := t.TempDir()
	limit := time.Second
	res := &Result{}
	err := boot(t.Context(), os.Args[0], &Kernel{Vmlinuz: "/nonexistent"}, "/nonexistent", filepath.Join(dir, "s"), "n1",
		&Spec{Output: &slowOutput{d: 3 * limit}}, res, &runHooks{bootTimeout: limit})
	if !errors.Is(err, ErrBootTimeout) || errors.Is(err, errNotStarted) {
		t.Fatalf("err = %v; want a boot timeout whose marker came after the kill", err)
	}
	if res.Boot <= 0 {
		t.Errorf("the start marker was read after the kill, yet Boot = %v", res.Boot)
	}
}
