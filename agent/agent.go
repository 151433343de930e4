// Package agent is the per-host daemon that runs sandbox containers.
//
// It serves the internal sandbox.agent.v1.AgentService (authenticated by the
// cluster token) on its own port, starts and stops session containers through
// the runtime port (agent/runtime), hands each executor its session, forwards
// executions to it, and relays the executor's callbacks to the scheduler's
// ControlPlaneService. It keeps the artifacts executors upload
// (agent/artifacts) and a small bbolt file of which container serves which
// session (agent/state).
//
// A restarted agent (after a crash or kill -9) takes back the sessions whose
// containers still run (see recover.go); a stopped agent destroys its
// containers. Servers' commands are fenced by Raft term (see fence.go).
//
// Files under DataDir:
//
//	agent.db                     bbolt, see package agent/state
//	artifacts/                   artifact store, see package agent/artifacts
//	sockets/                     0700, root
//	sockets/<container id>/      0700, uid/gid 1000; bound at /run/sandbox in the container
//	    agent.sock               the agent's callback server for that session only (0600, 1000:1000)
//	    executor.sock            the executor's API, created by the executor
//
// Each callback socket accepts only its own session's token, so a token is
// bound to the container it was handed to.
package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sandboxhq/sandbox/agent/artifacts"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/state"
	"github.com/sandboxhq/sandbox/api"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	"github.com/sandboxhq/sandbox/internal/membership"
)

// Config configures an Agent.
type Config struct {
	// ID names the agent in the cluster and labels its containers.
	ID string
	// DataDir holds agent.db, the artifacts and the per-container socket directories.
	DataDir string
	// ListenAddr is where the internal AgentService and /metrics are served (h2c and HTTP/1.1).
	ListenAddr string
	// AdvertiseAddr is the host:port servers use to reach this agent; ListenAddr when empty.
	AdvertiseAddr string
	// Gossip, when set, makes the agent a member of the servers' gossip mesh,
	// which is how they learn that it died.
	Gossip *membership.Config
	// ServerURL is the base URL of a scheduler's internal ControlPlaneService,
	// or several, comma-separated: the agent fails over between them.
	ServerURL string
	// ClusterToken authenticates servers to the agent and the agent to servers.
	ClusterToken string
	Runtime      runtime.Runtime
	// CPUMillis and MemoryMiB are the capacity the agent announces.
	CPUMillis int32
	MemoryMiB int64
	// CallbackListen, when set, is a TCP address where executors call back
	// (for runtimes whose containers run elsewhere, as Kubernetes Pods do),
	// and CallbackURL is the URL they are given for it; both or neither.
	// Empty: executors call back on the unix socket in their socket
	// directory.
	CallbackListen string
	CallbackURL    string
	// ExecutorLogLevel is passed to every executor as LOG_LEVEL.
	ExecutorLogLevel string
	// WarmConcurrency bounds how many warm containers start at once when
	// the pools refill (0: 2).
	WarmConcurrency int
	Logger          *slog.Logger
	// Registry receives the agent's metrics and is served on /metrics; a fresh one when nil.
	Registry *prometheus.Registry
}

// DefaultConfig returns the defaults: the host name as ID, the host's CPUs
// and memory as capacity, 127.0.0.1:7402 for the internal API.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		ID:         host,
		DataDir:    "/var/lib/sandbox-agent",
		ListenAddr: "127.0.0.1:7402",
		ServerURL:  "http://127.0.0.1:7401",
		// CPU limits are CFS quotas, ceilings rather than reservations, so a
		// host offers sessions four times its cores by default.
		CPUMillis:        int32(goruntime.NumCPU() * 1000 * cpuOvercommit),
		MemoryMiB:        hostMemoryMiB(),
		ExecutorLogLevel: "info",
	}
}

// cpuOvercommit is how many CPU-limit millis a host offers per core millis.
const cpuOvercommit = 4

// hostMemoryMiB reads MemTotal from /proc/meminfo; 0 when unknown.
func hostMemoryMiB() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kib, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return 0
			}
			return kib / 1024
		}
	}
	return 0
}

