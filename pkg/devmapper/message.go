package devmapper

import (
	"fmt"
	"strconv"
	"strings"
)

// Message is a typed thin-pool target message. The pool commits its metadata
// after every message that succeeds, and refuses every message (EINVAL) while
// it is read-only or failed.
type Message interface {
	String() string
	isMessage()
}

// CreateThin makes a new, empty thin device. EEXIST if the id is taken.
type CreateThin struct{ DeviceID uint32 }

// CreateSnap makes DeviceID an internal snapshot of OriginID. An active
// origin must be suspended around it (the kernel does not enforce this, and
// writes in flight would otherwise be lost from the snapshot).
type CreateSnap struct{ DeviceID, OriginID uint32 }

// Delete removes a thin device and frees its blocks. EBUSY while the device
// is open (active), ENODATA if there is no such device.
type Delete struct{ DeviceID uint32 }

// SetTransactionID compares the pool's transaction id with Current and, if
// they are equal, sets it to New; EINVAL otherwise. Userspace uses it as the
// commit point of its own records.
type SetTransactionID struct{ Current, New uint64 }

// ReserveMetadataSnap takes a read-only snapshot of the pool's metadata, for
// tools such as thin_ls to read while the pool is live; only one may be held.
type ReserveMetadataSnap struct{}

// ReleaseMetadataSnap drops the metadata snapshot.
type ReleaseMetadataSnap struct{}

func (m CreateThin) String() string { return fmt.Sprintf("create_thin %d", m.DeviceID) }
func (m CreateSnap) String() string { return fmt.Sprintf("create_snap %d %d", m.DeviceID, m.OriginID) }
func (m Delete) String() string     { return fmt.Sprintf("delete %d", m.DeviceID) }
func (m SetTransactionID) String() string {
	return fmt.Sprintf("set_transaction_id %d %d", m.Current, m.New)
}
func (ReserveMetadataSnap) String() string { return "reserve_metadata_snap" }
func (ReleaseMetadataSnap) String() string { return "release_metadata_snap" }

func (CreateThin) isMessage()          {}
func (CreateSnap) isMessage()          {}
func (Delete) isMessage()              {}
func (SetTransactionID) isMessage()    {}
func (ReserveMetadataSnap) isMessage() {}
func (ReleaseMetadataSnap) isMessage() {}

// ParseMessage parses a thin-pool message as the kernel would.
func ParseMessage(s string) (Message, error) {
	f := strings.Fields(s)
	if len(f) == 0 {
		return nil, fmt.Errorf("%w message %q: empty", ErrParse, s)
	}
	want := func(n int) error {
		if len(f) != n+1 {
			return fmt.Errorf("%w message %q: %s takes %d arguments", ErrParse, s, f[0], n)
		}
		return nil
	}
	id := func(i int) (uint32, error) {
		v, err := strconv.ParseUint(f[i], 10, 32)
		if err != nil || v > MaxDeviceID {
			return 0, fmt.Errorf("%w message %q: device id %q must be 0 to %d", ErrParse, s, f[i], MaxDeviceID)
		}
		return uint32(v), nil
	}
	switch f[0] {
	case "create_thin", "delete":
		if err := want(1); err != nil {
			return nil, err
		}
		d, err := id(1)
		if err != nil {
			return nil, err
		}
		if f[0] == "delete" {
			return Delete{d}, nil
		}
		return CreateThin{d}, nil
	case "create_snap":
		if err := want(2); err != nil {
			return nil, err
		}
		d, err := id(1)
		if err != nil {
			return nil, err
		}
		o, err := id(2)
		if err != nil {
			return nil, err
		}
		return CreateSnap{d, o}, nil
	case "set_transaction_id":
		if err := want(2); err != nil {
			return nil, err
		}
		cur, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w message %q: current id: %v", ErrParse, s, err)
		}
		next, err := strconv.ParseUint(f[2], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w message %q: new id: %v", ErrParse, s, err)
		}
		return SetTransactionID{cur, next}, nil
	case "reserve_metadata_snap", "release_metadata_snap":
		if err := want(0); err != nil {
			return nil, err
		}
		if f[0] == "reserve_metadata_snap" {
			return ReserveMetadataSnap{}, nil
		}
		return ReleaseMetadataSnap{}, nil
	}
	return nil, fmt.Errorf("%w message %q: unknown message %q", ErrParse, s, f[0])
}
