// Command e2e-sshd is the e2e nodes' SSH server (package nodessh): the node's
// init starts it, as a unit of the node's systemctl, on the node's address,
// with the host key and the one authorized key the harness generated for
// the run. Every command runs as root with `/bin/sh -c`.
package main

import (
	"flag"
	"log"
	"net"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/nodessh"
)

func main() {
	listen := flag.String("listen", ":22", "address to listen on")
	hostKeyFile := flag.String("host-key", "", "the server's private key (OpenSSH or PEM)")
	authorizedFile := flag.String("authorized-key", "", "the one client public key accepted, as an authorized_keys line")
	user := flag.String("user", "root", "the one user name accepted (commands run as this server's own user, root on a node, whatever it is)")
	path := flag.String("path", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PATH of every command")
	flag.Parse()
	logger := log.New(os.Stderr, "e2e-sshd: ", log.LstdFlags)

	data, err := os.ReadFile(*hostKeyFile)
	if err != nil {
		logger.Fatal(err)
	}
	hostKey, err := ssh.ParsePrivateKey(data)
	if err != nil {
		logger.Fatalf("%s: %v", *hostKeyFile, err)
	}
	data, err = os.ReadFile(*authorizedFile)
	if err != nil {
		logger.Fatal(err)
	}
	authorized, err := nodessh.ParseAuthorizedKey(data)
	if err != nil {
		logger.Fatalf("%s: %v", *authorizedFile, err)
	}
	srv, err := nodessh.NewServer(nodessh.Config{
		HostKey: hostKey, AuthorizedKey: authorized, User: *user,
		Env: []string{"PATH=" + *path, "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/sh"},
		Log: logger,
	})
	if err != nil {
		logger.Fatal(err)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		logger.Fatal(err)
	}
	logger.Printf("listening on %s for %s, key %s; PATH %s", l.Addr(), *user, ssh.FingerprintSHA256(authorized), strings.TrimSpace(*path))
	logger.Fatal(srv.Serve(l))
}
