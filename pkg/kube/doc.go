// Package kube is csi-dmthin's Kubernetes side on one node, beside the CSI
// services (pkg/csi), for what the sidecars do not do:
//
//   - placement.go steers restores and clones to the node that holds their
//     source: for a pending WaitForFirstConsumer PVC of our driver whose
//     data source (a VolumeSnapshot or a PVC) is in one of this node's pools,
//     it sets the volume.kubernetes.io/selected-node annotation to this node,
//     and the scheduler then places the consumer here. When the source is
//     gone, or this node cannot take the new volume, it puts one Warning
//     Event on the PVC, from one node only (speaker.go). The decision is
//     placement.go's; placement_source.go follows a data source to its CSI
//     ID, placement_write.go makes the annotation and Event writes (once
//     each), placement_watch.go queues PVCs from the informers' events.
//   - poolevents.go watches this node's pools and puts Events on the Node
//     when one nears full, fails or grows, and again when it recovers; Wake
//     makes it look at once (the driver calls it on the pool's kernel
//     events).
//   - thinpools.go keeps one ThinPool object (dmthin.io/v1alpha1, cluster
//     scoped, thinpool_types.go) per pool of this node current: the
//     cluster's view of every pool, written only on change and rate-limited.
//   - capacity.go rewrites this node's CSIStorageCapacity objects at once
//     when a pool's kernel raises an event, between the provisioner's polls.
//   - events.go makes the event recorder and turns the driver's no-space
//     refusals into Events on the PVC.
//   - adopt.go and adopt_group.go label, for this node's csi-snapshotter
//     (distributed snapshotting), the snapshot contents and group snapshot
//     contents of what this node holds, which the snapshot-controller
//     leaves unlabelled, and the class of a group snapshot this node is
//     taking (the sidecar reads only classes labelled for its node).
//
// It reads Kubernetes objects through informers and writes only the
// selected-node annotation, Events, its node's ThinPools, the capacity
// values of its node's CSIStorageCapacity objects, and the managed-by
// label of snapshot contents and group snapshot classes. It never changes a pool: what it
// needs of the driver it asks through Owner and UsageSource, which answer
// from this node alone. Whether a pool has room is the pool's admission
// (pkg/thinpool), asked through Owner.RoomFor; a pool's state is a
// thinpool.Usage, its mode a thinpool.Mode, and nothing here imports
// pkg/devmapper. Registration with the kubelet is in the
// registration subpackage, which needs no API server.
package kube
