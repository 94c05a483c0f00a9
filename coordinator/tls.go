package coordinator

import (
	"github.com/agentd/agent/internal/atomicfile"

	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/agentd/agent/tailnet"
)

// Certificate files inside the data directory.
const (
	CertFileName = "tls.crt"
	KeyFileName  = "tls.key"
)

// loadCert returns the certificate the configuration names, or the one in
// the data directory (made on first start).
func loadCert(cfg Config, extraHosts []string) (tls.Certificate, error) {
	if cfg.TLSCertFile == "" && cfg.TLSKeyFile == "" {
		cert, _, err := loadOrCreateCert(cfg.DataDir, extraHosts)
		return cert, err
	}
	if cfg.TLSCertFile == "" || cfg.TLSKeyFile == "" {
		return tls.Certificate{}, errors.New("pass both --tls-cert and --tls-key, or neither (to use the self-signed certificate in --data-dir)")
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading --tls-cert %s and --tls-key %s: %w", cfg.TLSCertFile, cfg.TLSKeyFile, err)
	}
	return cert, nil
}

// loadOrCreateCert returns the coordinator's certificate, generating a
// self-signed one the first time. Clients pin it by fingerprint, so the
// names in it matter only to clients that verify it some other way.
func loadOrCreateCert(dataDir string, extraHosts []string) (tls.Certificate, bool, error) {
	certPath := filepath.Join(dataDir, CertFileName)
	keyPath := filepath.Join(dataDir, KeyFileName)
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err == nil {
		return cert, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return tls.Certificate{}, false, fmt.Errorf("loading %s and %s: %w (move them away to generate a new certificate; clients will need the new fingerprint)", certPath, keyPath, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, false, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, false, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "agent coordinator"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		tmpl.DNSNames = append(tmpl.DNSNames, h)
	}
	for _, h := range extraHosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, false, fmt.Errorf("creating certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, false, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return tls.Certificate{}, false, err
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644); err != nil {
		return tls.Certificate{}, false, err
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	return cert, true, err
}

// ReadFingerprint returns the fingerprint of the certificate in a data
// directory, for admins when the coordinator is not running.
func ReadFingerprint(dataDir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(dataDir, CertFileName))
	if err != nil {
		return "", err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return "", fmt.Errorf("%s holds no PEM certificate", filepath.Join(dataDir, CertFileName))
	}
	return tailnet.CertFingerprint(block.Bytes), nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	return atomicfile.Write(path, data, mode)
}
