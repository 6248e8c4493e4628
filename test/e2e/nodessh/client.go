package nodessh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"

	"golang.org/x/crypto/ssh"
)

// Result is what a command said and how it ended.
type Result struct {
	Stdout, Stderr string
	// Code is the exit status; 128+n for a command killed by signal n, as
	// the framework's client reports it too.
	Code int
}

// Run runs command on the server at addr as user, authenticating with key,
// and returns its output and exit status. A command that ran and failed is
// a Result with a non-zero Code and a nil error, as in the e2e framework's
// client; the error is for not getting that far. hostKey, when not nil, is
// the only server key accepted.
func Run(ctx context.Context, addr, user string, key ssh.Signer, hostKey ssh.PublicKey, command string) (Result, error) {
	hostCheck := ssh.InsecureIgnoreHostKey()
	if hostKey != nil {
		hostCheck = ssh.FixedHostKey(hostKey)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return Result{}, err
	}
	// The SSH layer knows nothing of ctx: closing the connection is what
	// ends a handshake or a command that ctx gave up on.
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	cc, chans, reqs, err := ssh.NewClientConn(conn, addr, &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(key)},
		HostKeyCallback: hostCheck,
	})
	if err != nil {
		_ = conn.Close()
		return Result{}, fmt.Errorf("nodessh: %s@%s: %w", user, addr, errors.Join(err, ctx.Err()))
	}
	client := ssh.NewClient(cc, chans, reqs)
	defer func() { _ = client.Close() }()
	session, err := client.NewSession()
	if err != nil {
		return Result{}, fmt.Errorf("nodessh: %s@%s: session: %w", user, addr, err)
	}
	defer func() { _ = session.Close() }()
	var stdout, stderr bytes.Buffer
	session.Stdout, session.Stderr = &stdout, &stderr
	err = session.Run(command)
	res := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	var exit *ssh.ExitError
	switch {
	case errors.As(err, &exit):
		res.Code = exit.ExitStatus()
	case err != nil:
		return res, fmt.Errorf("nodessh: %s@%s: %q: %w", user, addr, command, errors.Join(err, ctx.Err()))
	}
	return res, nil
}
