package thinpool

import (
	"errors"
	"strings"
	"testing"
)

// TestAdmissionBoundaries checks the admission rule (admission.go) at each
// of its edges, and that the capacity it reports agrees with it: a volume
// of AvailableBytes is admitted, and with a limit one byte more is refused;
// when AvailableBytes is 0, no volume is admitted.
func TestAdmissionBoundaries(t *testing.T) {
	// 1000 data bytes and 100 metadata bytes with 10% floors: admission
	// wants more than 100 data and 10 metadata bytes free. A limit of 2
	// allows 2000 bytes of volumes, snapshots and templates.
	base := Usage{
		DataBytes: 1000, DataUsedBytes: 500, MetadataBytes: 100, MetadataUsedBytes: 50,
		MinFreeDataPercent: 10, MinFreeMetadataPercent: 10, OverprovisionRatio: -1, Mode: ModeReadWrite,
	}
	with := func(f func(*Usage)) Usage {
		u := base
		f(&u)
		return u
	}
	const huge = 1 << 50 // far more than the pool: a thin volume may be
	for _, c := range []struct {
		name      string
		u         Usage
		size      int64
		kind      Kind
		wantErr   error
		words     []string // the reason, for a refusal
		available int64
	}{
		// Free data against its floor.
		{"data free exactly at the floor", with(func(u *Usage) { u.DataUsedBytes = 900 }), 1, KindVolume, ErrNoSpace, []string{"100 of 1000 data bytes free", "10% floor"}, 0},
		{"data free one byte under the floor", with(func(u *Usage) { u.DataUsedBytes = 901 }), 1, KindVolume, ErrNoSpace, []string{"99 of 1000 data bytes", "floor"}, 0},
		{"data free one byte above the floor", with(func(u *Usage) { u.DataUsedBytes = 899 }), huge, KindVolume, nil, nil, 1},
		// Free metadata against its floor.
		{"metadata free exactly at the floor", with(func(u *Usage) { u.MetadataUsedBytes = 90 }), 1, KindVolume, ErrNoSpace, []string{"10 of 100 metadata bytes free", "10% floor"}, 0},
		{"metadata free one byte under the floor", with(func(u *Usage) { u.MetadataUsedBytes = 91 }), 1, KindVolume, ErrNoSpace, []string{"metadata", "floor"}, 0},
		{"metadata free one byte above the floor", with(func(u *Usage) { u.MetadataUsedBytes = 89 }), 1, KindVolume, nil, nil, 400},
		// A 0% floor: anything free is enough, nothing free is not.
		{"0% floor, one byte free", with(func(u *Usage) { u.MinFreeDataPercent, u.DataUsedBytes = 0, 999 }), huge, KindVolume, nil, nil, 1},
		{"0% floor, nothing free", with(func(u *Usage) { u.MinFreeDataPercent, u.DataUsedBytes = 0, 1000 }), 1, KindVolume, ErrNoSpace, []string{"0 of 1000", "0% floor"}, 0},
		{"fractional floor", with(func(u *Usage) { u.MinFreeDataPercent, u.DataUsedBytes = 0.5, 995 }), 1, KindVolume, ErrNoSpace, []string{"0.5% floor"}, 0},
		// The pool's mode.
		{"out of data space", with(func(u *Usage) { u.Mode = ModeOutOfDataSpace }), 1, KindVolume, ErrNoSpace, []string{"out of data space"}, 0},
		{"out of data space with a 0% floor", with(func(u *Usage) { u.Mode, u.MinFreeDataPercent, u.DataUsedBytes = ModeOutOfDataSpace, 0, 1000 }), 1, KindVolume, ErrNoSpace, []string{"out of data space"}, 0},
		{"out of data space with free data (freed, mode not yet back)", with(func(u *Usage) { u.Mode, u.MinFreeDataPercent = ModeOutOfDataSpace, 0 }), 1, KindVolume, ErrNoSpace, []string{"out of data space"}, 0},
		{"read-only", with(func(u *Usage) { u.Mode = ModeReadOnly }), 1, KindVolume, ErrPoolUnhealthy, []string{"mode ro"}, 0},
		{"needs check", with(func(u *Usage) { u.Mode, u.NeedsCheck = ModeReadOnly, true }), 1, KindVolume, ErrPoolUnhealthy, []string{"needs_check true"}, 0},
		{"failed", Usage{Failed: true, OverprovisionRatio: -1, MinFreeDataPercent: 10, MinFreeMetadataPercent: 10}, 1, KindVolume, ErrPoolUnhealthy, []string{"failed true"}, 0},
		{"fenced", with(func(u *Usage) { u.Fenced = "apply: disk full" }), 1, KindVolume, ErrPoolUnhealthy, []string{"fenced: apply: disk full"}, 0},
		// No limit: a thin volume larger than the pool is admitted; the
		// capacity reported is the free data above the floor.
		{"no limit, larger than the pool", base, huge, KindVolume, nil, nil, 400},
		{"no limit, snapshot", base, huge, KindSnapshot, nil, nil, 400},
		// The overprovisioning limit, exactly reached and passed by a byte.
		{"limit exactly reached", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 2, 1500 }), 500, KindVolume, nil, nil, 500},
		{"limit passed by one byte", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 2, 1500 }), 501, KindVolume, ErrNoSpace, []string{"1500 bytes provisioned", "plus 501", "2 times the 1000-byte pool"}, 500},
		{"limit already reached", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 2, 2000 }), 1, KindVolume, ErrNoSpace, []string{"2000 bytes provisioned"}, 0},
		{"limit already passed (the ratio was lowered)", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 1, 2000 }), 1, KindVolume, ErrNoSpace, []string{"2000 bytes provisioned"}, 0},
		{"limit counts snapshots", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 2, 1500 }), 501, KindSnapshot, ErrNoSpace, []string{"plus 501"}, 500},
		{"fractional limit", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 1.25, 1000 }), 251, KindVolume, ErrNoSpace, []string{"1.25 times"}, 250},
		// Templates count against the limit with the volumes.
		{"limit with templates, exactly reached", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes, u.TemplateBytes = 2, 1200, 300 }), 500, KindVolume, nil, nil, 500},
		{"limit with templates, passed by one byte", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes, u.TemplateBytes = 2, 1200, 300 }), 501, KindVolume, ErrNoSpace, []string{"1500 bytes provisioned (templates included)"}, 500},
		// A template must fit in the free data above the floor (400 here),
		// whatever the limit allows.
		{"template exactly the free data", base, 400, KindTemplate, nil, nil, 400},
		{"template one byte more than the free data", base, 401, KindTemplate, ErrNoSpace, []string{"template of 401 bytes", "400 data bytes free above the floor"}, 400},
		{"template within the free data, past the limit", with(func(u *Usage) { u.OverprovisionRatio, u.ProvisionedBytes = 2, 1800 }), 300, KindTemplate, ErrNoSpace, []string{"would pass 2 times"}, 200},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.u.admit(c.size, c.kind)
			if c.wantErr == nil && err != nil || c.wantErr != nil && !errors.Is(err, c.wantErr) {
				t.Fatalf("admit(%d, %s) = %v, want %v", c.size, c.kind, err, c.wantErr)
			}
			for _, w := range c.words {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q does not say %q", err, w)
				}
			}
			avail := c.u.available()
			if avail != c.available {
				t.Errorf("available = %d, want %d", avail, c.available)
			}
			// The capacity reported and admission agree.
			if avail == 0 {
				if err := c.u.admit(1, KindVolume); err == nil {
					t.Error("0 bytes available, and a volume of 1 byte is admitted")
				}
				return
			}
			if err := c.u.admit(avail, KindVolume); err != nil {
				t.Errorf("a volume of the %d bytes available is refused: %v", avail, err)
			}
			if c.u.OverprovisionRatio >= 0 {
				if err := c.u.admit(avail+1, KindVolume); !errors.Is(err, ErrNoSpace) {
					t.Errorf("a volume one byte over the %d bytes available: %v, want ErrNoSpace", avail, err)
				}
			}
		})
	}
}

