package blockcopy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// rawPost sends POST path with body and an optional Authorization header.
func rawPost(t *testing.T, ts *testServer, path, auth, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: pinnedTLS(t, ts.pin)}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodPost, "https://"+ts.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(msg)
}

// A refused call says why, counts the refusal, and never reaches the
// Opener.
func TestAuthRefusals(t *testing.T) {
	tests := []struct {
		name, auth string
		wantCode   int
		wantMsg    string
		reason     string
	}{
		{"no header", "", http.StatusUnauthorized, "missing bearer token", reasonMissingToken},
		{"not bearer", "Basic dXNlcjpwYXNz", http.StatusUnauthorized, "missing bearer token", reasonMissingToken},
		{"empty bearer", "Bearer ", http.StatusUnauthorized, "missing bearer token", reasonMissingToken},
		{"bearer without token", "Bearer", http.StatusUnauthorized, "missing bearer token", reasonMissingToken},
		{"refused token", "Bearer nonsense", http.StatusUnauthorized, "token refused", reasonTokenRefused},
		{"user not allowed", "Bearer token-of-mallory", http.StatusForbidden, `user "mallory" not allowed`, reasonUserNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opener := newFakeOpener(map[string]*image{"src": testImage()})
			m := NewMetrics("test")
			ts := startServer(t, opener, newFakeAuth(), func(o *ServerOptions) { o.Metrics = m })
			code, msg := rawPost(t, ts, "/v1/copies/copy-1/open", tt.auth, `{"sourceID":"src"}`)
			if code != tt.wantCode || !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("got %d %q, want %d containing %q", code, msg, tt.wantCode, tt.wantMsg)
			}
			if got := testutil.ToFloat64(m.authRefusals.WithLabelValues(tt.reason)); got != 1 {
				t.Errorf("refusals{reason=%s} = %v, want 1", tt.reason, got)
			}
			if n := opener.totalOpens(); n != 0 {
				t.Errorf("Opener.Open called %d times for a refused call", n)
			}
		})
	}
}

func TestBearerToken(t *testing.T) {
	for header, want := range map[string]string{
		"Bearer abc": "abc", "bearer abc": "abc", "BEARER  abc ": "abc",
		"": "", "Bearer": "", "Bearer ": "", "Basic abc": "", "Bearerabc": "",
	} {
		got, ok := bearerToken(header)
		if got != want || ok != (want != "") {
			t.Errorf("bearerToken(%q) = %q, %v; want %q", header, got, ok, want)
		}
	}
}

// Copy reports a refusal as ErrRefused and moves nothing.
func TestCopyRefused(t *testing.T) {
	for _, token := range []string{"", "nonsense", "token-of-mallory"} {
		opener := newFakeOpener(map[string]*image{"src": testImage()})
		ts := startServer(t, opener, newFakeAuth(), nil)
		target := &hookTarget{Target: newFileTarget(t, 8*mib)}
		req := baseRequest(ts, target, nil)
		req.Token = tokenFunc(token)
		_, err := Copy(context.Background(), req)
		if !errors.Is(err, ErrRefused) {
			t.Errorf("token %q: Copy = %v, want ErrRefused", token, err)
		}
		if opener.totalOpens() != 0 || target.written.Load() != 0 {
			t.Errorf("token %q: opened %d, wrote %d", token, opener.totalOpens(), target.written.Load())
		}
	}
}