// Timings of the agent; fields of Agent so tests can shorten them.
const (
	defaultHealthTimeout = 30 * time.Second
	// defaultAdoptHealthTimeout bounds the health check of a container to
	// re-adopt: its executor was already up, so it answers at once or never.
	defaultAdoptHealthTimeout = 5 * time.Second
	defaultHealthInterval     = 5 * time.Millisecond
	defaultRelayAttempts      = 3
	defaultRelayBackoff       = 100 * time.Millisecond
	defaultRegisterInterval   = 10 * time.Second
	// destroyTimeout bounds one Runtime.Destroy during cleanup.
	destroyTimeout = 30 * time.Second
	// maxRequestBytes bounds one AgentService request (code is at most 1 MiB, env 64 KiB).
	maxRequestBytes = 4 << 20
	// shutdownTimeout bounds draining the internal API at exit.
	shutdownTimeout = 5 * time.Second
)

// Agent runs the sandboxes of one host.
type Agent struct {
	cfg        Config
	log        *slog.Logger
	rt         runtime.Runtime
	store      *artifacts.Store
	db         *state.Store
	cp         agentv1connect.ControlPlaneServiceClient
	metrics    *metrics
	handler    http.Handler
	socketsDir string

	healthTimeout      time.Duration
	adoptHealthTimeout time.Duration
	healthInterval     time.Duration
	relayAttempts      int
	relayBackoff       time.Duration
	registerInterval   time.Duration

	// baseCtx is the parent of every session's context; cancel ends them all.
	baseCtx context.Context
	cancel  context.CancelFunc
	// wg tracks every goroutine the agent starts (watchers, callback servers, registration).
	wg sync.WaitGroup

	// pools are the warm pools (see pool.go).
	pools *pools
	// labelSlot lets one claimed container's label be written at a time.
	labelSlot chan struct{}
	// callbacks serves every session's callback socket (callbackHandler).
	callbacks http.Handler

	mu       sync.Mutex
	sessions map[string]*session
	// meshUpdate asks the gossip loop to re-advertise this agent's metadata.
	meshUpdate chan struct{}
	closed     bool

	// fenceMu orders fence checks; fenceTerm is the highest term seen, as in agent.db.
	fenceMu   sync.Mutex
	fenceTerm uint64

	ran      atomic.Bool
	shutOnce sync.Once
}

// New checks cfg, opens the agent's state and artifact store under DataDir
// and builds the internal API. Nothing runs until Run.
func New(cfg Config) (*Agent, error) {
	if err := validateID("agent id", cfg.ID); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	switch {
	case cfg.DataDir == "":
		return nil, errors.New("agent config: DataDir is required")
	case cfg.ServerURL == "":
		return nil, errors.New("agent config: ServerURL is required")
	case cfg.ClusterToken == "":
		return nil, errors.New("agent config: ClusterToken is required")
	case cfg.Runtime == nil:
		return nil, errors.New("agent config: Runtime is required")
	case (cfg.CallbackListen == "") != (cfg.CallbackURL == ""):
		return nil, errors.New("agent config: CallbackListen and CallbackURL go together")
	}
	if cfg.ListenAddr == "" {
		cfg.ListenAddr = DefaultConfig().ListenAddr
	}
	if cfg.ExecutorLogLevel == "" {
		cfg.ExecutorLogLevel = "info"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	m, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent data dir: %w", err)
	}
	socketsDir := filepath.Join(cfg.DataDir, "sockets")
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "logs"), 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(socketsDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent socket dir: %w", err)
	}
	store, err := artifacts.New(filepath.Join(cfg.DataDir, "artifacts"))
	if err != nil {
		return nil, err
	}
	db, err := state.Open(filepath.Join(cfg.DataDir, "agent.db"))
	if err != nil {
		return nil, err
	}
	term, err := db.FenceTerm()
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("agent %s: %w", cfg.ID, err)
	}
	m.fenceTerm.Set(float64(term))

	cpTransport := http.DefaultTransport.(*http.Transport).Clone()
	cpTransport.MaxIdleConnsPerHost = 16
	a := &Agent{
		cfg:                cfg,
		log:                cfg.Logger.With("agent", cfg.ID),
		rt:                 cfg.Runtime,
		store:              store,
		db:                 db,
		metrics:            m,
		socketsDir:         socketsDir,
		healthTimeout:      defaultHealthTimeout,
		adoptHealthTimeout: defaultAdoptHealthTimeout,
		healthInterval:     defaultHealthInterval,
		relayAttempts:      defaultRelayAttempts,
		relayBackoff:       defaultRelayBackoff,
		registerInterval:   defaultRegisterInterval,
		sessions:           map[string]*session{},
		meshUpdate:         make(chan struct{}, 1),
		fenceTerm:          term,
		pools:              newPools(cfg.WarmConcurrency),
		labelSlot:          make(chan struct{}, 1),
	}
	a.callbacks = a.callbackHandler()
	if err := cfg.Registry.Register(warmReadyCollector{a.pools}); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("agent metrics: %w", err)
	}
	cpClient := &http.Client{Transport: cpTransport}
	a.cp = newFailoverCP(cfg.ServerURL, func(url string) agentv1connect.ControlPlaneServiceClient {
		return agentv1connect.NewControlPlaneServiceClient(cpClient, url, api.WithBearer(cfg.ClusterToken))
	})
	a.baseCtx, a.cancel = context.WithCancel(context.Background())

	mux := http.NewServeMux()
	clusterKeys := &api.Keys{}
	clusterKeys.AddAdmin("cluster", cfg.ClusterToken)
	path, h := agentv1connect.NewAgentServiceHandler(&service{a: a},
		// Auth first: only an authenticated server may raise the fence term.
		connect.WithInterceptors(api.NewAuthInterceptor(clusterKeys), a.fenceInterceptor()),
		connect.WithReadMaxBytes(maxRequestBytes),
		connect.WithCompressMinBytes(api.CompressMinBytes))
	mux.Handle(path, h)
	mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{Registry: cfg.Registry}))
	a.handler = mux
	return a, nil
}

