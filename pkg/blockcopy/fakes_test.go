package blockcopy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/klog/v2"
)

// image is a sparse device: data holds every byte, zeros in the holes.
type image struct {
	size    int64
	extents []Extent
	data    []byte
}

const kib, mib = 1 << 10, 1 << 20

// newImage fills extents with seeded random bytes.
func newImage(size int64, extents []Extent, seed uint64) *image {
	img := &image{size: size, extents: extents, data: make([]byte, size)}
	rng := rand.New(rand.NewPCG(seed, seed))
	for _, e := range extents {
		for i := e.Offset; i < e.Offset+e.Length; i++ {
			img.data[i] = byte(rng.Uint32())
		}
	}
	return img
}

// testImage is 8 MiB with 3.75 MiB mapped in four extents, the last one
// ending at the end of the device.
func testImage() *image {
	return newImage(8*mib, []Extent{
		{Offset: 0, Length: 192 * kib},
		{Offset: 1 * mib, Length: 1536 * kib},
		{Offset: 4 * mib, Length: 64 * kib},
		{Offset: 6 * mib, Length: 2 * mib},
	}, 1)
}

func (img *image) mapped() int64 { return mappedBytes(img.extents, 0) }

// memSource is one Open of an image. It refuses reads once closed, and
// fails a read covering failAt (when >= 0).
type memSource struct {
	img       *image
	failAt    int64
	gateAt    int64         // a read at or past gateAt (when >= 0) ...
	gate      chan struct{} // ... waits for gate to close
	readBytes *atomic.Int64
	closed    atomic.Bool
}

func (s *memSource) ReadAt(p []byte, off int64) (int, error) {
	if s.closed.Load() {
		return 0, errors.New("read of a closed source")
	}
	if s.gateAt >= 0 && off+int64(len(p)) > s.gateAt {
		<-s.gate
	}
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(p)) {
		return 0, fmt.Errorf("injected I/O error at offset %d", s.failAt)
	}
	if off >= s.img.size {
		return 0, io.EOF
	}
	n := copy(p, s.img.data[off:])
	s.readBytes.Add(int64(n))
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (s *memSource) Size() int64       { return s.img.size }
func (s *memSource) Extents() []Extent { return append([]Extent(nil), s.img.extents...) }
func (s *memSource) Close() error {
	if s.closed.Swap(true) {
		return errors.New("closed twice")
	}
	return nil
}
func (s *memSource) BlockSizeBytes() int64 { return 64 * kib }

// fakeOpener opens images by source ID, the same bytes every time, and
// records what it was asked.
type fakeOpener struct {
	mu        sync.Mutex
	images    map[string]*image
	failAt    int64
	gateAt    int64
	gate      chan struct{}
	opens     map[string]int
	releases  map[string]int
	sources   []*memSource
	readBytes atomic.Int64
}

func newFakeOpener(images map[string]*image) *fakeOpener {
	return &fakeOpener{images: images, failAt: -1, gateAt: -1, opens: map[string]int{}, releases: map[string]int{}}
}

func (o *fakeOpener) Open(_ context.Context, copyID, sourceID string) (Source, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.opens[copyID]++
	img := o.images[sourceID]
	if img == nil {
		return nil, fmt.Errorf("%w: %s", ErrSourceNotFound, sourceID)
	}
	s := &memSource{img: img, failAt: o.failAt, gateAt: o.gateAt, gate: o.gate, readBytes: &o.readBytes}
	o.sources = append(o.sources, s)
	return s, nil
}

func (o *fakeOpener) Release(_ context.Context, copyID string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.releases[copyID]++
	return nil
}

func (o *fakeOpener) counts(copyID string) (opens, releases int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.opens[copyID], o.releases[copyID]
}

func (o *fakeOpener) totalOpens() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, c := range o.opens {
		n += c
	}
	return n
}

// fakeAuth maps tokens to users and counts every token it is shown.
type fakeAuth struct {
	users map[string]string
	seen  atomic.Int64
}

func (a *fakeAuth) Authenticate(_ context.Context, token string) (string, error) {
	a.seen.Add(1)
	if u, ok := a.users[token]; ok {
		return u, nil
	}
	return "", errors.New("unknown token")
}

const goodToken = "token-of-copier"

func newFakeAuth() *fakeAuth {
	return &fakeAuth{users: map[string]string{goodToken: "system:serviceaccount:csi:copier", "token-of-mallory": "mallory"}}
}

func allowCopier(user string) bool { return user == "system:serviceaccount:csi:copier" }

// testServer is a Server on loopback with its options and cert dir.
type testServer struct {
	*Server
	opts    ServerOptions
	certDir string
	pin     string
	addr    string
}