// A client pinning another certificate fails the handshake before it
// sends anything: the server never sees the token.
func TestWrongPinSendsNoToken(t *testing.T) {
	auth := newFakeAuth()
	opener := newFakeOpener(map[string]*image{"src": testImage()})
	ts := startServer(t, opener, auth, nil)
	_, otherPin, err := LoadOrCreateCert(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	req := baseRequest(ts, newFileTarget(t, 8*mib), nil)
	req.Endpoint.CertSHA256 = otherPin
	if _, err := Copy(context.Background(), req); !errors.Is(err, ErrCertMismatch) {
		t.Fatalf("Copy = %v, want ErrCertMismatch", err)
	}
	if err := Release(context.Background(), req.Endpoint, goodToken, "copy-1"); !errors.Is(err, ErrCertMismatch) {
		t.Fatalf("Release = %v, want ErrCertMismatch", err)
	}
	if n := auth.seen.Load(); n != 0 {
		t.Errorf("the server saw %d tokens", n)
	}
	// The control: with the right pin the token does arrive.
	req.Endpoint.CertSHA256 = ts.pin
	if _, err := Copy(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if auth.seen.Load() == 0 {
		t.Error("the server saw no token with the right pin")
	}
}

func TestEndpointWithoutPinRefused(t *testing.T) {
	ts := startServer(t, newFakeOpener(nil), newFakeAuth(), nil)
	req := baseRequest(ts, newFileTarget(t, 8*mib), nil)
	req.Endpoint.CertSHA256 = ""
	if _, err := Copy(context.Background(), req); !errors.Is(err, ErrCertMismatch) {
		t.Fatalf("Copy without a pin = %v, want ErrCertMismatch", err)
	}
}

func TestServerIsTLS13Only(t *testing.T) {
	ts := startServer(t, newFakeOpener(nil), newFakeAuth(), nil)
	cfg := pinnedTLS(t, ts.pin)
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	if c, err := tls.Dial("tcp", ts.addr, cfg); err == nil {
		c.Close()
		t.Fatal("a TLS 1.2 handshake succeeded")
	}
	cfg = pinnedTLS(t, ts.pin)
	c, err := tls.Dial("tcp", ts.addr, cfg)
	if err != nil {
		t.Fatalf("TLS 1.3 handshake: %v", err)
	}
	c.Close()
}

// Bad IDs are a 400 naming the field, before the Opener is called.
func TestBadIDs(t *testing.T) {
	long := strings.Repeat("a", maxIDLen+1)
	tests := []struct {
		name, path, body, field string
	}{
		{"copyID with a space", "/v1/copies/bad%20id/open", `{"sourceID":"src"}`, "copyID"},
		{"copyID dot file", "/v1/copies/.hidden/open", `{"sourceID":"src"}`, "copyID"},
		{"copyID too long", "/v1/copies/" + long + "/open", `{"sourceID":"src"}`, "copyID"},
		{"copyID with a slash", "/v1/copies/a%2Fb/open", `{"sourceID":"src"}`, "copyID"},
		{"sourceID path", "/v1/copies/copy-1/open", `{"sourceID":"../etc"}`, "sourceID"},
		{"sourceID empty", "/v1/copies/copy-1/open", `{}`, "sourceID"},
		{"sourceID too long", "/v1/copies/copy-1/open", `{"sourceID":"` + long + `"}`, "sourceID"},
	}
	opener := newFakeOpener(map[string]*image{"src": testImage()})
	ts := startServer(t, opener, newFakeAuth(), nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, msg := rawPost(t, ts, tt.path, "Bearer "+goodToken, tt.body)
			if code != http.StatusBadRequest || !strings.Contains(msg, tt.field) {
				t.Errorf("got %d %q, want 400 naming %s", code, msg, tt.field)
			}
		})
	}
	if n := opener.totalOpens(); n != 0 {
		t.Errorf("Opener.Open called %d times", n)
	}
	// The client checks IDs before it connects.
	req := baseRequest(ts, newFileTarget(t, 8*mib), nil)
	req.SourceID = "a/../b"
	if _, err := Copy(context.Background(), req); !errors.Is(err, ErrInvalidID) || !strings.Contains(err.Error(), "sourceID") {
		t.Errorf("Copy with a bad sourceID = %v", err)
	}
	// And the control: a good request is a 200.
	if code, msg := rawPost(t, ts, "/v1/copies/copy-1/open", "Bearer "+goodToken, `{"sourceID":"src"}`); code != http.StatusOK || !bytes.Contains([]byte(msg), []byte("extentsSHA256")) {
		t.Errorf("good open = %d %q", code, msg)
	}
}

func TestValidateID(t *testing.T) {
	for id, ok := range map[string]bool{
		"copy-1": true, "pvc-0a1b.snap_2": true, "A": true, strings.Repeat("x", maxIDLen): true,
		"": false, ".": false, "..": false, "-x": false, "a/b": false, "a b": false, "é": false,
		strings.Repeat("x", maxIDLen+1): false, "a\x00": false,
	} {
		err := validateID("copyID", id)
		if (err == nil) != ok || err != nil && !errors.Is(err, ErrInvalidID) {
			t.Errorf("validateID(%q) = %v, want ok=%v", id, err, ok)
		}
	}
}

// Source IDs are the caller's names, "/"-separated: csi-dmthin's snapshot
// IDs are "<node>/<pool>/<name>". No segment may be empty, "." or "..".
func TestValidateSourceID(t *testing.T) {
	for id, ok := range map[string]bool{
		"src": true, "node-a/default/snapshot-1": true, "alpha/snap-1": true,
		"": false, "/a": false, "a/": false, "a//b": false, "a/../b": false, "a/./b": false, "../a": false,
		"a b/c": false, strings.Repeat("x/", maxSourceIDLen/2) + "x": false,
	} {
		err := validateSourceID(id)
		if (err == nil) != ok || err != nil && !errors.Is(err, ErrInvalidID) {
			t.Errorf("validateSourceID(%q) = %v, want ok=%v", id, err, ok)
		}
	}
}
