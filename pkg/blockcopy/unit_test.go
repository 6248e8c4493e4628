package blockcopy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// The limiter's accounting against a fake clock: no timing involved.
func TestLimiterAccounting(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const rate = 1 << 20 // 1 MiB/s, so the bucket holds 0.1 s = 104857.6 bytes
	l := newLimiter(rate, func() time.Time { return now })
	if d := l.reserve(100 * kib); d != 0 {
		t.Errorf("first 100 KiB of a full bucket wait %v", d)
	}
	// 2457.6 bytes left: 1 MiB more is 1046118.4 bytes of debt, paid in
	// 1046118.4/1048576 s.
	if d, want := l.reserve(mib), 997656250*time.Nanosecond; d < want-time.Microsecond || d > want+time.Microsecond {
		t.Errorf("1 MiB past the bucket waits %v, want %v", d, want)
	}
	now = now.Add(2 * time.Second) // pays the debt, refills, caps at the bucket
	if d := l.reserve(104857); d != 0 {
		t.Errorf("a refilled bucket waits %v", d)
	}
	if d := l.reserve(1 << 19); d < 499*time.Millisecond || d > 500*time.Millisecond {
		t.Errorf("half a second's bytes past an empty bucket wait %v", d)
	}
	if got, want := l.takenBytes(), int64(100*kib+mib+104857+1<<19); got != want {
		t.Errorf("taken %d, want %d", got, want)
	}
	// A wait in debt ends with ctx.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.wait(ctx, 10*mib); !errors.Is(err, context.Canceled) {
		t.Errorf("wait with a cancelled ctx = %v", err)
	}
	if newLimiter(0, nil) != nil {
		t.Error("rate 0 gave a limiter")
	}
	var none *limiter
	if err := none.wait(context.Background(), 1<<40); err != nil {
		t.Errorf("no limiter waited: %v", err)
	}
}

