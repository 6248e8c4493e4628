package csi

import (
	"strings"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// recordingSink is an EventSink that keeps what it was told.
type recordingSink struct {
	mu  sync.Mutex
	got []string // namespace/name: message
}

func (s *recordingSink) ProvisioningNoSpace(ns, name, msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, ns+"/"+name+": "+msg)
}

func TestNoSpaceReachesEventSink(t *testing.T) {
	e := newDriverEnv(t, func(c *thinpool.Config) { c.DataFileBytes = 64 << 20; c.OverprovisionRatio = 1 })
	sink := &recordingSink{}
	e.d.events = sink
	mk := func(name string, size int64, params map[string]string) error {
		_, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: name, Parameters: params,
			VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, CapacityRange: &csipb.CapacityRange{RequiredBytes: size}})
		return err
	}
	pvc := map[string]string{ParamPVCName: "data", ParamPVCNamespace: "db"}
	if err := mk("fits", 48<<20, pvc); err != nil {
		t.Fatal(err)
	}
	wantCode(t, mk("too-much", 32<<20, pvc), codes.ResourceExhausted)
	// Without the provisioner's metadata there is no PVC to tell.
	wantCode(t, mk("too-much-2", 32<<20, nil), codes.ResourceExhausted)
	// ResourceExhausted for the wrong node is not a lack of space.
	_, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: "elsewhere", Parameters: pvc, VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		AccessibilityRequirements: &csipb.TopologyRequirement{Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}}}})
	wantCode(t, err, codes.ResourceExhausted)

	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.got) != 1 {
		t.Fatalf("sink got %q, want one report", sink.got)
	}
	// The node once, the pool once: admission's message names the pool.
	if g := sink.got[0]; !strings.HasPrefix(g, "db/data: node "+testNode+": ") || strings.Count(g, "pool "+testPool+": ") != 1 || !strings.Contains(g, "no space") {
		t.Errorf("report = %q", g)
	}
}
