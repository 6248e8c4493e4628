package cluster

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/crypto/ssh"
)

// Addresses of the cluster. The nodes and the namespace share one bridge
// that the harness makes inside the namespace (netns.go): the namespace is
// 10.0.2.2 on it, node i is 10.0.2.(10+i), and node i's pods are
// 10.244.i.0/24.
const (
	APIServerHostPort = "127.0.0.1:6443" // where host-side clients reach the apiserver
	GatewayIP         = "10.0.2.2"       // the namespace on the bridge: the apiserver as the nodes see it
	NodeSubnet        = "10.0.2.0/24"
	ServiceIP         = "10.96.0.1" // the kubernetes Service's ClusterIP
	ServiceCIDR       = "10.96.0.0/16"
	ClusterCIDR       = "10.244.0.0/16" // every node's pod range
)

// Node is one worker node's identity: its name, addresses and the
// namespace-side tap of its network card.
type Node struct {
	Index   int    // 1, 2, ...
	Name    string // e2e-node-1, ...
	IP      string // on the bridge
	PodCIDR string // its pods' addresses
	MAC     string
	Tap     string // the tap device in the namespace, a port of the bridge
}

// MaxNodes bounds the node count: the addresses and names below have room
// for no more, and two cores have no room for more VMs anyway.
const MaxNodes = 8

// NodeSpec returns node i's identity (1 <= i <= MaxNodes).
func NodeSpec(i int) Node {
	return Node{
		Index:   i,
		Name:    fmt.Sprintf("e2e-node-%d", i),
		IP:      fmt.Sprintf("10.0.2.%d", 10+i),
		PodCIDR: fmt.Sprintf("10.244.%d.0/24", i),
		MAC:     fmt.Sprintf("52:54:00:e2:e0:%02x", i),
		Tap:     fmt.Sprintf("e2e-tap%d", i),
	}
}

// NodeSpecs returns the identities of n nodes.
func NodeSpecs(n int) []Node {
	nodes := make([]Node, n)
	for i := range nodes {
		nodes[i] = NodeSpec(i + 1)
	}
	return nodes
}

// pkiFiles are the certificates and keys the cluster runs with, all signed by
// one CA generated for the run (ECDSA P-256; the service-account key is RSA,
// which every Kubernetes version accepts for signing tokens).
type pkiFiles struct {
	dir string
}

func (p pkiFiles) path(name string) string { return filepath.Join(p.dir, name) }

// certSpec is one leaf certificate.
type certSpec struct {
	name   string // file base name: <name>.crt, <name>.key
	cn     string
	orgs   []string
	ips    []string
	dns    []string
	server bool
	client bool
}

var clusterCerts = []certSpec{
	{name: "apiserver", cn: "kube-apiserver", server: true,
		ips: []string{"127.0.0.1", GatewayIP, ServiceIP}, dns: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}},
	{name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true},
	{name: "etcd", cn: "etcd", server: true, client: true, ips: []string{"127.0.0.1"}, dns: []string{"localhost"}},
	{name: "admin", cn: "e2e-admin", orgs: []string{"system:masters"}, client: true},
	{name: "controller-manager", cn: "system:kube-controller-manager", client: true},
	{name: "scheduler", cn: "system:kube-scheduler", client: true},
	{name: "kube-proxy", cn: "system:kube-proxy", client: true},
	{name: "snapshot-controller", cn: "e2e-snapshot-controller", orgs: []string{"system:masters"}, client: true},
}

// nodeCerts are each node's own: its kubelet's client certificate (the Node
// authorizer knows a node by its CN) and serving certificate (the apiserver
// dials the kubelet at the node's address).
func nodeCerts(n Node) []certSpec {
	return []certSpec{
		{name: "kubelet-" + n.Name, cn: "system:node:" + n.Name, orgs: []string{"system:nodes"}, client: true},
		{name: "kubelet-serving-" + n.Name, cn: n.Name, server: true, ips: []string{n.IP}, dns: []string{n.Name}},
	}
}

// writePKI generates the CA, every leaf in clusterCerts and nodes' own, and
// the service account key pair into dir.
func writePKI(dir string, nodes []Node) (pkiFiles, error) {
	p := pkiFiles{dir: dir}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return p, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return p, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "csi-dmthin-e2e-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return p, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return p, err
	}
	if err := writePEM(p.path("ca.crt"), "CERTIFICATE", caDER); err != nil {
		return p, err
	}
	if err := writeECKey(p.path("ca.key"), caKey); err != nil {
		return p, err
	}
	certs := slices.Clone(clusterCerts)
	for _, n := range nodes {
		certs = append(certs, nodeCerts(n)...)
	}
	for i, c := range certs {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return p, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)),
			Subject:      pkix.Name{CommonName: c.cn, Organization: c.orgs},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(7 * 24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			DNSNames:     c.dns,
		}
		for _, ip := range c.ips {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
		if c.server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		if c.client {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return p, fmt.Errorf("cluster: certificate %s: %w", c.name, err)
		}
		if err := writePEM(p.path(c.name+".crt"), "CERTIFICATE", der); err != nil {
			return p, err
		}
		if err := writeECKey(p.path(c.name+".key"), key); err != nil {
			return p, err
		}
	}
	if err := writeSSHKeys(p); err != nil {
		return p, err
	}
	sa, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return p, err
	}
	if err := writePEM(p.path("sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(sa)); err != nil {
		return p, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return p, err
	}
	return p, writePEM(p.path("sa.pub"), "PUBLIC KEY", pub)
}

// The nodes' SSH keys, in the run's pki directory: the servers' host key
// and the one client key they accept, whose public half is their
// authorized key. The storage suite (KUBE_SSH_KEY_PATH) and the harness
// log in with the client key.
const (
	sshHostKey       = "ssh-host.key"
	sshClientKey     = "ssh-client.key"
	sshAuthorizedKey = "ssh-authorized.pub"
	sshHostPublicKey = "ssh-host.pub"
)

// writeSSHKeys generates the run's ed25519 SSH keys: private keys in
// OpenSSH's format, public keys as authorized_keys lines.
func writeSSHKeys(p pkiFiles) error {
	for _, k := range []struct{ private, public string }{{sshHostKey, sshHostPublicKey}, {sshClientKey, sshAuthorizedKey}} {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		block, err := ssh.MarshalPrivateKey(priv, "csi-dmthin-e2e")
		if err != nil {
			return err
		}
		if err := os.WriteFile(p.path(k.private), pem.EncodeToMemory(block), 0o600); err != nil {
			return err
		}
		sshPub, err := ssh.NewPublicKey(pub)
		if err != nil {
			return err
		}
		if err := os.WriteFile(p.path(k.public), ssh.MarshalAuthorizedKey(sshPub), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func writeECKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// kubeconfig returns a kubeconfig for server authenticating with the named
// client certificate; file paths are as the user of the file sees them
// (pkiDir differs between the host and the node).
func kubeconfig(server, pkiDir, certName string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s/ca.crt
users:
- name: %s
  user:
    client-certificate: %s/%s.crt
    client-key: %s/%s.key
contexts:
- name: e2e
  context: {cluster: e2e, user: %s}
current-context: e2e
`, server, pkiDir, certName, pkiDir, certName, pkiDir, certName, certName)
}
