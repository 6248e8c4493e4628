package registration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI versions the kubelet may speak to us.
var SupportedVersions = []string{"1.0.0"}

// SocketPath is where the kubelet looks for a plugin's registration socket:
// <dir>/<driverName>-reg.sock, dir being the kubelet's plugins_registry.
func SocketPath(dir, driverName string) string {
	return filepath.Join(dir, driverName+"-reg.sock")
}

// Status is what the kubelet last told us. Before its first call Known is
// false.
type Status struct {
	Known      bool
	Registered bool
	Error      string
}

// Server answers the kubelet's registration calls for one CSI driver.
type Server struct {
	registerapi.UnimplementedRegistrationServer

	driverName string
	endpoint   string // the CSI socket as the kubelet sees it

	mu      sync.Mutex
	status  Status
	srv     *grpc.Server
	path    string
	stopped bool
}

// New makes a Server for driverName whose CSI socket the kubelet reaches
// at endpoint (a path on the kubelet's host, such as
// /var/lib/kubelet/plugins/<driverName>/csi.sock).
func New(driverName, endpoint string) (*Server, error) {
	if driverName == "" || endpoint == "" {
		return nil, errors.New("registration: driver name and endpoint are required")
	}
	return &Server{driverName: driverName, endpoint: endpoint}, nil
}

// GetInfo tells the kubelet what we are and where our CSI socket is.
func (s *Server) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.FromContext(ctx).V(2).Info("Kubelet asked for plugin info", "driver", s.driverName, "endpoint", s.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.driverName,
		Endpoint:          s.endpoint,
		SupportedVersions: SupportedVersions,
	}, nil
}

// NotifyRegistrationStatus records the kubelet's verdict. A refusal is
// logged as an error and shows in Status until a later success.
func (s *Server) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.mu.Lock()
	s.status = Status{Known: true, Registered: st.GetPluginRegistered(), Error: st.GetError()}
	s.mu.Unlock()
	logger := klog.FromContext(ctx)
	if st.GetPluginRegistered() {
		logger.Info("Kubelet registered the driver", "driver", s.driverName)
	} else {
		logger.Error(errors.New(st.GetError()), "Kubelet refused to register the driver", "driver", s.driverName)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Status returns what the kubelet last said.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Healthy returns an error when the kubelet refused the registration; not
// having heard from it yet is not an error (it may not have looked).
func (s *Server) Healthy() error {
	st := s.Status()
	if st.Known && !st.Registered {
		return fmt.Errorf("kubelet refused to register %s: %s", s.driverName, st.Error)
	}
	return nil
}

// Serve serves on SocketPath(dir, driverName) until Stop. A stale socket
// (from a previous run) is removed first.
func (s *Server) Serve(dir string) error {
	path := SocketPath(dir, s.driverName)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("registration: remove stale socket: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("registration: %w", err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, s)
	s.mu.Lock()
	if s.stopped {
		// Stop came first: serving now would never end.
		s.mu.Unlock()
		return nil
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		s.mu.Unlock()
		return fmt.Errorf("registration: %w", err)
	}
	s.srv, s.path = srv, path
	s.mu.Unlock()
	klog.InfoS("Serving kubelet plugin registration", "driver", s.driverName, "socket", path, "endpoint", s.endpoint)
	return srv.Serve(l)
}

// Stop stops serving and removes the socket, so the kubelet deregisters
// the driver instead of dialling a dead socket.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopped = true
	srv, path := s.srv, s.path
	s.mu.Unlock()
	if srv == nil {
		return
	}
	srv.Stop()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.ErrorS(err, "Removing the registration socket failed", "socket", path)
	}
}
