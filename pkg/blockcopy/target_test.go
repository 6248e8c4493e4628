package blockcopy

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
)

// A copy that starts over on other extents (a volume's copy snapshot made
// again after the first was released) writes only the new extents: bytes
// an earlier attempt wrote into what is now a hole would stay, and the
// digest, over the new extents, would not see them. Opened tells the
// caller before anything is written, so it can give a fresh target: here
// the second attempt is refused by its Opened, writes nothing, and a
// fresh target gets exactly the new image.
func TestOpenedComesBeforeAnyWrite(t *testing.T) {
	old := newImage(8*mib, []Extent{{Offset: 0, Length: 4 * mib}}, 1)
	cur := newImage(8*mib, []Extent{{Offset: 2 * mib, Length: 2 * mib}}, 2)
	o := newFakeOpener(map[string]*image{"src": old})
	ts := startServer(t, o, newFakeAuth(), nil)
	file := newFileTarget(t, 8*mib)
	cps := newCheckpoints(t)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var opened []OpenInfo
	target := &hookTarget{Target: file, afterWrite: func(_ int64, _ int, total int64) {
		if total >= 3*mib {
			cancel()
		}
	}}
	req := baseRequest(ts, target, cps)
	req.CheckpointEvery = 256 * kib
	req.Opened = func(i OpenInfo) error { opened = append(opened, i); return nil }
	if _, err := Copy(ctx, req); err == nil {
		t.Fatal("first Copy finished; want it cancelled part way")
	}
	if err := Release(context.Background(), ts.endpoint(), goodToken, "copy-1"); err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	o.images["src"] = cur
	o.mu.Unlock()
	refuse := errors.New("the target holds other extents")
	var writes int
	req.Target = &hookTarget{Target: file, afterWrite: func(int64, int, int64) { writes++ }}
	req.Opened = func(i OpenInfo) error { opened = append(opened, i); return refuse }
	if _, err := Copy(context.Background(), req); !errors.Is(err, refuse) || writes != 0 {
		t.Fatalf("Copy with Opened refusing = %v after %d writes; want the refusal before any write", err, writes)
	}
	if len(opened) != 2 || opened[0].Resuming || opened[1].Resuming || opened[0].ExtentsSHA256 == opened[1].ExtentsSHA256 ||
		opened[0].MappedBytes != 4*mib || opened[1].MappedBytes != 2*mib || opened[1].SizeBytes != 8*mib {
		t.Errorf("Opened saw %+v", opened)
	}
	fresh := newFileTarget(t, 8*mib)
	req.Target, req.Opened = fresh, nil
	if _, err := Copy(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	checkTarget(t, fresh, cur)
}

// A target that fails (ENOSPC, EIO: a *PathError around an Errno, which is
// a net.Error too) ends the copy at once: another attempt writes to the
// same device.
func TestTargetErrorsAreNotRetried(t *testing.T) {
	ts := startServer(t, newFakeOpener(map[string]*image{"src": testImage()}), newFakeAuth(), nil)
	var writes int
	target := &failingTarget{Target: newFileTarget(t, 8*mib), writes: &writes}
	_, err := Copy(context.Background(), baseRequest(ts, target, newCheckpoints(t)))
	if !errors.Is(err, ErrTarget) || !errors.Is(err, syscall.ENOSPC) || writes != 1 {
		t.Errorf("Copy onto a full target = %v after %d writes; want ErrTarget and ENOSPC after one", err, writes)
	}
}

type failingTarget struct {
	Target
	writes *int
}

func (f *failingTarget) WriteAt(p []byte, off int64) (int, error) {
	*f.writes++
	return 0, &os.PathError{Op: "write", Path: "/dev/dm-3", Err: syscall.ENOSPC}
}
