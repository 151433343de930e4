package api

import (
	"crypto/tls"
	"log/slog"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// MaxRequestBytes bounds every request message (code is at most 1 MiB).
const MaxRequestBytes = 4 << 20

// CompressMinBytes is the smallest response every handler compresses (when
// the client accepts gzip). Most answers are a few hundred bytes, for which
// gzip costs more CPU than the bytes it saves on any network.
const CompressMinBytes = 8 << 10

// Config wires the public API handler.
type Config struct {
	Backend Backend
	// Cluster serves ClusterService.
	Cluster  ClusterBackend
	Keys     *Keys
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// services lists the public services, for reflection and health.
var services = []string{
	sandboxv1connect.SessionServiceName,
	sandboxv1connect.ExecutionServiceName,
	sandboxv1connect.TemplateServiceName,
	sandboxv1connect.ClusterServiceName,
}

// NewHandler returns the mux of the public port: the sandbox.v1 services over
// Connect, gRPC and gRPC-Web, gRPC reflection and health (unauthenticated, as
// load balancers and grpcurl expect), and /metrics.
func NewHandler(cfg Config) http.Handler {
	h := &handlers{b: cfg.Backend, logger: cfg.Logger, keys: cfg.Keys, creating: map[string]int{}}
	opts := []connect.HandlerOption{
		connect.WithInterceptors(NewObserveInterceptor(cfg.Registry, cfg.Logger), NewAuthInterceptor(cfg.Keys), adminOnly{}),
		connect.WithReadMaxBytes(MaxRequestBytes),
		connect.WithCompressMinBytes(CompressMinBytes),
	}
	mux := http.NewServeMux()
	mux.Handle(sandboxv1connect.NewSessionServiceHandler(h, opts...))
	mux.Handle(sandboxv1connect.NewExecutionServiceHandler(h, opts...))
	mux.Handle(sandboxv1connect.NewTemplateServiceHandler(h, opts...))
	mux.Handle(sandboxv1connect.NewClusterServiceHandler(&clusterHandlers{b: cfg.Cluster, logger: cfg.Logger}, opts...))
	reflector := grpcreflect.NewStaticReflector(services...)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))
	mux.Handle(grpchealth.NewHandler(grpchealth.NewStaticChecker(services...)))
	mux.Handle("/metrics", promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{Registry: cfg.Registry}))
	return mux
}

// NewServer returns an HTTP server for handler that speaks HTTP/1.1 and
// cleartext HTTP/2 (h2c), so one port serves Connect, gRPC and gRPC-Web;
// given a TLS configuration (serve it with ServeTLS), HTTP/1.1 and HTTP/2
// over TLS instead.
func NewServer(addr string, handler http.Handler, tlsConfig ...*tls.Config) *http.Server {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	var tc *tls.Config
	if len(tlsConfig) > 0 && tlsConfig[0] != nil {
		tc = tlsConfig[0]
		p.SetHTTP2(true)
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	return &http.Server{
		TLSConfig:         tc,
		Addr:              addr,
		Handler:           handler,
		Protocols:         p,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
}
