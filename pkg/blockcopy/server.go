package blockcopy

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// ServerOptions configure a Server. Opener, Auth, Allowed and Cert are
// required.
type ServerOptions struct {
	Opener Opener
	Auth   Authenticator
	// Allowed says whether an authenticated user may copy.
	Allowed func(user string) bool
	Cert    tls.Certificate
	// RateBytesPerSec caps the data this server sends, all copies
	// together; 0 is no cap.
	RateBytesPerSec int64
	Metrics         *Metrics
	// IdleRelease releases (Opener.Release) a copy no request used for
	// this long: its target vanished. 0 never does.
	IdleRelease time.Duration
	// Logger defaults to klog.Background().
	Logger klog.Logger
}

// Server serves copies' sources on the source node.
type Server struct {
	opts    ServerOptions
	log     klog.Logger
	limiter *limiter
	http    *http.Server
	now     func() time.Time // a test hook

	mu       sync.Mutex
	copies   map[string]*openCopy
	streams  map[*http.Request]net.Conn // long requests, aborted by Shutdown
	stopping bool
	stop     chan struct{}
	reaper   sync.WaitGroup
}

// openCopy is one copyID's open Source.
type openCopy struct {
	sourceID string
	ready    chan struct{} // closed once Open returned; then src or err is set
	src      Source
	err      error
	info     openResponse
	users    int       // requests using src
	lastUsed time.Time // when users last dropped to 0
	released bool      // out of the map; close src when users drops to 0
}

type connKey struct{}

// NewServer checks opts and returns a Server; Serve starts it.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Opener == nil || opts.Auth == nil || opts.Allowed == nil {
		return nil, errors.New("blockcopy: ServerOptions need Opener, Auth and Allowed")
	}
	if len(opts.Cert.Certificate) == 0 {
		return nil, errors.New("blockcopy: ServerOptions need Cert")
	}
	log := opts.Logger
	if log.GetSink() == nil {
		log = klog.Background()
	}
	s := &Server{
		opts:    opts,
		log:     log.WithName("blockcopy"),
		now:     time.Now,
		copies:  map[string]*openCopy{},
		streams: map[*http.Request]net.Conn{},
		stop:    make(chan struct{}),
	}
	s.limiter = newLimiter(opts.RateBytesPerSec, func() time.Time { return s.now() })
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/copies/{copyID}/open", s.handleOpen)
	mux.HandleFunc("GET /v1/copies/{copyID}/data", s.handleData)
	mux.HandleFunc("GET /v1/copies/{copyID}/digest", s.handleDigest)
	mux.HandleFunc("DELETE /v1/copies/{copyID}", s.handleRelease)
	s.http = &http.Server{
		Handler:           s.authenticate(mux),
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{opts.Cert},
		},
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	if opts.IdleRelease > 0 {
		s.reaper.Add(1)
		go s.reapLoop()
	}
	return s, nil
}

// Serve accepts TLS connections on l until Shutdown; it returns
// http.ErrServerClosed after Shutdown.
func (s *Server) Serve(l net.Listener) error {
	return s.http.Serve(tls.NewListener(l, s.http.TLSConfig))
}

// Shutdown stops the server: it stops accepting, aborts data streams and
// digests at once (a client resumes them, from this server restarted or
// another), waits for the other requests until ctx is done, and closes
// the open sources without releasing them, so a resumed copy finds what
// the Opener kept for it.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.stopping {
		s.stopping = true
		close(s.stop)
	}
	for _, c := range s.streams {
		_ = c.Close()
	}
	s.mu.Unlock()
	err := s.http.Shutdown(ctx)
	if err != nil {
		_ = s.http.Close()
	}
	s.reaper.Wait()
	s.mu.Lock()
	var srcs []Source
	for id, oc := range s.copies {
		delete(s.copies, id)
		oc.released = true
		if oc.src != nil && oc.users == 0 {
			srcs = append(srcs, oc.src)
		}
	}
	s.mu.Unlock()
	for _, src := range srcs {
		s.closeSource(src)
	}
	return err
}

// Auth refusal reasons, the values of the auth refusals metric.
const (
	reasonMissingToken   = "missing_token"
	reasonTokenRefused   = "token_refused"
	reasonUserNotAllowed = "user_not_allowed"
)

type userKey struct{}

