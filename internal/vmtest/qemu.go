package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Spec describes one run of a program in a fresh VM.
type Spec struct {
	// Payload is the host path of the program to run, placed at /payload in
	// the guest and run as: /payload Args... A static Go binary
	// (CGO_ENABLED=0) needs nothing else; a dynamically linked one gets the
	// libraries ldd lists.
	Payload string
	Args    []string
	// Env is extra environment for the payload ("K=V"). It is added to
	// PATH, HOME=/tmp and CSI_DMTHIN_VM=1, and may override them.
	Env []string
	// Dir is the payload's working directory in the guest; default /tmp.
	Dir string
	// Modules are kernel modules to load, by name ("dm-thin-pool", "loop").
	// Their dependencies are found from each module's .modinfo and loaded
	// first. nil means DefaultModules; an empty non-nil slice loads none.
	Modules []string
	// Tools are host executables (names looked up in PATH, or absolute
	// paths) put into the guest at the same path, with their libraries.
	Tools []string
	// Files are extra files: guest path -> host path. Guest paths under
	// /tmp, /run, /dev, /proc or /sys are refused: /init mounts over them.
	Files map[string]string
	// MemoryMiB is the guest's memory; default 2048.
	MemoryMiB int
	// CPUs is the guest's processor count; default 2.
	CPUs int
	// Output receives the payload's combined stdout and stderr while the VM
	// runs, one Write call per line (newline included), from one goroutine
	// at a time, as each line arrives: nothing is held back for a buffer to
	// fill. nil discards it.
	Output io.Writer
	// Disks are attached as virtio-blk disks in this order (vda, vdb, ...),
	// each with its serial; see Disk and diskCacheMode. With disks, the
	// virtio modules load too, and the payload starts once they are there.
	Disks []Disk
	// Cut, when closed while the VM runs, cuts its power: qemu is killed
	// with SIGKILL at once, with no shutdown and no sync in the guest (see
	// diskCacheMode for what that models). Run then returns a Result with
	// Cut set, not an error. Output still gets every whole line that left
	// the guest before the cut, and never a line the guest did not finish;
	// a payload that prints with Emit knows the host has those lines. A
	// Output.Write may close Cut, to cut the power on a line. Closing it
	// after the payload exited changes nothing.
	Cut <-chan struct{}
}

// Result is the outcome of a run in which the payload ran to completion, or
// whose power Spec.Cut cut.
type Result struct {
	ExitCode int // the payload's exit status (128+n if killed by signal n)
	// Cut says the power was cut (Spec.Cut) before the payload exited;
	// ExitCode is then 0 and means nothing.
	Cut     bool
	Console string // the kernel console (ttyS0, loglevel=3)
	// Prepare is the time spent before qemu started: kernel, initramfs,
	// waiting for the VM lock.
	Prepare time.Duration
	Boot    time.Duration // qemu start until the payload started
	Total   time.Duration // the whole Run call
}

const (
	defaultMemoryMiB = 2048
	defaultCPUs      = 2
	defaultDir       = "/tmp"
	// shutdownGrace is how long qemu may take to exit after the exit marker
	// (the guest syncs and powers off) before it is killed.
	shutdownGrace = 30 * time.Second
	// bootTimeout is how long a guest may take from qemu's start to the
	// payload's start marker. Under TCG a boot takes about 4 s on an idle
	// host and under a minute on one loaded tenfold; a guest still not
	// there after this has hung in its boot, and is killed and booted once
	// more (see run).
	bootTimeout = 5 * time.Minute
	// consoleTailLines is how much of the console an error carries.
	consoleTailLines = 60
	// maxConsoleBytes caps the console kept in memory.
	maxConsoleBytes = 8 << 20
)

// kernelCmdline keeps the console on ttyS0 and quiet, reboots (which with
// -no-reboot ends qemu) at once on a panic, and turns off the CPU
// vulnerability mitigations, which only slow an emulated CPU down.
//
// no_timer_check skips the boot's check that the timer interrupt works: it
// spins for a fixed number of TSC cycles (tens of milliseconds of the host's
// time under TCG) and panics ("IO-APIC + timer doesn't work!") unless more
// than four ticks came meanwhile, which a loaded host does not always let
// qemu deliver. The emulated timer does work; under KVM or Hyper-V the
// kernel turns the check off by itself.
const kernelCmdline = "console=ttyS0 panic=-1 loglevel=3 mitigations=off no_timer_check"

