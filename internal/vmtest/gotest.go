package vmtest

import (
	"context"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// guestEnv is set to "1" by /init for the payload.
const guestEnv = "CSI_DMTHIN_VM"

// InGuest reports whether this process runs inside the harness's VM.
func InGuest() bool { return os.Getenv(guestEnv) == "1" }

// RequireGuest skips t unless it runs inside the harness's VM. Kernel tests
// (files with //go:build vmtest) call it first, so that building them with
// -tags vmtest on a host skips them rather than failing on a missing
// device-mapper.
func RequireGuest(t testing.TB) {
	t.Helper()
	if !InGuest() {
		t.Skip("needs the vmtest VM; run through the package's TestVM")
	}
}

// Option adjusts the Spec that RunPackageTests runs.
type Option func(*Spec)

// WithTools adds host executables to the guest (see Spec.Tools).
func WithTools(names ...string) Option {
	return func(s *Spec) { s.Tools = append(s.Tools, names...) }
}

// WithModules adds kernel modules to load, on top of DefaultModules.
func WithModules(names ...string) Option {
	return func(s *Spec) {
		if s.Modules == nil {
			s.Modules = append([]string(nil), DefaultModules...)
		}
		s.Modules = append(s.Modules, names...)
	}
}

// WithMemoryMiB sets the guest's memory.
func WithMemoryMiB(n int) Option { return func(s *Spec) { s.MemoryMiB = n } }

// WithCPUs sets the guest's processor count.
func WithCPUs(n int) Option { return func(s *Spec) { s.CPUs = n } }

// WithEnv adds environment variables ("K=V") for the test binary.
func WithEnv(kv ...string) Option { return func(s *Spec) { s.Env = append(s.Env, kv...) } }

// WithFiles adds files to the guest (see Spec.Files).
func WithFiles(files map[string]string) Option {
	return func(s *Spec) {
		if s.Files == nil {
			s.Files = map[string]string{}
		}
		for g, h := range files {
			s.Files[g] = h
		}
	}
}

// WithArgs adds arguments for the test binary, after the ones derived from
// the outer test (e.g. "-test.bench=.", "-test.count=3").
func WithArgs(args ...string) Option { return func(s *Spec) { s.Args = append(s.Args, args...) } }

// guestPkgDir is where the package's testdata/ goes in the guest, and the test
// binary's working directory, mirroring `go test`'s run in the package dir.
const guestPkgDir = "/vmtest/pkg"

// maxTestdataBytes bounds the testdata/ copied into the initramfs (RAM).
const maxTestdataBytes = 64 << 20

// reportMargin is how long before the outer test's deadline the VM is
// stopped, so the failure is reported instead of go test's timeout panic.
const reportMargin = 10 * time.Second

// bootAllowance is what the inner -test.timeout leaves for boot and shutdown.
const bootAllowance = 30 * time.Second

// maxGuestTestTime caps one package's tests in the VM. Every package's
// kernel tests take a few minutes under TCG; a hung one must fail with its
// goroutine dump in this time instead of holding the VM lock, and every
// other package waiting for it, until the whole run's timeout.
const maxGuestTestTime = 15 * time.Minute

// RunPackageTests runs the calling package's tests in the VM. A package's
// host-side TestVM (in a file with //go:build !vmtest) calls it; its kernel
// tests live in files with //go:build vmtest.
//
// It builds the package's test binary (`go test -c -tags vmtest`,
// CGO_ENABLED=0, in the current directory, which go test makes the package
// directory), copies testdata/ to the guest, runs the binary there with
// -test.v and flags derived from the outer run, streams every guest line
// into t's log prefixed with "vm| ", and fails t when the binary exits
// non-zero or the VM does not complete.
//
// Derived flags: -test.short and -test.failfast as set outside;
// -test.timeout from t's deadline, at most maxGuestTestTime; and -test.run from the part of the outer
// -run pattern after "TestVM/": `go test -run 'TestVM/Pool' ./pkg/...`
// runs the guest's tests matching "Pool".
//
// When qemu, busybox-static or the kernel cannot be had, t is skipped with
// instructions, or failed when CI=true, so CI cannot pass without the VM.
func RunPackageTests(t *testing.T, opts ...Option) {
	t.Helper()
	if InGuest() {
		t.Skip("already inside the VM")
	}
	ctx := t.Context()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-reportMargin))
		defer cancel()
	}
	spec := packageSpec(ctx, t, guestTestArgs(ctx), opts)
	spec.Output = &testLogWriter{t: t}

	res, err := Run(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vm: boot %v, total %v (prepare %v)", res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond), res.Prepare.Round(time.Millisecond))
	if res.ExitCode != 0 {
		msg := fmt.Sprintf("tests in the VM failed: exit status %d", res.ExitCode)
		if c := kernelMessages(res.Console); c != "" {
			msg += "\nlast kernel console lines:\n" + tailLines(c, 20)
		}
		t.Error(msg)
	}
}

