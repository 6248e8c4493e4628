package csi

import (
	"fmt"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/proto"
)

func TestStripSecrets(t *testing.T) {
	req := &csipb.CreateVolumeRequest{
		Name:               "pvc-1",
		Parameters:         map[string]string{"pool": "alpha"},
		Secrets:            map[string]string{"password": "hunter2"},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
	}
	orig := proto.Clone(req)
	got, ok := stripSecrets(req).(*csipb.CreateVolumeRequest)
	if !ok {
		t.Fatalf("stripSecrets returned %T", stripSecrets(req))
	}
	if len(got.GetSecrets()) != 0 {
		t.Errorf("secrets kept: %v", got.GetSecrets())
	}
	if strings.Contains(fmt.Sprint(got), "hunter2") {
		t.Errorf("the secret is printed: %v", got)
	}
	if got.GetName() != "pvc-1" || got.GetParameters()["pool"] != "alpha" || len(got.GetVolumeCapabilities()) != 1 {
		t.Errorf("other fields lost: %v", got)
	}
	if !proto.Equal(req, orig) {
		t.Errorf("the request was changed: %v", req)
	}

	for name, m := range map[string]proto.Message{
		"NodeStageVolume":   &csipb.NodeStageVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}, VolumeContext: map[string]string{"c": "d"}},
		"NodePublishVolume": &csipb.NodePublishVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
		"CreateSnapshot":    &csipb.CreateSnapshotRequest{Name: "s", Secrets: map[string]string{"k": "hunter2"}},
		"NodeExpandVolume":  &csipb.NodeExpandVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
	} {
		before := proto.Clone(m)
		out := fmt.Sprint(stripSecrets(m))
		if strings.Contains(out, "hunter2") || !strings.Contains(out, "a/b") && name != "CreateSnapshot" {
			t.Errorf("%s: stripped %s", name, out)
		}
		if !proto.Equal(m, before) {
			t.Errorf("%s: the request was changed", name)
		}
	}
	// Not a message: passed through.
	if got := stripSecrets("plain"); got != "plain" {
		t.Errorf("stripSecrets(string) = %v", got)
	}
}