// Run boots a VM on the cached Debian kernel, runs the payload, powers the
// VM off and returns the payload's exit status. VM runs are serialized
// across processes by a lock in the cache directory.
//
// An error means the payload did not run to completion and its power was
// not cut: no exit marker came back (boot failure, kernel panic, ctx
// cancelled or its deadline passed).
// Such errors carry the console's last lines. qemu never outlives Run.
//
// A guest whose start marker has not reached the host within bootTimeout
// is killed. If the marker had not left it either (nothing of it came
// after the kill), the payload had not started, and a run without disks
// or a power cut boots again, once, with a notice on stderr that carries
// the first boot's console; a run with disks does not, since what the
// kernel did to them before the kill is not the payload's to meet. Else,
// or at a second such boot, the error is ErrBootTimeout.
func Run(ctx context.Context, s Spec) (*Result, error) {
	return run(ctx, s, nil)
}

// ErrBootTimeout is the error (wrapped) of a Run whose guest's start
// marker did not reach the host within the boot timeout (see Run).
var ErrBootTimeout = errors.New("vmtest: the guest did not start the payload in time")

// errNotStarted is in a boot timeout's error when nothing of the start
// marker came even after the kill: the payload had not started.
var errNotStarted = errors.New("nothing of the start marker came after the kill either")

// runHooks lets tests observe a run.
type runHooks struct {
	started     func(pid int) // called each time qemu has started
	bootTimeout time.Duration // replaces bootTimeout when not zero
}

func run(ctx context.Context, s Spec, hooks *runHooks) (*Result, error) {
	start := time.Now()
	if s.Payload == "" {
		return nil, errors.New("vmtest: Spec.Payload is empty")
	}
	if s.Modules == nil {
		s.Modules = DefaultModules
	}
	if err := checkDisks(s.Disks); err != nil {
		return nil, err
	}
	s.Modules = withDiskModules(s.Modules, s.Disks)
	if s.MemoryMiB <= 0 {
		s.MemoryMiB = defaultMemoryMiB
	}
	if s.CPUs <= 0 {
		s.CPUs = defaultCPUs
	}
	if s.Dir == "" {
		s.Dir = defaultDir
	}
	if s.Output == nil {
		s.Output = io.Discard
	}
	qemu, err := lookPathQEMU()
	if err != nil {
		return nil, err
	}
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	k, err := fetchKernel(ctx, filepath.Join(cache, "kernel"))
	if err != nil {
		return nil, err
	}
	plan, err := basePlan(ctx, k, s.Modules, s.Tools)
	if err != nil {
		return nil, err
	}
	base, err := buildBase(ctx, filepath.Join(cache, "initramfs"), k.Version, plan)
	if err != nil {
		return nil, err
	}
	nonce, err := newNonce()
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "vmtest-")
	if err != nil {
		return nil, fmt.Errorf("vmtest: %w", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	rp, err := runPlan(ctx, &s, nonce)
	if err != nil {
		return nil, err
	}
	initrd := filepath.Join(tmp, "initrd")
	if err := writeInitrd(ctx, initrd, base, rp); err != nil {
		return nil, err
	}

	// Two cores, and a TCG guest keeps both busy: one VM at a time.
	if ctx.Value(vmLockHeld{}) == nil {
		unlock, err := lockVM(ctx, cache)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}

	prepare := time.Since(start)
	res := &Result{Prepare: prepare}
	sock := filepath.Join(tmp, "payload.sock")
	err = boot(ctx, qemu, k, initrd, sock, nonce, &s, res, hooks)
	if errors.Is(err, errNotStarted) && len(s.Disks) == 0 && s.Cut == nil && ctx.Err() == nil {
		_, _ = fmt.Fprintf(os.Stderr, "vmtest: booting once more: %v\n", err)
		*res = Result{Prepare: prepare}
		err = boot(ctx, qemu, k, initrd, sock, nonce, &s, res, hooks)
	}
	res.Total = time.Since(start)
	if err != nil {
		return nil, err
	}
	return res, nil
}

// vmLockHeld is the context key HoldVM sets.
type vmLockHeld struct{}

// HoldVM takes the machine-wide VM lock (Run takes it for each VM) for a
// caller that runs VMs one after another, boots of the same disks between
// power cuts say, and wants no other process's VM in between: its time is
// then its own, and it is not starved by waiting for the lock again before
// each boot. Run with the returned context does not take the lock; it must
// be one Run at a time. unlock releases the lock.
func HoldVM(ctx context.Context) (context.Context, func(), error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, nil, err
	}
	unlock, err := lockVM(ctx, cache)
	if err != nil {
		return nil, nil, err
	}
	return context.WithValue(ctx, vmLockHeld{}, true), unlock, nil
}

