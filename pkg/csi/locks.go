package csi

import (
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// idLocks serialises calls per volume or snapshot ID. A call that finds its
// ID locked fails at once with Aborted, which the CO retries: the CSI spec's
// answer to "an operation is already pending for this volume".
type idLocks struct {
	mu   sync.Mutex
	held map[string]bool
}

// lock takes the IDs (all or none) and returns the unlock function.
func (l *idLocks) lock(ids ...string) (func(), error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held == nil {
		l.held = map[string]bool{}
	}
	for _, id := range ids {
		if l.held[id] {
			return nil, status.Errorf(codes.Aborted, "an operation on %s is already in progress", id)
		}
	}
	for _, id := range ids {
		l.held[id] = true
	}
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, id := range ids {
			delete(l.held, id)
		}
	}, nil
}
