package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"testing"

	"k8s.io/klog/v2"
)

// Tests run this binary again as a child process in one of these roles,
// named by childRoleEnv:
//
//   - "hold-lock": take the state directory's lock (childArgsEnv holds the
//     directory), say "locked" on stdout, and hold it until stdin closes.
//   - "serve": run `csi-dmthin serve` with the JSON array of arguments in
//     childArgsEnv, exactly as main does: the VM's SIGKILL test
//     (kill_kernel_test.go) kills and restarts it.
const (
	childRoleEnv = "CSI_DMTHIN_TEST_CHILD"
	childArgsEnv = "CSI_DMTHIN_TEST_CHILD_ARGS"
)

// The SIGKILL test's knobs (kill_kernel_test.go), which TestVM passes to
// the guest: how many times the server is killed (default 30), and the
// seed of its random choices (default: the time; the test logs it).
const (
	killsEnv    = "CSI_DMTHIN_KILLS"
	killSeedEnv = "CSI_DMTHIN_KILL_SEED"
)

func TestMain(m *testing.M) {
	switch role := os.Getenv(childRoleEnv); role {
	case "":
		os.Exit(m.Run())
	case "hold-lock":
		l, err := lockStateDir(os.Getenv(childArgsEnv))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("locked")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until stdin closes
		l.release()
		os.Exit(0)
	case "serve":
		var args []string
		if err := json.Unmarshal([]byte(os.Getenv(childArgsEnv)), &args); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", childArgsEnv, err)
			os.Exit(2)
		}
		if err := serve(args); err != nil {
			klog.Flush()
			fmt.Fprintln(os.Stderr, "csi-dmthin:", err)
			os.Exit(1)
		}
		klog.Flush()
		os.Exit(0)
	default:
		fmt.Fprintf(os.Stderr, "%s=%q: unknown role\n", childRoleEnv, role)
		os.Exit(2)
	}
}