func startServer(t *testing.T, opener Opener, auth Authenticator, tweak func(*ServerOptions)) *testServer {
	t.Helper()
	certDir := t.TempDir()
	cert, pin, err := LoadOrCreateCert(certDir)
	if err != nil {
		t.Fatal(err)
	}
	opts := ServerOptions{Opener: opener, Auth: auth, Allowed: allowCopier, Cert: cert, Logger: klog.Background()}
	if tweak != nil {
		tweak(&opts)
	}
	ts := &testServer{opts: opts, certDir: certDir, pin: pin}
	ts.Server, ts.addr = serve(t, opts)
	return ts
}

func serve(t *testing.T, opts ServerOptions) (*Server, string) {
	t.Helper()
	s, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	return s, l.Addr().String()
}

func (ts *testServer) endpoint() Endpoint { return Endpoint{Address: ts.addr, CertSHA256: ts.pin} }

// fileTarget is a sparse file of the given size.
type fileTarget struct {
	*os.File
	size int64
}

func (f *fileTarget) Size() int64 { return f.size }

func newFileTarget(t *testing.T, size int64) *fileTarget {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "target"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileTarget{File: f, size: size}
}

// hookTarget counts what is written and runs afterWrite after each write.
type hookTarget struct {
	Target
	written    atomic.Int64
	afterWrite func(off int64, n int, total int64)
}

func (h *hookTarget) WriteAt(p []byte, off int64) (int, error) {
	n, err := h.Target.WriteAt(p, off)
	total := h.written.Add(int64(n))
	if h.afterWrite != nil {
		h.afterWrite(off, n, total)
	}
	return n, err
}

func tokenFunc(tok string) func() (string, error) {
	return func() (string, error) { return tok, nil }
}

// baseRequest copies source "src" as copy "copy-1".
func baseRequest(ts *testServer, target Target, cps Checkpoints) CopyRequest {
	return CopyRequest{
		Endpoint: ts.endpoint(), Token: tokenFunc(goodToken), CopyID: "copy-1", SourceID: "src",
		Target: target, Checkpoints: cps, MaxRetries: 3,
	}
}

// checkTarget compares the whole target with the image, and zeros past it.
func checkTarget(t *testing.T, target *fileTarget, img *image) {
	t.Helper()
	got := make([]byte, target.size)
	if _, err := target.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	for i := range got {
		want := byte(0)
		if int64(i) < img.size {
			want = img.data[i]
		}
		if got[i] != want {
			t.Fatalf("target byte %d is %#x, want %#x", i, got[i], want)
		}
	}
}

// proxy forwards loopback connections to a backend it can switch, and
// can cut its first connection after cutAfter bytes from the backend.
type proxy struct {
	l        net.Listener
	mu       sync.Mutex
	backend  string
	cutAfter int64
	conns    int
	open     []net.Conn
	onConn   func(n int) // called as connection n (from 0) is accepted
}

func startProxy(t *testing.T, backend string, cutAfter int64) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, backend: backend, cutAfter: cutAfter}
	go p.accept()
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.open {
			c.Close()
		}
	})
	return p
}

func (p *proxy) addr() string { return p.l.Addr().String() }

func (p *proxy) setBackend(addr string) {
	p.mu.Lock()
	p.backend = addr
	p.mu.Unlock()
}

func (p *proxy) connCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns
}

func (p *proxy) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		n, backend, onConn := p.conns, p.backend, p.onConn
		p.conns++
		p.mu.Unlock()
		if onConn != nil {
			onConn(n)
		}
		b, err := net.Dial("tcp", backend)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.open = append(p.open, c, b)
		p.mu.Unlock()
		closeBoth := func() { c.Close(); b.Close() }
		go func() { _, _ = io.Copy(b, c); closeBoth() }()
		go func() {
			if n == 0 && p.cutAfter > 0 {
				_, _ = io.CopyN(c, b, p.cutAfter)
			} else {
				_, _ = io.Copy(c, b)
			}
			closeBoth()
		}()
	}
}

// pinnedHTTPClient talks to ts trusting its pin, for raw requests.
func pinnedTLS(t *testing.T, pin string) *tls.Config {
	t.Helper()
	cfg, err := pinnedTLSConfig(pin)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func itoa(i int) string { return fmt.Sprint(i) }

func newBenchTarget(dir string, size int64) (*fileTarget, error) {
	f, err := os.Create(filepath.Join(dir, "target"))
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	return &fileTarget{File: f, size: size}, nil
}

// waitUnused waits for the server's handlers to be done with every open
// copy: a client has its answer a moment before the handler returns.
func (ts *testServer) waitUnused(t *testing.T) {
	t.Helper()
	for {
		ts.mu.Lock()
		busy := 0
		for _, oc := range ts.copies {
			busy += oc.users
		}
		ts.mu.Unlock()
		if busy == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
}
