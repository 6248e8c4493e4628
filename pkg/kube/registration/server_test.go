package registration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const driver = "dmthin.csi.dmthin.io"

// start serves a Server in a fresh directory and returns a client dialled
// over the socket, as the kubelet's plugin watcher would.
func start(t *testing.T, dir string) (*Server, registerapi.RegistrationClient) {
	t.Helper()
	s, err := New(driver, "/var/lib/kubelet/plugins/"+driver+"/csi.sock")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(dir) }()
	sock := SocketPath(dir, driver)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s never appeared", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		s.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, registerapi.NewRegistrationClient(conn)
}

func TestGetInfoOverTheSocket(t *testing.T) {
	dir := t.TempDir()
	_, c := start(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != driver ||
		info.GetEndpoint() != "/var/lib/kubelet/plugins/"+driver+"/csi.sock" ||
		!slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Errorf("GetInfo = %v", info)
	}
}

func TestNotifyRegistrationStatusIsRecorded(t *testing.T) {
	s, c := start(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st := s.Status(); st.Known {
		t.Fatalf("status before the kubelet spoke = %+v", st)
	}
	if err := s.Healthy(); err != nil {
		t.Fatalf("Healthy before the kubelet spoke: %v", err)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "version 0.3 unsupported"}); err != nil {
		t.Fatal(err)
	}
	if st := s.Status(); !st.Known || st.Registered || st.Error != "version 0.3 unsupported" {
		t.Errorf("status after a refusal = %+v", st)
	}
	if err := s.Healthy(); err == nil {
		t.Error("Healthy after a refusal: nil error")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if st := s.Status(); !st.Known || !st.Registered || st.Error != "" {
		t.Errorf("status after success = %+v", st)
	}
	if err := s.Healthy(); err != nil {
		t.Errorf("Healthy after success: %v", err)
	}
}

func TestStaleSocketReplacedAndRemovedOnStop(t *testing.T) {
	dir := t.TempDir()
	sock := SocketPath(dir, driver)
	// A leftover regular file where the socket goes, as a crash leaves one.
	if err := os.WriteFile(sock, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := New(driver, "/x/csi.sock")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(dir) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stale file was not replaced by a socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.Stop()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket after Stop: %v, want it gone", err)
	}
	if filepath.Base(sock) != driver+"-reg.sock" {
		t.Errorf("socket name %s", sock)
	}
}

func TestStopBeforeServe(t *testing.T) {
	s, err := New(driver, "/x/csi.sock")
	if err != nil {
		t.Fatal(err)
	}
	s.Stop()
	done := make(chan error, 1)
	go func() { done <- s.Serve(t.TempDir()) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve after Stop did not return")
	}
}
