// Command csi-dmthin is the csi-dmthin CSI driver: one binary serving the
// Identity, Controller and Node services next to this node's dm-thin pools,
// the cluster's controller (one leader-elected Deployment), and the
// subcommands an operator reaches with `kubectl exec`.
//
//	csi-dmthin serve --node-id=$(NODE_NAME) --config=/etc/csi-dmthin/pools.yaml
//	csi-dmthin controller
//	csi-dmthin config check --config=/etc/csi-dmthin/pools.yaml
//	csi-dmthin pool status
//	csi-dmthin pool grow POOL [--data-file-size=40Gi]
//	csi-dmthin pool offline POOL
//	csi-dmthin volume list
//	csi-dmthin copy list
//	csi-dmthin copy probe --address=IP:9811 --cert-sha256=HEX --token-file=FILE --source=NODE/POOL/SNAPSHOT
//	csi-dmthin version
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usageText = `usage: csi-dmthin <command> [flags]

commands:
  serve          serve the CSI services on this node's pools
  controller     make the cluster's decisions (restore placement, content adoption), leader-elected
  config check   check a pools file (every problem at once), without the kernel
  pool status    show each pool's space, health and counts (asks the running driver)
  pool grow      grow a pool online onto larger devices or files (asks the running driver)
  pool offline   take a pool away from the running driver, for thin_check or thin_repair
  volume list    list the volumes and snapshots (asks the running driver)
  copy list      list the copies this node made or is making from other nodes (asks the running driver)
  copy probe     ask another node's copy server whether this node may copy a snapshot, moving nothing
  version        print the version

Run 'csi-dmthin <command> -h' for a command's flags.
`

// usageError is a mistake on the command line: exit status 2.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// newFlagSet is a subcommand's flag set: -h prints its flags and succeeds.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: csi-dmthin %s [flags]\n\nflags:\n", name)
		fs.PrintDefaults()
	}
	return fs
}

func main() {
	os.Exit(mainStatus(os.Args[1:], os.Stdout, os.Stderr))
}

// mainStatus runs the command in args and returns the exit status: 0 on
// success and for -h, 2 for a mistake on the command line, 1 otherwise.
func mainStatus(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return 2
	}
	sub := ""
	if len(args) > 1 {
		sub = args[1]
	}
	var err error
	switch cmd := args[0]; {
	case cmd == "serve":
		err = serve(args[1:])
	case cmd == "controller":
		err = controllerCmd(args[1:])
	case cmd == "config" && sub == "check":
		err = configCheck(args[2:])
	case cmd == "pool" && sub == "status":
		err = poolStatus(args[2:])
	case cmd == "pool" && sub == "grow":
		err = poolGrow(args[2:])
	case cmd == "pool" && sub == "offline":
		err = poolOffline(args[2:])
	case cmd == "volume" && sub == "list":
		err = volumeList(args[2:])
	case cmd == "copy" && sub == "list":
		err = copyList(args[2:])
	case cmd == "copy" && sub == "probe":
		err = copyProbe(args[2:], os.Stdin, stdout)
	case cmd == "selftest":
		err = selftest(args[1:])
	case cmd == "version":
		fmt.Fprintln(stdout, "csi-dmthin", version)
	case cmd == "-h" || cmd == "--help" || cmd == "help":
		fmt.Fprint(stdout, usageText)
	default:
		fmt.Fprintf(stderr, "csi-dmthin: unknown command %q\n%s", cmd, usageText)
		return 2
	}
	var ue usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "csi-dmthin:", err)
		return 2
	default:
		klog.Flush()
		fmt.Fprintln(stderr, "csi-dmthin:", err)
		return 1
	}
}

// adminFlags are the flags of the subcommands that ask the running driver;
// it returns the admin socket and the arguments after the flags.
func adminFlags(name string, args []string) (string, []string, error) {
	fs := newFlagSet(name)
	stateDir := fs.String("state-dir", defaultStateDir, "the driver's state directory (holds admin.sock)")
	if err := fs.Parse(args); err != nil {
		return "", nil, err
	}
	return adminSocket(*stateDir), fs.Args(), nil
}
