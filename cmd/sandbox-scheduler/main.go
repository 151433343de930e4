// Command sandbox-scheduler runs one scheduler server: the public API, the
// internal control-plane port the agents call, and a Raft member.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/internal/debugserver"
	"github.com/sandboxhq/sandbox/internal/membership"
	"github.com/sandboxhq/sandbox/scheduler"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
	"github.com/sandboxhq/sandbox/scheduler/raftnode"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-scheduler:", err)
		os.Exit(1)
	}
}

func run() error {
	host, _ := os.Hostname()
	var (
		id               = flag.String("id", host, "server id, stable across restarts")
		dataDir          = flag.String("data-dir", "/var/lib/sandbox/scheduler", "directory for Raft log, stable store and snapshots")
		apiAddr          = flag.String("api-addr", "127.0.0.1:7400", "public API address (Connect, gRPC, gRPC-Web, /metrics)")
		internalAddr     = flag.String("internal-addr", "127.0.0.1:7401", "internal address agents call (ControlPlaneService)")
		raftAddr         = flag.String("raft-addr", "127.0.0.1:7300", "Raft transport address")
		apiKeysFile      = flag.String("api-keys-file", "", "file of accepted API keys, one per line: \"TENANT KEY [admin] [rate=R] [sessions=N] [executions=R]\" (KEY may be sha256:HEX; docs/operations.md)")
		clusterTokenFile = flag.String("cluster-token-file", "", "file holding the token servers and agents share")
		logLevel         = flag.String("log-level", "info", "debug, info, warn or error")
		bootstrapExpect  = flag.Int("bootstrap-expect", 0, "number of servers that form a new cluster together; 0 with --join: join an existing cluster; 0 alone: wait to be added with sandboxctl cluster join (default: 1 without --join)")
		join             = flag.String("join", "", "comma-separated internal addresses of other servers, to form or join a cluster")
		heartbeat        = flag.Duration("raft-heartbeat-timeout", raftnode.DefaultConfig().HeartbeatTimeout, "Raft heartbeat timeout")
		election         = flag.Duration("raft-election-timeout", raftnode.DefaultConfig().ElectionTimeout, "Raft election timeout")
		retention        = flag.Duration("retention", scheduler.DefaultConfig().Retention, "how long ended sessions and their executions are kept")
		gossipAddr       = flag.String("gossip-addr", "127.0.0.1:7500", "gossip (memberlist) bind address; agents join it")
		gossipJoin       = flag.String("gossip-join", "", "comma-separated gossip addresses of other servers")
		maxLifetime      = flag.Duration("default-max-lifetime", scheduler.DefaultConfig().DefaultMaxLifetime, "maximum lifetime of sessions that ask for none")
		tlsCert          = flag.String("tls-cert-file", "", "PEM certificate of the public API; with --tls-key-file the API is served over TLS (HTTP/2 and HTTP/1.1) instead of cleartext h2c")
		tlsKey           = flag.String("tls-key-file", "", "PEM private key of --tls-cert-file")
		tlsCA            = flag.String("tls-ca-file", "", "PEM bundle servers verify each other's API certificates with when they forward calls to the leader (default: the system's roots plus --tls-cert-file itself)")
		pprofAddr        = flag.String("pprof-addr", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6060; empty: off")
	)
	flag.Parse()

	logger, err := newLogger(*logLevel)
	if err != nil {
		return err
	}
	if *apiKeysFile == "" || *clusterTokenFile == "" {
		return errors.New("--api-keys-file and --cluster-token-file are required")
	}
	tlsFiles := api.TLSFiles{Cert: *tlsCert, Key: *tlsKey, CA: *tlsCA}
	var serverTLS, peerTLS *tls.Config
	if tlsFiles.Enabled() {
		if serverTLS, peerTLS, err = tlsFiles.Load(); err != nil {
			return err
		}
	}
	keys, err := api.LoadKeys(*apiKeysFile)
	if err != nil {
		return err
	}
	if keys.Admins() == 0 {
		logger.Warn("no API key is marked admin: nobody can manage templates or the cluster through the API; add \"admin\" to an operator's line in the key file",
			"api_keys_file", *apiKeysFile)
	}
	token, err := readToken(*clusterTokenFile)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*dataDir, 0o700); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := debugserver.Start(ctx, *pprofAddr, logger); err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	state := fsm.New(logger)
	rcfg := raftnode.DefaultConfig()
	rcfg.ID = *id
	rcfg.DataDir = filepath.Join(*dataDir, "raft")
	rcfg.BindAddr = *raftAddr
	rcfg.HeartbeatTimeout = *heartbeat
	rcfg.ElectionTimeout = *election
	rcfg.LeaderLeaseTimeout = min(rcfg.LeaderLeaseTimeout, *heartbeat)
	rcfg.Logger = logger.With("component", "raft")
	node, err := raftnode.New(rcfg, state)
	if err != nil {
		return err
	}
	defer node.Close()

	scfg := scheduler.DefaultConfig()
	scfg.ClusterToken = token
	scfg.Logger = logger
	scfg.Registry = reg
	scfg.Retention = *retention
	scfg.DefaultMaxLifetime = *maxLifetime
	scfg.PublicTLS = peerTLS
	scfg.Self = &sandboxv1.Server{Id: *id, Address: *raftAddr, ApiAddress: *apiAddr, InternalAddress: *internalAddr}
	mesh, err := joinMesh(ctx, logger, *gossipAddr, *gossipJoin, token, scfg.Self)
	if err != nil {
		return err
	}
	defer func() {
		_ = mesh.Leave(2 * time.Second)
		_ = mesh.Shutdown()
	}()
	scfg.Mesh = mesh
	sched := scheduler.New(scfg, state, node)
	peers := splitList(*join)
	// Without --join and without an explicit --bootstrap-expect, a server
	// forms a cluster of its own; --bootstrap-expect 0 makes it wait to be
	// added (sandboxctl cluster join).
	expect := *bootstrapExpect
	expectSet := false
	flag.Visit(func(f *flag.Flag) { expectSet = expectSet || f.Name == "bootstrap-expect" })
	if expect == 0 && len(peers) == 0 && !expectSet {
		expect = 1
	}

	pub := api.NewServer(*apiAddr, sched.Forward(api.NewHandler(api.Config{Backend: sched, Cluster: sched, Keys: keys, Logger: logger, Registry: reg}), scheduler.PublicPort), serverTLS)
	internal := api.NewServer(*internalAddr, sched.Forward(sched.ControlPlaneHandler(), scheduler.InternalPort))
	errc := make(chan error, 3)
	for _, srv := range []*http.Server{pub, internal} {
		ln, err := net.Listen("tcp", srv.Addr)
		if err != nil {
			return err
		}
		if srv.TLSConfig != nil {
			go func() { errc <- srv.ServeTLS(ln, "", "") }()
			continue
		}
		go func() { errc <- srv.Serve(ln) }()
	}
	go func() { errc <- sched.Run(ctx) }()
	go func() {
		if err := sched.Join(ctx, scheduler.JoinConfig{Raft: node, BootstrapExpect: expect, Join: peers}); err != nil && ctx.Err() == nil {
			errc <- fmt.Errorf("joining the cluster: %w", err)
		}
	}()
	logger.Info("scheduler started", "id", *id, "api", *apiAddr, "api_tls", serverTLS != nil, "internal", *internalAddr, "raft", *raftAddr, "data_dir", *dataDir)

	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	logger.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = pub.Shutdown(sctx)
	_ = internal.Shutdown(sctx)
	return nil
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("cluster token: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 {
		return "", fmt.Errorf("cluster token in %s is shorter than 16 characters", path)
	}
	return t, nil
}

// joinMesh joins the gossip mesh as a server. Gossip is encrypted with a key
// derived from the cluster token, so only holders of the token take part.
func joinMesh(ctx context.Context, logger *slog.Logger, bind, join, token string, self *sandboxv1.Server) (*membership.Mesh, error) {
	host, port, err := net.SplitHostPort(bind)
	if err != nil {
		return nil, fmt.Errorf("--gossip-addr %q: %w", bind, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, fmt.Errorf("--gossip-addr %q: %w", bind, err)
	}
	cfg := membership.DefaultConfig()
	cfg.Name = self.GetId()
	cfg.BindAddr, cfg.BindPort = host, p
	cfg.Join = splitList(join)
	cfg.SecretKey = membership.KeyFromToken(token)
	cfg.Logger = logger.With("component", "gossip")
	cfg.Meta = func() *agentv1.NodeMeta {
		return &agentv1.NodeMeta{Role: agentv1.NodeMeta_ROLE_SERVER, Id: self.GetId(), Address: self.GetInternalAddress(),
			ApiAddress: self.GetApiAddress(), RaftAddress: self.GetAddress()}
	}
	return membership.New(ctx, cfg)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
