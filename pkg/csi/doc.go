// Package csi implements the CSI Identity, Controller and Node services of
// csi-dmthin on one node: it turns CSI calls into pkg/thinpool operations on
// this node's pools and into mounts (k8s.io/mount-utils).
//
// Every RPC validates its request (InvalidArgument naming the field, nothing
// changed), takes a per-ID lock (Aborted while another call holds it), looks
// the object up, returns the existing object for a repeated request or
// AlreadyExists for a conflicting one, acts, and maps errors to gRPC codes in
// one place (errors.go).
//
// Capacity and admission are pkg/thinpool's: GetCapacity reports the pool's
// Usage.AvailableBytes and a refused CreateVolume is the pool's ErrNoSpace
// (ResourceExhausted). Nothing here repeats the rule, and nothing here
// imports pkg/devmapper: a pool's mode is a thinpool.Mode.
//
// IDs (ids.go): a volume is "<pool>/<name>", a snapshot
// "<node>/<pool>/<name>" (the form without the node stays valid), so that
// the cluster's controller can tell a snapshot's node from its handle.
//
// No path outside the kubelet directory is mounted over, unmounted, made or
// removed (paths.go): a path a CO gives is checked on its string, then only
// reached through internal/safepath, resolved beneath the kubelet
// directory's descriptor without following any symbolic link, and mounted
// onto or unmounted through what that opened (mount_linux.go: the kernel's
// mount API, Linux 5.12 or later). A call that fails after it changed
// something (activated a device, made a directory) puts it back.
//
// Copies between nodes (copy.go, copysource.go): a restore of a snapshot
// whose ID names another node, or a clone whose PVC the cluster's
// controller marked with its source's node, is made here as an empty thin
// volume into which pkg/blockcopy streams the blocks the source maps, from
// the source node's driver. A copy record, fsync'd before the volume is
// made and marked done only after the copy is verified, makes an
// unfinished copy a copy in progress after any crash (hidden from
// ListVolumes, resumed at the next CreateVolume), never a volume. The
// other way, CopySource serves this node's snapshots, and its volumes
// through a snapshot made for each copy, to other nodes' copies.
//
// The controller service runs on every node next to its pools (the
// sidecars' per-node mode): a volume lives on the node that created it, and
// its accessible topology says so.
package csi