// lockVM waits for the VM lock in the cache directory.
func lockVM(ctx context.Context, cache string) (func(), error) {
	vmLock := filepath.Join(cache, "vm.lock")
	// The notice goes to stderr, not Output: Output is the payload's alone.
	return lockFile(ctx, vmLock, func() {
		_, _ = fmt.Fprintf(os.Stderr, "vmtest: waiting for another process's VM to finish (lock %s)\n", vmLock)
	})
}

func lookPathQEMU() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("vmtest: qemu-system-x86_64 not found (install qemu-system-x86): %w", err)
	}
	return p, nil
}

func newNonce() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("vmtest: nonce: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// qemuArgs is the command line. The console (ttyS0) goes to qemu's stdout;
// the payload's port (ttyS1) to a unix socket that Run listens on. There is
// no network device, no display and no monitor; -no-reboot turns the guest's
// poweroff, reboot or panic into qemu's exit. Disks follow (diskArgs).
func qemuArgs(k *Kernel, initrd, sock string, s *Spec) []string {
	args := []string{
		"-machine", "pc", "-cpu", "max",
		"-m", strconv.Itoa(s.MemoryMiB), "-smp", strconv.Itoa(s.CPUs),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-nic", "none",
		"-serial", "stdio",
		"-chardev", "socket,id=payload,path=" + sock,
		"-serial", "chardev:payload",
		"-kernel", kernelImage(k), "-initrd", initrd,
		"-append", kernelCmdline,
	}
	return append(args, diskArgs(s.Disks)...)
}

// kernelImage is what qemu boots: the PVH image when there is one.
func kernelImage(k *Kernel) string {
	if k.PVH != "" {
		return k.PVH
	}
	return k.Vmlinuz
}

// boot runs qemu and fills res; see Run for the error contract.
func boot(ctx context.Context, qemu string, k *Kernel, initrd, sock, nonce string, s *Spec, res *Result, hooks *runHooks) error {
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("vmtest: listen for the payload port: %w", err)
	}
	defer func() { _ = ln.Close() }()

	console := &capBuffer{max: maxConsoleBytes}
	stderr := &capBuffer{max: 64 << 10}
	cmd := exec.Command(qemu, qemuArgs(k, initrd, sock, s)...)
	cmd.Stdout = console
	cmd.Stderr = stderr
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	// If this process dies (a test binary's timeout panic), the kernel kills
	// qemu too. The signal follows the OS thread that started qemu, and Go
	// ends a thread only when a goroutine locked to it exits, which nothing
	// here does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	qemuStart := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("vmtest: start %s: %w", qemu, err)
	}
	if hooks != nil && hooks.started != nil {
		hooks.started(cmd.Process.Pid)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	pr := &portReader{nonce: nonce, out: s.Output, startSeen: make(chan struct{}), exitSeen: make(chan struct{})}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		pr.serve(ln)
	}()

	limit := bootTimeout
	if hooks != nil && hooks.bootTimeout != 0 {
		limit = hooks.bootTimeout
	}
	booting := time.NewTimer(limit)
	defer booting.Stop()

	var (
		waitErr   error
		cause     error
		cut       bool
		grace     <-chan time.Time
		startSeen = pr.startSeen
		bootLimit = booting.C
		exitSeen  = pr.exitSeen
		cutReq    = s.Cut
	)
wait:
	for {
		select {
		case waitErr = <-exited:
			break wait
		case <-startSeen:
			startSeen, bootLimit = nil, nil
		case <-bootLimit:
			cause = fmt.Errorf("%w: no start marker %v after qemu started", ErrBootTimeout, limit)
			_ = cmd.Process.Kill()
			waitErr = <-exited
			break wait
		case <-exitSeen:
			exitSeen = nil
			cutReq = nil // the payload is done: nothing left to cut
			grace = time.After(shutdownGrace)
		case <-grace:
			// The payload finished; the guest just failed to power off.
			_ = cmd.Process.Kill()
			grace = nil
		case <-cutReq:
			// The power cut: SIGKILL, so neither qemu nor the guest gets
			// to flush or sync anything. The reader goes on to the end of
			// what qemu had written to the socket.
			pr.cutPower()
			_ = cmd.Process.Kill()
			waitErr = <-exited
			cut = true
			break wait
		case <-ctx.Done():
			cause = context.Cause(ctx)
			_ = cmd.Process.Kill()
			waitErr = <-exited
			break wait
		}
	}
	_ = ln.Close() // ends an Accept that qemu never answered
	<-readerDone
	res.Console = cleanConsole(console.String())
	if at := pr.startTime(); !at.IsZero() {
		res.Boot = at.Sub(qemuStart)
	}

	code, ok := pr.result()
	if ok {
		res.ExitCode = code
		return nil
	}
	if cut {
		res.Cut = true
		return nil
	}
	var detail string
	if e := tailLines(stderr.String(), 20); e != "" {
		detail += "\nqemu stderr:\n" + e
	}
	detail += "\nlast console lines:\n" + tailLines(res.Console, consoleTailLines)
	switch {
	case errors.Is(cause, ErrBootTimeout) && pr.startTime().IsZero():
		return fmt.Errorf("%w (%w)%s", cause, errNotStarted, detail)
	case errors.Is(cause, ErrBootTimeout):
		return fmt.Errorf("%w; the start marker came after the kill%s", cause, detail)
	case cause != nil:
		return fmt.Errorf("vmtest: stopped before the payload finished: %w%s", cause, detail)
	case waitErr != nil:
		return fmt.Errorf("vmtest: qemu failed before the payload finished: %v%s", waitErr, detail)
	default:
		return fmt.Errorf("vmtest: the VM powered off without the payload's exit marker (boot failure or kernel panic?)%s", detail)
	}
}

