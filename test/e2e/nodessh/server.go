package nodessh

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// Config is what a Server accepts and how it runs commands.
type Config struct {
	HostKey ssh.Signer // the server's key, as the harness generated it
	// AuthorizedKey is the one client key accepted, and User the one user
	// name; a command runs as the server's own user whatever User says.
	AuthorizedKey ssh.PublicKey
	User          string
	Env           []string // every command's whole environment
	Dir           string   // every command's working directory ("" is /)
	// OutputGrace bounds the wait for a command's output to end once the
	// command itself has exited (0 is 10 s). A command that starts a daemon
	// in the background (`systemctl start kubelet`) must redirect the
	// daemon's output; if it does not, the daemon keeps the session's
	// stdout open and the session would never end.
	OutputGrace time.Duration
	Log         *log.Logger // one line per connection refused and per command; nil for none
}

// Server serves Config's one user over SSH, "exec" requests only.
type Server struct {
	cfg   Config
	ssh   *ssh.ServerConfig
	conns sync.WaitGroup
}

// handshakeTimeout bounds a connection's key exchange and authentication,
// so a peer that connects and says nothing does not hold a goroutine.
const handshakeTimeout = 30 * time.Second

// NewServer checks cfg and returns a server for it.
func NewServer(cfg Config) (*Server, error) {
	if cfg.HostKey == nil || cfg.AuthorizedKey == nil || cfg.User == "" {
		return nil, errors.New("nodessh: a host key, an authorized key and a user are required")
	}
	if cfg.Dir == "" {
		cfg.Dir = "/"
	}
	if cfg.OutputGrace == 0 {
		cfg.OutputGrace = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = log.New(io.Discard, "", 0)
	}
	s := &Server{cfg: cfg}
	want := cfg.AuthorizedKey.Marshal()
	s.ssh = &ssh.ServerConfig{
		ServerVersion: "SSH-2.0-csi-dmthin-e2e",
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if meta.User() != cfg.User {
				return nil, fmt.Errorf("nodessh: user %q is not %q", meta.User(), cfg.User)
			}
			if subtle.ConstantTimeCompare(key.Marshal(), want) != 1 {
				return nil, fmt.Errorf("nodessh: %s key %s is not the authorized one", key.Type(), ssh.FingerprintSHA256(key))
			}
			return &ssh.Permissions{}, nil
		},
	}
	s.ssh.AddHostKey(cfg.HostKey)
	return s, nil
}

// Serve accepts connections on l until l is closed, and returns once every
// connection it accepted has ended too: nil when l was closed.
func (s *Server) Serve(l net.Listener) error {
	defer s.conns.Wait()
	for {
		conn, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			s.serveConn(conn)
		}()
	}
}

func (s *Server) serveConn(conn net.Conn) {
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(handshakeTimeout))
	sc, chans, reqs, err := ssh.NewServerConn(conn, s.ssh)
	if err != nil {
		s.cfg.Log.Printf("%s: refused: %v", conn.RemoteAddr(), err)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	defer func() { _ = sc.Close() }()
	// Global requests (port forwarding, keepalives) are all answered no.
	go ssh.DiscardRequests(reqs)
	for nc := range chans {
		if nc.ChannelType() != "session" {
			_ = nc.Reject(ssh.UnknownChannelType, "only session channels")
			continue
		}
		ch, creqs, err := nc.Accept()
		if err != nil {
			continue
		}
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			s.serveSession(sc, ch, creqs)
		}()
	}
}

// serveSession runs the session's one "exec" request and refuses every
// other request (env, pty-req, shell, subsystem, signal, ...), and ends
// the session when the command ends.
func (s *Server) serveSession(sc *ssh.ServerConn, ch ssh.Channel, reqs <-chan *ssh.Request) {
	var once sync.Once
	for req := range reqs {
		if req.Type == "exec" {
			var payload struct{ Command string }
			started := false
			if err := ssh.Unmarshal(req.Payload, &payload); err == nil {
				once.Do(func() {
					started = true
					s.conns.Add(1)
					go func() {
						defer s.conns.Done()
						s.exec(sc, ch, payload.Command)
						_ = ch.Close()
					}()
				})
			}
			_ = req.Reply(started, nil)
			continue
		}
		if req.WantReply {
			_ = req.Reply(false, nil)
		}
	}
	// The client closed the channel: nothing was, or is, run for it.
	once.Do(func() { _ = ch.Close() })
}

// exec runs command with /bin/sh -c, its stdout and stderr going to the
// channel and its stdin empty, then sends EOF and how it ended: an
// "exit-status", or an "exit-signal" naming the signal that killed it
// (RFC 4254 section 6.10).
func (s *Server) exec(sc *ssh.ServerConn, ch ssh.Channel, command string) {
	start := time.Now()
	cmd := exec.Command("/bin/sh", "-c", command)
	cmd.Env = s.cfg.Env
	cmd.Dir = s.cfg.Dir
	cmd.Stdout = ch
	cmd.Stderr = ch.Stderr()
	cmd.WaitDelay = s.cfg.OutputGrace
	err := cmd.Run()
	_ = ch.CloseWrite()
	var how string
	switch ws, ok := waitStatus(cmd); {
	case ok && ws.Signaled():
		name := strings.TrimPrefix(unix.SignalName(ws.Signal()), "SIG")
		how = "signal " + name
		_, _ = ch.SendRequest("exit-signal", false, ssh.Marshal(struct {
			Signal     string
			CoreDumped bool
			Error      string
			Lang       string
		}{Signal: name, CoreDumped: ws.CoreDump()}))
	case ok:
		how = fmt.Sprintf("exit %d", ws.ExitStatus())
		sendStatus(ch, ws.ExitStatus())
	default:
		// It did not start (no /bin/sh): what a shell says of a command
		// it cannot run.
		how = fmt.Sprintf("not run: %v", err)
		_, _ = fmt.Fprintf(ch.Stderr(), "nodessh: %v\n", err)
		sendStatus(ch, 127)
	}
	// (os/exec says so only of a command that succeeded.)
	if errors.Is(err, exec.ErrWaitDelay) {
		how += fmt.Sprintf(" (its output was still open %s after it ended: something it started holds it)", s.cfg.OutputGrace)
	}
	s.cfg.Log.Printf("%s@%s: %q: %s in %s", sc.User(), sc.RemoteAddr(), command, how, time.Since(start).Round(time.Millisecond))
}

func waitStatus(cmd *exec.Cmd) (syscall.WaitStatus, bool) {
	if cmd.ProcessState == nil {
		return 0, false
	}
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	return ws, ok
}

func sendStatus(ch ssh.Channel, code int) {
	_, _ = ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{uint32(code)}))
}

// ParseAuthorizedKey reads the first key of an authorized_keys file.
func ParseAuthorizedKey(data []byte) (ssh.PublicKey, error) {
	key, _, _, _, err := ssh.ParseAuthorizedKey(bytes.TrimSpace(data))
	if err != nil {
		return nil, fmt.Errorf("nodessh: authorized key: %w", err)
	}
	return key, nil
}
