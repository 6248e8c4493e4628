package devmapper

import (
	"errors"
	"fmt"
)

// ErrInvalid is returned, before anything reaches the kernel, for arguments
// the kernel would refuse or misread: an over-long name, an empty table, a
// string with a NUL or newline in it.
var ErrInvalid = errors.New("invalid argument")

// ErrParse is wrapped by every table, message and status parser error.
var ErrParse = errors.New("cannot parse")

// Error is an ioctl that failed. Err is the kernel's errno (a
// golang.org/x/sys/unix.Errno), so errors.Is(err, unix.EBUSY) works.
type Error struct {
	Op     string // the operation, e.g. "remove" or "message \"delete 7\""
	Device string // the device's name or major:minor; empty for global calls
	Err    error
}

func (e *Error) Error() string {
	if e.Device == "" {
		return "dm " + e.Op + ": " + e.Err.Error()
	}
	return fmt.Sprintf("dm %s %s: %v", e.Op, e.Device, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }
