// Package scheduler is the control plane: it validates requests, places
// sessions on agents, commits every change through Raft (scheduler/fsm via
// scheduler/raftnode), drives the agents over their internal service, and
// runs the leader's housekeeping (idle sessions, lost executions).
//
// It implements api.Backend for the public API and
// sandbox.agent.v1.ControlPlaneService for the agents.
package scheduler

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httputil"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// Config tunes the scheduler's behaviour.
type Config struct {
	// ClusterToken authenticates servers and agents to each other.
	ClusterToken string
	// HousekeepingInterval is how often the leader looks for idle sessions
	// and executions that will never report.
	HousekeepingInterval time.Duration
	// ExecutionGrace is how long past its timeout an execution may stay
	// unreported before the leader declares it LOST.
	ExecutionGrace time.Duration
	// AgentTimeout is how long an agent may go without registering before it
	// is no longer offered new sessions.
	AgentTimeout time.Duration
	// StartTimeout bounds starting a session's container.
	StartTimeout time.Duration
	// DefaultMaxLifetime applies to sessions that ask for no maximum lifetime.
	DefaultMaxLifetime time.Duration
	// Retention is how long ended sessions and their executions are kept
	// before the leader purges them.
	Retention time.Duration
	// ReconcileInterval is how often the leader compares what each agent
	// runs with the replicated state (besides after each leader change and
	// agent restart).
	ReconcileInterval time.Duration
	// Mesh, when set, is the gossip mesh that tells which agents are alive.
	Mesh Mesh
	// AgentDeadGrace is how long an agent may be missing from the mesh
	// before its sessions are declared LOST.
	AgentDeadGrace time.Duration
	// Self describes this server: id and its Raft, API and internal addresses.
	Self *sandboxv1.Server
	// PublicTLS, when the public API is served over TLS, is the client
	// configuration a follower forwards public calls to the leader with.
	PublicTLS *tls.Config
	Logger    *slog.Logger
	Registry  prometheus.Registerer
}

// DefaultConfig returns the defaults for a LAN deployment.
func DefaultConfig() Config {
	return Config{
		HousekeepingInterval: time.Second,
		ExecutionGrace:       30 * time.Second,
		AgentTimeout:         30 * time.Second,
		StartTimeout:         60 * time.Second,
		DefaultMaxLifetime:   24 * time.Hour,
		Retention:            24 * time.Hour,
		ReconcileInterval:    30 * time.Second,
		AgentDeadGrace:       time.Second,
		Logger:               slog.Default(),
	}
}

// Raft is what the scheduler needs from its Raft node (raftnode.Node).
type Raft interface {
	Apply(ctx context.Context, t fsm.MessageType, msg proto.Message) (any, error)
	IsLeader() bool
	Leader() (addr, id string)
	Term() uint64
	AppliedIndex() uint64
	CommitIndex() uint64
	VerifyLeader(ctx context.Context) error
	Barrier(ctx context.Context) error
	AddVoter(ctx context.Context, id, addr string) error
	RemoveServer(ctx context.Context, id string) error
	Servers() ([]raft.Server, error)
	Snapshot() (io.ReadCloser, error)
	Restore(ctx context.Context, r io.Reader, size int64) error
	HadState() bool
}

// Scheduler is one server's control plane.
type Scheduler struct {
	cfg    Config
	fsm    *fsm.FSM
	raft   Raft
	agents *agentPool
	log    *slog.Logger

	mu sync.Mutex
	// heartbeats records when each running execution last showed life.
	heartbeats map[string]time.Time
	// containerIDs are the containers of warm starts not recorded yet, by
	// session id (see createWarm).
	containerIDs map[string]string
	// oneShots are the executions handed over and not yet recorded (see oneshot.go).
	oneShots map[string]*oneShot
	// warmSent is what this leader last told each agent about warm pools.
	warmSent map[string]warmSent
	// agentSeen records when each agent last registered with this server.
	agentSeen map[string]time.Time

	// starting holds the sessions whose start this server drives.
	starting map[string]bool
	// agentDown records since when the mesh has not seen each agent alive.
	agentDown map[string]time.Time
	started   time.Time

	// readyTerm is the term in which this leader last ran a barrier; calls
	// are served only once it equals the current term.
	readyTerm atomic.Uint64

	proxiesMu sync.Mutex
	proxies   map[string]*httputil.ReverseProxy

	// placement is what picking agents keeps between calls (placement.go).
	placement placementState
}

// selfInternalURL is the URL agents reach this server's internal port at.
func selfInternalURL(self *sandboxv1.Server) string {
	if self.GetInternalAddress() == "" {
		return ""
	}
	return "http://" + self.GetInternalAddress()
}

