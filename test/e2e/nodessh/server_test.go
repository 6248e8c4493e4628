package nodessh

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// keyPair returns a fresh ed25519 key as a signer.
func keyPair(t *testing.T) ssh.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testServer is a Server on a loopback port, with the client key it accepts.
type testServer struct {
	addr    string
	client  ssh.Signer
	hostKey ssh.PublicKey
	log     *syncBuffer
	// stop closes the listener and waits until every connection has
	// ended, so the log is complete.
	stop func()
}

const testPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func startServer(t *testing.T, grace time.Duration) *testServer {
	t.Helper()
	host, client := keyPair(t), keyPair(t)
	ts := &testServer{client: client, hostKey: host.PublicKey(), log: &syncBuffer{}}
	srv, err := NewServer(Config{
		HostKey: host, AuthorizedKey: client.PublicKey(), User: "root",
		Env: []string{"PATH=" + testPath, "E2E_MARK=node"}, OutputGrace: grace,
		Log: log.New(ts.log, "", 0),
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	var once sync.Once
	ts.stop = func() {
		once.Do(func() {
			_ = l.Close()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	t.Cleanup(ts.stop)
	ts.addr = l.Addr().String()
	return ts
}

func (ts *testServer) run(t *testing.T, command string) Result {
	t.Helper()
	res, err := Run(t.Context(), ts.addr, "root", ts.client, ts.hostKey, command)
	if err != nil {
		t.Fatalf("%q: %v", command, err)
	}
	return res
}

// A client runs a command through sh -c and gets its output, its exit
// status and the server's fixed environment, as the e2e framework's client
// reads them.
func TestRunCommand(t *testing.T) {
	ts := startServer(t, 0)
	for _, tc := range []struct {
		command string
		want    Result
	}{
		{"true", Result{}},
		{"echo out; echo err >&2; exit 3", Result{Stdout: "out\n", Stderr: "err\n", Code: 3}},
		{`echo "$PATH $E2E_MARK"; pwd`, Result{Stdout: testPath + " node\n/\n"}},
		// What the storage suite runs: a pipeline whose grep finds nothing.
		{"echo /var/lib/kubelet/pods/x | grep uid-1 | grep -v volume-subpaths", Result{Code: 1}},
		{"no-such-command-here", Result{Stderr: "/bin/sh: 1: no-such-command-here: not found\n", Code: 127}},
		// Killed by a signal: exit-signal, which the client reports as 128+n.
		{"kill -TERM $$", Result{Code: 128 + int(syscall.SIGTERM)}},
	} {
		got := ts.run(t, tc.command)
		if tc.command == "no-such-command-here" && strings.Contains(got.Stderr, "not found") {
			// bash and dash word it differently; the code is the point.
			got.Stderr = tc.want.Stderr
		}
		if got != tc.want {
			t.Errorf("%q: %+v, want %+v", tc.command, got, tc.want)
		}
	}
	if out := ts.log.String(); !strings.Contains(out, `"echo out; echo err >&2; exit 3": exit 3`) || !strings.Contains(out, `"kill -TERM $$": signal TERM`) {
		t.Errorf("server log lacks the commands and how they ended:\n%s", out)
	}
}

// A command that leaves a daemon holding its stdout (a `systemctl start`
// whose daemon did not redirect) still ends the session, with its status.
func TestRunCommandBackgroundHoldsOutput(t *testing.T) {
	ts := startServer(t, 100*time.Millisecond)
	got := ts.run(t, "sleep 600 & echo $!")
	pid, err := strconv.Atoi(strings.TrimSpace(got.Stdout))
	if err != nil {
		t.Fatalf("%+v: no pid", got)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if got.Code != 0 {
		t.Errorf("exit code %d, want 0", got.Code)
	}
	if !strings.Contains(ts.log.String(), "something it started holds it") {
		t.Errorf("server log does not say why the session waited:\n%s", ts.log.String())
	}
}

// Only the authorized key of the configured user gets in, and a client
// that pins the host key refuses another server.
func TestRefused(t *testing.T) {
	ts := startServer(t, 0)
	ctx := t.Context()
	if _, err := Run(ctx, ts.addr, "root", keyPair(t), nil, "true"); err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Errorf("another key: %v, want unable to authenticate", err)
	}
	if _, err := Run(ctx, ts.addr, "admin", ts.client, nil, "true"); err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Errorf("another user: %v, want unable to authenticate", err)
	}
	if _, err := Run(ctx, ts.addr, "root", ts.client, keyPair(t).PublicKey(), "true"); err == nil || !strings.Contains(err.Error(), "host key mismatch") {
		t.Errorf("another host key: %v, want host key mismatch", err)
	}
	ts.stop()
	if out := ts.log.String(); !strings.Contains(out, "is not the authorized one") || !strings.Contains(out, `user "admin" is not "root"`) {
		t.Errorf("server log does not say why it refused:\n%s", out)
	}
}

// The server runs commands and nothing else: no shell, no pty, no
// subsystem, no port forwarding, one command per session.
func TestOnlyExec(t *testing.T) {
	ts := startServer(t, 0)
	client, err := ssh.Dial("tcp", ts.addr, &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(ts.client)}, HostKeyCallback: ssh.FixedHostKey(ts.hostKey),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = client.Close() }()
	// refused runs f on a new session; f returns an error when the
	// server said no.
	refused := func(what string, f func(*ssh.Session) error) {
		t.Helper()
		s, err := client.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = s.Close() }()
		if err := f(s); err == nil {
			t.Errorf("%s: accepted", what)
		}
	}
	refused("shell", func(s *ssh.Session) error { return s.Shell() })
	refused("pty", func(s *ssh.Session) error { return s.RequestPty("xterm", 24, 80, ssh.TerminalModes{}) })
	refused("subsystem", func(s *ssh.Session) error { return s.RequestSubsystem("sftp") })
	refused("env", func(s *ssh.Session) error { return s.Setenv("E2E_MARK", "client") })
	// The first command waits for a file the test makes once the second
	// request has had its answer, so the session is surely still running.
	release := filepath.Join(t.TempDir(), "release")
	refused("second exec", func(s *ssh.Session) error {
		if err := s.Start("while [ ! -e " + release + " ]; do sleep 0.05; done"); err != nil {
			t.Fatal(err)
		}
		ok, err := s.SendRequest("exec", true, ssh.Marshal(struct{ Command string }{"true"}))
		if err := os.WriteFile(release, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := s.Wait(); err != nil {
			t.Errorf("the first command: %v", err)
		}
		if err != nil || !ok {
			return errors.Join(err, errors.New("refused"))
		}
		return nil
	})
	if _, err := client.Dial("tcp", "127.0.0.1:1"); err == nil {
		t.Error("port forwarding: accepted")
	}
	if _, err := client.Listen("tcp", "127.0.0.1:0"); err == nil {
		t.Error("remote port forwarding: accepted")
	}
}

func TestNewServerNeedsKeysAndUser(t *testing.T) {
	k := keyPair(t)
	for _, cfg := range []Config{
		{AuthorizedKey: k.PublicKey(), User: "root"},
		{HostKey: k, User: "root"},
		{HostKey: k, AuthorizedKey: k.PublicKey()},
	} {
		if _, err := NewServer(cfg); err == nil {
			t.Errorf("%+v: accepted", cfg)
		}
	}
}

// The harness writes the authorized key as an authorized_keys line.
func TestParseAuthorizedKey(t *testing.T) {
	k := keyPair(t).PublicKey()
	got, err := ParseAuthorizedKey(append(ssh.MarshalAuthorizedKey(k), '\n'))
	if err != nil || string(got.Marshal()) != string(k.Marshal()) {
		t.Errorf("round trip: %v, %v", got, err)
	}
	if _, err := ParseAuthorizedKey([]byte("not a key")); err == nil {
		t.Error("garbage accepted")
	}
}

// syncBuffer is a log sink the server's goroutines write and the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
