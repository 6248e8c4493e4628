// Command csi-dmthin is the csi-dmthin CSI driver: one binary serving the
// Identity, Controller and Node services next to this node's dm-thin pools,
// plus the subcommands an operator reaches with `kubectl exec`.
//
//	csi-dmthin serve --node-id=$(NODE_NAME) --config=/etc/csi-dmthin/pools.yaml
//	csi-dmthin pool status
//	csi-dmthin volume list
//	csi-dmthin version
package main

import (
	"flag"
	"fmt"
	"os"

	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func usage() {
	fmt.Fprint(os.Stderr, `usage: csi-dmthin <command> [flags]

commands:
  serve          serve the CSI services on this node's pools
  pool status    show each pool's space, health and counts (asks the running driver)
  volume list    list the volumes and snapshots (asks the running driver)
  version        print the version

Run 'csi-dmthin <command> -h' for a command's flags.
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch cmd := os.Args[1]; {
	case cmd == "serve":
		err = serve(os.Args[2:])
	case cmd == "pool" && len(os.Args) > 2 && os.Args[2] == "status":
		err = poolStatus(os.Args[3:])
	case cmd == "volume" && len(os.Args) > 2 && os.Args[2] == "list":
		err = volumeList(os.Args[3:])
	case cmd == "version":
		fmt.Println("csi-dmthin", version)
	case cmd == "-h" || cmd == "--help" || cmd == "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "csi-dmthin: unknown command %q\n", cmd)
		usage()
		os.Exit(2)
	}
	if err != nil {
		klog.Flush()
		fmt.Fprintln(os.Stderr, "csi-dmthin:", err)
		os.Exit(1)
	}
}

// adminFlags are the flags of the subcommands that ask the running driver.
func adminFlags(name string, args []string) (string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	stateDir := fs.String("state-dir", defaultStateDir, "the driver's state directory (holds admin.sock)")
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	return adminSocket(*stateDir), nil
}
