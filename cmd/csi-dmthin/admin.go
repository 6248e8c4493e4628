package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"
	"time"

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

// adminPool is what the admin socket reads of a pool; *thinpool.Pool is one.
type adminPool interface {
	Usage() (thinpool.Usage, error)
	List() []thinpool.Volume
}

// adminServer serves the admin socket.
type adminServer struct {
	srv   *http.Server
	l     net.Listener
	calls gate
}

// listenAdmin makes the admin socket; serve serves it.
func listenAdmin(path string, pools map[string]adminPool) (*adminServer, error) {
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
	mux.HandleFunc("GET /volumes", func(w http.ResponseWriter, r *http.Request) {
		var out []volumeReport
		for _, n := range names {
			for _, v := range pools[n].List() {
				out = append(out, volumeReport{Pool: n, Volume: v})
			}
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	a := &adminServer{l: l}
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

func adminGet(sock, path string, into any) error {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := c.Get("http://csi-dmthin" + path)
	if err != nil {
		return fmt.Errorf("is the driver running? %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s", resp.Status, b)
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
	sock, err := adminFlags("pool status", args)
	if err != nil {
		return err
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
	sock, err := adminFlags("volume list", args)
	if err != nil {
		return err
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
