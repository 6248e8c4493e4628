// Package kube is csi-dmthin's Kubernetes side, beside the CSI services
// (pkg/csi), for what the sidecars do not do. It has two halves.
//
// The cluster's controller (controller.go; `csi-dmthin controller`, one
// leader-elected Deployment) makes the cluster-level decisions from the API
// alone, through one set of informers (view.go):
//
//   - placement.go steers restores and clones to the node that holds their
//     source: for a pending WaitForFirstConsumer PVC of our driver with a
//     data source (a VolumeSnapshot or a PVC), it sets the
//     volume.kubernetes.io/selected-node annotation to that node, and the
//     scheduler then places the consumer there. The node comes from the
//     records (view.go): a clone's source PV's node affinity; a snapshot
//     content's managed-by label, the node in its snapshot handle, or its
//     source volume's PV. Room comes from the node's ThinPool (Available,
//     Health), a cordon from the Node. When the source is gone, its node
//     unknown, or the node cannot take the new volume, it puts one Warning
//     Event on the PVC; with copies across nodes on, a restore or clone
//     whose source's node is cordoned or full is instead left to the
//     scheduler, with a Normal Event (and, for a clone, the source's node
//     in the PVC's AnnCopyFromNode), and the chosen node copies it.
//     placement_source.go follows a data source to its
//     CSI ID and node, placement_write.go makes the annotation and Event
//     writes (once each), placement_watch.go queues PVCs from the
//     informers' events.
//   - adopt.go and adopt_group.go label, for the node's csi-snapshotter
//     (distributed snapshotting), the snapshot contents and group snapshot
//     contents the snapshot-controller leaves unlabelled, with the node
//     their handles or their volumes' PVs name, and the class of a group
//     snapshot being taken (the sidecar reads only classes labelled for
//     its node).
//
// A node's side (the driver's `serve --kube-api`) watches nothing and
// reads and writes only objects of its node:
//
//   - poolevents.go watches this node's pools and puts Events on the Node
//     when one nears full, fails or grows, and again when it recovers; Wake
//     makes it look at once (the driver calls it on the pool's kernel
//     events).
//   - thinpools.go keeps one ThinPool object (dmthin.io/v1alpha1, cluster
//     scoped, thinpool_types.go) per pool of this node current: the
//     cluster's view of every pool, written only on change and rate-limited;
//     the controller reads it for room.
//   - capacity.go rewrites this node's CSIStorageCapacity objects at once
//     when a pool's kernel raises an event, between the provisioner's polls.
//   - tokenreview.go authenticates the callers of this node's copy server
//     (pkg/blockcopy): a TokenReview of their service-account token for
//     the copy's audience; TokenFile reads this node's own, which the
//     kubelet projects and rotates.
//   - copypeers.go finds another node's copy endpoint, which its driver
//     publishes in its pools' ThinPools, for a restore or clone made here
//     from a source held there.
//   - events.go makes the event recorder and turns the driver's no-space
//     refusals into Events on the PVC (reading that PVC, not watching any);
//     copy_events.go does the same for a copy's start, progress and end,
//     and answers a copy whether its PVC still exists and, for a clone,
//     which node holds its source.
//
// Nothing here changes a pool, and nothing imports pkg/devmapper: a pool's
// state is a thinpool.Usage, its mode a thinpool.Mode. Registration with
// the kubelet is in the registration subpackage, which needs no API
// server.
package kube