func TestCheckpointDirRoundTrip(t *testing.T) {
	cps := newCheckpoints(t)
	if _, ok, err := cps.Load("copy-1"); ok || err != nil {
		t.Fatalf("Load of nothing = %v, %v", ok, err)
	}
	want := Checkpoint{CopyID: "copy-1", SourceID: "src", ExtentsSHA256: "abc", Next: 12345, UpdatedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	if err := cps.Save(want); err != nil {
		t.Fatal(err)
	}
	got, ok, err := cps.Load("copy-1")
	if err != nil || !ok || got != want {
		t.Fatalf("Load = %+v, %v, %v; want %+v", got, ok, err, want)
	}
	info, err := os.Stat(filepath.Join(cps.dir, "copy-1.json"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("checkpoint file: %v, %v", info, err)
	}
	if err := cps.Delete("copy-1"); err != nil {
		t.Fatal(err)
	}
	if err := cps.Delete("copy-1"); err != nil {
		t.Errorf("Delete of nothing = %v", err)
	}
	if _, ok, _ := cps.Load("copy-1"); ok {
		t.Error("deleted checkpoint loads")
	}
}

// A Save that fails before its rename leaves the old checkpoint whole
// and no temporary file behind.
func TestCheckpointDirAtomic(t *testing.T) {
	cps := newCheckpoints(t)
	old := Checkpoint{CopyID: "copy-1", SourceID: "src", Next: 1}
	if err := cps.Save(old); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("crash before rename")
	cps.beforeRename = func() error { return boom }
	if err := cps.Save(Checkpoint{CopyID: "copy-1", SourceID: "src", Next: 2}); !errors.Is(err, boom) {
		t.Fatalf("Save = %v, want the injected error", err)
	}
	got, ok, err := cps.Load("copy-1")
	if err != nil || !ok || got.Next != 1 {
		t.Errorf("after a failed save Load = %+v, %v, %v; want the old one", got, ok, err)
	}
	entries, err := os.ReadDir(cps.dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "copy-1.json" {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("directory holds %v, want only copy-1.json", names)
	}
	// A corrupt file is an error, not an empty checkpoint.
	if err := os.WriteFile(filepath.Join(cps.dir, "copy-2.json"), []byte(`{"copyID":"copy-2","ne`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := cps.Load("copy-2"); err == nil {
		t.Error("a truncated checkpoint loads")
	}
}

func TestCheckpointDirRefusesPathEscape(t *testing.T) {
	parent := t.TempDir()
	cps, err := DirCheckpoints(filepath.Join(parent, "cps"))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"../escape", "a/b", "..", ".hidden", ""} {
		if err := cps.Save(Checkpoint{CopyID: id}); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Save(%q) = %v, want ErrInvalidID", id, err)
		}
		if _, _, err := cps.Load(id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Load(%q) = %v, want ErrInvalidID", id, err)
		}
		if err := cps.Delete(id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Delete(%q) = %v, want ErrInvalidID", id, err)
		}
	}
	if _, err := os.Stat(filepath.Join(parent, "escape.json")); !os.IsNotExist(err) {
		t.Errorf("a file escaped the checkpoint directory: %v", err)
	}
}

func TestLoadOrCreateCert(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	cert, pin, err := LoadOrCreateCert(dir)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(cert.Certificate[0])
	if pin != hex.EncodeToString(sum[:]) || CertSHA256(cert) != pin {
		t.Errorf("pin %s is not the leaf's SHA-256", pin)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("key is %T, want ECDSA P-256", leaf.PublicKey)
	}
	info, err := os.Stat(filepath.Join(dir, keyFile))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v; want mode 0600", info, err)
	}
	_, again, err := LoadOrCreateCert(dir)
	if err != nil || again != pin {
		t.Errorf("second load = %s, %v; want the same pin %s", again, err, pin)
	}
	// A crash between the key's write and the certificate's leaves a key
	// alone, and no fingerprint was handed out: start over.
	if err := os.Remove(filepath.Join(dir, certFile)); err != nil {
		t.Fatal(err)
	}
	_, fresh, err := LoadOrCreateCert(dir)
	if err != nil || fresh == pin {
		t.Errorf("load with the key alone = %s, %v; want a new certificate", fresh, err)
	}
	// A damaged certificate is reported, not silently replaced.
	if err := os.WriteFile(filepath.Join(dir, certFile), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateCert(dir); err == nil {
		t.Error("a damaged certificate loaded")
	}
}

func TestExtentsSHA256AndDigest(t *testing.T) {
	img := testImage()
	h := ExtentsSHA256(img.size, img.extents)
	moved := append([]Extent(nil), img.extents...)
	moved[1].Offset += 64 * kib
	if ExtentsSHA256(img.size, moved) == h || ExtentsSHA256(img.size+1, img.extents) == h {
		t.Error("the extents hash ignores offsets or the size")
	}
	src := &memSource{img: img, failAt: -1, gateAt: -1, readBytes: new(atomic.Int64)}
	d1, err := DigestSHA256(src, img.extents)
	if err != nil {
		t.Fatal(err)
	}
	img.data[img.extents[2].Offset+5] ^= 1
	d2, _ := DigestSHA256(src, img.extents)
	img.data[img.extents[2].Offset+5] ^= 1
	d3, _ := DigestSHA256(src, moved)
	if d1 == d2 || d1 == d3 {
		t.Error("the digest ignores a byte or an offset")
	}
	if err := checkExtents(img.size, moved); err != nil {
		t.Errorf("checkExtents(valid) = %v", err)
	}
	for _, bad := range [][]Extent{
		{{Offset: 0, Length: 0}},
		{{Offset: 0, Length: 10}, {Offset: 5, Length: 10}},
		{{Offset: img.size - 1, Length: 2}},
	} {
		if checkExtents(img.size, bad) == nil {
			t.Errorf("checkExtents(%v) accepted", bad)
		}
	}
}
