package main

import (
	"context"
	"net/http"
	"sync"
	"time"
)

// httpShutdownTimeout bounds how long the metrics and admin servers wait
// for their requests at shutdown before closing the connections; the gate
// still waits for the handlers to return.
const httpShutdownTimeout = 5 * time.Second

// gate counts the requests in progress in a server's handlers and, once
// closed, turns new ones away, so the handlers can be joined before the
// pools they read are closed. http.Server.Shutdown alone does not do it:
// past its deadline it returns with handlers still running.
type gate struct {
	mu      sync.Mutex
	closed  bool
	running sync.WaitGroup // Add only under mu and before closed
}

func (g *gate) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.running.Add(1)
	return true
}

func (g *gate) leave() { g.running.Done() }

// close turns new requests away and waits for those in progress.
func (g *gate) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.running.Wait()
}

// wrap passes requests to h while the gate is open.
func (g *gate) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !g.enter() {
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		defer g.leave()
		h.ServeHTTP(w, r)
	})
}

// stopHTTP shuts srv down, whose handler g wraps, and returns once none of
// its handlers runs.
func stopHTTP(srv *http.Server, g *gate) {
	ctx, cancel := context.WithTimeout(context.Background(), httpShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
	}
	g.close()
}