// PackageTest is RunPackageTests for a host test that runs the VM itself:
// several boots of it, power cuts (Spec.Disks, Spec.Cut). It checks the VM
// can be had (skipping t, or failing it when CI=true, as RunPackageTests
// does), builds the calling package's test binary with the vmtest tag once,
// and returns a Spec that runs it, with testdata/ in its working directory,
// as `<binary> -test.v -test.run=<run> -test.timeout=<what t has left>`
// and opts applied. The caller sets Output and the rest, and calls Run as
// often as it likes.
func PackageTest(t *testing.T, run string, opts ...Option) Spec {
	t.Helper()
	if InGuest() {
		t.Fatal("vmtest: PackageTest called inside the VM")
	}
	ctx := t.Context()
	args := []string{"-test.v", "-test.run=" + run}
	if d, ok := t.Deadline(); ok {
		if left := time.Until(d) - reportMargin; left > 0 {
			args = append(args, "-test.timeout="+left.Round(time.Second).String())
		}
	}
	return packageSpec(ctx, t, args, opts)
}

// packageSpec checks the prerequisites, builds the package's test binary
// and returns the Spec that runs it with args and then opts' arguments.
func packageSpec(ctx context.Context, t *testing.T, args []string, opts []Option) Spec {
	t.Helper()
	spec := Spec{}
	for _, o := range opts {
		o(&spec)
	}
	if err := checkPrerequisites(ctx); err != nil {
		unavailable(t, err)
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	statSources(dir)
	bin := filepath.Join(t.TempDir(), filepath.Base(dir)+".test")
	if err := buildTestBinary(ctx, dir, bin); err != nil {
		t.Fatal(err)
	}
	spec.Payload = bin
	if spec.Dir == "" {
		spec.Dir = guestPkgDir
	}
	if err := addTestdata(&spec, dir); err != nil {
		t.Fatal(err)
	}
	spec.Args = append(args, spec.Args...)
	return spec
}

// kernelMessages returns the console without what every boot prints (the
// firmware's banner, the power-off line), leaving the kernel's complaints.
func kernelMessages(console string) string {
	var keep []string
	for _, l := range strings.Split(console, "\n") {
		if i := strings.Index(l, "Booting from ROM.."); i >= 0 {
			l = l[i+len("Booting from ROM.."):]
		}
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "SeaBIOS") || strings.HasSuffix(l, "reboot: Power down") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

// Unavailable skips t, or fails it when CI=true, because something the VM
// tests need (err says what) is missing, with instructions to install it.
// A host test that drives the VM needs it only for what PackageTest does
// not check itself, such as a host tool that prepares a disk image.
func Unavailable(t testing.TB, err error) {
	t.Helper()
	unavailable(t, err)
}

// unavailable skips t, or fails it when CI=true, because no VM can be had.
func unavailable(t testing.TB, err error) {
	t.Helper()
	msg := fmt.Sprintf("%v\nTo run the VM tests: `make deps`, or `apt-get update && apt-get install qemu-system-x86 busybox-static`; the kernel is fetched with apt-get download.", err)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// checkPrerequisites reports what the VM needs and the host lacks.
func checkPrerequisites(ctx context.Context) error {
	if _, err := lookPathQEMU(); err != nil {
		return err
	}
	if _, err := findBusybox(); err != nil {
		return err
	}
	if _, err := FetchKernel(ctx); err != nil {
		return err
	}
	return nil
}

// statSources stats the package's Go files, the vmtest-tagged ones too. go
// test caches a test's result keyed on its own binary and on the files the
// test opened or stat'ed; the vmtest files are not in the host binary and
// are read by a child go command, so without this an edit to them alone
// would replay a cached TestVM result.
func statSources(dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
	for _, f := range files {
		_, _ = os.Stat(f)
	}
}

// buildTestBinary compiles the package in dir with the vmtest tag into a
// static test binary.
func buildTestBinary(ctx context.Context, dir, out string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("vmtest: no go command in PATH: %w", err)
	}
	cmd := exec.CommandContext(ctx, goBin, "test", "-c", "-tags", "vmtest", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "LC_ALL=C")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vmtest: go test -c -tags vmtest in %s: %v\n%s", dir, err, tailLines(string(b), 40))
	}
	return nil
}

// addTestdata puts the package's testdata/ tree (if any) under the guest's
// package directory.
func addTestdata(s *Spec, dir string) error {
	root := filepath.Join(dir, "testdata")
	if fi, err := os.Stat(root); err != nil || !fi.IsDir() {
		return nil
	}
	var total int64
	files := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := os.Stat(p) // follows links, as reading the file would
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		if total += fi.Size(); total > maxTestdataBytes {
			return fmt.Errorf("vmtest: %s holds more than %d MiB; pass what the guest needs with WithFiles", root, maxTestdataBytes>>20)
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		files[filepath.Join(s.Dir, rel)] = p
		return nil
	})
	if err != nil {
		return err
	}
	WithFiles(files)(s)
	return nil
}

