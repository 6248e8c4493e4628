package devmapper

import (
	"context"
	"testing"
	"time"
)

// A deadline that passed between WaitEvent's context check and its poll
// must give poll a zero timeout: a negative one would block for ever. CI
// once hung for an hour on exactly that under TCG.
func TestPollTimeout(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	cases := []struct {
		name     string
		deadline time.Duration // from now; 0 means no deadline
		want     int
	}{
		{"no deadline", 0, 200},
		{"far deadline", time.Hour, 200},
		{"near deadline", 50 * time.Millisecond, 50},
		{"sub-millisecond left rounds up", 300 * time.Microsecond, 1},
		{"just passed", -500 * time.Microsecond, 0},
		{"passed by 2.5ms", -2500 * time.Microsecond, 0},
		{"long passed", -time.Minute, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.deadline != 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithDeadline(ctx, now.Add(tc.deadline))
				defer cancel()
			}
			if got := pollTimeout(ctx, now); got != tc.want {
				t.Errorf("pollTimeout = %d, want %d", got, tc.want)
			}
		})
	}
}
