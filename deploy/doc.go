// Package deploy holds the tests of csi-dmthin's Kubernetes packaging: the
// Helm chart in charts/csi-dmthin and the plain manifests in
// deploy/kubernetes, which are that chart rendered with its default values.
//
// The tests render the chart in-process with Helm's own packages, decode every
// object strictly into its Kubernetes API type (an unknown or misplaced field
// fails), run Helm's linter and the chart's values schema, check the ThinPool
// CRD against the driver's Go types and the alert rules and dashboard queries
// (parsed by Prometheus's own PromQL parser) against the metrics the driver
// registers, and keep deploy/kubernetes byte for byte equal to the render
// (`make manifests` or `go test ./deploy -update` rewrites it).
//
// The package has no non-test code: it must not be imported, and nothing in
// the driver depends on it.
package deploy
