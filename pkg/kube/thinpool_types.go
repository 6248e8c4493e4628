package kube

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The ThinPool custom resource: the cluster's view of every node's pools.
// One cluster-scoped object per node and pool, named <node>.<pool>, whose
// status the driver on that node keeps current (ThinPoolWriter). The chart
// ships its CustomResourceDefinition (templates/crd-thinpool.yaml), whose
// schema and printer columns follow these types.

// ThinPoolGroup and ThinPoolVersion are the resource's API group and
// version.
const (
	ThinPoolGroup   = "dmthin.io"
	ThinPoolVersion = "v1alpha1"
	ThinPoolKind    = "ThinPool"
)

// ThinPoolGVR is the ThinPool resource.
var ThinPoolGVR = schema.GroupVersionResource{Group: ThinPoolGroup, Version: ThinPoolVersion, Resource: "thinpools"}

// Labels of a ThinPool: its node (when the node's name is a valid label
// value) and its pool.
const (
	LabelThinPoolNode = "dmthin.io/node"
	LabelThinPoolPool = "dmthin.io/pool"
)

// ThinPool is one pool of one node.
type ThinPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ThinPoolSpec   `json:"spec"`
	Status            ThinPoolStatus `json:"status,omitempty"`
}

// ThinPoolSpec names the pool; the driver writes it once.
type ThinPoolSpec struct {
	NodeName string `json:"nodeName"`
	Pool     string `json:"pool"`
	Driver   string `json:"driver"`
}

// Health values of a ThinPool.
const (
	HealthHealthy        = "Healthy"
	HealthOutOfDataSpace = "OutOfDataSpace" // writes to new blocks fail (or queue)
	HealthReadOnly       = "ReadOnly"       // no metadata change: out of metadata space, or an error
	HealthNeedsCheck     = "NeedsCheck"     // thin_check, then thin_repair if it fails
	HealthFailed         = "Failed"         // no I/O at all
	HealthFenced         = "Fenced"         // a failed step; every change retries the recovery
	HealthUnreadable     = "Unreadable"     // the driver cannot read the pool's status
	HealthNotConfigured  = "NotConfigured"  // records on the node, not in its pools file
)

// ThinPoolStatus is what the node's driver last saw of the pool.
type ThinPoolStatus struct {
	// Health is one of the Health* values; Message says why it is not
	// Healthy.
	Health  string `json:"health,omitempty"`
	Message string `json:"message,omitempty"`
	// Mode is the kernel's: rw, out_of_data_space, ro; empty when failed.
	Mode     string      `json:"mode,omitempty"`
	Data     SpaceStatus `json:"data"`
	Metadata SpaceStatus `json:"metadata"`
	// Provisioned is the sum of the volumes' and snapshots' sizes;
	// Available what a new volume may still take (the CSIStorageCapacity).
	Provisioned resource.Quantity `json:"provisioned"`
	Available   resource.Quantity `json:"available"`
	// Overprovisioning is Provisioned divided by the data size, and
	// OverprovisionLimit the most it may reach ("none": no limit), both
	// with two decimals.
	Overprovisioning   string      `json:"overprovisioning,omitempty"`
	OverprovisionLimit string      `json:"overprovisionLimit,omitempty"`
	Volumes            int32       `json:"volumes"`
	Snapshots          int32       `json:"snapshots"`
	Templates          int32       `json:"templates"`
	LastEvent          *PoolEvent  `json:"lastEvent,omitempty"`
	LastGrowth         *PoolGrowth `json:"lastGrowth,omitempty"`
	DriverVersion      string      `json:"driverVersion,omitempty"`
	// Copy is where this node's driver serves its pools' blocks to another
	// node's (a restore or clone made there); nil when it does not (copy
	// disabled, or a driver from before copies).
	Copy *CopyEndpoint `json:"copy,omitempty"`
	// UpdateTime is when the driver last wrote this status; it writes
	// only when something changed (see ThinPoolWriter).
	UpdateTime metav1.Time `json:"updateTime"`
}

// SpaceStatus is the use of the data or the metadata device.
type SpaceStatus struct {
	Size        resource.Quantity `json:"size"`
	Used        resource.Quantity `json:"used"`
	UsedPercent int32             `json:"usedPercent"`
}

// CopyEndpoint is a blockcopy.Endpoint as a ThinPool publishes it: the
// node's copy server's address (host:port) and the SHA-256 (hex) of its
// certificate (DER), which a copying node pins.
type CopyEndpoint struct {
	Address    string `json:"address"`
	CertSHA256 string `json:"certSHA256"`
}

// PoolEvent is the last event the pool's kernel raised.
type PoolEvent struct {
	Time    metav1.Time `json:"time"`
	Reason  string      `json:"reason"`
	Message string      `json:"message"`
}

// PoolGrowth is the last time the pool grew.
type PoolGrowth struct {
	Time         metav1.Time       `json:"time"`
	DataFrom     resource.Quantity `json:"dataFrom"`
	DataTo       resource.Quantity `json:"dataTo"`
	MetadataFrom resource.Quantity `json:"metadataFrom"`
	MetadataTo   resource.Quantity `json:"metadataTo"`
}

// ThinPoolName is the object's name for a node's pool: <node>.<pool>.
// Node names are DNS subdomains and pool names hold no dot, so the last
// dot separates them; a node name too long for both is cut and a hash of
// it added.
func ThinPoolName(node, pool string) string {
	name := node + "." + pool
	if len(name) <= validation.DNS1123SubdomainMaxLength {
		return name
	}
	sum := sha256.Sum256([]byte(node))
	keep := validation.DNS1123SubdomainMaxLength - len(pool) - 1 - 11
	return strings.TrimRight(node[:keep], ".-") + "-" + hex.EncodeToString(sum[:])[:10] + "." + pool
}

// nodeLabelValue is the node's name as a label value, "" when it is not
// one (longer than 63 characters).
func nodeLabelValue(node string) string {
	if len(validation.IsValidLabelValue(node)) != 0 {
		return ""
	}
	return node
}
