package kube

import (
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
)

// Event handlers: queue the PVC, or the PVCs restored or cloned from the
// changed object.

func (p *Placement) pvcChanged(obj any) {
	pvc, ok := obj.(*corev1.PersistentVolumeClaim)
	if !ok {
		return
	}
	if dataSource(pvc) != nil {
		p.enqueue(pvc)
	}
	p.enqueueUsers(pvc.Namespace, "PersistentVolumeClaim", pvc.Name)
}

func (p *Placement) pvcDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if pvc, ok := obj.(*corev1.PersistentVolumeClaim); ok {
		p.forget(pvc.UID)
		p.mu.Lock()
		delete(p.wroteOver, pvc.UID)
		p.mu.Unlock()
	}
}

func (p *Placement) pvChanged(obj any) {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok || pv.Spec.ClaimRef == nil {
		return
	}
	p.enqueueUsers(pv.Spec.ClaimRef.Namespace, "PersistentVolumeClaim", pv.Spec.ClaimRef.Name)
}

func (p *Placement) snapshotChanged(obj any) {
	if vs, ok := obj.(*snapv1.VolumeSnapshot); ok {
		p.enqueueUsers(vs.Namespace, "VolumeSnapshot", vs.Name)
	}
}

func (p *Placement) contentChanged(obj any) {
	if vsc, ok := obj.(*snapv1.VolumeSnapshotContent); ok {
		p.enqueueUsers(vsc.Spec.VolumeSnapshotRef.Namespace, "VolumeSnapshot", vsc.Spec.VolumeSnapshotRef.Name)
	}
}

func (p *Placement) enqueue(pvc *corev1.PersistentVolumeClaim) {
	if key, err := cache.MetaNamespaceKeyFunc(pvc); err == nil {
		p.queue.Add(key)
	}
}

// enqueueUsers queues the PVCs whose data source is the named object.
func (p *Placement) enqueueUsers(ns, kind, name string) {
	objs, err := p.view.pvcInf.GetIndexer().ByIndex(bySource, ns+"/"+kind+"/"+name)
	if err != nil {
		return
	}
	for _, o := range objs {
		if pvc, ok := o.(*corev1.PersistentVolumeClaim); ok {
			p.enqueue(pvc)
		}
	}
}

func pvcSourceIndex(obj any) ([]string, error) {
	pvc, ok := obj.(*corev1.PersistentVolumeClaim)
	if !ok {
		return nil, nil
	}
	ref := dataSource(pvc)
	if ref == nil {
		return nil, nil
	}
	return []string{*ref.Namespace + "/" + ref.Kind + "/" + ref.Name}, nil
}

func pvHandleIndex(obj any) ([]string, error) {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok || pv.Spec.CSI == nil {
		return nil, nil
	}
	return []string{pv.Spec.CSI.Driver + "/" + pv.Spec.CSI.VolumeHandle}, nil
}
