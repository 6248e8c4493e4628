package e2e

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The pods the scenarios apply decode strictly into a Pod with the claims
// where they are meant to be.
func TestPodYAML(t *testing.T) {
	for name, c := range map[string]struct {
		yaml          string
		mounts, disks []string
		claims        []string
	}{
		"filesystem": {podYAML("p", "data", "true", false), []string{"/data"}, nil, []string{"data"}},
		"block":      {podYAML("p", "data", "true", true), nil, []string{"/dev/xvda"}, []string{"data"}},
		"two":        {twoVolumePod("p", "ga", "gb", "true"), []string{"/a", "/b"}, nil, []string{"ga", "gb"}},
	} {
		var p corev1.Pod
		if err := yaml.UnmarshalStrict([]byte(c.yaml), &p); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, c.yaml)
		}
		var mounts, disks, claims []string
		for _, m := range p.Spec.Containers[0].VolumeMounts {
			mounts = append(mounts, m.MountPath)
		}
		for _, d := range p.Spec.Containers[0].VolumeDevices {
			disks = append(disks, d.DevicePath)
		}
		for _, v := range p.Spec.Volumes {
			claims = append(claims, v.PersistentVolumeClaim.ClaimName)
		}
		if !slices.Equal(mounts, c.mounts) || !slices.Equal(disks, c.disks) || !slices.Equal(claims, c.claims) || p.Spec.Containers[0].Command[2] != "true" {
			t.Errorf("%s: mounts %v, devices %v, claims %v\n%s", name, mounts, disks, claims, c.yaml)
		}
	}
}
