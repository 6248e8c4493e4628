package vmtest

import (
	"errors"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

var emitMu sync.Mutex

// Emit writes line and a newline to the payload's output (its stdout, the
// guest's payload port) in one write, and returns only when the port has
// sent it: once Emit returns, the host has the line, even if the power is
// cut at the next instruction. A payload that reports progress the host
// must not miss across a power cut (an acknowledgement, and the intent
// before a step) prints it with Emit before it goes on.
//
// How: the port is the guest's 8250 UART in raw mode, and tcdrain waits
// until its transmitter is empty. qemu empties it only once each byte is
// written to the host's socket, whose buffer outlives qemu. Outside the VM,
// where stdout is no terminal, the drain is skipped.
func Emit(line string) error {
	if strings.Contains(line, "\n") {
		return errors.New("vmtest: Emit: the line holds a newline")
	}
	emitMu.Lock()
	defer emitMu.Unlock()
	if _, err := os.Stdout.WriteString(line + "\n"); err != nil {
		return err
	}
	for {
		err := unix.IoctlSetInt(int(os.Stdout.Fd()), unix.TCSBRK, 1) // tcdrain
		switch {
		case err == nil, errors.Is(err, unix.ENOTTY), errors.Is(err, unix.EINVAL):
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		default:
			return err
		}
	}
}
