package thinpool

import "errors"

// Sentinel errors. Every error a Pool returns wraps at most one of them, with
// the identifiers that matter; test with errors.Is.
var (
	// ErrNotFound: no such volume.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a volume of that name exists with other parameters.
	ErrAlreadyExists = errors.New("already exists")
	// ErrNoSpace: admission refused the request (free data or metadata under
	// the floor, or the overprovisioning limit), or the pool is full.
	ErrNoSpace = errors.New("no space")
	// ErrBusy: the device is open (mounted) and cannot be deactivated.
	ErrBusy = errors.New("device busy")
	// ErrInvalid: a malformed argument; nothing was changed.
	ErrInvalid = errors.New("invalid argument")
	// ErrMismatch: the stored pool and the configured or found one differ.
	ErrMismatch = errors.New("pool mismatch")
	// ErrForeignChange: the pool was changed by another program.
	ErrForeignChange = errors.New("pool changed outside csi-dmthin")
	// ErrPoolUnhealthy: the pool is failed, read-only or needs a check, and
	// refuses changes.
	ErrPoolUnhealthy = errors.New("pool unhealthy")
	// ErrClosed: the Pool was closed.
	ErrClosed = errors.New("pool closed")
	// ErrFenced: a step failed after the kernel had accepted part of an
	// operation, so the records and the pool may disagree. The pool refuses
	// changes until it has rolled the pending operation back or forward,
	// which every later call tries first; the error says what failed.
	ErrFenced = errors.New("pool fenced until it recovers")
)
