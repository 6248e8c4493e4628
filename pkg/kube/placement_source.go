package kube

import (
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// Source resolution: a PVC's data source followed to the CSI ID of the
// snapshot or volume it restores or clones, through the listers alone.

// source is where a restore or clone comes from, as far as the records go.
type source struct {
	kind     string // "snapshot" or "volume"
	id       string // the CSI snapshot or volume ID; "" when unknown
	what     string // e.g. `VolumeSnapshot db/snap-1`, for messages
	notReady string // set: not resolvable yet, try again later
	gone     string // set: the source, or a record on the way to it, does not exist
	// node is the node the source's records name as its holder, and pool
	// its pool there; node is "" when no record names one.
	node, pool string
	size       int64 // the source's size, 0 when unknown: the new volume is at least as large
}

// dataSource returns the PVC's source: dataSourceRef (which can name a
// namespace) before dataSource; nil for none, or a kind we do not clone.
func dataSource(pvc *corev1.PersistentVolumeClaim) *corev1.TypedObjectReference {
	var ref corev1.TypedObjectReference
	switch {
	case pvc.Spec.DataSourceRef != nil:
		ref = *pvc.Spec.DataSourceRef
	case pvc.Spec.DataSource != nil:
		ref = corev1.TypedObjectReference{APIGroup: pvc.Spec.DataSource.APIGroup, Kind: pvc.Spec.DataSource.Kind, Name: pvc.Spec.DataSource.Name}
	default:
		return nil
	}
	if ref.Namespace == nil || *ref.Namespace == "" {
		ns := pvc.Namespace
		ref.Namespace = &ns
	}
	group := ""
	if ref.APIGroup != nil {
		group = *ref.APIGroup
	}
	switch {
	case ref.Kind == "VolumeSnapshot" && group == snapshotGroup:
	case ref.Kind == "PersistentVolumeClaim" && group == "":
	default:
		return nil
	}
	return &ref
}

// resolve follows the PVC's data source to a CSI ID. ok is false for a
// source that is not our driver's (the provisioner will refuse it).
func (p *Placement) resolve(pvc *corev1.PersistentVolumeClaim) (source, bool) {
	ref := dataSource(pvc)
	if ref.Kind == "PersistentVolumeClaim" {
		return p.resolveClaim(*ref.Namespace, ref.Name)
	}
	if p.snapshots == nil {
		return source{}, false
	}
	return p.resolveSnapshot(*ref.Namespace, ref.Name)
}

func (p *Placement) resolveClaim(ns, name string) (source, bool) {
	s := source{kind: "volume", what: "PersistentVolumeClaim " + ns + "/" + name}
	claim, err := p.view.pvcs.PersistentVolumeClaims(ns).Get(name)
	if apierrors.IsNotFound(err) {
		s.gone = "it does not exist"
		return s, true
	}
	if err != nil || claim.Spec.VolumeName == "" {
		s.notReady = "not bound to a volume yet"
		return s, true
	}
	pv, err := p.view.pvs.Get(claim.Spec.VolumeName)
	if apierrors.IsNotFound(err) {
		s.gone = "its PersistentVolume " + claim.Spec.VolumeName + " does not exist"
		return s, true
	}
	if err != nil {
		s.notReady = err.Error()
		return s, true
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != p.driver {
		return s, false
	}
	s.id = pv.Spec.CSI.VolumeHandle
	s.node = pvNode(pv)
	s.pool, _ = csi.IDPool(s.id)
	s.size = pv.Spec.Capacity.Storage().Value()
	return s, true
}

func (p *Placement) resolveSnapshot(ns, name string) (source, bool) {
	s := source{kind: "snapshot", what: "VolumeSnapshot " + ns + "/" + name}
	vs, err := p.snapshots.VolumeSnapshots(ns).Get(name)
	if apierrors.IsNotFound(err) {
		s.gone = "it does not exist"
		return s, true
	}
	if err != nil || vs.Status == nil || vs.Status.BoundVolumeSnapshotContentName == nil || *vs.Status.BoundVolumeSnapshotContentName == "" {
		s.notReady = "not bound to a VolumeSnapshotContent yet"
		return s, true
	}
	vsc, err := p.contents.Get(*vs.Status.BoundVolumeSnapshotContentName)
	if err != nil {
		// Also when the informer has not caught up with a new content.
		s.notReady = "its VolumeSnapshotContent " + *vs.Status.BoundVolumeSnapshotContentName + " is not readable yet"
		return s, true
	}
	if vsc.Spec.Driver != p.driver {
		return s, false
	}
	s.id = contentHandle(vsc)
	if s.id == "" {
		s.notReady = "its VolumeSnapshotContent has no snapshot handle yet"
		return s, true
	}
	s.node, _ = p.view.contentNode(vsc)
	s.pool, _ = csi.IDPool(s.id)
	if st := vsc.Status; st != nil && st.RestoreSize != nil {
		s.size = *st.RestoreSize
	}
	return s, true
}