// guestTestArgs derives the guest test binary's flags from the outer run.
func guestTestArgs(ctx context.Context) []string {
	args := []string{"-test.v"}
	if testing.Short() {
		args = append(args, "-test.short")
	}
	if f := flag.Lookup("test.failfast"); f != nil && f.Value.String() == "true" {
		args = append(args, "-test.failfast")
	}
	if f := flag.Lookup("test.run"); f != nil {
		if inner := innerRunPattern(f.Value.String()); inner != "" {
			args = append(args, "-test.run="+inner)
		}
	}
	limit := maxGuestTestTime
	if d, ok := ctx.Deadline(); ok {
		limit = min(limit, time.Until(d)-bootAllowance)
	}
	if limit > 0 {
		args = append(args, "-test.timeout="+limit.Round(time.Second).String())
	}
	return args
}

// innerRunPattern returns what follows the first top-level "/" of a -run
// pattern ("TestVM/Pool/create" -> "Pool/create"), or "" when there is
// none. Slashes inside brackets or parentheses do not split, as in go test.
func innerRunPattern(p string) string {
	brackets, parens := 0, 0
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++ // an escaped character never splits
		case '[':
			brackets++
		case ']':
			brackets = max(brackets-1, 0)
		case '(':
			if brackets == 0 {
				parens++
			}
		case ')':
			if brackets == 0 {
				parens--
			}
		case '/':
			if brackets == 0 && parens == 0 {
				return p[i+1:]
			}
		}
	}
	return ""
}

// testLogWriter passes each guest line to the test's log (t.Output: indented
// like t.Log, without a source location) with a prefix, so that go test and
// test2json never read the guest's "--- FAIL" as the host's.
type testLogWriter struct{ t *testing.T }

func (w *testLogWriter) Write(p []byte) (int, error) {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimSuffix(string(p), "\n"), "\n") {
		b.WriteString(guestLinePrefix + l + "\n")
	}
	_, _ = io.WriteString(w.t.Output(), b.String())
	return len(p), nil
}

// guestLinePrefix marks the guest's lines in the host test's output.
const guestLinePrefix = "vm| "
