package blockcopy

import "errors"

// Sentinel errors; the package wraps them with %w and the identifiers that
// matter, so callers test them with errors.Is.
var (
	// ErrInvalidID is a copy or source ID outside the allowed charset or
	// length; it is also the server's answer (400) to such an ID.
	ErrInvalidID = errors.New("invalid ID")
	// ErrRefused is the server refusing the caller: no token, a token
	// the Authenticator refused (401) or a user not allowed (403).
	ErrRefused = errors.New("refused by the copy server")
	// ErrSourceNotFound is what an Opener wraps when the source ID names
	// nothing: the server answers 404 and the client does not retry.
	// Any other Opener error is a 500, which the client retries.
	ErrSourceNotFound = errors.New("source not found")
	// ErrConflict is a copyID already open for another sourceID, or a
	// source whose extents changed under a resumed copy.
	ErrConflict = errors.New("copy conflict")
	// ErrCertMismatch is a server certificate whose SHA-256 is not the
	// pinned Endpoint.CertSHA256; nothing was sent to that server.
	ErrCertMismatch = errors.New("server certificate does not match the pinned SHA-256")
	// ErrTargetTooSmall is a target smaller than the source device.
	ErrTargetTooSmall = errors.New("target smaller than the source")
	// ErrSource is the server failing to read its source; the stream
	// ended with that error instead of the data.
	ErrSource = errors.New("source read failed")
	// ErrProtocol is a server answer this client cannot accept (a frame
	// outside the extents, a stream whose count does not add up, ...).
	ErrProtocol = errors.New("copy protocol violation")
	// ErrTarget is the target failing: a write, a sync or a checkpoint.
	// It is never retried (another attempt writes to the same device).
	ErrTarget = errors.New("copy target failed")
	// ErrVerify is a target whose extents do not hash to the source's
	// digest; the copy is not marked done and its checkpoint is dropped.
	ErrVerify = errors.New("copy verification failed")
)
