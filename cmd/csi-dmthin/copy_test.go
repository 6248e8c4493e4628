package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// Copies between nodes need every flag that makes them safe, and the
// Kubernetes side that checks tokens and publishes the endpoint; each
// missing piece is named.
func TestCopyFlagsRefused(t *testing.T) {
	full := copyFlags{listen: ":0", advertise: "10.0.0.1:9811", audience: "aud", tokenFile: "/t", allowedUser: "system:serviceaccount:ns:sa"}
	for _, tc := range []struct {
		name string
		mod  func(*copyFlags)
		want string
	}{
		{"no advertise", func(f *copyFlags) { f.advertise = "" }, "--copy-advertise"},
		{"no audience", func(f *copyFlags) { f.audience = "" }, "--copy-audience"},
		{"no token file", func(f *copyFlags) { f.tokenFile = "" }, "--copy-token-file"},
		{"no allowed user", func(f *copyFlags) { f.allowedUser = "" }, "--copy-allowed-user"},
		{"negative rate", func(f *copyFlags) { f.rate = -1 }, "--copy-rate"},
		{"no Kubernetes API", func(*copyFlags) {}, "--kube-api"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := full
			tc.mod(&f)
			cs, opts, err := newCopySide(&f, t.TempDir(), &kubeSide{}, prometheus.NewRegistry())
			if err == nil || !strings.Contains(err.Error(), tc.want) || cs != nil || opts != nil {
				t.Errorf("newCopySide = %v, %v, %v; want an error naming %s", cs, opts, err, tc.want)
			}
		})
	}
	// Without --copy-listen, copies are off and nothing else is asked.
	if cs, opts, err := newCopySide(&copyFlags{}, t.TempDir(), &kubeSide{}, prometheus.NewRegistry()); cs != nil || opts != nil || err != nil {
		t.Errorf("newCopySide without --copy-listen = %v, %v, %v", cs, opts, err)
	}
}

func TestCopyProbeUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--address", "a:1", "--cert-sha256", "x", "--token-file", "-"},
		{"--address", "a:1", "--cert-sha256", "x", "--token-file", "-", "--source", "n/p/s", "extra"},
	} {
		err := copyProbe(args, strings.NewReader("tok"), &bytes.Buffer{})
		if _, ok := err.(usageError); !ok {
			t.Errorf("copy probe %q = %v, want a usage error", args, err)
		}
	}
	err := copyProbe([]string{"--address", "a:1", "--cert-sha256", "x", "--token-file", "-", "--source", "n/p/s"}, strings.NewReader("  \n"), &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("copy probe with an empty token = %v", err)
	}
}
