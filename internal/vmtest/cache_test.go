package vmtest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestLockFileExcludes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "lock")
	unlock, err := lockFile(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	waited := 0
	if _, err := lockFile(ctx, path, func() { waited++ }); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock while held: err = %v, want deadline exceeded", err)
	}
	if waited != 1 {
		t.Errorf("waiting called %d times, want 1", waited)
	}
	acquired := make(chan func())
	go func() {
		u, err := lockFile(context.Background(), path, nil)
		if err != nil {
			t.Error(err)
			close(acquired)
			return
		}
		acquired <- u
	}()
	time.Sleep(3 * lockPollInterval)
	unlock()
	select {
	case u := <-acquired:
		if u != nil {
			u()
		}
	case <-time.After(5 * time.Second):
		t.Fatal("lock not acquired after release")
	}
}

func TestCacheDir(t *testing.T) {
	t.Setenv("CSI_DMTHIN_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	if d, err := CacheDir(); err != nil || d != "/xdg/csi-dmthin" {
		t.Errorf("with XDG_CACHE_HOME: %q, %v", d, err)
	}
	t.Setenv("CSI_DMTHIN_CACHE", "/explicit")
	if d, err := CacheDir(); err != nil || d != "/explicit" {
		t.Errorf("with CSI_DMTHIN_CACHE: %q, %v", d, err)
	}
	t.Setenv("CSI_DMTHIN_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "/home/u")
	if d, err := CacheDir(); err != nil || d != "/home/u/.cache/csi-dmthin" {
		t.Errorf("from HOME: %q, %v", d, err)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	err := writeFileAtomic(path, func(f *os.File) error {
		_, err := f.WriteString("data")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("stat = %v, %v; want mode 0644", fi, err)
	}
	boom := errors.New("boom")
	if err := writeFileAtomic(filepath.Join(dir, "g"), func(*os.File) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("err = %v, want boom", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 1 {
		t.Errorf("files left behind: %v", left)
	}
}

func TestNewestCachedKernel(t *testing.T) {
	dir := t.TempDir()
	mk := func(version string, modulesUnder string) {
		root := filepath.Join(dir, version)
		if err := os.MkdirAll(filepath.Join(root, "boot"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "boot", "vmlinuz-"+version), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if modulesUnder != "" {
			if err := os.MkdirAll(filepath.Join(root, modulesUnder, "modules", version), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := newestCachedKernel(dir); err == nil {
		t.Error("empty cache: no error")
	}
	mk("6.1.0-9-amd64", "lib")
	mk("6.1.0-56-amd64", "usr/lib")
	mk("6.1.0-99-amd64", "")            // no modules: incomplete
	mk(".fetch-6.1.0-100-amd64", "lib") // an unpack under way
	k, err := newestCachedKernel(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k.Version != "6.1.0-56-amd64" || k.ModulesDir != filepath.Join(dir, "6.1.0-56-amd64", "usr", "lib", "modules", "6.1.0-56-amd64") {
		t.Errorf("newest = %+v", k)
	}
}

// TestHoldVM: HoldVM takes the same lock Run takes, and marks the context
// so that Run does not wait for it again.
func TestHoldVM(t *testing.T) {
	cache := t.TempDir()
	t.Setenv("CSI_DMTHIN_CACHE", cache)
	ctx, unlock, err := HoldVM(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ctx.Value(vmLockHeld{}) == nil {
		t.Error("the context does not say the lock is held")
	}
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := lockVM(short, cache); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the VM lock while HoldVM holds it: %v, want deadline exceeded", err)
	}
	unlock()
	u, err := lockVM(context.Background(), cache)
	if err != nil {
		t.Fatalf("the VM lock after HoldVM released it: %v", err)
	}
	u()
}