// authenticate refuses a request before any handler, and so before the
// Opener, sees it.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := bearerToken(r.Header.Get("Authorization"))
		if !ok {
			s.opts.Metrics.refuse(reasonMissingToken)
			http.Error(w, "missing bearer token (Authorization: Bearer <token>)", http.StatusUnauthorized)
			return
		}
		user, err := s.opts.Auth.Authenticate(r.Context(), token)
		if err != nil {
			s.opts.Metrics.refuse(reasonTokenRefused)
			s.log.V(2).Info("Refused a copy request", "reason", reasonTokenRefused, "remote", r.RemoteAddr, "err", err)
			http.Error(w, "token refused: "+err.Error(), http.StatusUnauthorized)
			return
		}
		if !s.opts.Allowed(user) {
			s.opts.Metrics.refuse(reasonUserNotAllowed)
			s.log.V(2).Info("Refused a copy request", "reason", reasonUserNotAllowed, "user", user, "remote", r.RemoteAddr)
			http.Error(w, fmt.Sprintf("user %q not allowed to copy", user), http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), userKey{}, user)))
	})
}

// bearerToken returns the token of an "Authorization: Bearer <token>"
// header; the scheme is case-insensitive (RFC 9110, 11.1).
func bearerToken(header string) (string, bool) {
	scheme, token, ok := strings.Cut(header, " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", false
	}
	return token, true
}

// errStatus maps the package's errors to an HTTP status.
func errStatus(err error) int {
	switch {
	case errors.Is(err, ErrInvalidID):
		return http.StatusBadRequest
	case errors.Is(err, ErrConflict):
		return http.StatusConflict
	case errors.Is(err, ErrSourceNotFound):
		return http.StatusNotFound
	case errors.Is(err, errStopping):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

var errStopping = errors.New("copy server shutting down")

// errorKindHeader names, on an error answer, which of the package's
// errors it is, so the client can wrap the same sentinel and knows
// whether to retry.
const errorKindHeader = "Blockcopy-Error"

const (
	kindInvalidID = "invalid-id"
	kindConflict  = "conflict"
	kindNotFound  = "not-found"
	kindSource    = "source"
	kindStopping  = "stopping"
)

func httpError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, ErrInvalidID):
		w.Header().Set(errorKindHeader, kindInvalidID)
	case errors.Is(err, ErrConflict):
		w.Header().Set(errorKindHeader, kindConflict)
	case errors.Is(err, ErrSourceNotFound):
		w.Header().Set(errorKindHeader, kindNotFound)
	case errors.Is(err, ErrSource):
		w.Header().Set(errorKindHeader, kindSource)
	case errors.Is(err, errStopping):
		w.Header().Set(errorKindHeader, kindStopping)
	}
	http.Error(w, err.Error(), errStatus(err))
}

func (s *Server) handleOpen(w http.ResponseWriter, r *http.Request) {
	copyID := r.PathValue("copyID")
	var req openRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10)).Decode(&req); err != nil {
		http.Error(w, "bad open request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	oc, err := s.acquire(r.Context(), copyID, req.SourceID, "")
	if err != nil {
		httpError(w, err)
		return
	}
	defer s.done(oc)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(oc.info)
}

// queryIDs reads the sourceID and extentsSHA256 of data and digest.
func queryIDs(r *http.Request) (sourceID, extentsSHA256 string) {
	q := r.URL.Query()
	return q.Get("sourceID"), q.Get("extentsSHA256")
}

func (s *Server) handleData(w http.ResponseWriter, r *http.Request) {
	copyID := r.PathValue("copyID")
	sourceID, extentsHash := queryIDs(r)
	from, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
	if err != nil || from < 0 {
		http.Error(w, fmt.Sprintf("bad offset %q", r.URL.Query().Get("offset")), http.StatusBadRequest)
		return
	}
	oc, release, ok := s.streamSource(w, r, copyID, sourceID, extentsHash)
	if !ok {
		return
	}
	defer release()

	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	buf := make([]byte, s.frameBytes())
	var sent int64
	for _, e := range oc.info.Extents {
		for off := max(e.Offset, from); off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := s.limiter.wait(r.Context(), n); err != nil {
				return // the client went away
			}
			// A client that stopped reading, without closing, must not
			// hold the source open for ever.
			_ = rc.SetWriteDeadline(time.Now().Add(frameWriteTimeout))
			if err := readFull(oc.src, buf[:n], off); err != nil {
				s.log.Error(err, "Source read failed; ending the copy's stream with the error", "copyID", copyID, "sourceID", sourceID)
				_ = writeErrorFrame(w, fmt.Sprintf("source %s: %v", sourceID, err))
				return
			}
			if err := writeDataHeader(w, off, int(n)); err != nil {
				return
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return
			}
			s.opts.Metrics.addSent(n)
			sent += n
			off += n
		}
	}
	_ = writeEnd(w, sent)
}

