// Package nodessh is the SSH server of the e2e nodes, and the client the
// harness checks it with.
//
// Kubernetes' e2e framework reaches a node's shell only over SSH
// (test/e2e/framework/ssh): the storage suite's [Disruptive] specs stop and
// start kubelet with `systemctl` through it and look at the node's mounts
// with `mount | grep`. The nodes run no sshd (their root filesystem is a
// minimal Debian without one, and the framework needs nothing of OpenSSH
// but "exec"), so this package is the smallest server the framework's
// client works with: one host key, one authorized public key and one user,
// all given by the harness for the run; each "exec" request runs
// `/bin/sh -c <command>` as the server's own user (root on a node) with a
// fixed environment, and ends with the command's exit status, or the signal
// that ended it.
//
// # What it must not do
//
// It offers no shell, no pty, no port forwarding, no subsystem (sftp), no
// agent forwarding and no other authentication than that one key: every
// such request is refused. It listens where it is told, which on a node is
// the node's address on the bridge inside the test's network namespace, so
// nothing outside that namespace can reach it.
package nodessh
