package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The running driver holds each pool's records open exclusively, so the
// operator's subcommands ask it, over a unix socket in the state directory
// that only root can reach (mode 0600).

func adminSocket(stateDir string) string { return filepath.Join(stateDir, "admin.sock") }

type poolReport struct {
	Name  string         `json:"name"`
	Usage thinpool.Usage `json:"usage"`
	Error string         `json:"error,omitempty"`
}

type volumeReport struct {
	Pool string `json:"pool"`
	thinpool.Volume
}

// adminPool is what the admin socket reads and does to a pool;
// *thinpool.Pool is one.
type adminPool interface {
	Usage() (thinpool.Usage, error)
	List() []thinpool.Volume
	GrowPool(ctx context.Context, req thinpool.GrowRequest) (thinpool.Growth, error)
	Offline(ctx context.Context) error
}

var _ adminPool = (*thinpool.Pool)(nil)

// growRequest is the body of POST /pools/{name}/grow: sizes as the pools
// file writes them, for a loop-file pool; empty to take up grown devices.
type growRequest struct {
	DataFileSize     quantity `json:"dataFileSize,omitempty"`
	MetadataFileSize quantity `json:"metadataFileSize,omitempty"`
}

// adminTimeout bounds a change the admin socket makes: a grow reloads one
// table, an offline removes the pool's devices.
const adminTimeout = 2 * time.Minute

// adminServer serves the admin socket.
type adminServer struct {
	srv   *http.Server
	l     net.Listener
	calls gate
	// copies, when set before serve, lists the node's copies (GET /copies).
	copies func() ([]csi.CopyStatus, error)
}