// portReader reads the payload's serial port: it streams lines to out and
// watches for the start and exit markers.
type portReader struct {
	nonce     string
	out       io.Writer
	startSeen chan struct{} // closed at the start marker, if not nil
	exitSeen  chan struct{} // closed at the exit marker

	mu       sync.Mutex
	startAt  time.Time
	exitCode int
	exitOK   bool
	cut      bool // the power was cut: a last line without its newline is cut off too
}

// cutPower tells the reader that the power is being cut, before qemu dies.
func (p *portReader) cutPower() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
}

func (p *portReader) wasCut() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cut
}

func (p *portReader) startTime() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.startAt
}

func (p *portReader) result() (int, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitCode, p.exitOK
}

// serve accepts qemu's connection and reads it until qemu closes it. Each
// line goes out as soon as its newline arrives: the buffered reader returns
// what the socket has, it does not wait to fill up.
func (p *portReader) serve(ln net.Listener) {
	conn, err := ln.Accept()
	if err != nil {
		return
	}
	defer func() { _ = conn.Close() }()
	br := bufio.NewReaderSize(conn, 64<<10)
	startSeen := false
	for {
		line, err := br.ReadString('\n')
		if err != nil && line != "" && p.wasCut() {
			// The end of the stream with no newline: the power went in the
			// middle of the line, which the guest never finished.
			return
		}
		if line != "" {
			startSeen = p.line(strings.TrimRight(line, "\r\n"), startSeen)
		}
		if err != nil {
			return
		}
	}
}

// line handles one line of the port and returns whether the start marker
// has been seen. A marker may follow output that did not end in a newline.
func (p *portReader) line(l string, startSeen bool) bool {
	if !startSeen && strings.Contains(l, startMarker+p.nonce) {
		p.mu.Lock()
		p.startAt = time.Now()
		p.mu.Unlock()
		if p.startSeen != nil {
			close(p.startSeen)
		}
		return true
	}
	if i := strings.Index(l, exitMarker+p.nonce+" "); i >= 0 {
		if i > 0 {
			p.emit(l[:i])
		}
		code, err := strconv.Atoi(strings.TrimSpace(l[i+len(exitMarker+p.nonce+" "):]))
		p.mu.Lock()
		if err == nil && !p.exitOK {
			p.exitCode, p.exitOK = code, true
			close(p.exitSeen)
		}
		p.mu.Unlock()
		return startSeen
	}
	p.emit(l)
	return startSeen
}

func (p *portReader) emit(l string) {
	_, _ = io.WriteString(p.out, l+"\n")
}

// capBuffer is a goroutine-safe buffer that keeps at most about max bytes,
// dropping the oldest half when it overflows.
type capBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (c *capBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	if c.buf.Len() > c.max {
		keep := c.buf.Bytes()[c.buf.Len()-c.max/2:]
		c.buf = *bytes.NewBuffer(append([]byte(nil), keep...))
	}
	return len(p), nil
}

func (c *capBuffer) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// cleanConsole drops carriage returns and the terminal control sequences
// that the firmware prints (ESC c, ESC [ ... letter).
func cleanConsole(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\r':
		case c == 0x1b && i+1 < len(s) && s[i+1] == '[':
			i += 2
			for i < len(s) && !(s[i] >= '@' && s[i] <= '~') {
				i++
			}
		case c == 0x1b:
			i++ // a two-byte sequence such as ESC c
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