// AdmitData's rule: the bytes to write fit in the free data above the
// floor, exactly or not, and a pool that takes nothing takes no write.
func TestAdmitDataBoundaries(t *testing.T) {
	// 1000 data bytes, 500 used, a 10% floor: 400 bytes above it.
	base := Usage{
		DataBytes: 1000, DataUsedBytes: 500, MetadataBytes: 100, MetadataUsedBytes: 50,
		MinFreeDataPercent: 10, MinFreeMetadataPercent: 10, OverprovisionRatio: 8, Mode: ModeReadWrite,
	}
	for _, c := range []struct {
		name    string
		mod     func(*Usage)
		n       int64
		wantErr error
	}{
		{"exactly the free data", nil, 400, nil},
		{"one byte more", nil, 401, ErrNoSpace},
		{"nothing to write", nil, 0, nil},
		{"the overprovisioning limit does not matter", func(u *Usage) { u.ProvisionedBytes = 1 << 40 }, 400, nil},
		{"out of data space", func(u *Usage) { u.Mode = ModeOutOfDataSpace }, 1, ErrNoSpace},
		{"read-only", func(u *Usage) { u.Mode = ModeReadOnly }, 1, ErrPoolUnhealthy},
		{"metadata at its floor", func(u *Usage) { u.MetadataUsedBytes = 90 }, 1, ErrNoSpace},
	} {
		u := base
		if c.mod != nil {
			c.mod(&u)
		}
		err := u.admitData(c.n)
		if (c.wantErr == nil) != (err == nil) || (c.wantErr != nil && !errors.Is(err, c.wantErr)) {
			t.Errorf("%s: admitData(%d) = %v, want %v", c.name, c.n, err, c.wantErr)
		}
	}
}
