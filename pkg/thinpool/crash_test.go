package thinpool

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

// Crash tests: the process dies at a step boundary (the pool's hook panics
// there, and its records file is closed as the OS would close it), and the
// next Open must recover: nothing lost, nothing leaked, and a retry of the
// operation succeeds. The operations are the fault sweep's (faults_test.go),
// and the same again with a second crash at each step of the recovery.

type crash struct{ point string }

// crashAt returns an Option whose hook dies at the nth pass (from 1) of
// point once armed is true.
func crashAt(point string, nth int, armed *bool) Option {
	return func(p *Pool) {
		seen := 0
		p.hook = func(s string) {
			if !*armed || s != point {
				return
			}
			if seen++; seen == nth {
				p.st.close()
				panic(crash{s})
			}
		}
	}
}

// crashPoint is a step boundary and which pass of it.
type crashPoint struct {
	name string
	nth  int
}

func (c crashPoint) String() string {
	if c.nth == 1 {
		return c.name
	}
	return fmt.Sprintf("%s#%d", c.name, c.nth)
}

// numbered turns a list of steps into crash points.
func numbered(steps []string) []crashPoint {
	seen := map[string]int{}
	out := make([]crashPoint, len(steps))
	for i, s := range steps {
		seen[s]++
		out[i] = crashPoint{s, seen[s]}
	}
	return out
}

// recording returns an Option whose hook appends every step to points.
func recording(points *[]string) Option {
	return func(p *Pool) { p.hook = func(s string) { *points = append(*points, s) } }
}

// survive runs f, which must die at a crash point, and reports whether it
// did.
func survive(f func()) (crashed bool) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if _, ok := r.(crash); !ok {
			panic(r)
		}
		crashed = true
	}()
	f()
	return false
}

// opPoints lists the step boundaries an operation passes.
func opPoints(t *testing.T, newEnv func(t *testing.T) env, op faultOp) []crashPoint {
	var points []string
	e := newEnv(t)
	cfg := testConfig(t, faultPoolName(), 64<<20)
	p := openPool(t, e, cfg, recording(&points))
	faultSetup(t, e, p)
	release := func() {}
	if op.prepare != nil {
		release = op.prepare(t, e, p)
	}
	points = nil
	if _, err := op.run(t, e, p, nil, cfg); err != nil {
		t.Fatal(err)
	}
	got := numbered(points)
	p.hook = nil
	release()
	teardown(t, e, p)
	return got
}

// crashOp sets up a pool, runs op and kills it at point; it returns the
// dead pool's configuration and the release of op's prepare.
func crashOp(t *testing.T, e env, op faultOp, point crashPoint) (Config, func()) {
	t.Helper()
	cfg := testConfig(t, faultPoolName(), 64<<20)
	armed := false
	p := openPool(t, e, cfg, crashAt(point.name, point.nth, &armed))
	faultSetup(t, e, p)
	release := func() {}
	if op.prepare != nil {
		release = op.prepare(t, e, p)
	}
	armed = true
	if !survive(func() { _, _ = op.run(t, e, p, nil, cfg) }) {
		t.Fatalf("did not crash at %s", point)
	}
	return cfg, release
}

// afterCrash reopens the pool and checks it: invariants, the committed
// data, a retry of op and its effect.
func afterCrash(t *testing.T, e env, op faultOp, cfg Config, release func()) {
	t.Helper()
	p := openPool(t, e, cfg)
	defer teardown(t, e, p)
	defer release()
	if !op.plantsOrphan {
		// An operation that meets a thin id the test planted is checked
		// after the retry below: until one meets it, that id is the
		// test's, known to nobody.
		checkInvariants(t, e, p)
	}
	if got := e.read(t, p, "base", 0, len(faultData)); !bytes.Equal(got, faultData) {
		t.Fatal("committed data lost")
	}
	_, err := op.run(t, e, p, nil, cfg)
	if op.goneAfterCrash != "" && errors.Is(err, ErrNotFound) {
		if _, gerr := p.Get(op.goneAfterCrash); !errors.Is(gerr, ErrNotFound) {
			t.Fatalf("retry after the crash: %v, but %s is there: %v", err, op.goneAfterCrash, gerr)
		}
		checkInvariants(t, e, p)
		return
	}
	if err != nil {
		t.Fatalf("retry after the crash: %v", err)
	}
	op.check(t, e, p)
	checkInvariants(t, e, p)
}

