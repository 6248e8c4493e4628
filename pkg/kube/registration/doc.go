// Package registration serves the kubelet's plugin-registration API (v1) on
// a socket in the kubelet's plugins_registry directory, so csi-dmthin
// registers itself with the kubelet without the node-driver-registrar
// sidecar.
//
// It owns that one socket: it removes a stale one at start and its own at
// stop, answers GetInfo with the CSI endpoint the kubelet should dial, and
// remembers what the kubelet said in NotifyRegistrationStatus so that a
// health check can report a refused registration. It does not serve CSI
// and does not talk to the API server.
package registration
