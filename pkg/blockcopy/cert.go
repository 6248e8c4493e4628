package blockcopy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The files LoadOrCreateCert keeps in its directory.
const (
	certFile = "tls.crt"
	keyFile  = "tls.key"
)

// LoadOrCreateCert returns the server's TLS certificate kept in dir and
// the hex SHA-256 of its DER, which clients pin. The first call makes a
// self-signed ECDSA P-256 certificate and writes it (key 0600, each file
// written atomically); later calls, after a restart, load the same one so
// the pinned fingerprint stays valid. The certificate is valid for 100
// years: it is trusted by pin, not by expiry or name.
func LoadOrCreateCert(dir string) (tls.Certificate, string, error) {
	certPath, keyPath := filepath.Join(dir, certFile), filepath.Join(dir, keyFile)
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err == nil {
		return cert, CertSHA256(cert), nil
	}
	if _, statErr := os.Stat(certPath); !errors.Is(statErr, fs.ErrNotExist) {
		// A certificate is there and does not load: replacing it would
		// silently change a fingerprint clients may have pinned.
		return tls.Certificate{}, "", fmt.Errorf("load TLS certificate from %s: %w", dir, err)
	}
	// No certificate: none was ever handed out (the fingerprint is only
	// returned once both files are written), so a key left alone by a
	// crash between the two writes is simply replaced.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return tls.Certificate{}, "", fmt.Errorf("create certificate directory: %w", err)
	}
	certPEM, keyPEM, err := newSelfSigned()
	if err != nil {
		return tls.Certificate{}, "", err
	}
	// The key first: the certificate's presence then means both are
	// written.
	if err := writeFileAtomic(keyPath, keyPEM, 0o600, nil); err != nil {
		return tls.Certificate{}, "", err
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644, nil); err != nil {
		return tls.Certificate{}, "", err
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("parse the new certificate: %w", err)
	}
	return cert, CertSHA256(cert), nil
}

func newSelfSigned() (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("generate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "csi-dmthin blockcopy"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(100, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// CertSHA256 is the hex SHA-256 of cert's leaf (DER), "" for none.
func CertSHA256(cert tls.Certificate) string {
	if len(cert.Certificate) == 0 {
		return ""
	}
	sum := sha256.Sum256(cert.Certificate[0])
	return hex.EncodeToString(sum[:])
}

// pinnedTLSConfig trusts exactly the certificate whose DER hashes to pin.
// InsecureSkipVerify only turns off the CA and name checks, which a
// self-signed certificate cannot pass; VerifyConnection runs during the
// handshake, before any request (and so the token) is sent.
func pinnedTLSConfig(pin string) (*tls.Config, error) {
	want, err := hex.DecodeString(strings.ToLower(pin))
	if err != nil || len(want) != sha256.Size {
		return nil, fmt.Errorf("%w: Endpoint.CertSHA256 %q is not a hex SHA-256", ErrCertMismatch, pin)
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, //nolint:gosec // the leaf is pinned in VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%w: the server sent no certificate", ErrCertMismatch)
			}
			got := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if hex.EncodeToString(got[:]) != hex.EncodeToString(want) {
				return fmt.Errorf("%w: got %x, pinned %x", ErrCertMismatch, got, want)
			}
			return nil
		},
	}, nil
}