// Handler serves the AgentService and /metrics; Run serves it on ListenAddr.
func (a *Agent) Handler() http.Handler { return a.handler }

// Run re-adopts the sessions a previous run of this agent left running and
// destroys everything else it left, then serves the internal API on
// ListenAddr, registers with the servers (again every 10s), and when ctx is
// done stops every container it holds and returns.
func (a *Agent) Run(ctx context.Context) error {
	if !a.ran.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	defer a.shutdown()

	// Before re-adoption: adopted executors may call back at once.
	stopCallbacks, err := a.serveCallbacksTCP()
	if err != nil {
		return err
	}
	defer stopCallbacks()
	if err := a.recoverSessions(ctx); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", a.cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("agent %s: listen on %s: %w", a.cfg.ID, a.cfg.ListenAddr, err)
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:           a.handler,
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()

	addr := a.cfg.AdvertiseAddr
	if addr == "" {
		addr = ln.Addr().String()
	}
	bootID := uuid.NewString()
	a.log.Info("agent serving", "listen", ln.Addr().String(), "advertise", addr, "boot_id", bootID)

	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.registerLoop(a.baseCtx, addr, bootID)
	}()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.runPools(a.baseCtx)
	}()

	if a.cfg.Gossip != nil {
		mesh, err := a.joinMesh(a.baseCtx, addr, bootID)
		if err != nil {
			_ = srv.Close()
			return fmt.Errorf("agent %s: gossip: %w", a.cfg.ID, err)
		}
		defer func() {
			// Leave on purpose, so the servers see LEFT rather than a failure.
			if err := mesh.Leave(2 * time.Second); err != nil {
				a.log.Warn("leaving the gossip mesh", "err", err)
			}
			_ = mesh.Shutdown()
		}()
	}

	var runErr error
	select {
	case <-ctx.Done():
	case err := <-serveErr:
		runErr = fmt.Errorf("agent %s: serve %s: %w", a.cfg.ID, ln.Addr(), err)
	}

	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
	shCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shCtx); err != nil {
		_ = srv.Close()
	}
	if runErr == nil {
		<-serveErr // http.ErrServerClosed
	}
	return runErr
}

// shutdown stops every session, ends the agent's goroutines and closes its
// state. Run calls it on the way out; tests that never Run call it too.
func (a *Agent) shutdown() {
	a.shutOnce.Do(func() {
		a.mu.Lock()
		a.closed = true
		ids := make([]string, 0, len(a.sessions))
		for id := range a.sessions {
			ids = append(ids, id)
		}
		a.mu.Unlock()
		for _, id := range ids {
			ctx, cancel := context.WithTimeout(context.Background(), destroyTimeout)
			if err := a.stopSession(ctx, id); err != nil {
				a.log.Error("stop session at shutdown", "session", id, "err", err)
			}
			cancel()
		}
		a.cancel()
		a.wg.Wait()
		if err := a.db.Close(); err != nil {
			a.log.Error("close agent state", "err", err)
		}
		a.log.Info("agent stopped")
	})
}
