package devmapper

import (
	"bytes"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The ioctl ABI, from include/uapi/linux/dm-ioctl.h. Sizes and offsets are
// checked against the C header by TestABILayout.
const (
	// headerSize is sizeof(struct dm_ioctl): the payload starts here, at the
	// padded size, not at offsetof(data) (305).
	headerSize     = unix.SizeofDmIoctl
	targetSpecSize = unix.SizeofDmTargetSpec
	// nameListHeaderSize is offsetof(struct dm_name_list, name).
	nameListHeaderSize = 12
	// targetVersionsHeaderSize is offsetof(struct dm_target_versions, name).
	targetVersionsHeaderSize = 16
	// targetMsgHeaderSize is offsetof(struct dm_target_msg, message).
	targetMsgHeaderSize = 8

	maxNameLen = unix.DM_NAME_LEN - 1 // room for the NUL
	maxUUIDLen = unix.DM_UUID_LEN - 1
	maxTypeLen = unix.DM_MAX_TYPE_NAME - 1
)

// ioctlVersion is the interface version we send. The kernel accepts any 4.x
// request whose minor is not newer than its own; x/sys's DM_VERSION_MINOR is
// newer than many kernels in use and would be refused with EINVAL, and 4.0.0
// asks for nothing we do not use.
var ioctlVersion = [3]uint32{4, 0, 0}

// request is one dm ioctl: the header fields we set and the payload.
type request struct {
	cmd     uintptr
	op      string // for errors
	dev     Dev
	name    string
	uuid    string
	flags   uint32
	eventNr uint32
	payload []byte
	targets int // target specs in payload (table loads)
	// outSize is the room to leave for the kernel's answer after the header.
	outSize int
}

// response is the kernel's answer: the header as it rewrote it and the data
// between data_start and data_size.
type response struct {
	hdr  unix.DmIoctl
	data []byte
}

func (r *request) device() string {
	switch {
	case r.name != "":
		return r.name
	case r.uuid != "":
		return "uuid " + r.uuid
	case r.dev != 0:
		return r.dev.String()
	}
	return ""
}

// do runs the ioctl on fd. It grows the buffer and retries while the kernel
// says its answer did not fit (DM_BUFFER_FULL_FLAG).
func do(fd int, r *request) (*response, error) {
	if len(r.name) > maxNameLen || len(r.uuid) > maxUUIDLen {
		return nil, &Error{Op: r.op, Device: r.device(), Err: fmt.Errorf("%w: name longer than %d or uuid longer than %d bytes", ErrInvalid, maxNameLen, maxUUIDLen)}
	}
	out := r.outSize
	for {
		size := headerSize + max(len(r.payload), out)
		size = (size + 7) &^ 7
		// A []uint64 backs the buffer so the header's u64 fields are aligned.
		words := make([]uint64, size/8)
		buf := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), size)
		hdr := (*unix.DmIoctl)(unsafe.Pointer(&words[0]))
		hdr.Version = ioctlVersion
		hdr.Data_size = uint32(size)
		hdr.Data_start = headerSize
		hdr.Flags = r.flags
		hdr.Event_nr = r.eventNr
		hdr.Dev = uint64(r.dev)
		copy(hdr.Name[:], r.name)
		copy(hdr.Uuid[:], r.uuid)
		copy(buf[headerSize:], r.payload)
		hdr.Target_count = uint32(r.targets)

		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), r.cmd, uintptr(unsafe.Pointer(&words[0])))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return nil, &Error{Op: r.op, Device: r.device(), Err: errno}
		}
		if hdr.Flags&unix.DM_BUFFER_FULL_FLAG != 0 {
			if out >= 64<<20 {
				return nil, &Error{Op: r.op, Device: r.device(), Err: errors.New("answer larger than 64 MiB")}
			}
			out = max(2*out, 16<<10)
			continue
		}
		resp := &response{hdr: *hdr}
		// A reply without data has data_size at offsetof(data), 305, which
		// is below data_start.
		start, end := int(hdr.Data_start), int(hdr.Data_size)
		if end > size {
			return nil, &Error{Op: r.op, Device: r.device(), Err: fmt.Errorf("kernel answered %d bytes into a %d-byte buffer", end, size)}
		}
		if start < end {
			resp.data = append([]byte(nil), buf[start:end]...)
		}
		return resp, nil
	}
}

// cString reads a NUL-terminated string from b.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// checkText refuses strings the kernel would truncate or misparse.
func checkText(what, s string) error {
	if bytes.ContainsAny([]byte(s), "\x00\n") {
		return fmt.Errorf("%w: %s %q contains a NUL or newline", ErrInvalid, what, s)
	}
	return nil
}
