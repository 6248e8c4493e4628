package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
)

// copyProbe asks another node's copy server whether this node may copy a
// snapshot from it, moving no data: the certificate pin, the token and the
// source. For an operator (`kubectl exec` in a driver pod), and for the
// e2e test that checks who is refused.
func copyProbe(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := newFlagSet("copy probe")
	addr := fs.String("address", "", "host:port of the source node's copy server (its ThinPool's status.copy.address)")
	pin := fs.String("cert-sha256", "", "SHA-256 of the server's certificate (its ThinPool's status.copy.certSHA256)")
	tokenFile := fs.String("token-file", "", "the token to present; - reads it from standard input")
	source := fs.String("source", "", "the snapshot ID to ask for (<node>/<pool>/<name>)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() != 0:
		return usageError{fmt.Errorf("copy probe takes flags only, not %q", fs.Args())}
	case *addr == "" || *pin == "" || *tokenFile == "" || *source == "":
		return usageError{errors.New("copy probe needs --address, --cert-sha256, --token-file and --source")}
	}
	var b []byte
	var err error
	if *tokenFile == "-" {
		b, err = io.ReadAll(io.LimitReader(stdin, 64<<10))
	} else {
		b, err = os.ReadFile(*tokenFile)
	}
	if err != nil {
		return fmt.Errorf("--token-file: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return fmt.Errorf("--token-file %s: empty", *tokenFile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	host, _ := os.Hostname()
	info, err := blockcopy.Probe(ctx, blockcopy.Endpoint{Address: *addr, CertSHA256: *pin}, token, "probe-"+sanitizeID(host), *source)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s on %s: %d bytes mapped in %d extents, of %d bytes\n", *source, *addr, info.MappedBytes(), len(info.Extents), info.SizeBytes)
	return nil
}

// sanitizeID keeps the characters a copy ID may hold.
func sanitizeID(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			b.WriteRune(r)
		}
	}
	if b.Len() == 0 {
		return "x"
	}
	return b.String()
}
