package kube

import (
	"fmt"
	"strings"
	"text/tabwriter"
)

// The informers of the sidecars the chart runs beside the driver on every
// node, for comparison: not run, but each counted on the seeded cluster as
// a list with the scope its source gives it (read at the tag the chart
// deploys; file and line below).

// sidecarInformer is one informer a sidecar of the chart's DaemonSet opens
// on each node, read from the sidecar's source (file and line at its
// release tag): its resource and scope.
type sidecarInformer struct {
	sidecar, resource string
	namespace, labels string // "" for all; labels may name the node as %[1]s
	where             string
	leaderOnly        bool // runs on the one elected node, not on every node
}

var sidecarInformers = []sidecarInformer{
	{sidecar: "csi-provisioner v6.4.0", resource: "persistentvolumeclaims", where: "cmd/csi-provisioner/csi-provisioner.go:303,397"},
	{sidecar: "csi-provisioner v6.4.0", resource: "storageclasses", where: "cmd/csi-provisioner/csi-provisioner.go:309,539"},
	{sidecar: "csi-provisioner v6.4.0", resource: "persistentvolumes", where: "sig-storage-lib-external-provisioner v13.1.0 controller/controller.go:710,755"},
	{sidecar: "csi-provisioner v6.4.0", resource: "storageclasses", where: "sig-storage-lib-external-provisioner v13.1.0 controller/controller.go:710,765"},
	{sidecar: "csi-provisioner v6.4.0", resource: "volumesnapshots", where: "pkg/controller/snapshot_finalizer_controller.go:62-73, cmd/csi-provisioner/csi-provisioner.go:613"},
	{sidecar: "csi-provisioner v6.4.0", resource: "csistoragecapacities", namespace: scaleNamespace,
		labels: "csi.storage.k8s.io/drivername=" + driverName + ",csi.storage.k8s.io/managed-by=external-provisioner-%[1]s", where: "cmd/csi-provisioner/csi-provisioner.go:515-526"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumesnapshotcontents", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:161-162,298"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumesnapshotclasses", where: "cmd/csi-snapshotter/main.go:153,299"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumegroupsnapshotcontents", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:290"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumegroupsnapshotclasses", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:291"},
	{sidecar: "csi-resizer v2.3.0", resource: "persistentvolumes", where: "pkg/controller/controller.go:95", leaderOnly: true},
	{sidecar: "csi-resizer v2.3.0", resource: "persistentvolumeclaims", where: "pkg/controller/controller.go:96", leaderOnly: true},
	{sidecar: "csi-resizer v2.3.0", resource: "pods", where: "pkg/controller/controller.go:135, cmd/csi-resizer/main.go:84", leaderOnly: true},
}

// sidecarsOn is how many objects the sidecars' informers hold on node, on
// every node (the elected resizer's are not counted).
func sidecarsOn(s *bigCluster, node string) (int, error) {
	n := 0
	for _, i := range sidecarInformers {
		if i.leaderOnly {
			continue
		}
		c, err := s.served(i.resource, i.namespace, sidecarLabels(i, node))
		if err != nil {
			return 0, err
		}
		n += c
	}
	return n, nil
}

func sidecarLabels(i sidecarInformer, node string) string {
	if i.labels == "" {
		return ""
	}
	return fmt.Sprintf(i.labels, node)
}

func sidecarTable(s *bigCluster, node string) string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "sidecar\tresource\twatches\tobjects held\tscope\tsource")
	for _, i := range sidecarInformers {
		held := "not seeded"
		if s.seeded[i.resource] != nil {
			n, err := s.served(i.resource, i.namespace, sidecarLabels(i, node))
			if err != nil {
				held = err.Error()
			} else {
				held = fmt.Sprint(n)
			}
		}
		who := i.sidecar
		if i.leaderOnly {
			who += " (elected node only)"
		}
		fmt.Fprintf(w, "%s\t%s\t1\t%s\t%s\t%s\n", who, i.resource, held, scopeOf(i.namespace, sidecarLabels(i, node), ""), i.where)
	}
	w.Flush()
	return sb.String()
}

// sidecarWatches is how many watches the sidecars open on every node (the
// elected resizer's not counted).
func sidecarWatches() int {
	n := 0
	for _, i := range sidecarInformers {
		if !i.leaderOnly {
			n++
		}
	}
	return n
}