// frameWriteTimeout bounds the write of one frame to a client.
const frameWriteTimeout = 2 * time.Minute

// frameBytes is the data frames' largest payload: maxFramePayload, or
// under a rate limit a quarter second's bytes (in 4 KiB, so frames stay
// block aligned), so that a slow copy still shows the client a frame
// every quarter second rather than looking stalled.
func (s *Server) frameBytes() int64 {
	if s.opts.RateBytesPerSec <= 0 {
		return maxFramePayload
	}
	return min(max(s.opts.RateBytesPerSec/4/(4<<10)*(4<<10), 4<<10), maxFramePayload)
}

// streamSource tracks r as a long request (Shutdown cuts it) and gets
// its copy's open source; ok is false when it answered with an error.
// release undoes both.
func (s *Server) streamSource(w http.ResponseWriter, r *http.Request, copyID, sourceID, extentsHash string) (oc *openCopy, release func(), ok bool) {
	if !s.trackStream(r) {
		httpError(w, errStopping)
		return nil, nil, false
	}
	oc, err := s.acquire(r.Context(), copyID, sourceID, extentsHash)
	if err != nil {
		s.untrackStream(r)
		httpError(w, err)
		return nil, nil, false
	}
	return oc, func() {
		s.done(oc)
		s.untrackStream(r)
	}, true
}

