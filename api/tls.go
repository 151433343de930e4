package api

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFiles names the public API's certificate and key, and the CA bundle
// that servers (forwarding calls to the leader) and clients verify it with.
type TLSFiles struct {
	Cert, Key string
	// CA is a PEM bundle; empty: the system's roots, plus the certificate
	// itself (so that a self-signed certificate shared by the servers works).
	CA string
}

// Enabled reports whether TLS is configured.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" }

// Load returns the server's TLS configuration and the client configuration
// servers use towards each other's public ports.
func (f TLSFiles) Load() (server, client *tls.Config, err error) {
	if f.Cert == "" || f.Key == "" {
		return nil, nil, errors.New("--tls-cert-file and --tls-key-file go together")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("TLS certificate %s and key %s: %w", f.Cert, f.Key, err)
	}
	roots, err := RootsFrom(f.CA)
	if err != nil {
		return nil, nil, err
	}
	if f.CA == "" && cert.Leaf != nil {
		roots.AddCert(cert.Leaf)
	}
	server = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	client = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	return server, client, nil
}

// RootsFrom is the system's root pool, or only the certificates of the PEM
// file path when it is given.
func RootsFrom(path string) (*x509.CertPool, error) {
	if path == "" {
		pool, err := x509.SystemCertPool()
		if err != nil {
			return x509.NewCertPool(), nil
		}
		return pool, nil
	}
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", path)
	}
	return pool, nil
}