// runCrashTests kills every operation at each of its step boundaries, and
// with recovery set, also kills each recovery at each of its steps. It
// returns the number of crash points, and of recovery crash points.
func runCrashTests(t *testing.T, newEnv func(t *testing.T) env, recovery bool) (points, recoveryPoints int) {
	// A crash while the pool itself is being made.
	for _, point := range []string{"create-pool:recorded", "create-pool:zeroed", "create-pool:activated", "create-pool:marker-created", "create-pool:marker-written", "create-pool:committed"} {
		points++
		t.Run("create-pool/"+point, func(t *testing.T) {
			e := newEnv(t)
			cfg := testConfig(t, faultPoolName(), 64<<20)
			armed := true
			if !survive(func() { _, _ = Open(ctx, cfg, e.kernel(), crashAt(point, 1, &armed)) }) {
				t.Fatalf("did not crash at %s", point)
			}
			p := openPool(t, e, cfg)
			defer teardown(t, e, p)
			if _, err := p.CreateVolume(ctx, "after", 4<<20); err != nil {
				t.Fatalf("pool unusable after a crash at %s: %v", point, err)
			}
			checkInvariants(t, e, p)
		})
	}
	// A crash while an old pool gets its marker.
	for _, point := range []string{"marker:intent", "marker:written", "marker:committed"} {
		points++
		t.Run("add-marker/"+point, func(t *testing.T) {
			e := newEnv(t)
			cfg := testConfig(t, faultPoolName(), 64<<20)
			p := openPool(t, e, cfg)
			faultSetup(t, e, p)
			stripMarker(t, e, p)
			p.Close()
			armed := true
			if !survive(func() { _, _ = Open(ctx, cfg, e.kernel(), crashAt(point, 1, &armed)) }) {
				t.Fatalf("did not crash at %s", point)
			}
			p = openPool(t, e, cfg)
			defer teardown(t, e, p)
			if !p.rec.Marker {
				t.Fatal("no marker after the crash and a reopen")
			}
			checkInvariants(t, e, p)
			if got := e.read(t, p, "base", 0, len(faultData)); !bytes.Equal(got, faultData) {
				t.Fatal("committed data lost")
			}
		})
	}
	for _, op := range faultOps() {
		if op.newPool {
			continue
		}
		list := opPoints(t, newEnv, op)
		if len(list) == 0 {
			t.Fatalf("%s passes no crash point", op.name)
		}
		for _, point := range list {
			points++
			t.Run(op.name+"/"+point.String(), func(t *testing.T) {
				e := newEnv(t)
				cfg, release := crashOp(t, e, op, point)
				afterCrash(t, e, op, cfg, release)
			})
			if !recovery {
				continue
			}
			// The steps the recovery from this crash passes...
			var rec []string
			t.Run(op.name+"/"+point.String()+"/recovery-points", func(t *testing.T) {
				e := newEnv(t)
				cfg, release := crashOp(t, e, op, point)
				p := openPool(t, e, cfg, recording(&rec))
				p.hook = nil
				release()
				teardown(t, e, p)
			})
			// ...and a second crash at each of them.
			for _, rpoint := range numbered(rec) {
				recoveryPoints++
				t.Run(op.name+"/"+point.String()+"/then/"+rpoint.String(), func(t *testing.T) {
					e := newEnv(t)
					cfg, release := crashOp(t, e, op, point)
					armed := true
					if !survive(func() { _, _ = Open(ctx, cfg, e.kernel(), crashAt(rpoint.name, rpoint.nth, &armed)) }) {
						t.Fatalf("the recovery did not crash at %s", rpoint)
					}
					afterCrash(t, e, op, cfg, release)
				})
			}
		}
	}
	return points, recoveryPoints
}
