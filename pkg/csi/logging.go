package csi

import (
	"context"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"k8s.io/klog/v2"
)

// logCalls logs every call with its request (secrets stripped), its result
// code and duration, and puts a logger named after the method into ctx.
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	logger := klog.FromContext(ctx).WithValues("method", method)
	ctx = klog.NewContext(ctx, logger)
	start := time.Now()
	logger.V(4).Info("Call", "request", stripSecrets(req))
	resp, err := handler(ctx, req)
	if err != nil {
		logger.Info("Call failed", "code", status.Code(err).String(), "err", err, "duration", time.Since(start))
	} else {
		logger.V(2).Info("Call done", "duration", time.Since(start))
	}
	return resp, err
}

// stripSecrets returns a copy of a request message with every map field
// named "secrets" cleared, so a log never carries one.
func stripSecrets(req any) any {
	m, ok := req.(proto.Message)
	if !ok {
		return req
	}
	c := proto.Clone(m)
	var clear func(protoreflect.Message)
	clear = func(msg protoreflect.Message) {
		msg.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			switch {
			case fd.Name() == "secrets":
				msg.Clear(fd)
			case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
				clear(v.Message())
			}
			return true
		})
	}
	clear(c.ProtoReflect())
	return c
}
