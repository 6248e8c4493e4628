package vmtest

import (
	"io"
	"os"
	"testing"
)

// TestEmitNotATerminal: outside the VM, Emit writes the line in one piece
// and skips the drain; a line with a newline in it is refused, since the
// host would read two lines the guest never printed.
func TestEmitNotATerminal(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stdout
	os.Stdout = w
	err1 := Emit("ACK 1 create v1")
	err2 := Emit("two\nlines")
	os.Stdout = saved
	_ = w.Close()
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if err1 != nil || string(out) != "ACK 1 create v1\n" {
		t.Errorf("Emit wrote %q, error %v", out, err1)
	}
	if err2 == nil {
		t.Error("Emit took a line with a newline in it")
	}
}