// listenAdmin makes the admin socket; serve serves it. changed, when set,
// is told the name of a pool that an admin call grew (grew true) or took
// offline, so that what reports on the pools looks at it again at once.
func listenAdmin(path string, pools map[string]adminPool, changed func(pool string, grew bool)) (*adminServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	names := make([]string, 0, len(pools))
	for n := range pools {
		names = append(names, n)
	}
	sort.Strings(names)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /pools", func(w http.ResponseWriter, r *http.Request) {
		var out []poolReport
		for _, n := range names {
			u, err := pools[n].Usage()
			rep := poolReport{Name: n, Usage: u}
			if err != nil {
				rep.Error = err.Error()
			}
			out = append(out, rep)
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	a := &adminServer{}
	mux.HandleFunc("GET /copies", func(w http.ResponseWriter, r *http.Request) {
		var out []csi.CopyStatus
		if a.copies != nil {
			var err error
			if out, err = a.copies(); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("GET /volumes", func(w http.ResponseWriter, r *http.Request) {
		var out []volumeReport
		for _, n := range names {
			for _, v := range pools[n].List() {
				out = append(out, volumeReport{Pool: n, Volume: v})
			}
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	if changed == nil {
		changed = func(string, bool) {}
	}
	mux.HandleFunc("POST /pools/{name}/grow", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		p, ok := pools[name]
		if !ok {
			http.Error(w, fmt.Sprintf("no pool %q on this node (pools: %s)", name, strings.Join(names, ", ")), http.StatusNotFound)
			return
		}
		var req growRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			http.Error(w, "grow request: "+err.Error(), http.StatusBadRequest)
			return
		}
		var gr thinpool.GrowRequest
		var err error
		if gr.DataFileBytes, err = req.DataFileSize.bytes(); err == nil {
			gr.MetadataFileBytes, err = req.MetadataFileSize.bytes()
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
		defer cancel()
		start := time.Now()
		g, err := p.GrowPool(ctx, gr)
		if g.Grew() {
			changed(name, true)
			klog.InfoS("Grew pool", "pool", name, "dataBytesBefore", g.DataBytesBefore, "dataBytes", g.DataBytes,
				"metadataBytesBefore", g.MetadataBytesBefore, "metadataBytes", g.MetadataBytes, "duration", time.Since(start))
		}
		if err != nil {
			http.Error(w, err.Error(), adminStatus(err))
			return
		}
		_ = json.NewEncoder(w).Encode(g)
	})
	mux.HandleFunc("POST /pools/{name}/offline", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		p, ok := pools[name]
		if !ok {
			http.Error(w, fmt.Sprintf("no pool %q on this node", name), http.StatusNotFound)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
		defer cancel()
		if err := p.Offline(ctx); err != nil {
			http.Error(w, err.Error(), adminStatus(err))
			return
		}
		changed(name, false)
		klog.InfoS("Pool taken offline: its calls fail until the driver restarts", "pool", name)
		fmt.Fprintf(w, "pool %s is offline: its dm devices are removed and its records closed; restart the driver (delete its pod) to bring it back\n", name)
	})
	a.l = l
	a.srv = &http.Server{Handler: a.calls.wrap(mux), ReadHeaderTimeout: 5 * time.Second}
	return a, nil
}

// serve serves until shutdown.
func (a *adminServer) serve() { _ = a.srv.Serve(a.l) }

// shutdown stops serving and returns once no request is in progress: none
// reads a pool after it. Safe before serve and more than once.
func (a *adminServer) shutdown() {
	stopHTTP(a.srv, &a.calls)
	_ = a.l.Close()
}

// adminStatus is the HTTP status for an error of a pool.
func adminStatus(err error) int {
	switch {
	case errors.Is(err, thinpool.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, thinpool.ErrBusy), errors.Is(err, thinpool.ErrPoolUnhealthy), errors.Is(err, thinpool.ErrClosed):
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}

func adminClient(sock string, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
}

func adminGet(sock, path string, into any) error {
	resp, err := adminClient(sock, 10*time.Second).Get("http://csi-dmthin" + path)
	if err != nil {
		return fmt.Errorf("is the driver running? %w", err)
	}
	return adminDecode(resp, into)
}

// adminPost posts body as JSON and decodes the answer into into, or
// returns it as text when into is a *string.
func adminPost(sock, path string, body, into any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	resp, err := adminClient(sock, adminTimeout+10*time.Second).Post("http://csi-dmthin"+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("is the driver running? %w", err)
	}
	return adminDecode(resp, into)
}

func adminDecode(resp *http.Response, into any) error {
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if s, ok := into.(*string); ok {
		b, err := io.ReadAll(resp.Body)
		*s = string(b)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(into)
}

func gib(b int64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) }

func pct(a, b int64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(a)/float64(b))
}

func poolStatus(args []string) error {
	sock, rest, err := adminFlags("pool status", args)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return usageError{fmt.Errorf("pool status takes flags only, not %q", rest)}
	}
	var pools []poolReport
	if err := adminGet(sock, "/pools", &pools); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POOL\tHEALTH\tMODE\tDATA USED\tDATA SIZE\tMETADATA USED\tPROVISIONED\tAVAILABLE\tVOLUMES\tSNAPSHOTS\tTEMPLATES")
	for _, p := range pools {
		u := p.Usage
		health := "ok"
		switch {
		case p.Error != "":
			health = "error: " + p.Error
		case u.Failed:
			health = "FAILED"
		case u.NeedsCheck:
			health = "NEEDS CHECK"
		case !u.Healthy():
			health = "degraded"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\n", p.Name, health, u.Mode,
			pct(u.DataUsedBytes, u.DataBytes), gib(u.DataBytes), pct(u.MetadataUsedBytes, u.MetadataBytes),
			gib(u.ProvisionedBytes), gib(u.AvailableBytes), u.Volumes, u.Snapshots, u.Templates)
	}
	return tw.Flush()
}

func volumeList(args []string) error {
	sock, rest, err := adminFlags("volume list", args)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return usageError{fmt.Errorf("volume list takes flags only, not %q", rest)}
	}
	var vols []volumeReport
	if err := adminGet(sock, "/volumes", &vols); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKIND\tSIZE\tSOURCE\tTHIN ID\tACTIVE\tCREATED")
	for _, v := range vols {
		src := v.Source
		if src == "" {
			src = "-"
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%d\t%v\t%s\n", v.Pool, v.Name, v.Kind, gib(v.SizeBytes), src, v.DeviceID, v.Active, v.CreatedAt.Format(time.RFC3339))
	}
	return tw.Flush()
}

// copyList is `csi-dmthin copy list`: the copies this node made or is
// making from other nodes, with how far each got.
func copyList(args []string) error {
	sock, rest, err := adminFlags("copy list", args)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return usageError{fmt.Errorf("copy list takes flags only, not %q", rest)}
	}
	var copies []csi.CopyStatus
	if err := adminGet(sock, "/copies", &copies); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VOLUME\tCLAIM\tSOURCE\tFROM NODE\tSTATE\tDURABLE TO\tSIZE\tSTARTED")
	for _, c := range copies {
		state := "waiting"
		switch {
		case c.Done:
			state = "done"
		case c.Running:
			state = "copying"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", c.Volume, cmp.Or(c.Claim, "-"), c.Source, c.SourceNode, state, c.Next, c.SizeBytes, c.CreatedAt.Format(time.RFC3339))
	}
	return tw.Flush()
}

// poolGrow is `csi-dmthin pool grow POOL`: the running driver grows the
// pool onto its grown devices, or extends a loop-file pool's files first.
func poolGrow(args []string) error {
	fs := newFlagSet("pool grow POOL")
	stateDir := fs.String("state-dir", defaultStateDir, "the driver's state directory (holds admin.sock)")
	dataSize := fs.String("data-file-size", "", "a loop-file pool: extend its data file to this size first (20Gi, 1.5Ti); a metadata file sized automatically follows")
	metaSize := fs.String("metadata-file-size", "", "a loop-file pool: extend its metadata file to this size first")
	pool, err := parseWithPool(fs, args)
	if err != nil {
		return err
	}
	req := growRequest{DataFileSize: quantity(*dataSize), MetadataFileSize: quantity(*metaSize)}
	for _, q := range []quantity{req.DataFileSize, req.MetadataFileSize} {
		if _, err := q.bytes(); err != nil {
			return usageError{err}
		}
	}
	var g thinpool.Growth
	if err := adminPost(adminSocket(*stateDir), "/pools/"+pool+"/grow", req, &g); err != nil {
		return err
	}
	if !g.Grew() {
		fmt.Printf("pool %s: nothing to grow: data %s, metadata %s; grow the devices (or give --data-file-size for a loop-file pool) first\n",
			pool, gib(g.DataBytes), mib(g.MetadataBytes))
	} else {
		fmt.Printf("pool %s: data %s -> %s, metadata %s -> %s; now %s of data and %s of metadata used, mode %s\n", pool,
			gib(g.DataBytesBefore), gib(g.DataBytes), mib(g.MetadataBytesBefore), mib(g.MetadataBytes),
			pct(g.Usage.DataUsedBytes, g.Usage.DataBytes), pct(g.Usage.MetadataUsedBytes, g.Usage.MetadataBytes), g.Usage.Mode)
	}
	if g.Deferred != "" {
		fmt.Printf("pool %s: %s\n", pool, g.Deferred)
	}
	return nil
}

// poolOffline is `csi-dmthin pool offline POOL`.
func poolOffline(args []string) error {
	fs := newFlagSet("pool offline POOL")
	stateDir := fs.String("state-dir", defaultStateDir, "the driver's state directory (holds admin.sock)")
	pool, err := parseWithPool(fs, args)
	if err != nil {
		return err
	}
	var out string
	if err := adminPost(adminSocket(*stateDir), "/pools/"+pool+"/offline", struct{}{}, &out); err != nil {
		return err
	}
	fmt.Print(out)
	return nil
}

// parseWithPool parses flags around one pool name.
func parseWithPool(fs *flag.FlagSet, args []string) (string, error) {
	// The pool may come before the flags too: pool grow fast --data-file-size=40Gi.
	var pool string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		pool, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	rest := fs.Args()
	if pool == "" && len(rest) > 0 {
		pool, rest = rest[0], rest[1:]
	}
	if pool == "" || len(rest) > 0 {
		return "", usageError{fmt.Errorf("%s: want one pool name", fs.Name())}
	}
	if !poolNameRE.MatchString(pool) {
		return "", usageError{fmt.Errorf("%q is not a pool name", pool)}
	}
	return pool, nil
}

func mib(b int64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }
