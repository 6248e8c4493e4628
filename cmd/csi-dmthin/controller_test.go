package main

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes/fake"
)

func TestControllerFlags(t *testing.T) {
	t.Setenv("NAMESPACE", "csi-dmthin")
	t.Setenv("POD_NAME", "ctl-0")
	f, err := parseControllerFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !f.leaderElection || f.leaseNamespace != "csi-dmthin" || f.identity != "ctl-0" || f.leaseName != "dmthin-csi-dmthin-io-controller" || f.workers != 4 {
		t.Errorf("defaults: %+v", *f)
	}
	for _, tc := range []struct {
		args []string
		env  string // NAMESPACE
		want string
	}{
		{[]string{"--workers=0"}, "ns", "--workers"},
		{nil, "", "--leader-election-namespace"},
		{[]string{"--leader-election-renew-deadline=20s"}, "ns", "renew-deadline"},
		{[]string{"--leader-election-retry-period=0s"}, "ns", "retry-period"},
		{[]string{"extra"}, "ns", "unexpected argument"},
	} {
		t.Setenv("NAMESPACE", tc.env)
		_, err := parseControllerFlags(tc.args)
		var ue usageError
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.As(err, &ue) {
			t.Errorf("%q (NAMESPACE=%q): %v, want a usage error naming %s", tc.args, tc.env, err, tc.want)
		}
	}
	t.Setenv("NAMESPACE", "")
	if f, err := parseControllerFlags([]string{"--leader-election=false"}); err != nil || f.leaderElection {
		t.Errorf("without leader election: %v", err)
	}
}

// Two replicas on one Lease: one runs the controller at a time, and when
// it stops (its Lease released), the other takes over.
func TestLeaderElectionOneAtATime(t *testing.T) {
	client := fake.NewClientset()
	var running, ran atomic.Int32
	var overlap atomic.Bool
	started := make(chan string, 2)
	run := func(name string) func(context.Context) error {
		return func(ctx context.Context) error {
			if running.Add(1) > 1 {
				overlap.Store(true)
			}
			ran.Add(1)
			started <- name
			<-ctx.Done()
			running.Add(-1)
			return nil
		}
	}
	flags := func(id string) *controllerFlags {
		return &controllerFlags{leaseNamespace: "csi-dmthin", leaseName: "ctl", identity: id,
			leaseDuration: 2 * time.Second, renewDeadline: time.Second, retryPeriod: 100 * time.Millisecond}
	}
	ctxs := map[string]context.CancelFunc{}
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for _, id := range []string{"a", "b"} {
		ctx, cancel := context.WithCancel(t.Context())
		ctxs[id] = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- lead(ctx, client, flags(id), nil, run(id))
		}()
	}
	defer func() {
		for _, c := range ctxs {
			c()
		}
		wg.Wait()
	}()
	first := <-started
	second := "a"
	if first == "a" {
		second = "b"
	}
	select {
	case n := <-started:
		t.Fatalf("%s started while %s leads", n, first)
	case <-time.After(500 * time.Millisecond):
	}
	ctxs[first]() // the leader stops: its Lease is released
	if err := <-errs; err != nil {
		t.Errorf("the stopped leader: %v", err)
	}
	if n := <-started; n != second {
		t.Errorf("%s took over, want %s", n, second)
	}
	if overlap.Load() {
		t.Error("two replicas ran the controller at once")
	}
	if ran.Load() != 2 {
		t.Errorf("the controller ran %d times, want 2", ran.Load())
	}
}
