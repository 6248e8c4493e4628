package blockcopy

import (
	"context"
	"sync"
	"time"
)

// limiter is a token bucket in bytes: it fills at rate bytes a second up
// to burst bytes, and a caller takes n bytes before it moves them. A take
// larger than what the bucket holds is allowed and leaves the bucket in
// debt, which later takes wait out, so a frame larger than burst is paced
// rather than refused.
//
// It is written here rather than taken from x/time/rate so that its clock
// is a field: the tests check its accounting against a fake clock instead
// of timing real copies.
type limiter struct {
	mu     sync.Mutex
	rate   float64 // bytes per second
	burst  float64 // bytes
	tokens float64 // bytes available; negative is debt
	last   time.Time
	now    func() time.Time
	taken  int64 // bytes taken since creation, for tests and metrics
}

// newLimiter returns a limiter of bytesPerSec, or nil (no limit) for 0 or
// less. The bucket starts full, holding a tenth of a second's bytes (at
// least 64 KiB), so a limit is felt from the first frames on.
func newLimiter(bytesPerSec int64, now func() time.Time) *limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	if now == nil {
		now = time.Now
	}
	burst := float64(bytesPerSec) / 10
	if burst < 64<<10 {
		burst = 64 << 10
	}
	return &limiter{rate: float64(bytesPerSec), burst: burst, tokens: burst, last: now(), now: now}
}

// reserve takes n bytes and returns how long the caller must wait before
// moving them.
func (l *limiter) reserve(n int64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if elapsed := now.Sub(l.last); elapsed > 0 {
		l.tokens += elapsed.Seconds() * l.rate
		if l.tokens > l.burst {
			l.tokens = l.burst
		}
		l.last = now
	}
	l.tokens -= float64(n)
	l.taken += n
	if l.tokens >= 0 {
		return 0
	}
	return time.Duration(-l.tokens / l.rate * float64(time.Second))
}

// wait takes n bytes and sleeps until they may move, or until ctx is done.
// A nil limiter does not limit.
func (l *limiter) wait(ctx context.Context, n int64) error {
	if l == nil {
		return ctx.Err()
	}
	d := l.reserve(n)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// takenBytes is every byte taken so far.
func (l *limiter) takenBytes() int64 {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.taken
}
