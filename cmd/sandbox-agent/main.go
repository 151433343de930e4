// Command sandbox-agent runs the agent of one host: it registers with the
// servers, starts and stops sandbox containers through containerd, and relays
// its executors' callbacks.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sandboxhq/sandbox/agent"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/internal/debugserver"
	"github.com/sandboxhq/sandbox/internal/membership"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	def := agent.DefaultConfig()
	var (
		id               = flag.String("id", def.ID, "agent id, stable across restarts (default: the hostname)")
		dataDir          = flag.String("data-dir", def.DataDir, "directory for the agent's state, sockets and artifacts")
		listen           = flag.String("listen", def.ListenAddr, "address of the internal AgentService and /metrics")
		advertise        = flag.String("advertise", "", "address servers reach this agent at (default: the listen address)")
		server           = flag.String("server", def.ServerURL, "URL of a scheduler's internal port, or several comma-separated (the agent fails over)")
		clusterTokenFile = flag.String("cluster-token-file", "", "file holding the token servers and agents share")
		containerdAddr   = flag.String("containerd-address", containerd.DefaultConfig().Address, "containerd socket")
		cpuMillis        = flag.Int("cpu-millis", int(def.CPUMillis), "CPU capacity offered to sessions, in thousandths of a core")
		memoryMiB        = flag.Int64("memory-mib", def.MemoryMiB, "memory capacity offered to sessions, in MiB")
		gossipAddr       = flag.String("gossip-addr", "127.0.0.1:7501", "gossip (memberlist) bind address; keep it stable across restarts so a restarted agent is recognised at once")
		gossipJoin       = flag.String("gossip-join", "", "comma-separated gossip addresses of servers; empty: no gossip (servers then only see registrations)")
		logLevel         = flag.String("log-level", "info", "debug, info, warn or error (also passed to executors)")
		plainRegistries  = flag.String("insecure-registry", "", "comma-separated registry hosts (host or host:port) to pull template images from over plain HTTP; loopback registries always are")
		warmConcurrency  = flag.Int("warm-concurrency", 2, "warm containers started at once when the warm pools refill")
		pprofAddr        = flag.String("pprof-addr", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6060; empty: off")
	)
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: %w", *logLevel, err)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *clusterTokenFile == "" {
		return errors.New("--cluster-token-file is required")
	}
	b, err := os.ReadFile(*clusterTokenFile)
	if err != nil {
		return fmt.Errorf("cluster token: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if os.Geteuid() != 0 {
		return errors.New("the agent must run as root: it drives containerd and hands socket directories to the sandbox user")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	rcfg := containerd.DefaultConfig()
	rcfg.Address = *containerdAddr
	for _, h := range strings.Split(*plainRegistries, ",") {
		if h = strings.TrimSpace(h); h != "" {
			rcfg.PlainHTTPRegistries = append(rcfg.PlainHTTPRegistries, h)
		}
	}
	rcfg.Logger = logger.With("component", "containerd")
	if _, err := os.Stat(*containerdAddr); errors.Is(err, os.ErrNotExist) {
		// No socket: say so at once rather than after the dial's timeout.
		return fmt.Errorf("containerd at %s is unreachable (is it running? make up starts it): no socket there", *containerdAddr)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	rt, err := containerd.New(cctx, rcfg)
	cancel()
	if err != nil {
		return fmt.Errorf("containerd at %s is unreachable (is it running? make up starts it): %w", *containerdAddr, err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg := def
	cfg.ID = *id
	cfg.DataDir = *dataDir
	cfg.ListenAddr = *listen
	cfg.AdvertiseAddr = *advertise
	cfg.ServerURL = *server
	cfg.ClusterToken = token
	cfg.Runtime = rt
	cfg.CPUMillis = int32(*cpuMillis)
	cfg.MemoryMiB = *memoryMiB
	cfg.ExecutorLogLevel = *logLevel
	if *warmConcurrency < 1 {
		fmt.Fprintf(os.Stderr, "sandbox-agent: --warm-concurrency must be at least 1, got %d\n", *warmConcurrency)
		os.Exit(2)
	}
	cfg.WarmConcurrency = *warmConcurrency
	cfg.Logger = logger
	cfg.Registry = reg
	if *gossipJoin != "" {
		host, port, err := net.SplitHostPort(*gossipAddr)
		if err != nil {
			return fmt.Errorf("--gossip-addr %q: %w", *gossipAddr, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return fmt.Errorf("--gossip-addr %q: %w", *gossipAddr, err)
		}
		g := membership.DefaultConfig()
		g.BindAddr, g.BindPort = host, p
		for _, j := range strings.Split(*gossipJoin, ",") {
			if j = strings.TrimSpace(j); j != "" {
				g.Join = append(g.Join, j)
			}
		}
		g.SecretKey = membership.KeyFromToken(token)
		cfg.Gossip = &g
	}
	if err := debugserver.Start(ctx, *pprofAddr, logger); err != nil {
		return err
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	logger.Info("agent starting", "id", cfg.ID, "listen", cfg.ListenAddr, "server", cfg.ServerURL, "containerd", *containerdAddr,
		"cpu_millis", cfg.CPUMillis, "memory_mib", cfg.MemoryMiB)
	return a.Run(ctx)
}