func (s *Server) handleDigest(w http.ResponseWriter, r *http.Request) {
	copyID := r.PathValue("copyID")
	sourceID, extentsHash := queryIDs(r)
	oc, release, ok := s.streamSource(w, r, copyID, sourceID, extentsHash)
	if !ok {
		return
	}
	defer release()
	sum, err := DigestSHA256(oc.src, oc.info.Extents)
	if err != nil {
		s.log.Error(err, "Source read failed while hashing", "copyID", copyID, "sourceID", sourceID)
		httpError(w, fmt.Errorf("%w: source %s: %w", ErrSource, sourceID, err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(digestResponse{SHA256: sum})
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request) {
	copyID := r.PathValue("copyID")
	if err := validateID("copyID", copyID); err != nil {
		httpError(w, err)
		return
	}
	if err := s.release(r.Context(), copyID); err != nil {
		httpError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// trackStream records a long request's connection for Shutdown to abort;
// false when the server is already stopping.
func (s *Server) trackStream(r *http.Request) bool {
	c, _ := r.Context().Value(connKey{}).(net.Conn)
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn() // closing under TLS could wait on the writer
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return false
	}
	if c != nil {
		s.streams[r] = c
	}
	return true
}

func (s *Server) untrackStream(r *http.Request) {
	s.mu.Lock()
	delete(s.streams, r)
	s.mu.Unlock()
}

// acquire returns copyID's open source, opening it (once, however many
// requests ask together) when the server does not have it. extentsHash,
// when not empty, must be the open source's. The caller calls done.
func (s *Server) acquire(ctx context.Context, copyID, sourceID, extentsHash string) (*openCopy, error) {
	if err := validateID("copyID", copyID); err != nil {
		return nil, err
	}
	if err := validateSourceID(sourceID); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return nil, errStopping
	}
	oc := s.copies[copyID]
	if oc != nil {
		if oc.sourceID != sourceID {
			s.mu.Unlock()
			return nil, fmt.Errorf("%w: copy %s is open for source %s, not %s", ErrConflict, copyID, oc.sourceID, sourceID)
		}
		oc.users++
		s.mu.Unlock()
		select {
		case <-oc.ready:
		case <-ctx.Done():
			s.done(oc)
			return nil, ctx.Err()
		}
		if oc.err != nil {
			s.done(oc)
			return nil, oc.err
		}
	} else {
		oc = &openCopy{sourceID: sourceID, ready: make(chan struct{}), users: 1}
		s.copies[copyID] = oc
		s.mu.Unlock()
		src, err := s.open(ctx, copyID, sourceID, oc)
		s.mu.Lock()
		if err != nil {
			oc.err = err
			if s.copies[copyID] == oc {
				delete(s.copies, copyID)
			}
		} else {
			oc.src = src
			s.opts.Metrics.inProgressAdd(roleSource, 1)
		}
		close(oc.ready)
		s.mu.Unlock()
		if err != nil {
			s.done(oc)
			return nil, err
		}
	}
	if extentsHash != "" && extentsHash != oc.info.ExtentsSHA256 {
		s.done(oc)
		return nil, fmt.Errorf("%w: source %s of copy %s now has extents %s, the copy started with %s", ErrConflict, sourceID, copyID, oc.info.ExtentsSHA256, extentsHash)
	}
	return oc, nil
}

// open calls the Opener and checks what it returned; oc.info is set on
// success.
func (s *Server) open(ctx context.Context, copyID, sourceID string, oc *openCopy) (Source, error) {
	src, err := s.opts.Opener.Open(ctx, copyID, sourceID)
	if err != nil {
		return nil, fmt.Errorf("open source %s for copy %s: %w", sourceID, copyID, err)
	}
	size, extents := src.Size(), src.Extents()
	if err := checkExtents(size, extents); err != nil {
		_ = src.Close()
		return nil, fmt.Errorf("source %s: %w", sourceID, err)
	}
	oc.info = openResponse{SizeBytes: size, Extents: extents, ExtentsSHA256: ExtentsSHA256(size, extents)}
	if oc.info.Extents == nil {
		oc.info.Extents = []Extent{}
	}
	if bs, ok := src.(BlockSizer); ok {
		oc.info.BlockSizeBytes = bs.BlockSizeBytes()
	}
	s.log.V(2).Info("Opened a copy's source", "copyID", copyID, "sourceID", sourceID, "sizeBytes", size, "mappedBytes", mappedBytes(extents, 0))
	return src, nil
}

// done ends a request's use of oc.
func (s *Server) done(oc *openCopy) {
	s.mu.Lock()
	oc.users--
	oc.lastUsed = s.now()
	closeNow := oc.users == 0 && oc.released && oc.src != nil
	s.mu.Unlock()
	if closeNow {
		s.closeSource(oc.src)
	}
}

func (s *Server) closeSource(src Source) {
	s.opts.Metrics.inProgressAdd(roleSource, -1)
	if err := src.Close(); err != nil {
		s.log.Error(err, "Closing a copy's source failed")
	}
}

// release drops copyID's open source (closed once no request uses it)
// and calls Opener.Release; an unknown copyID is released all the same,
// which makes release idempotent and works after a restart.
func (s *Server) release(ctx context.Context, copyID string) error {
	s.mu.Lock()
	oc := s.copies[copyID]
	if oc != nil {
		delete(s.copies, copyID)
		oc.released = true
	}
	s.mu.Unlock()
	if oc != nil {
		select { // an Open under way: let it finish first
		case <-oc.ready:
		case <-ctx.Done():
			return ctx.Err()
		}
		s.mu.Lock()
		closeNow := oc.users == 0 && oc.src != nil
		s.mu.Unlock()
		if closeNow {
			s.closeSource(oc.src)
		}
	}
	if err := s.opts.Opener.Release(ctx, copyID); err != nil {
		return fmt.Errorf("release copy %s: %w", copyID, err)
	}
	s.log.V(2).Info("Released a copy's source", "copyID", copyID)
	return nil
}

func (s *Server) reapLoop() {
	defer s.reaper.Done()
	t := time.NewTicker(max(s.opts.IdleRelease/4, time.Second))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.reapIdle()
		}
	}
}

// reapIdle releases the copies no request used for IdleRelease. They
// leave the map under the lock that found them idle, so a request
// arriving meanwhile opens the source again rather than using one being
// released.
func (s *Server) reapIdle() {
	now := s.now()
	idle := map[string]*openCopy{}
	s.mu.Lock()
	for id, oc := range s.copies {
		if oc.src != nil && oc.users == 0 && now.Sub(oc.lastUsed) > s.opts.IdleRelease {
			idle[id] = oc
			delete(s.copies, id)
			oc.released = true
		}
	}
	s.mu.Unlock()
	for id, oc := range idle {
		s.log.Info("Releasing an idle copy: its target went away", "copyID", id, "idleRelease", s.opts.IdleRelease)
		s.closeSource(oc.src)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := s.opts.Opener.Release(ctx, id); err != nil {
			s.log.Error(err, "Releasing an idle copy failed", "copyID", id)
		}
		cancel()
	}
}
