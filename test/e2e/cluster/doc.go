// Package cluster builds and runs the e2e test cluster: a Kubernetes control
// plane on the host and two (or more) nodes, each a qemu VM on Debian's
// kernel, all inside a network namespace that holds only loopback and the
// nodes' bridge.
//
// # What it owns
//
//   - versions.go: test/e2e/versions.env, the one file of pinned versions.
//   - tools.go: building Kubernetes, etcd, containerd, the CSI sidecars and
//     helm from the Go module proxy through the wrapper modules under
//     test/e2e/tools, cached by a hash of their go.mod, go.sum and flags.
//   - rootfs.go: the node's root filesystem (debootstrap), cached as a raw
//     image; each node writes to its own qcow2 overlay, kept for the run.
//   - preload.go: the images disk, containerd's root with every image
//     imported once on the host, which each node mounts through an overlay.
//   - netns.go: the isolated network namespace, the nodes' bridge and taps
//     in it, and the checks that refuse to run anything when it is not
//     isolated.
//   - pki.go: the cluster's certificates, generated in Go.
//   - proc.go: every process the harness starts, logged to one folder and
//     stopped by its pid.
//   - cluster.go: starting etcd, the apiserver, controller-manager and
//     scheduler, booting the nodes side by side and waiting for them to be
//     Ready, with one retry of a boot that hangs or soft-locks; cutting a
//     node's power and booting it again on the same disks.
//   - node.go: each node's share, init script, disks and qemu.
//   - nodeunits.go: what a node offers Kubernetes' e2e framework: its
//     daemons as units of a systemctl shim (which the init starts them
//     with), a sudo shim, crictl's configuration, and the SSH keys and
//     client for its SSH server (package nodessh).
//   - images.go: docker-archive image tarballs written in Go, for the
//     images disk (no registry exists).
//
// It must not reach any address outside the namespace, write a registry host
// name anywhere, or kill a process it did not start.
package cluster