// New returns a scheduler over an FSM and the Raft node that feeds it.
func New(cfg Config, f *fsm.FSM, r Raft) *Scheduler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Scheduler{
		cfg:          cfg,
		fsm:          f,
		raft:         r,
		agents:       newAgentPool(cfg.ClusterToken, selfInternalURL(cfg.Self)),
		log:          cfg.Logger,
		heartbeats:   make(map[string]time.Time),
		warmSent:     make(map[string]warmSent),
		oneShots:     make(map[string]*oneShot),
		containerIDs: make(map[string]string),
		agentSeen:    make(map[string]time.Time),
		proxies:      make(map[string]*httputil.ReverseProxy),
		agentDown:    make(map[string]time.Time),
		starting:     make(map[string]bool),
		started:      time.Now(),
	}
	if s.cfg.Self == nil {
		s.cfg.Self = &sandboxv1.Server{Id: "local"}
	}
	if cfg.Registry != nil {
		cfg.Registry.MustRegister(newCollector(f))
	}
	return s
}

// Run does the leader's work while this server leads, until ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	// Agent failures are swept on their own, faster loop, so that a slow
	// housekeeping pass never delays declaring a dead agent's sessions LOST.
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.watchAgents(ctx)
	}()
	t := time.NewTicker(s.cfg.HousekeepingInterval)
	defer t.Stop()
	bootstrapped := false
	var lastReconcile time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if !s.raft.IsLeader() {
			bootstrapped = false
			s.registerSelf(ctx)
			continue
		}
		if !bootstrapped {
			// A new leader: make sure the cluster knows this server's
			// addresses and the built-in templates, then compare every
			// agent with the replicated state before doing anything else.
			if err := s.leaderSetup(ctx); err != nil {
				s.log.Warn("leader setup", "err", err)
				continue
			}
			bootstrapped = true
			lastReconcile = time.Now()
		}
		now := time.Now()
		if !s.recorded() { // after a snapshot restore
			if err := s.putServer(ctx, s.cfg.Self); err != nil {
				s.log.Warn("recording this server's addresses", "err", err)
			}
		}
		s.housekeep(ctx, now)
		s.expireOneShots(now)
		s.flushContainerIDs(ctx)
		s.syncWarmPools(ctx, now)
		if now.Sub(lastReconcile) >= s.cfg.ReconcileInterval {
			s.reconcileAll(ctx)
			lastReconcile = now
		}
	}
}

// bootstrap creates the built-in templates that do not exist yet.
func (s *Scheduler) bootstrap(ctx context.Context) error {
	for _, bt := range sandbox.BuiltinTemplates {
		if _, ok := s.fsm.Template(bt.ID); ok {
			continue
		}
		t := &sandboxv1.Template{
			Id:            bt.ID,
			Image:         bt.Image,
			Languages:     bt.Languages,
			Description:   bt.Description,
			DefaultLimits: limitsToProto(bt.DefaultLimits),
			MaxLimits:     limitsToProto(bt.MaxLimits),
			Builtin:       true,
			CreatedAt:     timestamppb.Now(),
		}
		if _, err := s.raft.Apply(ctx, fsm.CreateTemplateType, &statev1.CreateTemplate{Template: t}); err != nil {
			if errors.Is(err, sandbox.ErrAlreadyExists) {
				continue // a previous leader's bootstrap got there first
			}
			return fmt.Errorf("template %s: %w", bt.ID, err)
		}
		s.log.Info("created built-in template", "template", bt.ID)
	}
	return nil
}

// apply commits one command; it is the single path for every write.
func (s *Scheduler) apply(ctx context.Context, t fsm.MessageType, msg proto.Message) error {
	_, err := s.raft.Apply(ctx, t, msg)
	return err
}

// fence is the token every command to an agent carries: the leader's term
// and the index it had applied, so agents refuse a deposed leader.
func (s *Scheduler) fence() *agentv1.Fence {
	return &agentv1.Fence{Term: s.raft.Term(), Index: s.raft.AppliedIndex()}
}

// newID returns a short random id: 80 bits, base32, lower case. Short ids
// keep the agents' socket paths well under the 108-byte unix socket limit.
func newID(prefix string) string {
	b := make([]byte, 10)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return prefix + "_" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b))
}

func newToken() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return hex.EncodeToString(b)
}

func limitsToProto(l sandbox.Limits) *sandboxv1.ResourceLimits {
	return &sandboxv1.ResourceLimits{
		CpuMillis:                  l.CPUMillis,
		MemoryMib:                  l.MemoryMiB,
		Pids:                       l.Pids,
		DiskMib:                    l.DiskMiB,
		MaxExecutionTimeoutSeconds: l.MaxExecutionTimeoutSeconds,
	}
}

func limitsFromProto(p *sandboxv1.ResourceLimits) sandbox.Limits {
	return sandbox.Limits{
		CPUMillis:                  p.GetCpuMillis(),
		MemoryMiB:                  p.GetMemoryMib(),
		Pids:                       p.GetPids(),
		DiskMiB:                    p.GetDiskMib(),
		MaxExecutionTimeoutSeconds: p.GetMaxExecutionTimeoutSeconds(),
	}
}

// ignoreStale treats a refused transition as success: it means another path
// (the callback or the request) already recorded a later state.
func ignoreStale(err error) error {
	if errors.Is(err, sandbox.ErrFailedPrecondition) {
		return nil
	}
	return err
}
