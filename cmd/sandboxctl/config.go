package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// Configuration defaults and where they are looked up.
const (
	defaultAddr = "http://127.0.0.1:7400"
	envAddr     = "SANDBOX_ADDR"
	envAPIKey   = "SANDBOX_API_KEY"
	envCAFile   = "SANDBOX_CA_FILE"
	// apiKeyFile is looked up in the current directory and its parents
	// (where `make up` writes the dev key), then in $HOME.
	apiKeyFile = ".sandbox/api-key"
)

// readConsistencyHeader, set to "stale" on read calls, lets the server that
// receives a read answer from its own copy of the state instead of going
// through the Raft leader: cheaper, still served while there is no leader,
// but possibly behind by the replication lag.
const (
	readConsistencyHeader = "Sandbox-Read-Consistency"
	readConsistencyStale  = "stale"
)

// globalFlags are accepted before the command and after any leaf command.
// They are registered with flag.Func so that registering them on a second
// flag set neither resets what the first one parsed nor prints a secret as a
// default in the help.
type globalFlags struct {
	addr     string
	apiKey   string
	caFile   string
	protocol string
	stale    bool
}

func (g *globalFlags) register(fs *flag.FlagSet) {
	fs.Func("addr", "`URL` of the API (env "+envAddr+", default "+defaultAddr+")", func(s string) error {
		g.addr = s
		return nil
	})
	fs.Func("api-key", "`KEY` to authenticate with (env "+envAPIKey+", default: the contents of "+apiKeyFile+" in the current directory, its parents or $HOME)", func(s string) error {
		g.apiKey = s
		return nil
	})
	fs.Func("ca-file", "PEM `FILE` of the certificates that sign an https API's (env "+envCAFile+", default: the system's)", func(s string) error {
		g.caFile = s
		return nil
	})
	fs.Func("protocol", "`PROTOCOL` on the wire: connect (default), grpc or grpcweb", func(s string) error {
		switch s {
		case "connect", "grpc", "grpcweb":
			g.protocol = s
			return nil
		}
		return fmt.Errorf("must be connect, grpc or grpcweb")
	})
	fs.BoolFunc("stale", "let read calls be answered from the receiving server's local state, which may lag the leader's (header "+readConsistencyHeader+": "+readConsistencyStale+")", func(s string) error {
		v, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("want true or false, got %q", s)
		}
		g.stale = v
		return nil
	})
}

// config is the resolved configuration.
type config struct {
	addr     string
	apiKey   string
	caFile   string
	protocol string
	stale    bool
}

// config resolves flags, then the environment, then the defaults.
func (a *app) config() (config, error) {
	c := config{addr: a.global.addr, apiKey: a.global.apiKey, caFile: a.global.caFile, protocol: a.global.protocol, stale: a.global.stale}
	if c.caFile == "" {
		c.caFile = a.getenv(envCAFile)
	}
	if c.addr == "" {
		c.addr = a.getenv(envAddr)
	}
	if c.addr == "" {
		c.addr = defaultAddr
	}
	if !strings.Contains(c.addr, "://") {
		c.addr = "http://" + c.addr
	}
	c.addr = strings.TrimRight(c.addr, "/")
	if c.apiKey == "" {
		c.apiKey = a.getenv(envAPIKey)
	}
	if c.apiKey == "" {
		key, err := a.findAPIKey()
		if err != nil {
			return config{}, err
		}
		c.apiKey = key
	}
	if c.protocol == "" {
		c.protocol = "connect"
	}
	return c, nil
}

