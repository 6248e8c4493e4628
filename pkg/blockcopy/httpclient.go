package blockcopy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Release tells the server at ep the copy is over: it drops the source it
// kept for copyID (Opener.Release). Releasing an unknown or released copy
// succeeds.
func Release(ctx context.Context, ep Endpoint, token, copyID string) error {
	if err := validateID("copyID", copyID); err != nil {
		return err
	}
	c, err := newClient(ep, func() (string, error) { return token, nil })
	if err != nil {
		return err
	}
	defer c.hc.CloseIdleConnections()
	resp, err := c.do(ctx, http.MethodDelete, "/v1/copies/"+url.PathEscape(copyID), nil, nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// client makes the requests of one Copy or Release.
type client struct {
	base  string
	hc    *http.Client
	token func() (string, error)
}

func newClient(ep Endpoint, token func() (string, error)) (*client, error) {
	if ep.Address == "" {
		return nil, errors.New("blockcopy: Endpoint.Address is empty")
	}
	tlsConfig, err := pinnedTLSConfig(ep.CertSHA256)
	if err != nil {
		return nil, err
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}
	return &client{
		base:  "https://" + ep.Address,
		token: token,
		hc: &http.Client{Transport: &http.Transport{
			DialContext:         dialer.DialContext,
			TLSClientConfig:     tlsConfig,
			TLSHandshakeTimeout: 10 * time.Second,
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     90 * time.Second,
		}},
	}, nil
}

// statusError is a server's error answer.
type statusError struct {
	code int
	kind string // the errorKindHeader
	msg  string
}

func (e *statusError) Error() string {
	return fmt.Sprintf("copy server answered %d: %s", e.code, e.msg)
}

func (e *statusError) Unwrap() error {
	switch {
	case e.code == http.StatusUnauthorized || e.code == http.StatusForbidden:
		return ErrRefused
	case e.kind == kindInvalidID:
		return ErrInvalidID
	case e.kind == kindConflict:
		return ErrConflict
	case e.kind == kindNotFound:
		return ErrSourceNotFound
	case e.kind == kindSource:
		return ErrSource
	}
	return nil
}

func (e *statusError) retryable() bool {
	return e.kind == kindStopping || e.code >= 500 && e.kind != kindSource
}

// do sends a request with the token and returns a 2xx response, or the
// error the server answered.
func (c *client) do(ctx context.Context, method, path string, q url.Values, body []byte) (*http.Response, error) {
	token, err := c.token()
	if err != nil {
		return nil, fmt.Errorf("get the bearer token: %w", err)
	}
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorMessage))
	return nil, &statusError{code: resp.StatusCode, kind: resp.Header.Get(errorKindHeader), msg: strings.TrimSpace(string(msg))}
}

func (c *client) postJSON(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	resp, err := c.do(ctx, http.MethodPost, path, nil, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return decodeJSON(resp.Body, out)
}

func (c *client) getJSON(ctx context.Context, path string, q url.Values, out any) error {
	resp, err := c.do(ctx, http.MethodGet, path, q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return decodeJSON(resp.Body, out)
}

func decodeJSON(r io.Reader, out any) error {
	if err := json.NewDecoder(io.LimitReader(r, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("%w: decode the answer: %w", errBroken, err)
	}
	return nil
}
