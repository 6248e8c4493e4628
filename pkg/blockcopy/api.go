// Package blockcopy moves the mapped blocks of a thin device from one node
// to another: a source node serves, over TLS, the extents a snapshot (or a
// point-in-time copy of a volume) has mapped, and a target node writes
// them into a new device, checkpointing as it goes so that a restart of
// either side resumes the copy, and verifies the result against the
// source's digest before it reports the copy done.
//
// It knows nothing of CSI, Kubernetes or pools: the caller says what a
// source ID opens (Opener), who may copy (Authenticator), where the copy
// goes (Target) and where its progress is kept (Checkpoints).
package blockcopy

import (
	"context"
	"io"
)

// Extent is a byte range of a device: whole blocks of the source, but for
// the last, which may end where the device does.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// Source is one copy's view of what it copies: the device's size, the
// extents it has mapped (sorted, not overlapping, adjacent ones merged)
// and their bytes. It must not change while it is open.
type Source interface {
	io.ReaderAt
	Size() int64
	Extents() []Extent
	Close() error
}

// Opener opens, on the source node, what a copy reads. Open with a copyID
// already open (a resumed copy, after a restart of either side) must give
// the same bytes and extents as the first time: a copy of a live volume
// reads a snapshot Open made and kept under the copyID. Release drops what
// Open kept for the copyID; it is called once the target has the copy, or
// the copy was cancelled, and must succeed for an unknown copyID.
type Opener interface {
	Open(ctx context.Context, copyID, sourceID string) (Source, error)
	Release(ctx context.Context, copyID string) error
}

// Authenticator checks a bearer token (a Kubernetes service-account token,
// in csi-dmthin) and returns who presented it; an error refuses the call.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (user string, err error)
}

// Endpoint is where a copy's source is served: host:port, and the SHA-256
// (hex) of the server's certificate (DER), which the client pins instead
// of trusting a CA.
type Endpoint struct {
	Address    string `json:"address"`
	CertSHA256 string `json:"certSHA256"`
}
