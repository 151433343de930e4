// Command sandbox-agent runs the agent of one host: it registers with the
// servers, starts and stops sandbox containers through containerd (or Docker:
// --runtime docker), and relays
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
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sandboxhq/sandbox/agent"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/agent/runtime/docker"
	"github.com/sandboxhq/sandbox/agent/runtime/kubernetes"
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
		runtimeKind      = flag.String("runtime", "containerd", "container runtime the agent drives: containerd, docker (hosts that run Docker) or kubernetes (sandboxes as Pods; docs/kubernetes.md)")
		containerdAddr   = flag.String("containerd-address", containerd.DefaultConfig().Address, "containerd socket (--runtime containerd)")
		dockerHost       = flag.String("docker-host", "", "dockerd address, e.g. unix:///var/run/docker.sock (--runtime docker; default: $DOCKER_HOST, then Docker's default socket)")
		kubeconfig       = flag.String("kubeconfig", "", "kubeconfig file (--runtime kubernetes; empty: the Pod's in-cluster configuration)")
		kubeNamespace    = flag.String("kubernetes-namespace", kubernetes.DefaultConfig().Namespace, "namespace of the sandbox Pods (--runtime kubernetes)")
		kubeNode         = flag.String("kubernetes-node", "", "node the sandbox Pods are pinned to, normally the agent's own (--runtime kubernetes; empty: the scheduler places them)")
		kubeRuntimeClass = flag.String("kubernetes-runtime-class", "", "runtimeClassName of the sandbox Pods, e.g. gvisor or kata (--runtime kubernetes; empty: the cluster's default)")
		kubeSeccomp      = flag.String("kubernetes-seccomp-profile", "", "Localhost seccomp profile of the sandbox Pods, relative to the kubelet's seccomp directory, e.g. sandbox/bubblewrap.json (--runtime kubernetes; empty: RuntimeDefault, under which bubblewrap fails)")
		callbackListen   = flag.String("callback-listen", "", "TCP address where executors call back, for runtimes whose containers run elsewhere (--runtime kubernetes needs it, e.g. 0.0.0.0:7403)")
		callbackURL      = flag.String("callback-url", "", "URL executors call back on (default: http://<the --advertise host>:<the --callback-listen port>)")
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
	// On Kubernetes the agent drives the API server only: no root.
	if os.Geteuid() != 0 && *runtimeKind != "kubernetes" {
		return fmt.Errorf("the agent must run as root: it drives %s and hands socket directories to the sandbox user", *runtimeKind)
	}
	cbURL, err := callbackURLFor(*callbackListen, *callbackURL, *advertise, *listen)
	if err != nil {
		return err
	}
	if *runtimeKind == "kubernetes" && *callbackListen == "" {
		return errors.New("--runtime kubernetes needs --callback-listen: executors in Pods call the agent back over TCP")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	rt, where, err := openRuntime(ctx, runtimeOptions{
		kind:            *runtimeKind,
		containerdAddr:  *containerdAddr,
		dockerHost:      *dockerHost,
		dataDir:         *dataDir,
		plainRegistries: *plainRegistries,
		logger:          logger,
		kube: kubernetes.Config{
			Namespace:        *kubeNamespace,
			NodeName:         *kubeNode,
			RuntimeClassName: *kubeRuntimeClass,
			SeccompProfile:   *kubeSeccomp,
			CallbackPort:     portOf(*callbackListen),
		},
		kubeconfig: *kubeconfig,
	})
	if err != nil {
		return err
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
	cfg.CallbackListen, cfg.CallbackURL = *callbackListen, cbURL
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
	logger.Info("agent starting", "id", cfg.ID, "listen", cfg.ListenAddr, "server", cfg.ServerURL, "runtime", *runtimeKind, "runtime_address", where,
		"cpu_millis", cfg.CPUMillis, "memory_mib", cfg.MemoryMiB)
	return a.Run(ctx)
}

// runtimeOptions are the flags that choose and reach the container runtime.
type runtimeOptions struct {
	kind            string
	containerdAddr  string
	dockerHost      string
	dataDir         string
	plainRegistries string
	logger          *slog.Logger
	kube            kubernetes.Config
	kubeconfig      string
}

// openRuntime connects to the runtime the agent drives and returns it with
// its address. An unreachable runtime is an error at once, naming it.
func openRuntime(ctx context.Context, o runtimeOptions) (runtime.Runtime, string, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	switch o.kind {
	case "containerd":
		rcfg := containerd.DefaultConfig()
		rcfg.Address = o.containerdAddr
		for _, h := range strings.Split(o.plainRegistries, ",") {
			if h = strings.TrimSpace(h); h != "" {
				rcfg.PlainHTTPRegistries = append(rcfg.PlainHTTPRegistries, h)
			}
		}
		rcfg.Logger = o.logger.With("component", "containerd")
		if _, err := os.Stat(o.containerdAddr); errors.Is(err, os.ErrNotExist) {
			// No socket: say so at once rather than after the dial's timeout.
			return nil, "", fmt.Errorf("containerd at %s is unreachable (is it running? make up starts it): no socket there", o.containerdAddr)
		}
		rt, err := containerd.New(cctx, rcfg)
		if err != nil {
			return nil, "", fmt.Errorf("containerd at %s is unreachable (is it running? make up starts it): %w", o.containerdAddr, err)
		}
		return rt, o.containerdAddr, nil
	case "docker":
		if o.plainRegistries != "" {
			return nil, "", errors.New("--insecure-registry does not apply to --runtime docker: list the registry in dockerd's insecure-registries (daemon.json) instead")
		}
		rt, err := docker.New(cctx, docker.Config{
			Host:     o.dockerHost,
			StateDir: filepath.Join(o.dataDir, "docker"),
			Logger:   o.logger.With("component", "docker"),
		})
		if err != nil {
			return nil, "", fmt.Errorf("%w (is dockerd running? make up RUNTIME=docker starts it)", err)
		}
		return rt, rt.DaemonHost(), nil
	case "kubernetes":
		cs, err := kubernetes.NewClientset(o.kubeconfig)
		if err != nil {
			return nil, "", err
		}
		kcfg := o.kube
		kcfg.Clientset = cs
		kcfg.Logger = o.logger.With("component", "kubernetes")
		rt, err := kubernetes.New(cctx, kcfg)
		if err != nil {
			return nil, "", fmt.Errorf("kubernetes API server is unreachable or refuses the agent: %w", err)
		}
		return rt, "namespace " + kcfg.Namespace, nil
	}
	return nil, "", fmt.Errorf("--runtime %q: want containerd, docker or kubernetes", o.kind)
}

// callbackURLFor is the URL executors call back on: --callback-url, or
// http://<advertise host>:<callback-listen port>. Empty without a
// --callback-listen.
func callbackURLFor(listen, url, advertise, apiListen string) (string, error) {
	if listen == "" {
		if url != "" {
			return "", errors.New("--callback-url needs --callback-listen")
		}
		return "", nil
	}
	if _, _, err := net.SplitHostPort(listen); err != nil {
		return "", fmt.Errorf("--callback-listen %q: %w", listen, err)
	}
	if url != "" {
		return url, nil
	}
	adv := advertise
	if adv == "" {
		adv = apiListen
	}
	host, _, err := net.SplitHostPort(adv)
	if err != nil || host == "" || host == "0.0.0.0" || host == "::" {
		return "", fmt.Errorf("--callback-url is needed: no host to derive it from (--advertise %q)", advertise)
	}
	return "http://" + net.JoinHostPort(host, strconv.Itoa(int(portOf(listen)))), nil
}

// portOf is the port of a host:port address, 0 when it has none.
func portOf(addr string) int32 {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return int32(n)
}