// findAPIKey reads apiKeyFile from the current directory or its nearest
// parent that has one, else from $HOME. No file is not an error: the server
// then answers unauthenticated, which says more than a guess here would.
func (a *app) findAPIKey() (string, error) {
	var candidates []string
	if wd, err := a.getwd(); err == nil {
		for dir := wd; ; {
			candidates = append(candidates, filepath.Join(dir, apiKeyFile))
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	if home := a.getenv("HOME"); home != "" {
		candidates = append(candidates, filepath.Join(home, apiKeyFile))
	}
	for _, p := range candidates {
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("read API key: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return "", nil
}

// abs resolves a path from the command line against the working directory.
func (a *app) abs(p string) (string, error) {
	if filepath.IsAbs(p) {
		return p, nil
	}
	wd, err := a.getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	return filepath.Join(wd, p), nil
}

// clients are the generated API clients, sharing one HTTP client.
type clients struct {
	sessions   sandboxv1connect.SessionServiceClient
	executions sandboxv1connect.ExecutionServiceClient
	templates  sandboxv1connect.TemplateServiceClient
	cluster    sandboxv1connect.ClusterServiceClient
}

// clients resolves the configuration and builds the API clients.
func (a *app) clients() (*clients, error) {
	cfg, err := a.config()
	if err != nil {
		return nil, err
	}
	hc, err := newHTTPClient(cfg.addr, cfg.caFile)
	if err != nil {
		return nil, err
	}
	opts := []connect.ClientOption{connect.WithInterceptors(bearerAuth(cfg.apiKey), readConsistency(cfg.stale))}
	switch cfg.protocol {
	case "grpc":
		opts = append(opts, connect.WithGRPC())
	case "grpcweb":
		opts = append(opts, connect.WithGRPCWeb())
	}
	return &clients{
		sessions:   sandboxv1connect.NewSessionServiceClient(hc, cfg.addr, opts...),
		executions: sandboxv1connect.NewExecutionServiceClient(hc, cfg.addr, opts...),
		templates:  sandboxv1connect.NewTemplateServiceClient(hc, cfg.addr, opts...),
		cluster:    sandboxv1connect.NewClusterServiceClient(hc, cfg.addr, opts...),
	}, nil
}

// newHTTPClient returns a client that speaks HTTP/2 without TLS (h2c, prior
// knowledge) to http:// addresses, as the API servers do, and negotiates
// HTTP/2 or HTTP/1.1 over TLS for https:// ones.
func newHTTPClient(addr, caFile string) (*http.Client, error) {
	u, err := url.Parse(addr)
	if err != nil {
		return nil, usagef("bad API address %q: %v", addr, err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	var p http.Protocols
	switch u.Scheme {
	case "http":
		p.SetUnencryptedHTTP2(true)
	case "https":
		p.SetHTTP1(true)
		p.SetHTTP2(true)
		if caFile != "" {
			roots, err := api.RootsFrom(caFile)
			if err != nil {
				return nil, usagef("%v", err)
			}
			tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
		}
	default:
		return nil, usagef("bad API address %q: the scheme must be http or https", addr)
	}
	tr.Protocols = &p
	return &http.Client{Transport: tr}, nil
}

// bearerAuth sends "Authorization: Bearer key" on every call, unary and
// streaming. An empty key sends nothing.
func bearerAuth(key string) connect.Interceptor {
	return &authInterceptor{header: "Bearer " + key, enabled: key != ""}
}

type authInterceptor struct {
	header  string
	enabled bool
}

func (i *authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if i.enabled {
			req.Header().Set("Authorization", i.header)
		}
		return next(ctx, req)
	}
}

func (i *authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if i.enabled {
			conn.RequestHeader().Set("Authorization", i.header)
		}
		return conn
	}
}

func (i *authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// readConsistency sends "Sandbox-Read-Consistency: stale" on the read calls
// (the methods the API declares free of side effects) when stale is set,
// and nothing otherwise. Writes always go through the leader.
func readConsistency(stale bool) connect.Interceptor {
	return &readConsistencyInterceptor{stale: stale}
}

type readConsistencyInterceptor struct{ stale bool }

func (i *readConsistencyInterceptor) applies(spec connect.Spec) bool {
	return i.stale && spec.IdempotencyLevel == connect.IdempotencyNoSideEffects
}

func (i *readConsistencyInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if i.applies(req.Spec()) {
			req.Header().Set(readConsistencyHeader, readConsistencyStale)
		}
		return next(ctx, req)
	}
}

func (i *readConsistencyInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if i.applies(spec) {
			conn.RequestHeader().Set(readConsistencyHeader, readConsistencyStale)
		}
		return conn
	}
}

func (i *readConsistencyInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
