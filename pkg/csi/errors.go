package csi

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

func invalid(format string, a ...any) error {
	return status.Errorf(codes.InvalidArgument, format, a...)
}

func notFound(format string, a ...any) error {
	return status.Errorf(codes.NotFound, format, a...)
}

// toStatus is the one place where errors from the layers below become gRPC
// codes. A status error passes through; anything unknown is Internal, never
// a bare error (which gRPC would send as Unknown).
func toStatus(err error, format string, a ...any) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	msg := fmt.Sprintf(format, a...) + ": " + err.Error()
	var code codes.Code
	switch {
	case errors.Is(err, thinpool.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, thinpool.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, thinpool.ErrNoSpace):
		// The external-provisioner reschedules the PVC to another node on
		// ResourceExhausted, and only on it.
		code = codes.ResourceExhausted
	case errors.Is(err, thinpool.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, thinpool.ErrBusy):
		code = codes.FailedPrecondition
	case errors.Is(err, thinpool.ErrPoolUnhealthy), errors.Is(err, thinpool.ErrClosed), errors.Is(err, thinpool.ErrFenced):
		code = codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	default:
		code = codes.Internal
	}
	return status.Error(code, msg)
}
